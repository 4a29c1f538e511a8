// Trace: resolve the two ends, then run decideOutbound() and evaluate() exactly as the outbound
// and inbound paths do (same attributes), and explain each step as JSON.
#include "ztunnel/trace.h"

#include <charconv>

#include "bpf/abi/ports.h"
#include "common/http_admin.h"
#include "ztunnel/policy.h"
#include "ztunnel/route.h"
#include "ztunnel/verdicts.h"

namespace weft::ztunnel {

namespace {

using nlohmann::json;

std::string podKey(const WorkloadInfo& w) { return w.namespace_ + "/" + w.name; }

std::string identityOf(const WorkloadInfo& w, const std::string& td) {
  return "spiffe://" + td + "/ns/" + w.namespace_ + "/sa/" +
         (w.service_account.empty() ? "default" : w.service_account);
}

WorkloadInfoPtr findPod(const ClusterState& st, const std::string& ref) {
  size_t slash = ref.find('/');
  std::string ns = slash == std::string::npos ? "default" : ref.substr(0, slash);
  std::string name = slash == std::string::npos ? ref : ref.substr(slash + 1);
  for (const auto& [uid, w] : st.workloads())
    if (w->namespace_ == ns && w->name == name) return w;
  return nullptr;
}

const IpAddr* preferredIp(const std::vector<IpAddr>& ips) {
  for (const IpAddr& ip : ips)
    if (ip.family() == AF_INET) return &ip;
  return ips.empty() ? nullptr : &ips.front();
}

struct Resolved {
  SocketAddress address;
  std::string kind;  // ip | pod | service
};

Result<Resolved> resolveDestination(const ClusterState& st, const std::string& text,
                                    const std::string& cluster_domain) {
  if (auto sa = SocketAddress::parse(text)) return Resolved{*sa, "ip"};
  if (auto ip = IpAddr::parse(text)) return Resolved{SocketAddress(*ip, 0), "ip"};
  std::string name = text;
  uint16_t port = 0;
  size_t colon = text.rfind(':');
  if (colon != std::string::npos) {
    std::string p = text.substr(colon + 1);
    unsigned v = 0;
    auto [end, ec] = std::from_chars(p.data(), p.data() + p.size(), v);
    if (p.empty() || ec != std::errc() || end != p.data() + p.size() || v == 0 || v > 65535)
      return Status::errorf("destination {}: port '{}' is not 1-65535", text, p);
    port = static_cast<uint16_t>(v);
    name = text.substr(0, colon);
  }
  if (name.find('/') != std::string::npos) {
    WorkloadInfoPtr w = findPod(st, name);
    if (!w) return Status::errorf("destination {}: no pod {}", text, name);
    const IpAddr* ip = preferredIp(w->ips);
    if (ip == nullptr) return Status::errorf("destination {}: pod has no IP", text);
    return Resolved{SocketAddress(*ip, port), "pod"};
  }
  // name.ns, name.ns.svc, name.ns.svc.<cluster domain>
  std::string host = name;
  for (std::string suffix : {".svc." + cluster_domain, std::string(".svc")}) {
    if (host.size() > suffix.size() &&
        host.compare(host.size() - suffix.size(), suffix.size(), suffix) == 0) {
      host.resize(host.size() - suffix.size());
      break;
    }
  }
  size_t dot = host.find('.');
  if (dot == std::string::npos || host.find('.', dot + 1) != std::string::npos)
    return Status::errorf(
        "destination {}: not IP[:PORT], NS/POD[:PORT] or SERVICE.NS[.svc.{}][:PORT]", text,
        cluster_domain);
  std::string svc_name = host.substr(0, dot), ns = host.substr(dot + 1);
  for (const auto& [key, s] : st.services()) {
    if (s->namespace_ != ns || s->name != svc_name) continue;
    const IpAddr* vip = preferredIp(s->vips);
    if (vip == nullptr) return Status::errorf("destination {}: service has no VIP", text);
    if (port == 0) {
      for (const ServicePortInfo& p : s->ports)
        if (p.tcp) {
          port = p.port;
          break;
        }
    }
    return Resolved{SocketAddress(*vip, port), "service"};
  }
  return Status::errorf("destination {}: no service {}/{}", text, ns, svc_name);
}

}  // namespace

Result<TraceQuery> parseTraceQuery(const std::string& query) {
  auto q = parseQuery(query);
  if (!q) return q.status();
  TraceQuery t;
  for (const auto& [k, v] : q.value()) {
    if (k == "src") t.source = v;
    else if (k == "dst") t.destination = v;
    else return Status::errorf("unknown parameter {} (src, dst)", k);
  }
  if (t.source.empty() || t.destination.empty())
    return Status::error("want src=NS/POD&dst=ADDR[:PORT]");
  return t;
}

Result<json> traceConnection(const TraceContext& ctx, const TraceQuery& query) {
  if (ctx.state == nullptr) return Status::error("no cluster state from the agent yet");
  const ClusterState& st = *ctx.state;
  WorkloadInfoPtr src = findPod(st, query.source);
  if (!src) return Status::errorf("source: no pod {} in the cluster state", query.source);
  auto dst = resolveDestination(st, query.destination, ctx.cluster_domain);
  if (!dst) return dst.status();
  SocketAddress target = dst->address;
  if (target.port() == 0)
    return Status::errorf("destination {}: give a port (DEST:PORT)", query.destination);

  json out;
  const IpAddr* src_ip = src->ipOfFamily(target.family());
  out["source"] = {{"workload", podKey(*src)},
                   {"node", src->node},
                   {"ip", src_ip ? json(src_ip->toString()) : json()},
                   {"enrolled", src->enrolled},
                   {"identity", src->enrolled ? json(identityOf(*src, ctx.trust_domain)) : json()}};
  out["destination"] = {{"input", query.destination},
                        {"address", target.toString()},
                        {"resolved_from", dst->kind}};

  // What cgroup/connect does (bpf/redirect_connect.bpf.c): TCP from an enrolled netns to a
  // non-loopback address goes to the ztunnel's 15001 (port 53 to 15053, the DNS proxy).
  bool redirected = src->enrolled && !target.ip().isLoopback();
  std::string why = !src->enrolled ? "source is not enrolled (not in the mesh)"
                    : target.ip().isLoopback() ? "loopback destinations are not redirected"
                    : target.port() == WEFT_PORT_DNS_SERVICE
                        ? "enrolled: port 53 goes to the DNS proxy on 15053"
                        : "enrolled: cgroup/connect sends it to the ztunnel's 15001";
  out["redirected"] = redirected;
  out["redirect_reason"] = why;

  WorkloadInfoPtr dst_workload;
  SocketAddress next_hop = target;
  std::string protocol;
  json route;
  if (redirected) {
    Balancer what_if = ctx.balancer ? ctx.balancer->detachedCopy() : Balancer();
    Route r = decideOutbound(target, src.get(), st, what_if);
    route["kind"] = routeKindName(r.kind);
    route["reason"] = r.reason;
    route["service"] = r.destination_service ? json(r.destination_service->key()) : json();
    json candidates = json::array();
    if (r.destination_service) {
      for (const ServiceEndpointInfo& e : r.destination_service->endpoints) {
        WorkloadInfoPtr w =
            e.workload_uid.empty() ? st.workloadByIp(e.ip) : st.workloadByUid(e.workload_uid);
        candidates.push_back({{"ip", e.ip.toString()}, {"workload", w ? json(podKey(*w)) : json()}});
      }
    }
    route["candidates"] = candidates;
    if (r.kind == RouteKind::kRefused) {
      protocol = "none";
      next_hop = SocketAddress();
    } else {
      next_hop = r.next_hop;
      dst_workload = r.destination_workload;
      if (r.kind == RouteKind::kPassthrough) protocol = "passthrough";
      else protocol = dst_workload && dst_workload->enrolled ? "hbone" : "plain";
    }
    route["all_ejected"] = r.all_ejected;
  } else {
    route["kind"] = "not-redirected";
    route["reason"] = st.serviceByVip(target.ip())
                          ? "a service VIP from outside the mesh: nothing resolves it (no "
                            "kube-proxy)"
                          : "the kernel connects as asked";
    route["service"] = nullptr;
    route["candidates"] = json::array();
    dst_workload = st.workloadByIp(target.ip());
    protocol = "plain";
  }
  route["next_hop"] = next_hop.family() ? json(next_hop.toString()) : json();
  route["endpoint_workload"] = dst_workload ? json(podKey(*dst_workload)) : json();
  route["waypoint"] = nullptr;  // no waypoints yet
  route["protocol"] = protocol;
  out["route"] = route;
  out["expected_identity"] = protocol == "hbone" && dst_workload
                                 ? json(identityOf(*dst_workload, ctx.trust_domain))
                                 : json();

  // The destination side: the destination's ztunnel authorizes inbound connections to its
  // enrolled pods (HBONE, or plaintext steered to 15006), with the attributes it would see.
  json inbound, verdict;
  std::string outcome;
  if (protocol == "none") {
    outcome = "refused";
    inbound = nullptr;
    verdict = nullptr;
  } else if (!dst_workload || !dst_workload->enrolled) {
    inbound = {{"enforced", false},
               {"reason", dst_workload ? "the destination pod is not in the mesh"
                                       : "the destination is not a pod the mesh knows"}};
    verdict = nullptr;
    outcome = "allowed";
  } else {
    bool hbone = protocol == "hbone";
    inbound = {{"enforced", true},
               {"path", hbone ? "hbone" : "plaintext"},
               {"node", dst_workload->node},
               {"peer_authentication", dst_workload->strict_mtls ? "STRICT" : "PERMISSIVE"}};
    if (!hbone && dst_workload->strict_mtls) {
      PolicyOutcome strict;  // as authorizeInbound() decides it: before any policy
      strict.allowed = false;
      strict.reason = VerdictReason::kStrictMtls;
      verdict = outcomeJson(strict);
      verdict["dry_run"] = nullptr;
    } else {
      // As authorizeInbound() builds them: the peer is the source pod (HBONE dials from its
      // netns; plaintext comes from it), forwarded = the same pod.
      ConnectionAttributes attrs;
      if (src_ip != nullptr) attrs.source_ip = *src_ip;
      attrs.remote_ip = attrs.source_ip;
      if (hbone) {
        attrs.principal = identityOf(*src, ctx.trust_domain);
        attrs.source_namespace = namespaceOfPrincipal(attrs.principal);
      }
      attrs.destination_namespace = dst_workload->namespace_;
      attrs.destination_labels = dst_workload->labels;
      attrs.destination_ip = next_hop.ip();
      attrs.destination_port = next_hop.port();
      Verdict v = evaluate(st.authorizationPolicies(), attrs);
      verdict = outcomeJson(v);
      verdict["dry_run"] = v.dry_run ? outcomeJson(*v.dry_run) : json();
      inbound["principal"] = attrs.principal.empty() ? json() : json(attrs.principal);
    }
    outcome = verdict["result"] == "allow" ? "allowed" : "denied";
  }
  out["inbound"] = inbound;
  out["verdict"] = verdict;
  out["outcome"] = outcome;
  return out;
}

}  // namespace weft::ztunnel
