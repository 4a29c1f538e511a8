// The agent's side of the node protocol (ARCHITECTURE "Node protocol"): a SOCK_SEQPACKET unix
// listener that greets a ztunnel, sends it a snapshot and then deltas, one message in flight.
#pragma once

#include <uv.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/fd.h"
#include "common/status.h"
#include "common/uv_handle.h"
#include "weft/node/v1/node.pb.h"

namespace weft::agent {

namespace nodepb = weft::node::v1;

// How an AddWorkload ended.
struct AckResult {
  enum Kind { kApplied, kRejected, kDisconnected };
  Kind kind = kApplied;
  std::string error;  // kRejected: the ztunnel's reason; kDisconnected: why the link went
};
using AckCallback = std::function<void(const AckResult&)>;

// One local workload for a new connection's snapshot; the fd is borrowed (dup'd when queued).
struct SnapshotWorkload {
  nodepb::Workload workload;
  int netns_fd = -1;
  AckCallback on_ack;
};

// What the server asks of the agent when a ztunnel says hello.
class NodeServerDelegate {
 public:
  virtual ~NodeServerDelegate() = default;
  virtual nodepb::NodeConfig nodeConfig() = 0;
  virtual nodepb::ClusterUpdate fullClusterUpdate() = 0;
  // Called once the new connection is the active one; what it returns goes in the snapshot.
  virtual std::vector<SnapshotWorkload> snapshotWorkloads() = 0;
  // The active ztunnel went away (closed, replaced, protocol error). Pending acks have already
  // been answered with kDisconnected.
  virtual void onZtunnelDisconnected() = 0;
};

struct NodeServerOptions {
  uint64_t hello_timeout_ms = 5000;
  uint64_t ack_timeout_ms = 10000;
  size_t max_pending_connections = 16;  // connected but not yet said hello
  size_t max_update_bytes = 64 * 1024;  // a full ClusterUpdate is split into chunks of this size
};

struct NodeServerStats {
  bool connected = false;       // a ztunnel said hello and is the active one
  bool snapshot_done = false;   // its SnapshotSent was acked
  std::string ztunnel_version;
  uint64_t connections = 0;     // accepted
  uint64_t protocol_errors = 0; // connections closed for garbage, missing hello, bad acks
  uint64_t ack_timeouts = 0;
  uint64_t rejected_workloads = 0;  // AddWorkload acked with an error
  uint64_t messages_sent = 0;
  uint64_t certificate_requests = 0;  // CertificateRequests received from the active ztunnel
  uint64_t certificate_errors = 0;    // answered with an error (refused identity, bad CSR, no CA)
};

// Answers one CertificateRequest (request_id is filled in by the server). Runs on the loop.
using CertificateSigner =
    std::function<nodepb::CertificateResponse(const nodepb::CertificateRequest&)>;

class NodeServer {
 public:
  static Result<std::unique_ptr<NodeServer>> listen(uv_loop_t* loop, const std::string& path,
                                                    NodeServerDelegate* delegate,
                                                    NodeServerOptions options = {});
  ~NodeServer();
  NodeServer(const NodeServer&) = delete;
  NodeServer& operator=(const NodeServer&) = delete;

  // True while a ztunnel is the active connection (from its hello on).
  bool active() const { return active_ != nullptr; }
  NodeServerStats stats() const;

  // Queue a message for the active ztunnel; false (and nothing queued, callbacks not called)
  // if there is none.
  bool sendClusterUpdate(nodepb::ClusterUpdate update);
  bool addWorkload(const nodepb::Workload& workload, int netns_fd, AckCallback on_ack);
  bool delWorkload(const std::string& uid);
  // Who signs CertificateRequests; without one every request is answered with an error.
  void setCertificateSigner(CertificateSigner signer) { signer_ = std::move(signer); }

  // Stops accepting and closes every connection; no callbacks run (the owner is stopping).
  void close();

 private:
  struct Outgoing {
    nodepb::AgentMessage msg;
    std::vector<UniqueFd> fds;
    AckCallback on_ack;  // only for AddWorkload
  };
  struct Connection;
  using ConnectionPtr = std::shared_ptr<Connection>;

  NodeServer(uv_loop_t* loop, std::string path, NodeServerDelegate* delegate,
             NodeServerOptions options);
  Status start();
  void onAcceptable();
  void onReadable(const ConnectionPtr& conn);
  void onHello(const ConnectionPtr& conn, const nodepb::Hello& hello);
  void onAck(const ConnectionPtr& conn, const nodepb::Ack& ack);
  void onCertificateRequest(const ConnectionPtr& conn, const nodepb::CertificateRequest& req);
  void enqueue(Connection& conn, Outgoing out);
  void pump(const ConnectionPtr& conn);
  // By value: callers may pass a reference into connections_, which this erases.
  void closeConnection(ConnectionPtr conn, const std::string& why, bool protocol_error);

  uv_loop_t* loop_;
  std::string path_;
  NodeServerDelegate* delegate_;
  NodeServerOptions options_;
  UniqueFd listen_fd_;
  UvHandle<uv_poll_t> listen_poll_;
  std::map<Connection*, ConnectionPtr> connections_;
  ConnectionPtr active_;
  uint64_t next_id_ = 1;
  NodeServerStats stats_;
  CertificateSigner signer_;
  bool closed_ = false;
};

using NodeServerPtr = std::unique_ptr<NodeServer>;

// Splits a full ClusterUpdate into datagram-sized pieces: the first keeps full=true, the rest
// are plain upserts.
std::vector<nodepb::ClusterUpdate> splitClusterUpdate(const nodepb::ClusterUpdate& update,
                                                      size_t max_bytes);

}  // namespace weft::agent
