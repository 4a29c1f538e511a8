// Local-hop acceleration with real sockets: both ends of an enrolled pod's app <-> ztunnel
// loopback connections enter weft_hop_socks and leave it on close, sends are redirected to the
// peer, and byte order, half-close, reset, large random data and poll/epoll readiness are exact.
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <openssl/sha.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <iostream>
#include <chrono>
#include <cstring>
#include <random>

#include "bpf/abi/maps.h"
#include "bpf/abi/ports.h"
#include "common/address.h"
#include "common/netns.h"
#include "tests/bpf/bpf_test_env.h"

namespace weft::bpftest {
namespace {

std::string randomBytes(std::mt19937_64& rng, size_t n) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; i += 8) {
    uint64_t v = rng();
    memcpy(&s[i], &v, std::min<size_t>(8, n - i));
  }
  return s;
}

void setNonblocking(int fd, bool on) {
  int flags = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, on ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK));
}

// One hop inside the child's netns: the "ztunnel" listener, the app's socket, the accepted one.
struct Hop {
  UniqueFd listener;
  UniqueFd app;
  UniqueFd zt;
  std::string error;
};

// listen_addr: where the ztunnel listens (or, for the inbound hop, the app); connect_addr: what
// the client connects to; source: the client's bind address ("" = any). For the inbound hop the
// roles swap (the ztunnel connects from 127.0.0.6 to the app): zt_connects = true.
Hop makeHop(const std::string& listen_addr, const std::string& connect_addr,
            const std::string& source = "", bool zt_connects = false) {
  Hop h;
  int l = child::listenOn(listen_addr, !zt_connects);
  if (l < 0) {
    h.error = "listen " + listen_addr + ": " + child::errText(l);
    return h;
  }
  h.listener.reset(l);
  int c = child::connectTo(connect_addr, zt_connects, source);
  if (c < 0) {
    h.error = "connect " + connect_addr + ": " + child::errText(c);
    return h;
  }
  int a = child::acceptWithTimeout(l, 3000);
  if (a < 0) {
    h.error = "accept: " + child::errText(a);
    close(c);
    return h;
  }
  h.app.reset(zt_connects ? a : c);
  h.zt.reset(zt_connects ? c : a);
  return h;
}

// In a child: reports why `h` could not be made (key "error", shown with the child's report)
// and returns false; true if it was made.
bool hopMade(int out, const Hop& h) {
  if (h.error.empty()) return true;
  child::report(out, "error", h.error);
  return false;
}

UniqueFd openMap(const std::string& pin_dir, const char* name) {
  return UniqueFd(bpf_obj_get((pin_dir + "/maps/" + name).c_str()));
}

std::vector<weft_hop_key> hopKeys(int map_fd) {
  std::vector<weft_hop_key> keys;
  weft_hop_key key{}, next{};
  const void* prev = nullptr;
  while (keys.size() < 1000 && bpf_map_get_next_key(map_fd, prev, &next) == 0) {
    keys.push_back(next);
    key = next;
    prev = &key;
  }
  return keys;
}

// Waits (bounded) until the map holds `want` sockets; returns the last count seen.
size_t waitHopCount(int map_fd, size_t want, int timeout_ms) {
  int64_t deadline = nowMs() + timeout_ms;
  size_t n = hopKeys(map_fd).size();
  while (n != want && nowMs() < deadline) {
    usleep(10000);
    n = hopKeys(map_fd).size();
  }
  return n;
}

// Reads exactly `n` bytes or until EOF/error/`timeout_ms` of silence (blocking fd, poll first).
std::string readN(int fd, size_t n, int timeout_ms) {
  std::string out;
  char buf[65536];
  while (out.size() < n) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) != 1) break;
    ssize_t r = read(fd, buf, std::min(sizeof(buf), n - out.size()));
    if (r <= 0) break;
    out.append(buf, static_cast<size_t>(r));
  }
  return out;
}

// Reads to EOF. Returns bytes read; *end = "eof", "timeout" or the errno text.
std::string readToEnd(int fd, int timeout_ms, std::string* end) {
  std::string out;
  char buf[65536];
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) != 1) {
      *end = "timeout";
      return out;
    }
    ssize_t r = read(fd, buf, sizeof(buf));
    if (r == 0) {
      *end = "eof";
      return out;
    }
    if (r < 0) {
      if (errno == EAGAIN || errno == EINTR) continue;
      *end = strerror(errno);
      return out;
    }
    out.append(buf, static_cast<size_t>(r));
  }
}

