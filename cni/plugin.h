// weft-cni's logic as plain functions: CNI environment and config parsing, the agent request,
// and the whole run (environment + stdin -> stdout + exit code), so tests can drive each part.
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace weft::cni {

// CNI spec 1.0.0 well-known error codes (section "Error").
inline constexpr int kErrIncompatibleVersion = 1;
inline constexpr int kErrUnsupportedField = 2;
inline constexpr int kErrUnknownContainer = 3;
inline constexpr int kErrInvalidEnvironment = 4;
inline constexpr int kErrIoFailure = 5;
inline constexpr int kErrDecodeFailure = 6;
inline constexpr int kErrInvalidConfig = 7;
inline constexpr int kErrTryAgainLater = 11;

inline constexpr const char* kDefaultAgentSocket = "/var/run/weft/cni.sock";
inline constexpr int kDefaultTimeoutSeconds = 30;
// Bound on the config read from stdin; real configs with a prevResult are a few KiB.
inline constexpr size_t kMaxConfigBytes = 1 << 20;

struct CniError {
  int code = 0;
  std::string msg;
  std::string details;
};

enum class Command { kAdd, kDel, kCheck, kVersion };

// The CNI_* environment the runtime set for this call.
struct Environment {
  Command command = Command::kVersion;
  std::string commandName;  // as given: "ADD", ...
  std::string containerId;
  std::string netns;  // may be empty on DEL
  std::string ifname;
  std::string path;
  std::map<std::string, std::string> args;  // CNI_ARGS, K=V;K=V
  std::string podName;
  std::string podNamespace;
  std::string podUid;
};

// The part of the stdin network config weft-cni reads.
struct Config {
  std::string cniVersion;
  std::string name;
  std::string agentSocket = kDefaultAgentSocket;
  std::chrono::seconds timeout{kDefaultTimeoutSeconds};
  std::optional<nlohmann::json> prevResult;
};

using Env = std::map<std::string, std::string>;

// "K8S_POD_NAME=a;K8S_POD_NAMESPACE=b" -> map. Empty pairs are skipped; a pair without '='
// or with an empty key is an error (code 4).
std::optional<CniError> parseCniArgs(std::string_view text,
                                     std::map<std::string, std::string>* out);

// Reads and validates CNI_* variables for the command. `netnsExists` is asked whether the
// CNI_NETNS path exists (ADD and CHECK require it; DEL does not).
std::optional<CniError> parseEnvironment(
    const Env& env, Environment* out, const std::function<bool(const std::string&)>& netnsExists);

// Parses the stdin config. `forVersion` relaxes what VERSION does not need.
std::optional<CniError> parseConfig(std::string_view text, bool forVersion, Config* out);

// The request object the agent's CNI socket expects (docs/ARCHITECTURE.md). On ADD it carries
// `pod_ips`, the addresses of the previous plugin's result (prevResult.ips[].address without
// the prefix length): on a real cluster the API server learns the pod's IPs only after ADD.
nlohmann::json agentRequest(const Environment& env, const Config& config = {});
// prevResult.ips[].address values without their "/len" (at most 8; malformed ones skipped).
std::vector<std::string> prevResultIps(const Config& config);

// The result an ADD prints: prevResult unchanged except cniVersion, or a minimal result.
nlohmann::json addResult(const Config& config);

// {"cniVersion","code","msg","details"}.
nlohmann::json errorJson(const std::string& cniVersion, const CniError& error);

// The agent's answer, or a CNI error standing for "could not ask it".
struct AgentReply {
  bool ok = false;
  CniError error;  // when !ok
};
using AgentCall = std::function<AgentReply(const std::string& socketPath,
                                           const nlohmann::json& request,
                                           std::chrono::milliseconds timeout)>;

struct Outcome {
  int exitCode = 0;
  std::string stdoutText;  // one JSON document and a newline, or empty
};

// One plugin invocation, start to end.
Outcome run(const Env& env, std::string_view stdinText, const AgentCall& callAgent,
            const std::function<bool(const std::string&)>& netnsExists);

}  // namespace weft::cni
