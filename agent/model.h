// The agent's cluster model: Namespaces, Pods, Services and PeerAuthentications as plain values,
// filled by a cluster source (local manifests today, the Kubernetes API later), read by
// enrollment and the ztunnel.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "common/address.h"
#include "weft/node/v1/node.pb.h"

namespace weft::agent {

using Labels = std::map<std::string, std::string>;

// Labels that opt a namespace in, or a pod out (DESIGN §6).
constexpr const char* kDataplaneModeLabel = "weft.dev/dataplane-mode";
constexpr const char* kDataplaneModeAmbient = "ambient";
constexpr const char* kDataplaneModeNone = "none";

struct ObjectMeta {
  std::string name;
  std::string namespace_;  // empty for cluster-scoped kinds (Namespace)
  std::string uid;         // given, or derived stably from kind/namespace/name
  Labels labels;
  Labels annotations;
  bool operator==(const ObjectMeta&) const = default;
};

struct Namespace {
  ObjectMeta meta;
  bool operator==(const Namespace&) const = default;
};

// A named port of one of the pod's containers (spec.containers[].ports[]), what a Service's
// named targetPort resolves to.
struct ContainerPort {
  uint16_t port = 0;
  std::string protocol = "TCP";
  bool operator==(const ContainerPort&) const = default;
};

struct Pod {
  ObjectMeta meta;
  std::string node_name;
  std::string service_account = "default";
  // status.podIPs: at least one from the manifests; the Kubernetes source also keeps this
  // node's pods that have none yet (the API server learns them only after CNI ADD returned;
  // enrollment then takes them from the CNI request's prevResult).
  std::vector<IpAddr> ips;
  std::map<std::string, ContainerPort> named_ports;  // by port name (the first one wins)
  bool operator==(const Pod&) const = default;
};

struct ServicePort {
  std::string name;
  uint16_t port = 0;
  uint16_t target_port = 0;      // 0 when target_port_name is set
  std::string target_port_name;  // a named targetPort ("http"): resolved per endpoint
  std::string protocol = "TCP";  // TCP or UDP
  bool operator==(const ServicePort&) const = default;
};

struct Service {
  ObjectMeta meta;
  Labels selector;             // empty = no endpoints are selected
  std::vector<ServicePort> ports;
  std::vector<IpAddr> cluster_ips;  // empty for headless ("None") or unallocated
  bool headless = false;
  bool operator==(const Service&) const = default;
};

// EndpointSlice (discovery.k8s.io/v1), from the Kubernetes source: the endpoints of the
// Service named by its label kubernetes.io/service-name.
constexpr const char* kServiceNameLabel = "kubernetes.io/service-name";

struct EndpointSliceEndpoint {
  std::vector<IpAddr> addresses;
  bool ready = true;             // conditions.ready; absent = ready
  std::string target_pod;        // targetRef of kind Pod: "namespace/name", else empty
  std::string target_uid;
  bool operator==(const EndpointSliceEndpoint&) const = default;
};

struct EndpointSlicePort {
  std::string name;  // matches the Service port's name
  uint16_t port = 0;
  std::string protocol = "TCP";
  bool operator==(const EndpointSlicePort&) const = default;
};

struct EndpointSlice {
  ObjectMeta meta;
  std::string service_name;  // label kubernetes.io/service-name
  std::string address_type;  // IPv4, IPv6 or FQDN (FQDN slices carry no usable address)
  std::vector<EndpointSliceEndpoint> endpoints;
  std::vector<EndpointSlicePort> ports;
  bool operator==(const EndpointSlice&) const = default;
};

// Service annotation choosing how the ztunnel balances the service's endpoints:
// "round-robin" (the default when absent) or "peak-ewma" (power of two choices over peak-EWMA
// connect latency × open connections). ARCHITECTURE.md "Load balancing".
constexpr const char* kLoadBalancerAnnotation = "weft.dev/load-balancer";
enum class LoadBalancer { kRoundRobin, kPeakEwma };
// The service's algorithm from its annotation; nullopt and `*error` (if given) when the value
// is not one of the names above.
std::optional<LoadBalancer> serviceLoadBalancer(const Service& service, std::string* error);

// PeerAuthentication (security.weft.dev/v1), Istio's shape without selectors: one per
// namespace, namespace-wide; mesh-wide when in the root namespace.
constexpr const char* kRootNamespace = "weft-system";

enum class MtlsMode { kUnset, kPermissive, kStrict };  // kUnset = inherit

struct PeerAuthentication {
  ObjectMeta meta;
  MtlsMode mode = MtlsMode::kUnset;
  bool operator==(const PeerAuthentication&) const = default;
};

// AuthorizationPolicy (security.weft.dev/v1, Istio's shape; agent/authorization_policy.h):
// validated into the message the ztunnel evaluates. Many per namespace; scope = its namespace
// (mesh-wide in the root namespace), narrowed by spec.selector.matchLabels.
struct AuthorizationPolicy {
  ObjectMeta meta;
  weft::node::v1::AuthorizationPolicy spec;
  // Why the policy is enforced differently from what it says (L7-only fields, no waypoint).
  std::vector<std::string> warnings;
  bool operator==(const AuthorizationPolicy& o) const;
};

// "UNSET", "PERMISSIVE", "STRICT" (the manifest spelling).
const char* mtlsModeName(MtlsMode mode);

// "namespace/name": the key of namespaced objects.
std::string objectKey(const std::string& ns, const std::string& name);

// Whether two messages of the same type hold the same fields: their deterministic encodings
// (map entries in key order) are equal. The node protocol is built on the protobuf lite
// runtime, which has no reflection (no MessageDifferencer).
bool sameMessage(const google::protobuf::MessageLite& a,
                 const google::protobuf::MessageLite& b);

struct ClusterModel {
  std::map<std::string, Namespace> namespaces;  // by name
  std::map<std::string, Pod> pods;              // by namespace/name
  std::map<std::string, Service> services;      // by namespace/name
  // At most one per namespace (the manifests reject a second), so keyed by namespace.
  std::map<std::string, PeerAuthentication> peer_authentications;
  std::map<std::string, AuthorizationPolicy> authorization_policies;  // by namespace/name
  std::map<std::string, EndpointSlice> endpoint_slices;               // by namespace/name
  // Where services' endpoints come from: false = their selector over the model's pods (the
  // manifest source), true = their EndpointSlices (the Kubernetes source).
  bool endpoints_from_slices = false;

