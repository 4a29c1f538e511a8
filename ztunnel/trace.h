// GET /trace: what would happen to a connection from a pod to an address, decided by the same
// route decision (route.h) and policy evaluation (policy.h) the data path runs, without traffic.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "common/status.h"
#include "ztunnel/balancer.h"
#include "ztunnel/cluster_state.h"

namespace weft::ztunnel {

struct TraceQuery {
  std::string source;       // "ns/pod" or "pod" (namespace default)
  std::string destination;  // "IP[:PORT]", "[IPv6]:PORT", "ns/pod:PORT", "svc.ns[.svc...][:PORT]"
};

struct TraceContext {
  const ClusterState* state = nullptr;
  const Balancer* balancer = nullptr;  // picked from a detached copy: nothing here changes
  std::string trust_domain = "cluster.local";
  std::string cluster_domain = "cluster.local";
};

// The explanation: source (enrolled?), redirected?, route (service → endpoint and candidates,
// waypoint, protocol hbone|plain|passthrough), expected peer identity, and the destination
// ztunnel's verdict (policy and rule that decided, or the default). Errors: an unknown source
// pod, a destination that does not parse or resolve.
Result<nlohmann::json> traceConnection(const TraceContext& ctx, const TraceQuery& query);

// From a request query "src=ns/pod&dst=addr:port".
Result<TraceQuery> parseTraceQuery(const std::string& query);

}  // namespace weft::ztunnel
