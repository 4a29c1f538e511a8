// Throwaway pod network namespaces for the ztunnel's root-only unit tests, and the blocking
// socket helpers their client threads use inside them.
#pragma once

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/address.h"
#include "common/netns.h"
#include "common/fd.h"

namespace weft::ztunnel::podtest {

inline int sh(const std::string& cmd) { return system((cmd + " >/dev/null 2>&1").c_str()); }

// The named netns `<prefix><pid>` with lo up carrying `addrs` (CIDR, e.g. "10.250.0.5/32";
// IPv6 ones without duplicate address detection); removed on destruction. Namespaces of earlier
// runs with the same prefix whose pid is gone (a run that crashed) are removed first.
class PodNetns {
 public:
  PodNetns(const std::string& prefix, const std::vector<std::string>& addrs) {
    if (DIR* d = opendir("/run/netns")) {
      std::vector<std::string> stale;
      while (dirent* e = readdir(d)) {
        std::string n = e->d_name;
        if (n.rfind(prefix, 0) != 0) continue;
        pid_t pid = static_cast<pid_t>(atoi(n.c_str() + prefix.size()));
        if (pid > 0 && kill(pid, 0) != 0 && errno == ESRCH) stale.push_back(n);
      }
      closedir(d);
      for (const std::string& n : stale) sh("ip netns del " + n);
    }
    name_ = prefix + std::to_string(getpid());
    sh("ip netns del " + name_);
    ok_ = sh("ip netns add " + name_) == 0 && sh("ip -n " + name_ + " link set lo up") == 0;
    for (const std::string& a : addrs) {
      bool v6 = a.find(':') != std::string::npos;
      ok_ = ok_ && sh("ip -n " + name_ + " addr add " + a + " dev lo" + (v6 ? " nodad" : "")) == 0;
    }
    if (ok_) {
      auto fd = openNetns("/run/netns/" + name_);
      ok_ = fd.isOk();
      if (ok_) fd_ = std::move(fd.value());
    }
  }
  ~PodNetns() {
    fd_.reset();
    sh("ip netns del " + name_);
  }
  PodNetns(const PodNetns&) = delete;
  PodNetns& operator=(const PodNetns&) = delete;

  bool ok() const { return ok_; }
  int fd() const { return fd_.get(); }
  UniqueFd dupFd() const { return UniqueFd(fcntl(fd_.get(), F_DUPFD_CLOEXEC, 0)); }

 private:
  std::string name_;
  UniqueFd fd_;
  bool ok_ = false;
};

// A blocking TCP connect from inside `netns` to "ip:port": the socket, or -errno.
inline int connectIn(int netns, const std::string& addr) {
  auto a = SocketAddress::parse(addr);
  if (!a) return -EINVAL;
  auto s = socketIn(netns, a->family(), SOCK_STREAM);
  if (!s) return -1;
  sockaddr_storage ss;
  socklen_t len = a->toSockaddr(&ss);
  if (connect(s->get(), reinterpret_cast<sockaddr*>(&ss), len) != 0) return -errno;
  return s->release();
}

// Everything until EOF, an error (its errno in *err) or 10 s in 100 ms polls.
inline std::string readToEof(int fd, int* err = nullptr) {
  std::string out;
  char buf[16384];
  for (int i = 0; i < 100; i++) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 100) <= 0) continue;
    ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) {
      if (n < 0 && err) *err = errno;
      break;
    }
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

inline bool sendAll(int fd, const std::string& data) {
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = send(fd, data.data() + off, data.size() - off, MSG_NOSIGNAL);
    if (n <= 0) return false;
    off += static_cast<size_t>(n);
  }
  return true;
}

}  // namespace weft::ztunnel::podtest
