// The Kubernetes API cluster source: list+watch of Namespaces, Services, Pods (this node's
// with fieldSelector spec.nodeName=<node>; other nodes' with spec.nodeName!=<node>),
// EndpointSlices, PeerAuthentications and AuthorizationPolicies, one reflector thread per
// watch, filling the same ClusterModel as the manifest source.
//
// Threads: each reflector blocks only in its own thread (connect, TLS, reads; every wait also
// watches a stop pipe). It keeps its objects under the source's mutex and pokes the agent's loop
// with uv_async_send; on the loop, the source builds a complete ClusterModel from all stores and
// calls on_change if it differs from the last one. The loop never blocks on the API server.
#pragma once

#include <uv.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "agent/kube/kube_config.h"
#include "agent/kube/kube_objects.h"
#include "agent/model.h"
#include "common/fd.h"
#include "common/status.h"
#include "common/uv_handle.h"

namespace weft::agent::kube {

struct KubeSourceOptions {
  KubeConfig config;
  std::string node_name;
  // Other nodes' pods: the ztunnel needs every mesh workload of the cluster (its node, identity
  // and addresses) to reach it over HBONE. Off = this node's pods only.
  bool remote_pods = true;
  uint32_t list_page_size = 500;             // ?limit= of each list request
  size_t max_event_bytes = 4 * 1024 * 1024;  // one watch line (one object, with its envelope)
  size_t max_list_page_bytes = 64 * 1024 * 1024;
  std::chrono::milliseconds connect_timeout{10000};
  std::chrono::milliseconds list_timeout{60000};
  uint32_t watch_timeout_s = 300;  // ?timeoutSeconds=; the server ends the watch
  std::chrono::milliseconds backoff_initial{250};
  std::chrono::milliseconds backoff_max{30000};
};

// Counters and state of one watched resource (admin API, logs, tests).
struct KubeResourceStats {
  std::string name;  // "namespaces", "services", "pods (node X)", "pods (other nodes)",
                     // "endpointslices", "peerauthentications", "authorizationpolicies"
  bool synced = false;  // a full list has been applied at least once
  std::string resource_version;
  uint64_t lists = 0;    // completed lists (each re-list included)
  uint64_t watches = 0;  // watch requests answered 200
  uint64_t events = 0;   // ADDED/MODIFIED/DELETED applied
  uint64_t bookmarks = 0;
  uint64_t gone = 0;       // 410 Gone (HTTP or ERROR event): re-listed
  uint64_t malformed = 0;  // events or list items skipped
  uint64_t errors = 0;     // failed requests / broken streams (then backoff)
  uint64_t objects = 0;    // in the store now (in the model)
  bool missing = false;    // the last list answered 404 (a CRD not installed)
  std::string last_error;
};

class KubeSource;
using KubeSourcePtr = std::unique_ptr<KubeSource>;

class KubeSource {
 public:
  // Creates the loop handle and stop pipe; no thread runs before start().
  static Result<KubeSourcePtr> create(uv_loop_t* loop, KubeSourceOptions options);
  ~KubeSource();  // stops and joins the threads
  KubeSource(const KubeSource&) = delete;
  KubeSource& operator=(const KubeSource&) = delete;

  // Called on the loop after the model changed.
  void setOnChange(std::function<void()> on_change) { on_change_ = std::move(on_change); }
  void start();
  void stop();
  // Blocks the calling thread until every resource has been listed once, or the timeout;
  // then refreshes model(). Meant for startup, before the loop runs (enrollment must not start
  // from an empty model: it would unenroll every pod a previous agent enrolled).
  bool waitForSync(std::chrono::milliseconds timeout);
  bool synced() const;

  // The latest complete model (loop thread).
  const ClusterModel& model() const { return model_; }
  std::vector<KubeResourceStats> stats() const;
  // Rebuilds model() from the stores now; true if it changed (loop thread).
  bool refresh();

 private:
  struct Resource;
  KubeSource(uv_loop_t* loop, KubeSourceOptions options);
  void run(Resource& r);
  // One list (all pages) into the store; false on failure (logged, counted).
  bool list(Resource& r, const std::string& token);
  // One watch until it ends; sets r.need_list on 410.
  bool watch(Resource& r, const std::string& token);
  // Applies one watch event's object; false if malformed.
  bool applyEvent(Resource& r, WatchEventType type, const nlohmann::json& object);
  void sleepBackoff(Resource& r, std::chrono::milliseconds& backoff);
  void fail(Resource& r, const std::string& what);
  void notifyLoop();
  std::string target(const Resource& r, bool watch, const std::string& rv,
                     const std::string& cont) const;

  uv_loop_t* loop_;
  KubeSourceOptions options_;
  std::function<void()> on_change_;
  UvHandle<uv_async_t> async_;
  UniqueFd stop_read_, stop_write_;
  std::atomic<bool> stopping_{false};
  std::vector<std::unique_ptr<Resource>> resources_;
  std::vector<std::thread> threads_;
  mutable std::mutex mu_;  // the stores and stats of all resources
  std::condition_variable synced_cv_;
  ClusterModel model_;
  std::set<std::string> reported_conflicts_;  // loop thread: PeerAuthentication duplicates
};

}  // namespace weft::agent::kube
