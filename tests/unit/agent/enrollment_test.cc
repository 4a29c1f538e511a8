// Enrollment: the pure decision, and the controller's ordering against a real node-protocol
// client and the in-memory dataplane (ztunnel ack before BPF; BPF off before DelWorkload).
#include "agent/enrollment.h"

#include <gtest/gtest.h>

#include "test_util.h"

namespace weft::agent {
namespace {

using testing::FakeZtunnel;
using testing::TempDir;

Namespace ns(const std::string& name, bool ambient) {
  Namespace n;
  n.meta.name = name;
  if (ambient) n.meta.labels[kDataplaneModeLabel] = kDataplaneModeAmbient;
  return n;
}

Pod pod(const std::string& nsname, const std::string& name, const std::string& node,
        const std::string& ip, bool opt_out = false) {
  Pod p;
  p.meta.name = name;
  p.meta.namespace_ = nsname;
  p.meta.uid = deriveUid("Pod", nsname, name);
  p.meta.labels["app"] = name;
  if (opt_out) p.meta.labels[kDataplaneModeLabel] = kDataplaneModeNone;
  p.node_name = node;
  p.ips.push_back(*IpAddr::parse(ip));
  return p;
}

ClusterModel demoModel() {
  ClusterModel m;
  for (auto n : {ns("shop", true), ns("legacy", false)}) m.namespaces[n.meta.name] = n;
  for (auto p : {pod("shop", "web", "node1", "10.244.1.10"),
                 pod("shop", "db", "node2", "10.244.2.10"),
                 pod("shop", "batch", "node1", "10.244.1.11", /*opt_out=*/true),
                 pod("legacy", "old", "node1", "10.244.1.12"),
                 pod("nowhere", "orphan", "node1", "10.244.1.13")})
    m.pods[objectKey(p.meta.namespace_, p.meta.name)] = p;
  return m;
}

TEST(DecideEnrolled, LabelsNodeAndNetns) {
  ClusterModel m = demoModel();
  std::set<std::string> netns = {"shop/web", "shop/db", "shop/batch", "legacy/old",
                                 "nowhere/orphan", "shop/ghost"};
  EXPECT_EQ(decideEnrolled(m, "node1", netns), std::set<std::string>{"shop/web"});
  EXPECT_EQ(decideEnrolled(m, "node2", netns), std::set<std::string>{"shop/db"});
  EXPECT_TRUE(decideEnrolled(m, "node1", {}).empty());  // no netns known: nothing
  // A pod label other than "none" does not opt out.
  m.pods["shop/batch"].meta.labels[kDataplaneModeLabel] = "ambient";
  EXPECT_EQ(decideEnrolled(m, "node1", netns), (std::set<std::string>{"shop/batch", "shop/web"}));
  // The namespace label must say ambient exactly.
  m.namespaces["shop"].meta.labels[kDataplaneModeLabel] = "sidecar";
  EXPECT_TRUE(decideEnrolled(m, "node1", netns).empty());
}

TEST(Model, ServiceEndpointsBySelectorInNamespace) {
  ClusterModel m = demoModel();
  Service s;
  s.meta.name = "web";
  s.meta.namespace_ = "shop";
  s.selector["app"] = "web";
  EXPECT_EQ(serviceEndpoints(m, s).size(), 1u);
  s.meta.namespace_ = "legacy";
  EXPECT_TRUE(serviceEndpoints(m, s).empty());
  s.selector.clear();
  EXPECT_TRUE(serviceEndpoints(m, s).empty());
}

TEST(Model, DerivedUidsAreStableAndDistinct) {
  EXPECT_EQ(deriveUid("Pod", "a", "b"), deriveUid("Pod", "a", "b"));
  EXPECT_NE(deriveUid("Pod", "a", "b"), deriveUid("Pod", "a", "c"));
  EXPECT_NE(deriveUid("Pod", "a", "b"), deriveUid("Service", "a", "b"));
}

// Records the order of dataplane calls next to what the fake ztunnel saw.
class RecordingDataplane : public Dataplane {
 public:
  RecordingDataplane(std::vector<std::string>* log) : log_(log) {
    DataplaneOptions o;
    o.testing = true;
    inner_ = std::move(Dataplane::open(o).value());
  }
  const DataplaneInfo& info() const override { return inner_->info(); }
  Status enroll(uint64_t cookie, int fd, uint64_t id) override {
    log_->push_back("bpf-enroll");
    return inner_->enroll(cookie, fd, id);
  }
  Status unenroll(uint64_t cookie) override {
    log_->push_back("bpf-unenroll");
    return inner_->unenroll(cookie);
  }
  std::vector<uint64_t> enrolled() const override { return inner_->enrolled(); }
  Status setInboundBypass(const std::vector<IpAddr>& s) override {
    return inner_->setInboundBypass(s);
  }
  Status setLocalHopAccel(bool on) override { return inner_->setLocalHopAccel(on); }
  Result<LocalHopStatus> localHop() const override { return inner_->localHop(); }
  Status destroy() override { return inner_->destroy(); }

