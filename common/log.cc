// spdlog configuration shared by every Weft process.
#include "common/log.h"

#include <spdlog/sinks/stdout_sinks.h>

namespace weft {

void initLogging(const std::string& component, const std::string& level, bool json) {
  auto logger = spdlog::stderr_logger_mt(component);
  if (json) {
    logger->set_pattern(
        R"({"time":"%Y-%m-%dT%H:%M:%S.%fZ","level":"%l","component":"%n","msg":"%v"})",
        spdlog::pattern_time_type::utc);
  } else {
    logger->set_pattern("%Y-%m-%dT%H:%M:%S.%fZ %^%l%$ %n: %v", spdlog::pattern_time_type::utc);
  }
  spdlog::set_default_logger(logger);
  spdlog::flush_on(spdlog::level::info);
  if (!setLogLevel(level)) spdlog::set_level(spdlog::level::info);
}

bool setLogLevel(const std::string& level) {
  auto l = spdlog::level::from_str(level);
  if (l == spdlog::level::off && level != "off") return false;
  spdlog::set_level(l);
  return true;
}

}  // namespace weft
