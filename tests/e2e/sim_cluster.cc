// SimCluster: drives scripts/sim for the end-to-end tests.
#include "tests/e2e/sim_cluster.h"

#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <fmt/format.h>

namespace weft::e2e {
namespace fs = std::filesystem;

std::string repoRoot() { return WEFT_E2E_SOURCE_DIR; }
std::string buildDir() { return WEFT_E2E_BUILD_DIR; }
std::string echoServerPath() { return WEFT_E2E_ECHO_SERVER; }
std::string echoClientPath() { return WEFT_E2E_ECHO_CLIENT; }

std::string namespaceYaml(const std::string& name, bool ambient) {
  std::string y = fmt::format("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n", name);
  if (ambient) y += "  labels:\n    weft.dev/dataplane-mode: ambient\n";
  return y;
}

std::string podYaml(const PodSpec& p) {
  std::string y = fmt::format(
      "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n", p.name, p.ns);
  if (!p.labels.empty()) {
    y += "  labels:\n";
    for (auto& [k, v] : p.labels) y += fmt::format("    {}: \"{}\"\n", k, v);
  }
  y += fmt::format("  annotations:\n    sim.weft.dev/command: \"{}\"\n", p.command);
  if (p.readyPort) y += fmt::format("    sim.weft.dev/ready-port: \"{}\"\n", p.readyPort);
  y += fmt::format(
      "spec:\n  nodeName: {}\n  serviceAccountName: default\n  containers:\n"
      "  - name: app\n    image: weft-e2e\n",
      p.node);
  if (!p.containerPorts.empty()) {
    y += "    ports:\n";
    for (const auto& [name, port] : p.containerPorts)
      y += fmt::format("    - name: {}\n      containerPort: {}\n", name, port);
  }
  y += "status:\n  podIPs:\n";
  if (!p.ip4.empty()) y += fmt::format("  - ip: {}\n", p.ip4);
  if (!p.ip6.empty()) y += fmt::format("  - ip: {}\n", p.ip6);
  return y;
}

double sumSamples(const std::string& text, const std::string& metric,
                  const std::map<std::string, std::string>& match) {
  double sum = 0;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    if (line.compare(0, metric.size(), metric) != 0) continue;
    size_t pos = metric.size();
    if (pos < line.size() && line[pos] != '{' && line[pos] != ' ') continue;  // longer name
    std::map<std::string, std::string> labels;
    if (pos < line.size() && line[pos] == '{') {
      size_t end = line.find('}', pos);
      if (end == std::string::npos) continue;
      std::string body = line.substr(pos + 1, end - pos - 1);
      // k="v" pairs; values may hold commas, so walk quotes instead of splitting.
      size_t i = 0;
      while (i < body.size()) {
        size_t eq = body.find('=', i);
        if (eq == std::string::npos || eq + 1 >= body.size() || body[eq + 1] != '"') break;
        std::string key = body.substr(i, eq - i);
        std::string value;
        size_t j = eq + 2;
        for (; j < body.size() && body[j] != '"'; ++j) {
          if (body[j] == '\\' && j + 1 < body.size()) ++j;
          value += body[j];
        }
        labels[key] = value;
        i = j + 1;
        if (i < body.size() && body[i] == ',') ++i;
      }
      pos = end + 1;
    }
    bool ok = true;
    for (auto& [k, v] : match) {
      auto it = labels.find(k);
      if (it == labels.end() || it->second != v) ok = false;
    }
    if (!ok) continue;
    try {
      sum += std::stod(line.substr(pos));
    } catch (...) {
      // a malformed sample counts as nothing; the test's delta check then fails visibly
    }
  }
  return sum;
}

SimCluster::SimCluster(std::string name) : name_(std::move(name)) {}

SimCluster::~SimCluster() { down(); }

std::vector<std::string> SimCluster::simArgv(const std::string& verb) const {
  return {repoRoot() + "/scripts/sim", verb, "--name", name_};
}

bool SimCluster::up(int nodes, const std::vector<ManifestFile>& files, std::string* error,
                    const std::vector<std::string>& extraArgs) {
  char tmpl[] = "/tmp/weft-e2e-manifests-XXXXXX";
  if (!::mkdtemp(tmpl)) {
    *error = "mkdtemp failed";
    return false;
  }
  dir_ = tmpl;
  for (auto& f : files) {
    std::ofstream out(dir_ + "/" + f.name);
    out << f.yaml;
    if (!out) {
      *error = "writing " + dir_ + "/" + f.name;
      return false;
    }
  }
  // A leftover of a crashed run with the same name is the sim's to clean (DESIGN §9); we mark
  // ourselves up before the call so a half-made cluster is torn down too.
  up_ = true;
  auto argv = simArgv("up");
  for (auto a : {"--nodes", "N", "--manifests", "D", "--build-dir", "B"}) argv.push_back(a);
  argv[argv.size() - 5] = std::to_string(nodes);
  argv[argv.size() - 3] = dir_;
  argv[argv.size() - 1] = buildDir();
  argv.insert(argv.end(), extraArgs.begin(), extraArgs.end());
  // WEFT_E2E_AGENT_ARGS: space-separated weft-agent arguments for every sim of the run (e.g.
  // "--local-hop-accel=on"), to run the suites against a non-default dataplane setting.
  if (const char* extra = std::getenv("WEFT_E2E_AGENT_ARGS")) {
    std::istringstream words(extra);
    for (std::string w; words >> w;) argv.push_back("--agent-arg=" + w);
  }
  RunOptions o;
  o.timeout = std::chrono::seconds(180);
  auto r = run(argv, o);
  if (r.exitCode != 0) {
    *error = "scripts/sim up: " + r.describe();
    return false;
  }
  return true;
}

