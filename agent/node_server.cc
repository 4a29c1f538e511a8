// Node-protocol server: accepts ztunnels, sequences hello -> snapshot -> deltas with one
// message in flight, and closes any connection that does not follow the protocol.
#include "agent/node_server.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <optional>

#include "common/log.h"
#include "common/seqpacket.h"

namespace weft::agent {

struct NodeServer::Connection {
  NodeServer* server = nullptr;  // the handles' data points at the connection
  UniqueFd fd;
  UvHandle<uv_poll_t> poll;
  UvHandle<uv_timer_t> timer;  // hello timeout, then ack timeout
  bool said_hello = false;
  std::deque<Outgoing> queue;
  std::optional<Outgoing> in_flight;
  uint64_t id = 0;  // for logs
};

namespace {

Status bindSeqpacket(const std::string& path, UniqueFd* out) {
  sockaddr_un addr{};
  if (path.empty() || path.size() >= sizeof(addr.sun_path))
    return Status::errorf("socket path \"{}\" is empty or too long", path);
  std::error_code ec;
  auto parent = std::filesystem::path(path).parent_path();
  if (!parent.empty()) std::filesystem::create_directories(parent, ec);
  if (ec) return Status::errorf("mkdir {}: {}", parent.string(), ec.message());
  int fd = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::errorf("socket: {}", errnoText(errno));
  UniqueFd sock(fd);
  // A stale socket file from an earlier agent would make bind fail with EADDRINUSE.
  if (::unlink(path.c_str()) != 0 && errno != ENOENT)
    return Status::errorf("unlink {}: {}", path, errnoText(errno));
  addr.sun_family = AF_UNIX;
  memcpy(addr.sun_path, path.data(), path.size());
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0)
    return Status::errorf("bind {}: {}", path, errnoText(errno));
  if (::chmod(path.c_str(), 0600) != 0)
    return Status::errorf("chmod {}: {}", path, errnoText(errno));
  if (::listen(fd, 16) != 0) return Status::errorf("listen {}: {}", path, errnoText(errno));
  *out = std::move(sock);
  return Status::ok();
}

const char* payloadName(const nodepb::AgentMessage& m) {
  switch (m.payload_case()) {
    case nodepb::AgentMessage::kNodeConfig: return "NodeConfig";
    case nodepb::AgentMessage::kAddWorkload: return "AddWorkload";
    case nodepb::AgentMessage::kDelWorkload: return "DelWorkload";
    case nodepb::AgentMessage::kSnapshotSent: return "SnapshotSent";
    case nodepb::AgentMessage::kClusterUpdate: return "ClusterUpdate";
    case nodepb::AgentMessage::kCertificateResponse: return "CertificateResponse";
    default: return "empty";
  }
}

}  // namespace

std::vector<nodepb::ClusterUpdate> splitClusterUpdate(const nodepb::ClusterUpdate& update,
                                                      size_t max_bytes) {
  std::vector<nodepb::ClusterUpdate> out;
  out.emplace_back();
  out.back().set_full(update.full());
  auto room = [&](size_t add) {
    if (out.back().ByteSizeLong() + add + 16 > max_bytes && out.back().ByteSizeLong() > 2) {
      out.emplace_back();
    }
  };
  for (const auto& w : update.upsert_workloads()) {
    room(w.ByteSizeLong());
    *out.back().add_upsert_workloads() = w;
  }
  for (const auto& uid : update.remove_workloads()) {
    room(uid.size());
    out.back().add_remove_workloads(uid);
  }
  for (const auto& s : update.upsert_services()) {
    room(s.ByteSizeLong());
    *out.back().add_upsert_services() = s;
  }
  for (const auto& key : update.remove_services()) {
    room(key.size());
    out.back().add_remove_services(key);
  }
  for (const auto& p : update.upsert_authorization_policies()) {
    room(p.ByteSizeLong());
    *out.back().add_upsert_authorization_policies() = p;
  }
  for (const auto& key : update.remove_authorization_policies()) {
    room(key.size());
    out.back().add_remove_authorization_policies(key);
  }
  return out;
}

NodeServer::NodeServer(uv_loop_t* loop, std::string path, NodeServerDelegate* delegate,
                       NodeServerOptions options)
    : loop_(loop), path_(std::move(path)), delegate_(delegate), options_(options) {}

NodeServer::~NodeServer() { close(); }

Result<std::unique_ptr<NodeServer>> NodeServer::listen(uv_loop_t* loop, const std::string& path,
                                                       NodeServerDelegate* delegate,
                                                       NodeServerOptions options) {
  std::unique_ptr<NodeServer> server(new NodeServer(loop, path, delegate, options));
  Status s = server->start();
  if (!s) return s.context("node protocol socket");
  return server;
}

