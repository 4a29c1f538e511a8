// Admin API handlers: the agent's view of the cluster and of its own enrollment, as JSON.
#include "agent/admin.h"

#include <nlohmann/json.hpp>

#include "agent/cluster_sync.h"
#include "common/log.h"
#include "weft/version.h"

namespace weft::agent {

namespace {

using nlohmann::json;

HttpResponse jsonResponse(const json& j, int status = 200) {
  HttpResponse r;
  r.status = status;
  r.body = j.dump(2) + "\n";
  return r;
}

json status(const AdminSources& s) {
  json j;
  j["node"] = s.node_name;
  j["version"] = WEFT_VERSION;
  NodeServerStats ns = s.node_stats ? s.node_stats() : NodeServerStats{};
  j["ztunnel"] = {{"connected", ns.connected},
                  {"snapshot_done", ns.snapshot_done},
                  {"version", ns.ztunnel_version},
                  {"connections", ns.connections},
                  {"protocol_errors", ns.protocol_errors},
                  {"ack_timeouts", ns.ack_timeouts},
                  {"rejected_workloads", ns.rejected_workloads},
                  {"messages_sent", ns.messages_sent}};
  j["dataplane_adopted"] = s.dataplane_adopted ? s.dataplane_adopted() : false;
  if (s.local_hop) {
    auto hop = s.local_hop();
    if (hop) {
      json counters = json::object();
      for (const auto& [name, value] : hop->counters) counters[name] = value;
      j["local_hop"] = {{"enabled", hop->on}, {"counters", counters}};
    } else {
      j["local_hop"] = {{"error", hop.status().message()}};
    }
  }
  const ClusterModel& m = s.enrollment->model();
  size_t local = 0;
  for (const auto& [k, p] : m.pods) local += p.node_name == s.node_name ? 1 : 0;
  j["counts"] = {{"namespaces", m.namespaces.size()},
                 {"pods", m.pods.size()},
                 {"local_pods", local},
                 {"services", m.services.size()},
                 {"peer_authentications", m.peer_authentications.size()},
                 {"authorization_policies", m.authorization_policies.size()},
                 {"pods_with_netns", s.enrollment->localPods().size()},
                 {"enrolled", s.enrollment->enrolledCount()},
                 {"cni_waiting", s.enrollment->waitingCniRequests()},
                 {"cni_requests", s.cni_requests ? s.cni_requests() : 0}};
  j["config_errors"] = s.manifests ? s.manifests->errors().size() : 0;
  j["config_rejections"] = s.manifests ? s.manifests->rejections() : 0;
  j["bpf_pin_dir"] = s.bpf_pin_dir;
  j["enrolled_pods"] = s.enrollment->enrolledCount();
  j["log_level"] = spdlog::level::to_string_view(spdlog::get_level()).data();
  if (s.kernel_features) {
    json features = json::array();
    for (const KernelFeature& f : s.kernel_features->features)
      features.push_back({{"name", f.name}, {"available", f.available},
                          {"used_for", f.used_for}, {"detail", f.detail}});
    j["kernel"] = {{"release", s.kernel_features->kernel_release},
                   {"features", features},
                   {"missing", s.kernel_features->missing()}};
  } else {
    j["kernel"] = nullptr;
  }
  // Certificate health as the agent (the CA) sees it: the CA in force and what it signed.
  // Workload certificates themselves live in the ztunnel (its /config_dump).
  if (s.ca_stats) {
    CaStats ca = s.ca_stats();
    std::string health = !ca.last_reload_error.empty() ? "ca_reload_failing"
                         : ns.certificate_errors > 0   ? "requests_refused"
                                                       : "ok";
    j["certificates"] = {{"health", health},
                         {"ca_source", ca.source},
                         {"ca_file_backed", ca.file_backed},
                         {"ca_subject", ca.ca_subject},
                         {"ca_not_after", ca.ca_not_after},
                         {"issued", ca.issued},
                         {"sign_errors", ca.sign_errors},
                         {"refused_identities", ca.refused_identities},
                         {"requests", ns.certificate_requests},
                         {"request_errors", ns.certificate_errors},
                         {"reloads", ca.reloads},
                         {"reload_errors", ca.reload_errors},
                         {"last_reload_error", ca.last_reload_error}};
  } else {
    j["certificates"] = nullptr;
  }
  return j;
}

json workloads(const AdminSources& s) {
  const ClusterModel& m = s.enrollment->model();
  std::map<std::string, LocalPodView> local;
  for (auto& v : s.enrollment->localPods()) local[v.key] = v;
  json out = json::array();
  for (const auto& [key, pod] : m.pods) {
    json w;
    w["uid"] = pod.meta.uid;
    w["namespace"] = pod.meta.namespace_;
    w["name"] = pod.meta.name;
    w["node"] = pod.node_name;
    w["service_account"] = pod.service_account;
    json ips = json::array();
    for (const IpAddr& ip : pod.ips) ips.push_back(ip.toString());
    w["ips"] = ips;
    w["mesh"] = meshEnrolledByLabels(m, pod);  // by labels, cluster-wide
    // The mode sent to the ztunnel as strict_mtls, and which policy decided it (null = the
    // PERMISSIVE default).
    EffectiveMtls mtls = effectiveMtls(m, pod.meta.namespace_);
    w["peer_authentication"] = mtlsModeName(mtls.mode);
    w["peer_authentication_policy"] =
        mtls.policy ? json(objectKey(mtls.policy->meta.namespace_, mtls.policy->meta.name))
                    : json(nullptr);
    auto it = local.find(key);
    bool enrolled = it != local.end() && it->second.enrolled;
    w["enrolled"] = pod.node_name == s.node_name ? enrolled : meshEnrolledByLabels(m, pod);
    if (it != local.end()) {
      w["netns"] = it->second.netns;
      w["netns_cookie"] = it->second.cookie;
      w["container_id"] = it->second.container_id;
      w["ztunnel_has"] = it->second.ztunnel_has;
      if (!it->second.error.empty()) w["error"] = it->second.error;
      local.erase(it);
    }
    out.push_back(std::move(w));
  }
  // Pods the runtime told us about that the cluster state does not (yet) know.
  for (const auto& [key, v] : local) {
    out.push_back({{"uid", v.uid}, {"namespace", key.substr(0, key.find('/'))},
                   {"name", key.substr(key.find('/') + 1)}, {"node", s.node_name},
                   {"ips", json::array()}, {"mesh", false}, {"enrolled", v.enrolled},
                   {"netns", v.netns}, {"netns_cookie", v.cookie},
                   {"container_id", v.container_id}, {"ztunnel_has", v.ztunnel_has},
                   {"error", v.error.empty() ? "not in the cluster state" : v.error}});
  }
  return out;
}

json services(const AdminSources& s) {
  const ClusterModel& m = s.enrollment->model();
  json out = json::array();
  for (const auto& [key, svc] : m.services) {
    json j;
    j["namespace"] = svc.meta.namespace_;
    j["name"] = svc.meta.name;
    j["uid"] = svc.meta.uid;
    json vips = json::array();
    for (const IpAddr& ip : svc.cluster_ips) vips.push_back(ip.toString());
    j["vips"] = vips;
    j["headless"] = svc.headless;
    j["selector"] = svc.selector;
    j["endpoints_from"] = m.endpoints_from_slices ? "endpointslices" : "selector";
    json ports = json::array();
    for (const ServicePort& p : svc.ports)
      ports.push_back({{"name", p.name}, {"port", p.port}, {"target_port", p.target_port},
                       {"target_port_name", p.target_port_name}, {"protocol", p.protocol}});
    j["ports"] = ports;
    json eps = json::array();
    for (const ResolvedEndpoint& r : resolveServiceEndpoints(m, svc)) {
      json tps = json::object();
      for (const auto& [sp, tp] : r.target_ports) tps[std::to_string(sp)] = tp;
      eps.push_back({{"workload_uid", r.workload_uid}, {"workload", r.workload},
                     {"ip", r.ip.toString()}, {"target_ports", tps}});
    }
    j["endpoints"] = eps;
    auto lb = serviceLoadBalancer(svc, nullptr);
    j["load_balancer"] = lb == LoadBalancer::kPeakEwma ? "peak-ewma" : "round-robin";
    out.push_back(std::move(j));
  }
  return out;
}

json peerAuthentications(const AdminSources& s) {
  const ClusterModel& m = s.enrollment->model();
  json out = json::array();
  for (const auto& [ns, pa] : m.peer_authentications) {
    out.push_back({{"namespace", pa.meta.namespace_},
                   {"name", pa.meta.name},
                   {"uid", pa.meta.uid},
                   {"mode", mtlsModeName(pa.mode)},
                   {"scope", pa.meta.namespace_ == kRootNamespace ? "mesh" : "namespace"}});
  }
  return out;
}

json authorizationPolicies(const AdminSources& s) {
  const ClusterModel& m = s.enrollment->model();
  json out = json::array();
  for (const auto& [key, ap] : m.authorization_policies) {
    const auto& spec = ap.spec;
    json selector = nullptr;
    if (spec.has_selector()) {
      selector = json::object();
      for (const auto& [k, v] : spec.match_labels()) selector[k] = v;
    }
    out.push_back({{"namespace", ap.meta.namespace_},
                   {"name", ap.meta.name},
                   {"uid", ap.meta.uid},
                   {"action", weft::node::v1::AuthorizationPolicy::Action_Name(spec.action())},
                   {"scope", spec.has_selector() ? "selector"
                             : ap.meta.namespace_ == kRootNamespace ? "mesh"
                                                                    : "namespace"},
                   {"selector", selector},
                   {"dry_run", spec.dry_run()},
                   {"rules", spec.rules_size()},
                   // Why it is enforced differently from what it says (L7-only fields).
                   {"status", {{"warnings", ap.warnings}}}});
  }
  return out;
}

}  // namespace

HttpResponse handleAdminRequest(const AdminSources& s, const HttpRequest& req) {
  // The one writable endpoint: the log level, changed at run time like the ztunnel's.
  if (req.path == "/logging") {
    std::string current = spdlog::level::to_string_view(spdlog::get_level()).data();
    if (req.method == "GET") return jsonResponse({{"level", current}});
    if (req.method != "POST" && req.method != "PUT")
      return jsonResponse({{"error", "GET /logging or POST /logging?level=L"}}, 405);
    std::string prefix = "level=";
    if (req.query.rfind(prefix, 0) != 0 || !setLogLevel(req.query.substr(prefix.size())))
      return jsonResponse({{"error", "want level=trace|debug|info|warn|error"}}, 400);
    spdlog::info("log level {} (was {})", req.query.substr(prefix.size()), current);
    return jsonResponse({{"level", req.query.substr(prefix.size())}});
  }
  if (req.method != "GET")
    return jsonResponse(
        {{"error", "method not allowed; the admin API is read-only but for POST /logging"}}, 405);
  if (req.path == "/healthz") return jsonResponse({{"ok", true}});
  if (req.path == "/status") return jsonResponse(status(s));
  if (req.path == "/workloads") return jsonResponse(workloads(s));
  if (req.path == "/services") return jsonResponse(services(s));
  if (req.path == "/peer-authentications") return jsonResponse(peerAuthentications(s));
  if (req.path == "/authorization-policies") return jsonResponse(authorizationPolicies(s));
  if (req.path == "/config-errors") {
    json errs = json::array();
    if (s.manifests)
      for (const auto& e : s.manifests->errors()) errs.push_back(e);
    return jsonResponse({{"errors", errs},
                         {"rejections", s.manifests ? s.manifests->rejections() : 0}});
  }
  return jsonResponse({{"error", "not found"},
                       {"paths", {"/status", "/workloads", "/services", "/peer-authentications",
                                  "/authorization-policies", "/config-errors", "/healthz",
                                  "/logging"}}},
                      404);
}

}  // namespace weft::agent
