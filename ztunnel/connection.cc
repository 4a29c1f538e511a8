// A proxied connection's life: accepted, connecting upstream, relaying, closing.
#include "ztunnel/connection.h"

#include <spdlog/spdlog.h>

#include "ztunnel/proxy.h"

namespace weft::ztunnel {

const char* directionName(ConnectionDirection d) {
  return d == ConnectionDirection::kOutbound ? "outbound" : "inbound";
}

ProxyConnection::ProxyConnection(Proxy* proxy, ConnectionDirection dir)
    : proxy_(proxy), direction_(dir), started_ms_(uv_now(proxy->loop())) {
  proxy_->track(this);
}

ProxyConnection::~ProxyConnection() { proxy_->untrack(this); }

ProxyConnection* ProxyConnection::accept(Proxy* proxy, uv_stream_t* listener,
                                         ConnectionDirection dir) {
  auto* c = new ProxyConnection(proxy, dir);
  int rc = uv_tcp_init(proxy->loop(), &c->down_);
  if (rc != 0) {
    spdlog::warn("{} accept: uv_tcp_init: {}", directionName(dir), uv_strerror(rc));
    proxy->stats().accept_failures_total++;
    delete c;
    return nullptr;
  }
  c->open_handles_ = 1;
  c->down_.data = c;
  rc = uv_accept(listener, reinterpret_cast<uv_stream_t*>(&c->down_));
  uv_os_fd_t fd = -1;
  if (rc == 0) rc = uv_fileno(reinterpret_cast<uv_handle_t*>(&c->down_), &fd);
  if (rc != 0) {
    spdlog::warn("{} accept: {}", directionName(dir), uv_strerror(rc));
    proxy->stats().accept_failures_total++;
    c->closeAll(false, false);
    return nullptr;
  }
  c->down_fd_ = fd;
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
uint64_t ProxyConnection::bytesReceived() const { return relay_ ? relay_->bytesAToB() : 0; }
uint64_t ProxyConnection::bytesSent() const { return relay_ ? relay_->bytesBToA() : 0; }

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
  rc = uv_tcp_connect(&connect_req_, &up_, reinterpret_cast<sockaddr*>(&ss), onConnect);
  if (rc != 0) {
    proxy_->stats().upstream_connect_failures_total++;
    refuse("connect " + upstream.toString() + ": " + uv_strerror(rc));
    return;
  }
  state_ = State::kConnecting;
}

void ProxyConnection::onConnect(uv_connect_t* req, int status) {
  auto* self = static_cast<ProxyConnection*>(req->data);
  if (self->state_ != State::kConnecting) return;  // aborted meanwhile; closing
  if (status != 0) {
    self->proxy_->stats().upstream_connect_failures_total++;
    spdlog::debug("{} {} -> {}: connect {}: {}", directionName(self->direction_),
                  self->source.toString(), self->destination.toString(),
                  self->upstream.toString(), uv_strerror(status));
    self->refuse(std::string("connect: ") + uv_strerror(status));
    return;
  }
  int rc = uv_tcp_nodelay(&self->up_, 1);
  if (rc == 0) rc = uv_tcp_nodelay(&self->down_, 1);
  if (rc != 0) spdlog::debug("nodelay: {}", uv_strerror(rc));  // a latency nicety only
  self->state_ = State::kRelaying;
  self->opened_ = true;
  self->proxy_->tcpMetrics().opened(self->labels);
  self->relay_ = std::make_unique<Relay>(
      reinterpret_cast<uv_stream_t*>(&self->down_), reinterpret_cast<uv_stream_t*>(&self->up_),
      self->proxy_->relayOptions(), [self](const RelayOutcome& o) { self->onRelayDone(o); });
  self->relay_->start();
}

void ProxyConnection::onRelayDone(const RelayOutcome& o) {
  proxy_->tcpMetrics().closed(labels, o.b_to_a, o.a_to_b);
  if (!o.clean) {
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

void ProxyConnection::refuse(const std::string& why) {
  spdlog::debug("{} {} -> {}: closed: {}", directionName(direction_), source.toString(),
                destination.toString(), why);
  closeAll(true, true);
}

void ProxyConnection::abort(const std::string& why) {
  if (state_ == State::kRelaying && relay_ && !relay_->finished()) {
    relay_->abort(why);  // reports through onRelayDone, which closes
    return;
  }
  refuse(why);
}

void ProxyConnection::closeAll(bool reset_down, bool reset_up) {
  if (state_ == State::kClosing) return;
  state_ = State::kClosing;
  closeStream(reinterpret_cast<uv_stream_t*>(&down_), reset_down, this, onHandleClosed);
  if (up_init_) closeStream(reinterpret_cast<uv_stream_t*>(&up_), reset_up, this, onHandleClosed);
}

void ProxyConnection::onHandleClosed(uv_handle_t* h) {
  auto* self = static_cast<ProxyConnection*>(h->data);
  if (--self->open_handles_ == 0) delete self;
}

}  // namespace weft::ztunnel
