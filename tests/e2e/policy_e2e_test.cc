// End-to-end AuthorizationPolicy matrix on a 2-node sim: a policy set using every L4 field,
// selector / namespace-wide / mesh-wide scope, AUDIT, dry-run and an L7 DENY; each (source pod,
// destination, port) row checked over HBONE (meshed sources) and plaintext inbound (sources
// outside the mesh) for its outcome and for the deciding policy and rule in the destination
// ztunnel's /verdicts; and a policy edit that changes the next connection within a second.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <thread>

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/e2e/policy_matrix.h"
#include "tests/e2e/sim_cluster.h"
#include "tests/e2e/sim_suite.h"

namespace weft::e2e {
namespace {

using namespace std::chrono_literals;
using Json = nlohmann::json;

class PolicyE2E : public SimSuite<PolicyE2E> {
 protected:
  static void SetUpTestSuite() {
    setupError_.clear();
    if (::geteuid() != 0) return;
    bringUp(fmt::format("pol{}", ::getpid()), 2, manifests());
  }

  static std::vector<ManifestFile> manifests() { return policyMatrixManifests(); }

  // One connection from `pod` to ip:port through weft-echo-client: true if it echoed.
  static bool connects(const std::string& pod, const std::string& ip, int port) {
    auto r = cluster_->exec(pod, {echoClientPath(), "--target", fmt::format("{}:{}", ip, port),
                                  "--count", "1", "--max-bytes", "512", "--timeout-s", "5"},
                            20s);
    auto j = Json::parse(r.out, nullptr, false);
    return r.exitCode == 0 && j.is_object() && j.value("ok", 0) == 1;
  }

