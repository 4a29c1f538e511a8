// Authorization of one inbound connection (HBONE or plaintext) to a local pod: its attributes
// from what the ztunnel saw, evaluate() over the current cluster state, the verdict recorded.
#pragma once

#include <string>

#include "common/address.h"
#include "ztunnel/hbone/session.h"
#include "ztunnel/policy.h"
#include "ztunnel/proxy.h"

namespace weft::ztunnel {

struct InboundPeer {
  const char* path = "plaintext";  // "hbone" or "plaintext"
  SocketAddress source;            // the connection's peer
  IpAddr remote_ip;                // HBONE forwarded client; unset = the peer
  std::string principal;           // the verified SPIFFE ID; empty for plaintext
};

// The attributes the destination's policy sees for a connection from `peer` to `destination`
// of workload `w` (the live cluster state's copy, for its current labels).
ConnectionAttributes inboundAttributes(const WorkloadInfo& w, const InboundPeer& peer,
                                       const SocketAddress& destination);

// Decides and records (VerdictLog) the connection from `peer` to `destination` of local
// workload `dst`; the caller refuses it when !allowed. Plaintext to a pod under STRICT peer
// authentication (the live cluster state's mode) is denied with reason kStrictMtls before any
// policy. Dry-run and AUDIT policies only show in the recorded event.
Verdict authorizeInbound(Proxy& proxy, const WorkloadInfo& dst, const InboundPeer& peer,
                         const SocketAddress& destination);

// The client address of a `forwarded: for="ip:port"` header (RFC 7239, IPv6 in brackets), if
// the request has one that parses.
std::optional<IpAddr> forwardedFor(const hbone::Headers& headers);

}  // namespace weft::ztunnel
