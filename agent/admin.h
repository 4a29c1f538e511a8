// The agent's admin API (JSON over HTTP on --admin-socket): status, workloads, services,
// current config errors, health, and the log level (GET/POST /logging).
#pragma once

#include <functional>
#include <string>

#include "agent/bpf/dataplane.h"
#include "agent/bpf/kernel_features.h"
#include "agent/ca.h"
#include "agent/enrollment.h"
#include "agent/manifests.h"
#include "agent/node_server.h"
#include "common/http_admin.h"

namespace weft::agent {

struct AdminSources {
  std::string node_name;
  const EnrollmentController* enrollment = nullptr;
  const ManifestSource* manifests = nullptr;
  std::function<NodeServerStats()> node_stats;  // empty while the server is not up
  std::function<bool()> dataplane_adopted;
  std::function<uint64_t()> cni_requests;
  // For weftctl: where the BPF objects are pinned (/status).
  std::string bpf_pin_dir;
  const KernelFeatures* kernel_features = nullptr;  // probed at start; null = not probed
  std::function<CaStats()> ca_stats;                // empty while the CA is not up
  // Local-hop acceleration: the switch and its BPF counters (/status "local_hop").
  std::function<Result<LocalHopStatus>()> local_hop;
};

// Routes one request. Pure over the sources: the HTTP server calls it, tests call it directly.
HttpResponse handleAdminRequest(const AdminSources& sources, const HttpRequest& request);

}  // namespace weft::agent