Status NodeServer::start() {
  Status s = bindSeqpacket(path_, &listen_fd_);
  if (!s) return s;
  int rc = listen_poll_.init(uv_poll_init(loop_, listen_poll_.get(), listen_fd_.get()));
  if (rc != 0) return Status::errorf("uv_poll_init: {}", uv_strerror(rc));
  listen_poll_.get()->data = this;
  rc = uv_poll_start(listen_poll_.get(), UV_READABLE, [](uv_poll_t* h, int status, int) {
    auto* self = static_cast<NodeServer*>(h->data);
    if (status < 0) {
      spdlog::error("node protocol listener: {}", uv_strerror(status));
      return;
    }
    self->onAcceptable();
  });
  if (rc != 0) return Status::errorf("uv_poll_start: {}", uv_strerror(rc));
  spdlog::info("node protocol: listening on {}", path_);
  return Status::ok();
}

void NodeServer::close() {
  if (closed_) return;
  closed_ = true;
  auto conns = connections_;
  for (auto& [raw, conn] : conns) closeConnection(conn, "agent shutting down", false);
  listen_poll_.close();
  listen_fd_.reset();
}

NodeServerStats NodeServer::stats() const {
  NodeServerStats s = stats_;
  s.connected = active_ != nullptr;
  return s;
}

void NodeServer::onAcceptable() {
  // Bounded: at most a few accepts per wakeup, the rest on the next one.
  for (int i = 0; i < 16; i++) {
    int fd = ::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK)
        spdlog::warn("node protocol accept: {}", errnoText(errno));
      return;
    }
    UniqueFd sock(fd);
    size_t pending = 0;
    for (auto& [raw, c] : connections_)
      if (!c->said_hello) pending++;
    if (pending >= options_.max_pending_connections) {
      spdlog::warn("node protocol: {} connections have not said hello; refusing another",
                   pending);
      stats_.protocol_errors++;
      continue;
    }
    // One datagram may be as large as the protocol allows; make room for it.
    int sndbuf = static_cast<int>(kMaxNodeMessageBytes * 2);
    if (::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf)) != 0)
      spdlog::debug("SO_SNDBUF: {}", errnoText(errno));
    auto conn = std::make_shared<Connection>();
    conn->fd = std::move(sock);
    conn->id = ++stats_.connections;
    int rc = conn->poll.init(uv_poll_init(loop_, conn->poll.get(), conn->fd.get()));
    if (rc == 0) rc = conn->timer.init(uv_timer_init(loop_, conn->timer.get()));
    if (rc != 0) {
      spdlog::error("node protocol: libuv init: {}", uv_strerror(rc));
      continue;
    }
    connections_[conn.get()] = conn;
    conn->server = this;
    // Both handles point at the connection by raw pointer; they are stopped and closed (so no
    // callback runs again) before the connection is dropped.
    conn->poll.get()->data = conn.get();
    conn->timer.get()->data = conn.get();
    rc = uv_poll_start(conn->poll.get(), UV_READABLE | UV_DISCONNECT,
                       [](uv_poll_t* h, int status, int) {
                         auto* raw = static_cast<Connection*>(h->data);
                         ConnectionPtr c = raw->server->connections_.at(raw);
                         if (status < 0) {
                           raw->server->closeConnection(
                               c, std::string("poll: ") + uv_strerror(status), false);
                           return;
                         }
                         raw->server->onReadable(c);
                       });
    if (rc == 0)
      rc = uv_timer_start(
          conn->timer.get(),
          [](uv_timer_t* t) {
            auto* raw = static_cast<Connection*>(t->data);
            raw->server->closeConnection(raw->server->connections_.at(raw),
                                         "no hello within the timeout", true);
          },
          options_.hello_timeout_ms, 0);
    if (rc != 0) {
      spdlog::error("node protocol: libuv start: {}", uv_strerror(rc));
      closeConnection(conn, "libuv", false);
      continue;
    }
    spdlog::debug("node protocol: connection {} accepted", conn->id);
  }
}

