// The ztunnel's mTLS side (ARCHITECTURE "HBONE in the ztunnel"): TLS contexts made from the
// identity manager's certificates, the pooled HBONE client for outbound connections to meshed
// pods, and one HBONE server per local identity behind the pods' 15008 listeners.
#pragma once

#include <uv.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "ztunnel/hbone/client.h"
#include "ztunnel/hbone/server.h"
#include "ztunnel/identity.h"
#include "ztunnel/proxy.h"
#include "ztunnel/route.h"

namespace weft::ztunnel {

class ProxyConnection;

struct MeshTlsOptions {
  // How long a new connection waits for its workload's first certificate.
  std::chrono::milliseconds cert_wait{5000};
  hbone::H2Settings settings;
};

// The counters of one loop's mTLS side; a multi-loop ztunnel sums them over its loops.
struct MeshTlsCounters {
  uint64_t client_handshakes = 0;
  uint64_t client_handshake_failures = 0;
  uint64_t client_stream_retries = 0;
  uint64_t pool_connections = 0;
  hbone::TlsRefusalCounts client_refused{};
  hbone::ServerStats server;
  MeshTlsCounters& operator+=(const MeshTlsCounters& o);
};

class MeshTls {
 public:
  // Finds the local pod that owns an IP (the HBONE server's CONNECT targets).
  using LocalPodLookup = std::function<LocalPodPtr(const IpAddr&)>;

  MeshTls(Proxy& proxy, CertificateSource& identities, LocalPodLookup lookup,
          MeshTlsOptions options = {});
  ~MeshTls();
  MeshTls(const MeshTls&) = delete;
  MeshTls& operator=(const MeshTls&) = delete;

  void setTrustDomain(std::string td) { trust_domain_ = std::move(td); }
  const std::string& trustDomain() const { return trust_domain_; }
  // spiffe://<td>/ns/<ns>/sa/<sa> of a workload (service account "default" when unset).
  Result<Identity> identityOf(const WorkloadInfo& w) const;

  // Outbound `c` from local pod `src`, routed to an enrolled workload: waits (bounded) for the
  // source identity's certificate, then opens a CONNECT stream to <dest IP>:15008.
  void outbound(ProxyConnection* c, const LocalPodPtr& src, const Route& route);
  // A connection accepted on `pod`'s HBONE listener.
  void acceptInbound(uv_stream_t* listener, const LocalPodPtr& pod);

  const hbone::HboneClient& client() const { return client_; }
  // Sums over the per-identity servers.
  hbone::ServerStats serverStats() const;
  size_t pendingInbound() const { return pending_inbound_.size(); }
  nlohmann::json toJson() const;
  // weft_ztunnel_tls_refused_total{side, reason} in Prometheus text.
  std::string renderRefusals() const { return renderRefusals(counters()); }
  static std::string renderRefusals(const MeshTlsCounters& c);
  MeshTlsCounters counters() const;

 private:
  struct CachedCtx {
    std::string serial;
    hbone::SslCtxPtr ctx;
  };
  Result<hbone::SslCtxPtr> contextFor(const CertificatePtr& cert, hbone::TlsRole role);
  hbone::HboneServer& serverFor(const Identity& id);
  hbone::InboundDecision decideInbound(const Identity& id, const hbone::InboundConnect& req);
  void serveInbound(const Identity& id, UniqueFd fd, const CertificatePtr& cert);

  Proxy& proxy_;
  CertificateSource& identities_;
  LocalPodLookup lookup_;
  MeshTlsOptions options_;
  std::string trust_domain_ = "cluster.local";
  hbone::HboneClient client_;
  std::map<std::pair<std::string, int>, CachedCtx> contexts_;  // (identity, role) -> newest
  std::map<std::string, std::unique_ptr<hbone::HboneServer>> servers_;  // by identity
  std::map<CertificateSource::WaitId, UniqueFd> pending_inbound_;  // accepted, awaiting a cert
};

}  // namespace weft::ztunnel
