// DNS capture with real sockets in throwaway namespaces: UDP and TCP to port 53 from an enrolled
// pod reach a fake DNS proxy on 15053 in the pod's netns (connect4/6, sendmsg4/6), the proxy
// finds the resolver the app asked through sock_diag + weft_dns_dst (the ztunnel's own lookup
// code), and its answer reaches the app with the resolver's address as source (recvmsg4/6).
// And what must not be captured is not.
#include <arpa/inet.h>
#include <linux/netlink.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <bpf/bpf.h>

#include <cstring>

#include "bpf/abi/maps.h"
#include "bpf/abi/ports.h"
#include "common/address.h"
#include "common/netns.h"
#include "tests/bpf/bpf_test_env.h"
#include "ztunnel/dns.h"

namespace weft::bpftest {
namespace {

constexpr const char* kResolverV4 = "10.250.0.1:53";
constexpr const char* kResolverV6 = "[fd00:250::1]:53";

// Binds a UDP socket on `addr` (marked as the ztunnel's if asked). -errno on failure.
int udpBind(const std::string& addr, bool ztunnel_mark) {
  auto sa = SocketAddress::parse(addr);
  if (!sa) return -EINVAL;
  int fd = socket(sa->family(), SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  int one = 1;
  uint32_t mark = WEFT_ZTUNNEL_MARK;
  if (ztunnel_mark && setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) != 0) goto fail;
  if (sa->family() == AF_INET6 && setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)))
    goto fail;
  {
    sockaddr_storage ss;
    socklen_t len = sa->toSockaddr(&ss);
    if (bind(fd, reinterpret_cast<sockaddr*>(&ss), len) != 0) goto fail;
  }
  return fd;
fail:
  int err = errno;
  close(fd);
  return -err;
}

bool readable(int fd, int ms) {
  pollfd p{fd, POLLIN, 0};
  return poll(&p, 1, ms) == 1;
}

sockaddr_storage toStorage(const std::string& addr, int family, socklen_t* len) {
  auto sa = SocketAddress::parse(addr);
  sockaddr_storage ss{};
  if (family == AF_INET6 && sa->ip().isV4()) {
    auto* in6 = reinterpret_cast<sockaddr_in6*>(&ss);
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons(sa->port());
    in6->sin6_addr.s6_addr[10] = 0xff;
    in6->sin6_addr.s6_addr[11] = 0xff;
    memcpy(&in6->sin6_addr.s6_addr[12], &sa->ip().v4addr(), 4);
    *len = sizeof(*in6);
  } else {
    *len = sa->toSockaddr(&ss);
  }
  return ss;
}

