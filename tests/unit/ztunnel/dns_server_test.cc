// The DNS proxy's I/O, as root in a throwaway netns: a workload's 15053 (UDP and TCP, IPv4 and
// IPv6) answers service names from the cluster state, forwards other names to the resolver the
// lookup names (a fake upstream in the same netns; the BPF lookup is covered in tests/bpf and
// e2e), truncates what does not fit, drops and counts malformed messages and keeps answering.
#include <dirent.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <functional>
#include <thread>

#include "common/netns.h"
#include "tests/unit/ztunnel/pod_netns.h"
#include "ztunnel/ztunnel.h"

namespace weft::ztunnel {
namespace {

using Bytes = std::vector<uint8_t>;
constexpr const char* kUpstream = "127.0.0.1:5300";

using podtest::PodNetns;

void put16(Bytes& b, uint16_t v) {
  b.push_back(static_cast<uint8_t>(v >> 8));
  b.push_back(static_cast<uint8_t>(v));
}

Bytes query(uint16_t id, const std::string& name, uint16_t type) {
  Bytes b;
  put16(b, id);
  put16(b, dns::kFlagRD);
  put16(b, 1);
  put16(b, 0);
  put16(b, 0);
  put16(b, 0);
  size_t start = 0;
  while (start < name.size()) {
    size_t dot = name.find('.', start);
    if (dot == std::string::npos) dot = name.size();
    b.push_back(static_cast<uint8_t>(dot - start));
    b.insert(b.end(), name.begin() + static_cast<long>(start),
             name.begin() + static_cast<long>(dot));
    start = dot + 1;
  }
  b.push_back(0);
  put16(b, type);
  put16(b, dns::kClassIN);
  return b;
}

uint16_t flagsOf(const Bytes& r) {
  return r.size() < 4 ? 0 : static_cast<uint16_t>((r[2] << 8) | r[3]);
}
uint16_t idOf(const Bytes& r) {
  return r.size() < 2 ? 0 : static_cast<uint16_t>((r[0] << 8) | r[1]);
}
int ancount(const Bytes& r) {
  return r.size() < 8 ? -1 : (r[6] << 8) | r[7];
}

// The last 4 bytes of an answer with one A record: the address.
std::string lastA(const Bytes& r) {
  if (r.size() < 4) return "";
  return fmt::format("{}.{}.{}.{}", r[r.size() - 4], r[r.size() - 3], r[r.size() - 2],
                     r[r.size() - 1]);
}

// A fake upstream resolver in the netns: UDP and TCP on 127.0.0.1:5300; answers every query
// with the query itself, QR set, plus `pad` zero bytes when the name starts with "big" (not a
// valid record: the proxy checks only the header of what it relays).
class FakeUpstream {
 public:
  explicit FakeUpstream(int netns) {
    auto a = *SocketAddress::parse(kUpstream);
    sockaddr_storage ss;
    socklen_t len = a.toSockaddr(&ss);
    auto u = socketIn(netns, AF_INET, SOCK_DGRAM);
    auto t = socketIn(netns, AF_INET, SOCK_STREAM);
    int one = 1;
    setsockopt(t->get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    ok_ = bind(u->get(), reinterpret_cast<sockaddr*>(&ss), len) == 0 &&
          bind(t->get(), reinterpret_cast<sockaddr*>(&ss), len) == 0 && listen(t->get(), 8) == 0;
    udp_ = std::move(u.value());
    tcp_ = std::move(t.value());
    thread_ = std::thread([this] { run(); });
  }
  ~FakeUpstream() {
    stop_ = true;
    thread_.join();
  }
  bool ok() const { return ok_; }
  int udpQueries() const { return udp_queries_; }
  int tcpQueries() const { return tcp_queries_; }

 private:
  static Bytes reply(const uint8_t* q, size_t n) {
    Bytes r(q, q + n);
    if (r.size() >= 4) r[2] |= 0x80;
    if (n > 13 && memcmp(q + 13, "big", 3) == 0) r.resize(r.size() + 1000, 0);
    return r;
  }
  void run() {
    for (int i = 0; i < 600 && !stop_; ++i) {  // at most 60 s
      pollfd p[2] = {{udp_.get(), POLLIN, 0}, {tcp_.get(), POLLIN, 0}};
      if (poll(p, 2, 100) <= 0) continue;
      if (p[0].revents & POLLIN) {
        uint8_t buf[2048];
        sockaddr_storage from;
        socklen_t fl = sizeof(from);
        ssize_t n =
            recvfrom(udp_.get(), buf, sizeof(buf), 0, reinterpret_cast<sockaddr*>(&from), &fl);
        if (n > 0) {
          ++udp_queries_;
          Bytes r = reply(buf, static_cast<size_t>(n));
          sendto(udp_.get(), r.data(), r.size(), 0, reinterpret_cast<sockaddr*>(&from), fl);
        }
      }
      if (p[1].revents & POLLIN) {
        int c = accept(tcp_.get(), nullptr, nullptr);
        if (c < 0) continue;
        uint8_t buf[2048];
        pollfd pc{c, POLLIN, 0};
        if (poll(&pc, 1, 2000) == 1) {
          ssize_t n = recv(c, buf, sizeof(buf), 0);
          if (n > 2) {
            ++tcp_queries_;
            Bytes r = reply(buf + 2, static_cast<size_t>(n) - 2);
            Bytes f = {static_cast<uint8_t>(r.size() >> 8), static_cast<uint8_t>(r.size())};
            f.insert(f.end(), r.begin(), r.end());
            send(c, f.data(), f.size(), MSG_NOSIGNAL);
            pollfd pe{c, POLLIN, 0};
            poll(&pe, 1, 2000);  // until the proxy closes
          }
        }
        close(c);
      }
    }
  }
  UniqueFd udp_, tcp_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<int> udp_queries_{0}, tcp_queries_{0};
  bool ok_ = false;
};

void runWithClient(uv_loop_t* loop, const std::function<void()>& client) {
  auto* stop = new uv_async_t;
  ASSERT_EQ(uv_async_init(loop, stop, [](uv_async_t* a) { uv_stop(a->loop); }), 0);
  std::thread t([&] {
    client();
    uv_async_send(stop);
  });
  uv_run(loop, UV_RUN_DEFAULT);
  t.join();
  uv_close(reinterpret_cast<uv_handle_t*>(stop),
           [](uv_handle_t* h) { delete reinterpret_cast<uv_async_t*>(h); });
}

// One UDP exchange from inside the netns; empty if nothing came back within `ms`.
Bytes udpAsk(int netns, const std::string& server, const Bytes& msg, int ms = 2000) {
  auto a = *SocketAddress::parse(server);
  auto s = socketIn(netns, a.family(), SOCK_DGRAM);
  if (!s) return {};
  sockaddr_storage ss;
  socklen_t len = a.toSockaddr(&ss);
  sendto(s->get(), msg.data(), msg.size(), 0, reinterpret_cast<sockaddr*>(&ss), len);
  pollfd p{s->get(), POLLIN, 0};
  if (poll(&p, 1, ms) != 1) return {};
  Bytes buf(70000);
  ssize_t n = recv(s->get(), buf.data(), buf.size(), 0);
  buf.resize(n > 0 ? static_cast<size_t>(n) : 0);
  return buf;
}

// One TCP exchange (length-prefixed); empty on failure.
Bytes tcpAsk(int netns, const std::string& server, const Bytes& msg) {
  auto a = *SocketAddress::parse(server);
  auto s = socketIn(netns, a.family(), SOCK_STREAM);
  sockaddr_storage ss;
  socklen_t len = a.toSockaddr(&ss);
  if (!s || connect(s->get(), reinterpret_cast<sockaddr*>(&ss), len) != 0) return {};
  Bytes f = {static_cast<uint8_t>(msg.size() >> 8), static_cast<uint8_t>(msg.size())};
  f.insert(f.end(), msg.begin(), msg.end());
  send(s->get(), f.data(), f.size(), MSG_NOSIGNAL);
  Bytes got;
  uint8_t buf[4096];
  for (int i = 0; i < 40; ++i) {
    pollfd p{s->get(), POLLIN, 0};
    if (poll(&p, 1, 100) != 1) continue;
    ssize_t n = recv(s->get(), buf, sizeof(buf), 0);
    if (n <= 0) break;
    got.insert(got.end(), buf, buf + n);
    if (got.size() >= 2 && got.size() >= 2u + ((got[0] << 8) | got[1])) break;
  }
  if (got.size() < 2) return {};
  return Bytes(got.begin() + 2, got.end());
}

class DnsServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (geteuid() != 0) GTEST_SKIP() << "needs root: creates a network namespace";
    netns_ = std::make_unique<PodNetns>(
        "weft-zt-dns-", std::vector<std::string>{"10.250.0.5/32", "fd00:250::5/128"});
    ASSERT_TRUE(netns_->ok()) << "could not create a test netns";
    ASSERT_EQ(uv_loop_init(&loop_), 0);
    loop_ok_ = true;
    ZtunnelOptions o;
    o.agent_socket = "/nonexistent/weft-test.sock";
    zt_ = std::make_unique<Ztunnel>(&loop_, o);
    ASSERT_TRUE(zt_->onNodeConfig({}));
    node::v1::ClusterUpdate u;
    u.set_full(true);
    auto* s = u.add_upsert_services();
    s->set_name("web");
    s->set_namespace_("default");
    s->add_vips("10.96.0.20");
    s->add_vips("fd00:10:96::20");
    Status st = zt_->onClusterUpdate(u);
    ASSERT_TRUE(st) << st.message();
    zt_->workloads().setDnsLookupForTest([this](const DnsQueryOrigin& o) -> Result<SocketAddress> {
      origins_.push_back(o);
      return *SocketAddress::parse(kUpstream);
    });
    node::v1::Workload w;
    w.set_uid("u1");
    w.set_name("app");
    w.set_namespace_("default");
    w.add_ips("10.250.0.5");
    w.add_ips("fd00:250::5");
    st = zt_->onAddWorkload(w, netns_->dupFd());
    ASSERT_TRUE(st) << st.message();
  }
  void TearDown() override {
    if (zt_) {
      zt_->shutdown();
      uv_run(&loop_, UV_RUN_DEFAULT);
      zt_.reset();
    }
    if (loop_ok_) {
      uv_run(&loop_, UV_RUN_DEFAULT);
      EXPECT_EQ(uv_loop_close(&loop_), 0);
    }
    netns_.reset();
  }
  ZtunnelStats& stats() { return zt_->proxy().stats(); }

