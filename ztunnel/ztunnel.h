// The ztunnel process: the agent connection, local workloads, the proxy, the admin, metrics
// and readiness endpoints, and the drain on shutdown on the main loop; with --loops N > 1 the
// pods' connections are also served by N-1 worker loops (ztunnel/loops.h).
#pragma once

#include <uv.h>

#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>

#include "common/address.h"
#include "common/http_admin.h"
#include "common/uv_handle.h"
#include "ztunnel/access_log.h"
#include "ztunnel/agent_client.h"
#include "ztunnel/events.h"
#include "ztunnel/fast_path.h"
#include "ztunnel/identity.h"
#include "ztunnel/loops.h"
#include "ztunnel/memory_trim.h"
#include "ztunnel/mesh_tls.h"
#include "ztunnel/proxy.h"
#include "ztunnel/workloads.h"

namespace weft::ztunnel {

struct ZtunnelOptions {
  std::string agent_socket;
  std::optional<SocketAddress> admin_addr;      // unset = no admin server
  std::optional<SocketAddress> metrics_addr;
  std::optional<SocketAddress> readiness_addr;
  uint64_t drain_timeout_ms = 5000;
  uint64_t cert_wait_ms = 5000;  // how long a new connection waits for a first certificate
  AccessLogOptions access_log;   // sink "off" = none
  ListenerPorts ports;
  bool fast_path = true;  // same-node verdicts cached for the in-kernel fast path
  // Event loops serving connections: the main loop plus loops-1 worker threads, each with its
  // own SO_REUSEPORT listeners per pod (1 = everything on the main loop).
  unsigned loops = 1;
  // Freeing idle buffer pools and returning free heap to the kernel (ztunnel/memory_trim.h).
  MemoryTrimOptions memory_trim;
};

class Ztunnel : public AgentHandler {
 public:
  Ztunnel(uv_loop_t* loop, ZtunnelOptions options);
  ~Ztunnel() override;

  // Starts the worker loops (startLoops), the HTTP endpoints and the agent connection.
  Status start();
  // Starts the worker loops alone (tests that drive the agent handlers directly); idempotent.
  Status startLoops();
  unsigned loopCount() const { return 1 + static_cast<unsigned>(workers_.size()); }
  // Sets the test seam on every loop's Proxy (the hook then runs on their threads too).
  Status setDestinationHookForTest(Proxy::DestinationHook hook);
  // Every worker loop's snapshot (the main loop's own state is read directly).
  std::vector<LoopSnapshot> workerSnapshots();
  // Stops accepting (closes every listener, drops the agent connection), lets open connections
  // finish for up to the drain timeout, cuts the rest, then calls `done`.
  void drain(std::function<void()> done);
  // Closes every handle this object owns so the loop can end.
  void shutdown();

  bool ready() const { return ready_; }
  Proxy& proxy() { return proxy_; }
  LocalWorkloads& workloads() { return workloads_; }
  // Workload certificates for the TLS side; null after shutdown().
  IdentityManager* identities() { return identities_.get(); }
  // The HBONE side; null after shutdown().
  MeshTls* meshTls() { return mesh_tls_.get(); }
  FastPath& fastPath() { return *fast_path_; }
  // Null when access logging is off.
  AccessLog* accessLog() { return access_log_.get(); }

  // HTTP handlers (public for tests).
  HttpResponse handleAdmin(const HttpRequest& req);
  HttpResponse handleMetrics(const HttpRequest& req);
  HttpResponse handleReadiness(const HttpRequest& req);

  // AgentHandler
  void onAgentConnected() override;
  void onAgentDisconnected() override;
  Status onNodeConfig(const node::v1::NodeConfig& config) override;
  Status onClusterUpdate(const node::v1::ClusterUpdate& update) override;
  Status onAddWorkload(const node::v1::Workload& workload, UniqueFd netns) override;
  Status onDelWorkload(const std::string& uid) override;
  Status onSnapshotSent() override;
  Status onCertificateResponse(const node::v1::CertificateResponse& response) override;

 private:
  void refreshGauges();
  // The main loop's counters plus every worker loop's (gauges summed where they are per loop).
  ZtunnelStats mergedStats(const std::vector<LoopSnapshot>& workers);
  // A worker loop finished draining (or the main loop did).
  void loopDrained();
  nlohmann::json configDump();  // asks every worker loop for its snapshot
  // Weft's metric families beyond the counter list: BPF map fill, certificates, DNS
  // outcomes, build info.
  std::string renderWeftMetrics();
  // weft_ztunnel_memory_*: the trims, and the pooled buffers of every loop.
  std::string renderMemoryMetrics(const std::vector<LoopSnapshot>& workers);
  nlohmann::json memoryJson() const;  // the idle trim's settings and counters
  nlohmann::json accessLogJson() const;

  uv_loop_t* loop_;
  ZtunnelOptions options_;
  Proxy proxy_;
  LocalWorkloads workloads_;
  node::v1::NodeConfig node_config_;
  bool have_node_config_ = false;
  std::set<std::string> snapshot_uids_;  // AddWorkloads since this agent connection began
  bool ready_ = false;
  bool draining_ = false;
  std::function<void()> drain_done_;
  UvHandle<uv_timer_t> drain_timer_;
  // The /events stream (BPF ring consumer + verdicts), and the local pods by netns cookie for
  // naming BPF events: cookie -> (uid, "ns/name").
  std::unique_ptr<EventHub> events_;
  std::unique_ptr<FastPath> fast_path_;
  HttpAdminServerPtr admin_;
  HttpAdminServerPtr metrics_;
  HttpAdminServerPtr readiness_;
  std::unique_ptr<IdentityManager> identities_;  // before agent_: it sends through it
  std::unique_ptr<MeshTls> mesh_tls_;            // after identities_: it waits on them
  std::unique_ptr<AgentClient> agent_;  // last: destroyed first, while the rest still exists
  AccessLogPtr access_log_;  // proxy_ points at it; reset explicitly in the destructor
  uint64_t bpf_map_read_errors_ = 0;
  // Multi-loop: the main loop's mailbox (workers post access-log lines, verdicts and fast-path
  // candidates to it) and the workers; none with one loop.
  LoopMailboxPtr main_inbox_;
  std::vector<std::unique_ptr<LoopWorker>> workers_;
  size_t drain_pending_ = 0;
  // Every loop's idle trim reports here; the main loop's LoopMemory also trims the heap.
  std::shared_ptr<MemoryActivity> memory_activity_ = std::make_shared<MemoryActivity>();
  std::unique_ptr<LoopMemory> memory_;
};

}  // namespace weft::ztunnel
