// A proxied connection's life: accepted, connecting upstream, relaying, closing.
#include "ztunnel/connection.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <utility>

#include "ztunnel/proxy.h"

namespace weft::ztunnel {

const char* directionName(ConnectionDirection d) {
  return d == ConnectionDirection::kOutbound ? "outbound" : "inbound";
}

ProxyConnection::ProxyConnection(Proxy* proxy, ConnectionDirection dir)
    : proxy_(proxy), direction_(dir), started_ms_(uv_now(proxy->loop())) {
  proxy_->track(this);
}

ProxyConnection::~ProxyConnection() {
  if (accepted_) proxy_->connectionEnded(*this);
  proxy_->untrack(this);
}

ProxyConnection* ProxyConnection::accept(Proxy* proxy, uv_stream_t* listener,
                                         ConnectionDirection dir) {
  auto* c = new ProxyConnection(proxy, dir);
  c->down_ = new uv_tcp_t{};
  int rc = uv_tcp_init(proxy->loop(), c->down_);
  if (rc != 0) {
    spdlog::warn("{} accept: uv_tcp_init: {}", directionName(dir), uv_strerror(rc));
    proxy->stats().accept_failures_total++;
    delete c->down_;
    c->down_ = nullptr;
    delete c;
    return nullptr;
  }
  c->open_handles_ = 1;
  c->down_open_ = true;
  c->down_->data = c;
  rc = uv_accept(listener, reinterpret_cast<uv_stream_t*>(c->down_));
  uv_os_fd_t fd = -1;
  if (rc == 0) rc = uv_fileno(reinterpret_cast<uv_handle_t*>(c->down_), &fd);
  if (rc != 0) {
    spdlog::warn("{} accept: {}", directionName(dir), uv_strerror(rc));
    proxy->stats().accept_failures_total++;
    c->closeAll(false, false);
    return nullptr;
  }
  c->down_fd_ = fd;
  c->accepted_ = true;
  c->id = proxy->nextConnectionId();
  return c;
}

ProxyConnection* ProxyConnection::forInboundTunnel(Proxy* proxy, hbone::TunnelWatchPtr* watch) {
  auto* c = new ProxyConnection(proxy, ConnectionDirection::kInbound);
  c->accepted_ = true;
  c->id = proxy->nextConnectionId();
  c->tunnel_ = true;
  c->tunnel_answered_ = true;  // the answer is ours to give; only the tunnel's life matters
  c->path = "hbone";
  c->labels.connection_security_policy = "mutual_tls";
  c->open_handles_ = 1;  // the tunnel
  c->state_ = State::kConnecting;
  c->watch_ = std::make_shared<hbone::TunnelWatch>();
  c->watch_->onAttach = [c] { c->onTunnelAttached(); };
  c->watch_->onEnd = [c] { c->onTunnelEnd(); };
  *watch = c->watch_;
  return c;
}

const char* ProxyConnection::stateName() const {
  switch (state_) {
    case State::kAccepted: return "accepted";
    case State::kConnecting: return "connecting";
    case State::kRelaying: return "relaying";
    case State::kClosing: return "closing";
  }
  return "unknown";
}

// Downstream is side a of the relay: a -> b is what the source sent (Istio's "received").
// Over HBONE: outbound reads the source from its TCP socket, inbound from the tunnel.
uint64_t ProxyConnection::bytesReceived() const {
  if (watch_)
    return direction_ == ConnectionDirection::kOutbound ? watch_->tcpToH2 : watch_->h2ToTcp;
  return relay_ ? relay_->bytesAToB() : 0;
}
uint64_t ProxyConnection::bytesSent() const {
  if (watch_)
    return direction_ == ConnectionDirection::kOutbound ? watch_->h2ToTcp : watch_->tcpToH2;
  return relay_ ? relay_->bytesBToA() : 0;
}

void ProxyConnection::tunnelOutbound(hbone::HboneClient& client, hbone::OutboundConnect req) {
  if (state_ == State::kClosing || !down_open_) return;
  tunnel_ = true;
  path = "hbone";
  labels.connection_security_policy = "mutual_tls";
  // The client socket's handle goes to the HBONE client as it is: on 200 it is the tunnel's
  // socket, otherwise the client resets it. It counted as our open handle; the tunnel counts
  // instead until it is answered and ended. (A dup for the tunnel and closing ours cost four
  // system calls per connection: fcntl, ioctl, a failing epoll_ctl and close.)
  uv_tcp_t* local = std::exchange(down_, nullptr);
  down_open_ = false;
  state_ = State::kConnecting;
  watch_ = std::make_shared<hbone::TunnelWatch>();
  watch_->onEnd = [this] { onTunnelEnd(); };
  req.watch = watch_;
  proxy_->stats().hbone_outbound_streams_total++;
  if (lease_) lease_->begin();  // latency = time to the CONNECT's answer
  client.open(req, local, [this](int status, const Status& err) {
    onTunnelAnswer(status, err);
  });
}

void ProxyConnection::onTunnelAnswer(int status, const Status& err) {
  tunnel_answered_ = true;
  tunnel_ok_ = status == 200;
  // 200 = the far ztunnel reached the app; 503 or no answer = the endpoint is not usable.
  // Other answers (400, 401: refused by policy) say nothing about the endpoint's health.
  if (tunnel_ok_ || status == 503 || status <= 0) reportConnect(tunnel_ok_);
  if (tunnel_ok_) {
    if (state_ == State::kClosing) {
      // Aborted while the CONNECT was in flight: cut the tunnel too.
      if (watch_ && watch_->abort) {
        auto cut = watch_->abort;
        cut();
      }
    } else {
      onTunnelAttached();
    }
  } else {
    if (status > 0) proxy_->stats().hbone_connect_refused_total++;
    else proxy_->stats().upstream_connect_failures_total++;
    // 401 = the destination's policy denied it; anything else: it could not be reached.
    failure_flag = status == 401 ? "DENY" : "CONNECT";
    noteError(status > 0 ? fmt::format("HBONE CONNECT answered {}{}", status,
                                       status == 401   ? " (denied by the destination's policy)"
                                       : status == 503 ? " (upstream connect failed)"
                                       : status == 400 ? " (malformed or wrong destination)"
                                                       : "")
                         : "HBONE: " + err.message());
    spdlog::debug("outbound {} -> {} over HBONE: {}", source.toString(), destination.toString(),
                  err.message());
    closeAll(true, true);  // the HBONE client has reset the client socket
  }
  maybeReleaseTunnel();
}

void ProxyConnection::onTunnelAttached() {
  if (state_ == State::kClosing || opened_) return;
  state_ = State::kRelaying;
  opened_ = true;
  proxy_->tcpMetrics().opened(labels);
}

void ProxyConnection::onTunnelEnd() {
  if (watch_ && watch_->reset && opened_) {
    proxy_->stats().relay_errors_total++;
    noteError("tunnel reset");
  }
  if (direction_ == ConnectionDirection::kInbound && !opened_) {
    spdlog::debug("inbound HBONE {} -> {}: no tunnel", source.toString(),
                  destination.toString());
  }
  maybeReleaseTunnel();
}

void ProxyConnection::maybeReleaseTunnel() {
  if (!tunnel_ || tunnel_released_ || !tunnel_answered_) return;
  bool ended = watch_ == nullptr || watch_->ended;
  // An outbound tunnel that was never attached ends with its answer.
  if (!ended && !(direction_ == ConnectionDirection::kOutbound && !tunnel_ok_)) return;
  tunnel_released_ = true;
  if (opened_) proxy_->tcpMetrics().closed(labels, bytesSent(), bytesReceived());
  if (state_ != State::kClosing) closeAll(false, false);
  if (--open_handles_ == 0) delete this;
}

void ProxyConnection::connectUpstream(UniqueFd sock) {
  int rc = uv_tcp_init(proxy_->loop(), &up_);
  if (rc != 0) {
    proxy_->stats().upstream_socket_failures_total++;
    refuse(std::string("uv_tcp_init: ") + uv_strerror(rc));
    return;
  }
  up_init_ = true;
  open_handles_++;
  up_.data = this;
  rc = uv_tcp_open(&up_, sock.get());
  if (rc != 0) {
    proxy_->stats().upstream_socket_failures_total++;
    refuse(std::string("uv_tcp_open: ") + uv_strerror(rc));
    return;
  }
  sock.release();  // the handle owns it now
  sockaddr_storage ss;
  upstream.toSockaddr(&ss);
  connect_req_.data = this;
  if (lease_) lease_->begin();  // latency = TCP connect time (SYN to SYN-ACK)
  rc = uv_tcp_connect(&connect_req_, &up_, reinterpret_cast<sockaddr*>(&ss), onConnect);
  if (rc != 0) {
    reportConnect(false);
    proxy_->stats().upstream_connect_failures_total++;
    refuse("connect " + upstream.toString() + ": " + uv_strerror(rc));
    return;
  }
  state_ = State::kConnecting;
}

void ProxyConnection::onConnect(uv_connect_t* req, int status) {
  auto* self = static_cast<ProxyConnection*>(req->data);
  if (self->state_ != State::kConnecting) return;  // aborted meanwhile; closing
  self->reportConnect(status == 0);
  if (status != 0) {
    self->proxy_->stats().upstream_connect_failures_total++;
    spdlog::debug("{} {} -> {}: connect {}: {}", directionName(self->direction_),
                  self->source.toString(), self->destination.toString(),
                  self->upstream.toString(), uv_strerror(status));
    self->refuse(std::string("connect: ") + uv_strerror(status));
    return;
  }
  int rc = uv_tcp_nodelay(&self->up_, 1);
  if (rc == 0) rc = uv_tcp_nodelay(self->down_, 1);
  if (rc != 0) spdlog::debug("nodelay: {}", uv_strerror(rc));  // a latency nicety only
  self->state_ = State::kRelaying;
  self->opened_ = true;
  self->proxy_->tcpMetrics().opened(self->labels);
  self->relay_ = std::make_unique<Relay>(
      reinterpret_cast<uv_stream_t*>(self->down_), reinterpret_cast<uv_stream_t*>(&self->up_),
      self->proxy_->relayOptions(), [self](const RelayOutcome& o) { self->onRelayDone(o); });
  self->relay_->start();
}

void ProxyConnection::onRelayDone(const RelayOutcome& o) {
  proxy_->tcpMetrics().closed(labels, o.b_to_a, o.a_to_b);
  if (!o.clean) {
    noteError(o.error.empty() ? std::string("relay error") : o.error);
    proxy_->stats().relay_errors_total++;
    spdlog::debug("{} {} -> {}: {}", directionName(direction_), source.toString(),
                  destination.toString(), o.error);
  }
  // The peer of the side that failed gets a reset; an abort resets both.
  int failed = relay_->failedSide();
  bool reset_down = !o.clean && failed != 0;
  bool reset_up = !o.clean && failed != 1;
  closeAll(reset_down, reset_up);
}

void ProxyConnection::reportConnect(bool ok) {
  if (!lease_) return;
  if (ok) lease_->succeeded();
  else if (lease_->failed()) {
    proxy_->stats().lb_ejections_total++;
    spdlog::info("endpoint {} ejected after {} connect failures in a row", upstream.toString(),
                 proxy_->balancer().options().eject_after_failures);
  }
}

void ProxyConnection::refuseWith(const char* flag, const std::string& why) {
  if (failure_flag.empty()) failure_flag = flag;
  refuse(why);
}

void ProxyConnection::refuse(const std::string& why) {
  noteError(why);
  spdlog::debug("{} {} -> {}: closed: {}", directionName(direction_), source.toString(),
                destination.toString(), why);
  closeAll(true, true);
}

void ProxyConnection::abort(const std::string& why) {
  noteError(why);
  if (tunnel_ && watch_ && watch_->abort) {
    auto cut = watch_->abort;  // may end the tunnel and delete this right here
    cut();
    return;
  }
  if (state_ == State::kRelaying && relay_ && !relay_->finished()) {
    relay_->abort(why);  // reports through onRelayDone, which closes
    return;
  }
  refuse(why);
}

void ProxyConnection::closeAll(bool reset_down, bool reset_up) {
  if (state_ == State::kClosing) return;
  state_ = State::kClosing;
  if (pending_cancel_) {
    auto cancel = std::move(pending_cancel_);
    pending_cancel_ = nullptr;
    cancel();
  }
  if (down_open_) {
    down_open_ = false;
    closeStream(reinterpret_cast<uv_stream_t*>(down_), reset_down, this, onDownClosed);
  }
  if (up_init_) closeStream(reinterpret_cast<uv_stream_t*>(&up_), reset_up, this, onHandleClosed);
}

std::string ProxyConnection::sourceIdentity() const {
  return labels.connection_security_policy == "mutual_tls" ? labels.source_principal : "";
}

std::string ProxyConnection::destinationIdentity() const {
  return labels.connection_security_policy == "mutual_tls" ? labels.destination_principal : "";
}

AccessLogRecord ProxyConnection::accessLogRecord() const {
  AccessLogRecord r;
  r.time_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                  std::chrono::system_clock::now().time_since_epoch())
                  .count();
  r.connection_id = id;
  r.direction = directionName(direction_);
  r.path = path;
  r.src_addr = source;
  r.src_workload = labels.source_workload;
  r.src_namespace = labels.source_workload_namespace;
  r.src_identity = sourceIdentity();
  if (path == "hbone") {
    r.dst_addr = hbone_address;
    r.dst_hbone_addr = upstream.family() ? upstream : destination;
  } else {
    r.dst_addr = upstream.family() ? upstream : destination;
  }
  r.dst_service = labels.destination_service;
  r.dst_workload = labels.destination_workload;
  r.dst_namespace = labels.destination_workload_namespace;
  r.dst_identity = destinationIdentity();
  // Istio's access-log sense: outbound counts toward the destination, inbound toward the
  // source (the metrics' received = source -> destination for both reporters).
  bool outbound = direction_ == ConnectionDirection::kOutbound;
  r.bytes_sent = outbound ? bytesReceived() : bytesSent();
  r.bytes_recv = outbound ? bytesSent() : bytesReceived();
  r.duration_ms = uv_now(proxy_->loop()) - started_ms_;
  r.error = error_;
  return r;
}

void ProxyConnection::onHandleClosed(uv_handle_t* h) {
  auto* self = static_cast<ProxyConnection*>(h->data);
  if (--self->open_handles_ == 0) delete self;
}

void ProxyConnection::onDownClosed(uv_handle_t* h) {
  auto* self = static_cast<ProxyConnection*>(h->data);
  self->down_ = nullptr;
  delete reinterpret_cast<uv_tcp_t*>(h);
  if (--self->open_handles_ == 0) delete self;
}

}  // namespace weft::ztunnel