 private:
  std::vector<std::string>* log_;
  DataplanePtr inner_;
};

class ControllerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(uv_loop_init(&loop_), 0);
    for (auto name : {"web", "batch", "old", "web2"}) dir_.write("netns-" + std::string(name), "");
  }
  void TearDown() override {
    server_.reset();
    controller_.reset();
    for (int i = 0; i < 10; i++) uv_run(&loop_, UV_RUN_NOWAIT);
    EXPECT_EQ(uv_loop_close(&loop_), 0);
  }
  void start(uint64_t timeout_ms = 5000) {
    EnrollmentOptions o;
    o.node_name = "node1";
    o.bpf_pin_dir = "/pins";
    o.cni_add_timeout_ms = timeout_ms;
    o.open_netns = testing::fakeNetnsOpener;
    controller_ = std::make_unique<EnrollmentController>(&loop_, o, &dataplane_, &store_);
    ASSERT_TRUE(controller_->start(model_));
    auto s = NodeServer::listen(&loop_, dir_.file("z.sock"), controller_.get());
    ASSERT_TRUE(s);
    server_ = std::move(s.value());
    controller_->setNodeServer(server_.get());
  }
  uint64_t cookieOf(const std::string& name) {
    return testing::fakeNetnsOpener(dir_.file("netns-" + name))->cookie;
  }
  CniRequest add(const std::string& ns, const std::string& name) {
    CniRequest r;
    r.command = "ADD";
    r.pod_namespace = ns;
    r.pod_name = name;
    r.netns = dir_.file("netns-" + name);
    r.container_id = "c-" + name;
    return r;
  }
  // Sends a CNI request; the reply lands in *out when it comes.
  void cni(const CniRequest& r, std::optional<CniResponse>* out) {
    controller_->handleCni(r, [out](const CniResponse& resp) { *out = resp; });
  }
  // Connects a ztunnel and acks the snapshot through SnapshotSent, logging AddWorkloads.
  void connectZtunnel(FakeZtunnel& z) {
    ASSERT_TRUE(z.connect(dir_.file("z.sock")));
    ASSERT_TRUE(z.hello());
    for (int i = 0; i < 20; i++) {
      nodepb::AgentMessage m = recvLogged(z);
      z.ack(m.id());
      if (m.has_snapshot_sent() || m.payload_case() == 0) return;
    }
  }
  nodepb::AgentMessage recvLogged(FakeZtunnel& z) {
    nodepb::AgentMessage m;
    std::vector<UniqueFd> fds;
    if (!z.recv(&loop_, &m, &fds)) return m;
    if (m.has_add_workload()) log_.push_back("ztunnel-add " + m.add_workload().workload().name());
    if (m.has_del_workload()) log_.push_back("ztunnel-del");
    return m;
  }
  bool enrolled(const std::string& name) {
    auto v = dataplane_.enrolled();
    return std::find(v.begin(), v.end(), cookieOf(name)) != v.end();
  }

  TempDir dir_;
  uv_loop_t loop_;
  std::vector<std::string> log_;
  RecordingDataplane dataplane_{&log_};
  PodStore store_{dir_.file("state")};
  ClusterModel model_ = demoModel();
  std::unique_ptr<EnrollmentController> controller_;
  NodeServerPtr server_;
};