  // node2's ztunnel verdicts after `since`.
  static Json verdictsSince(uint64_t since) {
    auto r = cluster_->onNode("node2", {"curl", "-sS", "--max-time", "5",
                                        fmt::format("http://127.0.0.1:15000/verdicts?since={}",
                                                    since)});
    auto j = Json::parse(r.out, nullptr, false);
    if (r.exitCode != 0 || j.is_discarded()) {
      ADD_FAILURE() << "node2 /verdicts: " << r.describe();
      return Json{{"last_seq", since}, {"verdicts", Json::array()}};
    }
    return j;
  }
  static uint64_t lastSeq() { return verdictsSince(~0ull >> 1).value("last_seq", 0ull); }
};

std::string describe(const Row& r) {
  return fmt::format("{} -> app/{}:{}", r.source, r.dest, r.port);
}

// Every row of the table, over HBONE (meshed callers) and plaintext inbound (the others): the
// outcome, and the deciding policy and rule in the destination ztunnel's verdict event.
TEST_F(PolicyE2E, MatrixOverHboneAndPlaintext) {
  // The policies reached node2's ztunnel before the first row (the sim waits for the pods,
  // not for the agent's first update), and the agent reports the L7 rule.
  ASSERT_TRUE(eventually(
      [] {
        auto r = cluster_->onNode("node2", {"curl", "-sS", "--max-time", "5",
                                            "http://127.0.0.1:15000/config_dump"});
        auto j = Json::parse(r.out, nullptr, false);
        return !j.is_discarded() && j.contains("authorization_policies") &&
               j["authorization_policies"].size() == 7;
      },
      20s))
      << "node2's ztunnel never held the 7 policies";
  std::string err;
  auto aps = cluster_->agentAdmin("node2", "/authorization-policies", &err);
  ASSERT_TRUE(aps) << err;
  auto apj = Json::parse(*aps, nullptr, false);
  bool warned = false;
  for (auto& p : apj)
    if (p.value("name", "") == "web-l7")
      warned = p["status"]["warnings"].size() == 1 &&
               p["status"]["warnings"][0].get<std::string>().find("operation.methods") !=
                   std::string::npos;
  EXPECT_TRUE(warned) << "the agent must say why web-l7 is enforced without its L7 part: "
                      << *aps;

  std::string table = "source          destination       path       result  policy/rule\n";
  for (const Row& row : kTable) {
    uint64_t before = lastSeq();
    bool ok = connects(row.source, std::string(row.dest) == "server" ? kServerIp : kWebIp,
                       row.port);
    EXPECT_EQ(ok, row.allowed) << describe(row);
    Json events = verdictsSince(before)["verdicts"];
    ASSERT_EQ(events.size(), 1u) << describe(row) << ": want exactly one verdict event, got "
                                 << events.dump();
    const Json& e = events[0];
    EXPECT_EQ(e["path"], row.path) << describe(row);
    EXPECT_EQ(e["result"], row.allowed ? "allow" : "deny") << describe(row);
    EXPECT_EQ(e["destination"]["workload"], std::string("app/") + row.dest) << describe(row);
    EXPECT_EQ(e["destination"]["port"], row.port) << describe(row);
    if (row.policy[0] != '\0') {
      EXPECT_EQ(e["policy"], row.policy) << describe(row) << " " << e.dump();
      EXPECT_EQ(e["rule"], row.rule) << describe(row) << " " << e.dump();
    } else {
      EXPECT_TRUE(e["policy"].is_null()) << describe(row) << " " << e.dump();
    }
    bool meshed = std::string(row.path) == "hbone";
    EXPECT_EQ(e["source"]["principal"].is_null(), !meshed) << describe(row);
    if (meshed) {
      std::string ns = std::string(row.source).substr(0, std::string(row.source).find('/'));
      EXPECT_EQ(e["source"]["principal"], "spiffe://cluster.local/ns/" + ns + "/sa/default");
      EXPECT_EQ(e["source"]["namespace"], ns);
    }
    // AUDIT marks 8080 on app/server only; the dry-run DENY on app/web shows front only.
    bool audited = std::string(row.dest) == "server" && row.port == 8080;
    EXPECT_EQ(e["audit"].size(), audited ? 1u : 0u) << describe(row) << " " << e.dump();
    if (std::string(row.dest) == "web") {
      ASSERT_FALSE(e["dry_run"].is_null()) << describe(row) << " " << e.dump();
      if (std::string(row.source) == kFront) {
        EXPECT_EQ(e["dry_run"]["result"], "deny") << e.dump();
        EXPECT_EQ(e["dry_run"]["policy"], "app/web-dry") << e.dump();
      }
    } else {
      EXPECT_TRUE(e["dry_run"].is_null()) << describe(row) << " " << e.dump();
    }
    table += fmt::format("{:<15} {:<17} {:<10} {:<7} {}\n", row.source,
                         fmt::format("app/{}:{}", row.dest, row.port), row.path,
                         ok ? "allow" : "deny",
                         row.policy[0] ? fmt::format("{}/{}", row.policy, row.rule) : "-");
  }
  std::printf("%s", table.c_str());

  auto m = cluster_->metrics("node2", &err);
  ASSERT_TRUE(m) << err;
  EXPECT_GE(sumSamples(*m, "weft_ztunnel_policy_verdicts_total", {{"result", "deny"}}), 6);
  EXPECT_GE(sumSamples(*m, "weft_ztunnel_policy_audit_total", {}), 3);
  EXPECT_GE(sumSamples(*m, "weft_ztunnel_policy_dry_run_verdicts_total", {{"result", "deny"}}),
            1);
}

// Turning the dry-run DENY into an enforced one changes the next connection within a second
// (inotify → agent → ClusterUpdate delta → ztunnel); turning it back restores it.
TEST_F(PolicyE2E, PolicyEditAppliesWithinASecond) {
  std::string err;
  ASSERT_TRUE(connects(kFront, kWebIp, 8080)) << "dry-run must not deny";
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(cluster_->writeLiveManifest("policies.yaml", policiesYaml(false), &err)) << err;
  std::this_thread::sleep_for(1s);
  uint64_t before = lastSeq();
  EXPECT_FALSE(connects(kFront, kWebIp, 8080))
      << "the connection made 1 s after the edit must be denied by the enforced policy";
  Json events = verdictsSince(before)["verdicts"];
  ASSERT_EQ(events.size(), 1u) << events.dump();
  EXPECT_EQ(events[0]["policy"], "app/web-dry");
  EXPECT_TRUE(events[0]["dry_run"].is_null()) << "nothing is dry-run any more";
  // Back to dry-run: measure how soon connections are allowed again.
  auto t1 = std::chrono::steady_clock::now();
  ASSERT_TRUE(cluster_->writeLiveManifest("policies.yaml", policiesYaml(true), &err)) << err;
  std::chrono::milliseconds took{0};
  ASSERT_TRUE(eventually(
      [&] {
        auto start = std::chrono::steady_clock::now();
        if (!connects(kFront, kWebIp, 8080)) return false;
        took = std::chrono::duration_cast<std::chrono::milliseconds>(start - t1);
        return true;
      },
      5s, 50ms));
  EXPECT_LT(took.count(), 1000) << "the first allowed connection started " << took.count()
                                << " ms after the edit";
  std::printf("policy edit: dry-run -> enforced: denied on the connection 1000 ms after the "
              "edit (%lld ms between the two edits); enforced -> dry-run: the first allowed "
              "connection started %lld ms after the edit\n",
              static_cast<long long>(
                  std::chrono::duration_cast<std::chrono::milliseconds>(t1 - t0).count()),
              static_cast<long long>(took.count()));
}

}  // namespace
}  // namespace weft::e2e
