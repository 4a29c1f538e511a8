// Inbound plaintext connections: the steered destination, then a connect to the app from
// 127.0.0.6 (IPv4) or the pod's own address (IPv6) so steering lets it through.
#include "ztunnel/inbound.h"

#include <spdlog/spdlog.h>

#include "ztunnel/connection.h"
#include "ztunnel/inbound_policy.h"
#include "ztunnel/sockets.h"
#include "ztunnel/traffic_labels.h"

namespace weft::ztunnel {


void handleInbound(Proxy& proxy, uv_stream_t* listener, const LocalPodPtr& pod) {
  ProxyConnection* c = ProxyConnection::accept(&proxy, listener, ConnectionDirection::kInbound);
  if (c == nullptr) return;
  proxy.stats().inbound_accepted_total++;
  int fd = c->downstreamFd();
  if (auto peer = peerAddress(fd)) c->source = *peer;
  const WorkloadInfo& dst = *pod->info;
  c->labels.reporter = "destination";
  setDestinationLabels(c->labels, dst, proxy.trustDomain());
  if (proxy.state()) {
    if (WorkloadInfoPtr src = proxy.state()->workloadByIp(c->source.ip()))
      setSourceLabels(c->labels, *src);
  }

  // sk_lookup preserves the local address: it is where the caller wanted to go.
  std::optional<SocketAddress> local = localAddress(fd);
  bool hooked = false;
  if (proxy.destinationHook()) {
    auto d = proxy.destinationHook()(fd, true);
    local = d ? std::optional<SocketAddress>(*d) : std::nullopt;
    hooked = true;
  }
  if (!local || !dst.hasIp(local->ip())) {
    proxy.stats().inbound_wrong_destination_total++;
    std::string where = local ? local->toString() : "unknown";
    spdlog::warn("inbound from {} to {}: not an address of {}/{}", c->source.toString(), where,
                 dst.namespace_, dst.name);
    c->refuse("destination " + where + " is not this pod's");
    return;
  }
  // Reached on the listener's own port: nobody steered this (a direct connect to 15006), and
  // connecting there would loop back into us.
  uv_os_fd_t lfd;
  if (!hooked && uv_fileno(reinterpret_cast<uv_handle_t*>(listener), &lfd) == 0) {
    auto listen_addr = localAddress(lfd);
    if (listen_addr && listen_addr->port() == local->port()) {
      proxy.stats().inbound_wrong_destination_total++;
      c->refuse("connection to the inbound listener port itself");
      return;
    }
  }
  // Authorization: a plaintext caller is unauthenticated (no principal, no namespace); a
  // denied connection is reset. STRICT peer authentication (the live mode from the cluster
  // state, else what the agent said when the pod was added) refuses every plaintext caller.
  InboundPeer peer;
  peer.path = "plaintext";
  peer.source = c->source;
  Verdict verdict = authorizeInbound(proxy, dst, peer, *local);
  if (!verdict.allowed && verdict.reason == VerdictReason::kStrictMtls) {
    proxy.stats().plaintext_refused_total++;
    c->refuseWith("DENY", "plaintext refused: STRICT peer authentication");
    return;
  }
  if (!verdict.allowed) {
    c->refuseWith("DENY", std::string("denied by authorization policy: ") +
                              verdictReasonName(verdict.reason) +
                              (verdict.decided_by.policy.empty() ? ""
                                                                 : " " + verdict.decided_by.policy));
    return;
  }
  c->destination = *local;
  c->upstream = *local;
  c->route = "inbound plaintext";

  auto sock = markedTcpSocket(pod->netns.get(), local->family());
  Status st = sock ? bindInboundSource(sock->get(), local->ip()) : sock.status();
  if (!st) {
    proxy.stats().upstream_socket_failures_total++;
    spdlog::warn("inbound upstream socket for {}/{}: {}", dst.namespace_, dst.name,
                 st.message());
    c->refuse(st.message());
    return;
  }
  c->connectUpstream(std::move(sock.value()));
}

}  // namespace weft::ztunnel
