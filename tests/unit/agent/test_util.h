// Helpers shared by the agent's unit tests: temp directories, a libuv loop run until a
// condition holds (bounded), and a netns opener that needs no root.
#pragma once

#include <fcntl.h>
#include <stdlib.h>
#include <uv.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>

#include "agent/enrollment.h"

namespace weft::agent::testing {

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/weft-agent-test-XXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  void write(const std::string& name, const std::string& text) const {
    std::ofstream(file(name)) << text;
  }

 private:
  std::string path_;
};

// Runs the loop until `done` or `timeout_ms`; returns done().
inline bool runUntil(uv_loop_t* loop, const std::function<bool()>& done, int timeout_ms = 5000) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    uv_run(loop, UV_RUN_NOWAIT);
    ::usleep(1000);
  }
  return true;
}

// Any openable path stands in for a netns; the cookie is derived from the path.
inline Result<OpenedNetns> fakeNetnsOpener(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::errorf("open {}: {}", path, errnoText(errno));
  OpenedNetns out;
  out.fd = UniqueFd(fd);
  out.cookie = std::hash<std::string>{}(path) | 1;
  return out;
}

}  // namespace weft::agent::testing

#include <sys/socket.h>
#include <sys/un.h>

#include <cstring>

#include "common/seqpacket.h"
#include "weft/node/v1/node.pb.h"

namespace weft::agent::testing {

// A ztunnel stand-in: a non-blocking SOCK_SEQPACKET client driven from the test's loop.
class FakeZtunnel {
 public:
  bool connect(const std::string& path) {
    int fd = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return false;
    fd_.reset(fd);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.data(), path.size());
    return ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  }
  bool hello() {
    weft::node::v1::ZtunnelMessage m;
    m.mutable_hello()->set_protocol_version(1);
    m.mutable_hello()->set_ztunnel_version("test");
    return sendNodeMessage(fd_.get(), m).isOk();
  }
  bool ack(uint64_t id, const std::string& error = {}) {
    weft::node::v1::ZtunnelMessage m;
    m.mutable_ack()->set_id(id);
    m.mutable_ack()->set_error(error);
    return sendNodeMessage(fd_.get(), m).isOk();
  }
  bool send(const weft::node::v1::ZtunnelMessage& m) {
    return sendNodeMessage(fd_.get(), m).isOk();
  }
  bool sendRaw(const std::string& bytes) {
    return ::send(fd_.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL) ==
           static_cast<ssize_t>(bytes.size());
  }
  // Pumps `loop` until a message arrives (true), the peer closes or the time is up (false).
  bool recv(uv_loop_t* loop, weft::node::v1::AgentMessage* msg, std::vector<UniqueFd>* fds,
            int timeout_ms = 3000) {
    bool got = false;
    runUntil(
        loop,
        [&] {
          std::string err;
          RecvResult r = recvNodeMessage(fd_.get(), msg, fds, &err);
          if (r == RecvResult::kMessage) got = true;
          if (r == RecvResult::kClosed || r == RecvResult::kError) closed_ = true;
          return got || closed_;
        },
        timeout_ms);
    return got;
  }
  // Receives one message and acks it; returns it.
  weft::node::v1::AgentMessage recvAndAck(uv_loop_t* loop, std::vector<UniqueFd>* fds = nullptr) {
    weft::node::v1::AgentMessage m;
    std::vector<UniqueFd> local;
    if (!recv(loop, &m, fds ? fds : &local)) return {};
    ack(m.id());
    return m;
  }
  bool closed() const { return closed_; }
  // Pumps the loop for a while and reports whether the server closed us.
  bool waitClosed(uv_loop_t* loop, int timeout_ms = 3000) {
    weft::node::v1::AgentMessage m;
    std::vector<UniqueFd> fds;
    while (!closed_ && recv(loop, &m, &fds, timeout_ms)) {
    }
    return closed_;
  }
  int fd() const { return fd_.get(); }

 private:
  UniqueFd fd_;
  bool closed_ = false;
};

}  // namespace weft::agent::testing
