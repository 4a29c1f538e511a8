// Inbound steering (sk_lookup) with real sockets: plaintext TCP to an enrolled pod reaches the
// ztunnel's 15006 listener registered through InboundListenerMap, with the original local
// address; the exemptions (ztunnel ports, 127.0.0.6, the pod itself, bypass sources) are not
// steered. Also the bind guard on the ztunnel's ports.
#include <netinet/in.h>
#include <sys/socket.h>

#include <cstring>

#include "common/address.h"
#include "common/inbound_listener_map.h"
#include "tests/bpf/bpf_test_env.h"

namespace weft::bpftest {
namespace {

class InboundTest : public DataplaneTest {
 protected:
  void SetUp() override {
    DataplaneTest::SetUp();
    if (IsSkipped() || HasFailure()) return;
    enrollPod();
  }

  // The app in the pod: dual-stack on 8080.
  pid_t startApp(int count, int accept_ms) {
    return spawnServer(pod_fd_.get(), true, [count, accept_ms](int out) {
      return child::serve(out, {"0.0.0.0:8080", "[::]:8080"}, false, "app", count, accept_ms);
    });
  }
};

TEST_F(InboundTest, PlaintextToPodIsSteeredToZtunnelKeepingLocalAddress) {
  pid_t zt = startZtunnelInbound(2, 4000);
  pid_t app = startApp(2, 1000);
  std::string v4 = std::string(kPodV4) + ":8080";
  std::string v6 = "[" + std::string(kPodV6) + "]:8080";
  auto c4 = run(peer_fd_.get(), false, [v4](int out) { return child::fetch(out, v4); });
  EXPECT_EQ(c4.get("reply"), "ztunnel-in") << c4.raw;
  auto c6 = run(peer_fd_.get(), false, [v6](int out) { return child::fetch(out, v6); });
  EXPECT_EQ(c6.get("reply"), "ztunnel-in") << c6.raw;
  auto z = wait(zt);
  EXPECT_EQ(z.get("accepted"), "2") << z.raw;
  // getsockname() on the accepted socket still gives the address the caller dialled.
  EXPECT_EQ(z.get("local0"), v4);
  EXPECT_EQ(z.get("peer0").rfind(std::string(kPeerV4) + ":", 0), 0u) << z.get("peer0");
  EXPECT_EQ(z.get("local1"), v6);
  EXPECT_EQ(wait(app).get("accepted"), "0");
}

TEST_F(InboundTest, ExemptionsKeepTheNormalLookup) {
  pid_t zt = startZtunnelInbound(5, 800);
  pid_t app = startApp(3, 4000);
  pid_t hbone = spawnServer(pod_fd_.get(), true, [](int out) {
    return child::serve(out, {"0.0.0.0:15008"}, true, "hbone", 1, 4000);
  });
  std::string pod8080 = std::string(kPodV4) + ":8080";

  // To a ztunnel port (HBONE).
  auto h = run(peer_fd_.get(), false,
               [](int out) { return child::fetch(out, std::string(kPodV4) + ":15008"); });
  EXPECT_EQ(h.get("reply"), "hbone") << h.raw;

  // From 127.0.0.6: the ztunnel's own connection to the app (marked, as the ztunnel's are).
  auto p = run(pod_fd_.get(), true,
               [pod8080](int out) { return child::fetch(out, pod8080, true, "127.0.0.6:0"); });
  EXPECT_EQ(p.get("reply"), "app") << p.raw;

  // From the pod's own address (the pod to itself; the ztunnel's IPv6 path).
  auto self = run(pod_fd_.get(), true, [pod8080](int out) {
    return child::fetch(out, pod8080, true, std::string(kPodV4) + ":0");
  });
  EXPECT_EQ(self.get("reply"), "app") << self.raw;

  // From a bypass source (the node's kubelet probes).
  Status st = dp_->setInboundBypass({*IpAddr::parse(kPeerV4)});
  ASSERT_TRUE(st.isOk()) << st.message();
  auto fetchPod = [pod8080](int out) { return child::fetch(out, pod8080); };
  auto probe = run(peer_fd_.get(), false, fetchPod);
  EXPECT_EQ(probe.get("reply"), "app") << probe.raw;

  // Bypass replaced: the peer is steered again.
  st = dp_->setInboundBypass({*IpAddr::parse("10.250.0.99")});
  ASSERT_TRUE(st.isOk()) << st.message();
  auto again = run(peer_fd_.get(), false, fetchPod);
  EXPECT_EQ(again.get("reply"), "ztunnel-in") << again.raw;

  EXPECT_EQ(wait(app).get("accepted"), "3");
  EXPECT_EQ(wait(hbone).get("accepted"), "1");
  EXPECT_EQ(wait(zt).get("accepted"), "1");
}

TEST_F(InboundTest, NoRegisteredListenerMeansNormalLookupAndRemoveIsIdempotent) {
  pid_t app = startApp(2, 4000);
  std::string pod8080 = std::string(kPodV4) + ":8080";
  auto c = run(peer_fd_.get(), false, [pod8080](int out) { return child::fetch(out, pod8080); });
  EXPECT_EQ(c.get("reply"), "app") << c.raw;

  auto map = InboundListenerMap::open(pin_dir_);
  ASSERT_TRUE(map.isOk()) << map.status().message();
  EXPECT_TRUE(map->remove(*IpAddr::parse(kPodV4)).isOk());
  EXPECT_TRUE(map->remove(*IpAddr::parse(kPodV4)).isOk());
  // A socket that is not listening cannot be registered.
  int s = socket(AF_INET, SOCK_STREAM, 0);
  EXPECT_FALSE(map->add(*IpAddr::parse(kPodV4), s).isOk());
  close(s);

  auto c2 = run(peer_fd_.get(), false, [pod8080](int out) { return child::fetch(out, pod8080); });
  EXPECT_EQ(c2.get("reply"), "app") << c2.raw;
  EXPECT_EQ(wait(app).get("accepted"), "2");
}

TEST_F(InboundTest, UnenrollStopsSteering) {
  pid_t zt = startZtunnelInbound(1, 1000);
  pid_t app = startApp(1, 4000);
  Status st = dp_->unenroll(pod_cookie_);
  ASSERT_TRUE(st.isOk()) << st.message();
  std::string pod8080 = std::string(kPodV4) + ":8080";
  auto c = run(peer_fd_.get(), false, [pod8080](int out) { return child::fetch(out, pod8080); });
  EXPECT_EQ(c.get("reply"), "app") << c.raw;
  EXPECT_EQ(wait(app).get("accepted"), "1");
  EXPECT_EQ(wait(zt).get("accepted"), "0");
}

// bind() of a ztunnel port inside an enrolled pod: EPERM unless the socket has the mark.
int tryBind(int out, const std::string& key, const std::string& addr, bool mark) {
  auto sa = SocketAddress::parse(addr);
  int fd = socket(sa->family(), SOCK_STREAM, 0);
  uint32_t m = 0x539;
  if (mark) setsockopt(fd, SOL_SOCKET, SO_MARK, &m, sizeof(m));
  sockaddr_storage ss;
  socklen_t len = sa->toSockaddr(&ss);
  int rc = bind(fd, reinterpret_cast<sockaddr*>(&ss), len);
  child::report(out, key, rc == 0 ? "ok" : strerror(errno));
  close(fd);
  return 0;
}

TEST_F(InboundTest, BindGuardProtectsZtunnelPortsInEnrolledPods) {
  auto r = run(pod_fd_.get(), true, [](int out) {
    tryBind(out, "v4_15006", "0.0.0.0:15006", false);
    tryBind(out, "v4_15001", "127.0.0.1:15001", false);
    tryBind(out, "v6_15008", "[::]:15008", false);
    tryBind(out, "v6_15053", "[::1]:15053", false);
    tryBind(out, "v4_15006_marked", "0.0.0.0:15006", true);
    tryBind(out, "v6_15008_marked", "[::]:15008", true);
    tryBind(out, "v4_8080", "0.0.0.0:8080", false);
    return 0;
  });
  std::string eperm = strerror(EPERM);
  EXPECT_EQ(r.get("v4_15006"), eperm) << r.raw;
  EXPECT_EQ(r.get("v4_15001"), eperm);
  EXPECT_EQ(r.get("v6_15008"), eperm);
  EXPECT_EQ(r.get("v6_15053"), eperm);
  EXPECT_EQ(r.get("v4_15006_marked"), "ok");
  EXPECT_EQ(r.get("v6_15008_marked"), "ok");
  EXPECT_EQ(r.get("v4_8080"), "ok");

  // A netns that is not enrolled (the peer), same cgroup: no guard.
  auto p = run(peer_fd_.get(), true,
               [](int out) { return tryBind(out, "v4_15006", "0.0.0.0:15006", false); });
  EXPECT_EQ(p.get("v4_15006"), "ok") << p.raw;
}

}  // namespace
}  // namespace weft::bpftest
