// The node-protocol server against a real SOCK_SEQPACKET client: hello, snapshot order, one
// message in flight, acks, and garbage closing only the offending connection.
#include "agent/node_server.h"

#include <fcntl.h>
#include <gtest/gtest.h>

#include "test_util.h"

namespace weft::agent {
namespace {

using testing::FakeZtunnel;
using testing::TempDir;

class FakeDelegate : public NodeServerDelegate {
 public:
  nodepb::NodeConfig nodeConfig() override {
    nodepb::NodeConfig c;
    c.set_node_name("node1");
    c.set_bpf_pin_dir("/pins");
    return c;
  }
  nodepb::ClusterUpdate fullClusterUpdate() override {
    nodepb::ClusterUpdate u;
    for (int i = 0; i < workloads; i++) {
      auto* w = u.add_upsert_workloads();
      w->set_uid("uid-" + std::to_string(i));
      w->set_name(std::string(200, 'x'));  // big enough to need several chunks
    }
    return u;
  }
  std::vector<SnapshotWorkload> snapshotWorkloads() override {
    std::vector<SnapshotWorkload> out;
    for (int i = 0; i < local; i++) {
      SnapshotWorkload w;
      w.workload.set_uid("local-" + std::to_string(i));
      w.netns_fd = netns_fd;
      w.on_ack = [this](const AckResult& r) { acks.push_back(r); };
      out.push_back(std::move(w));
    }
    return out;
  }
  void onZtunnelDisconnected() override { disconnects++; }

  int workloads = 2;
  int local = 1;
  int netns_fd = -1;
  std::vector<AckResult> acks;
  int disconnects = 0;
};

class NodeServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(uv_loop_init(&loop_), 0);
    netns_ = UniqueFd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    delegate_.netns_fd = netns_.get();
  }
  void TearDown() override {
    server_.reset();
    uv_run(&loop_, UV_RUN_NOWAIT);
    EXPECT_EQ(uv_loop_close(&loop_), 0);
  }
  void listen(NodeServerOptions options = {}) {
    auto s = NodeServer::listen(&loop_, dir_.file("sub/ztunnel.sock"), &delegate_, options);
    ASSERT_TRUE(s) << s.status().message();
    server_ = std::move(s.value());
  }
  std::string path() const { return dir_.file("sub/ztunnel.sock"); }

  TempDir dir_;
  uv_loop_t loop_;
  UniqueFd netns_;
  FakeDelegate delegate_;
  NodeServerPtr server_;
};

TEST_F(NodeServerTest, HelloThenSnapshotInOrderWithAcks) {
  listen();
  FakeZtunnel z;
  ASSERT_TRUE(z.connect(path()));
  ASSERT_TRUE(z.hello());
  std::vector<UniqueFd> fds;
  nodepb::AgentMessage m = z.recvAndAck(&loop_, &fds);
  ASSERT_TRUE(m.has_node_config());
  EXPECT_EQ(m.node_config().node_name(), "node1");
  EXPECT_TRUE(server_->active());

  m = z.recvAndAck(&loop_, &fds);
  ASSERT_TRUE(m.has_cluster_update());
  EXPECT_TRUE(m.cluster_update().full());
  EXPECT_EQ(m.cluster_update().upsert_workloads_size(), 2);

  m = z.recvAndAck(&loop_, &fds);
  ASSERT_TRUE(m.has_add_workload());
  EXPECT_EQ(m.add_workload().workload().uid(), "local-0");
  ASSERT_EQ(fds.size(), 1u);  // the netns fd rode along
  EXPECT_TRUE(delegate_.acks.empty() || delegate_.acks.size() == 1);

  m = z.recvAndAck(&loop_, &fds);
  ASSERT_TRUE(m.has_snapshot_sent());
  ASSERT_TRUE(testing::runUntil(&loop_, [&] { return server_->stats().snapshot_done; }));
  ASSERT_EQ(delegate_.acks.size(), 1u);
  EXPECT_EQ(delegate_.acks[0].kind, AckResult::kApplied);

  // Deltas follow.
  nodepb::ClusterUpdate delta;
  delta.add_remove_workloads("uid-1");
  ASSERT_TRUE(server_->sendClusterUpdate(delta));
  m = z.recvAndAck(&loop_);
  ASSERT_TRUE(m.has_cluster_update());
  EXPECT_FALSE(m.cluster_update().full());
  EXPECT_EQ(m.cluster_update().remove_workloads(0), "uid-1");
  ASSERT_TRUE(server_->delWorkload("local-0"));
  m = z.recvAndAck(&loop_);
  ASSERT_TRUE(m.has_del_workload());
  EXPECT_EQ(m.del_workload().uid(), "local-0");
  EXPECT_EQ(server_->stats().protocol_errors, 0u);
}