// Writes everything (blocking fd, short writes retried). False on error.
bool writeAllBlocking(int fd, const std::string& data) {
  size_t off = 0;
  while (off < data.size()) {
    ssize_t w = write(fd, data.data() + off, data.size() - off);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    off += static_cast<size_t>(w);
  }
  return true;
}

enum class Readiness { kPoll, kEpollLevel, kEpollEdge };

// Both directions at once on nonblocking sockets driven by poll or epoll: random write sizes,
// shutdown(SHUT_WR) after the last byte, reads until EOF. Fails on a stall (no readiness for
// 5 s while work remains: a lost wakeup) or an error. got[0] = what the app read, got[1] what the
// ztunnel read.
bool pumpBothWays(int app, int zt, const std::string& to_zt, const std::string& to_app,
                  Readiness mode, std::mt19937_64& rng, std::string got[2], std::string* why,
                  uint64_t* spurious) {
  int fds[2] = {app, zt};
  const std::string* out[2] = {&to_zt, &to_app};
  size_t sent[2] = {0, 0};
  bool shut[2] = {false, false};
  bool eof[2] = {false, false};
  int last_errno[2] = {0, 0};
  std::uniform_int_distribution<size_t> size_dist(1, 256 * 1024);
  std::vector<char> buf(256 * 1024);
  for (int fd : fds) setNonblocking(fd, true);
  UniqueFd ep;
  if (mode != Readiness::kPoll) {
    ep.reset(epoll_create1(EPOLL_CLOEXEC));
    for (int i = 0; i < 2; ++i) {
      epoll_event ev{};
      ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | (mode == Readiness::kEpollEdge ? uint32_t{EPOLLET} : 0u);
      ev.data.u32 = static_cast<uint32_t>(i);
      if (epoll_ctl(ep.get(), EPOLL_CTL_ADD, fds[i], &ev) != 0) {
        *why = std::string("epoll_ctl: ") + strerror(errno);
        return false;
      }
    }
  }
  const bool drain = mode == Readiness::kEpollEdge;  // edge-triggered: until EAGAIN
  int64_t deadline = nowMs() + 120000;
  while (!(eof[0] && eof[1])) {
    if (nowMs() > deadline) {
      *why = "not done after 120 s";
      return false;
    }
    bool readable[2] = {false, false}, writable[2] = {false, false};
    if (mode == Readiness::kPoll) {
      pollfd p[2];
      for (int i = 0; i < 2; ++i) {
        p[i] = {fds[i], static_cast<short>((eof[i] ? 0 : POLLIN) | (shut[i] ? 0 : POLLOUT)), 0};
      }
      int n = poll(p, 2, 5000);
      if (n == 0) {
        *why = fmt::format("stall: no readiness for 5 s (sent {} {}, got {} {}, last write "
                           "errno {} {})", sent[0], sent[1], got[0].size(), got[1].size(),
                           last_errno[0], last_errno[1]);
        return false;
      }
      for (int i = 0; i < 2; ++i) {
        readable[i] = p[i].revents & (POLLIN | POLLHUP | POLLERR);
        writable[i] = p[i].revents & (POLLOUT | POLLERR);
      }
    } else {
      epoll_event evs[2];
      int n = epoll_wait(ep.get(), evs, 2, 5000);
      if (n == 0) {
        pollfd p[2] = {{fds[0], POLLIN | POLLOUT, 0}, {fds[1], POLLIN | POLLOUT, 0}};
        poll(p, 2, 0);
        *why = fmt::format(
            "stall: no epoll event for 5 s (sent {} {}, got {} {}, last write errno {} {}, "
            "poll() now says {:#x} {:#x})",
            sent[0], sent[1], got[0].size(), got[1].size(), last_errno[0], last_errno[1],
            p[0].revents, p[1].revents);
        return false;
      }
      for (int k = 0; k < n; ++k) {
        uint32_t i = evs[k].data.u32;
        readable[i] = evs[k].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR);
        writable[i] = evs[k].events & (EPOLLOUT | EPOLLERR);
      }
    }
    for (int i = 0; i < 2; ++i) {
      while (writable[i] && !shut[i]) {
        size_t n = std::min(size_dist(rng), out[i]->size() - sent[i]);
        ssize_t w = n ? write(fds[i], out[i]->data() + sent[i], n) : 0;
        if (w < 0) {
          last_errno[i] = errno;
          if (errno == EAGAIN) break;
          *why = fmt::format("write {}: {}", i ? "ztunnel" : "app", strerror(errno));
          return false;
        }
        sent[i] += static_cast<size_t>(w);
        if (sent[i] == out[i]->size()) {
          if (shutdown(fds[i], SHUT_WR) != 0) {
            *why = std::string("shutdown: ") + strerror(errno);
            return false;
          }
          shut[i] = true;
        }
        if (!drain) break;
      }
      bool first = true;
      while (readable[i] && !eof[i]) {
        ssize_t r = read(fds[i], buf.data(), buf.size());
        if (r < 0) {
          if (errno == EAGAIN) {
            if (first) ++*spurious;
            break;
          }
          *why = fmt::format("read {}: {}", i ? "ztunnel" : "app", strerror(errno));
          return false;
        }
        first = false;
        if (r == 0) {
          eof[i] = true;
          break;
        }
        got[i].append(buf.data(), static_cast<size_t>(r));
        if (!drain) break;
      }
    }
    // Level-triggered watchers ask only for what is still to do on each side (else a writable
    // socket with nothing to write would report forever); edge-triggered ones report changes.
    if (mode == Readiness::kEpollLevel) {
      for (int i = 0; i < 2; ++i) {
        if (eof[i] && shut[i]) {
          epoll_ctl(ep.get(), EPOLL_CTL_DEL, fds[i], nullptr);  // ENOENT after the first time
          continue;
        }
        epoll_event ev{};
        ev.events = (eof[i] ? 0u : uint32_t{EPOLLIN | EPOLLRDHUP}) |
                    (shut[i] ? 0u : uint32_t{EPOLLOUT});
        ev.data.u32 = static_cast<uint32_t>(i);
        epoll_ctl(ep.get(), EPOLL_CTL_MOD, fds[i], &ev);
      }
    }
  }
  return true;
}

