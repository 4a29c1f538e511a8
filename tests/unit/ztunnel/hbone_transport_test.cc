// HBONE client <-> server on loopback with real certificates: CONNECT, bytes both ways (8 MiB
// too), half-close, 400/401/503, identity refusals with their counted reasons, and pooling;
// the data path's memory bound under a slow reader and large transfers in random-sized writes.
#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <iostream>
#include <memory>
#include <random>
#include <set>
#include <thread>

#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>

#include "tests/unit/ztunnel/hbone_test_util.h"
#include "ztunnel/hbone/client.h"
#include "ztunnel/hbone/server.h"

namespace weft::hbone {
namespace {

using namespace weft::hbone::testing;


class HboneTest : public ::testing::Test {
 protected:
  // The certificates are made once per run (openssl takes seconds), for this suite and the
  // parameterized ones below alike, and removed at exit.
  static void SetUpTestSuite() {
    if (certs_ != nullptr) return;
    certs_ = std::make_unique<CertDir>();
    bool ok = certs_->ok() && certs_->makeLeaf("ca", "server", kServerId) &&
              certs_->makeLeaf("ca", "client", kClientId) &&
              certs_->makeLeaf("ca2", "foreign", kClientId) &&
              certs_->makeLeaf("ca", "expired", kClientId, "expired") &&
              certs_->makeLeaf("ca", "otherdomain", "spiffe://other.domain/ns/default/sa/client") &&
              certs_->makeLeaf("ca", "notyetvalid", kClientId, "notyetvalid") &&
              certs_->makeLeaf("ca", "badsan", "spiffe://cluster.local/ns/default") &&
              certs_->makeLeaf("ca", "impostor", "spiffe://cluster.local/ns/default/sa/impostor") &&
              certs_->makeLeaf("ca", "webserver", "https://server.example/");
    certsOk_ = ok;
  }

  void SetUp() override {
    ASSERT_EQ(uv_loop_init(&loop_), 0);
    ASSERT_TRUE(certsOk_) << "openssl CLI could not make the test certificates";
    startServer("server");
    client_ = std::make_unique<HboneClient>(&loop_);
  }

  // (Re)starts the server presenting `leaf`'s certificate on a new port.
  void startServer(const std::string& leaf) {
    server_.reset();
    auto sctx = makeTlsContext(TlsRole::kServer, certs_->creds(leaf));
    ASSERT_TRUE(sctx) << sctx.status().message();
    ServerConfig sc;
    sc.ctx = sctx.value();
    if (serverMaxStreams_ != 0) sc.settings.maxConcurrentStreams = serverMaxStreams_;
    sc.decide = [this](const InboundConnect& req) {
      lastRequest_ = req;
      InboundDecision d;
      d.verdict = verdict_;
      return d;
    };
    server_ = std::make_unique<HboneServer>(&loop_, sc);
    Listener l;
    hbonePort_ = l.port();
    ASSERT_TRUE(server_->listen(l.release()));
  }

  TlsRefusalCounts clientRefusals() const {
    TlsRefusalCounts c{};
    for (size_t i = 0; i < kTlsRefusalCount; ++i) {
      c[i] = client_->refusals(static_cast<TlsRefusal>(i));
    }
    return c;
  }

  void TearDown() override {
    client_.reset();
    server_.reset();
    drainLoop(&loop_);
    uv_loop_close(&loop_);
  }

  OutboundConnect request(uint16_t targetPort, const std::string& leaf = "client") {
    OutboundConnect r;
    r.sourceIdentity = kClientId;
    auto ctx = makeTlsContext(TlsRole::kClient, certs_->creds(leaf));
    EXPECT_TRUE(ctx) << ctx.status().message();
    if (ctx) r.ctx = ctx.value();
    r.destinationIdentity = kServerId;
    r.hboneAddress = *SocketAddress::parse("127.0.0.1:" + std::to_string(hbonePort_));
    r.target = *SocketAddress::parse("127.0.0.1:" + std::to_string(targetPort));
    r.forwardedFor = *SocketAddress::parse("10.1.2.3:4567");
    r.baggage = "k8s.namespace.name=default";
    return r;
  }

  // Opens a tunnel; returns the :status and (for 200) the app's end of the local socket.
  std::pair<int, UniqueFd> open(const OutboundConnect& r, std::string* error = nullptr) {
    auto [local, app] = tcpPair();
    int status = -1;
    Status err;
    client_->open(r, std::move(local), [&](int st, const Status& e) {
      status = st;
      err = e;
    });
    EXPECT_TRUE(runUntil(&loop_, [&] { return status != -1; }));
    if (error != nullptr) *error = err.message();
    return {status, std::move(app)};
  }

