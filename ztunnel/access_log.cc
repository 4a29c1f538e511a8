// Access-log lines (text like Istio's ztunnel, or JSON) and their non-blocking writer.
#include "ztunnel/access_log.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
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

// The writer. Lines go into `pending`; one batch is in flight at a time, written by a
// uv_queue_work job on the thread pool (blocking writes; a file sink is first checked for
// rotation and reopened there, so the batch goes to the new file whole). While `busy`, the job
// owns fd, inflight and inflight_off; the loop touches only the rest. The Impl outlives the
// AccessLog when a job is in flight at destruction and deletes itself once that job returns.
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
  uint64_t reopen_check_ms = 0;
  uint64_t last_check_ms = 0;    // uv_now() of the last rotation check
  bool reopen_requested = false;  // reopen(): the next job reopens unconditionally
  bool reopen_failing = false;    // the error was logged; logged again only after a success

  std::string pending;
  uint64_t pending_lines = 0;
  std::string inflight;
  size_t inflight_off = 0;
  uint64_t inflight_lines = 0;
  uv_work_t work{};
  bool busy = false;
  bool orphaned = false;  // the AccessLog is gone
  AccessLogStats stats;
  // The job's orders and results (handed over by uv_queue_work's before/after ordering).
  bool job_check = false, job_force = false;
  bool job_reopened = false;
  int job_reopen_errno = 0, job_write_errno = 0;

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
    if (busy) return;  // onDone takes what gathered meanwhile
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

  bool checkDue() const {
    return own_fd && reopen_check_ms > 0 && uv_now(loop) - last_check_ms >= reopen_check_ms;
  }

  void requestReopen() {
    if (!own_fd) return;
    reopen_requested = true;
    kick();  // at once when idle (a job with no lines); else right after the job in flight
  }

  void kick() {
    if (busy || (pending.empty() && !reopen_requested)) return;
    if (timer_armed) {
      uv_timer_stop(timer);
      timer_armed = false;
    }
    job_force = reopen_requested;
    reopen_requested = false;
    job_check = checkDue();
    if (job_check || job_force) last_check_ms = uv_now(loop);
    inflight.swap(pending);
    pending.clear();
    inflight_lines = pending_lines;
    pending_lines = 0;
    inflight_off = 0;
    submit();
  }

  void submit() {
    busy = true;
    work.data = this;
    int rc = uv_queue_work(loop, &work, doWork, onDone);
    if (rc < 0) {
      busy = false;
      reopen_requested = reopen_requested || job_force;
      failed(uv_strerror(rc));
    }
  }

  // The path no longer naming the open file (or `force`): open it again (O_APPEND|O_CREAT as at
  // start), then close the old one. On failure the old fd stays. Blocking: the thread pool's
  // (or finish()'s, on the way out).
  void rotate(bool force) {
    job_reopened = false;
    job_reopen_errno = 0;
    if (!force) {
      struct stat at {}, open_st {};
      if (::stat(sink.c_str(), &at) == 0 && ::fstat(fd, &open_st) == 0 &&
          at.st_dev == open_st.st_dev && at.st_ino == open_st.st_ino)
        return;  // still ours (also after copytruncate: same inode, O_APPEND writes at 0)
    }
    int nfd = ::open(sink.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
    if (nfd < 0) {
      job_reopen_errno = errno;
      return;
    }
    ::close(fd);
    fd = nfd;
    job_reopened = true;
  }

  // Thread pool: the rotation check, then the whole batch (short writes continued).
  static void doWork(uv_work_t* w) {
    auto* self = static_cast<Impl*>(w->data);
    if (self->job_check || self->job_force) self->rotate(self->job_force);
    self->job_write_errno = 0;
    while (self->inflight_off < self->inflight.size()) {
      ssize_t n = ::write(self->fd, self->inflight.data() + self->inflight_off,
                          self->inflight.size() - self->inflight_off);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        self->job_write_errno = n < 0 ? errno : EIO;
        break;
      }
      self->inflight_off += static_cast<size_t>(n);
    }
  }

  // Loop: count and log what the rotation check did.
  void noteReopen() {
    if (job_reopened) {
      stats.reopens++;
      if (reopen_failing)
        spdlog::info("access log {}: reopened ({} failed attempts so far)", sink,
                     stats.reopen_errors);
      else
        spdlog::info("access log {}: reopened", sink);
      reopen_failing = false;
    } else if (job_reopen_errno != 0) {
      stats.reopen_errors++;
      if (!reopen_failing) {
        spdlog::error(
            "access log {}: cannot reopen: {}; still writing to the file opened before{}", sink,
            errnoText(job_reopen_errno),
            reopen_check_ms > 0 ? fmt::format(", retrying every {} ms", reopen_check_ms) : "");
      }
      reopen_failing = true;
    }
    job_reopened = false;
    job_reopen_errno = 0;
  }

  void failed(const std::string& why) {
    stats.write_errors++;
    stats.dropped += inflight_lines;
    if (stats.write_errors == 1 || stats.write_errors % 100 == 0)
      spdlog::warn("access log {}: write failed: {} ({} failures, {} lines dropped so far)",
                   sink, why, stats.write_errors, stats.dropped);
    inflight.clear();
    inflight_lines = 0;
  }

  // A burst (thousands of connections ending at once) grows `pending` while a write is in
  // flight, up to max_buffered, and the swap in kick() hands that buffer on to `inflight`;
  // std::string keeps its capacity through clear(), so both would hold a burst's size for
  // good, among the connections' freed pages (~2.7 MiB after 10000 lines at once). After each
  // batch, a buffer above retainBytes() (4 x flush_bytes, at least 256 KiB) that is far larger
  // than the batch needed, or that nothing more is waiting for, is given back. Steady traffic
  // writes batches of similar size into buffers below that (a batch goes out at flush_bytes),
  // so it keeps its buffers: nothing is added per line, nothing reallocated per batch.
  size_t retainBytes() const { return 4 * std::max(flush_bytes, kMinRetainBytes); }
  void releaseBurstCapacity(size_t batch_bytes) {
    bool idle = pending.empty();
    size_t keep = retainBytes();
    if (inflight.capacity() > keep && (idle || batch_bytes < inflight.capacity() / 4))
      std::string().swap(inflight);
    if (idle && pending.capacity() > keep) std::string().swap(pending);
  }
  static constexpr size_t kMinRetainBytes = 64 << 10;

  static void onDone(uv_work_t* w, int status) {
    auto* self = static_cast<Impl*>(w->data);
    self->busy = false;
    self->noteReopen();
    size_t batch_bytes = self->inflight.size();
    if (status < 0) {
      self->failed(uv_strerror(status));  // cancelled: the job never ran
    } else if (self->job_write_errno != 0) {
      self->failed(errnoText(self->job_write_errno));
    } else {
      self->stats.lines += self->inflight_lines;
      self->inflight.clear();
      self->inflight_lines = 0;
    }
    if (self->orphaned) return self->finish();
    self->releaseBurstCapacity(batch_bytes);
    self->kick();
  }

  // Last words: a due rotation check (or a requested reopen), then what is left goes out with
  // plain blocking writes (bounded: stop at the first error), then the file is closed and this
  // deleted.
  void finish() {
    if (own_fd && fd >= 0 && (reopen_requested || checkDue())) {
      rotate(reopen_requested);
      noteReopen();
    }
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
  impl->reopen_check_ms = o.reopen_check_ms;
  impl->last_check_ms = uv_now(loop);
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
void AccessLog::reopen() { impl_->requestReopen(); }
AccessLogStats AccessLog::stats() const { return impl_->stats; }
size_t AccessLog::bufferCapacity() const {
  // The job in flight only reads `inflight`: its capacity does not change under us.
  return impl_->pending.capacity() + impl_->inflight.capacity();
}

}  // namespace weft::ztunnel
