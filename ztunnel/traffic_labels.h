// Istio's workload labels for TCP metrics and access logs, filled from the cluster state:
// canonical service and revision from the pod's labels, the SPIFFE principal, the cluster.
#pragma once

#include <string>

#include "ztunnel/cluster_state.h"
#include "ztunnel/stats.h"

namespace weft::ztunnel {

// Istio's canonical service: service.istio.io/canonical-name, app.kubernetes.io/name, app,
// else the workload's name.
std::string canonicalService(const WorkloadInfo& w);
// Istio's canonical revision: service.istio.io/canonical-revision, app.kubernetes.io/version,
// version, else "latest".
std::string canonicalRevision(const WorkloadInfo& w);
// spiffe://<td>/ns/<ns>/sa/<sa> (the default service account when none is set).
std::string workloadPrincipal(const WorkloadInfo& w, const std::string& trust_domain);

// source_* labels (not the principal: that is set only from an authenticated identity).
void setSourceLabels(TcpLabels& l, const WorkloadInfo& w);
// destination_* labels, the principal included (Istio names the workload's identity).
void setDestinationLabels(TcpLabels& l, const WorkloadInfo& w, const std::string& trust_domain);
// destination_service, _name, _namespace.
void setServiceLabels(TcpLabels& l, const ServiceInfo& s, const std::string& cluster_domain);

}  // namespace weft::ztunnel
