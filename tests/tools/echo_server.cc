// weft-echo-server: answers each connection with SHA-256 of what it read (to EOF) and the bytes
// themselves; optional plain streaming echo ports for long-lived connections; logs peers.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <mutex>
#include <string>

#include <fmt/ranges.h>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>

#include "tests/tools/echo_io.h"

namespace {

using weft::Result;
using weft::Status;
using weft::UniqueFd;
using namespace weft::echo;

constexpr size_t kMaxRequest = 8u << 20;  // the brief's cap: larger inputs are refused
constexpr int kMaxConnections = 1024;
constexpr auto kHashTimeout = std::chrono::seconds(60);
constexpr auto kStreamIdle = std::chrono::seconds(600);

std::atomic<int> g_active{0};
std::mutex g_logMutex;
int g_logFd = -1;  // -1: peers are not logged

// One line per event, written with a single write() so concurrent servers (and readers that
// tail the file) never see torn lines.
void logLine(const std::string& line) {
  if (g_logFd < 0) return;
  std::string l = line + "\n";
  std::lock_guard<std::mutex> lock(g_logMutex);
  ssize_t n = ::write(g_logFd, l.data(), l.size());
  (void)n;  // logging is best effort; the connection's result does not depend on it
}

Status serveHash(int fd, size_t* bytesIn) {
  auto deadline = Clock::now() + kHashTimeout;
  std::vector<uint8_t> got;
  Status st = readToEof(fd, &got, kMaxRequest, deadline);
  *bytesIn = got.size();
  if (!st) return st;
  auto digest = sha256(got.data(), got.size());
  if (!digest) return digest.status();
  if (auto w = writeAll(fd, digest->data(), digest->size(), deadline); !w) return w;
  return writeAll(fd, got.data(), got.size(), deadline);
}

// Plain echo as bytes arrive, for connections held open across enrollment changes.
Status serveStream(int fd, size_t* bytesIn) {
  uint8_t buf[16384];
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    int n = ::poll(&p, 1, static_cast<int>(
        std::chrono::duration_cast<std::chrono::milliseconds>(kStreamIdle).count()));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::errorf("poll: {}", weft::errnoText(errno));
    if (n == 0) return Status::error("idle timeout");
    ssize_t r = ::recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
    if (r == 0) {
      ::shutdown(fd, SHUT_WR);
      return Status::ok();
    }
    if (r < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return Status::errorf("read: {}", weft::errnoText(errno));
    }
    *bytesIn += static_cast<size_t>(r);
    if (auto st = writeAll(fd, buf, static_cast<size_t>(r), Clock::now() + kStreamIdle); !st) {
      return st;
    }
  }
}

void serveConnection(UniqueFd fd, bool stream, std::string peer, std::string local) {
  size_t bytesIn = 0;
  Status st = stream ? serveStream(fd.get(), &bytesIn) : serveHash(fd.get(), &bytesIn);
  logLine(fmt::format("close peer={} local={} bytes_in={} result={}", peer, local, bytesIn,
                      st ? "ok" : "error:" + st.message()));
  g_active.fetch_sub(1);
}

Result<UniqueFd> listenOn(const std::string& bind, uint16_t port) {
  std::string host = bind;
  bool dualStack = bind.empty();
  if (dualStack) host = "::";
  auto ip = weft::IpAddr::parse(host);
  if (!ip) return Status::errorf("--bind {}: not an IP address", bind);
  UniqueFd fd(::socket(ip->family(), SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) {
    if (dualStack) return listenOn("0.0.0.0", port);  // a netns without IPv6
    return Status::errorf("socket: {}", weft::errnoText(errno));
  }
  int one = 1, zero = 0;
  if (::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0) {
    return Status::errorf("SO_REUSEADDR: {}", weft::errnoText(errno));
  }
  if (ip->isV6() && dualStack &&
      ::setsockopt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero)) != 0) {
    return Status::errorf("IPV6_V6ONLY: {}", weft::errnoText(errno));
  }
  sockaddr_storage ss{};
  socklen_t len = weft::SocketAddress(*ip, port).toSockaddr(&ss);
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&ss), len) != 0) {
    if (dualStack && errno == EADDRNOTAVAIL) return listenOn("0.0.0.0", port);
    return Status::errorf("bind {}:{}: {}", host, port, weft::errnoText(errno));
  }
  if (::listen(fd.get(), 512) != 0) return Status::errorf("listen: {}", weft::errnoText(errno));
  return fd;
}

