// Istio's workload labels from the cluster state.
#include "ztunnel/traffic_labels.h"

namespace weft::ztunnel {

namespace {

std::string firstLabel(const WorkloadInfo& w, std::initializer_list<const char*> keys) {
  for (const char* k : keys) {
    auto it = w.labels.find(k);
    if (it != w.labels.end() && !it->second.empty()) return it->second;
  }
  return "";
}

}  // namespace

std::string canonicalService(const WorkloadInfo& w) {
  std::string s =
      firstLabel(w, {"service.istio.io/canonical-name", "app.kubernetes.io/name", "app"});
  return s.empty() ? w.name : s;
}

std::string canonicalRevision(const WorkloadInfo& w) {
  std::string s = firstLabel(
      w, {"service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"});
  return s.empty() ? "latest" : s;
}

std::string workloadPrincipal(const WorkloadInfo& w, const std::string& trust_domain) {
  return "spiffe://" + trust_domain + "/ns/" + w.namespace_ + "/sa/" +
         (w.service_account.empty() ? "default" : w.service_account);
}

void setSourceLabels(TcpLabels& l, const WorkloadInfo& w) {
  l.source_workload = w.name;
  l.source_workload_namespace = w.namespace_;
  l.source_canonical_service = canonicalService(w);
  l.source_canonical_revision = canonicalRevision(w);
  l.source_app = l.source_canonical_service;
  l.source_version = l.source_canonical_revision;
  l.source_cluster = kDefaultClusterName;
}

void setDestinationLabels(TcpLabels& l, const WorkloadInfo& w, const std::string& trust_domain) {
  l.destination_workload = w.name;
  l.destination_workload_namespace = w.namespace_;
  l.destination_canonical_service = canonicalService(w);
  l.destination_canonical_revision = canonicalRevision(w);
  l.destination_app = l.destination_canonical_service;
  l.destination_version = l.destination_canonical_revision;
  l.destination_cluster = kDefaultClusterName;
  l.destination_principal = workloadPrincipal(w, trust_domain);
}

void setServiceLabels(TcpLabels& l, const ServiceInfo& s, const std::string& cluster_domain) {
  l.destination_service = s.hostname(cluster_domain);
  l.destination_service_name = s.name;
  l.destination_service_namespace = s.namespace_;
}

}  // namespace weft::ztunnel
