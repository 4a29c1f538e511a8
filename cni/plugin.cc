// weft-cni's logic: validates the runtime's CNI environment and config, asks the agent, and
// shapes the CNI result or error. No I/O here except through the injected callbacks.
#include "cni/plugin.h"

#include <algorithm>
#include <array>
#include <cctype>

namespace weft::cni {
namespace {

using nlohmann::json;

constexpr std::array<const char*, 2> kSupportedVersions = {"0.4.0", "1.0.0"};
constexpr const char* kDefaultVersion = "1.0.0";

bool supportedVersion(const std::string& v) {
  return std::find_if(kSupportedVersions.begin(), kSupportedVersions.end(),
                      [&](const char* s) { return v == s; }) != kSupportedVersions.end();
}

CniError envError(std::string msg, std::string details = "") {
  return CniError{kErrInvalidEnvironment, std::move(msg), std::move(details)};
}

const std::string* lookup(const Env& env, const char* key) {
  auto it = env.find(key);
  return it == env.end() ? nullptr : &it->second;
}

// CNI spec: container ID is alphanumerics plus '_', '.', '-', starting with an alphanumeric.
bool validContainerId(const std::string& id) {
  if (id.empty() || id.size() > 1024 || !std::isalnum(static_cast<unsigned char>(id[0]))) {
    return false;
  }
  return std::all_of(id.begin(), id.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' || c == '-';
  });
}

// CNI spec: interface name at most 15 bytes, not "." or "..", no '/', ':' or whitespace.
bool validIfname(const std::string& name) {
  if (name.empty() || name.size() > 15 || name == "." || name == "..") return false;
  return std::none_of(name.begin(), name.end(), [](char c) {
    return c == '/' || c == ':' || std::isspace(static_cast<unsigned char>(c));
  });
}

}  // namespace

std::optional<CniError> parseCniArgs(std::string_view text,
                                     std::map<std::string, std::string>* out) {
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t end = text.find(';', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view pair = text.substr(pos, end - pos);
    pos = end + 1;
    if (pair.empty()) continue;
    size_t eq = pair.find('=');
    if (eq == std::string_view::npos || eq == 0) {
      return envError("invalid CNI_ARGS", "pair \"" + std::string(pair) + "\" is not KEY=VALUE");
    }
    (*out)[std::string(pair.substr(0, eq))] = std::string(pair.substr(eq + 1));
  }
  return std::nullopt;
}

std::optional<CniError> parseEnvironment(
    const Env& env, Environment* out, const std::function<bool(const std::string&)>& netnsExists) {
  *out = Environment{};
  const std::string* command = lookup(env, "CNI_COMMAND");
  if (!command || command->empty()) return envError("CNI_COMMAND is not set");
  out->commandName = *command;
  if (*command == "ADD") {
    out->command = Command::kAdd;
  } else if (*command == "DEL") {
    out->command = Command::kDel;
  } else if (*command == "CHECK") {
    out->command = Command::kCheck;
  } else if (*command == "VERSION") {
    out->command = Command::kVersion;
    return std::nullopt;
  } else {
    return envError("unknown CNI_COMMAND", "CNI_COMMAND=" + *command);
  }

  const std::string* id = lookup(env, "CNI_CONTAINERID");
  if (!id || id->empty()) return envError("CNI_CONTAINERID is not set");
  if (!validContainerId(*id)) return envError("invalid CNI_CONTAINERID", *id);
  out->containerId = *id;

  const std::string* ifname = lookup(env, "CNI_IFNAME");
  if (!ifname || ifname->empty()) return envError("CNI_IFNAME is not set");
  if (!validIfname(*ifname)) return envError("invalid CNI_IFNAME", *ifname);
  out->ifname = *ifname;

  const std::string* path = lookup(env, "CNI_PATH");
  if (!path || path->empty()) return envError("CNI_PATH is not set");
  out->path = *path;

  const std::string* netns = lookup(env, "CNI_NETNS");
  if (netns) out->netns = *netns;
  if (out->command != Command::kDel) {
    if (out->netns.empty()) return envError("CNI_NETNS is not set");
    // Code 4: the runtime handed us a CNI_NETNS that names nothing.
    if (!netnsExists(out->netns)) {
      return envError("CNI_NETNS does not exist", "CNI_NETNS=" + out->netns);
    }
  }

  if (const std::string* args = lookup(env, "CNI_ARGS")) {
    if (auto err = parseCniArgs(*args, &out->args)) return err;
  }
  auto arg = [&](const char* key) {
    auto it = out->args.find(key);
    return it == out->args.end() ? std::string() : it->second;
  };
  out->podName = arg("K8S_POD_NAME");
  out->podNamespace = arg("K8S_POD_NAMESPACE");
  out->podUid = arg("K8S_POD_UID");
  // The agent finds the pod by namespace/name; DEL goes on without them (container id).
  if (out->command != Command::kDel && (out->podName.empty() || out->podNamespace.empty())) {
    return envError("CNI_ARGS lacks K8S_POD_NAME or K8S_POD_NAMESPACE",
                    lookup(env, "CNI_ARGS") ? *lookup(env, "CNI_ARGS") : "");
  }
  return std::nullopt;
}

