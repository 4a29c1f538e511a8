// The same-node fast path with real sockets: a cached verdict sends an enrolled pod's connect()
// straight to the destination pod, whose sk_lookup lets exactly that 4-tuple through to the app
// (others are still steered to 15006); sockops reports FAST_OPEN/FAST_CLOSE with the exact bytes
// each way, and byte order and half-close hold over the path.
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <netinet/in.h>
#include <openssl/sha.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <random>

#include "bpf/abi/maps.h"
#include "common/address.h"
#include "common/netns.h"
#include "tests/bpf/bpf_test_env.h"

namespace weft::bpftest {
namespace {

// Reads to EOF (no size cap, unlike child::readAll), giving up after `timeout_ms` of silence.
std::string readToEof(int fd, int timeout_ms) {
  std::string out;
  char buf[65536];
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) != 1) break;
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

class FastPathTest : public DataplaneTest {
 protected:
  // The "pod" netns is the destination, the "peer" netns the source; both enrolled.
  void SetUp() override {
    DataplaneTest::SetUp();
    if (IsSkipped() || HasFailure()) return;
    ASSERT_NO_FATAL_FAILURE(enrollPod());
    auto cookie = netnsCookie(peer_fd_.get());
    ASSERT_TRUE(cookie.isOk()) << cookie.status().message();
    peer_cookie_ = cookie.value();
    Status st = dp_->enroll(peer_cookie_, peer_fd_.get(), 10);
    ASSERT_TRUE(st.isOk()) << st.message();
  }

  int mapFd(const char* name) {
    int fd = bpf_obj_get((pin_dir_ + "/maps/" + name).c_str());
    EXPECT_GE(fd, 0) << name << ": " << strerror(errno);
    return fd;
  }

  void cacheVerdict(const std::string& dst) {
    UniqueFd fd(mapFd(WEFT_MAP_FAST_VERDICT));
    weft_fast_key key{};
    key.src_netns_cookie = peer_cookie_;
    key.dst = SocketAddress::parse(dst)->toAbi();
    weft_fast_verdict v{pod_cookie_, 1};
    ASSERT_EQ(bpf_map_update_elem(fd.get(), &key, &v, BPF_ANY), 0) << strerror(errno);
  }

  uint64_t stat(uint32_t index) {
    UniqueFd fd(mapFd(WEFT_MAP_FAST_STATS));
    int ncpu = libbpf_num_possible_cpus();
    std::vector<uint64_t> per(ncpu > 0 ? ncpu : 1);
    if (bpf_map_lookup_elem(fd.get(), &index, per.data()) != 0) return ~0ull;
    uint64_t sum = 0;
    for (uint64_t v : per) sum += v;
    return sum;
  }

  size_t fastConnEntries() {
    UniqueFd fd(mapFd(WEFT_MAP_FAST_CONN));
    weft_fast_conn_key key, next;
    size_t n = 0;
    void* prev = nullptr;
    while (n < 1000 && bpf_map_get_next_key(fd.get(), prev, &next) == 0) {
      key = next;
      prev = &key;
      ++n;
    }
    return n;
  }

  // The ztunnel's outbound listener in the peer (its inbound one: startZtunnelInbound).
  pid_t startZtunnelOutbound(int count, int accept_ms) {
    return spawnServer(peer_fd_.get(), true, [count, accept_ms](int out) {
      return child::serve(out, {"127.0.0.1:15001", "[::1]:15001"}, true, "ztunnel-out", count,
                          accept_ms);
    });
  }

  // Ring records of the fast path, read until `want` arrived or 3 s passed.
  std::vector<weft_fast_event> fastEvents(size_t want) {
    std::vector<weft_fast_event> got;
    UniqueFd fd(mapFd(WEFT_MAP_EVENTS));
    auto cb = [](void* ctx, void* data, size_t size) -> int {
      auto* out = static_cast<std::vector<weft_fast_event>*>(ctx);
      if (size < sizeof(weft_event)) return 0;
      weft_event head;
      memcpy(&head, data, sizeof(head));
      if (head.type != WEFT_EVENT_FAST_OPEN && head.type != WEFT_EVENT_FAST_CLOSE) return 0;
      if (size < sizeof(weft_fast_event)) return 0;
      weft_fast_event e;
      memcpy(&e, data, sizeof(e));
      out->push_back(e);
      return 0;
    };
    ring_buffer* rb = ring_buffer__new(fd.get(), cb, &got, nullptr);
    EXPECT_NE(rb, nullptr);
    if (!rb) return got;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(3);
    while (got.size() < want && std::chrono::steady_clock::now() < deadline)
      ring_buffer__poll(rb, 100);
    ring_buffer__free(rb);
    return got;
  }

