// The agent's admin API additions: run-time log level (GET/POST /logging), /status with kernel
// features, enrolled pods and certificate health; and (as root) the kernel feature probes.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "agent/admin.h"
#include "agent/bpf/kernel_features.h"
#include "bpf/abi/maps.h"
#include "common/log.h"
#include "test_util.h"

namespace weft::agent {
namespace {

using json = nlohmann::json;
using testing::TempDir;

class AgentAdminTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(uv_loop_init(&loop_), 0);
    std::filesystem::create_directory(dir_.file("manifests"));
    std::ofstream(dir_.file("manifests") + "/ns.yaml") << "kind: Namespace\nmetadata: {name: a}\n";
    ASSERT_TRUE(source_.rescan());
    DataplaneOptions o;
    o.testing = true;
    auto dp = Dataplane::open(o);
    ASSERT_TRUE(dp) << dp.status().message();
    dataplane_ = std::move(dp.value());
    EnrollmentOptions eo;
    eo.node_name = "node1";
    eo.open_netns = testing::fakeNetnsOpener;
    controller_ = std::make_unique<EnrollmentController>(&loop_, eo, dataplane_.get(), &store_);
    ASSERT_TRUE(controller_->start(source_.model()));
    sources_.node_name = "node1";
    sources_.enrollment = controller_.get();
    sources_.manifests = &source_;
  }
  void TearDown() override {
    controller_.reset();
    for (int i = 0; i < 10; i++) uv_run(&loop_, UV_RUN_NOWAIT);
    EXPECT_EQ(uv_loop_close(&loop_), 0);
    setLogLevel("info");
  }
  HttpResponse call(const std::string& method, const std::string& path,
                    const std::string& query = "") {
    HttpRequest req;
    req.method = method;
    req.path = path;
    req.query = query;
    return handleAdminRequest(sources_, req);
  }

  TempDir dir_;
  uv_loop_t loop_;
  ManifestSource source_{dir_.file("manifests")};
  DataplanePtr dataplane_;
  PodStore store_{dir_.file("state")};
  std::unique_ptr<EnrollmentController> controller_;
  AdminSources sources_;
};

TEST_F(AgentAdminTest, LogLevelGetAndSetAtRunTime) {
  setLogLevel("info");
  HttpResponse r = call("GET", "/logging");
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(json::parse(r.body)["level"], "info");
  r = call("POST", "/logging", "level=debug");
  EXPECT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(spdlog::get_level(), spdlog::level::debug);
  EXPECT_EQ(json::parse(call("GET", "/logging").body)["level"], "debug");
  EXPECT_EQ(json::parse(call("GET", "/status").body)["log_level"], "debug");
  r = call("POST", "/logging", "level=loud");
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(spdlog::get_level(), spdlog::level::debug) << "a bad level changes nothing";
  EXPECT_EQ(call("POST", "/logging").status, 400);
  EXPECT_EQ(call("DELETE", "/logging").status, 405);
  EXPECT_EQ(call("POST", "/status").status, 405) << "everything else stays read-only";
}

TEST_F(AgentAdminTest, StatusHasKernelFeaturesEnrolledPodsAndCertificateHealth) {
  json s = json::parse(call("GET", "/status").body);
  EXPECT_TRUE(s["kernel"].is_null());
  EXPECT_TRUE(s["certificates"].is_null());
  EXPECT_EQ(s["enrolled_pods"], 0);
  EXPECT_FALSE(s["version"].get<std::string>().empty());

  KernelFeatures k;
  k.kernel_release = "6.18.0-test";
  k.features = {{"prog:sk_lookup", "inbound steering", true, ""},
                {"map:ringbuf", "events", false, "not supported by this kernel"}};
  sources_.kernel_features = &k;
  CaStats ca;
  ca.source = "/var/lib/weft/ca";
  ca.ca_not_after = "2036-01-01T00:00:00Z";
  ca.issued = 3;
  sources_.ca_stats = [&] { return ca; };
  s = json::parse(call("GET", "/status").body);
  EXPECT_EQ(s["kernel"]["release"], "6.18.0-test");
  ASSERT_EQ(s["kernel"]["features"].size(), 2u);
  EXPECT_EQ(s["kernel"]["features"][1]["name"], "map:ringbuf");
  EXPECT_EQ(s["kernel"]["features"][1]["available"], false);
  EXPECT_EQ(s["kernel"]["features"][1]["detail"], "not supported by this kernel");
  EXPECT_EQ(s["kernel"]["missing"], json::array({"map:ringbuf"}));
  EXPECT_EQ(s["certificates"]["health"], "ok");
  EXPECT_EQ(s["certificates"]["issued"], 3);
  EXPECT_EQ(s["certificates"]["ca_not_after"], "2036-01-01T00:00:00Z");
  ca.last_reload_error = "ca-cert.pem: not a certificate";
  s = json::parse(call("GET", "/status").body);
  EXPECT_EQ(s["certificates"]["health"], "ca_reload_failing");
}

TEST_F(AgentAdminTest, StatusShowsLocalHopSwitchAndCounters) {
  EXPECT_FALSE(json::parse(call("GET", "/status").body).contains("local_hop"));
  Dataplane* dp = dataplane_.get();
  sources_.local_hop = [dp] { return dp->localHop(); };
  json s = json::parse(call("GET", "/status").body);
  EXPECT_EQ(s["local_hop"]["enabled"], false);
  EXPECT_EQ(s["local_hop"]["counters"]["redirected_bytes"], 0);
  EXPECT_EQ(s["local_hop"]["counters"].size(), std::size(kWeftHopStatNames));
  ASSERT_TRUE(dp->setLocalHopAccel(true).isOk());
  EXPECT_EQ(json::parse(call("GET", "/status").body)["local_hop"]["enabled"], true);
  sources_.local_hop = [] { return Result<LocalHopStatus>(Status::error("map gone")); };
  EXPECT_EQ(json::parse(call("GET", "/status").body)["local_hop"]["error"], "map gone");
}

// On the machine's own kernel (root: the probes load programs): everything Weft needs is there
// and the paths are checked for what they must be.
TEST(KernelFeatures, ProbesThisKernel) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root: libbpf's probes load programs and maps";
  std::string cg;
  std::ifstream mounts("/proc/mounts");
  for (std::string dev, mnt, type, rest;
       mounts >> dev >> mnt >> type && std::getline(mounts, rest);) {
    if (type == "cgroup2") cg = mnt;
  }
  ASSERT_FALSE(cg.empty()) << "no cgroup2 mount";
  KernelFeatures k = probeKernelFeatures(cg, "/tmp");
  EXPECT_FALSE(k.kernel_release.empty());
  for (const KernelFeature& f : k.features) {
    if (f.name == "bpffs") {
      EXPECT_FALSE(f.available) << "/tmp is no bpffs";
      EXPECT_NE(f.detail.find("/tmp is not on a bpffs"), std::string::npos) << f.detail;
    } else {
      EXPECT_TRUE(f.available) << f.name << ": " << f.detail;
    }
  }
  EXPECT_EQ(k.missing(), std::vector<std::string>{"bpffs"});
  KernelFeatures bad = probeKernelFeatures("/tmp", "");
  for (const KernelFeature& f : bad.features) {
    if (f.name == "cgroup2")
      EXPECT_NE(f.detail.find("is not a cgroup v2 mount"), std::string::npos) << f.detail;
    if (f.name == "bpffs") EXPECT_EQ(f.detail, "no path configured");
  }
}

}  // namespace
}  // namespace weft::agent
