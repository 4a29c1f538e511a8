// Access-log lines (text like Istio's ztunnel, or JSON) and their non-blocking writer.
#include "ztunnel/access_log.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <cerrno>
#include <ctime>

#include <nlohmann/json.hpp>

namespace weft::ztunnel {

const char* accessLogFormatName(AccessLogFormat f) {
  return f == AccessLogFormat::kJson ? "json" : "text";
}

std::optional<AccessLogFormat> parseAccessLogFormat(const std::string& s) {
  if (s == "text") return AccessLogFormat::kText;
  if (s == "json") return AccessLogFormat::kJson;
  return std::nullopt;
}

namespace {

std::string isoTime(int64_t ms) {
  time_t secs = static_cast<time_t>(ms / 1000);
  struct tm tm {};
  gmtime_r(&secs, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%S", &tm);
  return fmt::format("{}.{:03d}Z", buf, static_cast<int>(ms % 1000));
}

// A string value, always quoted, with \ " and control characters escaped (one line per record).
std::string quoteValue(const std::string& v) {
  std::string out = "\"";
  for (unsigned char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20 || c == 0x7f) out += fmt::format("\\x{:02x}", c);
    else out += static_cast<char>(c);
  }
  return out + "\"";
}

}  // namespace

std::string formatAccessLog(const AccessLogRecord& r, AccessLogFormat format) {
  bool failed = !r.error.empty();
  auto addr = [](const SocketAddress& a) { return a.family() ? a.toString() : std::string(); };
  std::string duration = fmt::format("{}ms", r.duration_ms);
  if (format == AccessLogFormat::kJson) {
    auto str = [](const std::string& s) {
      return s.empty() ? nlohmann::json(nullptr) : nlohmann::json(s);
    };
    nlohmann::json j = {
        {"time", isoTime(r.time_ms)},
        {"level", failed ? "error" : "info"},
        {"scope", "access"},
        {"message", "connection complete"},
        {"conn_id", r.connection_id},
        {"src.addr", str(addr(r.src_addr))},
        {"src.workload", str(r.src_workload)},
        {"src.namespace", str(r.src_namespace)},
        {"src.identity", str(r.src_identity)},
        {"dst.addr", str(addr(r.dst_addr))},
        {"dst.hbone_addr", str(addr(r.dst_hbone_addr))},
        {"dst.service", str(r.dst_service)},
        {"dst.workload", str(r.dst_workload)},
        {"dst.namespace", str(r.dst_namespace)},
        {"dst.identity", str(r.dst_identity)},
        {"direction", r.direction},
        {"path", r.path},
        {"bytes_sent", r.bytes_sent},
        {"bytes_recv", r.bytes_recv},
        {"duration", duration},
        {"response_flags", r.response_flags.empty() ? "-" : r.response_flags},
        {"error", str(r.error)},
    };
    // Invalid UTF-8 (a name from the network) is replaced, never thrown on.
    return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  }
  // Istio ztunnel's text layout: time, level, target and message separated by tabs, then the
  // fields; strings quoted, addresses and numbers bare, absent fields left out.
  std::string out = fmt::format("{}\t{}\taccess\tconnection complete\tconn_id={}",
                                isoTime(r.time_ms), failed ? "error" : "info", r.connection_id);
  auto field = [&out](const char* key, const std::string& v, bool quote) {
    if (v.empty()) return;
    out += ' ';
    out += key;
    out += '=';
    out += quote ? quoteValue(v) : v;
  };
  field("src.addr", addr(r.src_addr), false);
  field("src.workload", r.src_workload, true);
  field("src.namespace", r.src_namespace, true);
  field("src.identity", r.src_identity, true);
  field("dst.addr", addr(r.dst_addr), false);
  field("dst.hbone_addr", addr(r.dst_hbone_addr), false);
  field("dst.service", r.dst_service, true);
  field("dst.workload", r.dst_workload, true);
  field("dst.namespace", r.dst_namespace, true);
  field("dst.identity", r.dst_identity, true);
  field("direction", r.direction, true);
  field("path", r.path, true);
  out += fmt::format(" bytes_sent={} bytes_recv={} duration={}", r.bytes_sent, r.bytes_recv,
                     quoteValue(duration));
  if (failed) {
    field("response_flags", r.response_flags, true);
    field("error", r.error, true);
  }
  out += '\n';
  return out;
}

// The writer. Lines go into `pending`; one uv_fs_write of a batch is in flight at a time (the
// thread pool does the blocking write). It outlives the AccessLog when a write is in flight at
// destruction and deletes itself once that write returns.
struct AccessLog::Impl {
  uv_loop_t* loop = nullptr;
  uint64_t flush_delay_ms = 0;
  size_t flush_bytes = 0;
  uv_timer_t* timer = nullptr;  // the gathering delay; closed (and freed) with the AccessLog
  bool timer_armed = false;
  std::string sink;
  int fd = -1;
  bool own_fd = false;
  AccessLogFormat format = AccessLogFormat::kText;
  size_t max_buffered = 0;

  std::string pending;
  uint64_t pending_lines = 0;
  std::string inflight;
  size_t inflight_off = 0;
  uint64_t inflight_lines = 0;
  uv_fs_t req{};
  bool busy = false;
  bool orphaned = false;  // the AccessLog is gone
  AccessLogStats stats;

