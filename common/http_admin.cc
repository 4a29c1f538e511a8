// The admin HTTP/1.1 server: one bounded request per connection, answered with Content-Length
// and Connection: close, over libuv TCP or unix-socket listeners.
#include "common/http_admin.h"

#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <unordered_set>

#include "common/uv_handle.h"

namespace weft {
namespace {

const char* reasonPhrase(int status) {
  switch (status) {
    case 200: return "OK";
    case 201: return "Created";
    case 204: return "No Content";
    case 400: return "Bad Request";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 413: return "Payload Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    default: return "Unknown";
  }
}

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(tolower(static_cast<unsigned char>(c)));
  return out;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

bool isTokenChar(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
         strchr("!#$%&'*+-.^_`|~", c) != nullptr;
}

// What parsing the bytes received so far says.
enum class ParseState { kNeedMore, kComplete, kBad };

// Parses a request head (and body, by Content-Length) out of `in`. `error` says why on kBad.
ParseState parseRequest(const std::string& in, HttpRequest* req, std::string* error) {
  size_t head_end = in.find("\r\n\r\n");
  if (head_end == std::string::npos) {
    if (in.size() >= kMaxAdminRequestBytes) {
      *error = "request head too large";
      return ParseState::kBad;
    }
    return ParseState::kNeedMore;
  }
  std::string_view head(in.data(), head_end);
  size_t line_end = head.find("\r\n");
  std::string_view line = head.substr(0, line_end);
  // Request line: METHOD SP target SP HTTP/1.x
  size_t sp1 = line.find(' ');
  size_t sp2 = sp1 == std::string_view::npos ? sp1 : line.find(' ', sp1 + 1);
  if (sp1 == std::string_view::npos || sp2 == std::string_view::npos || sp1 == 0) {
    *error = "malformed request line";
    return ParseState::kBad;
  }
  std::string_view method = line.substr(0, sp1);
  std::string_view target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  std::string_view version = line.substr(sp2 + 1);
  for (char c : method) {
    if (!isTokenChar(c)) {
      *error = "malformed method";
      return ParseState::kBad;
    }
  }
  if (version != "HTTP/1.1" && version != "HTTP/1.0") {
    *error = "unsupported HTTP version";
    return ParseState::kBad;
  }
  if (target.empty() || target.front() != '/') {
    *error = "request target must be an absolute path";
    return ParseState::kBad;
  }
  for (char c : target) {
    if (static_cast<unsigned char>(c) <= 0x20 || c == 0x7f) {
      *error = "malformed request target";
      return ParseState::kBad;
    }
  }
  size_t content_length = 0;
  bool have_length = false;
  std::string_view rest =
      line_end == std::string_view::npos ? std::string_view() : head.substr(line_end + 2);
  while (!rest.empty()) {
    size_t e = rest.find("\r\n");
    std::string_view h = rest.substr(0, e);
    rest = e == std::string_view::npos ? std::string_view() : rest.substr(e + 2);
    size_t colon = h.find(':');
    if (colon == std::string_view::npos || colon == 0) {
      *error = "malformed header line";
      return ParseState::kBad;
    }
    for (char c : h.substr(0, colon)) {
      if (!isTokenChar(c)) {
        *error = "malformed header name";
        return ParseState::kBad;
      }
    }
    std::string name = lower(h.substr(0, colon));
    std::string_view value = trim(h.substr(colon + 1));
    if (name == "content-length") {
      size_t v = 0;
      auto [p, ec] = std::from_chars(value.data(), value.data() + value.size(), v);
      if (ec != std::errc() || p != value.data() + value.size() || value.empty() ||
          (have_length && v != content_length)) {
        *error = "bad Content-Length";
        return ParseState::kBad;
      }
      have_length = true;
      content_length = v;
    } else if (name == "transfer-encoding") {
      // Admin clients send small bodies with a length; chunked bodies are not accepted.
      *error = "Transfer-Encoding not supported";
      return ParseState::kBad;
    }
  }
  size_t body_start = head_end + 4;
  if (content_length > kMaxAdminRequestBytes - body_start) {
    *error = "request body too large";
    return ParseState::kBad;
  }
  if (in.size() < body_start + content_length) return ParseState::kNeedMore;
  req->method = std::string(method);
  size_t q = target.find('?');
  req->path = std::string(target.substr(0, q));
  req->query = q == std::string_view::npos ? "" : std::string(target.substr(q + 1));
  req->body = in.substr(body_start, content_length);
  return ParseState::kComplete;
}

std::string renderResponse(const HttpResponse& r) {
  return fmt::format(
      "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
      r.status, reasonPhrase(r.status), r.content_type, r.body.size(), r.body);
}

std::string renderStreamHead(const HttpResponse& r) {
  return fmt::format(
      "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nTransfer-Encoding: chunked\r\n"
      "Cache-Control: no-cache\r\nConnection: close\r\n\r\n",
      r.status, reasonPhrase(r.status), r.content_type);
}

class Server;
class AdminConnection;

// The writer of a streaming response; it outlives the connection (the producer may hold it),
// so it points back only while the connection is open.
class StreamWriter : public HttpStreamWriter {
 public:
  StreamWriter(AdminConnection* conn, size_t max_queued) : conn_(conn), max_queued_(max_queued) {}
  bool write(std::string_view data) override;
  void finish() override;
  bool closed() const override { return conn_ == nullptr || finished_; }
  size_t queuedBytes() const override { return queued_; }
  void onClose(std::function<void()> cb) override {
    if (conn_ == nullptr) {
      if (cb) cb();
      return;
    }
    on_close_ = std::move(cb);
  }