void SimCluster::down() {
  if (up_) {
    RunOptions o;
    o.timeout = std::chrono::seconds(120);
    auto r = run(simArgv("down"), o);
    if (r.exitCode != 0) {
      std::fprintf(stderr, "scripts/sim down --name %s: %s\n", name_.c_str(),
                   r.describe().c_str());
    }
    up_ = false;
  }
  restartedAgents_.clear();  // any agent we started ourselves, killed by pid group
  if (!dir_.empty()) {
    std::error_code ec;
    fs::remove_all(dir_, ec);
    dir_.clear();
  }
}

std::optional<nlohmann::json> SimCluster::status(std::string* error) {
  auto argv = simArgv("status");
  argv.push_back("--json");
  auto r = run(argv, withTimeout(std::chrono::seconds(30)));
  if (r.exitCode != 0) {
    if (error) *error = "scripts/sim status --json: " + r.describe();
    return std::nullopt;
  }
  auto j = nlohmann::json::parse(r.out, nullptr, false);
  if (j.is_discarded()) {
    if (error) *error = "scripts/sim status --json printed no JSON: " + r.out.substr(0, 2000);
    return std::nullopt;
  }
  return j;
}

std::vector<std::string> SimCluster::execArgv(const std::string& nsPod,
                                              const std::vector<std::string>& cmd) const {
  auto argv = simArgv("exec");
  argv.push_back(nsPod);
  argv.push_back("--");
  argv.insert(argv.end(), cmd.begin(), cmd.end());
  return argv;
}

RunResult SimCluster::exec(const std::string& nsPod, const std::vector<std::string>& cmd,
                           std::chrono::milliseconds timeout) {
  return run(execArgv(nsPod, cmd), withTimeout(timeout));
}

RunResult SimCluster::onNode(const std::string& node, const std::vector<std::string>& cmd,
                             std::chrono::milliseconds timeout) {
  auto argv = simArgv("node");
  argv.push_back(node);
  argv.push_back("--");
  argv.insert(argv.end(), cmd.begin(), cmd.end());
  return run(argv, withTimeout(timeout));
}

// The status shape these accessors read (our request to scripts/sim; see the report):
//   {"name": S, "manifests_dir": "/run/weft-sim/S/manifests",
//    "nodes": [{"name": "node1", "netns": "weft-S-node1", "cgroup": "<cgroup2>/weft-S/node1",
//               "pin_dir": "/sys/fs/bpf/weft-S/node1",
//               "agent": {"pid": N, "cmdline": [argv...], "admin_socket": P, "cni_socket": P,
//                         "ztunnel_socket": P, "log": P},
//               "ztunnel": {"pid": N, "log": P}}, ...],
//    "pods": [{"namespace", "name", "node", "ips": [...], "pid", "log"}, ...]}
std::optional<nlohmann::json> SimCluster::nodeStatus(const std::string& node) {
  auto s = status();
  if (!s || !s->contains("nodes")) return std::nullopt;
  const auto& nodes = (*s)["nodes"];
  if (nodes.is_object() && nodes.contains(node)) return nodes[node];
  if (nodes.is_array()) {
    for (auto& n : nodes) {
      if (n.value("name", "") == node) return n;
    }
  }
  return std::nullopt;
}

std::optional<std::string> SimCluster::liveManifestsDir() {
  auto s = status();
  if (!s) return std::nullopt;
  for (auto key : {"manifests_dir", "manifests"}) {
    if (s->contains(key) && (*s)[key].is_string()) return (*s)[key].get<std::string>();
  }
  return std::nullopt;
}

bool SimCluster::writeLiveManifest(const std::string& file, const std::string& yaml,
                                   std::string* error) {
  auto dir = liveManifestsDir();
  if (!dir) {
    *error = "no manifests_dir in scripts/sim status --json";
    return false;
  }
  // The temp name does not end in .yaml, so the watcher never reads a half-written file.
  std::string tmp = *dir + "/." + file + ".tmp";
  {
    std::ofstream out(tmp);
    out << yaml;
    if (!out) {
      *error = "writing " + tmp;
      return false;
    }
  }
  if (::rename(tmp.c_str(), (*dir + "/" + file).c_str()) != 0) {
    *error = "rename to " + *dir + "/" + file;
    return false;
  }
  return true;
}

