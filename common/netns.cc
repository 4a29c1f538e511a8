// Network namespace helpers.
#include "common/netns.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstdlib>

#ifndef SO_NETNS_COOKIE
#define SO_NETNS_COOKIE 71
#endif

namespace weft {

Result<UniqueFd> openNetns(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::errorf("open netns {}: {}", path, errnoText(errno));
  return UniqueFd(fd);
}

Result<uint64_t> currentNetnsCookie() {
  int s = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (s < 0) return Status::errorf("socket: {}", errnoText(errno));
  UniqueFd sock(s);
  uint64_t cookie = 0;
  socklen_t len = sizeof(cookie);
  if (getsockopt(sock.get(), SOL_SOCKET, SO_NETNS_COOKIE, &cookie, &len) != 0)
    return Status::errorf("getsockopt(SO_NETNS_COOKIE): {}", errnoText(errno));
  return cookie;
}

Result<uint64_t> netnsCookie(int netns_fd) {
  ScopedNetns in(netns_fd);
  if (!in.status()) return in.status();
  return currentNetnsCookie();
}

ScopedNetns::ScopedNetns(int netns_fd) {
  if (netns_fd < 0) return;
  int cur = ::open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
  if (cur < 0) {
    status_ = Status::errorf("open own netns: {}", errnoText(errno));
    return;
  }
  original_.reset(cur);
  home_fd_ = cur;
  enter(netns_fd);
}

ScopedNetns::ScopedNetns(int netns_fd, int home_fd) : home_fd_(home_fd) {
  if (netns_fd < 0) return;
  if (home_fd < 0) {
    status_ = Status::error("setns: no namespace to return to");
    return;
  }
  enter(netns_fd);
}

void ScopedNetns::enter(int netns_fd) {
  if (setns(netns_fd, CLONE_NEWNET) != 0) {
    status_ = Status::errorf("setns: {}", errnoText(errno));
    return;
  }
  entered_ = true;
}

ScopedNetns::~ScopedNetns() {
  if (!entered_) return;
  if (setns(home_fd_, CLONE_NEWNET) != 0) {
    // A thread stuck in a pod's namespace would open every later socket there: never go on.
    abort();
  }
}

Result<UniqueFd> socketIn(int netns_fd, int domain, int type, int protocol) {
  ScopedNetns in(netns_fd);
  if (!in.status()) return in.status();
  int fd = ::socket(domain, type | SOCK_CLOEXEC, protocol);
  if (fd < 0) return Status::errorf("socket: {}", errnoText(errno));
  return UniqueFd(fd);
}

Result<UniqueFd> socketInFrom(int home_fd, int netns_fd, int domain, int type, int protocol) {
  ScopedNetns in(netns_fd, home_fd);
  if (!in.status()) return in.status();
  int fd = ::socket(domain, type | SOCK_CLOEXEC, protocol);
  if (fd < 0) return Status::errorf("socket: {}", errnoText(errno));
  return UniqueFd(fd);
}

}  // namespace weft
