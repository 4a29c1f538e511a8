// Marked sockets, listeners in pod namespaces, and SO_ORIGINAL_DST.
#include "ztunnel/sockets.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cerrno>

#include "bpf/abi/ports.h"
#include "common/netns.h"

#ifndef SO_ORIGINAL_DST
#define SO_ORIGINAL_DST 80  // linux/netfilter_ipv4.h; the IPv6 option has the same number
#endif

namespace weft::ztunnel {

namespace {

// The namespace this thread lives in, opened once: every upstream socket enters a pod's netns
// and comes back, and opening /proc/thread-self/ns/net for each one (a procfs path walk, an
// open and a close) was a visible part of the per-connection cost. The ztunnel's loop threads
// never change namespace except through ScopedNetns, which always returns.
int homeNetns() {
  thread_local UniqueFd home(::open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC));
  return home.get();
}

}  // namespace

Result<UniqueFd> markedTcpSocket(int netns_fd, int family) {
  int home = netns_fd < 0 ? -1 : homeNetns();
  auto s = home >= 0 || netns_fd < 0
               ? socketInFrom(home, netns_fd, family, SOCK_STREAM | SOCK_NONBLOCK, IPPROTO_TCP)
               : socketIn(netns_fd, family, SOCK_STREAM | SOCK_NONBLOCK, IPPROTO_TCP);
  if (!s) return s.status();
  int mark = WEFT_ZTUNNEL_MARK;
  if (setsockopt(s->get(), SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) != 0)
    return Status::errorf("setsockopt(SO_MARK): {}", errnoText(errno));
  return std::move(s.value());
}

Result<UniqueFd> listenIn(int netns_fd, const SocketAddress& addr, int backlog) {
  std::string what = "listener " + addr.toString();
  auto s = markedTcpSocket(netns_fd, addr.family());
  if (!s) return s.status().context(what);
  int fd = s->get();
  int one = 1;
  if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0)
    return Status::errorf("{}: SO_REUSEADDR: {}", what, errnoText(errno));
  // Lets a new ztunnel take over a pod's ports while the old one still drains.
  if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0)
    return Status::errorf("{}: SO_REUSEPORT: {}", what, errnoText(errno));
  if (addr.family() == AF_INET6 &&
      setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) != 0)
    return Status::errorf("{}: IPV6_V6ONLY: {}", what, errnoText(errno));
  sockaddr_storage ss;
  socklen_t len = addr.toSockaddr(&ss);
  if (bind(fd, reinterpret_cast<sockaddr*>(&ss), len) != 0)
    return Status::errorf("{}: bind: {}", what, errnoText(errno));
  if (listen(fd, backlog) != 0) return Status::errorf("{}: listen: {}", what, errnoText(errno));
  return std::move(s.value());
}

Result<SocketAddress> originalDestination(int fd, int family) {
  sockaddr_storage ss{};
  socklen_t len;
  int rc;
  if (family == AF_INET) {
    len = sizeof(sockaddr_in);
    rc = getsockopt(fd, SOL_IP, SO_ORIGINAL_DST, &ss, &len);
  } else {
    len = sizeof(sockaddr_in6);
    rc = getsockopt(fd, SOL_IPV6, SO_ORIGINAL_DST, &ss, &len);
  }
  if (rc != 0) return Status::errorf("getsockopt(SO_ORIGINAL_DST): {}", errnoText(errno));
  auto a = SocketAddress::fromSockaddr(reinterpret_cast<sockaddr*>(&ss), len);
  if (!a || a->port() == 0) return Status::error("SO_ORIGINAL_DST: no usable address");
  return *a;
}

// Binds the upstream socket to the source the app sees and the sk_lookup program lets pass.
Status bindInboundSource(int fd, const IpAddr& dst_ip) {
  SocketAddress src;
  if (dst_ip.isV4()) {
    src = SocketAddress(IpAddr::v4(WEFT_INBOUND_PASSTHROUGH_V4), 0);
    // Pick the port at connect time: many connections share 127.0.0.6 as source.
    int one = 1;
    if (setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one)) != 0)
      return Status::errorf("IP_BIND_ADDRESS_NO_PORT: {}", errnoText(errno));
  } else {
    src = SocketAddress(dst_ip, 0);
  }
  sockaddr_storage ss;
  socklen_t len = src.toSockaddr(&ss);
  if (bind(fd, reinterpret_cast<sockaddr*>(&ss), len) != 0)
    return Status::errorf("bind {}: {}", src.toString(), errnoText(errno));
  return Status::ok();
}

}  // namespace weft::ztunnel