std::optional<CniError> parseConfig(std::string_view text, bool forVersion, Config* out) {
  if (text.size() > kMaxConfigBytes) {
    return CniError{kErrDecodeFailure, "network config on stdin is too large",
                    "more than " + std::to_string(kMaxConfigBytes) + " bytes"};
  }
  json doc = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) {
    // VERSION may come with an empty stdin.
    if (forVersion && std::all_of(text.begin(), text.end(), [](char c) {
          return std::isspace(static_cast<unsigned char>(c));
        })) {
      out->cniVersion = kDefaultVersion;
      return std::nullopt;
    }
    return CniError{kErrDecodeFailure, "network config on stdin is not valid JSON", ""};
  }
  if (!doc.is_object()) {
    return CniError{kErrDecodeFailure, "network config on stdin is not a JSON object", ""};
  }

  auto version = doc.find("cniVersion");
  if (version == doc.end()) {
    if (!forVersion) return CniError{kErrInvalidConfig, "config: cniVersion is missing", ""};
    out->cniVersion = kDefaultVersion;
  } else if (!version->is_string()) {
    return CniError{kErrInvalidConfig, "config: cniVersion is not a string", ""};
  } else {
    out->cniVersion = version->get<std::string>();
  }
  if (forVersion) return std::nullopt;
  if (!supportedVersion(out->cniVersion)) {
    return CniError{kErrIncompatibleVersion, "incompatible CNI version",
                    "config cniVersion " + out->cniVersion + "; supported 0.4.0, 1.0.0"};
  }

  if (auto name = doc.find("name"); name != doc.end()) {
    if (!name->is_string()) return CniError{kErrInvalidConfig, "config: name is not a string", ""};
    out->name = name->get<std::string>();
  }
  if (auto sock = doc.find("agent_socket"); sock != doc.end()) {
    if (!sock->is_string() || sock->get<std::string>().empty()) {
      return CniError{kErrInvalidConfig, "config: agent_socket is not a non-empty string", ""};
    }
    out->agentSocket = sock->get<std::string>();
    if (out->agentSocket.size() >= 108) {  // sizeof(sockaddr_un::sun_path)
      return CniError{kErrInvalidConfig, "config: agent_socket path is too long",
                      out->agentSocket};
    }
  }
  if (auto t = doc.find("timeout_seconds"); t != doc.end()) {
    if (!t->is_number_integer() || t->get<int64_t>() <= 0 || t->get<int64_t>() > 3600) {
      return CniError{kErrInvalidConfig, "config: timeout_seconds must be an integer in 1..3600",
                      t->dump()};
    }
    out->timeout = std::chrono::seconds(t->get<int64_t>());
  }
  if (auto prev = doc.find("prevResult"); prev != doc.end() && !prev->is_null()) {
    if (!prev->is_object()) {
      return CniError{kErrInvalidConfig, "config: prevResult is not an object", ""};
    }
    out->prevResult = *prev;
  }
  return std::nullopt;
}

