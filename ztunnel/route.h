// Decide, then do: the outbound route of a connection as a plain value, computed from (original
// destination, source workload, cluster snapshot, the loop's balancer state).
#pragma once

#include <cstdint>
#include <string>

#include "common/address.h"
#include "ztunnel/balancer.h"
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
  bool all_ejected = false;              // every endpoint was ejected; one was used anyway
};

// Where an outbound connection from `source` (may be null) to `original_dst` goes. A service's
// endpoint is chosen by `balancer` (the loop's own, so decisions need no locks), which is the
// only state a decision reads or changes besides the snapshot.
Route decideOutbound(const SocketAddress& original_dst, const WorkloadInfo* source,
                     const ClusterState& state, Balancer& balancer);

}  // namespace weft::ztunnel