  // Called by the connection.
  void detach() {
    if (conn_ == nullptr) return;
    conn_ = nullptr;
    if (auto cb = std::move(on_close_)) cb();
  }
  void written(size_t n) { queued_ -= std::min(queued_, n); }

 private:
  AdminConnection* conn_;
  size_t max_queued_;
  size_t queued_ = 0;
  bool finished_ = false;
  std::function<void()> on_close_;
};

// One accepted client. Deletes itself once its stream and timer are both closed.
class AdminConnection {
 public:
  AdminConnection(Server* server, uint64_t timeout_ms)
      : server_(server), timeout_ms_(timeout_ms) {}

  uv_stream_t* stream() { return reinterpret_cast<uv_stream_t*>(&stream_); }
  uv_tcp_t* tcp() { return &stream_.tcp; }
  uv_pipe_t* pipe() { return &stream_.pipe; }

  // Called right after the stream handle was initialized and accepted into.
  void start(uv_loop_t* loop);
  // Starts closing both handles; safe to call more than once.
  void close();
  void detachServer() { server_ = nullptr; }
  // Streaming: queues bytes for the client (owned until written); `last` closes afterwards.
  bool queueWrite(std::string data, bool last);

 private:
  void onRead(ssize_t nread, const uv_buf_t* buf);
  void respond(const HttpResponse& r);
  void onWritten(int status);
  void onClosed();

  union {
    uv_tcp_t tcp;
    uv_pipe_t pipe;
  } stream_{};
  uv_timer_t timer_{};
  uv_write_t write_req_{};
  uv_shutdown_t shutdown_req_{};
  Server* server_;
  uint64_t timeout_ms_;
  bool timer_init_ = false;
  bool responded_ = false;
  bool closing_ = false;
  int open_handles_ = 1;  // the stream; +1 once the timer is initialized
  std::string in_;
  std::string out_;
  char read_buf_[16 * 1024];
  std::shared_ptr<StreamWriter> writer_;  // set for a streaming response
};

class Server : public HttpAdminServer {
 public:
  Server(uv_loop_t* loop, HttpHandler handler, uint64_t timeout_ms, bool is_pipe)
      : loop_(loop), handler_(std::move(handler)), timeout_ms_(timeout_ms), is_pipe_(is_pipe) {}
  ~Server() override {
    for (AdminConnection* c : conns_) {
      c->detachServer();
      c->close();
    }
    if (!unix_path_.empty()) ::unlink(unix_path_.c_str());
  }