  uv_loop_t loop_;
  bool loop_ok_ = false;
  std::unique_ptr<PodNetns> netns_;
  std::unique_ptr<Ztunnel> zt_;
  std::vector<DnsQueryOrigin> origins_;  // touched on the loop thread only
};

TEST_F(DnsServerTest, AnswersServiceNamesOverUdpAndTcpOnBothFamilies) {
  int ns = netns_->fd();
  Bytes a4, a6, aaaa, tcp, shortname, nx;
  runWithClient(&loop_, [&] {
    a4 = udpAsk(ns, "127.0.0.1:15053", query(1, "web.default.svc.cluster.local", dns::kTypeA));
    a6 = udpAsk(ns, "[::1]:15053", query(2, "web.default.svc.cluster.local", dns::kTypeA));
    aaaa = udpAsk(ns, "127.0.0.1:15053", query(3, "web.default.svc.cluster.local", dns::kTypeAAAA));
    tcp = tcpAsk(ns, "127.0.0.1:15053", query(4, "web.default.svc.cluster.local", dns::kTypeA));
    shortname = udpAsk(ns, "127.0.0.1:15053", query(5, "web", dns::kTypeA));
    nx = udpAsk(ns, "[::1]:15053", query(6, "nope.default.svc.cluster.local", dns::kTypeA));
  });
  EXPECT_EQ(idOf(a4), 1);
  EXPECT_EQ(ancount(a4), 1);
  EXPECT_EQ(lastA(a4), "10.96.0.20");
  EXPECT_TRUE(flagsOf(a4) & dns::kFlagAA);
  EXPECT_EQ(lastA(a6), "10.96.0.20");
  EXPECT_EQ(ancount(aaaa), 1);
  EXPECT_EQ(aaaa.size() >= 16 ? aaaa[aaaa.size() - 1] : 0, 0x20);
  EXPECT_EQ(idOf(tcp), 4);
  EXPECT_EQ(lastA(tcp), "10.96.0.20");
  EXPECT_EQ(lastA(shortname), "10.96.0.20");
  EXPECT_EQ(flagsOf(nx) & 0xf, dns::kNxDomain);
  EXPECT_EQ(stats().dns_answered_locally_total, 6u);
  EXPECT_EQ(stats().dns_forwarded_total, 0u);
  EXPECT_EQ(stats().dns_tcp_connections_total, 1u);
  EXPECT_TRUE(origins_.empty());
}

TEST_F(DnsServerTest, ForwardsOtherNamesAndTruncatesWhatDoesNotFit) {
  FakeUpstream up(netns_->fd());
  ASSERT_TRUE(up.ok());
  int ns = netns_->fd();
  Bytes fwd, big, bigtcp;
  runWithClient(&loop_, [&] {
    fwd = udpAsk(ns, "127.0.0.1:15053", query(0x77, "www.example.test", dns::kTypeA));
    big = udpAsk(ns, "127.0.0.1:15053", query(0x78, "big.example.test", 16));
    bigtcp = tcpAsk(ns, "127.0.0.1:15053", query(0x79, "big.example.test", 16));
  });
  Bytes asked = query(0x77, "www.example.test", dns::kTypeA);
  ASSERT_EQ(fwd.size(), asked.size());  // the upstream's answer, relayed as it was
  EXPECT_EQ(idOf(fwd), 0x77);
  EXPECT_TRUE(flagsOf(fwd) & dns::kFlagQR);
  EXPECT_FALSE(flagsOf(fwd) & dns::kFlagAA);
  // 1000+ bytes do not fit 512 (no EDNS): header + question with TC.
  EXPECT_EQ(idOf(big), 0x78);
  EXPECT_TRUE(flagsOf(big) & dns::kFlagTC);
  EXPECT_LE(big.size(), 512u);
  // Over TCP the whole answer comes back.
  EXPECT_EQ(idOf(bigtcp), 0x79);
  EXPECT_GT(bigtcp.size(), 1000u);
  EXPECT_EQ(up.udpQueries(), 2);
  EXPECT_EQ(up.tcpQueries(), 1);
  EXPECT_EQ(stats().dns_forwarded_total, 3u);
  EXPECT_EQ(stats().dns_truncated_total, 1u);
  ASSERT_EQ(origins_.size(), 3u);
  EXPECT_FALSE(origins_[0].tcp);
  EXPECT_EQ(origins_[0].local.toString(), "127.0.0.1:15053");
  EXPECT_EQ(origins_[0].client.ip().toString(), "127.0.0.1");
  EXPECT_NE(origins_[0].netns_cookie, 0u);
  EXPECT_GE(origins_[0].diag_fd, 0);
  EXPECT_TRUE(origins_[2].tcp);
}

TEST_F(DnsServerTest, UnreachableUpstreamGetsServfail) {
  int ns = netns_->fd();  // nothing listens on 5300: ECONNREFUSED on the forward socket
  Bytes r;
  runWithClient(&loop_, [&] {
    r = udpAsk(ns, "127.0.0.1:15053", query(9, "www.example.test", dns::kTypeA));
  });
  EXPECT_EQ(idOf(r), 9);
  EXPECT_EQ(flagsOf(r) & 0xf, dns::kServFail);
  EXPECT_EQ(stats().dns_forward_failures_total, 1u);
}

TEST_F(DnsServerTest, MalformedMessagesAreDroppedCountedAndTheProxyGoesOn) {
  int ns = netns_->fd();
  std::vector<Bytes> bad = {{},
                            {1, 2, 3},
                            query(1, "a", 1),  // made a response below
                            {0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0}};
  bad[2][2] |= 0x80;
  Bytes loop = {0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1};
  bad.push_back(loop);
  std::vector<Bytes> answers;
  Bytes after, tcp_bad, after_tcp;
  runWithClient(&loop_, [&] {
    for (const auto& m : bad) answers.push_back(udpAsk(ns, "127.0.0.1:15053", m, 300));
    tcp_bad = tcpAsk(ns, "127.0.0.1:15053", Bytes{9, 9, 9, 9, 9});
    after = udpAsk(ns, "127.0.0.1:15053", query(2, "web.default.svc.cluster.local", 1));
    after_tcp = tcpAsk(ns, "[::1]:15053", query(3, "web.default.svc.cluster.local", 1));
  });
  for (size_t i = 0; i < answers.size(); ++i) EXPECT_TRUE(answers[i].empty()) << i;
  EXPECT_TRUE(tcp_bad.empty());
  EXPECT_EQ(lastA(after), "10.96.0.20");
  EXPECT_EQ(lastA(after_tcp), "10.96.0.20");
  EXPECT_EQ(stats().dns_malformed_total, bad.size() + 1);
  EXPECT_EQ(stats().dns_queries_total, bad.size() + 3);
}

}  // namespace
}  // namespace weft::ztunnel
