// The proxy of one event loop: the cluster snapshot it reads, its load balancer (round-robin
// cursors, endpoint latencies and ejections), counters, TCP metrics and live connections. A multi-loop ztunnel has one per loop (ztunnel/loops.h).
#pragma once

#include <uv.h>

#include <functional>
#include <memory>
#include <string>
#include <unordered_set>

#include <nlohmann/json.hpp>

#include "common/fd.h"
#include "ztunnel/access_log.h"
#include "ztunnel/balancer.h"
#include "ztunnel/cluster_state.h"
#include "ztunnel/relay.h"
#include "ztunnel/route.h"
#include "ztunnel/stats.h"
#include "ztunnel/verdicts.h"

namespace weft::ztunnel {

class FastPath;
class MeshTls;
class ProxyConnection;

// A local (enrolled, on this node) pod as its listeners and connections see it. Immutable.
struct LocalPod {
  WorkloadInfoPtr info;
  UniqueFd netns;  // the pod's network namespace
};
using LocalPodPtr = std::shared_ptr<const LocalPod>;

class Proxy {
 public:
  explicit Proxy(uv_loop_t* loop, RelayOptions relay_options = {},
                 BalancerOptions balancer_options = {});
  ~Proxy();

  uv_loop_t* loop() const { return loop_; }
  const ClusterStatePtr& state() const { return state_; }
  void setState(ClusterStatePtr s) { state_ = std::move(s); }
  const std::string& clusterDomain() const { return cluster_domain_; }
  void setClusterDomain(std::string d) { cluster_domain_ = std::move(d); }
  const std::string& trustDomain() const { return trust_domain_; }
  void setTrustDomain(std::string d) { trust_domain_ = std::move(d); }
  // Where connections log when they end (null: no access log).
  AccessLog* accessLog() const { return access_log_; }
  void setAccessLog(AccessLog* log) { access_log_ = log; }
  // Connection ids are unique over all loops: loop i of n hands out i+1, i+1+n, i+1+2n, ...
  // (with one loop: 1, 2, 3, ...).
  uint64_t nextConnectionId() { return last_connection_id_++ * loop_count_ + loop_index_ + 1; }
  void setLoopIndex(unsigned index, unsigned count) {
    loop_index_ = index;
    loop_count_ = count == 0 ? 1 : count;
  }
  unsigned loopIndex() const { return loop_index_; }
  // A worker loop has no access log of its own: its lines go to the main loop's through this
  // (a bounded cross-thread queue; ztunnel/loops.h). Used only when accessLog() is null.
  void setAccessLogForwarder(std::function<void(AccessLogRecord)> f) {
    access_log_forwarder_ = std::move(f);
  }
  Balancer& balancer() { return shared_balancer_ ? *shared_balancer_ : balancer_; }
  const Balancer& balancer() const { return shared_balancer_ ? *shared_balancer_ : balancer_; }
  // A worker loop balances with the main loop's Balancer (shared between threads), so round
  // robin and ejection are node-wide as with one loop. Must outlive this Proxy's connections.
  void setSharedBalancer(Balancer* b) { shared_balancer_ = b; }
  ZtunnelStats& stats() { return stats_; }
  const ZtunnelStats& stats() const { return stats_; }
  TcpMetrics& tcpMetrics() { return tcp_metrics_; }
  VerdictLog& verdicts() { return verdicts_; }
  const RelayOptions& relayOptions() const { return relay_options_; }

  // Accept callbacks of a pod's listeners.
  void acceptOutbound(uv_stream_t* listener, const LocalPodPtr& pod);
  void acceptInbound(uv_stream_t* listener, const LocalPodPtr& pod);
  void acceptHbone(uv_stream_t* listener, const LocalPodPtr& pod);

  // The mTLS side (null: no HBONE, e.g. in tests without an identity manager).
  MeshTls* meshTls() const { return mesh_tls_; }
  void setMeshTls(MeshTls* m) { mesh_tls_ = m; }
  // The same-node fast path (null: none, e.g. in tests).
  FastPath* fastPath() const { return fast_path_; }
  void setFastPath(FastPath* f) { fast_path_ = f; }

  size_t activeConnections() const { return connections_.size(); }
  // The live-connection set's bucket array (shrunk after a burst; see untrack()).
  size_t connectionBuckets() const { return connections_.bucket_count(); }
  static constexpr size_t kKeptConnectionBuckets = 1024;
  // Connections begun and ended since the start (the idle memory trim's view of activity).
  uint64_t connectionsBegun() const { return connections_begun_; }
  uint64_t connectionsEnded() const { return connections_ended_; }
  // Cuts every connection (drain timeout).
  void abortAll(const std::string& why);
  // Runs once the last connection is gone (drain); replaces an earlier one.
  void onIdle(std::function<void()> cb) { on_idle_ = std::move(cb); }

  nlohmann::json connectionsJson() const;
  // Istio TCP metrics: closed totals plus what the live connections moved so far.
  std::string renderTcpMetrics() const;
  // The same as a map, for merging the loops of a multi-loop ztunnel.
  std::map<TcpLabels, TcpCounters> tcpSeries() const;

  // Test seam: where a connection was going, instead of SO_ORIGINAL_DST (outbound) or the
  // steered local address (inbound) — lets tests run the data path without the BPF programs.
  using DestinationHook = std::function<Result<SocketAddress>(int fd, bool inbound)>;
  void setDestinationHookForTest(DestinationHook h) { destination_hook_ = std::move(h); }
  const DestinationHook& destinationHook() const { return destination_hook_; }

  // Called by ProxyConnection.
  void track(ProxyConnection* c) {
    connections_.insert(c);
    connections_begun_++;
  }
  void untrack(ProxyConnection* c);
  // A connection ended: its access-log line, and istio_tcp_connections_failed_total when it
  // never got established.
  void connectionEnded(const ProxyConnection& c);
  // An inbound HBONE CONNECT refused before it became a connection (401 denied, 400): counted
  // as failed and logged like a connection.
  void inboundStreamRefused(const TcpLabels& labels, AccessLogRecord record);

 private:
  uv_loop_t* loop_;
  RelayOptions relay_options_;
  ClusterStatePtr state_;
  std::string cluster_domain_ = "cluster.local";
  std::string trust_domain_ = "cluster.local";
  AccessLog* access_log_ = nullptr;
  std::function<void(AccessLogRecord)> access_log_forwarder_;
  uint64_t last_connection_id_ = 0;
  unsigned loop_index_ = 0;
  unsigned loop_count_ = 1;
  Balancer balancer_;
  Balancer* shared_balancer_ = nullptr;
  ZtunnelStats stats_;
  TcpMetrics tcp_metrics_;
  VerdictLog verdicts_;
  std::unordered_set<ProxyConnection*> connections_;
  uint64_t connections_begun_ = 0;
  uint64_t connections_ended_ = 0;
  std::function<void()> on_idle_;
  DestinationHook destination_hook_;
  MeshTls* mesh_tls_ = nullptr;
  FastPath* fast_path_ = nullptr;
};

}  // namespace weft::ztunnel
