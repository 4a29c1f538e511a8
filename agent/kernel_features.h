// The kernel facts the agent reports on GET /status (for `weftctl status`): release and the
// BPF program/map types and helpers Weft's dataplane needs, probed once with libbpf.
#pragma once

#include <nlohmann/json.hpp>

namespace weft::agent {

// {"release", "features": {name: bool}, "missing": [names]}; probed on the first call (needs
// CAP_BPF, which the agent has), cached after.
const nlohmann::json& kernelFeatures();

}  // namespace weft::agent