class LocalHopTest : public DataplaneTest {
 protected:
  void SetUp() override {
    DataplaneTest::SetUp();
    if (IsSkipped() || HasFailure()) return;
    ASSERT_NO_FATAL_FAILURE(enrollPod());
    Status st = dp_->setLocalHopAccel(true);
    ASSERT_TRUE(st.isOk()) << st.message();
  }

  uint64_t stat(const std::string& name) {
    auto hs = dp_->localHop();
    EXPECT_TRUE(hs.isOk()) << hs.status().message();
    if (!hs.isOk()) return ~0ull;
    for (const auto& [n, v] : hs.value().counters)
      if (n == name) return v;
    ADD_FAILURE() << "no counter " << name;
    return ~0ull;
  }

  // Runs fn in a child inside the pod netns and the test cgroup and expects exit 0.
  ChildResult runInPod(std::function<int(int out)> fn, int timeout_ms = 8000) {
    pid_t pid = spawn(pod_fd_.get(), true, std::move(fn));
    return wait(pid, timeout_ms);
  }
};

// The outbound hop as the data path makes it: an app's connect() to a remote address is sent to
// the ztunnel's 127.0.0.1:15001 by cgroup/connect4; both ends enter the map (keyed by this netns
// and their own view of the 4-tuple), sends are redirected both ways, and close removes them.
TEST_F(LocalHopTest, RedirectedConnectionBothEndsMappedAndRemovedOnClose) {
  std::string pin = pin_dir_;
  uint64_t cookie = pod_cookie_;
  ChildResult r = runInPod([pin, cookie](int out) {
    Hop h = makeHop("127.0.0.1:15001", std::string(kPeerV4) + ":80");
    if (!hopMade(out, h)) return 1;
    UniqueFd map = openMap(pin, WEFT_MAP_HOP_SOCKS);
    auto keys = hopKeys(map.get());
    child::report(out, "entries", std::to_string(keys.size()));
    int zt_side = 0, app_side = 0, right_cookie = 0;
    for (const auto& k : keys) {
      right_cookie += k.netns_cookie == cookie;
      if (k.local.port == htons(WEFT_PORT_OUTBOUND) && k.local.family == AF_INET) ++zt_side;
      if (k.remote.port == htons(WEFT_PORT_OUTBOUND) && k.remote.family == AF_INET) ++app_side;
    }
    child::report(out, "zt_side", std::to_string(zt_side));
    child::report(out, "app_side", std::to_string(app_side));
    child::report(out, "right_cookie", std::to_string(right_cookie));
    child::writeAll(h.app.get(), "hello");
    child::report(out, "zt_got", readN(h.zt.get(), 5, 2000));
    child::writeAll(h.zt.get(), "world!");
    child::report(out, "app_got", readN(h.app.get(), 6, 2000));
    h.app.reset();
    h.zt.reset();
    h.listener.reset();
    child::report(out, "after_close", std::to_string(waitHopCount(map.get(), 0, 3000)));
    return 0;
  });
  ASSERT_EQ(r.exit_code, 0) << r.raw;
  EXPECT_EQ(r.get("entries"), "2");
  EXPECT_EQ(r.get("zt_side"), "1");
  EXPECT_EQ(r.get("app_side"), "1");
  EXPECT_EQ(r.get("right_cookie"), "2");
  EXPECT_EQ(r.get("zt_got"), "hello");
  EXPECT_EQ(r.get("app_got"), "world!");
  EXPECT_EQ(r.get("after_close"), "0");
  EXPECT_EQ(stat("sockets"), 2u);
  EXPECT_EQ(stat("redirected_msgs"), 2u);
  EXPECT_EQ(stat("redirected_bytes"), 11u);
  EXPECT_EQ(stat("tcp_msgs"), 0u);
  EXPECT_EQ(stat("add_failed"), 0u);
}

