// PeerAuthentication: manifest parsing and its errors, resolution (namespace over mesh-wide over
// PERMISSIVE), the admin view, and a live policy change reaching a ztunnel on the node protocol.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <thread>

#include "agent/admin.h"
#include "agent/cluster_sync.h"
#include "agent/manifests.h"
#include "test_util.h"

namespace weft::agent {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;
using testing::FakeZtunnel;
using testing::TempDir;

std::string pa(const std::string& ns, const std::string& name, const std::string& mode) {
  std::string out = "apiVersion: security.weft.dev/v1\nkind: PeerAuthentication\nmetadata:\n"
                    "  name: " + name + "\n  namespace: " + ns + "\n";
  if (!mode.empty()) out += "spec:\n  mtls:\n    mode: " + mode + "\n";
  return out;
}

TEST(PeerAuthenticationParse, ModesAndDefaults) {
  auto r = parseManifest("pa.yaml", pa("shop", "strict", "STRICT") + "---\n" +
                                        pa("weft-system", "mesh", "PERMISSIVE") + "---\n" +
                                        pa("legacy", "inherit", "UNSET") + "---\n" +
                                        // No apiVersion and no spec: accepted, UNSET.
                                        "kind: PeerAuthentication\n"
                                        "metadata: {name: bare, namespace: other}\n---\n"
                                        "kind: PeerAuthentication\n"
                                        "metadata: {name: empty-mtls, namespace: fourth}\n"
                                        "spec: {mtls: {}}\n");
  ASSERT_TRUE(r) << r.status().message();
  ASSERT_EQ(r->peer_authentications.size(), 5u);
  EXPECT_EQ(r->peer_authentications[0].meta.namespace_, "shop");
  EXPECT_EQ(r->peer_authentications[0].meta.name, "strict");
  EXPECT_EQ(r->peer_authentications[0].mode, MtlsMode::kStrict);
  EXPECT_EQ(r->peer_authentications[1].mode, MtlsMode::kPermissive);
  EXPECT_EQ(r->peer_authentications[2].mode, MtlsMode::kUnset);
  EXPECT_EQ(r->peer_authentications[3].mode, MtlsMode::kUnset);
  EXPECT_EQ(r->peer_authentications[4].mode, MtlsMode::kUnset);
  EXPECT_EQ(r->peer_authentications[0].meta.uid,
            deriveUid("PeerAuthentication", "shop", "strict"));
}

struct PeerAuthBadCase {
  const char* name;
  std::string text;
  std::string expected;  // the whole message after "bad.yaml: "
};

class PeerAuthenticationValidation : public ::testing::TestWithParam<PeerAuthBadCase> {};

TEST_P(PeerAuthenticationValidation, RejectsWithFileObjectField) {
  auto r = parseManifest("bad.yaml", GetParam().text);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.status().message(), "bad.yaml: " + GetParam().expected);
}

const std::string kHead = "kind: PeerAuthentication\nmetadata: {name: p, namespace: ns}\n";
const std::string kNoSelectors =
    "not supported: a PeerAuthentication applies to its whole namespace (mesh-wide in "
    "weft-system); workload selectors are not implemented";