  Status listenTcp(const SocketAddress& addr) {
    int rc = tcp_.init(uv_tcp_init(loop_, tcp_.get()));
    if (rc != 0) return Status::errorf("uv_tcp_init: {}", uv_strerror(rc));
    tcp_.get()->data = this;
    sockaddr_storage ss;
    addr.toSockaddr(&ss);
    rc = uv_tcp_bind(tcp_.get(), reinterpret_cast<sockaddr*>(&ss), 0);
    if (rc != 0) return Status::errorf("bind {}: {}", addr.toString(), uv_strerror(rc));
    rc = uv_listen(tcp_.stream(), 128, onConnection);
    if (rc != 0) return Status::errorf("listen {}: {}", addr.toString(), uv_strerror(rc));
    sockaddr_storage bound{};
    int len = sizeof(bound);
    rc = uv_tcp_getsockname(tcp_.get(), reinterpret_cast<sockaddr*>(&bound), &len);
    if (rc != 0) return Status::errorf("getsockname {}: {}", addr.toString(), uv_strerror(rc));
    auto b = SocketAddress::fromSockaddr(reinterpret_cast<sockaddr*>(&bound), len);
    if (b) bound_ = *b;
    return Status::ok();
  }

  Status listenUnix(const std::string& path) {
    struct stat st;
    if (::lstat(path.c_str(), &st) == 0) {
      if (!S_ISSOCK(st.st_mode))
        return Status::errorf("{}: exists and is not a socket", path);
      if (::unlink(path.c_str()) != 0)
        return Status::errorf("unlink stale {}: {}", path, errnoText(errno));
    }
    int rc = pipe_.init(uv_pipe_init(loop_, pipe_.get(), 0));
    if (rc != 0) return Status::errorf("uv_pipe_init: {}", uv_strerror(rc));
    pipe_.get()->data = this;
    rc = uv_pipe_bind(pipe_.get(), path.c_str());
    if (rc != 0) return Status::errorf("bind {}: {}", path, uv_strerror(rc));
    unix_path_ = path;
    // Restrict before listen: until then nobody can connect.
    if (::chmod(path.c_str(), 0600) != 0)
      return Status::errorf("chmod {}: {}", path, errnoText(errno));
    rc = uv_listen(pipe_.stream(), 128, onConnection);
    if (rc != 0) return Status::errorf("listen {}: {}", path, uv_strerror(rc));
    return Status::ok();
  }

  SocketAddress boundAddress() const override { return bound_; }

  HttpResponse handle(const HttpRequest& req) { return handler_(req); }
  void forget(AdminConnection* c) { conns_.erase(c); }

 private:
  static void onConnection(uv_stream_t* listener, int status) {
    auto* self = static_cast<Server*>(listener->data);
    if (status != 0) {
      spdlog::warn("admin accept: {}", uv_strerror(status));
      return;
    }
    auto* c = new AdminConnection(self, self->timeout_ms_);
    int rc = self->is_pipe_ ? uv_pipe_init(self->loop_, c->pipe(), 0)
                            : uv_tcp_init(self->loop_, c->tcp());
    if (rc != 0) {
      spdlog::warn("admin accept init: {}", uv_strerror(rc));
      delete c;
      return;
    }
    c->stream()->data = c;
    self->conns_.insert(c);
    rc = uv_accept(listener, c->stream());
    if (rc != 0) {
      spdlog::warn("admin accept: {}", uv_strerror(rc));
      c->close();
      return;
    }
    c->start(self->loop_);
  }