bool SimCluster::removeLiveManifest(const std::string& file) {
  auto dir = liveManifestsDir();
  if (!dir) return false;
  std::error_code ec;
  return fs::remove(*dir + "/" + file, ec);
}

std::optional<int> SimCluster::agentPid(const std::string& node) {
  auto n = nodeStatus(node);
  if (!n || !n->contains("agent")) return std::nullopt;
  auto& a = (*n)["agent"];
  if (a.contains("pid") && a["pid"].is_number_integer()) return a["pid"].get<int>();
  return std::nullopt;
}

std::optional<std::vector<std::string>> SimCluster::agentCommand(const std::string& node) {
  auto n = nodeStatus(node);
  if (!n || !n->contains("agent")) return std::nullopt;
  auto& a = (*n)["agent"];
  for (auto key : {"cmdline", "command", "argv"}) {
    if (a.contains(key) && a[key].is_array()) return a[key].get<std::vector<std::string>>();
  }
  return std::nullopt;
}

std::optional<std::string> SimCluster::agentSocket(const std::string& node,
                                                   const std::string& which) {
  auto n = nodeStatus(node);
  if (!n || !n->contains("agent")) return std::nullopt;
  auto& a = (*n)["agent"];
  std::string key = which + "_socket";  // admin_socket, cni_socket, ztunnel_socket
  if (a.contains(key) && a[key].is_string()) return a[key].get<std::string>();
  return std::nullopt;
}

std::optional<std::string> SimCluster::nodeCgroup(const std::string& node) {
  auto n = nodeStatus(node);
  if (n && n->contains("cgroup") && (*n)["cgroup"].is_string()) return (*n)["cgroup"];
  return std::nullopt;
}

std::optional<std::string> SimCluster::pinDir(const std::string& node) {
  auto n = nodeStatus(node);
  if (n && n->contains("pin_dir") && (*n)["pin_dir"].is_string()) return (*n)["pin_dir"];
  // ARCHITECTURE.md "The sim": pins in /sys/fs/bpf/weft-S/nodek.
  return "/sys/fs/bpf/weft-" + name_ + "/" + node;
}

std::optional<std::string> SimCluster::metrics(const std::string& node, std::string* error) {
  auto r = onNode(node, {"curl", "-sS", "--max-time", "5", "http://127.0.0.1:15020/metrics"});
  if (r.exitCode != 0) {
    if (error) *error = node + " metrics: " + r.describe();
    return std::nullopt;
  }
  return r.out;
}

std::optional<std::string> SimCluster::agentAdmin(const std::string& node, const std::string& path,
                                                  std::string* error) {
  auto sock = agentSocket(node, "admin");
  if (!sock) {
    if (error) *error = "no nodes[" + node + "].agent.admin_socket in scripts/sim status --json";
    return std::nullopt;
  }
  auto r = run({"curl", "-sS", "--max-time", "5", "--unix-socket", *sock, "http://agent" + path},
               withTimeout(std::chrono::seconds(10)));
  if (r.exitCode != 0) {
    if (error) *error = "curl --unix-socket " + *sock + " " + path + ": " + r.describe();
    return std::nullopt;
  }
  return r.out;
}

std::string SimCluster::restartedAgentLog(const std::string& node) const {
  return dir_ + "/restarted-agent-" + node + ".log";
}

bool SimCluster::restartAgent(const std::string& node, std::string* error) {
  // Preferred: the sim restarts the agent the way it started it (cgroup, logs, pid in status).
  auto help = run({repoRoot() + "/scripts/sim", "--help"}, withTimeout(std::chrono::seconds(10)));
  if ((help.out + help.err).find("restart-agent") != std::string::npos) {
    auto argv = simArgv("restart-agent");
    argv.push_back(node);
    auto r = run(argv, withTimeout(std::chrono::seconds(60)));
    if (r.exitCode != 0) {
      *error = "scripts/sim restart-agent: " + r.describe();
      return false;
    }
    return true;
  }
  // Fallback: the exact command line the sim recorded, run in the node's netns by `sim node`.
  auto cmd = agentCommand(node);
  if (!cmd || cmd->empty()) {
    *error = "scripts/sim has no restart-agent verb and status --json has no "
             "nodes[" + node + "].agent.cmdline";
    return false;
  }
  auto argv = simArgv("node");
  argv.push_back(node);
  argv.push_back("--");
  argv.insert(argv.end(), cmd->begin(), cmd->end());
  auto child = std::make_unique<Child>();
  if (!child->start(argv, restartedAgentLog(node))) {
    *error = "could not start the agent";
    return false;
  }
  restartedAgents_.push_back(std::move(child));
  return true;
}

}  // namespace weft::e2e