void NodeServer::onReadable(const ConnectionPtr& conn) {
  // Bounded per wakeup; libuv calls again while more is queued.
  for (int i = 0; i < 64; i++) {
    if (connections_.count(conn.get()) == 0) return;  // closed by a callback
    nodepb::ZtunnelMessage msg;
    std::vector<UniqueFd> fds;
    std::string error;
    RecvResult r = recvNodeMessage(conn->fd.get(), &msg, &fds, &error);
    switch (r) {
      case RecvResult::kAgain:
        return;
      case RecvResult::kClosed:
        closeConnection(conn, "peer closed", false);
        return;
      case RecvResult::kError:
        closeConnection(conn, error, true);
        return;
      case RecvResult::kMessage:
        break;
    }
    if (!fds.empty()) {
      closeConnection(conn, "ztunnel sent file descriptors", true);
      return;
    }
    if (!conn->said_hello) {
      if (!msg.has_hello()) {
        closeConnection(conn, "first message is not Hello", true);
        return;
      }
      onHello(conn, msg.hello());
    } else if (msg.has_ack()) {
      onAck(conn, msg.ack());
    } else if (msg.has_certificate_request()) {
      onCertificateRequest(conn, msg.certificate_request());
    } else {
      closeConnection(conn,
                      msg.has_hello() ? "second Hello"
                                      : "message is neither Hello, Ack nor CertificateRequest",
                      true);
      return;
    }
  }
}

void NodeServer::onHello(const ConnectionPtr& conn, const nodepb::Hello& hello) {
  if (hello.protocol_version() != 1) {
    closeConnection(conn, fmt::format("unsupported protocol version {}", hello.protocol_version()),
                    true);
    return;
  }
  uv_timer_stop(conn->timer.get());
  conn->said_hello = true;
  if (active_ && active_ != conn) {
    // A restarted ztunnel: the newer connection wins.
    closeConnection(active_, "replaced by a newer ztunnel connection", false);
  }
  active_ = conn;
  stats_.ztunnel_version = hello.ztunnel_version();
  stats_.snapshot_done = false;
  spdlog::info("node protocol: ztunnel {} connected (connection {}); sending snapshot",
               hello.ztunnel_version(), conn->id);

  Outgoing cfg;
  *cfg.msg.mutable_node_config() = delegate_->nodeConfig();
  enqueue(*conn, std::move(cfg));
  nodepb::ClusterUpdate full = delegate_->fullClusterUpdate();
  full.set_full(true);
  for (auto& piece : splitClusterUpdate(full, options_.max_update_bytes)) {
    Outgoing o;
    *o.msg.mutable_cluster_update() = std::move(piece);
    enqueue(*conn, std::move(o));
  }
  for (SnapshotWorkload& w : delegate_->snapshotWorkloads()) {
    Outgoing o;
    *o.msg.mutable_add_workload()->mutable_workload() = w.workload;
    int dup = w.netns_fd >= 0 ? ::fcntl(w.netns_fd, F_DUPFD_CLOEXEC, 0) : -1;
    if (dup < 0) {
      AckResult res{AckResult::kRejected, "cannot pass the pod's netns: " + errnoText(errno)};
      if (w.on_ack) w.on_ack(res);
      continue;
    }
    o.fds.emplace_back(dup);
    o.on_ack = std::move(w.on_ack);
    enqueue(*conn, std::move(o));
  }
  Outgoing done;
  done.msg.mutable_snapshot_sent();
  enqueue(*conn, std::move(done));
  pump(conn);
}

void NodeServer::onCertificateRequest(const ConnectionPtr& conn,
                                      const nodepb::CertificateRequest& req) {
  // Only the active ztunnel gets certificates; a replaced connection is about to close.
  if (conn != active_) return;
  stats_.certificate_requests++;
  // Bound what one ztunnel can queue: each answer waits its turn behind the one in flight.
  constexpr size_t kMaxQueued = 4096;
  nodepb::CertificateResponse resp;
  if (conn->queue.size() >= kMaxQueued) {
    resp.set_error("agent busy: too many queued messages");
  } else if (!signer_) {
    resp.set_error("this agent has no certificate authority");
  } else {
    resp = signer_(req);
  }
  resp.set_request_id(req.id());
  if (!resp.error().empty()) {
    stats_.certificate_errors++;
    spdlog::warn("node protocol: certificate request {} for {} refused: {}", req.id(),
                 req.identity().substr(0, 300), resp.error());
  }
  Outgoing o;
  *o.msg.mutable_certificate_response() = std::move(resp);
  enqueue(*conn, std::move(o));
  pump(conn);
}

void NodeServer::onAck(const ConnectionPtr& conn, const nodepb::Ack& ack) {
  if (!conn->in_flight || ack.id() != conn->in_flight->msg.id()) {
    closeConnection(conn,
                    conn->in_flight ? fmt::format("ack for id {} while {} is in flight", ack.id(),
                                                  conn->in_flight->msg.id())
                                    : fmt::format("ack for id {} with nothing in flight", ack.id()),
                    true);
    return;
  }
  uv_timer_stop(conn->timer.get());
  Outgoing done = std::move(*conn->in_flight);
  conn->in_flight.reset();
  const char* what = payloadName(done.msg);
  if (!ack.error().empty()) {
    spdlog::warn("node protocol: ztunnel rejected {} {}: {}", what, done.msg.id(), ack.error());
    if (done.msg.has_add_workload()) stats_.rejected_workloads++;
  } else {
    spdlog::debug("node protocol: {} {} acked", what, done.msg.id());
  }
  if (done.msg.has_snapshot_sent() && conn == active_) {
    stats_.snapshot_done = true;
    spdlog::info("node protocol: snapshot acked by the ztunnel");
  }
  if (done.on_ack) {
    AckResult res;
    res.kind = ack.error().empty() ? AckResult::kApplied : AckResult::kRejected;
    res.error = ack.error();
    done.on_ack(res);
  }
  pump(conn);
}

