// Converts the agent's model into node-protocol messages and computes deltas between models.
#include "agent/cluster_sync.h"


#include <map>

namespace weft::agent {

namespace pb = weft::node::v1;

pb::Workload workloadProto(const ClusterModel& model, const Pod& pod) {
  pb::Workload w;
  w.set_uid(pod.meta.uid);
  w.set_name(pod.meta.name);
  w.set_namespace_(pod.meta.namespace_);
  w.set_service_account(pod.service_account);
  for (const IpAddr& ip : pod.ips) w.add_ips(ip.toString());
  w.set_node(pod.node_name);
  w.set_enrolled(meshEnrolledByLabels(model, pod));
  // Part of the workload, so a policy change reaches the ztunnel as an upsert in the delta.
  w.set_strict_mtls(effectiveMtls(model, pod.meta.namespace_).mode == MtlsMode::kStrict);
  for (const auto& [k, v] : pod.meta.labels) (*w.mutable_labels())[k] = v;
  return w;
}

pb::Service serviceProto(const ClusterModel& model, const Service& service) {
  pb::Service s;
  s.set_name(service.meta.name);
  s.set_namespace_(service.meta.namespace_);
  for (const IpAddr& ip : service.cluster_ips) s.add_vips(ip.toString());
  for (const ServicePort& p : service.ports) {
    pb::ServicePort* out = s.add_ports();
    out->set_port(p.port);
    out->set_target_port(p.target_port);
    out->set_protocol(p.protocol);
    out->set_name(p.name);
    out->set_target_port_name(p.target_port_name);
  }
  // A source that cannot refuse the object (the Kubernetes API) keeps the default for an
  // unknown value; the manifest source rejects it with the file and field.
  if (serviceLoadBalancer(service, nullptr) == LoadBalancer::kPeakEwma)
    s.set_load_balancer(pb::LOAD_BALANCER_PEAK_EWMA);
  for (const ResolvedEndpoint& r : resolveServiceEndpoints(model, service)) {
    pb::ServiceEndpoint* e = s.add_endpoints();
    e->set_workload_uid(r.workload_uid);
    e->set_ip(r.ip.toString());
    for (const auto& [sp, tp] : r.target_ports) (*e->mutable_target_ports())[sp] = tp;
  }
  return s;
}

pb::ClusterUpdate fullClusterUpdate(const ClusterModel& model) {
  pb::ClusterUpdate u;
  u.set_full(true);
  for (const auto& [key, pod] : model.pods) *u.add_upsert_workloads() = workloadProto(model, pod);
  for (const auto& [key, svc] : model.services) *u.add_upsert_services() = serviceProto(model, svc);
  for (const auto& [key, ap] : model.authorization_policies)
    *u.add_upsert_authorization_policies() = ap.spec;
  return u;
}

pb::ClusterUpdate clusterDelta(const ClusterModel& before, const ClusterModel& after) {
  pb::ClusterUpdate u;
  // Workloads are keyed by uid on the wire; a pod whose uid changed is a removal plus an add.
  std::map<std::string, pb::Workload> old_w, new_w;
  for (const auto& [k, p] : before.pods) old_w[p.meta.uid] = workloadProto(before, p);
  for (const auto& [k, p] : after.pods) new_w[p.meta.uid] = workloadProto(after, p);
  for (const auto& [uid, w] : new_w) {
    auto it = old_w.find(uid);
    if (it == old_w.end() || !sameMessage(it->second, w))
      *u.add_upsert_workloads() = w;
  }
  for (const auto& [uid, w] : old_w)
    if (new_w.count(uid) == 0) u.add_remove_workloads(uid);
  for (const auto& [key, svc] : after.services) {
    pb::Service now = serviceProto(after, svc);
    auto it = before.services.find(key);
    if (it == before.services.end() ||
        !sameMessage(serviceProto(before, it->second), now))
      *u.add_upsert_services() = std::move(now);
  }
  for (const auto& [key, svc] : before.services)
    if (after.services.count(key) == 0) u.add_remove_services(key);
  for (const auto& [key, ap] : after.authorization_policies) {
    auto it = before.authorization_policies.find(key);
    if (it == before.authorization_policies.end() ||
        !sameMessage(it->second.spec, ap.spec))
      *u.add_upsert_authorization_policies() = ap.spec;
  }
  for (const auto& [key, ap] : before.authorization_policies)
    if (after.authorization_policies.count(key) == 0) u.add_remove_authorization_policies(key);
  return u;
}

bool isEmptyUpdate(const pb::ClusterUpdate& u) {
  return u.upsert_workloads_size() == 0 && u.remove_workloads_size() == 0 &&
         u.upsert_services_size() == 0 && u.remove_services_size() == 0 &&
         u.upsert_authorization_policies_size() == 0 &&
         u.remove_authorization_policies_size() == 0;
}

}  // namespace weft::agent