TEST_F(NodeServerTest, OneMessageInFlight) {
  listen();
  FakeZtunnel z;
  ASSERT_TRUE(z.connect(path()));
  ASSERT_TRUE(z.hello());
  nodepb::AgentMessage m;
  std::vector<UniqueFd> fds;
  ASSERT_TRUE(z.recv(&loop_, &m, &fds));
  ASSERT_TRUE(m.has_node_config());
  // Not acked: nothing else may arrive.
  EXPECT_FALSE(z.recv(&loop_, &m, &fds, 200));
  ASSERT_TRUE(z.ack(m.id()));
  nodepb::AgentMessage next;
  ASSERT_TRUE(z.recv(&loop_, &next, &fds));
  EXPECT_TRUE(next.has_cluster_update());
  EXPECT_GT(next.id(), m.id());
}

TEST_F(NodeServerTest, FullUpdateIsSplitIntoDatagrams) {
  delegate_.workloads = 3000;  // ~660 KB: above one datagram
  delegate_.local = 0;
  listen();
  FakeZtunnel z;
  ASSERT_TRUE(z.connect(path()));
  ASSERT_TRUE(z.hello());
  ASSERT_TRUE(z.recvAndAck(&loop_).has_node_config());
  int total = 0, pieces = 0;
  bool first_full = false;
  while (true) {
    nodepb::AgentMessage m = z.recvAndAck(&loop_);
    if (m.has_snapshot_sent()) break;
    ASSERT_TRUE(m.has_cluster_update());
    if (pieces == 0) first_full = m.cluster_update().full();
    else EXPECT_FALSE(m.cluster_update().full());
    total += m.cluster_update().upsert_workloads_size();
    pieces++;
  }
  EXPECT_TRUE(first_full);
  EXPECT_EQ(total, 3000);
  EXPECT_GT(pieces, 5);
}

TEST_F(NodeServerTest, GarbageClosesThatConnectionOnly) {
  listen();
  FakeZtunnel bad;
  ASSERT_TRUE(bad.connect(path()));
  ASSERT_TRUE(bad.sendRaw("\xff\xff\xff garbage"));
  EXPECT_TRUE(bad.waitClosed(&loop_));
  EXPECT_EQ(server_->stats().protocol_errors, 1u);

  FakeZtunnel good;
  ASSERT_TRUE(good.connect(path()));
  ASSERT_TRUE(good.hello());
  EXPECT_TRUE(good.recvAndAck(&loop_).has_node_config());
}

TEST_F(NodeServerTest, FirstMessageMustBeHello) {
  listen();
  FakeZtunnel z;
  ASSERT_TRUE(z.connect(path()));
  ASSERT_TRUE(z.ack(1));
  EXPECT_TRUE(z.waitClosed(&loop_));
  EXPECT_EQ(server_->stats().protocol_errors, 1u);
  EXPECT_FALSE(server_->active());
}

TEST_F(NodeServerTest, AckWithWrongIdCloses) {
  listen();
  FakeZtunnel z;
  ASSERT_TRUE(z.connect(path()));
  ASSERT_TRUE(z.hello());
  nodepb::AgentMessage m;
  std::vector<UniqueFd> fds;
  ASSERT_TRUE(z.recv(&loop_, &m, &fds));
  ASSERT_TRUE(z.ack(m.id() + 100));
  EXPECT_TRUE(z.waitClosed(&loop_));
  EXPECT_EQ(server_->stats().protocol_errors, 1u);
  EXPECT_EQ(delegate_.disconnects, 1);
  // The pending AddWorkload learns the link went away.
  ASSERT_EQ(delegate_.acks.size(), 1u);
  EXPECT_EQ(delegate_.acks[0].kind, AckResult::kDisconnected);
}

TEST_F(NodeServerTest, HelloTimeout) {
  NodeServerOptions opts;
  opts.hello_timeout_ms = 100;
  listen(opts);
  FakeZtunnel z;
  ASSERT_TRUE(z.connect(path()));
  EXPECT_TRUE(z.waitClosed(&loop_));
  EXPECT_EQ(server_->stats().protocol_errors, 1u);
}

TEST_F(NodeServerTest, AckErrorIsReportedAsRejected) {
  listen();
  FakeZtunnel z;
  ASSERT_TRUE(z.connect(path()));
  ASSERT_TRUE(z.hello());
  z.recvAndAck(&loop_);  // NodeConfig
  z.recvAndAck(&loop_);  // ClusterUpdate
  nodepb::AgentMessage m;
  std::vector<UniqueFd> fds;
  ASSERT_TRUE(z.recv(&loop_, &m, &fds));
  ASSERT_TRUE(m.has_add_workload());
  ASSERT_TRUE(z.ack(m.id(), "no listener"));
  EXPECT_TRUE(z.recvAndAck(&loop_).has_snapshot_sent());
  ASSERT_EQ(delegate_.acks.size(), 1u);
  EXPECT_EQ(delegate_.acks[0].kind, AckResult::kRejected);
  EXPECT_EQ(delegate_.acks[0].error, "no listener");
  EXPECT_EQ(server_->stats().rejected_workloads, 1u);
  EXPECT_TRUE(server_->active());  // an error ack is not a protocol error
}

