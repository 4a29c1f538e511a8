// What every end-to-end suite shares: one sim per suite with its log directory, teardown when
// the run is interrupted, each test's skip-or-assert in SetUp, log tails on failure, polling,
// and the node ztunnels' admin API and metrics.
#pragma once

#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/e2e/sim_cluster.h"

namespace weft::e2e {

// Polls `pred` every `step` until it holds (true) or `limit` has passed (false).
bool eventually(const std::function<bool()>& pred, std::chrono::milliseconds limit,
                std::chrono::milliseconds step = std::chrono::milliseconds(200));

// The last `lines` lines of a file, each indented by four spaces; "(cannot read PATH)" when the
// file cannot be opened.
std::string tailOf(const std::string& path, size_t lines);

// "IP:PORT" or "[IPv6]:PORT" as (IP, PORT); the port is 0 when there is none.
std::pair<std::string, int> splitHostPort(const std::string& s);

// `method` (GET, POST...) `path` on `node`'s ztunnel admin API (127.0.0.1:15000 in the node's
// netns) as JSON; a test failure and nullopt when the request fails or the answer is not JSON.
std::optional<nlohmann::json> ztunnelAdmin(SimCluster& cluster, const std::string& node,
                                           const std::string& path,
                                           const std::string& method = "GET");

// Teardown when the run is interrupted (ctest's timeout sends SIGTERM first): the handler runs
// `scripts/sim down --name NAME` and removes `paths`, so no namespaces, cgroups, BPF links or
// temp files outlive the run. Only async-signal-safe calls happen in the handler.
void armSignalTeardown(const std::string& simName, const std::vector<std::string>& paths);
void disarmSignalTeardown();
// A process the handler continues (SIGCONT) before tearing down: an agent a test stopped.
// 0: none.
void setStoppedPidForSignal(pid_t pid);

// The base of a suite's fixture: `class FooE2E : public SimSuite<FooE2E>` (the parameter gives
// each suite static members of its own, so suites never share a sim). The suite's
// SetUpTestSuite() calls makeLogDir() and bringUp() (and records anything else that failed in
// setupError_); every test then skips without root and fails with setupError_ otherwise. A suite
// may override extraLogs() with logs of its own to print when a test fails.
template <class Suite>
class SimSuite : public ::testing::Test {
 protected:
  // Creates /tmp/weft-e2e-TAG-XXXXXX (mode 0755) as logDir_. False, with setupError_ set, when
  // that fails.
  static bool makeLogDir(const std::string& tag) {
    std::string tmpl = "/tmp/weft-e2e-" + tag + "-XXXXXX";
    if (!::mkdtemp(tmpl.data())) {
      setupError_ = "mkdtemp " + tmpl + " failed";
      return false;
    }
    logDir_ = tmpl;
    ::chmod(logDir_.c_str(), 0755);
    return true;
  }

  // Brings the sim `name` up with teardown armed for an interrupted run. False, with
  // setupError_ set, when it does not come up.
  static bool bringUp(const std::string& name, int nodes, const std::vector<ManifestFile>& files,
                      const std::vector<std::string>& extraArgs = {}) {
    cluster_ = std::make_unique<SimCluster>(name);
    armSignalTeardown(name, {logDir_, cluster_->manifestCopyDir()});
    std::string err;
    bool up = cluster_->up(nodes, files, &err, extraArgs);
    // The manifest copy directory exists only once up() ran.
    armSignalTeardown(name, {logDir_, cluster_->manifestCopyDir()});
    if (!up) setupError_ = err;
    return up;
  }

  static void TearDownTestSuite() {
    if (cluster_) cluster_->down();
    cluster_.reset();
    disarmSignalTeardown();
    if (!logDir_.empty()) {
      std::error_code ec;
      std::filesystem::remove_all(logDir_, ec);
      logDir_.clear();
    }
    setupError_.clear();
  }

  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "the sim needs root (netns, cgroups, BPF)";
    ASSERT_TRUE(setupError_.empty()) << "cluster setup failed: " << setupError_;
    ASSERT_TRUE(cluster_ && cluster_->isUp());
  }

  void TearDown() override {
    if (this->HasFailure() && cluster_ && cluster_->isUp()) dumpLogs();
  }

  // More logs whose tails a failed test prints: (label, path).
  virtual std::vector<std::pair<std::string, std::string>> extraLogs() const { return {}; }

  // The tails of every node's agent and ztunnel log and of extraLogs(), on stderr.
  void dumpLogs(size_t lines = 30) const {
    auto s = cluster_->status();
    std::string out = "--- sim logs (tails) ---\n";
    if (s && s->contains("nodes")) {
      for (auto& n : (*s)["nodes"]) {
        for (const char* what : {"agent", "ztunnel"}) {
          if (!n.contains(what) || !n[what].is_object() || !n[what].contains("log") ||
              !n[what]["log"].is_string()) {
            continue;
          }
          std::string log = n[what]["log"].template get<std::string>();
          out += n.value("name", "?") + " " + what + " " + log + ":\n" + tailOf(log, lines);
        }
      }
    }
    for (auto& [label, path] : extraLogs()) {
      out += label + " " + path + ":\n" + tailOf(path, lines);
    }
    std::fprintf(stderr, "%s", out.c_str());
  }

  static std::optional<nlohmann::json> ztunnelAdmin(const std::string& node,
                                                    const std::string& path,
                                                    const std::string& method = "GET") {
    return e2e::ztunnelAdmin(*cluster_, node, path, method);
  }

  // The sum of `name`'s samples matching `labels` on `node`'s ztunnel; -1 (and a test failure)
  // when the scrape fails.
  static double metric(const std::string& node, const std::string& name,
                       const std::map<std::string, std::string>& labels = {}) {
    std::string err;
    auto m = cluster_->metrics(node, &err);
    if (!m) {
      ADD_FAILURE() << node << " metrics: " << err;
      return -1;
    }
    return sumSamples(*m, name, labels);
  }

  static inline std::unique_ptr<SimCluster> cluster_;
  static inline std::string logDir_;
  static inline std::string setupError_;
};

}  // namespace weft::e2e
