// The ztunnel's read-only view of the cluster: workloads and services, indexed by IP, built from
// the agent's ClusterUpdate messages. A snapshot never changes once built; updates make a new one.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/address.h"
#include "common/status.h"
#include "weft/node/v1/node.pb.h"
#include "ztunnel/policy.h"

namespace weft::ztunnel {

struct WorkloadInfo {
  std::string uid;
  std::string name;
  std::string namespace_;
  std::string service_account;
  std::vector<IpAddr> ips;
  std::string node;
  bool enrolled = false;
  // PeerAuthentication STRICT: plaintext inbound to this workload is refused. Live value: the
  // current ClusterState's copy (ClusterUpdate upserts follow policy changes).
  bool strict_mtls = false;
  std::map<std::string, std::string> labels;  // for AuthorizationPolicy selectors

  bool hasIp(const IpAddr& ip) const;
  // The first IP of `family` (AF_INET / AF_INET6), if any.
  const IpAddr* ipOfFamily(int family) const;
};
using WorkloadInfoPtr = std::shared_ptr<const WorkloadInfo>;

struct ServicePortInfo {
  uint16_t port = 0;
  uint16_t target_port = 0;  // 0 = same as port (or per endpoint when target_port_name is set)
  bool tcp = true;
  std::string name;
  std::string target_port_name;  // a named targetPort: resolved per endpoint (target_ports)
};

struct ServiceEndpointInfo {
  std::string workload_uid;
  IpAddr ip;
  // Service port -> this endpoint's port (named targetPorts, EndpointSlice ports).
  std::map<uint16_t, uint16_t> target_ports;
};

// A service's endpoint choice (ARCHITECTURE "Load balancing").
enum class LoadBalancing { kRoundRobin, kPeakEwma };
const char* loadBalancingName(LoadBalancing lb);  // "round-robin" | "peak-ewma"

struct ServiceInfo {
  std::string name;
  std::string namespace_;
  std::vector<IpAddr> vips;
  std::vector<ServicePortInfo> ports;
  std::vector<ServiceEndpointInfo> endpoints;
  LoadBalancing load_balancing = LoadBalancing::kRoundRobin;

  std::string key() const { return namespace_ + "/" + name; }
  // "name.namespace.svc.<cluster domain>", Istio's destination_service label.
  std::string hostname(const std::string& cluster_domain) const;
};
using ServiceInfoPtr = std::shared_ptr<const ServiceInfo>;

// Converts protocol messages, validating every field; errors name the object and field.
Result<WorkloadInfo> workloadFromProto(const node::v1::Workload& w);
Result<ServiceInfo> serviceFromProto(const node::v1::Service& s);

class ClusterState {
 public:
  // Returns a new state: `update` applied on top of `base` (or replacing it when full). Fails
  // as a whole (nothing applied) if any object is invalid.
  static Result<std::shared_ptr<const ClusterState>> apply(const ClusterState* base,
                                                           const node::v1::ClusterUpdate& update);

  WorkloadInfoPtr workloadByUid(const std::string& uid) const;
  WorkloadInfoPtr workloadByIp(const IpAddr& ip) const;
  ServiceInfoPtr serviceByVip(const IpAddr& vip) const;
  const std::map<std::string, WorkloadInfoPtr>& workloads() const { return workloads_; }
  const std::map<std::string, ServiceInfoPtr>& services() const { return services_; }
  // Every AuthorizationPolicy, in namespace/name order (evaluate() checks their scope).
  const std::vector<AuthorizationPolicyPtr>& authorizationPolicies() const {
    return policy_list_;
  }

  // For tests and the agent-less path: add objects directly, then index.
  void addWorkload(WorkloadInfo w);
  void addService(ServiceInfo s);
  void addAuthorizationPolicy(AuthorizationPolicy p);

 private:
  void reindex();

  std::map<std::string, WorkloadInfoPtr> workloads_;  // by uid
  std::map<std::string, ServiceInfoPtr> services_;    // by namespace/name
  std::map<IpAddr, WorkloadInfoPtr> workload_by_ip_;
  std::map<IpAddr, ServiceInfoPtr> service_by_vip_;
  std::map<std::string, AuthorizationPolicyPtr> policies_;  // by namespace/name
  std::vector<AuthorizationPolicyPtr> policy_list_;         // the same, in key order
};
using ClusterStatePtr = std::shared_ptr<const ClusterState>;

}  // namespace weft::ztunnel