std::vector<std::string> prevResultIps(const Config& config) {
  std::vector<std::string> out;
  if (!config.prevResult || !config.prevResult->is_object()) return out;
  auto ips = config.prevResult->find("ips");
  if (ips == config.prevResult->end() || !ips->is_array()) return out;
  for (const json& e : *ips) {
    if (out.size() >= 8) break;
    if (!e.is_object()) continue;
    auto a = e.find("address");
    if (a == e.end() || !a->is_string()) continue;
    std::string addr = a->get<std::string>();
    addr = addr.substr(0, addr.find('/'));
    if (!addr.empty() && addr.size() <= 64) out.push_back(addr);  // the agent validates it
  }
  return out;
}

json agentRequest(const Environment& env, const Config& config) {
  json r{{"command", env.commandName}, {"container_id", env.containerId},
         {"netns", env.netns},          {"ifname", env.ifname},
         {"pod_name", env.podName},     {"pod_namespace", env.podNamespace},
         {"pod_uid", env.podUid}};
  if (env.command == Command::kAdd) {
    auto ips = prevResultIps(config);
    if (!ips.empty()) r["pod_ips"] = ips;
  }
  return r;
}

json addResult(const Config& config) {
  if (config.prevResult) {
    json result = *config.prevResult;
    result["cniVersion"] = config.cniVersion;
    return result;
  }
  // No earlier plugin in the chain: an empty but valid result.
  return json{{"cniVersion", config.cniVersion},
              {"interfaces", json::array()},
              {"ips", json::array()},
              {"dns", json::object()}};
}

json errorJson(const std::string& cniVersion, const CniError& error) {
  json out{{"cniVersion", cniVersion.empty() ? kDefaultVersion : cniVersion},
           {"code", error.code},
           {"msg", error.msg}};
  if (!error.details.empty()) out["details"] = error.details;
  return out;
}

Outcome run(const Env& env, std::string_view stdinText, const AgentCall& callAgent,
            const std::function<bool(const std::string&)>& netnsExists) {
  Environment environment;
  Config config;
  auto fail = [&](const CniError& e) {
    std::string version = supportedVersion(config.cniVersion) ? config.cniVersion
                                                              : std::string(kDefaultVersion);
    return Outcome{1, errorJson(version, e).dump() + "\n"};
  };

  if (auto err = parseEnvironment(env, &environment, netnsExists)) {
    // Best effort: answer in the caller's version when its config says which.
    Config probe;
    if (!parseConfig(stdinText, true, &probe)) config.cniVersion = probe.cniVersion;
    return fail(*err);
  }

  if (environment.command == Command::kVersion) {
    if (auto err = parseConfig(stdinText, true, &config)) return fail(*err);
    json out{{"cniVersion", supportedVersion(config.cniVersion) ? config.cniVersion
                                                                 : std::string(kDefaultVersion)},
             {"supportedVersions", json(kSupportedVersions)}};
    return Outcome{0, out.dump() + "\n"};
  }

  if (auto err = parseConfig(stdinText, false, &config)) return fail(*err);

  AgentReply reply = callAgent(config.agentSocket, agentRequest(environment, config),
                               std::chrono::duration_cast<std::chrono::milliseconds>(
                                   config.timeout));
  if (!reply.ok) {
    // DEL is idempotent: a pod the agent does not know is already gone.
    if (environment.command == Command::kDel && reply.error.code == kErrUnknownContainer) {
      return Outcome{0, ""};
    }
    return fail(reply.error);
  }
  if (environment.command == Command::kAdd) return Outcome{0, addResult(config).dump() + "\n"};
  return Outcome{0, ""};  // DEL and CHECK print nothing on success
}

}  // namespace weft::cni