  uint64_t peer_cookie_ = 0;
};

TEST_F(FastPathTest, CachedVerdictGoesStraightToTheAppAndOnlyThatConnectionBypassesSteering) {
  pid_t zin = startZtunnelInbound(1, 4000);
  pid_t zout = startZtunnelOutbound(1, 4000);
  pid_t app = spawnServer(pod_fd_.get(), true, [](int out) {
    return child::serve(out, {"0.0.0.0:8080", "[::]:8080"}, false, "app", 3, 4000);
  });
  std::string v4 = std::string(kPodV4) + ":8080";
  std::string v6 = "[" + std::string(kPodV6) + "]:8080";
  auto fetch4 = [v4](int out) { return child::fetch(out, v4); };

  // No verdict: the app's connect goes to the ztunnel's 15001.
  auto before = run(peer_fd_.get(), true, fetch4);
  EXPECT_EQ(before.get("reply"), "ztunnel-out") << before.raw;

  // Cached: straight to the app (IPv4 and IPv6), the destination's steering let it through.
  cacheVerdict(v4);
  cacheVerdict(v6);
  auto fast4 = run(peer_fd_.get(), true, fetch4);
  EXPECT_EQ(fast4.get("reply"), "app") << fast4.raw;
  EXPECT_EQ(fast4.get("peer"), v4);
  auto fast6 = run(peer_fd_.get(), true, [v6](int out) { return child::fetch(out, v6); });
  EXPECT_EQ(fast6.get("reply"), "app") << fast6.raw;

  // Same pod pair, but not a fast connection (a ztunnel-marked socket, never redirected): the
  // destination still steers it to 15006.
  auto marked = run(peer_fd_.get(), true, [v4](int out) { return child::fetch(out, v4, true); });
  EXPECT_EQ(marked.get("reply"), "ztunnel-in") << marked.raw;

  EXPECT_EQ(wait(app).get("accepted"), "2");
  EXPECT_EQ(wait(zin).get("accepted"), "1");
  EXPECT_EQ(wait(zout).get("accepted"), "1");
  EXPECT_EQ(stat(WEFT_FAST_STAT_CONNECTS), 2u);
  EXPECT_EQ(stat(WEFT_FAST_STAT_LOOKUP_PASSED), 2u);
  EXPECT_EQ(stat(WEFT_FAST_STAT_NO_CONN_ENTRY), 0u);
  // Both closed: their 4-tuples are forgotten.
  for (int i = 0; i < 30 && fastConnEntries() != 0; ++i) usleep(100 * 1000);
  EXPECT_EQ(fastConnEntries(), 0u);

  auto events = fastEvents(4);
  int opens = 0, closes = 0;
  for (const auto& e : events) {
    EXPECT_EQ(e.head.netns_cookie, peer_cookie_);
    EXPECT_EQ(e.dst_netns_cookie, pod_cookie_);
    if (e.head.type == WEFT_EVENT_FAST_OPEN) ++opens;
    if (e.head.type == WEFT_EVENT_FAST_CLOSE) {
      ++closes;
      EXPECT_EQ(e.bytes_received, 3u);  // "app"
      EXPECT_EQ(e.bytes_sent, 0u);
    }
  }
  EXPECT_EQ(opens, 2);
  EXPECT_EQ(closes, 2);
}

// Random data both ways with half-close: the client sends 3 MiB and shuts down its side; the app
// reads to EOF, answers with the SHA-256 of what it got followed by 1 MiB of its own and closes.
// The close event counts exactly those bytes.
TEST_F(FastPathTest, RandomDataKeepsOrderAndHalfCloseAndTheBytesAreCountedExactly) {
  constexpr size_t kUp = 3 << 20, kDown = 1 << 20;
  std::string up(kUp, '\0'), down(kDown, '\0');
  std::mt19937_64 rng(42);
  for (auto& c : up) c = static_cast<char>(rng());
  for (auto& c : down) c = static_cast<char>(rng());
  cacheVerdict(std::string(kPodV4) + ":8081");

  pid_t app = spawnServer(pod_fd_.get(), true, [down](int out) {
    int l = child::listenOn("0.0.0.0:8081", false);
    if (l < 0) return 1;
    child::report(out, "ready", "1");
    int c = child::acceptWithTimeout(l, 5000);
    if (c < 0) return 1;
    std::string got = readToEof(c, 8000);  // to EOF: the client's half-close
    child::report(out, "got", std::to_string(got.size()));
    child::writeAll(c, sha256Hex(got) + down);
    close(c);
    return 0;
  });
  std::string addr = std::string(kPodV4) + ":8081";
  auto client = run(peer_fd_.get(), true, [addr, up](int out) {
    int fd = child::connectTo(addr, false);
    if (fd < 0) {
      child::report(out, "connect_err", child::errText(fd));
      return 0;
    }
    child::writeAll(fd, up);
    shutdown(fd, SHUT_WR);
    std::string reply = readToEof(fd, 8000);
    child::report(out, "reply_bytes", std::to_string(reply.size()));
    child::report(out, "reply_sha", sha256Hex(reply));
    close(fd);
    return 0;
  });
  auto a = wait(app);
  EXPECT_EQ(a.get("got"), std::to_string(kUp)) << a.raw;
  EXPECT_EQ(client.get("reply_bytes"), std::to_string(64 + kDown)) << client.raw;
  EXPECT_EQ(client.get("reply_sha"), sha256Hex(sha256Hex(up) + down));
  EXPECT_EQ(stat(WEFT_FAST_STAT_CONNECTS), 1u);

  auto events = fastEvents(2);
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].head.type, static_cast<uint32_t>(WEFT_EVENT_FAST_OPEN));
  EXPECT_EQ(events[1].head.type, static_cast<uint32_t>(WEFT_EVENT_FAST_CLOSE));
  EXPECT_EQ(events[1].bytes_sent, kUp);
  EXPECT_EQ(events[1].bytes_received, 64 + kDown);
  EXPECT_NE(events[1].old_state, static_cast<uint32_t>(BPF_TCP_SYN_SENT));
  EXPECT_EQ(SocketAddress::fromAbi(events[1].head.dst).toString(), addr);
}

}  // namespace
}  // namespace weft::bpftest
