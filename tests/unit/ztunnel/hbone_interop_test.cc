// HBONE against peers nobody here wrote: python3-h2 as CONNECT client and as CONNECT server
// (tests/fixtures/hbone/*.py, run with Debian's /usr/bin/python3), Node's http2 module as
// CONNECT client (h2_connect_client.js, /usr/bin/node), and openssl s_client handshakes the
// server must refuse and count by reason (no client certificate, TLS 1.2 only, ALPN http/1.1).
#include <atomic>
#include <cstdio>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "tests/unit/ztunnel/hbone_test_util.h"
#include "ztunnel/hbone/client.h"
#include "ztunnel/hbone/server.h"

namespace weft::hbone {
namespace {

using namespace weft::hbone::testing;

const std::string kFixtures = std::string(WEFT_SOURCE_DIR) + "/tests/fixtures/hbone";

bool havePythonH2() { return sh("/usr/bin/python3 -c 'import h2'"); }
bool haveNode() { return sh("/usr/bin/node -e 'require(\"http2\")'"); }

// Runs a command, returns its stdout (bounded by `timeout` in the command itself).
std::string capture(const std::string& cmd) {
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  ::pclose(p);
  return out;
}

class HboneInteropTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    certs_ = new CertDir();
    certsOk_ = certs_->ok() && certs_->makeLeaf("ca", "server", kServerId) &&
               certs_->makeLeaf("ca", "client", kClientId);
  }
  static void TearDownTestSuite() {
    delete certs_;
    certs_ = nullptr;
  }
  void SetUp() override {
    ASSERT_EQ(uv_loop_init(&loop_), 0);
    ASSERT_TRUE(certsOk_) << "openssl CLI could not make the test certificates";
    auto sctx = makeTlsContext(TlsRole::kServer, certs_->creds("server"));
    ASSERT_TRUE(sctx) << sctx.status().message();
    ServerConfig sc;
    sc.ctx = sctx.value();
    sc.decide = [this](const InboundConnect& req) {
      lastRequest_ = req;
      InboundDecision d;
      d.verdict = InboundDecision::Verdict::kAllow;
      return d;
    };
    server_ = std::make_unique<HboneServer>(&loop_, sc);
    Listener l;
    hbonePort_ = l.port();
    ASSERT_TRUE(server_->listen(l.release()));
  }
  void TearDown() override {
    server_.reset();
    drainLoop(&loop_);
    uv_loop_close(&loop_);
  }
  // Runs cmd on a thread while the loop turns; returns its stdout.
  std::string runPeer(const std::string& cmd) {
    std::atomic<bool> done{false};
    std::string out;
    std::thread t([&] {
      out = capture(cmd);
      done = true;
    });
    EXPECT_TRUE(runUntil(&loop_, [&] { return done.load(); }, std::chrono::seconds(60)));
    t.join();
    return out;
  }
  std::string sClient(const std::string& args) {
    return runPeer("timeout 20 openssl s_client -connect 127.0.0.1:" +
                   std::to_string(hbonePort_) + " -CAfile " + certs_->path("ca/ca.crt") + " " +
                   args + " </dev/null 2>&1");
  }
  std::string pyClient(const std::string& authority, const std::string& payload) {
    return runPeer("timeout 30 /usr/bin/python3 " + kFixtures + "/h2_connect_client.py 127.0.0.1 " +
                   std::to_string(hbonePort_) + " " + certs_->path("client.crt") + " " +
                   certs_->path("client.key") + " " + certs_->path("ca/ca.crt") + " '" +
                   authority + "' '" + payload + "'");
  }

  std::string nodeClient(const std::string& authority, const std::string& payload, int streams) {
    return runPeer("timeout 30 /usr/bin/node " + kFixtures + "/h2_connect_client.js 127.0.0.1 " +
                   std::to_string(hbonePort_) + " " + certs_->path("client.crt") + " " +
                   certs_->path("client.key") + " " + certs_->path("ca/ca.crt") + " '" +
                   kServerId + "' '" + authority + "' '" + payload + "' " +
                   std::to_string(streams) + " 2>&1");
  }
  // The s_client refusals: one failed handshake, counted with reason `why` only.
  void expectRefused(const std::string& out, TlsRefusal why) {
    EXPECT_TRUE(runUntil(&loop_, [&] { return server_->stats().handshakeFailures == 1; },
                         std::chrono::seconds(5))) << out;
    EXPECT_EQ(server_->stats().handshakes, 0u) << out;
    expectOneRefusal(TlsRefusalCounts{}, server_->stats().refused, why);
  }