// IPv6 ([::1]:15001) and the inbound hop (the ztunnel connects from 127.0.0.6 to the app) are
// accelerated too; a loopback connection that is neither is left alone.
TEST_F(LocalHopTest, Ipv6AndInboundHopsOtherLoopbackUntouched) {
  std::string pin = pin_dir_;
  ChildResult r = runInPod([pin](int out) {
    UniqueFd map = openMap(pin, WEFT_MAP_HOP_SOCKS);
    Hop v6 = makeHop("[::1]:15001", "[::1]:15001");
    Hop in = makeHop(std::string(kPodV4) + ":8080", std::string(kPodV4) + ":8080",
                     "127.0.0.6:0", true);
    Hop other = makeHop("127.0.0.1:9000", "127.0.0.1:9000");
    for (Hop* h : {&v6, &in, &other}) {
      if (!hopMade(out, *h)) return 1;
    }
    child::report(out, "entries", std::to_string(hopKeys(map.get()).size()));
    for (auto [name, h] : {std::pair{"v6", &v6}, {"in", &in}, {"other", &other}}) {
      child::writeAll(h->app.get(), "ping");
      child::report(out, std::string(name) + "_zt", readN(h->zt.get(), 4, 2000));
      child::writeAll(h->zt.get(), "pong");
      child::report(out, std::string(name) + "_app", readN(h->app.get(), 4, 2000));
    }
    return 0;
  });
  ASSERT_EQ(r.exit_code, 0) << r.raw;
  EXPECT_EQ(r.get("entries"), "4");
  for (const char* name : {"v6", "in", "other"}) {
    EXPECT_EQ(r.get(std::string(name) + "_zt"), "ping") << name;
    EXPECT_EQ(r.get(std::string(name) + "_app"), "pong") << name;
  }
  EXPECT_EQ(stat("redirected_msgs"), 4u);
  EXPECT_EQ(stat("redirected_bytes"), 16u);
}

// Switched off: nothing enters the map, data flows over TCP as before.
TEST_F(LocalHopTest, OffLeavesHopsAlone) {
  ASSERT_TRUE(dp_->setLocalHopAccel(false).isOk());
  auto hs = dp_->localHop();
  ASSERT_TRUE(hs.isOk());
  EXPECT_FALSE(hs.value().on);
  std::string pin = pin_dir_;
  ChildResult r = runInPod([pin](int out) {
    Hop h = makeHop("127.0.0.1:15001", "127.0.0.1:15001");
    if (!hopMade(out, h)) return 1;
    UniqueFd map = openMap(pin, WEFT_MAP_HOP_SOCKS);
    child::report(out, "entries", std::to_string(hopKeys(map.get()).size()));
    child::writeAll(h.app.get(), "plain");
    child::report(out, "zt_got", readN(h.zt.get(), 5, 2000));
    return 0;
  });
  ASSERT_EQ(r.exit_code, 0) << r.raw;
  EXPECT_EQ(r.get("entries"), "0");
  EXPECT_EQ(r.get("zt_got"), "plain");
  EXPECT_EQ(stat("sockets"), 0u);
  EXPECT_EQ(stat("redirected_msgs"), 0u);
}