  // n CONNECTs with r, opened back to back without waiting for any :status, and the loop run
  // until every one has its :status (bounded: 10 s).
  struct Burst {
    std::vector<int> statuses;   // -1: no :status yet
    std::vector<std::string> errors;  // why, for those without a 200
    std::vector<UniqueFd> apps;  // the apps' ends of the tunnels' local sockets
    bool answered = false;       // every CONNECT got its :status in time
    long count(int status) const { return std::count(statuses.begin(), statuses.end(), status); }
  };
  Burst openBurst(const OutboundConnect& r, int n) {
    Burst b;
    b.statuses.assign(n, -1);
    b.errors.assign(n, "");
    for (int i = 0; i < n; ++i) {
      auto [local, app] = tcpPair();
      b.apps.push_back(std::move(app));
      // The elements, not the vectors: their storage stays put when the Burst is returned.
      int* slot = &b.statuses[i];
      std::string* why = &b.errors[i];
      client_->open(r, std::move(local), [slot, why](int st, const Status& e) {
        *slot = st;
        *why = e.message();
      });
    }
    b.answered = runUntil(&loop_, [&] { return b.count(-1) == 0; }, std::chrono::seconds(10));
    return b;
  }

  // Turns the loop for `d` (timers, idle timeouts).
  void runLoopFor(std::chrono::milliseconds d) {
    auto until = std::chrono::steady_clock::now() + d;
    runUntil(&loop_, [&] { return std::chrono::steady_clock::now() > until; });
  }

  // The app writes `data` and its FIN into the tunnel and reads until the tunnel's EOF (on a
  // thread, while the loop turns); returns what came back.
  std::string sendAndReadToEof(int fd, const std::string& data) {
    std::string back;
    withThread([&] {
      writeAll(fd, data);
      ::shutdown(fd, SHUT_WR);  // an echo upstream answers only after this FIN (END_STREAM)
      back = readToEof(fd);     // and its FIN comes back as END_STREAM -> EOF here
    });
    return back;
  }

  // Runs fn on a thread while the loop turns; waits for it (bounded).
  void withThread(const std::function<void()>& fn) {
    std::atomic<bool> done{false};
    std::thread t([&] {
      fn();
      done = true;
    });
    bool finished = runUntil(&loop_, [&] { return done.load(); }, std::chrono::seconds(60));
    t.join();
    EXPECT_TRUE(finished);
  }

  static std::unique_ptr<CertDir> certs_;
  static bool certsOk_;
  uv_loop_t loop_{};
  std::unique_ptr<HboneServer> server_;
  std::unique_ptr<HboneClient> client_;
  uint16_t hbonePort_ = 0;
  // The decision's verdict for every CONNECT.
  InboundDecision::Verdict verdict_ = InboundDecision::Verdict::kAllow;
  uint32_t serverMaxStreams_ = 0;  // SETTINGS_MAX_CONCURRENT_STREAMS; 0 = the default
  InboundConnect lastRequest_;
};

std::unique_ptr<CertDir> HboneTest::certs_;
bool HboneTest::certsOk_ = false;

// An upstream that echoes everything until EOF, then closes its write side. Joined by join()
// or at scope exit (first unblocking its accept() if no tunnel ever reached it).
class EchoUpstream {
 public:
  EchoUpstream()
      : thread_([this] {
          UniqueFd c = listener_.accept();
          std::string got = readToEof(c.get());
          writeAll(c.get(), got);
          ::shutdown(c.get(), SHUT_WR);
          readToEof(c.get());
        }) {}
  uint16_t port() const { return listener_.port(); }
  void join() { thread_.join(); }

 private:
  Listener listener_;
  std::thread thread_;
  JoinUpstream guard_{listener_, thread_};
};

// An upstream that takes one connection but reads nothing until startReading(), then reads to
// EOF; got() is how many bytes arrived. Joined as EchoUpstream (told to read first, so a test
// that failed before startReading() does not leave it waiting).
class StalledUpstream {
 public:
  StalledUpstream()
      : thread_([this] {
          UniqueFd c = listener_.accept();
          while (!reading_) ::usleep(1000);
          got_ = readToEof(c.get()).size();
        }) {}
  ~StalledUpstream() { reading_ = true; }
  uint16_t port() const { return listener_.port(); }
  void startReading() { reading_ = true; }
  size_t got() const { return got_.load(); }
  void join() { thread_.join(); }