TEST_F(ControllerTest, AddWaitsForZtunnelAckThenEnrollsInBpf) {
  start();
  FakeZtunnel z;
  connectZtunnel(z);
  std::optional<CniResponse> reply;
  cni(add("shop", "web"), &reply);
  nodepb::AgentMessage m = recvLogged(z);
  ASSERT_TRUE(m.has_add_workload());
  EXPECT_EQ(m.add_workload().workload().namespace_(), "shop");
  EXPECT_TRUE(m.add_workload().workload().enrolled());
  // Not acked yet: no redirect, no CNI reply.
  EXPECT_FALSE(enrolled("web"));
  EXPECT_FALSE(reply.has_value());
  z.ack(m.id());
  ASSERT_TRUE(testing::runUntil(&loop_, [&] { return reply.has_value(); }));
  EXPECT_TRUE(reply->ok) << reply->msg;
  EXPECT_TRUE(enrolled("web"));
  EXPECT_EQ(log_, (std::vector<std::string>{"ztunnel-add web", "bpf-enroll"}));
  // Persisted for a restarted agent.
  PodStore reread(dir_.file("state"));
  ASSERT_TRUE(reread.load());
  ASSERT_NE(reread.find("shop/web"), nullptr);
  EXPECT_EQ(reread.find("shop/web")->netns, dir_.file("netns-web"));
}

// On a real cluster the API server sets status.podIPs only after CNI ADD returned, and ADD waits
// for enrollment: the pod's addresses come from the ADD's prevResult instead (no deadlock).
TEST_F(ControllerTest, PodWithoutPodIpsIsEnrolledWithTheCniPrevResultAddresses) {
  model_.pods["shop/web"].ips.clear();  // as the Kubernetes source keeps a pending local pod
  start();
  FakeZtunnel z;
  connectZtunnel(z);
  std::optional<CniResponse> reply;
  CniRequest r = add("shop", "web");
  r.pod_ips = {*IpAddr::parse("10.244.1.77"), *IpAddr::parse("fd00:10:244:1::77")};
  cni(r, &reply);
  // The ztunnel first hears of the address in a cluster update, then gets the workload.
  nodepb::AgentMessage m;
  for (int i = 0; i < 5; i++) {
    m = recvLogged(z);
    if (m.has_add_workload()) break;
    if (m.has_cluster_update()) {
      bool seen = false;
      for (const auto& w : m.cluster_update().upsert_workloads())
        if (w.name() == "web") seen = w.ips_size() == 2 && w.ips(0) == "10.244.1.77";
      EXPECT_TRUE(seen) << m.DebugString();
    }
    z.ack(m.id());
  }
  ASSERT_TRUE(m.has_add_workload()) << m.DebugString();
  ASSERT_EQ(m.add_workload().workload().ips_size(), 2);
  EXPECT_EQ(m.add_workload().workload().ips(0), "10.244.1.77");
  EXPECT_EQ(m.add_workload().workload().ips(1), "fd00:10:244:1::77");
  z.ack(m.id());
  ASSERT_TRUE(testing::runUntil(&loop_, [&] { return reply.has_value(); }));
  EXPECT_TRUE(reply->ok) << reply->msg << " " << reply->details;
  EXPECT_TRUE(enrolled("web"));
  ASSERT_NE(controller_->model().findPod("shop", "web"), nullptr);
  EXPECT_EQ(controller_->model().findPod("shop", "web")->ips.size(), 2u);
  // Once the API server has the address, it is the one in force.
  ClusterModel later = demoModel();
  controller_->setModel(later);
  EXPECT_EQ(controller_->model().findPod("shop", "web")->ips[0].toString(), "10.244.1.10");
}

// Without an address anywhere the pod cannot be enrolled; the ADD says why when it gives up.
TEST_F(ControllerTest, PodWithoutAnyAddressTimesOutSayingSo) {
  model_.pods["shop/web"].ips.clear();
  start(/*timeout_ms=*/200);
  FakeZtunnel z;
  connectZtunnel(z);
  std::optional<CniResponse> reply;
  cni(add("shop", "web"), &reply);
  ASSERT_TRUE(testing::runUntil(&loop_, [&] { return reply.has_value(); }));
  EXPECT_FALSE(reply->ok);
  EXPECT_NE(reply->details.find("no IP address"), std::string::npos) << reply->details;
  EXPECT_FALSE(enrolled("web"));
}

