// SimCluster: one simulated cluster (scripts/sim) for a test suite: brings it up from a
// manifest set, runs commands in pods and nodes, reads its status, metrics and admin APIs,
// and always tears it down.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tests/e2e/process.h"

namespace weft::e2e {

// Paths fixed at build time (compile definitions from tests/e2e/CMakeLists.txt).
std::string repoRoot();
std::string buildDir();
std::string echoServerPath();
std::string echoClientPath();

// One manifest file: name in the manifests directory, and its YAML text.
struct ManifestFile {
  std::string name;
  std::string yaml;
};

// YAML builders for the kinds the sim knows.
std::string namespaceYaml(const std::string& name, bool ambient);
struct PodSpec {
  std::string ns, name, node;     // node: "node1", "node2"
  std::string ip4, ip6;           // from status.podIPs
  std::string command;            // sim.weft.dev/command (run with sh -c)
  int readyPort = 0;              // sim.weft.dev/ready-port: `sim up` waits for a listener
  std::map<std::string, std::string> labels;
  // spec.containers[0].ports: {name, containerPort} (what a named targetPort resolves to).
  std::vector<std::pair<std::string, int>> containerPorts;
};
std::string podYaml(const PodSpec& pod);

// Prometheus text format: the sum of all samples of `metric` whose labels include `match`.
double sumSamples(const std::string& text, const std::string& metric,
                  const std::map<std::string, std::string>& match);

class SimCluster {
 public:
  explicit SimCluster(std::string name);
  ~SimCluster();  // down() if still up

  // Writes the files to a fresh directory and runs `scripts/sim up`, with `extraArgs` appended
  // (e.g. {"--agent-arg=--cert-ttl", "--agent-arg=4"}).
  bool up(int nodes, const std::vector<ManifestFile>& files, std::string* error,
          const std::vector<std::string>& extraArgs = {});
  void down();
  bool isUp() const { return up_; }
  const std::string& name() const { return name_; }
  // Our copy of the manifests given to `sim up` (removed by down()).
  const std::string& manifestCopyDir() const { return dir_; }

  // `scripts/sim status --json`, refreshed on each call.
  std::optional<nlohmann::json> status(std::string* error = nullptr);

  RunResult exec(const std::string& nsPod, const std::vector<std::string>& cmd,
                 std::chrono::milliseconds timeout = std::chrono::seconds(60));
  RunResult onNode(const std::string& node, const std::vector<std::string>& cmd,
                   std::chrono::milliseconds timeout = std::chrono::seconds(30));
  // argv that runs cmd in a pod (for a Child).
  std::vector<std::string> execArgv(const std::string& nsPod,
                                    const std::vector<std::string>& cmd) const;

  // The live manifests directory the agents watch (from status).
  std::optional<std::string> liveManifestsDir();
  // Writes a file into the live directory atomically (temp file + rename).
  bool writeLiveManifest(const std::string& file, const std::string& yaml, std::string* error);
  bool removeLiveManifest(const std::string& file);

  // Per-node facts from status --json (see the comment in sim_cluster.cc for the shape).
  std::optional<int> agentPid(const std::string& node);
  std::optional<std::vector<std::string>> agentCommand(const std::string& node);
  std::optional<std::string> agentSocket(const std::string& node, const std::string& which);
  std::optional<std::string> nodeCgroup(const std::string& node);
  std::optional<std::string> pinDir(const std::string& node);

  // The ztunnel's Prometheus text from inside the node netns.
  std::optional<std::string> metrics(const std::string& node, std::string* error = nullptr);
  // GET path on the agent's admin socket; the body, or nullopt (error filled in).
  std::optional<std::string> agentAdmin(const std::string& node, const std::string& path,
                                        std::string* error = nullptr);
  // Restarts the agent of `node` after it was killed: `scripts/sim restart-agent` when the sim
  // has it, else the command line recorded in status, inside the node's netns.
  bool restartAgent(const std::string& node, std::string* error);
  // Where the output of an agent that restartAgent() started itself goes.
  std::string restartedAgentLog(const std::string& node) const;

 private:
  std::optional<nlohmann::json> nodeStatus(const std::string& node);
  std::vector<std::string> simArgv(const std::string& verb) const;

  std::string name_;
  std::string dir_;  // our copy of the manifests given to `sim up`
  bool up_ = false;
  std::vector<std::unique_ptr<Child>> restartedAgents_;
};

}  // namespace weft::e2e
