// HBONE server: TLS 1.3 + HTTP/2 CONNECT termination. Each request is validated (400), decided
// (401), connected upstream (503 on failure) and only then answered 200 and bridged.
#include "ztunnel/hbone/server.h"

#include <fcntl.h>
#include <sys/socket.h>

#include "common/log.h"

namespace weft::hbone {

struct HboneServer::ConnectOp {
  uv_connect_t req;
  uv_tcp_t* tcp = nullptr;
  HboneServer* server = nullptr;
  std::shared_ptr<bool> alive;
  uint64_t serial = 0;
  int32_t streamId = 0;
  TunnelWatchPtr watch;
};

HboneServer::HboneServer(uv_loop_t* loop, ServerConfig config)
    : loop_(loop), config_(std::move(config)) {}

HboneServer::~HboneServer() {
  *alive_ = false;
  if (listener_ != nullptr) {
    listener_->data = nullptr;
    uv_close(reinterpret_cast<uv_handle_t*>(listener_),
             [](uv_handle_t* h) { delete reinterpret_cast<uv_tcp_t*>(h); });
  }
  sessions_.clear();
}

size_t HboneServer::bufferedBytes() const {
  size_t n = 0;
  for (const auto& [serial, s] : sessions_) n += s->bufferedBytes();
  return n;
}

Status HboneServer::listen(UniqueFd boundSocket) {
  if (listener_ != nullptr) return Status::error("HBONE server already listening");
  listener_ = new uv_tcp_t{};
  int rc = uv_tcp_init(loop_, listener_);
  if (rc != 0) {
    delete listener_;
    listener_ = nullptr;
    return Status::errorf("uv_tcp_init: {}", uv_strerror(rc));
  }
  listener_->data = this;
  rc = uv_tcp_open(listener_, boundSocket.get());
  if (rc != 0) return Status::errorf("HBONE listener: uv_tcp_open: {}", uv_strerror(rc));
  boundSocket.release();
  rc = uv_listen(reinterpret_cast<uv_stream_t*>(listener_), 1024, [](uv_stream_t* s, int st) {
    auto* self = static_cast<HboneServer*>(s->data);
    if (self == nullptr || st != 0) return;
    // libuv has already accepted the connection: take it with uv_accept, keep a dup of its fd
    // for the session and let the temporary handle go.
    auto* tmp = new uv_tcp_t{};
    if (uv_tcp_init(s->loop, tmp) != 0) {
      delete tmp;
      return;
    }
    int fd = -1;
    if (uv_accept(s, reinterpret_cast<uv_stream_t*>(tmp)) == 0) {
      uv_os_fd_t raw;
      if (uv_fileno(reinterpret_cast<uv_handle_t*>(tmp), &raw) == 0) {
        fd = ::fcntl(raw, F_DUPFD_CLOEXEC, 0);
      }
    }
    uv_close(reinterpret_cast<uv_handle_t*>(tmp),
             [](uv_handle_t* h) { delete reinterpret_cast<uv_tcp_t*>(h); });
    if (fd < 0) return;
    Status served = self->serve(UniqueFd(fd));
    if (!served) spdlog::warn("hbone: serving a connection: {}", served.message());
  });
  if (rc != 0) return Status::errorf("HBONE listener: uv_listen: {}", uv_strerror(rc));
  return Status::ok();
}

Status HboneServer::serve(UniqueFd conn) {
  uint64_t serial = nextSerial_++;
  H2Session::Callbacks cb;
  cb.onHandshake = [this](const Status& st) {
    if (st) {
      ++stats_.handshakes;
    } else {
      ++stats_.handshakeFailures;
      spdlog::info("hbone server: {}", st.message());
    }
  };
  cb.onRequest = [this, serial](int32_t id, Headers&& h) { onRequest(serial, id, std::move(h)); };
  cb.onClosed = [this, serial](const Status&) {
    peers_.erase(serial);
    sessions_.erase(serial);
  };
  sockaddr_storage peer{};
  socklen_t peerLen = sizeof(peer);
  if (::getpeername(conn.get(), reinterpret_cast<sockaddr*>(&peer), &peerLen) == 0) {
    if (auto a = SocketAddress::fromSockaddr(reinterpret_cast<sockaddr*>(&peer), peerLen)) {
      peers_[serial] = *a;
    }
  }
  TlsStream::PeerCheck check;
  check.trustDomain = config_.trustDomain;
  check.onRefused = [this](TlsRefusal why) { ++stats_.refused[static_cast<size_t>(why)]; };
  auto s = H2Session::create(loop_, std::move(conn), H2Session::Role::kServer, config_.ctx, check,
                             config_.settings, std::move(cb));
  if (!s) return s.status();
  H2Session* raw = s->get();
  sessions_[serial] = std::move(s.value());
  Status st = raw->start();
  if (!st) {
    sessions_.erase(serial);
    return st;
  }
  return Status::ok();
}

void HboneServer::onRequest(uint64_t serial, int32_t streamId, Headers&& headers) {
  auto it = sessions_.find(serial);
  if (it == sessions_.end()) return;
  ++stats_.streams;
  InboundConnect req;
  req.streamId = streamId;
  req.peerIdentity = it->second->peerIdentity();
  if (auto p = peers_.find(serial); p != peers_.end()) req.peer = p->second;
  req.headers = std::move(headers);
  std::string method;
  for (const auto& [k, v] : req.headers) {
    if (k == ":method") method = v;
    if (k == ":authority") req.authority = v;
  }
  auto target = SocketAddress::parse(req.authority);
  if (method != "CONNECT" || !target || target->port() == 0) {
    finish(serial, streamId, 400, nullptr, nullptr);
    return;
  }
  req.target = *target;
  InboundDecision d = config_.decide ? config_.decide(req) : InboundDecision{};
  if (d.verdict == InboundDecision::Verdict::kMalformed) {
    finish(serial, streamId, 400, nullptr, d.watch);
    return;
  }
  if (d.verdict != InboundDecision::Verdict::kAllow) {
    finish(serial, streamId, 401, nullptr, d.watch);
    return;
  }
  SocketAddress dest = d.connectTo.port() != 0 ? d.connectTo : req.target;
  Result<UniqueFd> sock = d.makeSocket
                              ? d.makeSocket(dest)
                              : Result<UniqueFd>(UniqueFd(::socket(
                                    dest.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)));
  if (!sock || sock->get() < 0) {
    finish(serial, streamId, 503, nullptr, d.watch);
    return;
  }
  auto* op = new ConnectOp{};
  op->watch = d.watch;
  op->server = this;
  op->alive = alive_;
  op->serial = serial;
  op->streamId = streamId;
  op->tcp = new uv_tcp_t{};
  if (uv_tcp_init(loop_, op->tcp) != 0) {
    delete op->tcp;
    delete op;
    finish(serial, streamId, 503, nullptr, d.watch);
    return;
  }
  auto fail = [&](int) {
    op->tcp->data = nullptr;
    uv_close(reinterpret_cast<uv_handle_t*>(op->tcp),
             [](uv_handle_t* h) { delete reinterpret_cast<uv_tcp_t*>(h); });
    delete op;
    finish(serial, streamId, 503, nullptr, d.watch);
  };
  if (uv_tcp_open(op->tcp, sock->get()) != 0) {
    fail(0);
    return;
  }
  sock->release();
  sockaddr_storage ss{};
  dest.toSockaddr(&ss);
  int rc = uv_tcp_connect(&op->req, op->tcp, reinterpret_cast<sockaddr*>(&ss),
                          [](uv_connect_t* r, int status) {
                            auto* o = reinterpret_cast<ConnectOp*>(r);
                            uv_tcp_t* tcp = o->tcp;
                            TunnelWatchPtr watch = std::move(o->watch);
                            if (!*o->alive) {
                              tcp->data = nullptr;
                              uv_close(reinterpret_cast<uv_handle_t*>(tcp), [](uv_handle_t* h) {
                                delete reinterpret_cast<uv_tcp_t*>(h);
                              });
                              delete o;
                              endWatch(watch, true);
                              return;
                            }
                            HboneServer* self = o->server;
                            uint64_t serial = o->serial;
                            int32_t id = o->streamId;
                            delete o;
                            if (status != 0) {
                              tcp->data = nullptr;
                              uv_close(reinterpret_cast<uv_handle_t*>(tcp), [](uv_handle_t* h) {
                                delete reinterpret_cast<uv_tcp_t*>(h);
                              });
                              self->finish(serial, id, 503, nullptr, std::move(watch));
                              return;
                            }
                            self->finish(serial, id, 200, tcp, std::move(watch));
                          });
  if (rc != 0) fail(rc);
}

void HboneServer::finish(uint64_t serial, int32_t streamId, int status, uv_tcp_t* upstream,
                         TunnelWatchPtr watch) {
  switch (status) {
    case 200: ++stats_.ok200; break;
    case 400: ++stats_.bad400; break;
    case 401: ++stats_.denied401; break;
    default: ++stats_.failed503; break;
  }
  auto it = sessions_.find(serial);
  if (it == sessions_.end()) {
    if (upstream != nullptr) {
      upstream->data = nullptr;
      uv_close(reinterpret_cast<uv_handle_t*>(upstream),
               [](uv_handle_t* h) { delete reinterpret_cast<uv_tcp_t*>(h); });
    }
    endWatch(watch, true);
    return;
  }
  Status st = it->second->respond(streamId, status, upstream, std::move(watch));
  if (!st) spdlog::debug("hbone server: stream {}: {}", streamId, st.message());
}

}  // namespace weft::hbone