void acceptLoop(int lfd, bool stream) {
  for (;;) {
    sockaddr_storage peer{};
    socklen_t peerLen = sizeof(peer);
    int c = ::accept4(lfd, reinterpret_cast<sockaddr*>(&peer), &peerLen, SOCK_CLOEXEC);
    if (c < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      std::fprintf(stderr, "accept: %s\n", weft::errnoText(errno).c_str());
      std::this_thread::sleep_for(std::chrono::milliseconds(100));  // EMFILE and the like
      continue;
    }
    UniqueFd conn(c);
    sockaddr_storage local{};
    socklen_t localLen = sizeof(local);
    std::string localText = "?";
    if (::getsockname(c, reinterpret_cast<sockaddr*>(&local), &localLen) == 0) {
      localText = displayAddress(local, localLen);
    }
    std::string peerText = displayAddress(peer, peerLen);
    if (g_active.fetch_add(1) >= kMaxConnections) {
      g_active.fetch_sub(1);
      logLine(fmt::format("refuse peer={} local={} reason=too-many-connections", peerText,
                          localText));
      continue;  // conn closes here
    }
    logLine(fmt::format("accept peer={} local={} mode={}", peerText, localText,
                        stream ? "stream" : "hash"));
    std::thread(serveConnection, std::move(conn), stream, peerText, localText).detach();
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Echo server for Weft tests: SHA-256 + echo of each connection's bytes"};
  std::vector<uint16_t> ports, streamPorts;
  std::string bind, logPeers;
  app.add_option("--port", ports, "port answering SHA-256 + bytes after EOF (repeatable)");
  app.add_option("--stream-port", streamPorts, "port echoing bytes as they arrive (repeatable)");
  app.add_option("--bind", bind, "address to listen on (default: dual-stack ::)");
  app.add_option("--log-peers", logPeers, "append one line per connection to FILE ('-' stdout)");
  CLI11_PARSE(app, argc, argv);
  if (ports.empty() && streamPorts.empty()) {
    std::fprintf(stderr, "need at least one --port or --stream-port\n");
    return 2;
  }
  ::signal(SIGPIPE, SIG_IGN);
  if (logPeers == "-") {
    g_logFd = STDOUT_FILENO;
  } else if (!logPeers.empty()) {
    g_logFd = ::open(logPeers.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (g_logFd < 0) {
      std::fprintf(stderr, "open %s: %s\n", logPeers.c_str(), weft::errnoText(errno).c_str());
      return 1;
    }
  }
  std::vector<std::thread> loops;
  std::vector<UniqueFd> listeners;
  auto start = [&](uint16_t port, bool stream) -> bool {
    auto fd = listenOn(bind, port);
    if (!fd) {
      std::fprintf(stderr, "%s\n", fd.status().message().c_str());
      return false;
    }
    loops.emplace_back(acceptLoop, fd->get(), stream);
    listeners.push_back(std::move(fd.value()));
    return true;
  };
  for (auto p : ports) {
    if (!start(p, false)) return 1;
  }
  for (auto p : streamPorts) {
    if (!start(p, true)) return 1;
  }
  logLine(fmt::format("listening ports={} stream_ports={}", fmt::join(ports, ","),
                      fmt::join(streamPorts, ",")));
  for (auto& t : loops) t.join();
  return 0;
}
