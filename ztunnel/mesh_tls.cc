// mTLS in the ztunnel: outbound CONNECTs to meshed pods, inbound HBONE per local identity.
#include "ztunnel/mesh_tls.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>

#include "ztunnel/connection.h"
#include "ztunnel/inbound_policy.h"
#include "ztunnel/sockets.h"

namespace weft::ztunnel {

namespace {

constexpr uint16_t kHbonePort = 15008;

// The PEM texts makeTlsContext() takes, from a certificate the identity manager holds.
Result<hbone::Credentials> credentialsOf(const Certificate& cert) {
  hbone::Credentials c;
  auto key = tls::keyToPem(cert.key.get());
  if (!key) return key.status();
  c.keyPem = std::move(key.value());
  auto leaf = tls::certToPem(cert.leaf.get());
  if (!leaf) return leaf.status();
  c.chainPem = std::move(leaf.value());
  for (const auto& x : cert.chain) {
    auto pem = tls::certToPem(x.get());
    if (!pem) return pem.status();
    c.chainPem += pem.value();
  }
  for (const auto& x : cert.roots) {
    auto pem = tls::certToPem(x.get());
    if (!pem) return pem.status();
    c.rootsPem += pem.value();
  }
  return c;
}

}  // namespace

MeshTls::MeshTls(Proxy& proxy, IdentityManager& identities, LocalPodLookup lookup,
                 MeshTlsOptions options)
    : proxy_(proxy),
      identities_(identities),
      lookup_(std::move(lookup)),
      options_(options),
      client_(proxy.loop(), [&] {
        hbone::ClientConfig cc;
        cc.settings = options.settings;
        cc.settings.maxHeaderList = 16u << 10;
        return cc;
      }()) {}

MeshTls::~MeshTls() {
  for (auto& [id, fd] : pending_inbound_) identities_.cancelWait(id);
  pending_inbound_.clear();
}

Result<Identity> MeshTls::identityOf(const WorkloadInfo& w) const {
  return Identity::parse("spiffe://" + trust_domain_ + "/ns/" + w.namespace_ + "/sa/" +
                         (w.service_account.empty() ? "default" : w.service_account));
}

Result<hbone::SslCtxPtr> MeshTls::contextFor(const CertificatePtr& cert, hbone::TlsRole role) {
  auto key = std::make_pair(cert->identity.toString(), static_cast<int>(role));
  auto it = contexts_.find(key);
  if (it != contexts_.end() && it->second.serial == cert->serial) return it->second.ctx;
  auto creds = credentialsOf(*cert);
  if (!creds) return creds.status().context("credentials of " + key.first);
  auto ctx = hbone::makeTlsContext(role, creds.value());
  if (!ctx) return ctx.status().context("TLS context of " + key.first);
  contexts_[key] = CachedCtx{cert->serial, ctx.value()};  // the old one lives on in its users
  return ctx.value();
}

void MeshTls::outbound(ProxyConnection* c, const LocalPodPtr& src, const Route& route) {
  auto src_id = identityOf(*src->info);
  auto dst_id = route.destination_workload ? identityOf(*route.destination_workload)
                                           : Result<Identity>(Status::error("no workload"));
  if (!src_id || !dst_id) {
    proxy_.stats().route_refused_total++;
    c->refuse("no SPIFFE identity: " +
              (src_id ? dst_id.status().message() : src_id.status().message()));
    return;
  }
  c->peer_identity = dst_id->toString();
  auto go = [this, c, src, route, dst = dst_id->toString()](CertificatePtr cert) {
    c->setPendingCancel(nullptr);
    if (!cert) {
      proxy_.stats().cert_wait_timeouts_total++;
      c->refuse("no certificate for the source identity within the wait");
      return;
    }
    auto ctx = contextFor(cert, hbone::TlsRole::kClient);
    if (!ctx) {
      proxy_.stats().upstream_socket_failures_total++;
      spdlog::warn("outbound HBONE: {}", ctx.status().message());
      c->refuse(ctx.status().message());
      return;
    }
    hbone::OutboundConnect req;
    req.sourceIdentity = cert->identity.toString();
    req.ctx = ctx.value();
    req.credentialsVersion = cert->serial;
    req.destinationIdentity = dst;
    req.hboneAddress = SocketAddress(route.next_hop.ip(), kHbonePort);
    req.target = route.next_hop;
    if (const IpAddr* ip = src->info->ipOfFamily(route.next_hop.family())) {
      req.forwardedFor = SocketAddress(*ip, c->source.port());
    }
    LocalPodPtr pod = src;
    req.makeSocket = [pod](const SocketAddress& to) {
      return markedTcpSocket(pod->netns.get(), to.family());
    };
    c->tunnelOutbound(client_, std::move(req));
  };
  if (CertificatePtr cert = identities_.current(*src_id)) {
    go(std::move(cert));
    return;
  }
  proxy_.stats().cert_waits_total++;
  IdentityManager::WaitId wid = identities_.waitFor(*src_id, go, options_.cert_wait);
  IdentityManager* ids = &identities_;
  c->setPendingCancel([ids, wid] { ids->cancelWait(wid); });
}

void MeshTls::acceptInbound(uv_stream_t* listener, const LocalPodPtr& pod) {
  // Take the connection as a plain fd: the HBONE server wraps it in its own handle.
  auto* tmp = new uv_tcp_t{};
  int rc = uv_tcp_init(listener->loop, tmp);
  if (rc != 0) {
    delete tmp;
    proxy_.stats().accept_failures_total++;
    spdlog::warn("HBONE accept: uv_tcp_init: {}", uv_strerror(rc));
    return;
  }
  UniqueFd fd;
  rc = uv_accept(listener, reinterpret_cast<uv_stream_t*>(tmp));
  if (rc == 0) {
    uv_os_fd_t raw;
    rc = uv_fileno(reinterpret_cast<uv_handle_t*>(tmp), &raw);
    if (rc == 0) fd.reset(::fcntl(raw, F_DUPFD_CLOEXEC, 0));
  }
  uv_close(reinterpret_cast<uv_handle_t*>(tmp),
           [](uv_handle_t* h) { delete reinterpret_cast<uv_tcp_t*>(h); });
  if (!fd.valid()) {
    proxy_.stats().accept_failures_total++;
    spdlog::warn("HBONE accept: {}", rc != 0 ? uv_strerror(rc) : "dup failed");
    return;
  }
  auto id = identityOf(*pod->info);
  if (!id) {
    proxy_.stats().route_refused_total++;
    spdlog::warn("HBONE to {}/{}: {}", pod->info->namespace_, pod->info->name,
                 id.status().message());
    return;  // fd closes
  }
  if (CertificatePtr cert = identities_.current(*id)) {
    serveInbound(*id, std::move(fd), cert);
    return;
  }
  proxy_.stats().cert_waits_total++;
  auto wid = std::make_shared<IdentityManager::WaitId>(0);
  *wid = identities_.waitFor(
      *id,
      [this, identity = *id, wid](CertificatePtr cert) {
        auto it = pending_inbound_.find(*wid);
        if (it == pending_inbound_.end()) return;
        UniqueFd conn = std::move(it->second);
        pending_inbound_.erase(it);
        if (!cert) {
          proxy_.stats().cert_wait_timeouts_total++;
          return;  // conn closes
        }
        serveInbound(identity, std::move(conn), cert);
      },
      options_.cert_wait);
  pending_inbound_[*wid] = std::move(fd);
}

void MeshTls::serveInbound(const Identity& id, UniqueFd fd, const CertificatePtr& cert) {
  auto ctx = contextFor(cert, hbone::TlsRole::kServer);
  if (!ctx) {
    spdlog::warn("inbound HBONE: {}", ctx.status().message());
    return;
  }
  hbone::HboneServer& server = serverFor(id);
  server.setContext(ctx.value());  // new connections present the newest certificate
  Status st = server.serve(std::move(fd));
  if (!st) spdlog::warn("inbound HBONE for {}: {}", id.toString(), st.message());
}

hbone::HboneServer& MeshTls::serverFor(const Identity& id) {
  std::string key = id.toString();
  auto it = servers_.find(key);
  if (it != servers_.end()) return *it->second;
  hbone::ServerConfig cfg;
  cfg.trustDomain = trust_domain_;
  cfg.settings = options_.settings;
  cfg.decide = [this, id](const hbone::InboundConnect& req) { return decideInbound(id, req); };
  auto server = std::make_unique<hbone::HboneServer>(proxy_.loop(), std::move(cfg));
  return *servers_.emplace(key, std::move(server)).first->second;
}

hbone::InboundDecision MeshTls::decideInbound(const Identity& id,
                                              const hbone::InboundConnect& req) {
  hbone::InboundDecision d;
  LocalPodPtr pod = lookup_ ? lookup_(req.target.ip()) : nullptr;
  auto pod_id = pod ? identityOf(*pod->info) : Result<Identity>(Status::error("no pod"));
  if (!pod || !pod_id || !(pod_id.value() == id)) {
    // Not a pod of this node with the identity this connection presented.
    proxy_.stats().inbound_wrong_destination_total++;
    d.verdict = hbone::InboundDecision::Verdict::kMalformed;
    return d;
  }
  // Authorization, before anything is set up for the stream: denied = 401.
  InboundPeer peer;
  peer.path = "hbone";
  peer.source = req.peer;
  if (auto fwd = forwardedFor(req.headers)) peer.remote_ip = *fwd;
  peer.principal = req.peerIdentity;
  if (!authorizeInbound(proxy_, *pod->info, peer, req.target).allowed) {
    d.verdict = hbone::InboundDecision::Verdict::kDeny;
    return d;
  }
  proxy_.stats().hbone_inbound_streams_total++;
  ProxyConnection* c = ProxyConnection::forInboundTunnel(&proxy_, &d.watch);
  c->source = req.peer;
  c->destination = req.target;
  c->upstream = req.target;
  c->route = "inbound hbone";
  c->peer_identity = req.peerIdentity;
  const WorkloadInfo& dst = *pod->info;
  c->labels.reporter = "destination";
  c->labels.destination_workload = dst.name;
  c->labels.destination_workload_namespace = dst.namespace_;
  if (proxy_.state()) {
    if (WorkloadInfoPtr src = proxy_.state()->workloadByIp(req.peer.ip())) {
      c->labels.source_workload = src->name;
      c->labels.source_workload_namespace = src->namespace_;
    }
  }
  d.verdict = hbone::InboundDecision::Verdict::kAllow;
  d.makeSocket = [pod](const SocketAddress& target) -> Result<UniqueFd> {
    auto sock = markedTcpSocket(pod->netns.get(), target.family());
    if (!sock) return sock.status();
    Status st = bindInboundSource(sock->get(), target.ip());
    if (!st) return st;
    return std::move(sock.value());
  };
  return d;
}

hbone::ServerStats MeshTls::serverStats() const {
  hbone::ServerStats sum;
  for (const auto& [id, s] : servers_) {
    const hbone::ServerStats& x = s->stats();
    sum.handshakes += x.handshakes;
    sum.handshakeFailures += x.handshakeFailures;
    sum.streams += x.streams;
    sum.ok200 += x.ok200;
    sum.bad400 += x.bad400;
    sum.denied401 += x.denied401;
    sum.failed503 += x.failed503;
    for (size_t i = 0; i < hbone::kTlsRefusalCount; ++i) sum.refused[i] += x.refused[i];
  }
  return sum;
}

std::string MeshTls::renderRefusals() const {
  hbone::ServerStats s = serverStats();
  std::string out =
      "# HELP weft_ztunnel_tls_refused_total HBONE TLS handshakes refused, by side and reason\n"
      "# TYPE weft_ztunnel_tls_refused_total counter\n";
  for (size_t i = 0; i < hbone::kTlsRefusalCount; ++i) {
    auto r = static_cast<hbone::TlsRefusal>(i);
    if (r == hbone::TlsRefusal::kNone) continue;
    out += fmt::format("weft_ztunnel_tls_refused_total{{side=\"server\",reason=\"{}\"}} {}\n",
                       hbone::tlsRefusalName(r), s.refused[i]);
    out += fmt::format("weft_ztunnel_tls_refused_total{{side=\"client\",reason=\"{}\"}} {}\n",
                       hbone::tlsRefusalName(r), client_.refusals(r));
  }
  return out;
}

nlohmann::json MeshTls::toJson() const {
  hbone::ServerStats s = serverStats();
  nlohmann::json servers = nlohmann::json::array();
  for (const auto& [id, srv] : servers_)
    servers.push_back({{"identity", id}, {"connections", srv->connections()}});
  return {{"trust_domain", trust_domain_},
          {"cert_wait_ms", options_.cert_wait.count()},
          {"client", {{"pool_connections", client_.connections()},
                      {"handshakes", client_.handshakes()},
                      {"handshake_failures", client_.handshakeFailures()}}},
          {"servers", servers},
          {"server_totals", {{"handshakes", s.handshakes},
                             {"handshake_failures", s.handshakeFailures},
                             {"streams", s.streams},
                             {"ok_200", s.ok200},
                             {"bad_400", s.bad400},
                             {"denied_401", s.denied401},
                             {"failed_503", s.failed503}}},
          // Held connections of both directions (outbound ones wait in the identity manager).
          {"connections_waiting_for_certificate", identities_.pendingWaits()}};
}

}  // namespace weft::ztunnel