  static CertDir* certs_;
  static bool certsOk_;
  uv_loop_t loop_{};
  std::unique_ptr<HboneServer> server_;
  uint16_t hbonePort_ = 0;
  InboundConnect lastRequest_;
};

CertDir* HboneInteropTest::certs_ = nullptr;
bool HboneInteropTest::certsOk_ = false;

TEST_F(HboneInteropTest, PythonH2ClientConnectsAndExchangesBytes) {
  if (!havePythonH2()) GTEST_SKIP() << "python3-h2 not installed (apt-get install python3-h2)";
  Listener up;
  std::thread upstream([&up] {
    UniqueFd c = up.accept();
    std::string got = readToEof(c.get());
    writeAll(c.get(), "echo:" + got);
    ::shutdown(c.get(), SHUT_WR);
  });
  JoinUpstream guard(up, upstream);
  std::string out = pyClient("127.0.0.1:" + std::to_string(up.port()), "from python h2");
  EXPECT_NE(out.find("\"status\": 200"), std::string::npos) << out;
  EXPECT_NE(out.find("\"received\": \"echo:from python h2\""), std::string::npos) << out;
  EXPECT_EQ(lastRequest_.peerIdentity, kClientId);
  EXPECT_EQ(server_->stats().ok200, 1u);
}

// Node's http2 (its own HTTP/2 framing and TLS setup): several CONNECT streams at once on one
// connection, each 200 and echoed by its own upstream connection.
TEST_F(HboneInteropTest, NodeHttp2ClientConnectsStreamsAndExchangesBytes) {
  if (!haveNode()) GTEST_SKIP() << "/usr/bin/node not installed (apt-get install nodejs)";
  constexpr int kStreams = 5;
  Listener up;
  std::atomic<int> served{0};
  std::thread upstream([&up, &served] {
    std::vector<std::thread> echoes;
    for (int i = 0; i < kStreams; ++i) {
      UniqueFd c = up.accept();
      if (c.get() < 0) break;  // shut down by JoinUpstream
      echoes.emplace_back([c = std::move(c), &served]() {
        std::string got = readToEof(c.get());
        writeAll(c.get(), "echo:" + got);
        ::shutdown(c.get(), SHUT_WR);
        ++served;
      });
    }
    for (auto& t : echoes) t.join();
  });
  JoinUpstream guard(up, upstream);
  std::string out = nodeClient("127.0.0.1:" + std::to_string(up.port()), "from node", kStreams);
  EXPECT_NE(out.find("\"alpn\":\"h2\""), std::string::npos) << out;
  EXPECT_NE(out.find("\"protocol\":\"TLSv1.3\""), std::string::npos) << out;
  EXPECT_NE(out.find("\"peer\":\"URI:" + kServerId + "\""), std::string::npos) << out;
  EXPECT_NE(out.find("\"error\":null"), std::string::npos) << out;
  for (int i = 0; i < kStreams; ++i) {
    std::string want = "{\"status\":200,\"received\":\"echo:from node-" + std::to_string(i) +
                       "\"";
    EXPECT_NE(out.find(want), std::string::npos) << want << " in " << out;
  }
  EXPECT_EQ(lastRequest_.peerIdentity, kClientId);
  EXPECT_EQ(server_->stats().handshakes, 1u);  // all streams on one connection
  EXPECT_EQ(server_->stats().streams, static_cast<uint64_t>(kStreams));
  EXPECT_EQ(server_->stats().ok200, static_cast<uint64_t>(kStreams));
  EXPECT_EQ(served.load(), kStreams);
}

TEST_F(HboneInteropTest, PythonH2ClientBadAuthorityIs400) {
  if (!havePythonH2()) GTEST_SKIP() << "python3-h2 not installed (apt-get install python3-h2)";
  std::string out = pyClient("not-an-address", "x");
  EXPECT_NE(out.find("\"status\": 400"), std::string::npos) << out;
  EXPECT_EQ(server_->stats().bad400, 1u);
}

