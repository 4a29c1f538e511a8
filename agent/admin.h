// The agent's admin API (JSON over HTTP on --admin-socket): status, workloads, services,
// current config errors, health.
#pragma once

#include <functional>

#include <nlohmann/json.hpp>
#include <string>

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
  // For weftctl: where the BPF objects are pinned, and what the kernel offers (/status).
  std::string bpf_pin_dir;
  std::function<nlohmann::json()> kernel_features;
};

// Routes one request. Pure over the sources: the HTTP server calls it, tests call it directly.
HttpResponse handleAdminRequest(const AdminSources& sources, const HttpRequest& request);

}  // namespace weft::agent
