// Outbound redirect (cgroup/connect4|6 + sockops + cgroup/getsockopt) with real sockets: an app
// in an enrolled pod netns reaches the ztunnel's 15001 listener, which learns the original
// destination through SO_ORIGINAL_DST; and everything that must not be redirected is not.
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <cstring>

#include "bpf/abi/maps.h"
#include "common/address.h"
#include "tests/bpf/bpf_test_env.h"

namespace weft::bpftest {
namespace {

constexpr const char* kRealV4 = "10.250.0.1:8080";
constexpr const char* kRealV6 = "[fd00:250::1]:8080";

// The fake ztunnel's outbound side: accepts one connection on `listen_addr` and reports what
// getsockopt(level, SO_ORIGINAL_DST) with a `buflen` buffer says, plus an unrelated option.
int ztunnelOutbound(int out, const std::string& listen_addr, int level, socklen_t buflen,
                    int accept_ms) {
  int lfd = child::listenOn(listen_addr, /*ztunnel_mark=*/true);
  if (lfd < 0) {
    child::report(out, "listen_err", child::errText(lfd));
    return 1;
  }
  child::report(out, "ready", "1");
  int c = child::acceptWithTimeout(lfd, accept_ms);
  if (c < 0) {
    child::report(out, "accepted", "0");
    return 0;
  }
  child::report(out, "accepted", "1");
  std::vector<char> buf(buflen, 0);
  socklen_t len = buflen;
  if (getsockopt(c, level, kSoOriginalDst, buf.data(), &len) != 0) {
    child::report(out, "orig_err", strerror(errno));
  } else {
    auto sa = SocketAddress::fromSockaddr(reinterpret_cast<sockaddr*>(buf.data()), len);
    child::report(out, "orig", sa ? sa->toString() : "<unparsable>");
    child::report(out, "optlen", std::to_string(len));
  }
  // An unrelated option on the same socket must be the kernel's own answer.
  int type = 0;
  socklen_t tlen = sizeof(type);
  int rc = getsockopt(c, SOL_SOCKET, SO_TYPE, &type, &tlen);
  child::report(out, "so_type",
                rc == 0 ? std::to_string(type) + "/" + std::to_string(tlen)
                        : std::string("err ") + strerror(errno));
  tcp_info ti{};
  socklen_t tilen = sizeof(ti);
  rc = getsockopt(c, IPPROTO_TCP, TCP_INFO, &ti, &tilen);
  child::report(out, "tcp_info", rc == 0 ? std::to_string(ti.tcpi_state) : "err");
  child::writeAll(c, "ztunnel");
  close(c);
  return 0;
}

class RedirectTest : public DataplaneTest {
 protected:
  // Every event now in the pinned weft_events ring buffer.
  std::vector<weft_event> drainEvents() {
    std::vector<weft_event> events;
    UniqueFd fd(bpf_obj_get((pin_dir_ + "/maps/" + WEFT_MAP_EVENTS).c_str()));
    if (!fd.valid()) {
      ADD_FAILURE() << "open weft_events: " << strerror(errno);
      return events;
    }
    auto cb = [](void* ctx, void* data, size_t size) -> int {
      if (size >= sizeof(weft_event)) {
        weft_event ev;
        memcpy(&ev, data, sizeof(ev));
        static_cast<std::vector<weft_event>*>(ctx)->push_back(ev);
      }
      return 0;
    };
    ring_buffer* rb = ring_buffer__new(fd.get(), cb, &events, nullptr);
    if (!rb) {
      ADD_FAILURE() << "ring_buffer__new: " << strerror(errno);
      return events;
    }
    ring_buffer__consume(rb);
    ring_buffer__free(rb);
    return events;
  }

  // The real destination in the peer netns, dual-stack.
  void startRealServer() {
    spawnServer(peer_fd_.get(), false, [](int out) {
      return child::serve(out, {"0.0.0.0:8080", "[::]:8080"}, false, "real", 4, 4000);
    });
  }
};

TEST_F(RedirectTest, Connect4OfEnrolledPodReachesOutboundListenerWithOriginalDst) {
  enrollPod();
  startRealServer();
  pid_t zt = spawnServer(pod_fd_.get(), true, [](int out) {
    return ztunnelOutbound(out, "127.0.0.1:15001", IPPROTO_IP, sizeof(sockaddr_in), 4000);
  });
  auto app = run(pod_fd_.get(), true, [](int out) { return child::fetch(out, kRealV4); });
  EXPECT_EQ(app.get("reply"), "ztunnel") << app.raw;
  // The app's connected socket says the kernel connected it to the listener.
  EXPECT_EQ(app.get("peer"), "127.0.0.1:15001") << app.raw;
  auto z = wait(zt);
  EXPECT_EQ(z.get("orig"), kRealV4) << z.raw;
  EXPECT_EQ(z.get("optlen"), std::to_string(sizeof(sockaddr_in)));
  EXPECT_EQ(z.get("so_type"), std::to_string(SOCK_STREAM) + "/" + std::to_string(sizeof(int)));
  EXPECT_EQ(z.get("tcp_info"), "1");  // TCP_ESTABLISHED

  auto events = drainEvents();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].type, static_cast<uint32_t>(WEFT_EVENT_REDIRECT));
  EXPECT_EQ(events[0].netns_cookie, pod_cookie_);
  EXPECT_EQ(SocketAddress::fromAbi(events[0].dst).toString(), kRealV4);
}