  void push(std::string line) {
    // A full buffer that is only waiting for the gathering delay goes out now instead.
    if (pending.size() + line.size() > max_buffered && !busy) kick();
    if (pending.size() + line.size() > max_buffered) {
      stats.dropped++;
      if (stats.dropped == 1 || stats.dropped % 1000 == 0)
        spdlog::warn("access log {}: sink not keeping up, {} lines dropped so far", sink,
                     stats.dropped);
      return;
    }
    pending += line;
    pending_lines++;
    if (busy) return;  // onWritten takes what gathered meanwhile
    if (timer == nullptr || pending.size() >= flush_bytes) return kick();
    if (!timer_armed) {
      timer_armed = uv_timer_start(timer, onTimer, flush_delay_ms, 0) == 0;
      if (!timer_armed) kick();
    }
  }
  static void onTimer(uv_timer_t* t) {
    auto* self = static_cast<Impl*>(t->data);
    self->timer_armed = false;
    self->kick();
  }
  void closeTimer() {
    if (timer == nullptr) return;
    uv_timer_stop(timer);
    uv_close(reinterpret_cast<uv_handle_t*>(timer),
             [](uv_handle_t* h) { delete reinterpret_cast<uv_timer_t*>(h); });
    timer = nullptr;
    timer_armed = false;
  }

  void kick() {
    if (busy || pending.empty()) return;
    if (timer_armed) {
      uv_timer_stop(timer);
      timer_armed = false;
    }
    inflight.swap(pending);
    pending.clear();
    inflight_lines = pending_lines;
    pending_lines = 0;
    inflight_off = 0;
    submit();
  }

  void submit() {
    busy = true;
    req.data = this;
    uv_buf_t b = uv_buf_init(inflight.data() + inflight_off,
                             static_cast<unsigned>(inflight.size() - inflight_off));
    int rc = uv_fs_write(loop, &req, fd, &b, 1, -1, onWritten);
    if (rc < 0) {
      uv_fs_req_cleanup(&req);
      failed(rc);
      busy = false;
    }
  }

  void failed(int64_t err) {
    stats.write_errors++;
    stats.dropped += inflight_lines;
    if (stats.write_errors == 1 || stats.write_errors % 100 == 0)
      spdlog::warn("access log {}: write failed: {} ({} failures, {} lines dropped so far)",
                   sink, uv_strerror(static_cast<int>(err)), stats.write_errors, stats.dropped);
    inflight.clear();
    inflight_lines = 0;
  }

  static void onWritten(uv_fs_t* r) {
    auto* self = static_cast<Impl*>(r->data);
    ssize_t n = r->result;
    uv_fs_req_cleanup(r);
    if (n < 0) {
      self->failed(n);
    } else if (self->inflight_off + static_cast<size_t>(n) < self->inflight.size()) {
      self->inflight_off += static_cast<size_t>(n);  // a short write: the rest goes next
      if (n > 0 && !self->orphaned) return self->submit();
      if (n == 0) self->failed(UV_EIO);
    } else {
      self->stats.lines += self->inflight_lines;
      self->inflight.clear();
      self->inflight_lines = 0;
    }
    self->busy = false;
    if (self->orphaned) return self->finish();
    self->kick();
  }

  // Last words: what is left goes out with plain blocking writes (bounded: stop at the first
  // error), then the file is closed and this deleted.
  void finish() {
    std::string rest = inflight.substr(std::min(inflight_off, inflight.size())) + pending;
    size_t off = 0;
    while (off < rest.size()) {
      ssize_t n = ::write(fd, rest.data() + off, rest.size() - off);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        stats.write_errors++;
        break;
      }
      off += static_cast<size_t>(n);
    }
    if (own_fd && fd >= 0) ::close(fd);
    delete this;
  }
};

Result<std::unique_ptr<AccessLog>> AccessLog::open(uv_loop_t* loop, const AccessLogOptions& o) {
  if (o.sink.empty() || o.sink == "off") return std::unique_ptr<AccessLog>();
  auto impl = std::make_unique<Impl>();
  impl->loop = loop;
  impl->sink = o.sink;
  impl->format = o.format;
  impl->max_buffered = o.max_buffered;
  impl->flush_delay_ms = o.flush_delay_ms;
  impl->flush_bytes = o.flush_bytes;
  if (o.sink == "stderr") {
    impl->fd = STDERR_FILENO;
  } else {
    impl->fd = ::open(o.sink.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
    if (impl->fd < 0) return Status::errorf("access log {}: {}", o.sink, errnoText(errno));
    impl->own_fd = true;
  }
  if (o.flush_delay_ms > 0) {
    auto* t = new uv_timer_t{};
    int rc = uv_timer_init(loop, t);
    if (rc != 0) {
      delete t;
      if (impl->own_fd) ::close(impl->fd);
      return Status::errorf("access log {}: uv_timer_init: {}", o.sink, uv_strerror(rc));
    }
    t->data = impl.get();
    impl->timer = t;
  }
  return std::unique_ptr<AccessLog>(new AccessLog(impl.release()));
}

AccessLog::~AccessLog() {
  impl_->closeTimer();  // what it was gathering goes out below or after the write in flight
  impl_->orphaned = true;
  if (!impl_->busy) impl_->finish();
}

void AccessLog::write(const AccessLogRecord& r) { impl_->push(formatAccessLog(r, impl_->format)); }
AccessLogFormat AccessLog::format() const { return impl_->format; }
void AccessLog::setFormat(AccessLogFormat f) { impl_->format = f; }
const std::string& AccessLog::sink() const { return impl_->sink; }
AccessLogStats AccessLog::stats() const { return impl_->stats; }

}  // namespace weft::ztunnel