INSTANTIATE_TEST_SUITE_P(
    AllFields, PeerAuthenticationValidation,
    ::testing::Values(
        PeerAuthBadCase{"UnknownMode", pa("ns", "p", "LAX"),
                "PeerAuthentication ns/p: spec.mtls.mode: \"LAX\" is not a mode: PERMISSIVE, "
                "STRICT or UNSET"},
        PeerAuthBadCase{"LowercaseMode", pa("ns", "p", "strict"),
                "PeerAuthentication ns/p: spec.mtls.mode: \"strict\" is not a mode: PERMISSIVE, "
                "STRICT or UNSET"},
        PeerAuthBadCase{"Disable", pa("ns", "p", "DISABLE"),
                "PeerAuthentication ns/p: spec.mtls.mode: DISABLE is not supported (mesh pods "
                "always accept mTLS); use PERMISSIVE"},
        PeerAuthBadCase{"ModeNotString", kHead + "spec: {mtls: {mode: [STRICT]}}\n",
                "PeerAuthentication ns/p: spec.mtls.mode: must be a string: PERMISSIVE, STRICT "
                "or UNSET"},
        PeerAuthBadCase{"SpecSelector",
                kHead + "spec:\n  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}\n",
                "PeerAuthentication ns/p: spec.selector: " + kNoSelectors},
        PeerAuthBadCase{"TopLevelSelector", kHead + "selector: {matchLabels: {app: web}}\n",
                "PeerAuthentication ns/p: selector: " + kNoSelectors},
        PeerAuthBadCase{"PortLevelMtls",
                kHead + "spec:\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    8080: "
                        "{mode: PERMISSIVE}\n",
                "PeerAuthentication ns/p: spec.portLevelMtls: not supported: the mode applies to "
                "every port of the namespace's pods"},
        PeerAuthBadCase{"UnknownSpecField", kHead + "spec: {mtl: {mode: STRICT}}\n",
                "PeerAuthentication ns/p: spec.mtl: unknown field (known: mtls)"},
        PeerAuthBadCase{"UnknownMtlsField", kHead + "spec: {mtls: {mode: STRICT, strict: true}}\n",
                "PeerAuthentication ns/p: spec.mtls.strict: unknown field (known: mode)"},
        PeerAuthBadCase{"MtlsNotMapping", kHead + "spec: {mtls: STRICT}\n",
                "PeerAuthentication ns/p: spec.mtls: must be a mapping with mode"},
        PeerAuthBadCase{"SpecNotMapping", kHead + "spec: [mtls]\n",
                "PeerAuthentication ns/p: spec: must be a mapping"},
        PeerAuthBadCase{"NoNamespace",
                "kind: PeerAuthentication\nmetadata: {name: p}\nspec: {mtls: {mode: STRICT}}\n",
                "PeerAuthentication p: metadata.namespace: required (the namespace it applies "
                "to; weft-system = mesh-wide)"},
        PeerAuthBadCase{"IstioApiVersion",
                "apiVersion: security.istio.io/v1\n" + kHead,
                "PeerAuthentication ns/p: apiVersion: must be security.weft.dev/v1"},
        PeerAuthBadCase{"TwoForOneNamespace",
                pa("shop", "a", "STRICT") + "---\n" + pa("shop", "b", "PERMISSIVE"),
                "PeerAuthentication shop/b: metadata.namespace: namespace shop already has "
                "PeerAuthentication shop/a in this file; only one per namespace"},
        PeerAuthBadCase{"TwiceInFile", pa("shop", "a", "STRICT") + "---\n" + pa("shop", "a", "STRICT"),
                "PeerAuthentication shop/a: metadata.name: defined twice in this file"}),
    [](const ::testing::TestParamInfo<PeerAuthBadCase>& info) { return info.param.name; });

TEST(PeerAuthenticationSource, SecondForANamespaceAcrossFilesNamesBoth) {
  TempDir dir;
  dir.write("a.yaml", pa("shop", "a", "STRICT"));
  dir.write("b.yaml", pa("shop", "b", "PERMISSIVE") + "---\n" + pa("other", "c", "STRICT"));
  ManifestSource src(dir.path());
  EXPECT_TRUE(src.rescan());
  ASSERT_EQ(src.errors().size(), 1u);
  EXPECT_EQ(src.errors()[0], dir.file("b.yaml") +
                                 ": PeerAuthentication shop/b: metadata.namespace: namespace shop "
                                 "already has PeerAuthentication shop/a in " +
                                 dir.file("a.yaml") + "; only one per namespace");
  // All or nothing: b.yaml's other object is not applied either.
  ASSERT_EQ(src.model().peer_authentications.size(), 1u);
  EXPECT_EQ(src.model().peer_authentications.at("shop").meta.name, "a");

  // Once a.yaml is gone, b.yaml (unchanged) is retried and applies whole.
  std::filesystem::remove(dir.file("a.yaml"));
  EXPECT_TRUE(src.rescan());
  EXPECT_TRUE(src.errors().empty());
  ASSERT_EQ(src.model().peer_authentications.size(), 2u);
  EXPECT_EQ(src.model().peer_authentications.at("shop").meta.name, "b");
  EXPECT_EQ(src.model().peer_authentications.at("shop").mode, MtlsMode::kPermissive);
}