  uv_loop_t* loop_;
  HttpHandler handler_;
  uint64_t timeout_ms_;
  bool is_pipe_;
  UvHandle<uv_tcp_t> tcp_;
  UvHandle<uv_pipe_t> pipe_;
  SocketAddress bound_;
  std::string unix_path_;
  std::unordered_set<AdminConnection*> conns_;
};

void AdminConnection::start(uv_loop_t* loop) {
  stream()->data = this;
  int rc = uv_timer_init(loop, &timer_);
  if (rc != 0) {
    spdlog::warn("admin timer init: {}", uv_strerror(rc));
    close();
    return;
  }
  timer_init_ = true;
  open_handles_++;
  timer_.data = this;
  rc = uv_timer_start(
      &timer_, [](uv_timer_t* t) { static_cast<AdminConnection*>(t->data)->close(); },
      timeout_ms_, 0);
  if (rc != 0) {
    spdlog::warn("admin timer start: {}", uv_strerror(rc));
    close();
    return;
  }
  rc = uv_read_start(
      stream(),
      [](uv_handle_t* h, size_t, uv_buf_t* buf) {
        auto* self = static_cast<AdminConnection*>(h->data);
        *buf = uv_buf_init(self->read_buf_, sizeof(self->read_buf_));
      },
      [](uv_stream_t* s, ssize_t nread, const uv_buf_t* buf) {
        static_cast<AdminConnection*>(s->data)->onRead(nread, buf);
      });
  if (rc != 0) {
    spdlog::warn("admin read start: {}", uv_strerror(rc));
    close();
  }
}

void AdminConnection::onRead(ssize_t nread, const uv_buf_t* buf) {
  if (nread == 0) return;
  if (nread < 0) {
    // EOF before a complete request, or after our response: done either way.
    close();
    return;
  }
  if (responded_) return;  // draining what the client still sends after our answer
  in_.append(buf->base, static_cast<size_t>(nread));
  HttpRequest req;
  std::string error;
  ParseState st = parseRequest(in_, &req, &error);
  if (st == ParseState::kNeedMore) return;
  if (st == ParseState::kBad) {
    respond(HttpResponse{400, "text/plain", error + "\n"});
    return;
  }
  if (server_ == nullptr) {
    close();
    return;
  }
  respond(server_->handle(req));
}

void AdminConnection::respond(const HttpResponse& r) {
  responded_ = true;
  in_.clear();
  in_.shrink_to_fit();
  if (r.stream) {
    // A stream lasts as long as the client wants it: no request timeout from here on.
    if (timer_init_) uv_timer_stop(&timer_);
    writer_ = std::make_shared<StreamWriter>(this, r.stream_max_queued);
    if (!queueWrite(renderStreamHead(r), false)) {
      close();
      return;
    }
    r.stream(writer_);
    return;
  }
  out_ = renderResponse(r);
  uv_buf_t b = uv_buf_init(out_.data(), static_cast<unsigned>(out_.size()));
  write_req_.data = this;
  int rc = uv_write(&write_req_, stream(), &b, 1, [](uv_write_t* w, int status) {
    static_cast<AdminConnection*>(w->data)->onWritten(status);
  });
  if (rc != 0) close();
}

void AdminConnection::onWritten(int status) {
  if (status != 0 || closing_) {
    close();
    return;
  }
  // Half-close and read to EOF (bounded by the timer) so that unread request bytes do not
  // turn our close into a reset that could destroy the response in flight.
  if (writer_ && timer_init_) {
    // A finished stream: its timer was stopped while it streamed.
    uv_timer_start(
        &timer_, [](uv_timer_t* t) { static_cast<AdminConnection*>(t->data)->close(); },
        timeout_ms_, 0);
  }
  shutdown_req_.data = this;
  int rc = uv_shutdown(&shutdown_req_, stream(), [](uv_shutdown_t* s, int st) {
    auto* self = static_cast<AdminConnection*>(s->data);
    if (st != 0) self->close();
  });
  if (rc != 0) close();
}

namespace {
// One chunk on its way to a streaming client.
struct QueuedWrite {
  uv_write_t req{};
  std::string data;
  AdminConnection* conn;
  std::shared_ptr<StreamWriter> writer;
  bool last;
};
}  // namespace

bool AdminConnection::queueWrite(std::string data, bool last) {
  if (closing_) return false;
  auto* w = new QueuedWrite{{}, std::move(data), this, writer_, last};
  w->req.data = w;
  uv_buf_t b = uv_buf_init(w->data.data(), static_cast<unsigned>(w->data.size()));
  int rc = uv_write(&w->req, stream(), &b, 1, [](uv_write_t* req, int status) {
    auto* w = static_cast<QueuedWrite*>(req->data);
    if (w->writer) w->writer->written(w->data.size());
    AdminConnection* c = w->conn;
    bool last = w->last;
    delete w;
    if (status != 0) {
      c->close();
    } else if (last) {
      c->onWritten(0);
    }
  });
  if (rc != 0) {
    delete w;
    return false;
  }
  return true;
}

bool StreamWriter::write(std::string_view data) {
  if (closed() || data.empty()) return !closed();
  if (queued_ + data.size() > max_queued_) return false;
  std::string chunk = fmt::format("{:x}\r\n", data.size());
  chunk.append(data);
  chunk += "\r\n";
  queued_ += chunk.size();
  if (!conn_->queueWrite(std::move(chunk), false)) {
    queued_ = 0;
    return false;
  }
  return true;
}

void StreamWriter::finish() {
  if (closed()) return;
  finished_ = true;
  if (!conn_->queueWrite("0\r\n\r\n", true)) conn_->close();
}

void AdminConnection::close() {
  if (closing_) return;
  closing_ = true;
  if (writer_) writer_->detach();
  if (server_ != nullptr) server_->forget(this);
  auto on_close = [](uv_handle_t* h) { static_cast<AdminConnection*>(h->data)->onClosed(); };
  uv_close(reinterpret_cast<uv_handle_t*>(stream()), on_close);
  if (timer_init_) uv_close(reinterpret_cast<uv_handle_t*>(&timer_), on_close);
}

void AdminConnection::onClosed() {
  if (--open_handles_ == 0) delete this;
}

}  // namespace

Result<std::map<std::string, std::string>> parseQuery(const std::string& query) {
  std::map<std::string, std::string> out;
  auto decode = [](std::string_view in, std::string* o) {
    for (size_t i = 0; i < in.size(); i++) {
      char c = in[i];
      if (c == '+') {
        o->push_back(' ');
      } else if (c == '%') {
        if (i + 2 >= in.size()) return false;
        int v = 0;
        auto [p, ec] = std::from_chars(in.data() + i + 1, in.data() + i + 3, v, 16);
        if (ec != std::errc() || p != in.data() + i + 3) return false;
        o->push_back(static_cast<char>(v));
        i += 2;
      } else {
        o->push_back(c);
      }
    }
    return true;
  };
  size_t start = 0;
  while (start < query.size()) {
    size_t amp = query.find('&', start);
    if (amp == std::string::npos) amp = query.size();
    std::string_view kv(query.data() + start, amp - start);
    start = amp + 1;
    if (kv.empty()) continue;
    size_t eq = kv.find('=');
    std::string k, v;
    if (!decode(kv.substr(0, eq), &k) ||
        (eq != std::string_view::npos && !decode(kv.substr(eq + 1), &v)))
      return Status::errorf("query: malformed escape in '{}'", kv);
    if (!out.emplace(k, v).second) return Status::errorf("query: '{}' given twice", k);
  }
  return out;
}

Result<std::unique_ptr<HttpAdminServer>> HttpAdminServer::listenTcp(uv_loop_t* loop,
                                                                    const SocketAddress& addr,
                                                                    HttpHandler handler,
                                                                    uint64_t timeout_ms) {
  auto s = std::make_unique<Server>(loop, std::move(handler), timeout_ms, false);
  Status st = s->listenTcp(addr);
  if (!st) return st.context("admin server");
  return std::unique_ptr<HttpAdminServer>(std::move(s));
}

Result<std::unique_ptr<HttpAdminServer>> HttpAdminServer::listenUnix(uv_loop_t* loop,
                                                                     const std::string& path,
                                                                     HttpHandler handler,
                                                                     uint64_t timeout_ms) {
  auto s = std::make_unique<Server>(loop, std::move(handler), timeout_ms, true);
  Status st = s->listenUnix(path);
  if (!st) return st.context("admin server");
  return std::unique_ptr<HttpAdminServer>(std::move(s));
}

}  // namespace weft