TEST_F(RedirectTest, Connect6OfEnrolledPodReachesV6OutboundListener) {
  enrollPod();
  startRealServer();
  pid_t zt = spawnServer(pod_fd_.get(), true, [](int out) {
    return ztunnelOutbound(out, "[::1]:15001", IPPROTO_IPV6, sizeof(sockaddr_in6), 4000);
  });
  auto app = run(pod_fd_.get(), true, [](int out) { return child::fetch(out, kRealV6); });
  EXPECT_EQ(app.get("reply"), "ztunnel") << app.raw;
  EXPECT_EQ(app.get("peer"), "[::1]:15001");
  auto z = wait(zt);
  EXPECT_EQ(z.get("orig"), kRealV6) << z.raw;
  EXPECT_EQ(z.get("optlen"), std::to_string(sizeof(sockaddr_in6)));
}

TEST_F(RedirectTest, V4MappedConnectOnV6SocketGoesToV4Listener) {
  enrollPod();
  startRealServer();
  pid_t zt = spawnServer(pod_fd_.get(), true, [](int out) {
    return ztunnelOutbound(out, "127.0.0.1:15001", IPPROTO_IP, sizeof(sockaddr_in), 4000);
  });
  auto app = run(pod_fd_.get(), true,
                 [](int out) { return child::fetch(out, kRealV4, false, "", AF_INET6); });
  EXPECT_EQ(app.get("reply"), "ztunnel") << app.raw;
  auto z = wait(zt);
  EXPECT_EQ(z.get("orig"), kRealV4) << z.raw;
}

TEST_F(RedirectTest, LargerBufferAndSolIpv6ForV4DestinationWork) {
  enrollPod();
  startRealServer();
  // A caller with a big buffer (below a page) gets the address and the real length back.
  pid_t zt = spawnServer(pod_fd_.get(), true, [](int out) {
    return ztunnelOutbound(out, "127.0.0.1:15001", IPPROTO_IP, 512, 4000);
  });
  auto app = run(pod_fd_.get(), true, [](int out) { return child::fetch(out, kRealV4); });
  EXPECT_EQ(app.get("reply"), "ztunnel") << app.raw;
  auto z = wait(zt);
  EXPECT_EQ(z.get("orig"), kRealV4) << z.raw;
  EXPECT_EQ(z.get("optlen"), std::to_string(sizeof(sockaddr_in)));

  // SOL_IPV6 on the v4 accepted socket answers with the v4-mapped form.
  zt = spawnServer(pod_fd_.get(), true, [](int out) {
    return ztunnelOutbound(out, "127.0.0.1:15001", IPPROTO_IPV6, sizeof(sockaddr_in6), 4000);
  });
  app = run(pod_fd_.get(), true, [](int out) { return child::fetch(out, kRealV4); });
  EXPECT_EQ(app.get("reply"), "ztunnel") << app.raw;
  z = wait(zt);
  EXPECT_EQ(z.get("orig"), kRealV4) << z.raw;  // fromSockaddr folds ::ffff:a.b.c.d to IPv4
  EXPECT_EQ(z.get("optlen"), std::to_string(sizeof(sockaddr_in6)));
}

TEST_F(RedirectTest, BufferLargerThanAPageWorks) {
  enrollPod();
  startRealServer();
  // The program sees only the first page of the buffer; the answer still fits and comes back.
  pid_t zt = spawnServer(pod_fd_.get(), true, [](int out) {
    return ztunnelOutbound(out, "127.0.0.1:15001", IPPROTO_IP, 3 * 4096, 4000);
  });
  auto app = run(pod_fd_.get(), true, [](int out) { return child::fetch(out, kRealV4); });
  EXPECT_EQ(app.get("reply"), "ztunnel") << app.raw;
  auto z = wait(zt);
  EXPECT_EQ(z.get("orig"), kRealV4) << z.raw;
  EXPECT_EQ(z.get("optlen"), std::to_string(sizeof(sockaddr_in)));
}

