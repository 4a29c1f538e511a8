// Building and indexing cluster snapshots from node-protocol messages.
#include "ztunnel/cluster_state.h"

namespace weft::ztunnel {

bool WorkloadInfo::hasIp(const IpAddr& ip) const {
  for (const IpAddr& a : ips)
    if (a == ip) return true;
  return false;
}

const IpAddr* WorkloadInfo::ipOfFamily(int family) const {
  for (const IpAddr& a : ips)
    if (a.family() == family) return &a;
  return nullptr;
}

const char* loadBalancingName(LoadBalancing lb) {
  return lb == LoadBalancing::kPeakEwma ? "peak-ewma" : "round-robin";
}

std::string ServiceInfo::hostname(const std::string& cluster_domain) const {
  return name + "." + namespace_ + ".svc." + (cluster_domain.empty() ? "cluster.local"
                                                                      : cluster_domain);
}

Result<WorkloadInfo> workloadFromProto(const node::v1::Workload& w) {
  std::string what = "workload " + w.namespace_() + "/" + w.name();
  if (w.uid().empty()) return Status::error(what + ": uid: empty");
  WorkloadInfo out;
  out.uid = w.uid();
  out.name = w.name();
  out.namespace_ = w.namespace_();
  out.service_account = w.service_account();
  out.node = w.node();
  out.enrolled = w.enrolled();
  out.strict_mtls = w.strict_mtls();
  for (const auto& [k, v] : w.labels()) out.labels[k] = v;
  for (const std::string& s : w.ips()) {
    auto ip = IpAddr::parse(s);
    if (!ip) return Status::errorf("{}: ips: '{}' is not an IP address", what, s);
    out.ips.push_back(*ip);
  }
  return out;
}

Result<ServiceInfo> serviceFromProto(const node::v1::Service& s) {
  std::string what = "service " + s.namespace_() + "/" + s.name();
  if (s.name().empty()) return Status::error(what + ": name: empty");
  ServiceInfo out;
  out.name = s.name();
  out.namespace_ = s.namespace_();
  for (const std::string& v : s.vips()) {
    auto ip = IpAddr::parse(v);
    if (!ip) return Status::errorf("{}: vips: '{}' is not an IP address", what, v);
    out.vips.push_back(*ip);
  }
  for (const auto& p : s.ports()) {
    if (p.port() == 0 || p.port() > 65535)
      return Status::errorf("{}: ports: port {} out of range", what, p.port());
    if (p.target_port() > 65535)
      return Status::errorf("{}: ports: targetPort {} out of range", what, p.target_port());
    ServicePortInfo sp;
    sp.port = static_cast<uint16_t>(p.port());
    sp.target_port = static_cast<uint16_t>(p.target_port());
    sp.tcp = p.protocol().empty() || p.protocol() == "TCP";
    sp.name = p.name();
    sp.target_port_name = p.target_port_name();
    out.ports.push_back(sp);
  }
  for (const auto& e : s.endpoints()) {
    auto ip = IpAddr::parse(e.ip());
    if (!ip) return Status::errorf("{}: endpoints: '{}' is not an IP address", what, e.ip());
    ServiceEndpointInfo info{e.workload_uid(), *ip, {}};
    for (const auto& [svc_port, target] : e.target_ports()) {
      if (svc_port == 0 || svc_port > 65535 || target == 0 || target > 65535)
        return Status::errorf("{}: endpoints: {}: target_ports {} -> {} out of range", what,
                              e.ip(), svc_port, target);
      info.target_ports[static_cast<uint16_t>(svc_port)] = static_cast<uint16_t>(target);
    }
    out.endpoints.push_back(std::move(info));
  }
  // A value from a newer agent that this ztunnel does not know falls back to the default.
  out.load_balancing = s.load_balancer() == node::v1::LOAD_BALANCER_PEAK_EWMA
                           ? LoadBalancing::kPeakEwma
                           : LoadBalancing::kRoundRobin;
  return out;
}

Result<ClusterStatePtr> ClusterState::apply(const ClusterState* base,
                                            const node::v1::ClusterUpdate& update) {
  auto next = std::make_shared<ClusterState>();
  if (base != nullptr && !update.full()) {
    next->workloads_ = base->workloads_;
    next->services_ = base->services_;
    next->policies_ = base->policies_;
  }
  for (const std::string& key : update.remove_authorization_policies()) next->policies_.erase(key);
  for (const auto& p : update.upsert_authorization_policies()) {
    auto policy = authorizationPolicyFromProto(p);
    if (!policy) return policy.status().context("cluster update");
    std::string key = policy->key();
    next->policies_[key] = std::make_shared<const AuthorizationPolicy>(std::move(*policy));
  }
  for (const std::string& uid : update.remove_workloads()) next->workloads_.erase(uid);
  for (const std::string& key : update.remove_services()) next->services_.erase(key);
  for (const auto& w : update.upsert_workloads()) {
    auto info = workloadFromProto(w);
    if (!info) return info.status().context("cluster update");
    std::string uid = info->uid;  // before the move below
    next->workloads_[uid] = std::make_shared<const WorkloadInfo>(std::move(*info));
  }
  for (const auto& s : update.upsert_services()) {
    auto info = serviceFromProto(s);
    if (!info) return info.status().context("cluster update");
    std::string key = info->key();
    next->services_[key] = std::make_shared<const ServiceInfo>(std::move(*info));
  }
  next->reindex();
  return ClusterStatePtr(std::move(next));
}

void ClusterState::addWorkload(WorkloadInfo w) {
  std::string uid = w.uid;
  workloads_[uid] = std::make_shared<const WorkloadInfo>(std::move(w));
  reindex();
}

void ClusterState::addService(ServiceInfo s) {
  std::string key = s.key();
  services_[key] = std::make_shared<const ServiceInfo>(std::move(s));
  reindex();
}

void ClusterState::addAuthorizationPolicy(AuthorizationPolicy p) {
  std::string key = p.key();
  policies_[key] = std::make_shared<const AuthorizationPolicy>(std::move(p));
  reindex();
}

void ClusterState::reindex() {
  policy_list_.clear();
  for (const auto& [key, p] : policies_) policy_list_.push_back(p);
  workload_by_ip_.clear();
  service_by_vip_.clear();
  for (const auto& [uid, w] : workloads_)
    for (const IpAddr& ip : w->ips) workload_by_ip_[ip] = w;
  for (const auto& [key, s] : services_)
    for (const IpAddr& vip : s->vips) service_by_vip_[vip] = s;
}

WorkloadInfoPtr ClusterState::workloadByUid(const std::string& uid) const {
  auto it = workloads_.find(uid);
  return it == workloads_.end() ? nullptr : it->second;
}

WorkloadInfoPtr ClusterState::workloadByIp(const IpAddr& ip) const {
  auto it = workload_by_ip_.find(ip);
  return it == workload_by_ip_.end() ? nullptr : it->second;
}

ServiceInfoPtr ClusterState::serviceByVip(const IpAddr& vip) const {
  auto it = service_by_vip_.find(vip);
  return it == service_by_vip_.end() ? nullptr : it->second;
}

}  // namespace weft::ztunnel
