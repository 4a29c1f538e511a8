// HBONE server: accepts TLS+HTTP/2 connections, CONNECT streams decided by a callback, each
// allowed stream bridged to an upstream TCP connection made only then (200 after connect).
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "common/address.h"
#include "common/fd.h"
#include "common/status.h"
#include "ztunnel/hbone/session.h"
#include "ztunnel/hbone/tls_stream.h"

namespace weft::hbone {

struct InboundConnect {
  int32_t streamId = 0;
  std::string authority;  // as sent
  SocketAddress target;   // parsed authority
  std::string peerIdentity;
  SocketAddress peer;  // the HBONE connection's TCP peer
  Headers headers;  // all of them, pseudo-headers included (forwarded, baggage, traceparent, ...)
};

struct InboundDecision {
  enum class Verdict { kAllow, kDeny, kMalformed };
  Verdict verdict = Verdict::kDeny;
  // Creates the upstream socket (e.g. inside the pod's netns, with the mark); null = a plain
  // socket in the current netns. It must be non-blocking; the server connects it.
  std::function<Result<UniqueFd>(const SocketAddress& target)> makeSocket;
  SocketAddress connectTo;  // default (port 0): the authority
  // Follows the tunnel (bytes, end); ended at once when no tunnel comes of it (400/401/503).
  TunnelWatchPtr watch;
};

struct ServerConfig {
  SslCtxPtr ctx;  // makeTlsContext(TlsRole::kServer, the pod identity's credentials)
  std::string trustDomain = "cluster.local";
  H2Settings settings;
  std::function<InboundDecision(const InboundConnect&)> decide;
};

struct ServerStats {
  uint64_t handshakes = 0;
  uint64_t handshakeFailures = 0;
  uint64_t streams = 0;
  uint64_t ok200 = 0;
  uint64_t bad400 = 0;
  uint64_t denied401 = 0;
  uint64_t failed503 = 0;
  // Failed handshakes by reason (index: TlsRefusal); they add up to handshakeFailures.
  TlsRefusalCounts refused{};
};

class HboneServer {
 public:
  HboneServer(uv_loop_t* loop, ServerConfig config);
  ~HboneServer();
  HboneServer(const HboneServer&) = delete;
  HboneServer& operator=(const HboneServer&) = delete;

  // Listens on a bound socket (e.g. 15008 created in the pod netns).
  Status listen(UniqueFd boundSocket);
  // Serves one already-accepted connection.
  Status serve(UniqueFd conn);
  // New connections use these credentials (rotation); open ones keep theirs.
  void setContext(SslCtxPtr ctx) { config_.ctx = std::move(ctx); }
  size_t connections() const { return sessions_.size(); }
  const ServerStats& stats() const { return stats_; }
  // H2Session::bufferedBytes() over every connection.
  size_t bufferedBytes() const;

 private:
  struct ConnectOp;
  void onRequest(uint64_t serial, int32_t streamId, Headers&& headers);
  void finish(uint64_t serial, int32_t streamId, int status, uv_tcp_t* upstream,
              TunnelWatchPtr watch);

  uv_loop_t* loop_;
  ServerConfig config_;
  uv_tcp_t* listener_ = nullptr;
  uint64_t nextSerial_ = 1;
  std::map<uint64_t, std::unique_ptr<H2Session>> sessions_;
  std::map<uint64_t, SocketAddress> peers_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
  ServerStats stats_;
};

}  // namespace weft::hbone
