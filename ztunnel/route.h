// Decide, then do: the outbound route of a connection as a plain value, computed by a pure
// function of (original destination, source workload, cluster snapshot, round-robin cursor).
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "common/address.h"
#include "ztunnel/cluster_state.h"

namespace weft::ztunnel {

enum class RouteKind {
  kDirectWorkload,   // the destination is a known pod IP
  kServiceEndpoint,  // a service VIP:port, resolved to one endpoint
  kPassthrough,      // not a known pod or service: connect to it as asked
  kRefused,          // close the client: no endpoint, unknown service port, a loop
};

const char* routeKindName(RouteKind k);

struct Route {
  RouteKind kind = RouteKind::kRefused;
  SocketAddress next_hop;
  WorkloadInfoPtr destination_workload;  // may be null
  ServiceInfoPtr destination_service;    // may be null
  std::string reason;                    // why (for refusals and logs)
  bool no_endpoints = false;             // refused because the service has no usable endpoint
};

// Per-loop round-robin cursors, one per service. The only state route decisions carry; each
// event loop owns its own, so decisions need no locks.
class RoundRobin {
 public:
  // Returns the cursor for `service_key` and advances it.
  uint64_t next(const std::string& service_key) { return cursors_[service_key]++; }

 private:
  std::map<std::string, uint64_t> cursors_;
};

// Where an outbound connection from `source` (may be null) to `original_dst` goes.
Route decideOutbound(const SocketAddress& original_dst, const WorkloadInfo* source,
                     const ClusterState& state, RoundRobin& rr);

}  // namespace weft::ztunnel
