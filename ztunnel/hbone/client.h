// HBONE client: CONNECT streams over pooled TLS+HTTP/2 connections, one pool per
// (source identity, destination identity, destination address), each stream bridged to a local
// TCP socket once the server answered 200.
#pragma once

#include <uv.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/address.h"
#include "common/fd.h"
#include "common/status.h"
#include "ztunnel/hbone/session.h"
#include "ztunnel/hbone/tls_stream.h"

namespace weft::hbone {

struct OutboundConnect {
  std::string sourceIdentity;       // whose certificate we present (part of the pool key)
  SslCtxPtr ctx;                    // makeTlsContext(TlsRole::kClient, source's credentials)
  // Which certificate ctx holds (e.g. its serial), part of the pool key: after a rotation new
  // connections present the new certificate; pooled ones keep theirs until idle.
  std::string credentialsVersion;
  std::string destinationIdentity;  // the server must present this URI SAN
  SocketAddress hboneAddress;       // <dest pod IP>:15008
  SocketAddress target;             // :authority, <dest pod IP>:<port>
  SocketAddress forwardedFor;       // forwarded: for="ip:port" (omitted when port 0)
  std::string baggage;              // omitted when empty
  std::string traceparent;          // generated when empty
  // Creates the socket for a new pooled connection (e.g. in the pod netns with the mark);
  // null = a plain non-blocking socket. The client connects it.
  std::function<Result<UniqueFd>(const SocketAddress& to)> makeSocket;
  // Follows the tunnel once the server said 200 (bytes, end, abort). Not pool state.
  TunnelWatchPtr watch;
};

struct ClientConfig {
  H2Settings settings = [] {
    H2Settings s;
    s.maxHeaderList = 16u << 10;
    return s;
  }();
  size_t maxStreamsPerConnection = 100;
  // How often one CONNECT is sent again after the server refused it unanswered (REFUSED_STREAM,
  // e.g. a cold burst past a stream limit the server had not announced yet, or a GOAWAY).
  int maxRefusedRetries = 3;
};

// status: the server's :status (200 = tunnel up), 0 when no response (error says why).
using ConnectDone = std::function<void(int status, const Status& error)>;

class HboneClient {
 public:
  HboneClient(uv_loop_t* loop, ClientConfig config = {});
  ~HboneClient();
  HboneClient(const HboneClient&) = delete;
  HboneClient& operator=(const HboneClient&) = delete;

  // Opens a CONNECT stream and, on 200, relays `local` (a connected socket, owned from now on)
  // through it. done runs exactly once, on the loop, never inside open().
  void open(const OutboundConnect& req, UniqueFd local, ConnectDone done);
  // The same with the caller's own libuv handle of the local socket (allocated with new,
  // initialised on this loop, connected, not reading), owned from now on: on 200 it is the
  // tunnel's socket as it is (no dup, no second handle); otherwise it is reset (RST) and freed.
  void open(const OutboundConnect& req, uv_tcp_t* local, ConnectDone done);

  uint64_t handshakes() const { return handshakes_; }
  uint64_t handshakeFailures() const { return handshakeFailures_; }
  // CONNECTs sent again after the server refused them unanswered.
  uint64_t streamRetries() const { return streamRetries_; }
  // Failed handshakes with this reason; over all reasons they add up to handshakeFailures().
  uint64_t refusals(TlsRefusal why) const { return refused_[static_cast<size_t>(why)]; }
  size_t connections() const { return conns_.size(); }
  // H2Session::bufferedBytes() over every connection.
  size_t bufferedBytes() const;

  static std::string poolKey(const OutboundConnect& req);
  static std::string makeTraceparent();

 private:
  struct Waiter {
    Headers headers;
    LocalSocket local;
    ConnectDone done;
    TunnelWatchPtr watch;
    int retries = 0;  // times the server refused this CONNECT unanswered
  };
  // A CONNECT sent, awaiting its response; kept whole so that a refused one can be sent again.
  struct Sent {
    ConnectDone done;
    Headers headers;
    int retries = 0;
  };
  struct Conn {
    uint64_t serial = 0;
    std::string key;
    std::unique_ptr<H2Session> session;
    bool connected = false;  // TCP connected
    bool ready = false;      // TLS done
    bool dead = false;
    uv_tcp_t* connecting = nullptr;
    std::vector<Waiter> waiting;
    std::map<int32_t, Sent> streams;  // awaiting their response
    // What dialled it (no watch; set by dial()): a refused stream that needs another
    // connection to the same peer dials it from this, as the pool's sharing already does.
    std::shared_ptr<const OutboundConnect> origin;
    size_t load() const;
  };
  void openLocal(const OutboundConnect& req, LocalSocket local, ConnectDone done);
  Conn* pick(const std::string& key);
  Conn* dial(const OutboundConnect& req, Status* err);
  // Puts a CONNECT on a pooled connection with room (dialling one if none has), or fails it.
  void route(const std::string& key, const OutboundConnect& req, Waiter w);
  void retryRefused(uint64_t serial, int32_t id, LocalSocket local, TunnelWatchPtr watch);
  void onTcpConnected(uint64_t serial, int status, UniqueFd fd, OutboundConnect req);
  void submitWaiting(Conn* c);
  bool isSpare(uint64_t serial) const;
  void fail(uint64_t serial, const Status& why);
  static void later(uv_loop_t* loop, std::function<void()> fn);

  uv_loop_t* loop_;
  ClientConfig config_;
  uint64_t nextSerial_ = 1;
  std::map<uint64_t, std::unique_ptr<Conn>> conns_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
  uint64_t handshakes_ = 0;
  uint64_t handshakeFailures_ = 0;
  uint64_t streamRetries_ = 0;
  TlsRefusalCounts refused_{};
};

}  // namespace weft::hbone