// Not enrolled: nothing enters the map.
TEST_F(LocalHopTest, UnenrolledPodUntouched) {
  ASSERT_TRUE(dp_->unenroll(pod_cookie_).isOk());
  std::string pin = pin_dir_;
  ChildResult r = runInPod([pin](int out) {
    Hop h = makeHop("127.0.0.1:15001", "127.0.0.1:15001");
    if (!hopMade(out, h)) return 1;
    UniqueFd map = openMap(pin, WEFT_MAP_HOP_SOCKS);
    child::report(out, "entries", std::to_string(hopKeys(map.get()).size()));
    return 0;
  });
  ASSERT_EQ(r.exit_code, 0) << r.raw;
  EXPECT_EQ(r.get("entries"), "0");
}

// Two pods with the very same loopback 4-tuple: the netns cookie in the key keeps them apart, and
// each ztunnel socket gets its own pod's bytes.
TEST_F(LocalHopTest, IdenticalFourTuplesInTwoPodsNeverCross) {
  auto peer_cookie = netnsCookie(peer_fd_.get());
  ASSERT_TRUE(peer_cookie.isOk());
  ASSERT_TRUE(dp_->enroll(peer_cookie.value(), peer_fd_.get(), 10).isOk());
  std::string pin = pin_dir_;
  int peer_fd = peer_fd_.get();
  ChildResult r = runInPod([pin, peer_fd](int out) {
    Hop a = makeHop("127.0.0.1:15001", "127.0.0.1:15001", "127.0.0.1:41000");
    if (setns(peer_fd, CLONE_NEWNET) != 0) {
      child::report(out, "error", std::string("setns: ") + strerror(errno));
      return 1;
    }
    Hop b = makeHop("127.0.0.1:15001", "127.0.0.1:15001", "127.0.0.1:41000");
    for (Hop* h : {&a, &b}) {
      if (!hopMade(out, *h)) return 1;
    }
    UniqueFd map = openMap(pin, WEFT_MAP_HOP_SOCKS);
    child::report(out, "entries", std::to_string(hopKeys(map.get()).size()));
    child::writeAll(a.app.get(), "pod-a");
    child::writeAll(b.app.get(), "pod-b");
    child::report(out, "a_zt", readN(a.zt.get(), 5, 2000));
    child::report(out, "b_zt", readN(b.zt.get(), 5, 2000));
    child::writeAll(b.zt.get(), "zt-b");
    child::writeAll(a.zt.get(), "zt-a");
    child::report(out, "a_app", readN(a.app.get(), 4, 2000));
    child::report(out, "b_app", readN(b.app.get(), 4, 2000));
    return 0;
  });
  ASSERT_EQ(r.exit_code, 0) << r.raw;
  EXPECT_EQ(r.get("entries"), "4");
  EXPECT_EQ(r.get("a_zt"), "pod-a");
  EXPECT_EQ(r.get("b_zt"), "pod-b");
  EXPECT_EQ(r.get("a_app"), "zt-a");
  EXPECT_EQ(r.get("b_app"), "zt-b");
  EXPECT_EQ(stat("redirected_msgs"), 4u);
}

// A socket whose first send found no peer in the map sent it over TCP; later sends must follow
// over TCP too even once the peer is there, or they would be read before the TCP bytes.
TEST_F(LocalHopTest, SenderThatUsedTcpStaysOnTcp) {
  std::string pin = pin_dir_;
  ChildResult r = runInPod([pin](int out) {
    Hop h = makeHop("127.0.0.1:15001", "127.0.0.1:15001");
    if (!hopMade(out, h)) return 1;
    UniqueFd map = openMap(pin, WEFT_MAP_HOP_SOCKS);
    weft_hop_key zt_key{};
    int found = 0;
    for (const auto& k : hopKeys(map.get()))
      if (k.local.port == htons(WEFT_PORT_OUTBOUND)) zt_key = k, ++found;
    if (found != 1 || bpf_map_delete_elem(map.get(), &zt_key) != 0) {
      child::report(out, "error", fmt::format("ztunnel end: found {}, delete {}", found,
                                               strerror(errno)));
      return 1;
    }
    child::writeAll(h.app.get(), "first-");
    uint64_t fd = static_cast<uint64_t>(h.zt.get());
    if (bpf_map_update_elem(map.get(), &zt_key, &fd, BPF_NOEXIST) != 0) {
      child::report(out, "error", std::string("re-add: ") + strerror(errno));
      return 1;
    }
    child::writeAll(h.app.get(), "second");
    child::report(out, "zt_got", readN(h.zt.get(), 12, 2000));
    // The other direction never used TCP: it is redirected.
    child::writeAll(h.zt.get(), "back");
    child::report(out, "app_got", readN(h.app.get(), 4, 2000));
    return 0;
  });
  ASSERT_EQ(r.exit_code, 0) << r.raw;
  EXPECT_EQ(r.get("zt_got"), "first-second");
  EXPECT_EQ(r.get("app_got"), "back");
  EXPECT_EQ(stat("tcp_msgs"), 2u);
  EXPECT_EQ(stat("redirected_msgs"), 1u);
}