TEST_F(RedirectTest, TooSmallBufferIsLeftToTheKernel) {
  enrollPod();
  startRealServer();
  pid_t zt = spawnServer(pod_fd_.get(), true, [](int out) {
    return ztunnelOutbound(out, "127.0.0.1:15001", IPPROTO_IP, 8, 4000);
  });
  auto app = run(pod_fd_.get(), true, [](int out) { return child::fetch(out, kRealV4); });
  EXPECT_EQ(app.get("reply"), "ztunnel") << app.raw;
  auto z = wait(zt);
  // No conntrack here: the kernel's own answer is an error, and the program keeps it.
  EXPECT_NE(z.values.count("orig_err"), 0u) << z.raw;
}

TEST_F(RedirectTest, NotEnrolledIsNotRedirected) {
  startRealServer();
  pid_t zt = spawnServer(pod_fd_.get(), true, [](int out) {
    return ztunnelOutbound(out, "127.0.0.1:15001", IPPROTO_IP, sizeof(sockaddr_in), 1000);
  });
  auto app = run(pod_fd_.get(), true, [](int out) { return child::fetch(out, kRealV4); });
  EXPECT_EQ(app.get("reply"), "real") << app.raw;
  EXPECT_EQ(app.get("peer"), kRealV4);
  EXPECT_EQ(wait(zt).get("accepted"), "0");
}

TEST_F(RedirectTest, ZtunnelMarkedSocketIsNotRedirected) {
  enrollPod();
  startRealServer();
  pid_t zt = spawnServer(pod_fd_.get(), true, [](int out) {
    return ztunnelOutbound(out, "127.0.0.1:15001", IPPROTO_IP, sizeof(sockaddr_in), 1000);
  });
  auto app4 = run(pod_fd_.get(), true, [](int out) { return child::fetch(out, kRealV4, true); });
  EXPECT_EQ(app4.get("reply"), "real") << app4.raw;
  auto app6 = run(pod_fd_.get(), true, [](int out) { return child::fetch(out, kRealV6, true); });
  EXPECT_EQ(app6.get("reply"), "real") << app6.raw;
  EXPECT_EQ(wait(zt).get("accepted"), "0");
}

TEST_F(RedirectTest, LoopbackDestinationIsNotRedirected) {
  enrollPod();
  pid_t local = spawnServer(pod_fd_.get(), true, [](int out) {
    return child::serve(out, {"127.0.0.1:8081", "[::1]:8081"}, false, "local", 3, 4000);
  });
  pid_t zt = spawnServer(pod_fd_.get(), true, [](int out) {
    return ztunnelOutbound(out, "127.0.0.1:15001", IPPROTO_IP, sizeof(sockaddr_in), 1000);
  });
  auto a = run(pod_fd_.get(), true, [](int out) { return child::fetch(out, "127.0.0.1:8081"); });
  EXPECT_EQ(a.get("reply"), "local") << a.raw;
  auto b = run(pod_fd_.get(), true, [](int out) { return child::fetch(out, "[::1]:8081"); });
  EXPECT_EQ(b.get("reply"), "local") << b.raw;
  auto c = run(pod_fd_.get(), true,
               [](int out) { return child::fetch(out, "127.0.0.1:8081", false, "", AF_INET6); });
  EXPECT_EQ(c.get("reply"), "local") << c.raw;
  EXPECT_EQ(wait(zt).get("accepted"), "0");
  EXPECT_EQ(wait(local).get("accepted"), "3");
}

TEST_F(RedirectTest, ProcessOutsideTheCgroupIsNotRedirected) {
  enrollPod();
  startRealServer();
  auto app =
      run(pod_fd_.get(), /*in_cgroup=*/false, [](int out) { return child::fetch(out, kRealV4); });
  EXPECT_EQ(app.get("reply"), "real") << app.raw;
}

TEST_F(RedirectTest, UnenrollStopsNewRedirects) {
  enrollPod();
  startRealServer();
  pid_t zt = spawnServer(pod_fd_.get(), true, [](int out) {
    return ztunnelOutbound(out, "127.0.0.1:15001", IPPROTO_IP, sizeof(sockaddr_in), 4000);
  });
  auto before = run(pod_fd_.get(), true, [](int out) { return child::fetch(out, kRealV4); });
  EXPECT_EQ(before.get("reply"), "ztunnel") << before.raw;
  EXPECT_EQ(wait(zt).get("orig"), kRealV4);

  Status st = dp_->unenroll(pod_cookie_);
  ASSERT_TRUE(st.isOk()) << st.message();
  EXPECT_TRUE(dp_->enrolled().empty());
  auto after = run(pod_fd_.get(), true, [](int out) { return child::fetch(out, kRealV4); });
  EXPECT_EQ(after.get("reply"), "real") << after.raw;
  // Idempotent.
  EXPECT_TRUE(dp_->unenroll(pod_cookie_).isOk());
}

}  // namespace
}  // namespace weft::bpftest