TEST_F(HboneInteropTest, ClientAgainstPythonH2Server) {
  if (!havePythonH2()) GTEST_SKIP() << "python3-h2 not installed (apt-get install python3-h2)";
  std::string cmd = "timeout 30 /usr/bin/python3 " + kFixtures + "/h2_connect_server.py " +
                    certs_->path("server.crt") + " " + certs_->path("server.key") + " " +
                    certs_->path("ca/ca.crt");
  FILE* p = ::popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  char line[256] = {};
  ASSERT_NE(std::fgets(line, sizeof(line), p), nullptr);
  int port = std::atoi(line);
  ASSERT_GT(port, 0) << line;

  auto client = std::make_unique<HboneClient>(&loop_);
  OutboundConnect r;
  r.sourceIdentity = kClientId;
  auto ctx = makeTlsContext(TlsRole::kClient, certs_->creds("client"));
  ASSERT_TRUE(ctx) << ctx.status().message();
  r.ctx = ctx.value();
  r.destinationIdentity = kServerId;
  r.hboneAddress = *SocketAddress::parse("127.0.0.1:" + std::to_string(port));
  r.target = *SocketAddress::parse("10.0.0.7:8080");
  r.forwardedFor = *SocketAddress::parse("10.0.0.1:5555");
  r.baggage = "k8s.cluster.name=weft";
  auto [local, app] = tcpPair();
  int status = -1;
  Status err;
  client->open(r, std::move(local), [&](int st, const Status& e) {
    status = st;
    err = e;
  });
  EXPECT_TRUE(runUntil(&loop_, [&] { return status != -1; }));
  EXPECT_EQ(status, 200) << err.message();
  std::string back;
  if (status == 200) {
    std::atomic<bool> done{false};
    std::thread t([&, fd = app.get()] {
      writeAll(fd, "to python");
      ::shutdown(fd, SHUT_WR);
      back = readToEof(fd);
      done = true;
    });
    EXPECT_TRUE(runUntil(&loop_, [&] { return done.load(); }));
    t.join();
  }
  EXPECT_EQ(back, "to python");
  EXPECT_EQ(client->handshakes(), 1u);
  client.reset();  // closes the pooled connection: the python server then exits
  for (int i = 0; i < 50; ++i) uv_run(&loop_, UV_RUN_NOWAIT);
  std::string rest;
  while (std::fgets(line, sizeof(line), p) != nullptr) rest += line;
  ::pclose(p);
  EXPECT_NE(rest.find("\":authority\": \"10.0.0.7:8080\""), std::string::npos) << rest;
  EXPECT_NE(rest.find("\"forwarded\": \"for=\\\"10.0.0.1:5555\\\"\""), std::string::npos) << rest;
  EXPECT_NE(rest.find("\"baggage\": \"k8s.cluster.name=weft\""), std::string::npos) << rest;
  EXPECT_NE(rest.find(kClientId), std::string::npos) << rest;
}

// Control: s_client with a client certificate, TLS 1.3 and ALPN h2 is accepted, so the
// refusals below are about the one thing each changes.
TEST_F(HboneInteropTest, OpensslClientWithCertificateAccepted) {
  std::string out = sClient("-tls1_3 -alpn h2 -cert " + certs_->path("client.crt") + " -key " +
                            certs_->path("client.key"));
  EXPECT_TRUE(runUntil(&loop_, [&] { return server_->stats().handshakes == 1; },
                       std::chrono::seconds(5))) << out;
  EXPECT_EQ(server_->stats().handshakeFailures, 0u) << out;
  EXPECT_EQ(refusalTotal(server_->stats().refused), 0u) << out;
}

TEST_F(HboneInteropTest, OpensslWithoutClientCertificateRefused) {
  std::string out = sClient("-tls1_3 -alpn h2");
  expectRefused(out, TlsRefusal::kNoPeerCertificate);
}

TEST_F(HboneInteropTest, OpensslTls12OnlyRefused) {
  std::string out = sClient("-tls1_2 -alpn h2 -cert " + certs_->path("client.crt") + " -key " +
                            certs_->path("client.key"));
  expectRefused(out, TlsRefusal::kProtocol);
  EXPECT_NE(out.find("alert protocol version"), std::string::npos) << out;
}

TEST_F(HboneInteropTest, OpensslAlpnHttp11OnlyRefused) {
  std::string out = sClient("-tls1_3 -alpn http/1.1 -cert " + certs_->path("client.crt") +
                            " -key " + certs_->path("client.key"));
  expectRefused(out, TlsRefusal::kProtocol);
  EXPECT_NE(out.find("no application protocol"), std::string::npos) << out;
}

}  // namespace
}  // namespace weft::hbone
