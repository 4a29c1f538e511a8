// Inbound authorization: attributes, evaluation against the live cluster state, the event.
#include "ztunnel/inbound_policy.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cctype>
#include <string_view>

namespace weft::ztunnel {

std::optional<IpAddr> forwardedFor(const hbone::Headers& headers) {
  for (const auto& [name, value] : headers) {
    std::string lower = name;
    std::transform(lower.begin(), lower.end(), lower.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    if (lower != "forwarded") continue;
    // The first element's for= parameter: for="1.2.3.4:5", for="[v6]:5", for=1.2.3.4.
    size_t at = value.find("for=");
    if (at == std::string::npos) return std::nullopt;
    std::string v = value.substr(at + 4);
    size_t end = v.find_first_of(";,");
    if (end != std::string::npos) v = v.substr(0, end);
    if (!v.empty() && v.front() == '"') {
      if (v.size() < 2 || v.back() != '"') return std::nullopt;
      v = v.substr(1, v.size() - 2);
    }
    if (!v.empty() && v.front() == '[') {
      size_t close = v.find(']');
      if (close == std::string::npos) return std::nullopt;
      return IpAddr::parse(v.substr(1, close - 1));
    }
    if (auto sa = SocketAddress::parse(v)) return sa->ip();
    return IpAddr::parse(v);
  }
  return std::nullopt;
}

ConnectionAttributes inboundAttributes(const WorkloadInfo& w, const InboundPeer& peer,
                                       const SocketAddress& destination) {
  ConnectionAttributes attrs;
  attrs.source_ip = peer.source.ip();
  attrs.remote_ip = peer.remote_ip.family() != 0 ? peer.remote_ip : peer.source.ip();
  attrs.principal = peer.principal;
  attrs.source_namespace = namespaceOfPrincipal(peer.principal);
  attrs.destination_namespace = w.namespace_;
  attrs.destination_labels = w.labels;
  attrs.destination_ip = destination.ip();
  attrs.destination_port = destination.port();
  return attrs;
}

Verdict authorizeInbound(Proxy& proxy, const WorkloadInfo& dst, const InboundPeer& peer,
                         const SocketAddress& destination) {
  const ClusterStatePtr& state = proxy.state();
  // Labels and namespace from the live cluster state (a label change reaches selectors at
  // once); the AddWorkload copy when the state does not know the pod.
  WorkloadInfoPtr live = state ? state->workloadByUid(dst.uid) : nullptr;
  const WorkloadInfo& w = live ? *live : dst;

  ConnectionAttributes attrs = inboundAttributes(w, peer, destination);

  Verdict v;
  if (std::string_view(peer.path) == "plaintext" && w.strict_mtls) {
    // STRICT peer authentication: only HBONE (mTLS) may reach this pod; no policy is asked.
    v.allowed = false;
    v.reason = VerdictReason::kStrictMtls;
  } else {
    static const std::vector<AuthorizationPolicyPtr> kNone;
    v = evaluate(state ? state->authorizationPolicies() : kNone, attrs);
  }

  VerdictEvent e;
  e.path = peer.path;
  e.source = peer.source;
  e.remote_ip = attrs.remote_ip;
  e.source_principal = peer.principal;
  e.source_namespace = attrs.source_namespace;
  if (state) {
    if (WorkloadInfoPtr src = state->workloadByIp(peer.source.ip()))
      e.source_workload = src->namespace_ + "/" + src->name;
  }
  e.destination_workload = w.namespace_ + "/" + w.name;
  e.destination = destination;
  e.verdict = v;
  if (!v.allowed) {
    spdlog::info("{} {} ({}) -> {} {}: denied ({}{})", peer.path, peer.source.toString(),
                 peer.principal.empty() ? "unauthenticated" : peer.principal,
                 e.destination_workload, destination.toString(), verdictReasonName(v.reason),
                 v.decided_by.policy.empty() ? "" : " by " + v.decided_by.policy);
  }
  proxy.verdicts().record(std::move(e));
  return v;
}

}  // namespace weft::ztunnel
