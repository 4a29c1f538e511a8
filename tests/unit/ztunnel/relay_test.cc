// The relay between two real loopback TCP connections: data integrity both ways at once,
// exact half-close, bounded memory under a slow reader, resets carried across, abort.
#include "ztunnel/relay.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <thread>

namespace weft::ztunnel {
namespace {

// Two connected TCP sockets over 127.0.0.1 (blocking).
std::pair<int, int> tcpPair() {
  int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in sin{};
  sin.sin_family = AF_INET;
  sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(sin);
  EXPECT_EQ(bind(l, reinterpret_cast<sockaddr*>(&sin), sizeof(sin)), 0);
  EXPECT_EQ(listen(l, 1), 0);
  EXPECT_EQ(getsockname(l, reinterpret_cast<sockaddr*>(&sin), &len), 0);
  int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  EXPECT_EQ(connect(c, reinterpret_cast<sockaddr*>(&sin), sizeof(sin)), 0);
  int s = accept4(l, nullptr, nullptr, SOCK_CLOEXEC);
  EXPECT_GE(s, 0);
  close(l);
  return {c, s};
}

// Deterministic bytes: position i of stream `seed`.
inline uint8_t patternByte(uint64_t seed, uint64_t i) {
  uint64_t x = (i / 8 + 1) * 0x9E3779B97F4A7C15ull ^ seed;
  x ^= x >> 31;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 29;
  return static_cast<uint8_t>(x >> ((i % 8) * 8));
}

bool writePattern(int fd, uint64_t seed, size_t total) {
  std::vector<uint8_t> buf(256 * 1024);
  size_t off = 0;
  while (off < total) {
    size_t n = std::min(buf.size(), total - off);
    for (size_t i = 0; i < n; i++) buf[i] = patternByte(seed, off + i);
    size_t done = 0;
    while (done < n) {
      ssize_t w = send(fd, buf.data() + done, n - done, MSG_NOSIGNAL);
      if (w <= 0) return false;
      done += static_cast<size_t>(w);
    }
    off += n;
  }
  return true;
}

// Reads to EOF (10 s bound), checking the pattern; returns bytes read or -1 on a mismatch,
// -errno on an error.
int64_t readPattern(int fd, uint64_t seed) {
  std::vector<uint8_t> buf(128 * 1024);
  uint64_t off = 0;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 100) <= 0) continue;
    ssize_t n = recv(fd, buf.data(), buf.size(), 0);
    if (n == 0) return static_cast<int64_t>(off);
    if (n < 0) return -errno;
    for (ssize_t i = 0; i < n; i++)
      if (buf[i] != patternByte(seed, off + i)) return -1;
    off += static_cast<uint64_t>(n);
  }
  return -ETIMEDOUT;
}

// Runs a relay between (client <-> a) and (b <-> server) on its own loop.
class RelayHarness {
 public:
  explicit RelayHarness(RelayOptions opts = {}) {
    EXPECT_EQ(uv_loop_init(&loop_), 0);
    auto [c, a] = tcpPair();
    auto [b, s] = tcpPair();
    client = c;
    server = s;
    EXPECT_EQ(uv_tcp_init(&loop_, &a_), 0);
    EXPECT_EQ(uv_tcp_init(&loop_, &b_), 0);
    EXPECT_EQ(uv_tcp_open(&a_, a), 0);
    EXPECT_EQ(uv_tcp_open(&b_, b), 0);
    relay = std::make_unique<Relay>(reinterpret_cast<uv_stream_t*>(&a_),
                                    reinterpret_cast<uv_stream_t*>(&b_), opts,
                                    [this](const RelayOutcome& o) { onDone(o); });
    EXPECT_EQ(uv_timer_init(&loop_, &sampler_), 0);
    sampler_.data = this;
  }
  ~RelayHarness() {
    if (client >= 0) close(client);
    if (server >= 0) close(server);
    if (!uv_is_closing(reinterpret_cast<uv_handle_t*>(&sampler_)))
      uv_close(reinterpret_cast<uv_handle_t*>(&sampler_), nullptr);
    uv_run(&loop_, UV_RUN_DEFAULT);
    EXPECT_EQ(uv_loop_close(&loop_), 0);
  }

