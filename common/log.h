// Logging: spdlog set up once per process, text or JSON lines on stderr.
#pragma once

#include <spdlog/spdlog.h>

#include <string>

namespace weft {

// level: trace|debug|info|warn|error. component names the process ("agent", "ztunnel").
void initLogging(const std::string& component, const std::string& level, bool json);

// Changes the level at run time; false if `level` is not a level name.
bool setLogLevel(const std::string& level);

}  // namespace weft
