// The blocking client side of the agent's CNI socket: one JSON request, one JSON answer,
// everything under one deadline.
#pragma once

#include <chrono>
#include <string>

#include <nlohmann/json.hpp>

#include "cni/plugin.h"

namespace weft::cni {

// Bound on the agent's answer; it is one small JSON object.
inline constexpr size_t kMaxReplyBytes = 64 * 1024;

// Connects to `socketPath` (SOCK_STREAM), sends `request`, half-closes, reads the answer until
// EOF. Unreachable, reset or timed out -> code 11 (try again later); an answer that is not the
// documented shape -> code 5; {"ok":false,...} -> the agent's own code/msg/details.
AgentReply callAgent(const std::string& socketPath, const nlohmann::json& request,
                     std::chrono::milliseconds timeout);

}  // namespace weft::cni