  const Pod* findPod(const std::string& ns, const std::string& name) const;
  const Namespace* findNamespace(const std::string& name) const;
  bool operator==(const ClusterModel&) const = default;
};

// True if the pod is part of the mesh by labels alone: its namespace says ambient and the pod
// does not opt out. Says nothing about whether this node has enrolled it.
bool meshEnrolledByLabels(const ClusterModel& model, const Pod& pod);

// The mTLS mode in force for a pod and the policy that decided it: its namespace's
// PeerAuthentication unless that is absent or UNSET, then the root namespace's, then PERMISSIVE
// (policy nullptr). Never kUnset.
struct EffectiveMtls {
  MtlsMode mode = MtlsMode::kPermissive;
  const PeerAuthentication* policy = nullptr;
};
EffectiveMtls effectiveMtls(const ClusterModel& model, const std::string& pod_namespace);

// True if every key/value of `selector` is in `labels` (Kubernetes matchLabels); an empty
// selector selects nothing, as for a Service.
bool selectorMatches(const Labels& selector, const Labels& labels);

// Pods of the service's namespace selected by its selector, in key order.
std::vector<const Pod*> serviceEndpoints(const ClusterModel& model, const Service& service);

// One endpoint address of a service as the ztunnel gets it.
struct ResolvedEndpoint {
  std::string workload_uid;  // empty when no pod of the model is known for it
  std::string workload;      // "namespace/name", empty if unknown
  IpAddr ip;
  // Service port -> this endpoint's port, for ports whose number is per endpoint (named
  // targetPorts; every port of an EndpointSlice-backed service).
  std::map<uint16_t, uint16_t> target_ports;
  bool operator==(const ResolvedEndpoint&) const = default;
};

// The service's endpoints: from its EndpointSlices when model.endpoints_from_slices (ready
// addresses of every slice labelled with its name, ports by name), else from its selector
// (each selected pod's IPs; a named targetPort from the pod's container ports, and a pod
// without that port is not an endpoint of that service port).
std::vector<ResolvedEndpoint> resolveServiceEndpoints(const ClusterModel& model,
                                                      const Service& service);

// A stable uid for an object that has none: a UUID-shaped hash of kind/namespace/name.
std::string deriveUid(const std::string& kind, const std::string& ns, const std::string& name);

// A stable 64-bit id for a workload uid (the weft_enrolled map's workload_id).
uint64_t workloadId(const std::string& uid);

}  // namespace weft::agent