// The fake DNS proxy (UDP): one datagram on `listen`, reports its source and the resolver the
// ztunnel's lookup finds for it, answers "answer" (or reports got=0).
int fakeUdpProxy(int out, const std::string& listen, const std::string& pin_dir, int wait_ms) {
  int fd = udpBind(listen, true);
  if (fd < 0) {
    child::report(out, "listen_err", child::errText(fd));
    return 1;
  }
  child::report(out, "ready", "1");
  if (!readable(fd, wait_ms)) {
    child::report(out, "got", "0");
    return 0;
  }
  char buf[512];
  sockaddr_storage from{};
  socklen_t flen = sizeof(from);
  ssize_t n = recvfrom(fd, buf, sizeof(buf), 0, reinterpret_cast<sockaddr*>(&from), &flen);
  if (n < 0) return 2;
  auto src = SocketAddress::fromSockaddr(reinterpret_cast<sockaddr*>(&from), flen);
  child::report(out, "got", std::string(buf, n));
  child::report(out, "src", src ? src->toString() : "?");
  auto lookup = ztunnel::openBpfResolverLookup(pin_dir);
  auto diag = socketIn(-1, AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
  auto cookie = currentNetnsCookie();
  if (!lookup || !diag || !cookie) {
    child::report(out, "resolver", "setup failed");
  } else {
    ztunnel::DnsQueryOrigin o;
    o.netns_cookie = *cookie;
    o.diag_fd = diag->get();
    o.client = *src;
    o.local = *SocketAddress::parse(listen);
    auto r = (*lookup)(o);
    child::report(out, "resolver", r ? r->toString() : "error " + r.status().message());
  }
  sendto(fd, "answer", 6, 0, reinterpret_cast<sockaddr*>(&from), flen);
  close(fd);
  return 0;
}

// The app: a UDP query to `target`, connected first (glibc) or with sendto (musl), from a socket
// of `family`; reports the answer and the source address recvfrom gave.
int udpApp(int out, const std::string& target, bool connected, int family, bool mark = false) {
  int fd = socket(family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return 1;
  uint32_t m = WEFT_ZTUNNEL_MARK;
  if (mark) setsockopt(fd, SOL_SOCKET, SO_MARK, &m, sizeof(m));
  socklen_t len;
  sockaddr_storage ss = toStorage(target, family, &len);
  if (connected) {
    if (connect(fd, reinterpret_cast<sockaddr*>(&ss), len) != 0) {
      child::report(out, "err", std::string("connect: ") + strerror(errno));
      return 0;
    }
    auto peer = peerAddress(fd);
    child::report(out, "peer", peer ? peer->toString() : "?");
    if (send(fd, "query", 5, 0) != 5) child::report(out, "err", strerror(errno));
  } else if (sendto(fd, "query", 5, 0, reinterpret_cast<sockaddr*>(&ss), len) != 5) {
    child::report(out, "err", std::string("sendto: ") + strerror(errno));
    return 0;
  }
  if (!readable(fd, 3000)) {
    child::report(out, "reply", "<none>");
    return 0;
  }
  char buf[512];
  sockaddr_storage from{};
  socklen_t flen = sizeof(from);
  ssize_t n = recvfrom(fd, buf, sizeof(buf), 0, reinterpret_cast<sockaddr*>(&from), &flen);
  if (n < 0) {
    child::report(out, "reply", std::string("<error ") + strerror(errno) + ">");
    return 0;
  }
  auto src = SocketAddress::fromSockaddr(reinterpret_cast<sockaddr*>(&from), flen);
  child::report(out, "reply", std::string(buf, n));
  child::report(out, "from", src ? src->toString() : "?");
  close(fd);
  return 0;
}

// A real resolver in the peer netns: answers "real" to one datagram on each address.
int realUdpServer(int out, const std::vector<std::string>& addrs, int wait_ms) {
  std::vector<int> fds;
  for (const auto& a : addrs) {
    int fd = udpBind(a, false);
    if (fd < 0) {
      child::report(out, "listen_err", a + ": " + child::errText(fd));
      return 1;
    }
    fds.push_back(fd);
  }
  child::report(out, "ready", "1");
  int got = 0;
  std::vector<pollfd> p;
  for (int fd : fds) p.push_back(pollfd{fd, POLLIN, 0});
  while (poll(p.data(), p.size(), wait_ms) > 0) {
    for (auto& e : p) {
      if (!(e.revents & POLLIN)) continue;
      char buf[512];
      sockaddr_storage from{};
      socklen_t flen = sizeof(from);
      ssize_t n = recvfrom(e.fd, buf, sizeof(buf), 0, reinterpret_cast<sockaddr*>(&from), &flen);
      if (n < 0) continue;
      ++got;
      sendto(e.fd, "real", 4, 0, reinterpret_cast<sockaddr*>(&from), flen);
    }
  }
  child::report(out, "got", std::to_string(got));
  return 0;
}

class DnsRedirectTest : public DataplaneTest {
 protected:
  pid_t startProxy(const std::string& listen, int wait_ms = 4000) {
    std::string pins = pin_dir_;
    return spawnServer(pod_fd_.get(), true, [listen, pins, wait_ms](int out) {
      return fakeUdpProxy(out, listen, pins, wait_ms);
    });
  }
  pid_t startReal(int wait_ms = 1500) {
    return spawnServer(peer_fd_.get(), false, [wait_ms](int out) {
      return realUdpServer(out, {"10.250.0.1:53", "[fd00:250::1]:53", "10.250.0.1:5353"}, wait_ms);
    });
  }
};

TEST_F(DnsRedirectTest, ConnectedUdp4QueryReachesProxyAndAnswerComesFromTheResolver) {
  enrollPod();
  pid_t proxy = startProxy("127.0.0.1:15053");
  auto app = run(pod_fd_.get(), true,
                 [](int out) { return udpApp(out, kResolverV4, /*connected=*/true, AF_INET); });
  EXPECT_EQ(app.get("peer"), "127.0.0.1:15053") << app.raw;  // the socket is the proxy's now
  EXPECT_EQ(app.get("reply"), "answer") << app.raw;
  EXPECT_EQ(app.get("from"), kResolverV4) << app.raw;
  auto p = wait(proxy);
  EXPECT_EQ(p.get("got"), "query") << p.raw;
  EXPECT_EQ(p.get("src").rfind("127.0.0.1:", 0), 0u) << p.raw;
  EXPECT_EQ(p.get("resolver"), kResolverV4) << p.raw;
}

TEST_F(DnsRedirectTest, UnconnectedUdp4QueryIsCapturedBySendmsg) {
  enrollPod();
  pid_t proxy = startProxy("127.0.0.1:15053");
  auto app = run(pod_fd_.get(), true,
                 [](int out) { return udpApp(out, kResolverV4, /*connected=*/false, AF_INET); });
  EXPECT_EQ(app.get("reply"), "answer") << app.raw;
  EXPECT_EQ(app.get("from"), kResolverV4) << app.raw;
  auto p = wait(proxy);
  EXPECT_EQ(p.get("resolver"), kResolverV4) << p.raw;
}

TEST_F(DnsRedirectTest, Udp6ConnectedAndUnconnected) {
  enrollPod();
  for (bool connected : {true, false}) {
    pid_t proxy = startProxy("[::1]:15053");
    auto app = run(pod_fd_.get(), true,
                   [connected](int out) { return udpApp(out, kResolverV6, connected, AF_INET6); });
    EXPECT_EQ(app.get("reply"), "answer") << connected << ": " << app.raw;
    EXPECT_EQ(app.get("from"), kResolverV6) << connected << ": " << app.raw;
    auto p = wait(proxy);
    EXPECT_EQ(p.get("src").rfind("[::1]:", 0), 0u) << p.raw;
    EXPECT_EQ(p.get("resolver"), kResolverV6) << connected << ": " << p.raw;
  }
}

TEST_F(DnsRedirectTest, V4MappedQueryOnV6SocketGoesToTheV4Proxy) {
  enrollPod();
  for (bool connected : {true, false}) {
    pid_t proxy = startProxy("127.0.0.1:15053");
    auto app = run(pod_fd_.get(), true,
                   [connected](int out) { return udpApp(out, kResolverV4, connected, AF_INET6); });
    EXPECT_EQ(app.get("reply"), "answer") << connected << ": " << app.raw;
    EXPECT_EQ(app.get("from"), kResolverV4) << connected << ": " << app.raw;  // ::ffff: folded
    auto p = wait(proxy);
    EXPECT_EQ(p.get("resolver"), kResolverV4) << connected << ": " << p.raw;
  }
}

TEST_F(DnsRedirectTest, TcpToPort53GoesToTheProxyWithItsOriginalDestination) {
  enrollPod();
  std::string pins = pin_dir_;
  pid_t proxy = spawnServer(pod_fd_.get(), true, [pins](int out) {
    int lfd = child::listenOn("127.0.0.1:15053", true);
    if (lfd < 0) return 1;
    child::report(out, "ready", "1");
    int c = child::acceptWithTimeout(lfd, 4000);
    if (c < 0) return 2;
    auto peer = peerAddress(c);
    auto lookup = ztunnel::openBpfResolverLookup(pins);
    auto cookie = currentNetnsCookie();
    if (lookup && cookie && peer) {
      ztunnel::DnsQueryOrigin o;
      o.netns_cookie = *cookie;
      o.tcp = true;
      o.client = *peer;
      o.local = *SocketAddress::parse("127.0.0.1:15053");
      auto r = (*lookup)(o);
      child::report(out, "resolver", r ? r->toString() : "error " + r.status().message());
    }
    child::writeAll(c, "dns-tcp");
    close(c);
    return 0;
  });
  auto app = run(pod_fd_.get(), true, [](int out) { return child::fetch(out, kResolverV4); });
  EXPECT_EQ(app.get("reply"), "dns-tcp") << app.raw;
  EXPECT_EQ(app.get("peer"), "127.0.0.1:15053") << app.raw;
  EXPECT_EQ(wait(proxy).get("resolver"), kResolverV4);
}

TEST_F(DnsRedirectTest, NotEnrolledMarkedOtherPortAndLoopbackAreNotCaptured) {
  pid_t proxy = startProxy("127.0.0.1:15053", 2500);
  pid_t real = startReal(2500);
  // Not enrolled yet: the real resolver answers.
  auto a =
      run(pod_fd_.get(), true, [](int out) { return udpApp(out, kResolverV4, true, AF_INET); });
  EXPECT_EQ(a.get("reply"), "real") << a.raw;
  EXPECT_EQ(a.get("from"), kResolverV4);
  enrollPod();
  // The ztunnel's own sockets (mark 0x539) and other ports go where they were sent.
  auto b = run(pod_fd_.get(), true,
               [](int out) { return udpApp(out, kResolverV4, false, AF_INET, /*mark=*/true); });
  EXPECT_EQ(b.get("reply"), "real") << b.raw;
  auto c = run(pod_fd_.get(), true,
               [](int out) { return udpApp(out, "10.250.0.1:5353", true, AF_INET); });
  EXPECT_EQ(c.get("reply"), "real") << c.raw;
  // A process outside the cgroup is not seen by the hooks.
  auto d =
      run(pod_fd_.get(), false, [](int out) { return udpApp(out, kResolverV6, false, AF_INET6); });
  EXPECT_EQ(d.get("reply"), "real") << d.raw;
  EXPECT_EQ(wait(proxy).get("got"), "0");
  EXPECT_EQ(wait(real).get("got"), "4");

  // A resolver on the pod's own loopback (a local cache) stays local.
  pid_t local = spawnServer(pod_fd_.get(), true,
                            [](int out) { return realUdpServer(out, {"127.0.0.53:53"}, 1500); });
  auto e =
      run(pod_fd_.get(), true, [](int out) { return udpApp(out, "127.0.0.53:53", true, AF_INET); });
  EXPECT_EQ(e.get("reply"), "real") << e.raw;
  EXPECT_EQ(wait(local).get("got"), "1");
}

TEST_F(DnsRedirectTest, UnenrollStopsCaptureAndAppsCannotBindTheDnsPort) {
  enrollPod();
  // bind_guard: 15053 is the ztunnel's, for UDP as for TCP.
  auto b = run(pod_fd_.get(), true, [](int out) {
    int fd = udpBind("127.0.0.1:15053", false);
    child::report(out, "bind", fd < 0 ? child::errText(fd) : "ok");
    return 0;
  });
  EXPECT_EQ(b.get("bind"), strerror(EPERM)) << b.raw;
  ASSERT_TRUE(dp_->unenroll(pod_cookie_).isOk());
  pid_t real = startReal(1500);
  auto a =
      run(pod_fd_.get(), true, [](int out) { return udpApp(out, kResolverV4, false, AF_INET); });
  EXPECT_EQ(a.get("reply"), "real") << a.raw;
  EXPECT_EQ(wait(real).get("got"), "1");
}

// The app's UDP socket sends a query (captured: weft_dns_dst gets its entry), then closes:
// cgroup/sock_release deletes the entry at once, for unconnected (sendmsg) and connected
// (connect) sockets alike. A socket that stays open keeps its entry.
int dnsEntryLifetime(int out, const std::string& pins, uint64_t netns_cookie, bool connected) {
  int map = bpf_obj_get((pins + "/maps/" WEFT_MAP_DNS_DST).c_str());
  if (map < 0) {
    child::report(out, "err", std::string("bpf_obj_get: ") + strerror(errno));
    return 1;
  }
  auto present = [&](uint64_t cookie) {
    weft_dns_key key{cookie, netns_cookie};
    weft_sockaddr val{};
    return bpf_map_lookup_elem(map, &key, &val) == 0 ? std::string("present")
                                                     : std::string("absent");
  };
  auto query = [&]() -> int {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    socklen_t len;
    sockaddr_storage ss = toStorage(kResolverV4, AF_INET, &len);
    int rc = connected ? connect(fd, reinterpret_cast<sockaddr*>(&ss), len) == 0 &&
                                 send(fd, "query", 5, 0) == 5
                       : sendto(fd, "query", 5, 0, reinterpret_cast<sockaddr*>(&ss), len) == 5;
    if (!rc) child::report(out, "err", strerror(errno));
    return fd;
  };
  auto cookieOf = [](int fd) {
    uint64_t c = 0;
    socklen_t l = sizeof(c);
    getsockopt(fd, SOL_SOCKET, SO_COOKIE, &c, &l);
    return c;
  };
  int kept = query();
  int closing = query();
  uint64_t kept_cookie = cookieOf(kept), closing_cookie = cookieOf(closing);
  child::report(out, "before", present(closing_cookie));
  close(closing);
  child::report(out, "after", present(closing_cookie));
  child::report(out, "kept", present(kept_cookie));
  close(kept);
  child::report(out, "kept_after", present(kept_cookie));
  close(map);
  return 0;
}

TEST_F(DnsRedirectTest, ClosingTheSocketDeletesItsResolverEntry) {
  enrollPod();
  const std::string pins = pin_dir_;
  const uint64_t cookie = pod_cookie_;
  for (bool connected : {false, true}) {
    auto app = run(pod_fd_.get(), true, [pins, cookie, connected](int out) {
      return dnsEntryLifetime(out, pins, cookie, connected);
    });
    SCOPED_TRACE(connected ? "connected" : "unconnected");
    EXPECT_EQ(app.values.count("err"), 0u) << app.raw;
    EXPECT_EQ(app.get("before"), "present") << app.raw;
    EXPECT_EQ(app.get("after"), "absent") << app.raw;
    EXPECT_EQ(app.get("kept"), "present") << app.raw;
    EXPECT_EQ(app.get("kept_after"), "absent") << app.raw;
  }
}

}  // namespace
}  // namespace weft::bpftest
