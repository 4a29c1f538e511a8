// Blocking socket I/O with deadlines and SHA-256 for the echo test tools.
#include "tests/tools/echo_io.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>

namespace weft::echo {
namespace {

int msUntil(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return left.count() <= 0 ? 0 : static_cast<int>(left.count());
}

// Waits for `events` on fd; an error status on timeout or poll failure.
Status waitFor(int fd, short events, Clock::time_point deadline, const char* what) {
  for (;;) {
    int ms = msUntil(deadline);
    if (ms == 0) return Status::errorf("{}: timed out", what);
    pollfd p{fd, events, 0};
    int n = ::poll(&p, 1, ms);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::errorf("{}: poll: {}", what, errnoText(errno));
    if (n > 0) return Status::ok();
  }
}

}  // namespace

Result<std::vector<uint8_t>> sha256(const uint8_t* data, size_t len) {
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx) return Status::error("EVP_MD_CTX_new failed");
  std::vector<uint8_t> out(kDigestSize);
  unsigned int outLen = 0;
  if (EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1 ||
      EVP_DigestUpdate(ctx.get(), data, len) != 1 ||
      EVP_DigestFinal_ex(ctx.get(), out.data(), &outLen) != 1 || outLen != kDigestSize) {
    return Status::error("SHA-256 digest failed");
  }
  return out;
}

Result<UniqueFd> connectTo(const SocketAddress& target, Clock::time_point deadline) {
  UniqueFd fd(::socket(target.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return Status::errorf("socket: {}", errnoText(errno));
  sockaddr_storage ss{};
  socklen_t len = target.toSockaddr(&ss);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&ss), len) != 0) {
    if (errno != EINPROGRESS) {
      return Status::errorf("connect {}: {}", target.toString(), errnoText(errno));
    }
    if (auto st = waitFor(fd.get(), POLLOUT, deadline, "connect"); !st) return st;
    int err = 0;
    socklen_t errLen = sizeof(err);
    if (::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &errLen) != 0) err = errno;
    if (err != 0) return Status::errorf("connect {}: {}", target.toString(), errnoText(err));
  }
  return fd;
}

Status writeAll(int fd, const uint8_t* buf, size_t len, Clock::time_point deadline) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = ::send(fd, buf + done, len - done, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      done += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (auto st = waitFor(fd, POLLOUT, deadline, "write"); !st) {
        return st.context(fmt::format("after {} of {} bytes", done, len));
      }
      continue;
    }
    return Status::errorf("write after {} of {} bytes: {}", done, len, errnoText(errno));
  }
  return Status::ok();
}

Status readToEof(int fd, std::vector<uint8_t>* out, size_t cap, Clock::time_point deadline) {
  // recv straight into the vector's tail (grown geometrically) to avoid a second copy of
  // every byte: the integrity test moves gigabytes through here.
  size_t used = out->size();
  for (;;) {
    if (out->size() - used < 65536) {
      size_t want = std::min(cap + 1, std::max(out->size() * 2, used + 65536));
      if (want <= used) want = used + 1;  // cap reached: one more byte proves "too much"
      out->resize(want);
    }
    ssize_t n = ::recv(fd, out->data() + used, out->size() - used, MSG_DONTWAIT);
    if (n == 0) {
      out->resize(used);
      return Status::ok();
    }
    if (n > 0) {
      used += static_cast<size_t>(n);
      if (used > cap) {
        out->resize(used);
        return Status::errorf("more than {} bytes", cap);
      }
      continue;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      if (auto st = waitFor(fd, POLLIN, deadline, "read"); !st) {
        out->resize(used);
        return st.context(fmt::format("after {} bytes", used));
      }
      continue;
    }
    int err = errno;
    out->resize(used);
    return Status::errorf("read after {} bytes: {}", used, errnoText(err));
  }
}

std::string displayAddress(const sockaddr_storage& ss, socklen_t len) {
  auto addr = SocketAddress::fromSockaddr(reinterpret_cast<const sockaddr*>(&ss), len);
  if (!addr) return "?";
  if (addr->ip().isV6() && IN6_IS_ADDR_V4MAPPED(&addr->ip().v6addr())) {
    in_addr v4{};
    std::memcpy(&v4, &addr->ip().v6addr().s6_addr[12], sizeof(v4));
    return SocketAddress(IpAddr::fromV4(v4), addr->port()).toString();
  }
  return addr->toString();
}

}  // namespace weft::echo
