// The shared parts of the end-to-end suites that are not templates: polling, log tails, the
// ztunnel admin API, and the teardown that runs when the run is interrupted.
#include "tests/e2e/sim_suite.h"

#include <signal.h>
#include <sys/wait.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <thread>

namespace weft::e2e {

bool eventually(const std::function<bool()>& pred, std::chrono::milliseconds limit,
                std::chrono::milliseconds step) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  for (;;) {
    if (pred()) return true;
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(step);
  }
}

std::string tailOf(const std::string& path, size_t lines) {
  std::ifstream in(path);
  if (!in) return "    (cannot read " + path + ")\n";
  std::vector<std::string> all;
  for (std::string l; std::getline(in, l);) all.push_back(l);
  std::string out;
  for (size_t i = all.size() > lines ? all.size() - lines : 0; i < all.size(); ++i) {
    out += "    " + all[i] + "\n";
  }
  return out;
}

std::pair<std::string, int> splitHostPort(const std::string& s) {
  size_t colon = s.rfind(':');
  if (colon == std::string::npos) return {s, 0};
  std::string host = s.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[') host = host.substr(1, host.size() - 2);
  return {host, std::atoi(s.c_str() + colon + 1)};
}

std::optional<nlohmann::json> ztunnelAdmin(SimCluster& cluster, const std::string& node,
                                           const std::string& path, const std::string& method) {
  std::vector<std::string> cmd = {"curl", "-sS", "--max-time", "5"};
  if (method != "GET") cmd.insert(cmd.end(), {"-X", method});
  cmd.push_back("http://127.0.0.1:15000" + path);
  auto r = cluster.onNode(node, cmd);
  auto j = nlohmann::json::parse(r.out, nullptr, false);
  if (r.exitCode != 0 || j.is_discarded()) {
    ADD_FAILURE() << node << " ztunnel admin " << method << " " << path << ": " << r.describe();
    return std::nullopt;
  }
  return j;
}

namespace {

// argv vectors built before the signal can come, so the handler only forks and execs.
std::vector<std::string> g_downArgs;
std::vector<std::string> g_cleanArgs;
std::vector<char*> g_downArgv;
std::vector<char*> g_cleanArgv;
std::atomic<pid_t> g_stoppedPid{0};

void pointAt(std::vector<std::string>& args, std::vector<char*>& argv) {
  argv.clear();
  for (auto& a : args) argv.push_back(a.data());
  if (!argv.empty()) argv.push_back(nullptr);
}

void runFromSignal(std::vector<char*>& argv) {
  if (argv.empty()) return;
  pid_t pid = ::fork();
  if (pid == 0) {
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  if (pid > 0) ::waitpid(pid, nullptr, 0);
}

void teardownOnSignal(int sig) {
  pid_t stopped = g_stoppedPid.load();
  if (stopped > 0) ::kill(stopped, SIGCONT);
  runFromSignal(g_downArgv);
  runFromSignal(g_cleanArgv);
  ::signal(sig, SIG_DFL);
  ::raise(sig);
}

}  // namespace

void armSignalTeardown(const std::string& simName, const std::vector<std::string>& paths) {
  // No signal may find the vectors half-built.
  ::signal(SIGTERM, SIG_DFL);
  ::signal(SIGINT, SIG_DFL);
  g_downArgs = {repoRoot() + "/scripts/sim", "down", "--name", simName};
  g_cleanArgs = {"/bin/rm", "-rf", "--"};
  for (const auto& p : paths) {
    if (!p.empty()) g_cleanArgs.push_back(p);
  }
  if (g_cleanArgs.size() == 3) g_cleanArgs.clear();
  pointAt(g_downArgs, g_downArgv);
  pointAt(g_cleanArgs, g_cleanArgv);
  ::signal(SIGTERM, teardownOnSignal);
  ::signal(SIGINT, teardownOnSignal);
}

void disarmSignalTeardown() {
  ::signal(SIGTERM, SIG_DFL);
  ::signal(SIGINT, SIG_DFL);
  g_downArgv.clear();
  g_cleanArgv.clear();
  g_downArgs.clear();
  g_cleanArgs.clear();
}

void setStoppedPidForSignal(pid_t pid) { g_stoppedPid = pid; }

}  // namespace weft::e2e