TEST_F(ControllerTest, NotEnrolledPodsAnswerAtOnce) {
  start();
  for (auto [ns, name] : {std::pair{"shop", "batch"}, {"legacy", "old"}}) {
    std::optional<CniResponse> reply;
    cni(add(ns, name), &reply);
    ASSERT_TRUE(reply.has_value()) << name;
    EXPECT_TRUE(reply->ok) << name << ": " << reply->msg;
  }
  EXPECT_TRUE(dataplane_.enrolled().empty());
}

TEST_F(ControllerTest, WithoutZtunnelAddWaitsUntilOneAcks) {
  start();
  std::optional<CniResponse> reply;
  cni(add("shop", "web"), &reply);
  EXPECT_FALSE(testing::runUntil(&loop_, [&] { return reply.has_value(); }, 100));
  EXPECT_FALSE(enrolled("web"));  // no ztunnel listener yet: redirect would break the pod
  FakeZtunnel z;
  connectZtunnel(z);
  ASSERT_TRUE(testing::runUntil(&loop_, [&] { return reply.has_value(); }));
  EXPECT_TRUE(reply->ok);
  EXPECT_TRUE(enrolled("web"));
  EXPECT_EQ(log_, (std::vector<std::string>{"ztunnel-add web", "bpf-enroll"}));
}

TEST_F(ControllerTest, AddTimesOutWithoutZtunnel) {
  start(/*timeout_ms=*/150);
  std::optional<CniResponse> reply;
  cni(add("shop", "web"), &reply);
  ASSERT_TRUE(testing::runUntil(&loop_, [&] { return reply.has_value(); }));
  EXPECT_FALSE(reply->ok);
  EXPECT_EQ(reply->code, kCniErrTryAgain);
  EXPECT_EQ(reply->details, "no ztunnel is connected");
}

TEST_F(ControllerTest, ZtunnelRejectionFailsTheAdd) {
  start();
  FakeZtunnel z;
  connectZtunnel(z);
  std::optional<CniResponse> reply;
  cni(add("shop", "web"), &reply);
  nodepb::AgentMessage m = recvLogged(z);
  ASSERT_TRUE(m.has_add_workload());
  z.ack(m.id(), "cannot bind 15001");
  ASSERT_TRUE(testing::runUntil(&loop_, [&] { return reply.has_value(); }));
  EXPECT_FALSE(reply->ok);
  EXPECT_EQ(reply->code, kCniErrEnroll);
  EXPECT_NE(reply->details.find("cannot bind 15001"), std::string::npos);
  EXPECT_FALSE(enrolled("web"));
}

TEST_F(ControllerTest, LeavingUnenrollsBeforeDelWorkload) {
  start();
  FakeZtunnel z;
  connectZtunnel(z);
  std::optional<CniResponse> reply;
  cni(add("shop", "web"), &reply);
  z.ack(recvLogged(z).id());
  ASSERT_TRUE(testing::runUntil(&loop_, [&] { return reply.has_value(); }));
  ASSERT_TRUE(enrolled("web"));
  // The namespace leaves the mesh.
  ClusterModel m = model_;
  m.namespaces["shop"].meta.labels.clear();
  controller_->setModel(m);
  EXPECT_FALSE(enrolled("web"));
  nodepb::AgentMessage delta = recvLogged(z);
  ASSERT_TRUE(delta.has_cluster_update());  // workloads' enrolled flags changed
  EXPECT_FALSE(delta.cluster_update().full());
  z.ack(delta.id());
  nodepb::AgentMessage del = recvLogged(z);
  ASSERT_TRUE(del.has_del_workload());
  EXPECT_EQ(log_, (std::vector<std::string>{"ztunnel-add web", "bpf-enroll", "bpf-unenroll",
                                            "ztunnel-del"}));
}

TEST_F(ControllerTest, DelIsIdempotentAndForgetsThePod) {
  start();
  FakeZtunnel z;
  connectZtunnel(z);
  std::optional<CniResponse> reply;
  cni(add("shop", "web"), &reply);
  z.ack(recvLogged(z).id());
  ASSERT_TRUE(testing::runUntil(&loop_, [&] { return reply.has_value(); }));
  CniRequest del = add("shop", "web");
  del.command = "DEL";
  for (int i = 0; i < 2; i++) {
    std::optional<CniResponse> r;
    cni(del, &r);
    ASSERT_TRUE(r.has_value());
    EXPECT_TRUE(r->ok);
  }
  EXPECT_FALSE(enrolled("web"));
  EXPECT_TRUE(recvLogged(z).has_del_workload());
  PodStore reread(dir_.file("state"));
  ASSERT_TRUE(reread.load());
  EXPECT_EQ(reread.find("shop/web"), nullptr);
}

