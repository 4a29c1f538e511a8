// One proxied TCP connection (outbound or inbound): its downstream and upstream handles, the
// upstream connect, the relay, and what /connections and the metrics report about it.
#pragma once

#include <uv.h>

#include <cstdint>
#include <memory>
#include <string>

#include "common/address.h"
#include "common/fd.h"
#include "common/status.h"
#include "ztunnel/relay.h"
#include "ztunnel/stats.h"

namespace weft::ztunnel {

class Proxy;

enum class ConnectionDirection { kOutbound, kInbound };
const char* directionName(ConnectionDirection d);

// Owns its two handles; deletes itself once both are closed. Lives on one loop.
class ProxyConnection {
 public:
  // Accepts one client from `listener` into a new connection registered with `proxy`; null if
  // the accept failed (counted).
  static ProxyConnection* accept(Proxy* proxy, uv_stream_t* listener, ConnectionDirection dir);

  uv_tcp_t* downstream() { return &down_; }
  int downstreamFd() const { return down_fd_; }

  // Set before connectUpstream(): what the decision found.
  SocketAddress source;         // the client
  SocketAddress destination;    // the original destination
  SocketAddress upstream;       // where we connect (next hop)
  TcpLabels labels;
  std::string route;            // route kind / reason, for /connections

  // Connects `sock` (created and marked by the caller, in the right netns) to `upstream`,
  // then relays. Failures are counted and close the client with a reset.
  void connectUpstream(UniqueFd sock);
  // Closes the client (reset: RST) without an upstream: a refused or failed decision.
  void refuse(const std::string& why);
  // Cuts the connection now, both sides reset (drain timeout).
  void abort(const std::string& why);

  ConnectionDirection direction() const { return direction_; }
  uint64_t startedMs() const { return started_ms_; }
  const char* stateName() const;
  // Bytes so far: source -> destination (received) and destination -> source (sent).
  uint64_t bytesReceived() const;
  uint64_t bytesSent() const;
  bool counted() const { return opened_; }

 private:
  ProxyConnection(Proxy* proxy, ConnectionDirection dir);
  ~ProxyConnection();
  enum class State { kAccepted, kConnecting, kRelaying, kClosing };

  static void onConnect(uv_connect_t* req, int status);
  static void onHandleClosed(uv_handle_t* h);
  void onRelayDone(const RelayOutcome& outcome);
  void closeAll(bool reset_down, bool reset_up);

  Proxy* proxy_;
  ConnectionDirection direction_;
  State state_ = State::kAccepted;
  uv_tcp_t down_{};
  uv_tcp_t up_{};
  uv_connect_t connect_req_{};
  int down_fd_ = -1;
  bool up_init_ = false;
  int open_handles_ = 0;
  bool opened_ = false;  // counted as opened in the TCP metrics
  uint64_t started_ms_ = 0;
  std::unique_ptr<Relay> relay_;
};

}  // namespace weft::ztunnel