TEST(PeerAuthenticationSource, SameObjectInTwoFiles) {
  TempDir dir;
  dir.write("a.yaml", pa("shop", "a", "STRICT"));
  dir.write("b.yaml", pa("shop", "a", "STRICT"));
  ManifestSource src(dir.path());
  src.rescan();
  ASSERT_EQ(src.errors().size(), 1u);
  EXPECT_EQ(src.errors()[0], dir.file("b.yaml") + ": PeerAuthentication shop/a: also defined in " +
                                 dir.file("a.yaml"));
}

TEST(PeerAuthenticationSource, BadModeKeepsLastGood) {
  TempDir dir;
  dir.write("pa.yaml", pa("shop", "a", "STRICT"));
  ManifestSource src(dir.path());
  ASSERT_TRUE(src.rescan());
  std::this_thread::sleep_for(std::chrono::milliseconds(10));
  dir.write("pa.yaml", pa("shop", "a", "Strict"));
  EXPECT_FALSE(src.rescan());
  ASSERT_EQ(src.errors().size(), 1u);
  EXPECT_THAT(src.errors()[0], HasSubstr("pa.yaml: PeerAuthentication shop/a: spec.mtls.mode: "));
  EXPECT_EQ(src.model().peer_authentications.at("shop").mode, MtlsMode::kStrict);
}

// --- Resolution -------------------------------------------------------------------------------

PeerAuthentication policy(const std::string& ns, const std::string& name, MtlsMode mode) {
  PeerAuthentication p;
  p.meta.namespace_ = ns;
  p.meta.name = name;
  p.mode = mode;
  return p;
}

Pod pod(const std::string& ns, const std::string& name, const std::string& ip) {
  Pod p;
  p.meta.namespace_ = ns;
  p.meta.name = name;
  p.meta.uid = deriveUid("Pod", ns, name);
  p.node_name = "node1";
  p.ips.push_back(*IpAddr::parse(ip));
  return p;
}

TEST(EffectiveMtls, DefaultIsPermissiveWithoutPolicy) {
  ClusterModel m;
  EffectiveMtls e = effectiveMtls(m, "shop");
  EXPECT_EQ(e.mode, MtlsMode::kPermissive);
  EXPECT_EQ(e.policy, nullptr);
  m.peer_authentications["weft-system"] = policy("weft-system", "mesh", MtlsMode::kUnset);
  e = effectiveMtls(m, "shop");  // an UNSET mesh-wide policy leaves the default
  EXPECT_EQ(e.mode, MtlsMode::kPermissive);
  EXPECT_EQ(e.policy, nullptr);
}

TEST(EffectiveMtls, MeshWideAppliesEverywhere) {
  ClusterModel m;
  m.peer_authentications["weft-system"] = policy("weft-system", "mesh", MtlsMode::kStrict);
  for (const char* ns : {"shop", "legacy", "weft-system"}) {
    EffectiveMtls e = effectiveMtls(m, ns);
    EXPECT_EQ(e.mode, MtlsMode::kStrict) << ns;
    ASSERT_NE(e.policy, nullptr);
    EXPECT_EQ(e.policy->meta.name, "mesh");
  }
}

