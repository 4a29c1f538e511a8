// The admin HTTP server with real clients over TCP (port 0) and a unix socket: routing, bodies,
// malformed and oversized requests, slow clients.
#include "common/http_admin.h"

#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <thread>

namespace weft {
namespace {

// Runs the loop on the test thread while `client` runs on another, then stops the loop.
void runWithClient(uv_loop_t* loop, const std::function<void()>& client) {
  auto* stop = new uv_async_t;
  ASSERT_EQ(uv_async_init(loop, stop, [](uv_async_t* a) { uv_stop(a->loop); }), 0);
  std::thread t([&] {
    client();
    uv_async_send(stop);
  });
  uv_run(loop, UV_RUN_DEFAULT);
  t.join();
  // Freed by its close callback, which runs on a later turn of the loop.
  uv_close(reinterpret_cast<uv_handle_t*>(stop),
           [](uv_handle_t* h) { delete reinterpret_cast<uv_async_t*>(h); });
}

// Blocking client helpers; every wait is bounded by a poll timeout.
int connectTcp(const SocketAddress& a) {
  sockaddr_storage ss;
  socklen_t len = a.toSockaddr(&ss);
  int fd = socket(a.family(), SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  if (connect(fd, reinterpret_cast<sockaddr*>(&ss), len) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

int connectUnix(const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", path.c_str());
  if (connect(fd, reinterpret_cast<sockaddr*>(&sun), sizeof(sun)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

bool sendAll(int fd, const std::string& data) {
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = send(fd, data.data() + off, data.size() - off, MSG_NOSIGNAL);
    if (n <= 0) return false;
    off += static_cast<size_t>(n);
  }
  return true;
}

// Reads until EOF (or error, or 5 s). Returns what arrived.
std::string readAll(int fd, bool* got_eof = nullptr) {
  std::string out;
  char buf[4096];
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (std::chrono::steady_clock::now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 100) <= 0) continue;
    ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n == 0) {
      if (got_eof) *got_eof = true;
      break;
    }
    if (n < 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

std::string exchange(int fd, const std::string& req) {
  if (fd < 0) return "connect failed";
  sendAll(fd, req);
  std::string r = readAll(fd);
  close(fd);
  return r;
}

HttpResponse echoHandler(const HttpRequest& r) {
  if (r.path == "/missing") return HttpResponse{404, "text/plain", "no\n"};
  return HttpResponse{200, "application/json",
                      "{\"method\":\"" + r.method + "\",\"path\":\"" + r.path + "\",\"query\":\"" +
                          r.query + "\",\"body\":\"" + r.body + "\"}"};
}

class HttpAdminTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_EQ(uv_loop_init(&loop_), 0); }
  void TearDown() override {
    server_.reset();
    uv_run(&loop_, UV_RUN_DEFAULT);  // let close callbacks run
    EXPECT_EQ(uv_loop_close(&loop_), 0);
  }
  SocketAddress startTcp(uint64_t timeout_ms = kAdminRequestTimeoutMs) {
    auto s = HttpAdminServer::listenTcp(&loop_, *SocketAddress::parse("127.0.0.1:0"),
                                        echoHandler, timeout_ms);
    EXPECT_TRUE(s.isOk()) << s.status().message();
    if (!s.isOk()) return SocketAddress();
    server_ = std::move(s.value());
    return server_->boundAddress();
  }
  uv_loop_t loop_;
  HttpAdminServerPtr server_;
};

TEST_F(HttpAdminTest, GetOverTcp) {
  SocketAddress a = startTcp();
  ASSERT_NE(a.port(), 0);
  std::string resp;
  runWithClient(&loop_, [&] {
    resp = exchange(connectTcp(a), "GET /config_dump?x=1 HTTP/1.1\r\nHost: x\r\n\r\n");
  });
  EXPECT_EQ(resp.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << resp;
  EXPECT_NE(resp.find("Connection: close\r\n"), std::string::npos);
  std::string body =
      R"({"method":"GET","path":"/config_dump","query":"x=1","body":""})";
  EXPECT_NE(resp.find("Content-Length: " + std::to_string(body.size()) + "\r\n"),
            std::string::npos) << resp;
  EXPECT_EQ(resp.substr(resp.size() - body.size()), body);
}

TEST_F(HttpAdminTest, PostBodyByContentLengthInPieces) {
  SocketAddress a = startTcp();
  std::string resp;
  runWithClient(&loop_, [&] {
    int fd = connectTcp(a);
    ASSERT_GE(fd, 0);
    sendAll(fd, "POST /logging HTTP/1.1\r\ncontent-length: 9\r\n");
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    sendAll(fd, "\r\nlevel=");
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    sendAll(fd, "deb");
    resp = readAll(fd);
    close(fd);
  });
  EXPECT_NE(resp.find(R"("method":"POST","path":"/logging","query":"","body":"level=deb")"),
            std::string::npos) << resp;
}

TEST_F(HttpAdminTest, HandlerStatusPassesThrough) {
  SocketAddress a = startTcp();
  std::string resp;
  runWithClient(&loop_, [&] { resp = exchange(connectTcp(a), "GET /missing HTTP/1.0\r\n\r\n"); });
  EXPECT_EQ(resp.rfind("HTTP/1.1 404 Not Found\r\n", 0), 0u) << resp;
  EXPECT_NE(resp.find("Content-Type: text/plain\r\n"), std::string::npos);
}

TEST_F(HttpAdminTest, MalformedRequestsGet400) {
  SocketAddress a = startTcp();
  std::vector<std::string> bad = {
      "GARBAGE\r\n\r\n",
      "GET /x\r\n\r\n",
      "GET x HTTP/1.1\r\n\r\n",
      "GET /x HTTP/2.0\r\n\r\n",
      "GET /x HTTP/1.1\r\nno-colon-here\r\n\r\n",
      "POST /x HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
      "POST /x HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
      "POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
      "G(T /x HTTP/1.1\r\n\r\n",
  };
  std::vector<std::string> resps(bad.size());
  runWithClient(&loop_, [&] {
    for (size_t i = 0; i < bad.size(); i++) resps[i] = exchange(connectTcp(a), bad[i]);
  });
  for (size_t i = 0; i < bad.size(); i++) {
    EXPECT_EQ(resps[i].rfind("HTTP/1.1 400 Bad Request\r\n", 0), 0u)
        << "request: " << bad[i] << "\nresponse: " << resps[i];
  }
}

TEST_F(HttpAdminTest, OversizedRequestsRejected) {
  SocketAddress a = startTcp();
  std::string head_resp, body_resp;
  runWithClient(&loop_, [&] {
    // A head that never ends.
    std::string big = "GET /x HTTP/1.1\r\nX-Pad: " + std::string(kMaxAdminRequestBytes, 'a');
    head_resp = exchange(connectTcp(a), big);
    // A declared body beyond the limit: refused from the head alone.
    body_resp = exchange(connectTcp(a), "POST /x HTTP/1.1\r\nContent-Length: " +
                                            std::to_string(kMaxAdminRequestBytes) + "\r\n\r\n");
  });
  EXPECT_EQ(head_resp.rfind("HTTP/1.1 400", 0), 0u) << head_resp.substr(0, 200);
  EXPECT_EQ(body_resp.rfind("HTTP/1.1 400", 0), 0u) << body_resp.substr(0, 200);
}

TEST_F(HttpAdminTest, SlowClientTimesOut) {
  SocketAddress a = startTcp(200);
  bool eof = false;
  std::string resp;
  std::chrono::milliseconds took{};
  runWithClient(&loop_, [&] {
    int fd = connectTcp(a);
    ASSERT_GE(fd, 0);
    auto t0 = std::chrono::steady_clock::now();
    sendAll(fd, "GET /x HTTP/1.1\r\n");  // and never finish
    resp = readAll(fd, &eof);
    took = std::chrono::duration_cast<std::chrono::milliseconds>(
        std::chrono::steady_clock::now() - t0);
    close(fd);
  });
  EXPECT_TRUE(eof);
  EXPECT_TRUE(resp.empty()) << resp;
  EXPECT_GE(took.count(), 150);
  EXPECT_LT(took.count(), 3000);
}

TEST_F(HttpAdminTest, OverUnixSocket) {
  char tmpl[] = "/tmp/weft-http-test-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  std::string dir = tmpl;
  std::string path = dir + "/admin.sock";
  // A stale socket file from an earlier run is replaced.
  {
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un sun{};
    sun.sun_family = AF_UNIX;
    snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", path.c_str());
    ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&sun), sizeof(sun)), 0);
    close(fd);
  }
  auto s = HttpAdminServer::listenUnix(&loop_, path, echoHandler);
  ASSERT_TRUE(s.isOk()) << s.status().message();
  server_ = std::move(s.value());
  struct stat st;
  ASSERT_EQ(stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  std::string resp;
  runWithClient(&loop_, [&] {
    resp = exchange(connectUnix(path), "GET /workloads HTTP/1.1\r\n\r\n");
  });
  EXPECT_EQ(resp.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << resp;
  EXPECT_NE(resp.find(R"("path":"/workloads")"), std::string::npos);
  server_.reset();
  uv_run(&loop_, UV_RUN_DEFAULT);
  EXPECT_NE(access(path.c_str(), F_OK), 0);  // removed with the server
  rmdir(dir.c_str());
}

TEST_F(HttpAdminTest, UnixPathThatIsNotASocketIsRefused) {
  char tmpl[] = "/tmp/weft-http-test-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  std::string path = std::string(tmpl) + "/file";
  FILE* f = fopen(path.c_str(), "w");
  ASSERT_NE(f, nullptr);
  fclose(f);
  auto s = HttpAdminServer::listenUnix(&loop_, path, echoHandler);
  EXPECT_FALSE(s.isOk());
  unlink(path.c_str());
  rmdir(tmpl);
}

TEST_F(HttpAdminTest, ManyClientsAtOnce) {
  SocketAddress a = startTcp();
  std::atomic<int> ok{0};
  runWithClient(&loop_, [&] {
    std::vector<std::thread> ts;
    for (int i = 0; i < 8; i++) {
      ts.emplace_back([&, i] {
        std::string r =
            exchange(connectTcp(a), "GET /c" + std::to_string(i) + " HTTP/1.1\r\n\r\n");
        if (r.find("\"path\":\"/c" + std::to_string(i) + "\"") != std::string::npos) ok++;
      });
    }
    for (auto& t : ts) t.join();
  });
  EXPECT_EQ(ok.load(), 8);
}

// Streaming responses (Transfer-Encoding: chunked): what the ztunnel's GET /events uses.
class HttpAdminStreamTest : public HttpAdminTest {
 protected:
  SocketAddress startStreaming(std::function<HttpResponse(const HttpRequest&)> h) {
    auto s = HttpAdminServer::listenTcp(&loop_, *SocketAddress::parse("127.0.0.1:0"), h);
    EXPECT_TRUE(s.isOk()) << s.status().message();
    if (!s.isOk()) return SocketAddress();
    server_ = std::move(s.value());
    return server_->boundAddress();
  }
};

TEST_F(HttpAdminStreamTest, ChunksThenFinish) {
  SocketAddress a = startStreaming([](const HttpRequest&) {
    HttpResponse r;
    r.content_type = "application/x-ndjson";
    r.stream = [](HttpStreamWriterPtr w) {
      EXPECT_TRUE(w->write("{\"n\":1}\n"));
      EXPECT_TRUE(w->write("{\"n\":22}\n"));
      w->finish();
      EXPECT_TRUE(w->closed());
      EXPECT_FALSE(w->write("late\n"));
    };
    return r;
  });
  std::string resp;
  runWithClient(&loop_, [&] { resp = exchange(connectTcp(a), "GET /events HTTP/1.1\r\n\r\n"); });
  EXPECT_EQ(resp.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << resp;
  EXPECT_NE(resp.find("Transfer-Encoding: chunked\r\n"), std::string::npos) << resp;
  EXPECT_EQ(resp.find("Content-Length"), std::string::npos) << resp;
  EXPECT_NE(resp.find("\r\n\r\n8\r\n{\"n\":1}\n\r\n9\r\n{\"n\":22}\n\r\n0\r\n\r\n"),
            std::string::npos)
      << resp;
}

// A client that does not read gets at most stream_max_queued bytes queued; the rest is refused
// (the producer counts drops) and memory stays bounded.
TEST_F(HttpAdminStreamTest, SlowClientIsBounded) {
  constexpr size_t kMax = 64 * 1024;
  const std::string piece(4000, 'x');
  int accepted = 0, refused = 0;
  size_t queued = 0;
  HttpStreamWriterPtr keep;
  SocketAddress a = startStreaming([&](const HttpRequest&) {
    HttpResponse r;
    r.stream_max_queued = kMax;
    r.stream = [&](HttpStreamWriterPtr w) {
      for (int i = 0; i < 100; i++) (w->write(piece) ? accepted : refused)++;
      queued = w->queuedBytes();
      w->finish();
      keep = w;
    };
    return r;
  });
  std::string resp;
  runWithClient(&loop_, [&] { resp = exchange(connectTcp(a), "GET /events HTTP/1.1\r\n\r\n"); });
  EXPECT_GT(accepted, 0);
  EXPECT_GT(refused, 0);
  EXPECT_EQ(accepted + refused, 100);
  EXPECT_LE(queued, kMax);
  EXPECT_GE(queued + 4010, kMax);  // filled to the bound, not refused early
  // Exactly the accepted chunks arrived, then the last chunk.
  size_t n = 0, pos = 0;
  while ((pos = resp.find("fa0\r\n", pos)) != std::string::npos) n++, pos += 5;
  EXPECT_EQ(n, static_cast<size_t>(accepted));
  EXPECT_EQ(resp.substr(resp.size() - 5), "0\r\n\r\n");
  ASSERT_TRUE(keep);
  EXPECT_TRUE(keep->closed());
}

TEST_F(HttpAdminStreamTest, ClientGoingAwayClosesTheWriter) {
  HttpStreamWriterPtr writer;
  bool closed_cb = false;
  SocketAddress a = startStreaming([&](const HttpRequest&) {
    HttpResponse r;
    r.stream = [&](HttpStreamWriterPtr w) {
      writer = w;
      w->onClose([&] { closed_cb = true; });
      EXPECT_TRUE(w->write("hello\n"));
    };
    return r;
  });
  std::string got;
  runWithClient(&loop_, [&] {
    int fd = connectTcp(a);
    ASSERT_GE(fd, 0);
    sendAll(fd, "GET /events HTTP/1.1\r\n\r\n");
    char buf[4096];
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (got.find("hello\n") == std::string::npos &&
           std::chrono::steady_clock::now() < deadline) {
      pollfd p{fd, POLLIN, 0};
      if (poll(&p, 1, 100) <= 0) continue;
      ssize_t n = recv(fd, buf, sizeof(buf), 0);
      if (n <= 0) break;
      got.append(buf, static_cast<size_t>(n));
    }
    close(fd);
    // Give the loop time to see the EOF before the test stops it.
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  });
  EXPECT_NE(got.find("6\r\nhello\n\r\n"), std::string::npos) << got;
  EXPECT_TRUE(closed_cb);
  ASSERT_TRUE(writer);
  EXPECT_TRUE(writer->closed());
  EXPECT_FALSE(writer->write("more\n"));
}

}  // namespace
}  // namespace weft