 private:
  Listener listener_;
  std::atomic<bool> reading_{false};
  std::atomic<size_t> got_{0};
  std::thread thread_;
  JoinUpstream guard_{listener_, thread_};
};

TEST_F(HboneTest, ConnectGets200AndEchoesWithHalfClose) {
  EchoUpstream up;
  std::string err;
  auto [status, app] = open(request(up.port()), &err);
  ASSERT_EQ(status, 200) << err;
  std::string back = sendAndReadToEof(app.get(), "hello through hbone");
  up.join();
  EXPECT_EQ(back, "hello through hbone");
  // Headers and identity seen by the server's decision.
  EXPECT_EQ(lastRequest_.peerIdentity, kClientId);
  EXPECT_EQ(lastRequest_.authority, "127.0.0.1:" + std::to_string(up.port()));
  bool fwd = false, bag = false, trace = false;
  for (const auto& [k, v] : lastRequest_.headers) {
    if (k == "forwarded") fwd = v == "for=\"10.1.2.3:4567\"";
    if (k == "baggage") bag = v == "k8s.namespace.name=default";
    if (k == "traceparent") trace = v.size() == 55 && v.rfind("00-", 0) == 0;
  }
  EXPECT_TRUE(fwd && bag && trace);
  EXPECT_EQ(server_->stats().ok200, 1u);
}

TEST_F(HboneTest, UpstreamHalfCloseFirstKeepsTheOtherDirection) {
  Listener up;
  std::string upstreamGot;
  std::atomic<bool> upstreamDone{false};
  std::thread upstream([&] {
    UniqueFd c = up.accept();
    writeAll(c.get(), "server speaks first");
    ::shutdown(c.get(), SHUT_WR);
    upstreamGot = readToEof(c.get());
    upstreamDone = true;
  });
  JoinUpstream guard(up, upstream);
  std::string err;
  auto [status, app] = open(request(up.port()), &err);
  ASSERT_EQ(status, 200) << err;
  std::string got;
  withThread([&, fd = app.get()] {
    got = readToEof(fd);                  // EOF: the upstream's FIN came through
    writeAll(fd, "client answers after"); // our direction still open
    ::shutdown(fd, SHUT_WR);
  });
  // The loop keeps relaying until the upstream saw our bytes and FIN.
  EXPECT_TRUE(runUntil(&loop_, [&] { return upstreamDone.load(); }));
  upstream.join();
  EXPECT_EQ(got, "server speaks first");
  EXPECT_EQ(upstreamGot, "client answers after");
}

TEST_F(HboneTest, EightMebibytesBothWays) {
  EchoUpstream up;
  std::string err;
  auto [status, app] = open(request(up.port()), &err);
  ASSERT_EQ(status, 200) << err;
  std::string payload(8u << 20, '\0');
  std::mt19937 rng(42);
  for (auto& c : payload) c = static_cast<char>(rng());
  std::string back;
  withThread([&, fd = app.get()] {
    std::thread writer([&] {
      writeAll(fd, payload);
      ::shutdown(fd, SHUT_WR);
    });
    back = readToEof(fd);
    writer.join();
  });
  up.join();
  EXPECT_EQ(back.size(), payload.size());
  EXPECT_TRUE(back == payload);
}

TEST_F(HboneTest, DeniedIs401) {
  verdict_ = InboundDecision::Verdict::kDeny;
  Listener up;
  std::string err;
  auto [status, app] = open(request(up.port()), &err);
  EXPECT_EQ(status, 401) << err;
  EXPECT_EQ(server_->stats().denied401, 1u);
}

// The caller's own libuv handle of the local socket becomes the tunnel's socket as it is.
TEST_F(HboneTest, LocalHandleBecomesTheTunnel) {
  EchoUpstream up;
  auto [local, app] = tcpPair();
  auto* handle = new uv_tcp_t{};
  ASSERT_EQ(uv_tcp_init(&loop_, handle), 0);
  ASSERT_EQ(uv_tcp_open(handle, local.release()), 0);
  int status = -1;
  Status err;
  client_->open(request(up.port()), handle, [&](int st, const Status& e) {
    status = st;
    err = e;
  });
  ASSERT_TRUE(runUntil(&loop_, [&] { return status != -1; }));
  ASSERT_EQ(status, 200) << err.message();
  std::string back = sendAndReadToEof(app.get(), "through the caller's handle");
  up.join();
  EXPECT_EQ(back, "through the caller's handle");
}

// A handle whose stream is refused is reset (the app sees RST, not a clean FIN) and freed (ASan
// reports a leak otherwise).
TEST_F(HboneTest, LocalHandleOfARefusedStreamIsReset) {
  verdict_ = InboundDecision::Verdict::kDeny;
  Listener up;
  auto [local, app] = tcpPair();
  auto* handle = new uv_tcp_t{};
  ASSERT_EQ(uv_tcp_init(&loop_, handle), 0);
  ASSERT_EQ(uv_tcp_open(handle, local.release()), 0);
  int status = -1;
  client_->open(request(up.port()), handle, [&](int st, const Status&) { status = st; });
  ASSERT_TRUE(runUntil(&loop_, [&] { return status != -1; }));
  EXPECT_EQ(status, 401);
  // The first receive after the reset reports it (later ones see a closed socket: 0).
  ssize_t n = 0;
  int err = 0;
  bool seen = false;
  ASSERT_TRUE(runUntil(&loop_, [&] {
    if (seen) return true;
    char c;
    n = ::recv(app.get(), &c, 1, MSG_DONTWAIT);
    err = n < 0 ? errno : 0;
    seen = !(n < 0 && err == EAGAIN);
    return seen;
  }));
  EXPECT_EQ(n, -1) << "the app's socket got a FIN or bytes, not a reset";
  EXPECT_EQ(err, ECONNRESET);
}

TEST_F(HboneTest, UpstreamRefusedIs503) {
  uint16_t closedPort;
  {
    Listener gone;
    closedPort = gone.port();
  }
  auto [status, app] = open(request(closedPort));
  EXPECT_EQ(status, 503);
  EXPECT_EQ(server_->stats().failed503, 1u);
}

TEST_F(HboneTest, MalformedDecisionIs400) {
  // The decision reports the authority is not this pod's: 400 as Istio.
  verdict_ = InboundDecision::Verdict::kMalformed;
  auto [status, app] = open(request(1234));
  EXPECT_EQ(status, 400);
}

TEST_F(HboneTest, WrongServerIdentityRefusedByClient) {
  OutboundConnect r = request(1);
  r.destinationIdentity = "spiffe://cluster.local/ns/default/sa/someone-else";
  std::string err;
  auto [status, app] = open(r, &err);
  EXPECT_EQ(status, 0);
  EXPECT_NE(err.find("server identity is not"), std::string::npos) << err;
  EXPECT_EQ(client_->handshakes(), 0u);
  EXPECT_EQ(client_->handshakeFailures(), 1u);
  expectOneRefusal(TlsRefusalCounts{}, clientRefusals(), TlsRefusal::kWrongIdentity);
}

// A certificate (one of the fixture's leaves) that the other side refuses, and the reason it
// counts. `name` names the case in the test's name.
struct Refusal {
  const char* name;
  const char* leaf;
  TlsRefusal why;
};

std::string refusalCaseName(const ::testing::TestParamInfo<Refusal>& info) {
  return info.param.name;
}

// Client-side refusals, counted by HboneClient::refusals(). The server presents `leaf`; the
// client expects kServerId: no tunnel, and the client counts one failed handshake, with reason
// `why` and no other.
class HboneClientRefusalTest : public HboneTest, public ::testing::WithParamInterface<Refusal> {};

TEST_P(HboneClientRefusalTest, ServerCertRefused) {
  const Refusal& c = GetParam();
  startServer(c.leaf);
  TlsRefusalCounts before = clientRefusals();
  std::string err;
  auto [status, app] = open(request(1), &err);
  EXPECT_EQ(status, 0);
  EXPECT_FALSE(err.empty());
  EXPECT_EQ(client_->handshakes(), 0u);
  EXPECT_EQ(client_->handshakeFailures(), 1u);
  expectOneRefusal(before, clientRefusals(), c.why);
  EXPECT_EQ(refusalTotal(clientRefusals()), client_->handshakeFailures());
  // The server sees the client's alert: a failed handshake too, of its own kind.
  EXPECT_TRUE(runUntil(&loop_, [&] { return server_->stats().handshakeFailures == 1; }));
  EXPECT_EQ(server_->stats().refused[static_cast<size_t>(TlsRefusal::kProtocol)], 1u);
}

INSTANTIATE_TEST_SUITE_P(
    Reasons, HboneClientRefusalTest,
    ::testing::Values(
        Refusal{"ServerWithAnotherIdentityRefusedWrongIdentity", "impostor",
                TlsRefusal::kWrongIdentity},
        Refusal{"ServerWithoutSpiffeSanRefusedBadIdentity", "webserver", TlsRefusal::kBadIdentity}),
    refusalCaseName);

// Server-side refusals of the client's certificate, counted in ServerStats::refused. The client
// presents `leaf`: no tunnel, and the server counts one failed handshake, with reason `why` and
// no other.
class HboneServerRefusalTest : public HboneTest, public ::testing::WithParamInterface<Refusal> {};

TEST_P(HboneServerRefusalTest, ClientCertRefused) {
  const Refusal& c = GetParam();
  TlsRefusalCounts before = server_->stats().refused;
  Listener up;
  std::string err;
  auto [status, app] = open(request(up.port(), c.leaf), &err);
  EXPECT_EQ(status, 0) << c.leaf;
  EXPECT_FALSE(err.empty());
  EXPECT_TRUE(runUntil(&loop_, [&] { return server_->stats().handshakeFailures == 1; }));
  EXPECT_EQ(server_->stats().handshakes, 0u);
  EXPECT_EQ(server_->stats().streams, 0u);
  expectOneRefusal(before, server_->stats().refused, c.why);
  EXPECT_EQ(refusalTotal(server_->stats().refused), server_->stats().handshakeFailures);
}

INSTANTIATE_TEST_SUITE_P(
    Reasons, HboneServerRefusalTest,
    ::testing::Values(
        Refusal{"ClientCertOfAnotherCaRefusedUntrusted", "foreign", TlsRefusal::kUntrusted},
        Refusal{"ExpiredClientCertRefusedExpired", "expired", TlsRefusal::kExpired},
        Refusal{"NotYetValidClientCertRefusedNotYetValid", "notyetvalid", TlsRefusal::kNotYetValid},
        Refusal{"ClientCertOfAnotherTrustDomainRefusedTrustDomain", "otherdomain",
                TlsRefusal::kTrustDomain},
        Refusal{"ClientCertWithMalformedSpiffeIdRefusedBadIdentity", "badsan",
                TlsRefusal::kBadIdentity}),
    refusalCaseName);

// Refusals leave the counters of a good handshake alone.
TEST_F(HboneTest, AcceptedHandshakeCountsNoRefusal) {
  EchoUpstream up;
  std::string err;
  auto [status, app] = open(request(up.port()), &err);
  ASSERT_EQ(status, 200) << err;
  withThread([fd = app.get()] { ::shutdown(fd, SHUT_WR); readToEof(fd); });
  EXPECT_EQ(server_->stats().handshakes, 1u);
  EXPECT_EQ(refusalTotal(server_->stats().refused), 0u);
  EXPECT_EQ(refusalTotal(clientRefusals()), 0u);
}

TEST_F(HboneTest, HundredSequentialStreamsOneHandshake) {
  Listener up;
  std::atomic<int> served{0};
  std::thread upstream([&] {
    for (int i = 0; i < 100; ++i) {
      UniqueFd c = up.accept();
      std::string got = readToEof(c.get());
      writeAll(c.get(), got);
      ::shutdown(c.get(), SHUT_WR);
      ++served;
    }
  });
  JoinUpstream guard(up, upstream);
  OutboundConnect r = request(up.port());
  for (int i = 0; i < 100; ++i) {
    std::string err;
    auto [status, app] = open(r, &err);
    ASSERT_EQ(status, 200) << i << " " << err;
    ASSERT_EQ(sendAndReadToEof(app.get(), "n" + std::to_string(i)), "n" + std::to_string(i));
  }
  upstream.join();
  EXPECT_EQ(served.load(), 100);
  EXPECT_EQ(client_->handshakes(), 1u);
  EXPECT_EQ(client_->connections(), 1u);
  EXPECT_EQ(server_->stats().handshakes, 1u);
}

TEST_F(HboneTest, BurstOfTunnelsStaysWithinTheServersStreamLimit) {
  // A burst of CONNECTs onto a ready pooled connection: the ones still waiting for their 200
  // count against the server's SETTINGS_MAX_CONCURRENT_STREAMS too. Streams past it would wait
  // inside nghttp2 for others to end, which long-lived tunnels never do: they go on a second
  // connection instead.
  serverMaxStreams_ = 20;
  startServer("server");
  Listener up;  // never accepts: the kernel completes the upstream connects from its backlog
  OutboundConnect r = request(up.port());
  std::string err;
  auto [first, firstApp] = open(r, &err);
  ASSERT_EQ(first, 200) << err;
  constexpr int kBurst = 30;
  Burst burst = openBurst(r, kBurst);
  EXPECT_TRUE(burst.answered) << burst.count(-1) << " tunnels never answered";
  EXPECT_EQ(burst.count(200), kBurst);
  EXPECT_EQ(client_->connections(), 2u);
  EXPECT_EQ(server_->stats().ok200, static_cast<uint64_t>(kBurst + 1));
}

TEST_F(HboneTest, SpareIdleConnectionsCloseAndTheFirstStaysPooled) {
  // A burst past the server's stream limit dials a second connection to the same peer. Once
  // every tunnel has ended, that spare closes after spareIdleTimeout; the first one stays for
  // the (long) idle timeout and takes the next tunnel without a new handshake.
  serverMaxStreams_ = 20;
  startServer("server");
  ClientConfig cc;
  cc.settings.spareIdleTimeout = std::chrono::milliseconds(200);
  client_ = std::make_unique<HboneClient>(&loop_, cc);
  Listener up;  // never accepts: the kernel completes the upstream connects from its backlog
  OutboundConnect r = request(up.port());
  std::string err;
  auto [first, firstApp] = open(r, &err);  // the first connection is up (the server's limit known)
  ASSERT_EQ(first, 200) << err;
  constexpr int kBurst = 30;
  Burst burst = openBurst(r, kBurst);
  ASSERT_TRUE(burst.answered) << burst.count(-1) << " tunnels never answered";
  ASSERT_EQ(burst.count(200), kBurst);
  ASSERT_EQ(client_->connections(), 2u);
  uint64_t handshakes = client_->handshakes();
  // Held for longer than spareIdleTimeout: busy connections are not spares.
  runLoopFor(std::chrono::milliseconds(600));
  EXPECT_EQ(client_->connections(), 2u) << "a connection with tunnels was closed";
  // The apps reset their sockets: every tunnel ends (RST_STREAM).
  burst.apps.push_back(std::move(firstApp));
  for (UniqueFd& a : burst.apps) {
    linger l{1, 0};
    ::setsockopt(a.get(), SOL_SOCKET, SO_LINGER, &l, sizeof(l));
    a.reset();
  }
  EXPECT_TRUE(runUntil(&loop_, [&] { return client_->connections() == 1; },
                       std::chrono::seconds(5)))
      << client_->connections() << " pooled connections";
  EXPECT_TRUE(runUntil(&loop_, [&] { return server_->connections() == 1; },
                       std::chrono::seconds(5)))
      << server_->connections() << " server connections";
  runLoopFor(std::chrono::milliseconds(600));
  EXPECT_EQ(client_->connections(), 1u) << "the last pooled connection closed as a spare";
  auto [status, app] = open(r, &err);
  EXPECT_EQ(status, 200) << err;
  EXPECT_EQ(client_->connections(), 1u);
  EXPECT_EQ(client_->handshakes(), handshakes) << "the next tunnel dialled anew";
}

TEST_F(HboneTest, SlowUpstreamBoundsBuffering) {
  // The upstream does not read for a while: the tunnel must stop taking the sender's bytes
  // after about one stream window plus the kernel socket buffers on the way (tens of MiB on
  // loopback), not buffer all 128 MiB.
  constexpr size_t kTotal = 128u << 20;
  StalledUpstream up;
  std::string err;
  auto [status, app] = open(request(up.port()), &err);
  ASSERT_EQ(status, 200) << err;
  std::atomic<size_t> written{0};
  std::atomic<bool> writerDone{false};
  std::thread writer([&, fd = app.get()] {
    std::string chunk(64 * 1024, 'w');
    while (written < kTotal) {
      ssize_t n = ::write(fd, chunk.data(), chunk.size());
      if (n <= 0) break;
      written += static_cast<size_t>(n);
    }
    ::shutdown(fd, SHUT_WR);
    writerDone = true;
  });
  runLoopFor(std::chrono::seconds(2));
  size_t stalledAt = written;
  std::cout << "accepted while the upstream was stalled: " << stalledAt << " bytes\n";
  EXPECT_LT(stalledAt, 64u << 20) << "bytes accepted while the upstream was not reading";
  EXPECT_FALSE(writerDone.load());
  up.startReading();
  EXPECT_TRUE(runUntil(&loop_, [&] { return up.got() != 0 && writerDone.load(); },
                       std::chrono::seconds(60)));
  writer.join();
  up.join();
  EXPECT_EQ(up.got(), kTotal);
}

TEST_F(HboneTest, IdlePooledConnectionDropped) {
  ClientConfig cc;
  cc.settings.idleTimeout = std::chrono::milliseconds(300);
  client_ = std::make_unique<HboneClient>(&loop_, cc);
  EchoUpstream up;
  std::string err;
  auto [status, app] = open(request(up.port()), &err);
  ASSERT_EQ(status, 200) << err;
  EXPECT_EQ(sendAndReadToEof(app.get(), "x"), "x");
  EXPECT_EQ(client_->connections(), 1u);
  // No streams for the idle timeout: GOAWAY and close, on both sides.
  EXPECT_TRUE(runUntil(&loop_, [&] { return client_->connections() == 0; },
                       std::chrono::seconds(5)));
  EXPECT_TRUE(runUntil(&loop_, [&] { return server_->connections() == 0; },
                       std::chrono::seconds(5)));
}

// A slow reader behind the server: the server's tunnel fills its stream window and stops; the
// client stops reading its app once its own bound is reached. Neither side holds more than
// bufferBound() for one tunnel, and the sampled figures show the bound was actually pressed.
TEST_F(HboneTest, SlowReaderHoldsAtMostTheBufferBound) {
  StalledUpstream up;
  std::string err;
  auto [status, app] = open(request(up.port()), &err);
  ASSERT_EQ(status, 200) << err;
  constexpr size_t kTotal = 96u << 20;
  std::atomic<bool> writerDone{false};
  std::thread writer([&, fd = app.get()] {
    std::string chunk(128 * 1024, 'm');
    size_t written = 0;
    while (written < kTotal) {
      ssize_t n = ::write(fd, chunk.data(), std::min(chunk.size(), kTotal - written));
      if (n <= 0) break;
      written += static_cast<size_t>(n);
    }
    ::shutdown(fd, SHUT_WR);
    writerDone = true;
  });
  size_t serverMax = 0;
  size_t clientMax = 0;
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(3);
  runUntil(&loop_, [&] {
    serverMax = std::max(serverMax, server_->bufferedBytes());
    clientMax = std::max(clientMax, client_->bufferedBytes());
    return std::chrono::steady_clock::now() > until;
  });
  H2Settings defaults;
  size_t bound = bufferBound(defaults, 1);
  std::cout << "slow reader: server held at most " << serverMax << " bytes, client " << clientMax
            << ", bound " << bound << "\n";
  EXPECT_FALSE(writerDone.load()) << "the sender was never stopped";
  EXPECT_LE(serverMax, bound);
  EXPECT_LE(clientMax, bound);
  // The server really queued part of what its stream window let in (the kernel's socket
  // buffers took the rest, a few MiB on loopback): the measure sees the buffering it bounds.
  EXPECT_GE(serverMax, size_t{512} << 10);
  up.startReading();
  EXPECT_TRUE(runUntil(&loop_, [&] { return up.got() != 0 && writerDone.load(); },
                       std::chrono::seconds(60)));
  writer.join();
  up.join();
  EXPECT_EQ(up.got(), kTotal);
  // Drained: the tunnel gives its chunks back; nothing stays buffered.
  EXPECT_TRUE(runUntil(&loop_, [&] {
    return server_->bufferedBytes() == 0 && client_->bufferedBytes() == 0;
  }, std::chrono::seconds(5)));
}

// FNV-1a over a byte stream, for comparing large transfers without keeping them.
struct Fnv {
  uint64_t h = 1469598103934665603ull;
  void add(const char* p, size_t n) {
    for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<uint8_t>(p[i])) * 1099511628211ull;
  }
};

// Reads `fd` until EOF (or an error, or 60 s of silence) into `hash`; returns the bytes read.
size_t hashToEof(int fd, Fnv& hash) {
  timeval tv{60, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  size_t got = 0;
  std::string buf(256 * 1024, '\0');
  while (true) {
    ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n <= 0) break;
    hash.add(buf.data(), static_cast<size_t>(n));
    got += static_cast<size_t>(n);
  }
  return got;
}

// `total` random bytes cut into pieces of random sizes (1 byte to 300 KiB, so chunk, record and
// frame boundaries fall everywhere); the same bytes and cuts for the same seed.
class RandomPieces {
 public:
  RandomPieces(uint32_t seed, size_t total) : bytes_(seed), sizes_(seed + 1), left_(total) {}
  // The next piece into `piece`; false once all `total` bytes were given.
  bool next(std::string& piece) {
    if (left_ == 0) return false;
    size_t n = std::min<size_t>(left_, 1 + sizes_() % (300 * 1024));
    piece.resize(n);
    for (auto& c : piece) c = static_cast<char>(bytes_());
    left_ -= n;
    return true;
  }