  // Runs the loop until the relay finished and both handles closed, or 20 s passed.
  void run() {
    relay->start();
    EXPECT_EQ(uv_timer_start(
                  &sampler_,
                  [](uv_timer_t* t) {
                    auto* self = static_cast<RelayHarness*>(t->data);
                    self->max_buffered =
                        std::max(self->max_buffered, self->relay->bufferedBytes());
                    if (uv_now(t->loop) - self->started_ > 20000) self->relay->abort("test timeout");
                  },
                  1, 1),
              0);
    started_ = uv_now(&loop_);
    uv_run(&loop_, UV_RUN_DEFAULT);
  }

  void abortAfter(uint64_t ms) {
    auto* t = new uv_timer_t;
    uv_timer_init(&loop_, t);
    t->data = this;
    uv_timer_start(t, [](uv_timer_t* t) {
      static_cast<RelayHarness*>(t->data)->relay->abort("aborted by test");
      uv_close(reinterpret_cast<uv_handle_t*>(t),
               [](uv_handle_t* h) { delete reinterpret_cast<uv_timer_t*>(h); });
    }, ms, 0);
  }

  int client = -1, server = -1;
  std::unique_ptr<Relay> relay;
  RelayOutcome outcome;
  bool done = false;
  size_t max_buffered = 0;

 private:
  void onDone(const RelayOutcome& o) {
    outcome = o;
    done = true;
    int failed = relay->failedSide();
    bool reset_a = !o.clean && failed != 0, reset_b = !o.clean && failed != 1;
    auto closed = [](uv_handle_t* h) {
      auto* self = static_cast<RelayHarness*>(h->data);
      if (++self->closed_ == 2) {
        uv_timer_stop(&self->sampler_);
        uv_close(reinterpret_cast<uv_handle_t*>(&self->sampler_), nullptr);
      }
    };
    closeStream(reinterpret_cast<uv_stream_t*>(&a_), reset_a, this, closed);
    closeStream(reinterpret_cast<uv_stream_t*>(&b_), reset_b, this, closed);
  }

  uv_loop_t loop_;
  uv_tcp_t a_, b_;
  uv_timer_t sampler_;
  uint64_t started_ = 0;
  int closed_ = 0;
};

TEST(Relay, LargeTransfersBothWaysAtOnce) {
  RelayHarness h;
  constexpr size_t kUp = 24 << 20, kDown = 16 << 20;
  int64_t got_up = 0, got_down = 0;
  std::thread cw([&] {
    writePattern(h.client, 1, kUp);
    shutdown(h.client, SHUT_WR);
  });
  std::thread sw([&] {
    writePattern(h.server, 2, kDown);
    shutdown(h.server, SHUT_WR);
  });
  std::thread cr([&] { got_down = readPattern(h.client, 2); });
  std::thread sr([&] { got_up = readPattern(h.server, 1); });
  h.run();
  cw.join();
  sw.join();
  cr.join();
  sr.join();
  EXPECT_EQ(got_up, static_cast<int64_t>(kUp));
  EXPECT_EQ(got_down, static_cast<int64_t>(kDown));
  ASSERT_TRUE(h.done);
  EXPECT_TRUE(h.outcome.clean) << h.outcome.error;
  EXPECT_EQ(h.outcome.a_to_b, kUp);
  EXPECT_EQ(h.outcome.b_to_a, kDown);
}

// The client half-closes after its request and still reads the whole answer, which the server
// sends only after it saw EOF (the shape of every read-to-EOF protocol).
TEST(Relay, ClientHalfCloseStillGetsAnswer) {
  RelayHarness h;
  int64_t server_got = 0, client_got = 0;
  std::thread srv([&] {
    server_got = readPattern(h.server, 3);  // returns only at EOF
    if (server_got == 1000) writePattern(h.server, 4, 3 << 20);
    close(h.server);
    h.server = -1;
  });
  std::thread cli([&] {
    writePattern(h.client, 3, 1000);
    shutdown(h.client, SHUT_WR);
    client_got = readPattern(h.client, 4);
  });
  h.run();
  srv.join();
  cli.join();
  EXPECT_EQ(server_got, 1000);
  EXPECT_EQ(client_got, 3 << 20);
  EXPECT_TRUE(h.outcome.clean) << h.outcome.error;
}