TEST_F(NodeServerTest, NewerZtunnelReplacesOlder) {
  listen();
  FakeZtunnel first;
  ASSERT_TRUE(first.connect(path()));
  ASSERT_TRUE(first.hello());
  ASSERT_TRUE(first.recvAndAck(&loop_).has_node_config());
  FakeZtunnel second;
  ASSERT_TRUE(second.connect(path()));
  ASSERT_TRUE(second.hello());
  ASSERT_TRUE(second.recvAndAck(&loop_).has_node_config());
  EXPECT_TRUE(first.waitClosed(&loop_));
  EXPECT_EQ(delegate_.disconnects, 1);
  EXPECT_EQ(server_->stats().protocol_errors, 0u);
  EXPECT_TRUE(server_->active());
}

// A CertificateRequest is not an ack: it is answered by a CertificateResponse queued behind the
// message in flight, which keeps the one-in-flight rule.
TEST_F(NodeServerTest, CertificateRequestAnsweredInTurn) {
  listen();
  std::vector<std::string> asked;
  server_->setCertificateSigner([&](const nodepb::CertificateRequest& r) {
    asked.push_back(r.identity());
    nodepb::CertificateResponse resp;
    if (r.identity().find("/sa/evil") != std::string::npos)
      resp.set_error("identity " + r.identity() + " has no workload on this node");
    else
      resp.set_cert_chain_pem("CHAIN:" + r.csr_pem());
    return resp;
  });
  FakeZtunnel z;
  ASSERT_TRUE(z.connect(path()));
  ASSERT_TRUE(z.hello());
  nodepb::AgentMessage m;
  std::vector<UniqueFd> fds;
  ASSERT_TRUE(z.recv(&loop_, &m, &fds));
  ASSERT_TRUE(m.has_node_config());  // in flight, not acked yet
  nodepb::ZtunnelMessage req;
  req.mutable_certificate_request()->set_id(7);
  req.mutable_certificate_request()->set_identity("spiffe://cluster.local/ns/a/sa/b");
  req.mutable_certificate_request()->set_csr_pem("csr");
  ASSERT_TRUE(z.send(req));
  req.mutable_certificate_request()->set_id(8);
  req.mutable_certificate_request()->set_identity("spiffe://cluster.local/ns/a/sa/evil");
  ASSERT_TRUE(z.send(req));
  ASSERT_TRUE(testing::runUntil(&loop_, [&] { return asked.size() == 2; }));
  EXPECT_FALSE(z.recv(&loop_, &m, &fds, 200));  // still one in flight
  ASSERT_TRUE(z.ack(m.id()));
  // The snapshot continues; the two responses come in order after what was already queued.
  std::vector<nodepb::CertificateResponse> responses;
  for (int i = 0; i < 10 && responses.size() < 2; i++) {
    nodepb::AgentMessage next = z.recvAndAck(&loop_, &fds);
    if (next.has_certificate_response()) responses.push_back(next.certificate_response());
  }
  ASSERT_EQ(responses.size(), 2u);
  EXPECT_EQ(responses[0].request_id(), 7u);
  EXPECT_EQ(responses[0].cert_chain_pem(), "CHAIN:csr");
  EXPECT_TRUE(responses[0].error().empty());
  EXPECT_EQ(responses[1].request_id(), 8u);
  EXPECT_NE(responses[1].error().find("has no workload on this node"), std::string::npos);
  auto st = server_->stats();
  EXPECT_EQ(st.certificate_requests, 2u);
  EXPECT_EQ(st.certificate_errors, 1u);
  EXPECT_EQ(st.protocol_errors, 0u);
}

TEST(SplitClusterUpdate, KeepsEverythingAndFullOnlyFirst) {
  nodepb::ClusterUpdate u;
  u.set_full(true);
  for (int i = 0; i < 100; i++) u.add_upsert_workloads()->set_uid(std::string(100, 'a' + i % 26));
  for (int i = 0; i < 50; i++) u.add_remove_services("ns/s" + std::to_string(i));
  auto pieces = splitClusterUpdate(u, 2048);
  ASSERT_GT(pieces.size(), 3u);
  int w = 0, s = 0;
  for (size_t i = 0; i < pieces.size(); i++) {
    EXPECT_EQ(pieces[i].full(), i == 0);
    EXPECT_LE(pieces[i].ByteSizeLong(), 2048u);
    w += pieces[i].upsert_workloads_size();
    s += pieces[i].remove_services_size();
  }
  EXPECT_EQ(w, 100);
  EXPECT_EQ(s, 50);
}

}  // namespace
}  // namespace weft::agent