void NodeServer::enqueue(Connection& conn, Outgoing out) { conn.queue.push_back(std::move(out)); }

void NodeServer::pump(const ConnectionPtr& conn) {
  if (connections_.count(conn.get()) == 0 || conn->in_flight || conn->queue.empty()) return;
  Outgoing out = std::move(conn->queue.front());
  conn->queue.pop_front();
  out.msg.set_id(next_id_++);
  std::vector<int> raw;
  for (auto& fd : out.fds) raw.push_back(fd.get());
  Status s = sendNodeMessage(conn->fd.get(), out.msg, raw);
  // The kernel holds its own references to sent fds.
  out.fds.clear();
  conn->in_flight = std::move(out);
  if (!s) {
    closeConnection(conn, "send: " + s.message(), false);
    return;
  }
  stats_.messages_sent++;
  int rc = uv_timer_start(
      conn->timer.get(),
      [](uv_timer_t* t) {
        auto* raw = static_cast<Connection*>(t->data);
        raw->server->stats_.ack_timeouts++;
        raw->server->closeConnection(raw->server->connections_.at(raw),
                                     "no ack within the timeout", true);
      },
      options_.ack_timeout_ms, 0);
  if (rc != 0) spdlog::warn("node protocol: ack timer: {}", uv_strerror(rc));
}

bool NodeServer::sendClusterUpdate(nodepb::ClusterUpdate update) {
  if (!active_) return false;
  update.set_full(false);
  ConnectionPtr conn = active_;
  for (auto& piece : splitClusterUpdate(update, options_.max_update_bytes)) {
    Outgoing o;
    *o.msg.mutable_cluster_update() = std::move(piece);
    enqueue(*conn, std::move(o));
  }
  pump(conn);
  return true;
}

bool NodeServer::addWorkload(const nodepb::Workload& workload, int netns_fd, AckCallback on_ack) {
  if (!active_) return false;
  int dup = ::fcntl(netns_fd, F_DUPFD_CLOEXEC, 0);
  if (dup < 0) {
    if (on_ack) on_ack({AckResult::kRejected, "cannot pass the pod's netns: " + errnoText(errno)});
    return true;
  }
  ConnectionPtr conn = active_;
  Outgoing o;
  *o.msg.mutable_add_workload()->mutable_workload() = workload;
  o.fds.emplace_back(dup);
  o.on_ack = std::move(on_ack);
  enqueue(*conn, std::move(o));
  pump(conn);
  return true;
}

bool NodeServer::delWorkload(const std::string& uid) {
  if (!active_) return false;
  ConnectionPtr conn = active_;
  Outgoing o;
  o.msg.mutable_del_workload()->set_uid(uid);
  enqueue(*conn, std::move(o));
  pump(conn);
  return true;
}

void NodeServer::closeConnection(ConnectionPtr conn, const std::string& why,
                                 bool protocol_error) {
  auto it = connections_.find(conn.get());
  if (it == connections_.end()) return;
  connections_.erase(it);
  if (protocol_error) {
    stats_.protocol_errors++;
    spdlog::warn("node protocol: closing connection {}: {}", conn->id, why);
  } else {
    spdlog::info("node protocol: connection {} closed: {}", conn->id, why);
  }
  // Closing stops both handles: no callback will look at this connection again.
  conn->poll.close();
  conn->timer.close();
  conn->fd.reset();
  std::vector<AckCallback> pending;
  if (conn->in_flight && conn->in_flight->on_ack) pending.push_back(conn->in_flight->on_ack);
  for (auto& o : conn->queue)
    if (o.on_ack) pending.push_back(o.on_ack);
  conn->in_flight.reset();
  conn->queue.clear();
  bool was_active = conn == active_;
  if (was_active) {
    active_.reset();
    stats_.snapshot_done = false;
  }
  // While the server itself shuts down its owner may already be half gone: no callbacks then.
  if (closed_) return;
  for (auto& cb : pending) cb({AckResult::kDisconnected, "ztunnel disconnected: " + why});
  if (was_active) delegate_->onZtunnelDisconnected();
}

}  // namespace weft::agent
