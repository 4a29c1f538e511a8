// Node-protocol client: non-blocking SOCK_SEQPACKET watched with uv_poll, one message at a time.
#include "ztunnel/agent_client.h"

#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/seqpacket.h"

namespace weft::ztunnel {

AgentClient::AgentClient(uv_loop_t* loop, AgentClientOptions options, AgentHandler& handler,
                         ZtunnelStats& stats)
    : loop_(loop),
      options_(std::move(options)),
      handler_(handler),
      stats_(stats),
      backoff_ms_(options_.backoff_initial_ms) {}

AgentClient::~AgentClient() { stop(); }

Status AgentClient::start() {
  int rc = timer_.init(uv_timer_init(loop_, timer_.get()));
  if (rc != 0) return Status::errorf("agent client timer: {}", uv_strerror(rc));
  timer_.get()->data = this;
  stopped_ = false;
  tryConnect();
  return Status::ok();
}

void AgentClient::stop() {
  stopped_ = true;
  if (timer_.get() != nullptr) uv_timer_stop(timer_.get());
  if (sock_.valid()) disconnect("stopping");
}

void AgentClient::scheduleReconnect() {
  if (stopped_) return;
  uint64_t delay = backoff_ms_;
  backoff_ms_ = std::min(backoff_ms_ * 2, options_.backoff_max_ms);
  int rc = uv_timer_start(
      timer_.get(), [](uv_timer_t* t) { static_cast<AgentClient*>(t->data)->tryConnect(); },
      delay, 0);
  if (rc != 0) spdlog::error("agent reconnect timer: {}", uv_strerror(rc));  // cannot happen
}

void AgentClient::tryConnect() {
  if (stopped_ || sock_.valid()) return;
  const std::string& path = options_.socket_path;
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  if (path.size() >= sizeof(sun.sun_path)) {
    spdlog::error("agent socket path too long: {}", path);
    scheduleReconnect();
    return;
  }
  memcpy(sun.sun_path, path.c_str(), path.size() + 1);
  UniqueFd s(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!s.valid()) {
    spdlog::error("agent socket: {}", errnoText(errno));
    scheduleReconnect();
    return;
  }
  if (::connect(s.get(), reinterpret_cast<sockaddr*>(&sun), sizeof(sun)) != 0) {
    spdlog::debug("connect agent {}: {}", path, errnoText(errno));
    scheduleReconnect();
    return;
  }
  node::v1::ZtunnelMessage hello;
  hello.mutable_hello()->set_protocol_version(kNodeProtocolVersion);
  hello.mutable_hello()->set_ztunnel_version(options_.ztunnel_version);
  Status st = sendNodeMessage(s.get(), hello);
  if (!st) {
    spdlog::warn("agent {}: hello: {}", path, st.message());
    scheduleReconnect();
    return;
  }
  poll_ = std::make_unique<UvHandle<uv_poll_t>>();
  int rc = poll_->init(uv_poll_init(loop_, poll_->get(), s.get()));
  if (rc == 0) {
    poll_->get()->data = this;
    rc = uv_poll_start(poll_->get(), UV_READABLE | UV_DISCONNECT,
                       [](uv_poll_t* p, int status, int) {
                         auto* self = static_cast<AgentClient*>(p->data);
                         if (status != 0) {
                           self->disconnect(std::string("poll: ") + uv_strerror(status));
                           return;
                         }
                         self->onReadable();
                       });
  }
  if (rc != 0) {
    spdlog::error("agent poll: {}", uv_strerror(rc));
    poll_.reset();
    scheduleReconnect();
    return;
  }
  sock_ = std::move(s);
  backoff_ms_ = options_.backoff_initial_ms;
  stats_.agent_connects_total++;
  spdlog::info("connected to agent at {}", path);
  handler_.onAgentConnected();
}

void AgentClient::disconnect(const std::string& why) {
  if (!sock_.valid()) return;
  spdlog::warn("agent connection closed: {}", why);
  poll_.reset();  // uv_close stops polling at once, so the fd may be closed right after
  sock_.reset();
  stats_.agent_disconnects_total++;
  handler_.onAgentDisconnected();
  scheduleReconnect();
}

void AgentClient::onReadable() {
  // The agent waits for each ack, so a few messages per wakeup is plenty; bounded for fairness.
  for (int i = 0; i < 16 && sock_.valid(); i++) {
    node::v1::AgentMessage msg;
    std::vector<UniqueFd> fds;
    std::string error;
    RecvResult r = recvNodeMessage(sock_.get(), &msg, &fds, &error);
    if (r == RecvResult::kAgain) return;
    if (r == RecvResult::kClosed) {
      disconnect("agent closed the connection");
      return;
    }
    if (r == RecvResult::kError) {
      stats_.agent_protocol_errors_total++;
      disconnect(error);
      return;
    }
    stats_.agent_messages_total++;
    if (!handle(msg, std::move(fds))) return;
  }
}

bool AgentClient::handle(const node::v1::AgentMessage& msg, std::vector<UniqueFd> fds) {
  using node::v1::AgentMessage;
  Status st;
  switch (msg.payload_case()) {
    case AgentMessage::kNodeConfig:
      st = handler_.onNodeConfig(msg.node_config());
      break;
    case AgentMessage::kClusterUpdate:
      st = handler_.onClusterUpdate(msg.cluster_update());
      break;
    case AgentMessage::kAddWorkload:
      if (fds.size() != 1) {
        st = Status::errorf("workload {}: expected 1 netns fd, got {}",
                            msg.add_workload().workload().uid(), fds.size());
      } else {
        st = handler_.onAddWorkload(msg.add_workload().workload(), std::move(fds[0]));
      }
      break;
    case AgentMessage::kDelWorkload:
      st = handler_.onDelWorkload(msg.del_workload().uid());
      break;
    case AgentMessage::kSnapshotSent:
      st = handler_.onSnapshotSent();
      break;
    case AgentMessage::kCertificateResponse:
      st = handler_.onCertificateResponse(msg.certificate_response());
      break;
    case AgentMessage::PAYLOAD_NOT_SET:
      // A newer agent's message kind: say so instead of dropping the connection.
      st = Status::error("unknown or empty message");
      break;
  }
  if (!sock_.valid()) return false;  // a handler stopped us
  if (!st) {
    stats_.agent_message_failures_total++;
    spdlog::warn("agent message {}: {}", msg.id(), st.message());
  }
  node::v1::ZtunnelMessage ack;
  ack.mutable_ack()->set_id(msg.id());
  if (!st) ack.mutable_ack()->set_error(st.message());
  Status sent = sendNodeMessage(sock_.get(), ack);
  if (!sent) {
    disconnect("sending ack: " + sent.message());
    return false;
  }
  return true;
}

bool AgentClient::sendCertificateRequest(const node::v1::CertificateRequest& request) {
  if (!sock_.valid()) return false;
  node::v1::ZtunnelMessage msg;
  *msg.mutable_certificate_request() = request;
  Status sent = sendNodeMessage(sock_.get(), msg);
  if (!sent) {
    disconnect("sending certificate request: " + sent.message());
    return false;
  }
  return true;
}

}  // namespace weft::ztunnel
