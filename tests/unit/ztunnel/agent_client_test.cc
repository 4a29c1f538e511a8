// The agent client against a fake agent on a real SOCK_SEQPACKET socket: hello, every message
// acked (errors as text), a bad datagram closes and reconnects with a new hello.
#include "ztunnel/agent_client.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <functional>
#include <thread>

#include "common/seqpacket.h"

namespace weft::ztunnel {
namespace {

struct RecordingHandler : AgentHandler {
  std::vector<std::string> calls;
  void onAgentConnected() override { calls.push_back("connected"); }
  void onAgentDisconnected() override { calls.push_back("disconnected"); }
  Status onNodeConfig(const node::v1::NodeConfig& c) override {
    calls.push_back("node_config " + c.node_name());
    return Status::ok();
  }
  Status onClusterUpdate(const node::v1::ClusterUpdate& u) override {
    calls.push_back("cluster_update " + std::to_string(u.upsert_workloads_size()));
    return Status::ok();
  }
  Status onAddWorkload(const node::v1::Workload& w, UniqueFd netns) override {
    calls.push_back("add " + w.uid() + (netns.valid() ? " fd" : " nofd"));
    return Status::ok();
  }
  Status onDelWorkload(const std::string& uid) override {
    calls.push_back("del " + uid);
    return Status::error("del failed on purpose");
  }
  Status onSnapshotSent() override {
    calls.push_back("snapshot_sent");
    return Status::ok();
  }
};

// A fake agent: blocking socket calls with poll timeouts.
class FakeAgent {
 public:
  FakeAgent() {
    char tmpl[] = "/tmp/weft-agent-test-XXXXXX";
    EXPECT_NE(mkdtemp(tmpl), nullptr);
    dir = tmpl;
    path = dir + "/ztunnel.sock";
    listener = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    sockaddr_un sun{};
    sun.sun_family = AF_UNIX;
    snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", path.c_str());
    EXPECT_EQ(bind(listener, reinterpret_cast<sockaddr*>(&sun), sizeof(sun)), 0);
    EXPECT_EQ(listen(listener, 4), 0);
  }
  ~FakeAgent() {
    if (conn >= 0) close(conn);
    close(listener);
    unlink(path.c_str());
    rmdir(dir.c_str());
  }
  bool acceptOne() {
    pollfd p{listener, POLLIN, 0};
    if (poll(&p, 1, 5000) != 1) return false;
    if (conn >= 0) close(conn);
    conn = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
    return conn >= 0;
  }
  bool recv(node::v1::ZtunnelMessage* m) {
    pollfd p{conn, POLLIN, 0};
    if (poll(&p, 1, 5000) != 1) return false;
    std::vector<UniqueFd> fds;
    std::string err;
    return recvNodeMessage(conn, m, &fds, &err) == RecvResult::kMessage;
  }
  // Sends and returns the ack's error ("<no ack>" if none came).
  std::string call(const node::v1::AgentMessage& m, std::vector<int> fds = {}) {
    if (!sendNodeMessage(conn, m, fds)) return "<send failed>";
    node::v1::ZtunnelMessage a;
    if (!recv(&a) || !a.has_ack()) return "<no ack>";
    if (a.ack().id() != m.id()) return "<wrong id>";
    return a.ack().error();
  }
  std::string dir, path;
  int listener = -1, conn = -1;
};

// Runs the loop while `agent` runs on a thread; stops when it returns.
void runWithAgent(uv_loop_t* loop, const std::function<void()>& agent) {
  auto* stop = new uv_async_t;
  ASSERT_EQ(uv_async_init(loop, stop, [](uv_async_t* a) { uv_stop(a->loop); }), 0);
  std::thread t([&] {
    agent();
    uv_async_send(stop);
  });
  uv_run(loop, UV_RUN_DEFAULT);
  t.join();
  uv_close(reinterpret_cast<uv_handle_t*>(stop),
           [](uv_handle_t* h) { delete reinterpret_cast<uv_async_t*>(h); });
}

TEST(AgentClient, HelloAndAcks) {
  FakeAgent agent;
  uv_loop_t loop;
  ASSERT_EQ(uv_loop_init(&loop), 0);
  RecordingHandler handler;
  ZtunnelStats stats;
  {
    AgentClient client(&loop, {agent.path, "test-1", 100, 2000}, handler, stats);
    ASSERT_TRUE(client.start());
    std::vector<std::string> acks;
    node::v1::ZtunnelMessage hello;
    runWithAgent(&loop, [&] {
      ASSERT_TRUE(agent.acceptOne());
      ASSERT_TRUE(agent.recv(&hello));
      node::v1::AgentMessage m;
      m.set_id(1);
      m.mutable_node_config()->set_node_name("node1");
      acks.push_back(agent.call(m));
      m.Clear();
      m.set_id(2);
      m.mutable_cluster_update()->set_full(true);
      m.mutable_cluster_update()->add_upsert_workloads()->set_uid("w");
      acks.push_back(agent.call(m));
      m.Clear();
      m.set_id(3);
      m.mutable_add_workload()->mutable_workload()->set_uid("p1");
      acks.push_back(agent.call(m));  // no fd: refused without reaching the handler
      int fd = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
      m.set_id(4);
      acks.push_back(agent.call(m, {fd}));
      close(fd);
      m.Clear();
      m.set_id(5);
      m.mutable_del_workload()->set_uid("p1");
      acks.push_back(agent.call(m));
      m.Clear();
      m.set_id(6);
      m.mutable_snapshot_sent();
      acks.push_back(agent.call(m));
      m.Clear();
      m.set_id(7);  // no payload: an unknown kind
      acks.push_back(agent.call(m));
    });
    EXPECT_EQ(hello.hello().protocol_version(), 1u);
    EXPECT_EQ(hello.hello().ztunnel_version(), "test-1");
    ASSERT_EQ(acks.size(), 7u);
    EXPECT_EQ(acks[0], "");
    EXPECT_EQ(acks[1], "");
    EXPECT_NE(acks[2].find("netns fd"), std::string::npos) << acks[2];
    EXPECT_EQ(acks[3], "");
    EXPECT_EQ(acks[4], "del failed on purpose");
    EXPECT_EQ(acks[5], "");
    EXPECT_NE(acks[6], "");
    EXPECT_EQ(handler.calls,
              (std::vector<std::string>{"connected", "node_config node1", "cluster_update 1",
                                        "add p1 fd", "del p1", "snapshot_sent"}));
    EXPECT_TRUE(client.connected());
    EXPECT_EQ(stats.agent_messages_total, 7u);
    EXPECT_EQ(stats.agent_message_failures_total, 3u);
    client.stop();
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  EXPECT_EQ(uv_loop_close(&loop), 0);
}

TEST(AgentClient, BadDatagramReconnectsWithNewHello) {
  FakeAgent agent;
  uv_loop_t loop;
  ASSERT_EQ(uv_loop_init(&loop), 0);
  RecordingHandler handler;
  ZtunnelStats stats;
  {
    AgentClient client(&loop, {agent.path, "t", 50, 200}, handler, stats);
    ASSERT_TRUE(client.start());
    bool second_hello = false;
    std::string ack_after;
    runWithAgent(&loop, [&] {
      ASSERT_TRUE(agent.acceptOne());
      node::v1::ZtunnelMessage hello;
      ASSERT_TRUE(agent.recv(&hello));
      const char junk[] = {'\x08', '\xff', '\xff'};
      ASSERT_EQ(send(agent.conn, junk, sizeof(junk), 0), 3);
      // The client closes and comes back with a new hello.
      ASSERT_TRUE(agent.acceptOne());
      node::v1::ZtunnelMessage again;
      second_hello = agent.recv(&again) && again.has_hello();
      node::v1::AgentMessage m;
      m.set_id(9);
      m.mutable_snapshot_sent();
      ack_after = agent.call(m);
    });
    EXPECT_TRUE(second_hello);
    EXPECT_EQ(ack_after, "");
    EXPECT_EQ(stats.agent_protocol_errors_total, 1u);
    EXPECT_EQ(stats.agent_connects_total, 2u);
    EXPECT_EQ(handler.calls, (std::vector<std::string>{"connected", "disconnected", "connected",
                                                       "snapshot_sent"}));
    client.stop();
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  EXPECT_EQ(uv_loop_close(&loop), 0);
}

TEST(AgentClient, RetriesUntilTheAgentAppears) {
  char tmpl[] = "/tmp/weft-agent-test-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  std::string path = std::string(tmpl) + "/late.sock";
  uv_loop_t loop;
  ASSERT_EQ(uv_loop_init(&loop), 0);
  RecordingHandler handler;
  ZtunnelStats stats;
  {
    AgentClient client(&loop, {path, "t", 20, 100}, handler, stats);
    ASSERT_TRUE(client.start());
    EXPECT_FALSE(client.connected());
    bool got_hello = false;
    runWithAgent(&loop, [&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      int l = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
      sockaddr_un sun{};
      sun.sun_family = AF_UNIX;
      snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", path.c_str());
      ASSERT_EQ(bind(l, reinterpret_cast<sockaddr*>(&sun), sizeof(sun)), 0);
      ASSERT_EQ(listen(l, 1), 0);
      pollfd p{l, POLLIN, 0};
      if (poll(&p, 1, 3000) == 1) {
        int c = accept(l, nullptr, nullptr);
        pollfd q{c, POLLIN, 0};
        node::v1::ZtunnelMessage m;
        std::vector<UniqueFd> fds;
        std::string err;
        got_hello = poll(&q, 1, 3000) == 1 &&
                    recvNodeMessage(c, &m, &fds, &err) == RecvResult::kMessage && m.has_hello();
        close(c);
      }
      close(l);
    });
    EXPECT_TRUE(got_hello);
    client.stop();
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  EXPECT_EQ(uv_loop_close(&loop), 0);
  unlink(path.c_str());
  rmdir(tmpl);
}

}  // namespace
}  // namespace weft::ztunnel
