// Outbound route decisions: service VIPs to endpoints (by the service's balancer, at
// targetPort), pod IPs direct, anything else passed through.
#include "ztunnel/route.h"

#include <vector>

#include "bpf/abi/ports.h"

namespace weft::ztunnel {

const char* routeKindName(RouteKind k) {
  switch (k) {
    case RouteKind::kDirectWorkload: return "direct-to-workload";
    case RouteKind::kServiceEndpoint: return "service-endpoint";
    case RouteKind::kPassthrough: return "passthrough";
    case RouteKind::kRefused: return "refused";
  }
  return "unknown";
}

namespace {

Route refuse(std::string reason) {
  Route r;
  r.kind = RouteKind::kRefused;
  r.reason = std::move(reason);
  return r;
}

// An endpoint's address in the VIP's family: its own IP, or else its workload's IP of that
// family (a dual-stack pod listed once).
const IpAddr* endpointIp(const ServiceEndpointInfo& e, int family, const ClusterState& state,
                         WorkloadInfoPtr* workload) {
  *workload =
      e.workload_uid.empty() ? state.workloadByIp(e.ip) : state.workloadByUid(e.workload_uid);
  if (e.ip.family() == family) return &e.ip;
  if (*workload) return (*workload)->ipOfFamily(family);
  return nullptr;
}

}  // namespace

Route decideOutbound(const SocketAddress& original_dst, const WorkloadInfo* source,
                     const ClusterState& state, Balancer& balancer) {
  const IpAddr& ip = original_dst.ip();
  if (ip.family() == 0 || original_dst.port() == 0)
    return refuse("original destination " + original_dst.toString() + " is not usable");
  // Our own outbound port on loopback would loop back into us forever.
  if (ip.isLoopback() && original_dst.port() == WEFT_PORT_OUTBOUND)
    return refuse("original destination is the outbound listener itself");

  if (ServiceInfoPtr svc = state.serviceByVip(ip)) {
    const ServicePortInfo* port = nullptr;
    for (const ServicePortInfo& p : svc->ports)
      if (p.tcp && p.port == original_dst.port()) port = &p;
    if (port == nullptr)
      return refuse("service " + svc->key() + " has no TCP port " +
                    std::to_string(original_dst.port()));
    struct Candidate {
      IpAddr ip;
      uint16_t port;
      WorkloadInfoPtr workload;
    };
    const uint16_t default_target = port->target_port != 0 ? port->target_port : port->port;
    std::vector<Candidate> candidates;
    for (const ServiceEndpointInfo& e : svc->endpoints) {
      // The endpoint's own port for this service port (a named targetPort resolved from its
      // container ports, or its EndpointSlice's port); a named port it does not have means it
      // is not an endpoint of this service port (Kubernetes semantics).
      uint16_t target = default_target;
      if (auto tp = e.target_ports.find(port->port); tp != e.target_ports.end())
        target = tp->second;
      else if (!port->target_port_name.empty())
        continue;
      WorkloadInfoPtr w;
      const IpAddr* eip = endpointIp(e, ip.family(), state, &w);
      if (eip == nullptr) continue;
      // A dual-stack pod is often listed once per family; it is one endpoint, not two.
      bool dup = false;
      for (const Candidate& c : candidates) dup = dup || c.ip == *eip;
      if (!dup) candidates.push_back(Candidate{*eip, target, w});
    }
    if (candidates.empty()) {
      Route r = refuse("service " + svc->key() + " has no endpoints");
      r.destination_service = svc;
      r.no_endpoints = true;
      return r;
    }
    std::vector<SocketAddress> hops;
    hops.reserve(candidates.size());
    for (const Candidate& c : candidates) hops.emplace_back(c.ip, c.port);
    Balancer::Pick pick = balancer.pick(svc->key(), svc->load_balancing, hops);
    Route r;
    r.kind = RouteKind::kServiceEndpoint;
    r.next_hop = hops[pick.index];
    r.destination_service = svc;
    r.destination_workload = candidates[pick.index].workload;
    r.all_ejected = pick.all_ejected;
    r.reason = "service " + svc->key() + " (" + loadBalancingName(svc->load_balancing) +
               (pick.all_ejected ? ", all endpoints ejected" : "") + ")";
    return r;
  }

  if (WorkloadInfoPtr w = state.workloadByIp(ip)) {
    Route r;
    r.kind = RouteKind::kDirectWorkload;
    r.next_hop = original_dst;
    r.destination_workload = w;
    r.reason = "workload " + w->namespace_ + "/" + w->name;
    return r;
  }

  Route r;
  r.kind = RouteKind::kPassthrough;
  r.next_hop = original_dst;
  r.reason = "not a known workload or service";
  return r;
}

}  // namespace weft::ztunnel