 private:
  std::mt19937 bytes_;
  std::mt19937 sizes_;
  size_t left_;
};

// 48 MiB each way in writes of random sizes: every byte arrives, in order, and each half-close
// arrives after the last byte of its direction (a FIN ahead of its bytes would cut a count
// short); the upstream answers only once it has read the client's FIN, so the tunnel must stay
// half-open.
TEST_F(HboneTest, LargeTransfersKeepByteOrderAndHalfClose) {
  constexpr size_t kEach = 48u << 20;
  constexpr uint32_t kRequestSeed = 3;
  constexpr uint32_t kAnswerSeed = 7;
  Listener up;
  std::atomic<uint64_t> upHash{0};
  std::atomic<size_t> upGot{0};
  std::thread upstream([&] {
    UniqueFd c = up.accept();
    Fnv f;
    upGot = hashToEof(c.get(), f);
    upHash = f.h;
    // Only after the client's FIN: the answer, then our FIN.
    RandomPieces answer(kAnswerSeed, kEach);
    std::string piece;
    while (answer.next(piece)) {
      if (!writeAll(c.get(), piece)) break;
    }
    ::shutdown(c.get(), SHUT_WR);
  });
  JoinUpstream guard(up, upstream);
  std::string err;
  auto [status, app] = open(request(up.port()), &err);
  ASSERT_EQ(status, 200) << err;
  Fnv sentHash;
  Fnv expectBack;
  {
    RandomPieces answer(kAnswerSeed, kEach);
    std::string piece;
    while (answer.next(piece)) expectBack.add(piece.data(), piece.size());
  }
  Fnv backHash;
  size_t backGot = 0;
  withThread([&, fd = app.get()] {
    std::thread w([&] {
      RandomPieces request(kRequestSeed, kEach);
      std::string piece;
      while (request.next(piece)) {
        sentHash.add(piece.data(), piece.size());
        if (!writeAll(fd, piece)) break;
      }
      ::shutdown(fd, SHUT_WR);
    });
    backGot = hashToEof(fd, backHash);
    w.join();
  });
  upstream.join();
  EXPECT_EQ(upGot.load(), kEach);
  EXPECT_EQ(upHash.load(), sentHash.h) << "client -> upstream bytes differ or are out of order";
  EXPECT_EQ(backGot, kEach);
  EXPECT_EQ(backHash.h, expectBack.h) << "upstream -> client bytes differ or are out of order";
}

// A cold burst: no connection to the peer yet, so every CONNECT goes onto the first one before
// the server's SETTINGS announce its stream limit. The server refuses the streams past it
// unanswered (RST_STREAM REFUSED_STREAM), which were not processed; the client sends them
// again, on a second connection, and every app gets its tunnel.
TEST_F(HboneTest, ColdBurstPastTheServersStreamLimitIsSentAgain) {
  serverMaxStreams_ = 20;
  startServer("server");
  Listener up;  // never accepts: the kernel completes the upstream connects from its backlog
  constexpr int kBurst = 30;
  Burst burst = openBurst(request(up.port()), kBurst);
  EXPECT_TRUE(burst.answered) << burst.count(-1) << " tunnels never answered";
  EXPECT_EQ(burst.count(200), kBurst);
  EXPECT_EQ(client_->streamRetries(), 10u);
  EXPECT_EQ(client_->connections(), 2u);
  EXPECT_EQ(server_->stats().ok200, static_cast<uint64_t>(kBurst));
}

// With no retries left a refused CONNECT fails with the reason, and its app's connection ends.
TEST_F(HboneTest, RefusedConnectFailsWhenNoRetryIsLeft) {
  serverMaxStreams_ = 20;
  startServer("server");
  ClientConfig cc;
  cc.maxRefusedRetries = 0;
  client_ = std::make_unique<HboneClient>(&loop_, cc);
  Listener up;
  constexpr int kBurst = 30;
  Burst burst = openBurst(request(up.port()), kBurst);
  ASSERT_TRUE(burst.answered);
  EXPECT_EQ(burst.count(200), 20);
  EXPECT_EQ(client_->streamRetries(), 0u);
  for (int i = 0; i < kBurst; ++i) {
    if (burst.statuses[i] == 200) continue;
    EXPECT_EQ(burst.statuses[i], 0);
    EXPECT_NE(burst.errors[i].find("refused unanswered"), std::string::npos) << burst.errors[i];
    pollfd p{burst.apps[i].get(), POLLIN, 0};
    ASSERT_EQ(::poll(&p, 1, 5000), 1) << "app " << i << " still connected";
    char byte;
    EXPECT_LE(::recv(burst.apps[i].get(), &byte, 1, 0), 0) << "app " << i;
  }
}

TEST(HboneSpiffe, TrustDomainParsing) {
  EXPECT_EQ(spiffeTrustDomain("spiffe://cluster.local/ns/a/sa/b"), "cluster.local");
  EXPECT_EQ(spiffeTrustDomain("spiffe://cluster.local/ns/a/sa/"), "");
  EXPECT_EQ(spiffeTrustDomain("spiffe://cluster.local/ns/a/sa/b/c"), "");
  EXPECT_EQ(spiffeTrustDomain("https://cluster.local/ns/a/sa/b"), "");
  EXPECT_EQ(spiffeTrustDomain("spiffe://td/xx/a/sa/b"), "");
}

TEST(HboneTlsRefusal, Names) {
  const std::pair<TlsRefusal, std::string> names[] = {
      {TlsRefusal::kNone, "none"},
      {TlsRefusal::kNoPeerCertificate, "no_peer_certificate"},
      {TlsRefusal::kUntrusted, "untrusted"},
      {TlsRefusal::kExpired, "expired"},
      {TlsRefusal::kNotYetValid, "not_yet_valid"},
      {TlsRefusal::kTrustDomain, "trust_domain"},
      {TlsRefusal::kWrongIdentity, "wrong_identity"},
      {TlsRefusal::kBadIdentity, "bad_identity"},
      {TlsRefusal::kProtocol, "protocol"},
  };
  static_assert(std::size(names) == kTlsRefusalCount);
  for (const auto& [r, name] : names) EXPECT_EQ(tlsRefusalName(r), name);
}

TEST(HboneTraceparent, Format) {
  std::string t = HboneClient::makeTraceparent();
  ASSERT_EQ(t.size(), 55u);
  EXPECT_EQ(t.substr(0, 3), "00-");
  EXPECT_EQ(t[35], '-');
  EXPECT_EQ(t.substr(52), "-00");
}

// The ids come from a per-thread generator seeded once: every one is lower-case hex, not the
// invalid all-zero id, and no two of many are alike (trace id or span id).
TEST(HboneTraceparent, IdsAreHexNonZeroAndDistinct) {
  std::set<std::string> traces, spans;
  for (int i = 0; i < 20000; ++i) {
    std::string t = HboneClient::makeTraceparent();
    ASSERT_EQ(t.size(), 55u);
    std::string trace = t.substr(3, 32), span = t.substr(36, 16);
    for (char ch : trace + span) ASSERT_TRUE(std::isxdigit(ch) && !std::isupper(ch)) << t;
    EXPECT_NE(trace, std::string(32, '0'));
    EXPECT_NE(span, std::string(16, '0'));
    traces.insert(trace);
    spans.insert(span);
  }
  EXPECT_EQ(traces.size(), 20000u);
  EXPECT_EQ(spans.size(), 20000u);
  // Another thread has its own generator, seeded on its own: its ids are not this thread's.
  std::string other;
  std::thread([&] { other = HboneClient::makeTraceparent(); }).join();
  EXPECT_EQ(traces.count(other.substr(3, 32)), 0u);
}

}  // namespace
}  // namespace weft::hbone