// Half-close each way: everything written before shutdown(SHUT_WR) arrives before EOF (a 3 MiB
// tail written at once, not yet read when the FIN goes), and the half-closed side still reads.
class LocalHopHalfCloseTest : public LocalHopTest, public ::testing::WithParamInterface<bool> {};

TEST_P(LocalHopHalfCloseTest, TailBeforeEofBothWays) {
  bool app_first = GetParam();
  ChildResult r = runInPod(
      [app_first](int out) {
        Hop h = makeHop("127.0.0.1:15001", "127.0.0.1:15001");
        if (!hopMade(out, h)) return 1;
        std::mt19937_64 rng(app_first ? 1 : 2);
        std::string one = randomBytes(rng, 3 << 20), two = randomBytes(rng, 2 << 20);
        int first = app_first ? h.app.get() : h.zt.get();
        int second = app_first ? h.zt.get() : h.app.get();
        // The writer must not block on a reader that is not reading yet: write from a child.
        pid_t w = fork();
        if (w == 0) {
          bool ok = writeAllBlocking(first, one) && shutdown(first, SHUT_WR) == 0;
          _exit(ok ? 0 : 1);
        }
        usleep(200000);  // let the FIN be sent before the reader starts
        std::string end1;
        std::string got1 = readToEnd(second, 5000, &end1);
        int status = 0;
        waitpid(w, &status, 0);
        child::report(out, "writer1", std::to_string(WEXITSTATUS(status)));
        child::report(out, "end1", end1);
        child::report(out, "ok1", got1 == one ? "1" : fmt::format("0 ({} of {} bytes)",
                                                                  got1.size(), one.size()));
        pollfd p{second, POLLIN | POLLRDHUP, 0};
        poll(&p, 1, 0);
        child::report(out, "rdhup", (p.revents & POLLRDHUP) ? "1" : "0");
        // The half-closed side still receives.
        bool ok = writeAllBlocking(second, two) && shutdown(second, SHUT_WR) == 0;
        child::report(out, "write2", ok ? "1" : strerror(errno));
        std::string end2;
        std::string got2 = readToEnd(first, 5000, &end2);
        child::report(out, "end2", end2);
        child::report(out, "ok2", got2 == two ? "1" : fmt::format("0 ({} of {} bytes)",
                                                                  got2.size(), two.size()));
        return 0;
      },
      30000);
  ASSERT_EQ(r.exit_code, 0) << r.raw;
  EXPECT_EQ(r.get("writer1"), "0");
  EXPECT_EQ(r.get("end1"), "eof");
  EXPECT_EQ(r.get("ok1"), "1");
  EXPECT_EQ(r.get("rdhup"), "1");
  EXPECT_EQ(r.get("write2"), "1");
  EXPECT_EQ(r.get("end2"), "eof");
  EXPECT_EQ(r.get("ok2"), "1");
  EXPECT_EQ(stat("tcp_msgs"), 0u);
  EXPECT_EQ(stat("redirected_bytes"), uint64_t{5} << 20);
  EXPECT_EQ(stat("peer_full"), 0u);
}

INSTANTIATE_TEST_SUITE_P(Direction, LocalHopHalfCloseTest, ::testing::Values(true, false),
                         [](const auto& info) { return info.param ? "AppFirst" : "ZtunnelFirst"; });

// A reset (SO_LINGER 0 close) reaches the peer as ECONNRESET, each way; what the peer read before
// it is a prefix of what was sent.
class LocalHopResetTest : public LocalHopTest, public ::testing::WithParamInterface<bool> {};

