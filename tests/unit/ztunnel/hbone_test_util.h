// Shared helpers for the HBONE tests: certificates made with the openssl CLI in a temp dir,
// loopback TCP sockets, blocking app-side I/O, and running the libuv loop with a time bound.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>

#include <gtest/gtest.h>

#include "common/fd.h"
#include "ztunnel/hbone/tls_stream.h"

namespace weft::hbone::testing {

// The SPIFFE IDs the test certificates carry.
inline const std::string kServerId = "spiffe://cluster.local/ns/default/sa/server";
inline const std::string kClientId = "spiffe://cluster.local/ns/default/sa/client";

inline std::string readFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline bool sh(const std::string& cmd) {
  return std::system(("( " + cmd + " ) >/dev/null 2>&1").c_str()) == 0;
}

// A temp dir with: ca (cluster.local), ca2 (another CA), leaves with URI SANs signed by them.
class CertDir {
 public:
  CertDir() {
    char tmpl[] = "/tmp/weft-hbone-certs-XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    ok_ = makeCa("ca") && makeCa("ca2");
  }
  ~CertDir() {
    if (!dir_.empty()) sh("rm -rf '" + dir_ + "'");
  }
  bool ok() const { return ok_; }
  const std::string& dir() const { return dir_; }

  bool makeCa(const std::string& name) {
    std::string d = dir_ + "/" + name;
    return sh("mkdir -p " + d) &&
           sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout " +
              d + "/ca.key -out " + d + "/ca.crt -days 2 -subj /CN=" + name) &&
           sh("touch " + d + "/index.txt && echo 01 > " + d + "/serial") &&
           sh("printf '[ca]\\ndefault_ca=d\\n[d]\\ndatabase=" + d + "/index.txt\\nnew_certs_dir=" +
              d + "\\nserial=" + d + "/serial\\ndefault_md=sha256\\npolicy=p\\n" +
              "unique_subject=no\\n" +
              "[p]\\ncommonName=supplied\\n' > " + d + "/ca.cnf");
  }
  // A leaf of `ca` with URI SAN `uri`; dates: "" = valid now for a day, "expired" (2020) or
  // "notyetvalid" (2099). `openssl ca` takes any -startdate, unlike OpenSSL 3.0's x509 -req.
  bool makeLeaf(const std::string& ca, const std::string& name, const std::string& uri,
                const std::string& dates = "") {
    std::string d = dir_ + "/" + ca;
    std::string l = dir_ + "/" + name;
    std::string when = "-days 1";
    if (dates == "expired") when = "-startdate 20200101000000Z -enddate 20200102000000Z";
    if (dates == "notyetvalid") when = "-startdate 20990101000000Z -enddate 20990102000000Z";
    return sh("openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout " + l +
              ".key -out " + l + ".csr -subj /CN=" + name) &&
           sh("printf 'subjectAltName=URI:" + uri + "\\n' > " + l + ".ext") &&
           sh("openssl ca -batch -config " + d + "/ca.cnf -cert " + d + "/ca.crt -keyfile " + d +
              "/ca.key -in " + l + ".csr -out " + l + ".crt " + when + " -extfile " + l +
              ".ext -notext");
  }
  std::string path(const std::string& f) const { return dir_ + "/" + f; }
  Credentials creds(const std::string& leaf, const std::string& rootsCa = "ca") const {
    return Credentials{readFile(path(leaf + ".key")), readFile(path(leaf + ".crt")),
                       readFile(path(rootsCa + "/ca.crt"))};
  }

 private:
  std::string dir_;
  bool ok_ = false;
};

// A listening loopback socket; port() says where.
class Listener {
 public:
  Listener() {
    fd_.reset(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    int one = 1;
    ::setsockopt(fd_.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(fd_.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a));
    ::listen(fd_.get(), 128);
    socklen_t len = sizeof(a);
    ::getsockname(fd_.get(), reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
  }
  uint16_t port() const { return port_; }
  int fd() const { return fd_.get(); }
  UniqueFd release() { return std::move(fd_); }
  UniqueFd accept() { return UniqueFd(::accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC)); }

 private:
  UniqueFd fd_;
  uint16_t port_ = 0;
};

// Joins an upstream thread at scope exit, first unblocking its accept() if it never got a peer.
class JoinUpstream {
 public:
  JoinUpstream(Listener& l, std::thread& t) : l_(l), t_(t) {}
  ~JoinUpstream() {
    if (!t_.joinable()) return;
    ::shutdown(l_.fd(), SHUT_RDWR);
    t_.join();
  }

 private:
  Listener& l_;
  std::thread& t_;
};

inline UniqueFd connectLoopback(uint16_t port) {
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(port);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) return UniqueFd();
  return fd;
}

// A connected loopback pair: first = the side handed to the HBONE client, second = the app's.
inline std::pair<UniqueFd, UniqueFd> tcpPair() {
  Listener l;
  UniqueFd c = connectLoopback(l.port());
  UniqueFd s = l.accept();
  int fl = ::fcntl(s.get(), F_GETFL);
  ::fcntl(s.get(), F_SETFL, fl | O_NONBLOCK);
  return {std::move(s), std::move(c)};
}

inline bool writeAll(int fd, const std::string& data) {
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    if (n <= 0) return false;
    off += static_cast<size_t>(n);
  }
  return true;
}

// Reads until EOF (or error / 30 s); returns what was read.
inline std::string readToEof(int fd) {
  timeval tv{30, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  std::string out;
  char buf[65536];
  while (true) {
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

inline std::string readExactly(int fd, size_t len) {
  timeval tv{30, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  std::string out;
  char buf[65536];
  while (out.size() < len) {
    ssize_t n = ::read(fd, buf, std::min(sizeof(buf), len - out.size()));
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

// A refusal counter array moved by exactly one, at `why`, from `before`.
inline void expectOneRefusal(const TlsRefusalCounts& before, const TlsRefusalCounts& after,
                             TlsRefusal why) {
  for (size_t i = 0; i < kTlsRefusalCount; ++i) {
    uint64_t want = before[i] + (i == static_cast<size_t>(why) ? 1 : 0);
    EXPECT_EQ(after[i], want) << "refusals with reason "
                              << tlsRefusalName(static_cast<TlsRefusal>(i));
  }
}

inline uint64_t refusalTotal(const TlsRefusalCounts& c) {
  uint64_t n = 0;
  for (uint64_t v : c) n += v;
  return n;
}

// Runs the loop until done() or the time bound; returns done().
inline bool runUntil(uv_loop_t* loop, const std::function<bool()>& done,
                     std::chrono::milliseconds bound = std::chrono::seconds(30)) {
  auto end = std::chrono::steady_clock::now() + bound;
  while (!done() && std::chrono::steady_clock::now() < end) {
    uv_run(loop, UV_RUN_NOWAIT);
    if (!done()) ::usleep(200);
  }
  return done();
}

// Closes every handle left on the loop and runs it dry (test teardown).
inline void drainLoop(uv_loop_t* loop) {
  for (int i = 0; i < 100; ++i) uv_run(loop, UV_RUN_NOWAIT);
  uv_walk(loop, [](uv_handle_t* h, void*) {
    if (!uv_is_closing(h)) uv_close(h, nullptr);
  }, nullptr);
  for (int i = 0; i < 100; ++i) uv_run(loop, UV_RUN_NOWAIT);
}

}  // namespace weft::hbone::testing