TEST_F(ControllerTest, CheckReportsState) {
  start();
  CniRequest check = add("legacy", "old");
  check.command = "CHECK";
  std::optional<CniResponse> r;
  cni(check, &r);
  ASSERT_TRUE(r.has_value());
  EXPECT_FALSE(r->ok);  // not known yet
  std::optional<CniResponse> a;
  cni(add("legacy", "old"), &a);
  r.reset();
  cni(check, &r);
  EXPECT_TRUE(r->ok);
}

TEST_F(ControllerTest, WrongNodeAndUnknownPod) {
  start(/*timeout_ms=*/100);
  dir_.write("netns-db", "");
  std::optional<CniResponse> r;
  cni(add("shop", "db"), &r);  // scheduled on node2
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->code, kCniErrWrongNode);
  dir_.write("netns-ghost", "");
  bool rescanned = false;
  controller_->setRescanHook([&] { rescanned = true; });
  r.reset();
  cni(add("shop", "ghost"), &r);
  EXPECT_TRUE(rescanned);
  ASSERT_TRUE(testing::runUntil(&loop_, [&] { return r.has_value(); }));
  EXPECT_EQ(r->code, kCniErrUnknownPod);
}

TEST_F(ControllerTest, RestartKeepsWantedPinsAndRemovesStaleOnes) {
  // An earlier agent enrolled web (still wanted), batch (opted out since) and a gone pod.
  ASSERT_TRUE(dataplane_.enroll(cookieOf("web"), -1, 1));
  ASSERT_TRUE(dataplane_.enroll(cookieOf("batch"), -1, 2));
  ASSERT_TRUE(dataplane_.enroll(12345, -1, 3));
  store_.put({"shop", "web", "", dir_.file("netns-web"), "c1"});
  store_.put({"shop", "batch", "", dir_.file("netns-batch"), "c2"});
  store_.put({"shop", "gone", "", dir_.file("netns-gone-missing"), "c3"});
  ASSERT_TRUE(store_.save());
  log_.clear();
  ASSERT_TRUE(store_.load());
  start();
  EXPECT_TRUE(enrolled("web"));
  EXPECT_FALSE(enrolled("batch"));
  EXPECT_EQ(dataplane_.enrolled().size(), 1u);
  EXPECT_EQ(std::count(log_.begin(), log_.end(), "bpf-enroll"), 0);  // not re-attached
  EXPECT_EQ(store_.find("shop/gone"), nullptr);  // its netns is gone
  // A new ztunnel still gets the adopted pod in its snapshot.
  FakeZtunnel z;
  connectZtunnel(z);
  EXPECT_EQ(std::count(log_.begin(), log_.end(), "ztunnel-add web"), 1);
  EXPECT_EQ(std::count(log_.begin(), log_.end(), "bpf-enroll"), 0);
}

TEST_F(ControllerTest, ZtunnelRestartResendsWithoutTouchingBpf) {
  start();
  auto z1 = std::make_unique<FakeZtunnel>();
  connectZtunnel(*z1);
  std::optional<CniResponse> reply;
  cni(add("shop", "web"), &reply);
  z1->ack(recvLogged(*z1).id());
  ASSERT_TRUE(testing::runUntil(&loop_, [&] { return reply.has_value() && reply->ok; }));
  z1.reset();  // the ztunnel dies
  ASSERT_TRUE(testing::runUntil(&loop_, [&] { return !server_->active(); }));
  EXPECT_TRUE(enrolled("web"));  // redirect stays while it is away
  FakeZtunnel z2;
  connectZtunnel(z2);
  EXPECT_EQ(log_, (std::vector<std::string>{"ztunnel-add web", "bpf-enroll", "ztunnel-add web"}));
  EXPECT_TRUE(enrolled("web"));
}

}  // namespace
}  // namespace weft::agent