TEST_P(LocalHopResetTest, ResetReachesPeer) {
  bool app_resets = GetParam();
  ChildResult r = runInPod([app_resets](int out) {
    Hop h = makeHop("127.0.0.1:15001", "127.0.0.1:15001");
    if (!hopMade(out, h)) return 1;
    UniqueFd& resetter = app_resets ? h.app : h.zt;
    int peer = app_resets ? h.zt.get() : h.app.get();
    child::writeAll(resetter.get(), "before-reset");
    linger lg{1, 0};
    setsockopt(resetter.get(), SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    resetter.reset();
    std::string end;
    std::string got = readToEnd(peer, 3000, &end);
    child::report(out, "end", end);
    child::report(out, "prefix", std::string("before-reset").rfind(got, 0) == 0 ? "1" : got);
    // Writing to a reset connection fails rather than vanishing.
    signal(SIGPIPE, SIG_IGN);
    ssize_t w = write(peer, "x", 1);
    child::report(out, "write_after", w < 0 ? strerror(errno) : std::to_string(w));
    return 0;
  });
  ASSERT_EQ(r.exit_code, 0) << r.raw;
  EXPECT_EQ(r.get("end"), strerror(ECONNRESET));
  EXPECT_EQ(r.get("prefix"), "1");
  EXPECT_NE(r.get("write_after"), "1");
}

INSTANTIATE_TEST_SUITE_P(Direction, LocalHopResetTest, ::testing::Values(true, false),
                         [](const auto& info) { return info.param ? "AppResets" : "ZtunnelResets"; });

// Several MiB of random data both ways at once, random write sizes, nonblocking sockets driven by
// poll, level-triggered epoll (libuv) and edge-triggered epoll; SHA-256 both ways, half-close at
// the end of each direction, every byte redirected.
class LocalHopBulkTest : public LocalHopTest, public ::testing::WithParamInterface<Readiness> {};

TEST_P(LocalHopBulkTest, RandomDataBothWaysExact) {
  Readiness mode = GetParam();
  ChildResult r = runInPod(
      [mode](int out) {
        Hop h = makeHop("127.0.0.1:15001", "127.0.0.1:15001");
        if (!hopMade(out, h)) return 1;
        std::mt19937_64 rng(42 + static_cast<int>(mode));
        std::string to_zt = randomBytes(rng, (6 << 20) + 12345);
        std::string to_app = randomBytes(rng, (5 << 20) + 777);
        std::string got[2], why;
        uint64_t spurious = 0;
        bool ok = pumpBothWays(h.app.get(), h.zt.get(), to_zt, to_app, mode, rng, got, &why,
                               &spurious);
        child::report(out, "pump", ok ? "ok" : why);
        child::report(out, "zt_sha", sha256Hex(got[1]) == sha256Hex(to_zt) ? "match" : "differs");
        child::report(out, "app_sha", sha256Hex(got[0]) == sha256Hex(to_app) ? "match" : "differs");
        child::report(out, "zt_len", std::to_string(got[1].size()));
        child::report(out, "app_len", std::to_string(got[0].size()));
        child::report(out, "spurious", std::to_string(spurious));
        return 0;
      },
      150000);
  ASSERT_EQ(r.exit_code, 0) << r.raw;
  EXPECT_EQ(r.get("pump"), "ok");
  EXPECT_EQ(r.get("zt_sha"), "match");
  EXPECT_EQ(r.get("app_sha"), "match");
  EXPECT_EQ(r.get("zt_len"), std::to_string((6 << 20) + 12345));
  EXPECT_EQ(r.get("app_len"), std::to_string((5 << 20) + 777));
  // Every byte went by redirect, unless a reader fell more than WEFT_HOP_MAX_UNREAD behind and
  // that direction moved to TCP (the SHA-256 above then also proves the order across the move).
  uint64_t total = (6 << 20) + 12345 + (5 << 20) + 777;
  uint64_t full = stat("peer_full");
  EXPECT_LE(full, 2u);
  if (full == 0) {
    EXPECT_EQ(stat("redirected_bytes"), total);
    EXPECT_EQ(stat("tcp_msgs"), 0u);
  }
  EXPECT_GT(stat("redirected_bytes"), 0u);
  std::cout << "spurious wakeups (readable, then EAGAIN): " << r.get("spurious")
            << "; directions moved to TCP (peer full): " << full << "; redirected bytes "
            << stat("redirected_bytes") << " of " << total << "\n";
}

INSTANTIATE_TEST_SUITE_P(Readiness, LocalHopBulkTest,
                         ::testing::Values(Readiness::kPoll, Readiness::kEpollLevel,
                                           Readiness::kEpollEdge),
                         [](const auto& info) {
                           switch (info.param) {
                             case Readiness::kPoll: return "Poll";
                             case Readiness::kEpollLevel: return "EpollLevel";
                             default: return "EpollEdge";
                           }
                         });

}  // namespace
}  // namespace weft::bpftest

