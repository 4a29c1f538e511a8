// Blocking unix-socket client for the agent's CNI socket, with one deadline over connect,
// write and read (poll on a non-blocking socket).
#include "cni/agent_client.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cerrno>
#include <cstring>

#include "common/fd.h"
#include "common/status.h"

namespace weft::cni {
namespace {

using Clock = std::chrono::steady_clock;

AgentReply tryAgain(const std::string& socketPath, const std::string& what) {
  return AgentReply{false, CniError{kErrTryAgainLater,
                                    "weft-agent is not reachable; try again later",
                                    socketPath + ": " + what}};
}

// Waits for `events` on fd until the deadline; false on timeout or poll error (errno set).
bool waitFor(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) {
      errno = ETIMEDOUT;
      return false;
    }
    pollfd p{fd, events, 0};
    int n = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count(), 60'000)));
    if (n > 0) return true;
    if (n < 0 && errno != EINTR) return false;
  }
}

}  // namespace

AgentReply callAgent(const std::string& socketPath, const nlohmann::json& request,
                     std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (socketPath.size() >= sizeof(addr.sun_path)) {
    return AgentReply{false, CniError{kErrInvalidConfig, "agent_socket path is too long",
                                      socketPath}};
  }
  std::memcpy(addr.sun_path, socketPath.c_str(), socketPath.size() + 1);

  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd.valid()) {
    return AgentReply{false, CniError{kErrIoFailure, "socket(AF_UNIX) failed",
                                      errnoText(errno)}};
  }
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    // A unix socket whose backlog is full answers EAGAIN; wait for it like EINPROGRESS.
    if (errno != EINPROGRESS && errno != EAGAIN) return tryAgain(socketPath, errnoText(errno));
    if (!waitFor(fd.get(), POLLOUT, deadline)) return tryAgain(socketPath, errnoText(errno));
    int err = 0;
    socklen_t len = sizeof(err);
    if (::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
    if (err != 0) return tryAgain(socketPath, errnoText(err));
  }

  const std::string out = request.dump();
  size_t sent = 0;
  while (sent < out.size()) {
    ssize_t n = ::send(fd.get(), out.data() + sent, out.size() - sent, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<size_t>(n);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && errno == EAGAIN) {
      if (!waitFor(fd.get(), POLLOUT, deadline)) return tryAgain(socketPath, errnoText(errno));
    } else {
      return tryAgain(socketPath, "sending the request: " + errnoText(errno));
    }
  }
  if (::shutdown(fd.get(), SHUT_WR) != 0) {
    return tryAgain(socketPath, "half-closing: " + errnoText(errno));
  }

  std::string in;
  char buf[4096];
  for (;;) {
    if (!waitFor(fd.get(), POLLIN, deadline)) {
      return tryAgain(socketPath,
                      errno == ETIMEDOUT
                          ? "no answer within " + std::to_string(timeout.count()) + " ms"
                          : "waiting for the answer: " + errnoText(errno));
    }
    ssize_t n = ::recv(fd.get(), buf, sizeof(buf), 0);
    if (n == 0) break;
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return tryAgain(socketPath, "reading the answer: " + errnoText(errno));
    }
    in.append(buf, static_cast<size_t>(n));
    if (in.size() > kMaxReplyBytes) {
      return AgentReply{false, CniError{kErrIoFailure, "weft-agent answer is too large",
                                        "more than " + std::to_string(kMaxReplyBytes) + " bytes"}};
    }
  }
  if (in.empty()) return tryAgain(socketPath, "the agent closed without an answer");

  nlohmann::json reply = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  auto ok = reply.is_object() ? reply.find("ok") : reply.end();
  if (reply.is_discarded() || !reply.is_object() || ok == reply.end() || !ok->is_boolean()) {
    return AgentReply{false, CniError{kErrIoFailure, "weft-agent answer is not {\"ok\":...}",
                                      in.substr(0, 200)}};
  }
  if (ok->get<bool>()) return AgentReply{true, {}};

  CniError error{kErrIoFailure, "weft-agent refused the request", ""};
  if (auto c = reply.find("code"); c != reply.end() && c->is_number_integer() &&
                                   c->get<int64_t>() > 0 && c->get<int64_t>() < 1'000'000) {
    error.code = static_cast<int>(c->get<int64_t>());
  }
  if (auto m = reply.find("msg"); m != reply.end() && m->is_string() && !m->empty()) {
    error.msg = m->get<std::string>();
  }
  if (auto d = reply.find("details"); d != reply.end() && d->is_string()) {
    error.details = d->get<std::string>();
  }
  return AgentReply{false, error};
}

}  // namespace weft::cni