// The other direction: the server half-closes first, the client keeps sending afterwards.
TEST(Relay, ServerHalfCloseClientKeepsSending) {
  RelayHarness h;
  int64_t server_got = 0, client_got = 0;
  std::thread srv([&] {
    writePattern(h.server, 5, 500);
    shutdown(h.server, SHUT_WR);
    server_got = readPattern(h.server, 6);
  });
  std::thread cli([&] {
    client_got = readPattern(h.client, 5);  // EOF first
    writePattern(h.client, 6, 2 << 20);
    shutdown(h.client, SHUT_WR);
  });
  h.run();
  srv.join();
  cli.join();
  EXPECT_EQ(client_got, 500);
  EXPECT_EQ(server_got, 2 << 20);
  EXPECT_TRUE(h.outcome.clean) << h.outcome.error;
  EXPECT_EQ(h.outcome.a_to_b, 2u << 20);
  EXPECT_EQ(h.outcome.b_to_a, 500u);
}

TEST(Relay, SlowReaderKeepsMemoryBounded) {
  RelayOptions opts;
  opts.max_write_queue_bytes = 256 * 1024;
  RelayHarness h(opts);
  // Small kernel buffers on the slow side so the relay, not the kernel, must hold back.
  int small = 64 * 1024;
  setsockopt(h.server, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
  constexpr size_t kTotal = 48 << 20;
  int64_t got = 0;
  std::atomic<bool> wrote{false};
  std::thread cli([&] {
    writePattern(h.client, 7, kTotal);
    shutdown(h.client, SHUT_WR);
    wrote = true;
  });
  std::thread srv([&] {
    // Stall for a while before reading anything, then read in small sips.
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    got = readPattern(h.server, 7);
    shutdown(h.server, SHUT_WR);
  });
  std::thread cli_eof([&] { readPattern(h.client, 0); });
  h.run();
  cli.join();
  srv.join();
  cli_eof.join();
  EXPECT_EQ(got, static_cast<int64_t>(kTotal));
  EXPECT_TRUE(h.outcome.clean) << h.outcome.error;
  // Bound: the write-queue limit plus one read buffer, with slack for one read landing on top.
  EXPECT_GT(h.max_buffered, 0u) << "the slow reader never made the relay queue anything";
  EXPECT_LE(h.max_buffered, opts.max_write_queue_bytes + 2 * opts.read_buffer_bytes);
}

TEST(Relay, ServerResetResetsClient) {
  RelayHarness h;
  int64_t client_result = 0;
  std::thread srv([&] {
    char buf[5];
    ssize_t n = recv(h.server, buf, sizeof(buf), MSG_WAITALL);
    EXPECT_EQ(n, 5);
    linger l{1, 0};
    setsockopt(h.server, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
    close(h.server);  // RST
    h.server = -1;
  });
  std::thread cli([&] {
    EXPECT_EQ(send(h.client, "hello", 5, MSG_NOSIGNAL), 5);
    client_result = readPattern(h.client, 0);
  });
  h.run();
  srv.join();
  cli.join();
  EXPECT_FALSE(h.outcome.clean);
  EXPECT_EQ(h.relay->failedSide(), 1);
  EXPECT_EQ(client_result, -ECONNRESET) << "a reset must not look like a clean EOF";
}

TEST(Relay, AbortResetsBothSides) {
  RelayHarness h;
  int64_t c = 0, s = 0;
  std::thread cli([&] { c = readPattern(h.client, 0); });
  std::thread srv([&] { s = readPattern(h.server, 0); });
  h.abortAfter(50);
  h.run();
  cli.join();
  srv.join();
  EXPECT_FALSE(h.outcome.clean);
  EXPECT_EQ(h.outcome.error, "aborted by test");
  EXPECT_EQ(c, -ECONNRESET);
  EXPECT_EQ(s, -ECONNRESET);
}

}  // namespace
}  // namespace weft::ztunnel