namespace weft::bpftest {
namespace {

// Backpressure. Over TCP an app writing to a ztunnel socket that does not read is stopped
// (EAGAIN) after a few MiB (the window and buffers). The kernel queues redirected bytes on the
// peer without any limit (bpf_tcp_ingress charges the receiver, never makes the sender wait: an
// earlier version of the program let this writer queue 64 MiB, and iperf3 through the sim drove
// the machine's TCP memory to its limits until writes failed with ENOMEM). The program therefore
// moves a sender to TCP once the peer has more than WEFT_HOP_MAX_UNREAD unread: the writer is
// stopped after about that plus what TCP allows, and what the reader drains is exactly the
// prefix that was accepted, in order across the move from redirect to TCP.
TEST_F(LocalHopTest, WriterToNonReadingPeerIsThrottledAndOrderSurvivesTheMoveToTcp) {
  constexpr size_t kCap = size_t{64} << 20;
  auto fill = [this](const char* what) {
    ChildResult r = runInPod(
        [](int out) {
          Hop h = makeHop("127.0.0.1:15001", "127.0.0.1:15001");
          if (!hopMade(out, h)) return 1;
          std::mt19937_64 rng(7);
          std::string data = randomBytes(rng, kCap);
          setNonblocking(h.app.get(), true);
          size_t queued = 0;
          int err = 0;
          while (queued < kCap) {
            ssize_t w = write(h.app.get(), data.data() + queued,
                              std::min<size_t>(64 * 1024, kCap - queued));
            if (w < 0) {
              err = errno;
              break;
            }
            queued += static_cast<size_t>(w);
          }
          child::report(out, "queued", std::to_string(queued));
          child::report(out, "stopped_by", err ? strerror(err) : "cap");
          setNonblocking(h.zt.get(), true);
          std::string got;
          char buf[65536];
          int64_t deadline = nowMs() + 10000;
          while (got.size() < queued && nowMs() < deadline) {
            ssize_t n = read(h.zt.get(), buf, sizeof(buf));
            if (n == 0) break;
            if (n < 0) {
              if (errno != EAGAIN) break;
              pollfd p{h.zt.get(), POLLIN, 0};
              poll(&p, 1, 1000);
              continue;
            }
            got.append(buf, static_cast<size_t>(n));
          }
          child::report(out, "drained", std::to_string(got.size()));
          child::report(out, "in_order", got == data.substr(0, queued) ? "1" : "0");
          return 0;
        },
        60000);
    EXPECT_EQ(r.exit_code, 0) << r.raw;
    std::cout << what << ": queued " << r.get("queued") << " bytes before "
              << r.get("stopped_by") << "\n";
    EXPECT_EQ(r.get("drained"), r.get("queued")) << what;
    EXPECT_EQ(r.get("in_order"), "1") << what;
    return r;
  };
  ASSERT_TRUE(dp_->setLocalHopAccel(false).isOk());
  ChildResult tcp = fill("TCP");
  EXPECT_EQ(tcp.get("stopped_by"), strerror(EAGAIN));
  ASSERT_TRUE(dp_->setLocalHopAccel(true).isOk());
  ChildResult redirect = fill("redirect");
  EXPECT_EQ(redirect.get("stopped_by"), strerror(EAGAIN));
  EXPECT_LT(std::stoull(redirect.get("queued")), size_t{16} << 20);
  EXPECT_GT(std::stoull(redirect.get("queued")), size_t{WEFT_HOP_MAX_UNREAD});
  EXPECT_EQ(stat("peer_full"), 1u);
  EXPECT_GE(stat("redirected_bytes"), uint64_t{WEFT_HOP_MAX_UNREAD});
}

}  // namespace
}  // namespace weft::bpftest
