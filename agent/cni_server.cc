// CNI socket server: bounded JSON requests from weft-cni, replies once the agent has decided.
#include "agent/cni_server.h"

#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cerrno>
#include <filesystem>

#include "common/log.h"

namespace weft::agent {

struct CniServer::Connection {
  CniServer* server = nullptr;  // null once the server is gone
  UvHandle<uv_pipe_t> pipe;
  UvHandle<uv_timer_t> timer;
  std::string request;
  bool replied = false;
};

namespace {

struct WriteReq {
  uv_write_t req{};
  std::string data;
  std::shared_ptr<void> keep;  // the connection, alive until the write finished
};

}  // namespace

Result<CniRequest> parseCniRequest(const std::string& text) {
  auto doc = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return Status::error("request is not valid JSON");
  if (!doc.is_object()) return Status::error("request is not a JSON object");
  CniRequest r;
  auto str = [&](const char* key, std::string* out) -> Status {
    auto it = doc.find(key);
    if (it == doc.end() || it->is_null()) return Status::ok();
    if (!it->is_string()) return Status::errorf("{}: must be a string", key);
    *out = it->get<std::string>();
    if (out->size() > 4096) return Status::errorf("{}: too long", key);
    return Status::ok();
  };
  for (auto [key, out] : {std::pair{"command", &r.command}, {"container_id", &r.container_id},
                          {"netns", &r.netns}, {"ifname", &r.ifname}, {"pod_name", &r.pod_name},
                          {"pod_namespace", &r.pod_namespace}, {"pod_uid", &r.pod_uid}}) {
    Status s = str(key, out);
    if (!s) return s;
  }
  if (auto ips = doc.find("pod_ips"); ips != doc.end() && !ips->is_null()) {
    if (!ips->is_array() || ips->size() > 8)
      return Status::error("pod_ips: must be a list of at most 8 IP addresses");
    for (size_t i = 0; i < ips->size(); i++) {
      const auto& e = (*ips)[i];
      auto ip = e.is_string() ? IpAddr::parse(e.get<std::string>()) : std::nullopt;
      if (!ip) return Status::errorf("pod_ips[{}]: not an IP address", i);
      bool same_family = false;
      for (const IpAddr& seen : r.pod_ips)
        same_family = same_family || seen.family() == ip->family();
      if (!same_family) r.pod_ips.push_back(*ip);  // the first of each family, like podIPs
    }
  }
  if (r.command != "ADD" && r.command != "DEL" && r.command != "CHECK")
    return Status::errorf("command: \"{}\" is not ADD, DEL or CHECK", r.command);
  if (r.pod_namespace.empty()) return Status::error("pod_namespace: required (K8S_POD_NAMESPACE)");
  if (r.pod_name.empty()) return Status::error("pod_name: required (K8S_POD_NAME)");
  if (r.command != "DEL" && r.netns.empty()) return Status::error("netns: required (CNI_NETNS)");
  if (!r.netns.empty() && r.netns[0] != '/')
    return Status::error("netns: must be an absolute path");
  return r;
}

std::string cniResponseJson(const CniResponse& r) {
  nlohmann::json j;
  j["ok"] = r.ok;
  if (!r.ok) {
    j["code"] = r.code;
    j["msg"] = r.msg;
    j["details"] = r.details;
  }
  return j.dump();
}

CniServer::CniServer(uv_loop_t* loop, CniHandler handler, uint64_t read_timeout_ms)
    : loop_(loop), handler_(std::move(handler)), read_timeout_ms_(read_timeout_ms) {}

CniServer::~CniServer() {
  for (auto& [raw, conn] : connections_) {
    conn->server = nullptr;
    conn->pipe.close();
    conn->timer.close();
  }
  connections_.clear();
  listener_.close();
}

Result<std::unique_ptr<CniServer>> CniServer::listen(uv_loop_t* loop, const std::string& path,
                                                     CniHandler handler,
                                                     uint64_t read_timeout_ms) {
  std::unique_ptr<CniServer> server(new CniServer(loop, std::move(handler), read_timeout_ms));
  Status s = server->start(path);
  if (!s) return s.context("CNI socket " + path);
  return server;
}

Status CniServer::start(const std::string& path) {
  std::error_code ec;
  auto parent = std::filesystem::path(path).parent_path();
  if (!parent.empty()) std::filesystem::create_directories(parent, ec);
  if (ec) return Status::errorf("mkdir {}: {}", parent.string(), ec.message());
  if (::unlink(path.c_str()) != 0 && errno != ENOENT)
    return Status::errorf("unlink: {}", errnoText(errno));
  int rc = listener_.init(uv_pipe_init(loop_, listener_.get(), 0));
  if (rc != 0) return Status::errorf("uv_pipe_init: {}", uv_strerror(rc));
  listener_.get()->data = this;
  rc = uv_pipe_bind(listener_.get(), path.c_str());
  if (rc != 0) return Status::errorf("bind: {}", uv_strerror(rc));
  if (::chmod(path.c_str(), 0600) != 0) return Status::errorf("chmod: {}", errnoText(errno));
  rc = uv_listen(listener_.stream(), 64, [](uv_stream_t* s, int status) {
    auto* self = static_cast<CniServer*>(s->data);
    if (status < 0) {
      spdlog::warn("CNI listener: {}", uv_strerror(status));
      return;
    }
    self->onConnection();
  });
  if (rc != 0) return Status::errorf("listen: {}", uv_strerror(rc));
  spdlog::info("CNI: listening on {}", path);
  return Status::ok();
}

void CniServer::onConnection() {
  auto conn = std::make_shared<Connection>();
  conn->server = this;
  int rc = conn->pipe.init(uv_pipe_init(loop_, conn->pipe.get(), 0));
  if (rc == 0) rc = uv_accept(listener_.stream(), conn->pipe.stream());
  if (rc == 0) rc = conn->timer.init(uv_timer_init(loop_, conn->timer.get()));
  if (rc != 0) {
    spdlog::warn("CNI accept: {}", uv_strerror(rc));
    return;
  }
  connections_[conn.get()] = conn;
  conn->pipe.get()->data = conn.get();
  conn->timer.get()->data = conn.get();
  rc = uv_timer_start(
      conn->timer.get(),
      [](uv_timer_t* t) {
        auto* c = static_cast<Connection*>(t->data);
        spdlog::warn("CNI: request not complete within the timeout; closing");
        c->server->bad_requests_++;
        c->server->drop(c);
      },
      read_timeout_ms_, 0);
  if (rc == 0)
    rc = uv_read_start(
        conn->pipe.stream(),
        [](uv_handle_t*, size_t suggested, uv_buf_t* buf) {
          buf->base = new char[suggested];
          buf->len = suggested;
        },
        [](uv_stream_t* s, ssize_t n, const uv_buf_t* buf) {
          std::unique_ptr<char[]> owned(buf->base);
          auto* c = static_cast<Connection*>(s->data);
          CniServer* self = c->server;
          auto it = self->connections_.find(c);
          if (it == self->connections_.end()) return;
          std::shared_ptr<Connection> conn = it->second;
          if (n == UV_EOF) {
            uv_read_stop(s);
            uv_timer_stop(conn->timer.get());
            self->onRequestComplete(conn);
            return;
          }
          if (n < 0) {
            spdlog::debug("CNI read: {}", uv_strerror(static_cast<int>(n)));
            self->drop(c);
            return;
          }
          if (conn->request.size() + static_cast<size_t>(n) > kMaxCniRequestBytes) {
            uv_read_stop(s);
            uv_timer_stop(conn->timer.get());
            self->bad_requests_++;
            self->finish(conn, CniResponse::error(kCniErrDecode, "request too large",
                                                  "limit is 65536 bytes"));
            return;
          }
          conn->request.append(buf->base, static_cast<size_t>(n));
        });
  if (rc != 0) {
    spdlog::warn("CNI: libuv: {}", uv_strerror(rc));
    drop(conn.get());
  }
}

void CniServer::onRequestComplete(const std::shared_ptr<Connection>& conn) {
  requests_++;
  auto req = parseCniRequest(conn->request);
  if (!req) {
    bad_requests_++;
    spdlog::warn("CNI: bad request: {}", req.status().message());
    finish(conn, CniResponse::error(req.status().message().find("JSON") != std::string::npos
                                        ? kCniErrDecode
                                        : kCniErrInvalidRequest,
                                    "bad request", req.status().message()));
    return;
  }
  spdlog::info("CNI {} {}/{} netns={} container={}", req->command, req->pod_namespace,
               req->pod_name, req->netns, req->container_id);
  std::weak_ptr<Connection> weak = conn;
  handler_(req.value(), [weak](const CniResponse& resp) {
    auto c = weak.lock();
    if (!c || c->server == nullptr) return;  // the client went away or the agent stops
    c->server->finish(c, resp);
  });
}

void CniServer::finish(const std::shared_ptr<Connection>& conn, const CniResponse& response) {
  if (conn->replied) return;
  conn->replied = true;
  auto* w = new WriteReq;
  w->data = cniResponseJson(response) + "\n";
  w->keep = conn;
  w->req.data = w;
  uv_buf_t buf = uv_buf_init(w->data.data(), static_cast<unsigned>(w->data.size()));
  int rc = uv_write(&w->req, conn->pipe.stream(), &buf, 1, [](uv_write_t* req, int status) {
    std::unique_ptr<WriteReq> w(static_cast<WriteReq*>(req->data));
    auto* c = static_cast<Connection*>(w->keep.get());
    if (status < 0 && status != UV_ECANCELED)
      spdlog::debug("CNI reply: {}", uv_strerror(status));
    if (c->server) c->server->drop(c);
  });
  if (rc != 0) {
    spdlog::debug("CNI reply: {}", uv_strerror(rc));
    delete w;
    drop(conn.get());
  }
}

void CniServer::drop(Connection* conn) {
  auto it = connections_.find(conn);
  if (it == connections_.end()) return;
  std::shared_ptr<Connection> keep = it->second;
  connections_.erase(it);
  keep->pipe.close();
  keep->timer.close();
}

}  // namespace weft::agent
