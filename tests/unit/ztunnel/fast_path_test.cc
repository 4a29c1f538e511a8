// FastPath's user-space half without the kernel: FAST_OPEN/FAST_CLOSE records become live
// connections and Istio's TCP metrics for both reporters with the kernel's exact bytes; a close
// from SYN_SENT is a failed connect; a close whose open was lost still counts as opened; with no
// maps the fast path is unavailable and caches nothing.
#include "ztunnel/fast_path.h"

#include <bpf/bpf.h>
#include <gtest/gtest.h>
#include <uv.h>

#include "ztunnel/route.h"

namespace weft::ztunnel {
namespace {

namespace pb = weft::node::v1;

pb::Workload fastPathPod(const char* uid, const char* ns, const char* name, const char* ip) {
  pb::Workload w;
  w.set_uid(uid);
  w.set_namespace_(ns);
  w.set_name(name);
  w.set_node("node1");
  w.set_service_account("default");
  w.add_ips(ip);
  w.set_enrolled(true);
  return w;
}

weft_fast_event fastEvent(uint32_t type, uint16_t client_port) {
  weft_fast_event e{};
  e.head.type = type;
  e.head.netns_cookie = 101;
  e.head.timestamp_ns = 5'000'000'000;
  e.head.src = SocketAddress::parse("10.244.1.10:" + std::to_string(client_port))->toAbi();
  e.head.dst = SocketAddress::parse("10.244.1.11:8080")->toAbi();
  e.dst_netns_cookie = 202;
  e.start_ns = 4'990'000'000;
  return e;
}

class FastPathUnitTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(uv_loop_init(&loop_), 0);
    proxy_ = std::make_unique<Proxy>(&loop_);
    pb::ClusterUpdate u;
    u.set_full(true);
    *u.add_upsert_workloads() = fastPathPod("u1", "front", "client", "10.244.1.10");
    *u.add_upsert_workloads() = fastPathPod("u2", "app", "server", "10.244.1.11");
    auto st = ClusterState::apply(nullptr, u);
    ASSERT_TRUE(st) << st.status().message();
    proxy_->setState(st.value());
    fast_ = std::make_unique<FastPath>(*proxy_, true);
    fast_->addPod("u1", 101);
    fast_->addPod("u2", 202);
  }
  void TearDown() override {
    fast_.reset();
    proxy_.reset();
    uv_loop_close(&loop_);
  }

  // The series of `reporter` (exactly one expected).
  const TcpCounters* series(const char* reporter) {
    const TcpCounters* found = nullptr;
    for (const auto& [labels, counters] : proxy_->tcpMetrics().series()) {
      if (labels.reporter != reporter) continue;
      EXPECT_EQ(found, nullptr) << "two series for reporter " << reporter;
      EXPECT_EQ(labels.source_workload, "client");
      EXPECT_EQ(labels.destination_workload, "server");
      EXPECT_EQ(labels.source_principal, "spiffe://cluster.local/ns/front/sa/default");
      EXPECT_EQ(labels.destination_principal, "spiffe://cluster.local/ns/app/sa/default");
      EXPECT_EQ(labels.response_flags, "-");
      found = &counters;
    }
    return found;
  }

  uv_loop_t loop_{};
  std::unique_ptr<Proxy> proxy_;
  std::unique_ptr<FastPath> fast_;
};

