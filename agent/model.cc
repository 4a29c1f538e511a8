// Pure helpers over the cluster model: label selection, mesh membership, peer authentication,
// stable ids.
#include "agent/model.h"

#include <fmt/format.h>
#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>

namespace weft::agent {

namespace {

uint64_t fnv1a(const std::string& s, uint64_t seed) {
  uint64_t h = seed;
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  return h;
}

constexpr uint64_t kFnvOffset = 0xcbf29ce484222325ULL;

}  // namespace

bool AuthorizationPolicy::operator==(const AuthorizationPolicy& o) const {
  return meta == o.meta && warnings == o.warnings &&
         sameMessage(spec, o.spec);
}

std::string objectKey(const std::string& ns, const std::string& name) { return ns + "/" + name; }

namespace {
std::string deterministicBytes(const google::protobuf::MessageLite& m) {
  std::string out;
  {
    google::protobuf::io::StringOutputStream raw(&out);
    google::protobuf::io::CodedOutputStream coded(&raw);
    coded.SetSerializationDeterministic(true);
    m.SerializeWithCachedSizes(&coded);
  }
  return out;
}
}  // namespace

bool sameMessage(const google::protobuf::MessageLite& a,
                 const google::protobuf::MessageLite& b) {
  if (a.GetTypeName() != b.GetTypeName()) return false;
  // ByteSizeLong() fills the cached sizes SerializeWithCachedSizes relies on.
  if (a.ByteSizeLong() != b.ByteSizeLong()) return false;
  return deterministicBytes(a) == deterministicBytes(b);
}

const Pod* ClusterModel::findPod(const std::string& ns, const std::string& name) const {
  auto it = pods.find(objectKey(ns, name));
  return it == pods.end() ? nullptr : &it->second;
}

const Namespace* ClusterModel::findNamespace(const std::string& name) const {
  auto it = namespaces.find(name);
  return it == namespaces.end() ? nullptr : &it->second;
}

bool meshEnrolledByLabels(const ClusterModel& model, const Pod& pod) {
  const Namespace* ns = model.findNamespace(pod.meta.namespace_);
  if (ns == nullptr) return false;
  auto mode = ns->meta.labels.find(kDataplaneModeLabel);
  if (mode == ns->meta.labels.end() || mode->second != kDataplaneModeAmbient) return false;
  auto opt_out = pod.meta.labels.find(kDataplaneModeLabel);
  return !(opt_out != pod.meta.labels.end() && opt_out->second == kDataplaneModeNone);
}

const char* mtlsModeName(MtlsMode mode) {
  switch (mode) {
    case MtlsMode::kUnset: return "UNSET";
    case MtlsMode::kPermissive: return "PERMISSIVE";
    case MtlsMode::kStrict: return "STRICT";
  }
  return "UNSET";
}

EffectiveMtls effectiveMtls(const ClusterModel& model, const std::string& pod_namespace) {
  // The namespace's own policy first (for a pod in the root namespace that is the mesh-wide
  // policy itself), then the mesh-wide one.
  for (const std::string& ns : {pod_namespace, std::string(kRootNamespace)}) {
    auto it = model.peer_authentications.find(ns);
    if (it != model.peer_authentications.end() && it->second.mode != MtlsMode::kUnset)
      return EffectiveMtls{it->second.mode, &it->second};
  }
  return EffectiveMtls{};
}

bool selectorMatches(const Labels& selector, const Labels& labels) {
  if (selector.empty()) return false;
  for (const auto& [k, v] : selector) {
    auto it = labels.find(k);
    if (it == labels.end() || it->second != v) return false;
  }
  return true;
}

std::optional<LoadBalancer> serviceLoadBalancer(const Service& service, std::string* error) {
  auto it = service.meta.annotations.find(kLoadBalancerAnnotation);
  if (it == service.meta.annotations.end() || it->second == "round-robin")
    return LoadBalancer::kRoundRobin;
  if (it->second == "peak-ewma") return LoadBalancer::kPeakEwma;
  if (error != nullptr) *error = "\"" + it->second + "\" is not round-robin or peak-ewma";
  return std::nullopt;
}

std::vector<const Pod*> serviceEndpoints(const ClusterModel& model, const Service& service) {
  std::vector<const Pod*> out;
  if (service.selector.empty()) return out;
  // Pods are keyed "ns/name", so the service's namespace is one contiguous range.
  const std::string prefix = service.meta.namespace_ + "/";
  for (auto it = model.pods.lower_bound(prefix);
       it != model.pods.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it) {
    if (selectorMatches(service.selector, it->second.meta.labels)) out.push_back(&it->second);
  }
  return out;
}

namespace {

// The Kubernetes FindPort rule: a container port with the service port's target name and
// protocol.
std::optional<uint16_t> namedPort(const Pod& pod, const ServicePort& sp) {
  auto it = pod.named_ports.find(sp.target_port_name);
  if (it == pod.named_ports.end() || it->second.protocol != sp.protocol) return std::nullopt;
  return it->second.port;
}

std::vector<ResolvedEndpoint> selectorEndpoints(const ClusterModel& model,
                                                const Service& service) {
  std::vector<ResolvedEndpoint> out;
  for (const Pod* pod : serviceEndpoints(model, service)) {
    std::map<uint16_t, uint16_t> ports;
    bool any_port = service.ports.empty();
    for (const ServicePort& sp : service.ports) {
      if (sp.target_port_name.empty()) {
        any_port = true;
        continue;
      }
      if (auto p = namedPort(*pod, sp)) {
        ports[sp.port] = *p;
        any_port = true;
      }
    }
    if (!any_port) continue;  // an endpoint of none of the service's ports
    for (const IpAddr& ip : pod->ips)
      out.push_back(ResolvedEndpoint{pod->meta.uid,
                                     objectKey(pod->meta.namespace_, pod->meta.name), ip, ports});
  }
  return out;
}

std::vector<ResolvedEndpoint> sliceEndpoints(const ClusterModel& model, const Service& service) {
  std::vector<ResolvedEndpoint> out;
  const std::string prefix = service.meta.namespace_ + "/";
  for (auto it = model.endpoint_slices.lower_bound(prefix);
       it != model.endpoint_slices.end() && it->first.compare(0, prefix.size(), prefix) == 0;
       ++it) {
    const EndpointSlice& slice = it->second;
    if (slice.service_name != service.meta.name) continue;
    if (slice.address_type != "IPv4" && slice.address_type != "IPv6") continue;
    // Service port -> the slice's port of the same name (and protocol).
    std::map<uint16_t, uint16_t> ports;
    for (const ServicePort& sp : service.ports)
      for (const EndpointSlicePort& ep : slice.ports)
        if (ep.name == sp.name && ep.protocol == sp.protocol && ep.port != 0)
          ports[sp.port] = ep.port;
    if (ports.empty() && !service.ports.empty()) continue;  // serves none of its ports
    for (const EndpointSliceEndpoint& e : slice.endpoints) {
      if (!e.ready) continue;
      std::string uid, workload;
      if (!e.target_pod.empty()) {
        auto pod = model.pods.find(e.target_pod);
        if (pod != model.pods.end() &&
            (e.target_uid.empty() || e.target_uid == pod->second.meta.uid)) {
          uid = pod->second.meta.uid;
          workload = e.target_pod;
        }
      }
      for (const IpAddr& ip : e.addresses) {
        bool dup = false;
        for (const ResolvedEndpoint& r : out) dup = dup || r.ip == ip;
        if (!dup) out.push_back(ResolvedEndpoint{uid, workload, ip, ports});
      }
    }
  }
  return out;
}

}  // namespace

std::vector<ResolvedEndpoint> resolveServiceEndpoints(const ClusterModel& model,
                                                      const Service& service) {
  return model.endpoints_from_slices ? sliceEndpoints(model, service)
                                     : selectorEndpoints(model, service);
}

std::string deriveUid(const std::string& kind, const std::string& ns, const std::string& name) {
  const std::string text = kind + "/" + ns + "/" + name;
  uint64_t a = fnv1a(text, kFnvOffset);
  uint64_t b = fnv1a(text, a ^ 0x9e3779b97f4a7c15ULL);
  // UUID layout, version nibble 5 (name-based) and RFC 4122 variant, so it looks like one.
  return fmt::format("{:08x}-{:04x}-5{:03x}-{:04x}-{:012x}", static_cast<uint32_t>(a >> 32),
                     static_cast<uint32_t>((a >> 16) & 0xffff), static_cast<uint32_t>(a & 0xfff),
                     static_cast<uint32_t>(0x8000 | ((b >> 48) & 0x3fff)),
                     b & 0xffffffffffffULL);
}

uint64_t workloadId(const std::string& uid) {
  uint64_t id = fnv1a(uid, kFnvOffset);
  return id == 0 ? 1 : id;  // 0 reads as "unknown" in events
}

}  // namespace weft::agent
