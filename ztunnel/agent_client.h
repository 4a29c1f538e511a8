// The ztunnel's end of the node protocol: connects to the agent's SOCK_SEQPACKET socket, says
// hello, hands each AgentMessage to a handler and acks it; reconnects with backoff if dropped.
#pragma once

#include <uv.h>

#include <cstdint>
#include <memory>
#include <string>

#include "common/fd.h"
#include "common/status.h"
#include "common/uv_handle.h"
#include "weft/node/v1/node.pb.h"
#include "ztunnel/stats.h"

namespace weft::ztunnel {

constexpr uint32_t kNodeProtocolVersion = 1;

// What the ztunnel does with each message. A failed Status is acked as its error text.
class AgentHandler {
 public:
  virtual ~AgentHandler() = default;
  // A new connection: a snapshot follows.
  virtual void onAgentConnected() = 0;
  virtual void onAgentDisconnected() = 0;
  virtual Status onNodeConfig(const node::v1::NodeConfig& config) = 0;
  virtual Status onClusterUpdate(const node::v1::ClusterUpdate& update) = 0;
  virtual Status onAddWorkload(const node::v1::Workload& workload, UniqueFd netns) = 0;
  virtual Status onDelWorkload(const std::string& uid) = 0;
  virtual Status onSnapshotSent() = 0;
  // The answer to a CertificateRequest we sent (acked like any message).
  virtual Status onCertificateResponse(const node::v1::CertificateResponse& response) {
    return Status::error("certificate responses are not handled here");
  }
};

struct AgentClientOptions {
  std::string socket_path;
  std::string ztunnel_version;
  uint64_t backoff_initial_ms = 100;
  uint64_t backoff_max_ms = 2000;
};

class AgentClient {
 public:
  AgentClient(uv_loop_t* loop, AgentClientOptions options, AgentHandler& handler,
              ZtunnelStats& stats);
  ~AgentClient();
  AgentClient(const AgentClient&) = delete;
  AgentClient& operator=(const AgentClient&) = delete;

  // Connects now (and keeps reconnecting). Fails only if libuv handles cannot be set up.
  Status start();
  // Closes the connection and stops reconnecting.
  void stop();
  bool connected() const { return sock_.valid(); }
  // Sends a CertificateRequest now; false if not connected or the send failed (which also
  // drops the connection, as for a failed ack).
  bool sendCertificateRequest(const node::v1::CertificateRequest& request);

 private:
  void tryConnect();
  void scheduleReconnect();
  void disconnect(const std::string& why);
  void onReadable();
  // Applies one message; returns false if the connection was closed meanwhile.
  bool handle(const node::v1::AgentMessage& msg, std::vector<UniqueFd> fds);

  uv_loop_t* loop_;
  AgentClientOptions options_;
  AgentHandler& handler_;
  ZtunnelStats& stats_;
  UvHandle<uv_timer_t> timer_;
  std::unique_ptr<UvHandle<uv_poll_t>> poll_;  // one per connection
  UniqueFd sock_;
  uint64_t backoff_ms_;
  bool stopped_ = false;
};

}  // namespace weft::ztunnel