TEST(EffectiveMtls, NamespacePolicyWinsOverMeshWide) {
  ClusterModel m;
  m.peer_authentications["weft-system"] = policy("weft-system", "mesh", MtlsMode::kStrict);
  m.peer_authentications["legacy"] = policy("legacy", "lax", MtlsMode::kPermissive);
  m.peer_authentications["inherit"] = policy("inherit", "unset", MtlsMode::kUnset);
  EXPECT_EQ(effectiveMtls(m, "legacy").mode, MtlsMode::kPermissive);
  EXPECT_EQ(effectiveMtls(m, "legacy").policy->meta.name, "lax");
  EXPECT_EQ(effectiveMtls(m, "shop").mode, MtlsMode::kStrict);
  // UNSET inherits the mesh-wide mode.
  EXPECT_EQ(effectiveMtls(m, "inherit").mode, MtlsMode::kStrict);
  EXPECT_EQ(effectiveMtls(m, "inherit").policy->meta.name, "mesh");

  // And the other way round: a STRICT namespace under a PERMISSIVE mesh.
  m.peer_authentications["weft-system"].mode = MtlsMode::kPermissive;
  m.peer_authentications["shop"] = policy("shop", "tight", MtlsMode::kStrict);
  EXPECT_EQ(effectiveMtls(m, "shop").mode, MtlsMode::kStrict);
  EXPECT_EQ(effectiveMtls(m, "other").mode, MtlsMode::kPermissive);
  EXPECT_EQ(effectiveMtls(m, "other").policy->meta.name, "mesh");
}

TEST(EffectiveMtls, WorkloadProtoAndDeltaCarryIt) {
  ClusterModel before;
  before.pods["shop/web"] = pod("shop", "web", "10.244.1.10");
  before.pods["legacy/old"] = pod("legacy", "old", "10.244.1.11");
  EXPECT_FALSE(workloadProto(before, before.pods["shop/web"]).strict_mtls());

  ClusterModel after = before;
  after.peer_authentications["shop"] = policy("shop", "tight", MtlsMode::kStrict);
  EXPECT_TRUE(workloadProto(after, after.pods["shop/web"]).strict_mtls());
  EXPECT_FALSE(workloadProto(after, after.pods["legacy/old"]).strict_mtls());
  // Only the pod whose mode changed is upserted.
  nodepb::ClusterUpdate d = clusterDelta(before, after);
  ASSERT_EQ(d.upsert_workloads_size(), 1);
  EXPECT_EQ(d.upsert_workloads(0).name(), "web");
  EXPECT_TRUE(d.upsert_workloads(0).strict_mtls());
  EXPECT_EQ(d.remove_workloads_size(), 0);
  // A policy whose mode resolves to what was in force already changes nothing on the wire.
  ClusterModel same = before;
  same.peer_authentications["shop"] = policy("shop", "lax", MtlsMode::kPermissive);
  EXPECT_TRUE(isEmptyUpdate(clusterDelta(before, same)));
  EXPECT_TRUE(fullClusterUpdate(after).upsert_workloads(1).strict_mtls());  // key order
}

// --- The agent with manifests, a controller and a fake ztunnel ---------------------------------

constexpr const char* kCluster = R"(kind: Namespace
metadata:
  name: shop
  labels: {weft.dev/dataplane-mode: ambient}
---
kind: Pod
metadata: {name: web, namespace: shop}
spec: {nodeName: node1}
status: {podIPs: [{ip: 10.244.1.10}]}
---
kind: Pod
metadata: {name: db, namespace: shop}
spec: {nodeName: node2}
status: {podIPs: [{ip: 10.244.2.10}]}
)";

class LivePolicyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(uv_loop_init(&loop_), 0);
    dir_.write("netns-web", "");
    std::filesystem::create_directory(dir_.file("manifests"));
    writeManifest("cluster.yaml", kCluster);
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
    auto s = NodeServer::listen(&loop_, dir_.file("z.sock"), controller_.get());
    ASSERT_TRUE(s) << s.status().message();
    server_ = std::move(s.value());
    controller_->setNodeServer(server_.get());
  }
  void TearDown() override {
    server_.reset();
    controller_.reset();
    for (int i = 0; i < 10; i++) uv_run(&loop_, UV_RUN_NOWAIT);
    EXPECT_EQ(uv_loop_close(&loop_), 0);
  }
  void writeManifest(const std::string& name, const std::string& text) {
    // The source notices a rewrite by mtime/size/inode; a same-size rewrite within one
    // coarse kernel timestamp tick would look unchanged.
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    dir_.write("manifests/" + name, text);
  }
  // What main.cc does on a manifest change.
  void reload() {
    ASSERT_TRUE(source_.rescan());
    ASSERT_TRUE(source_.errors().empty()) << source_.errors()[0];
    controller_->setModel(source_.model());
  }
  // Connects, acks everything through SnapshotSent, returns what came.
  std::vector<nodepb::AgentMessage> connect(FakeZtunnel& z) {
    std::vector<nodepb::AgentMessage> out;
    EXPECT_TRUE(z.connect(dir_.file("z.sock")));
    EXPECT_TRUE(z.hello());
    for (int i = 0; i < 20; i++) {
      nodepb::AgentMessage m = z.recvAndAck(&loop_);
      if (m.payload_case() == 0) break;
      out.push_back(m);
      if (m.has_snapshot_sent()) break;
    }
    return out;
  }
  // The strict_mtls of `name` in a cluster update; fails the test if it is not there.
  static bool strictIn(const nodepb::ClusterUpdate& u, const std::string& name) {
    for (const auto& w : u.upsert_workloads())
      if (w.name() == name) return w.strict_mtls();
    ADD_FAILURE() << name << " not in the update: " << u.ShortDebugString();
    return false;
  }
  // Sends a CNI ADD for shop/web, acks its AddWorkload, returns the workload sent.
  nodepb::Workload enrollWeb(FakeZtunnel& z) {
    CniRequest r;
    r.command = "ADD";
    r.pod_namespace = "shop";
    r.pod_name = "web";
    r.netns = dir_.file("netns-web");
    r.container_id = "c-web";
    std::optional<CniResponse> reply;
    controller_->handleCni(r, [&](const CniResponse& resp) { reply = resp; });
    nodepb::AgentMessage m = z.recvAndAck(&loop_);
    EXPECT_TRUE(m.has_add_workload()) << m.ShortDebugString();
    EXPECT_TRUE(testing::runUntil(&loop_, [&] { return reply.has_value(); }));
    EXPECT_TRUE(reply && reply->ok);
    return m.add_workload().workload();
  }
  // The next message, which must be a (delta) ClusterUpdate.
  nodepb::ClusterUpdate nextUpdate(FakeZtunnel& z) {
    nodepb::AgentMessage m = z.recvAndAck(&loop_);
    EXPECT_TRUE(m.has_cluster_update()) << m.ShortDebugString();
    EXPECT_FALSE(m.cluster_update().full());
    return m.cluster_update();
  }
  // Nothing else queued for the ztunnel (no AddWorkload re-sent, no stray update).
  void expectQuiet(FakeZtunnel& z) {
    nodepb::AgentMessage m;
    std::vector<UniqueFd> fds;
    EXPECT_FALSE(z.recv(&loop_, &m, &fds, 200)) << m.ShortDebugString();
  }
  json adminGet(const std::string& path) {
    AdminSources s;
    s.node_name = "node1";
    s.enrollment = controller_.get();
    s.manifests = &source_;
    HttpRequest req;
    req.method = "GET";
    req.path = path;
    HttpResponse r = handleAdminRequest(s, req);
    EXPECT_EQ(r.status, 200) << r.body;
    return json::parse(r.body);
  }

  TempDir dir_;
  uv_loop_t loop_;
  ManifestSource source_{dir_.file("manifests")};
  DataplanePtr dataplane_;
  PodStore store_{dir_.file("state")};
  std::unique_ptr<EnrollmentController> controller_;
  NodeServerPtr server_;
};