TEST_F(FastPathUnitTest, OpenAndCloseCountOncePerReporterWithTheKernelsBytes) {
  fast_->onEvent(fastEvent(WEFT_EVENT_FAST_OPEN, 40000));
  auto live = fast_->connectionsJson();
  ASSERT_EQ(live.size(), 1u);
  EXPECT_EQ(live[0]["path"], "fast");
  EXPECT_EQ(live[0]["src"], "10.244.1.10:40000");
  EXPECT_EQ(live[0]["dst"], "10.244.1.11:8080");
  EXPECT_EQ(live[0]["source_workload"], "front/client");
  EXPECT_EQ(live[0]["destination_workload"], "app/server");
  for (const char* r : {"source", "destination"}) {
    const TcpCounters* c = series(r);
    ASSERT_NE(c, nullptr) << r;
    EXPECT_EQ(c->opened, 1u);
    EXPECT_EQ(c->closed, 0u);
  }

  weft_fast_event close = fastEvent(WEFT_EVENT_FAST_CLOSE, 40000);
  close.bytes_sent = 1000;      // client -> server
  close.bytes_received = 1032;  // server -> client
  close.old_state = BPF_TCP_LAST_ACK;
  fast_->onEvent(close);
  EXPECT_TRUE(fast_->connectionsJson().empty());
  for (const char* r : {"source", "destination"}) {
    const TcpCounters* c = series(r);
    ASSERT_NE(c, nullptr) << r;
    EXPECT_EQ(c->opened, 1u);
    EXPECT_EQ(c->closed, 1u);
    EXPECT_EQ(c->received_bytes, 1000u) << "source -> destination";
    EXPECT_EQ(c->sent_bytes, 1032u) << "destination -> source";
  }
  EXPECT_EQ(proxy_->stats().fast_path_connections_total, 1u);
  EXPECT_TRUE(proxy_->tcpMetrics().failures().empty());
}

TEST_F(FastPathUnitTest, CloseFromSynSentIsAFailedConnect) {
  weft_fast_event close = fastEvent(WEFT_EVENT_FAST_CLOSE, 40001);
  close.old_state = BPF_TCP_SYN_SENT;
  fast_->onEvent(close);
  EXPECT_TRUE(proxy_->tcpMetrics().series().empty()) << "never established: not opened";
  ASSERT_EQ(proxy_->tcpMetrics().failures().size(), 2u);
  for (const auto& [labels, n] : proxy_->tcpMetrics().failures()) {
    EXPECT_EQ(labels.response_flags, "CONNECT");
    EXPECT_EQ(n, 1u);
  }
  EXPECT_EQ(proxy_->stats().fast_path_connect_failures_total, 1u);
}

TEST_F(FastPathUnitTest, CloseWhoseOpenWasLostStillCountsAsOpened) {
  weft_fast_event close = fastEvent(WEFT_EVENT_FAST_CLOSE, 40002);
  close.bytes_sent = 7;
  close.old_state = BPF_TCP_FIN_WAIT2;
  fast_->onEvent(close);
  for (const char* r : {"source", "destination"}) {
    const TcpCounters* c = series(r);
    ASSERT_NE(c, nullptr) << r;
    EXPECT_EQ(c->opened, 1u);
    EXPECT_EQ(c->closed, 1u);
    EXPECT_EQ(c->received_bytes, 7u);
  }
}

TEST_F(FastPathUnitTest, UnknownSourceNetnsIsNotCounted) {
  weft_fast_event open = fastEvent(WEFT_EVENT_FAST_OPEN, 40003);
  open.head.netns_cookie = 999;  // not a pod this ztunnel serves
  fast_->onEvent(open);
  EXPECT_TRUE(proxy_->tcpMetrics().series().empty());
}

TEST_F(FastPathUnitTest, WithoutTheKernelMapsItIsUnavailableAndCachesNothing) {
  ASSERT_TRUE(fast_->setPinDir(""));
  EXPECT_FALSE(fast_->available());
  Status st = fast_->setPinDir("/nonexistent-weft-pin-dir");
  EXPECT_FALSE(st);
  EXPECT_NE(st.message().find("weft_fast_verdict"), std::string::npos) << st.message();
  auto j = fast_->statusJson();
  EXPECT_EQ(j["state"], "unavailable");
  EXPECT_NE(j["reason"].get<std::string>().find("/nonexistent-weft-pin-dir"), std::string::npos);
  Route r;
  r.kind = RouteKind::kDirectWorkload;
  r.destination_workload = proxy_->state()->workloadByUid("u2");
  fast_->consider(*proxy_->state()->workloadByUid("u1"), r,
                  *SocketAddress::parse("10.244.1.11:8080"));
  EXPECT_EQ(proxy_->stats().fast_path_verdicts_cached_total, 0u);
}

}  // namespace
}  // namespace weft::ztunnel
