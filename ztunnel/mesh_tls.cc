// mTLS in the ztunnel: outbound CONNECTs to meshed pods, inbound HBONE per local identity.
#include "ztunnel/mesh_tls.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>

#include <chrono>

#include "ztunnel/connection.h"
#include "ztunnel/inbound_policy.h"
#include "ztunnel/sockets.h"
#include "ztunnel/traffic_labels.h"

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

MeshTls::MeshTls(Proxy& proxy, CertificateSource& identities, LocalPodLookup lookup,
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
    c->refuseWith("IDENTITY_ERROR", "no SPIFFE identity: " +
              (src_id ? dst_id.status().message() : src_id.status().message()));
    return;
  }
  c->peer_identity = dst_id->toString();
  // Over mTLS both ends are known: ours by the certificate we present, theirs by the SAN the
  // handshake requires.
  c->labels.source_principal = src_id->toString();
  c->labels.destination_principal = dst_id->toString();
  c->hbone_address = SocketAddress(route.next_hop.ip(), kHbonePort);
  auto go = [this, c, src, route, dst = dst_id->toString()](CertificatePtr cert) {
    c->setPendingCancel(nullptr);
    if (!cert) {
      proxy_.stats().cert_wait_timeouts_total++;
      c->refuseWith("IDENTITY_ERROR", "no certificate for the source identity within the wait");
      return;
    }
    auto ctx = contextFor(cert, hbone::TlsRole::kClient);
    if (!ctx) {
      proxy_.stats().upstream_socket_failures_total++;
      spdlog::warn("outbound HBONE: {}", ctx.status().message());
      c->refuseWith("TLS_FAILURE", ctx.status().message());
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
  CertificateSource::WaitId wid = identities_.waitFor(*src_id, go, options_.cert_wait);
  CertificateSource* ids = &identities_;
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
  auto wid = std::make_shared<CertificateSource::WaitId>(0);
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
  // Istio's labels for this stream, also for the access-log line of a refusal.
  TcpLabels labels;
  labels.reporter = "destination";
  labels.connection_security_policy = "mutual_tls";
  labels.source_principal = req.peerIdentity;
  if (proxy_.state()) {
    if (WorkloadInfoPtr src = proxy_.state()->workloadByIp(req.peer.ip()))
      setSourceLabels(labels, *src);
  }
  auto refused = [&](const char* flag, const std::string& why) {
    TcpLabels l = labels;
    l.response_flags = flag;
    AccessLogRecord r;
    r.time_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                    std::chrono::system_clock::now().time_since_epoch())
                    .count();
    r.direction = "inbound";
    r.path = "hbone";
    r.src_addr = req.peer;
    r.src_workload = l.source_workload;
    r.src_namespace = l.source_workload_namespace;
    r.src_identity = l.source_principal;
    r.dst_addr = SocketAddress(req.target.ip(), kHbonePort);
    r.dst_hbone_addr = req.target;
    r.dst_workload = l.destination_workload;
    r.dst_namespace = l.destination_workload_namespace;
    r.dst_identity = l.destination_principal;
    r.error = why;
    proxy_.inboundStreamRefused(l, std::move(r));
  };
  if (!pod || !pod_id || !(pod_id.value() == id)) {
    // Not a pod of this node with the identity this connection presented.
    proxy_.stats().inbound_wrong_destination_total++;
    d.verdict = hbone::InboundDecision::Verdict::kMalformed;
    refused("CONNECT", "HBONE CONNECT to " + req.target.toString() +
                           ": not a local pod with the identity this connection was served for");
    return d;
  }
  setDestinationLabels(labels, *pod->info, trust_domain_);
  // Authorization, before anything is set up for the stream: denied = 401.
  InboundPeer peer;
  peer.path = "hbone";
  peer.source = req.peer;
  if (auto fwd = forwardedFor(req.headers)) peer.remote_ip = *fwd;
  peer.principal = req.peerIdentity;
  Verdict verdict = authorizeInbound(proxy_, *pod->info, peer, req.target);
  if (!verdict.allowed) {
    d.verdict = hbone::InboundDecision::Verdict::kDeny;
    refused("DENY", std::string("denied by authorization policy: ") +
                        verdictReasonName(verdict.reason) +
                        (verdict.decided_by.policy.empty() ? "" : " " + verdict.decided_by.policy));
    return d;
  }
  proxy_.stats().hbone_inbound_streams_total++;
  ProxyConnection* c = ProxyConnection::forInboundTunnel(&proxy_, &d.watch);
  c->source = req.peer;
  c->destination = req.target;
  c->upstream = req.target;
  c->route = "inbound hbone";
  c->peer_identity = req.peerIdentity;
  c->labels = labels;
  c->hbone_address = SocketAddress(req.target.ip(), kHbonePort);
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

MeshTlsCounters& MeshTlsCounters::operator+=(const MeshTlsCounters& o) {
  client_handshakes += o.client_handshakes;
  client_handshake_failures += o.client_handshake_failures;
  client_stream_retries += o.client_stream_retries;
  pool_connections += o.pool_connections;
  server.handshakes += o.server.handshakes;
  server.handshakeFailures += o.server.handshakeFailures;
  server.streams += o.server.streams;
  server.ok200 += o.server.ok200;
  server.bad400 += o.server.bad400;
  server.denied401 += o.server.denied401;
  server.failed503 += o.server.failed503;
  for (size_t i = 0; i < hbone::kTlsRefusalCount; ++i) {
    client_refused[i] += o.client_refused[i];
    server.refused[i] += o.server.refused[i];
  }
  return *this;
}

MeshTlsCounters MeshTls::counters() const {
  MeshTlsCounters c;
  c.client_handshakes = client_.handshakes();
  c.client_handshake_failures = client_.handshakeFailures();
  c.client_stream_retries = client_.streamRetries();
  c.pool_connections = client_.connections();
  for (size_t i = 0; i < hbone::kTlsRefusalCount; ++i)
    c.client_refused[i] = client_.refusals(static_cast<hbone::TlsRefusal>(i));
  c.server = serverStats();
  return c;
}

std::string MeshTls::renderRefusals(const MeshTlsCounters& c) {
  std::string out =
      "# HELP weft_ztunnel_tls_refused_total HBONE TLS handshakes refused, by side and reason\n"
      "# TYPE weft_ztunnel_tls_refused_total counter\n";
  for (size_t i = 0; i < hbone::kTlsRefusalCount; ++i) {
    auto r = static_cast<hbone::TlsRefusal>(i);
    if (r == hbone::TlsRefusal::kNone) continue;
    out += fmt::format("weft_ztunnel_tls_refused_total{{side=\"server\",reason=\"{}\"}} {}\n",
                       hbone::tlsRefusalName(r), c.server.refused[i]);
    out += fmt::format("weft_ztunnel_tls_refused_total{{side=\"client\",reason=\"{}\"}} {}\n",
                       hbone::tlsRefusalName(r), c.client_refused[i]);
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
                      {"handshake_failures", client_.handshakeFailures()},
                      {"stream_retries", client_.streamRetries()}}},
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
