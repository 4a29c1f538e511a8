// Outbound connections: SO_ORIGINAL_DST, decideOutbound(), then the upstream connect.
#include "ztunnel/outbound.h"

#include <spdlog/spdlog.h>

#include "ztunnel/connection.h"
#include "ztunnel/fast_path.h"
#include "ztunnel/mesh_tls.h"
#include "ztunnel/route.h"
#include "ztunnel/sockets.h"
#include "ztunnel/traffic_labels.h"

namespace weft::ztunnel {

void handleOutbound(Proxy& proxy, uv_stream_t* listener, const LocalPodPtr& pod) {
  ProxyConnection* c = ProxyConnection::accept(&proxy, listener, ConnectionDirection::kOutbound);
  if (c == nullptr) return;
  proxy.stats().outbound_accepted_total++;
  int fd = c->downstreamFd();
  if (auto peer = peerAddress(fd)) c->source = *peer;
  // A TCP peer is of the socket's own family: no getsockname() needed for it.
  int family = c->source.family();
  if (family == 0) {
    auto local = localAddress(fd);
    family = local ? local->family() : AF_INET;
  }
  const WorkloadInfo& src = *pod->info;
  // The app reached us on the pod's loopback, so its socket's address is loopback too; who it
  // is to everyone else (logs, /connections, metrics) is the pod's own address, same port.
  if (c->source.family() && c->source.ip().isLoopback()) {
    if (const IpAddr* ip = src.ipOfFamily(c->source.family()))
      c->source = SocketAddress(*ip, c->source.port());
  }
  c->labels.reporter = "source";
  setSourceLabels(c->labels, src);

  auto orig = proxy.destinationHook() ? proxy.destinationHook()(fd, false)
                                      : originalDestination(fd, family);
  if (!orig) {
    proxy.stats().outbound_original_dst_failures_total++;
    spdlog::warn("outbound from {} ({}/{}): {}", c->source.toString(), src.namespace_, src.name,
                 orig.status().message());
    c->refuse(orig.status().message());
    return;
  }
  c->destination = *orig;

  static const ClusterState kEmpty;
  const ClusterState& state = proxy.state() ? *proxy.state() : kEmpty;
  Route route = decideOutbound(*orig, &src, state, proxy.balancer());
  c->route = std::string(routeKindName(route.kind)) + ": " + route.reason;
  if (route.destination_workload)
    setDestinationLabels(c->labels, *route.destination_workload, proxy.trustDomain());
  if (route.destination_service)
    setServiceLabels(c->labels, *route.destination_service, proxy.clusterDomain());
  if (route.kind == RouteKind::kRefused) {
    if (route.no_endpoints) proxy.stats().no_endpoint_total++;
    else proxy.stats().route_refused_total++;
    spdlog::info("outbound {} -> {} refused: {}", c->source.toString(), orig->toString(),
                 route.reason);
    c->refuse(route.reason);
    return;
  }
  c->upstream = route.next_hop;
  // This connection takes the ztunnel path; the pair's next ones may go fast (same node).
  if (proxy.fastPath()) proxy.fastPath()->consider(src, route, *orig);
  if (route.kind == RouteKind::kServiceEndpoint) {
    // Counts as the endpoint's open connection until it ends; the connect reports back.
    if (route.all_ejected) proxy.stats().lb_all_ejected_total++;
    c->setEndpointLease(proxy.balancer().lease(route.next_hop));
  }

  // A pod in the mesh (on any node) is reached over HBONE, with mTLS; anything else plainly.
  if (route.destination_workload && route.destination_workload->enrolled && proxy.meshTls()) {
    proxy.meshTls()->outbound(c, pod, route);
    return;
  }

  // Created in the source pod's netns, marked, so the connect hook lets it through.
  auto sock = markedTcpSocket(pod->netns.get(), route.next_hop.family());
  if (!sock) {
    proxy.stats().upstream_socket_failures_total++;
    spdlog::warn("outbound upstream socket for {}/{}: {}", src.namespace_, src.name,
                 sock.status().message());
    c->refuse(sock.status().message());
    return;
  }
  c->connectUpstream(std::move(sock.value()));
}

}  // namespace weft::ztunnel
