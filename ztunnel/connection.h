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
#include "ztunnel/access_log.h"
#include "ztunnel/balancer.h"
#include "ztunnel/hbone/client.h"
#include "ztunnel/hbone/session.h"
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
  // An inbound HBONE stream: no socket of its own; it follows the returned watch (give it to
  // the HBONE server's decision) until the tunnel ends.
  static ProxyConnection* forInboundTunnel(Proxy* proxy, hbone::TunnelWatchPtr* watch);

  uv_tcp_t* downstream() { return down_; }
  int downstreamFd() const { return down_fd_; }

  // Set before connectUpstream(): what the decision found.
  SocketAddress source;         // the client
  SocketAddress destination;    // the original destination
  SocketAddress upstream;       // where we connect (next hop)
  TcpLabels labels;
  std::string route;            // route kind / reason, for /connections
  std::string path = "plain";   // "plain" or "hbone"
  std::string peer_identity;    // the other side's SPIFFE ID (HBONE)
  uint64_t id = 0;              // per proxy, increasing: /connections and the access log
  SocketAddress hbone_address;  // HBONE: the L4 address of the tunnel (pod IP:15008)
  // Why a connection that never got established failed (Istio's response_flags: DENY,
  // CONNECT, IDENTITY_ERROR); empty = CONNECT.
  std::string failure_flag;

  // Connects `sock` (created and marked by the caller, in the right netns) to `upstream`,
  // then relays. Failures are counted and close the client with a reset.
  void connectUpstream(UniqueFd sock);
  // Instead of connectUpstream: the client socket goes into an HBONE CONNECT stream (the client
  // gets a dup of it); counted and closed with a reset when the tunnel does not come up.
  void tunnelOutbound(hbone::HboneClient& client, hbone::OutboundConnect req);
  // A service endpoint's hold, released with the connection: the connect (plain) or the
  // CONNECT's answer (HBONE) reports success and latency, or a failure, to the balancer.
  void setEndpointLease(EndpointLeasePtr lease) { lease_ = std::move(lease); }
  // Something to cancel if the connection ends before it is used (a certificate wait).
  void setPendingCancel(std::function<void()> cancel) { pending_cancel_ = std::move(cancel); }
  bool closing() const { return state_ == State::kClosing; }
  // Closes the client (reset: RST) without an upstream: a refused or failed decision.
  void refuse(const std::string& why);
  // refuse() with Istio's response flag for the failure (see failure_flag).
  void refuseWith(const char* flag, const std::string& why);
  // Cuts the connection now, both sides reset (drain timeout).
  void abort(const std::string& why);

  ConnectionDirection direction() const { return direction_; }
  uint64_t startedMs() const { return started_ms_; }
  const char* stateName() const;
  // Bytes so far: source -> destination (received) and destination -> source (sent).
  uint64_t bytesReceived() const;
  uint64_t bytesSent() const;
  bool counted() const { return opened_; }
  // What went wrong, if anything (the first reason given); empty = clean so far.
  const std::string& error() const { return error_; }
  // The SPIFFE IDs of each end when the connection is mTLS (HBONE); empty otherwise.
  std::string sourceIdentity() const;
  std::string destinationIdentity() const;
  // The access-log line's fields as of now.
  AccessLogRecord accessLogRecord() const;

 private:
  ProxyConnection(Proxy* proxy, ConnectionDirection dir);
  ~ProxyConnection();
  enum class State { kAccepted, kConnecting, kRelaying, kClosing };

  static void onConnect(uv_connect_t* req, int status);
  static void onHandleClosed(uv_handle_t* h);
  static void onDownClosed(uv_handle_t* h);
  void onRelayDone(const RelayOutcome& outcome);
  void closeAll(bool reset_down, bool reset_up);
  void onTunnelAnswer(int status, const Status& err);
  void onTunnelAttached();
  void onTunnelEnd();
  void maybeReleaseTunnel();
  // Reports the upstream connect's outcome to the balancer (once; no-op without a lease).
  void reportConnect(bool ok);
  void noteError(const std::string& why) {
    if (error_.empty()) error_ = why;
  }

  Proxy* proxy_;
  ConnectionDirection direction_;
  State state_ = State::kAccepted;
  // On the heap: an HBONE tunnel takes it over as its socket (no dup, no second handle).
  uv_tcp_t* down_ = nullptr;
  uv_tcp_t up_{};
  uv_connect_t connect_req_{};
  int down_fd_ = -1;
  bool up_init_ = false;
  int open_handles_ = 0;
  bool opened_ = false;  // counted as opened in the TCP metrics
  uint64_t started_ms_ = 0;
  std::unique_ptr<Relay> relay_;
  std::function<void()> pending_cancel_;
  EndpointLeasePtr lease_;  // null unless the route was a service endpoint
  // HBONE: the tunnel counts as one open handle until it is answered and ended.
  hbone::TunnelWatchPtr watch_;
  bool tunnel_ = false;
  bool tunnel_answered_ = false;  // outbound: the CONNECT's answer arrived (inbound: n/a)
  bool tunnel_ok_ = false;        // answered 200
  bool tunnel_released_ = false;
  bool down_open_ = false;        // down_ is an initialised handle not yet closed
  bool accepted_ = false;         // a real connection: logged and counted when it ends
  std::string error_;
};

}  // namespace weft::ztunnel