TEST_F(LivePolicyTest, ModeChangesReachTheZtunnelAsUpserts) {
  FakeZtunnel z;
  auto snapshot = connect(z);
  ASSERT_GE(snapshot.size(), 3u);
  ASSERT_TRUE(snapshot[1].has_cluster_update());
  EXPECT_FALSE(strictIn(snapshot[1].cluster_update(), "web"));
  EXPECT_FALSE(enrollWeb(z).strict_mtls());

  // The namespace goes STRICT: one delta upserting both shop pods (all nodes), nothing else.
  writeManifest("shop-pa.yaml", pa("shop", "tight", "STRICT"));
  reload();
  nodepb::ClusterUpdate u = nextUpdate(z);
  EXPECT_TRUE(strictIn(u, "web"));
  EXPECT_TRUE(strictIn(u, "db"));
  expectQuiet(z);

  // Mesh-wide STRICT, namespace PERMISSIVE: the namespace wins.
  writeManifest("mesh-pa.yaml", pa("weft-system", "default", "STRICT"));
  writeManifest("shop-pa.yaml", pa("shop", "tight", "PERMISSIVE"));
  reload();
  u = nextUpdate(z);
  EXPECT_FALSE(strictIn(u, "web"));
  expectQuiet(z);

  // The namespace policy says UNSET: the mesh-wide STRICT applies.
  writeManifest("shop-pa.yaml", pa("shop", "tight", "UNSET"));
  reload();
  EXPECT_TRUE(strictIn(nextUpdate(z), "web"));
  expectQuiet(z);

  // A new ztunnel gets the mode in its full update and in the pod's AddWorkload.
  FakeZtunnel z2;
  auto again = connect(z2);
  bool saw_full = false, saw_add = false;
  for (const auto& m : again) {
    if (m.has_cluster_update() && m.cluster_update().full()) {
      saw_full = true;
      EXPECT_TRUE(strictIn(m.cluster_update(), "web"));
    }
    if (m.has_add_workload()) {
      saw_add = true;
      EXPECT_TRUE(m.add_workload().workload().strict_mtls());
    }
  }
  EXPECT_TRUE(saw_full);
  EXPECT_TRUE(saw_add);

  // Every policy gone: back to PERMISSIVE.
  std::filesystem::remove(dir_.file("manifests/mesh-pa.yaml"));
  std::filesystem::remove(dir_.file("manifests/shop-pa.yaml"));
  reload();
  EXPECT_FALSE(strictIn(nextUpdate(z2), "web"));
}

TEST_F(LivePolicyTest, AdminShowsEffectiveModeAndPolicies) {
  writeManifest("pa.yaml", pa("weft-system", "default", "STRICT") + "---\n" +
                               pa("shop", "lax", "PERMISSIVE"));
  reload();
  json pas = adminGet("/peer-authentications");
  ASSERT_EQ(pas.size(), 2u);
  EXPECT_EQ(pas[0]["namespace"], "shop");
  EXPECT_EQ(pas[0]["mode"], "PERMISSIVE");
  EXPECT_EQ(pas[0]["scope"], "namespace");
  EXPECT_EQ(pas[1]["namespace"], "weft-system");
  EXPECT_EQ(pas[1]["name"], "default");
  EXPECT_EQ(pas[1]["mode"], "STRICT");
  EXPECT_EQ(pas[1]["scope"], "mesh");
  EXPECT_EQ(adminGet("/status")["counts"]["peer_authentications"], 2);

  json w = adminGet("/workloads");
  ASSERT_EQ(w.size(), 2u);
  for (const auto& e : w) {
    EXPECT_EQ(e["peer_authentication"], "PERMISSIVE") << e.dump();
    EXPECT_EQ(e["peer_authentication_policy"], "shop/lax");
  }
  writeManifest("pa.yaml", pa("weft-system", "default", "STRICT"));
  reload();
  for (const auto& e : adminGet("/workloads")) {
    EXPECT_EQ(e["peer_authentication"], "STRICT") << e.dump();
    EXPECT_EQ(e["peer_authentication_policy"], "weft-system/default");
  }
  std::filesystem::remove(dir_.file("manifests/pa.yaml"));
  reload();
  for (const auto& e : adminGet("/workloads")) {
    EXPECT_EQ(e["peer_authentication"], "PERMISSIVE") << e.dump();
    EXPECT_TRUE(e["peer_authentication_policy"].is_null());
  }
}

}  // namespace
}  // namespace weft::agent
