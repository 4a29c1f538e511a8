// Sockets the ztunnel opens inside pods' network namespaces: marked (SO_MARK 0x539) before
// bind/connect so the BPF hooks let them through.
#pragma once

#include "common/address.h"
#include "common/fd.h"
#include "common/status.h"

namespace weft::ztunnel {

// A non-blocking TCP socket of `family` in `netns_fd` (-1 = the current netns), carrying the
// ztunnel mark.
Result<UniqueFd> markedTcpSocket(int netns_fd, int family);

// A listening socket on `addr` in `netns_fd`: marked, SO_REUSEADDR + SO_REUSEPORT, IPv6 ones
// V6ONLY, backlog 1024.
Result<UniqueFd> listenIn(int netns_fd, const SocketAddress& addr, int backlog = 1024);

// Binds a socket that will connect to the app at `dst_ip` to the source the app sees and the
// sk_lookup program lets pass: 127.0.0.6 (IPv4, port chosen at connect) or the pod's own IPv6.
Status bindInboundSource(int fd, const IpAddr& dst_ip);

// The destination an app asked for before the connect hook redirected it to 15001: the
// SO_ORIGINAL_DST socket option of an accepted socket, answered by cgroup/getsockopt.
Result<SocketAddress> originalDestination(int fd, int family);

}  // namespace weft::ztunnel
