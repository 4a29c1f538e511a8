// Access logs: one line per proxied connection when it ends (Istio's fields), as text or JSON,
// written to stderr or a file without blocking the loop (a bounded buffer, one write in flight
// on libuv's thread pool; lines that do not fit are dropped and counted). A file sink follows
// log rotation: reopened when the path no longer names the file written to, or on reopen().
#pragma once

#include <uv.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "common/address.h"
#include "common/status.h"

namespace weft::ztunnel {

enum class AccessLogFormat { kText, kJson };
// "text" | "json"
const char* accessLogFormatName(AccessLogFormat f);
std::optional<AccessLogFormat> parseAccessLogFormat(const std::string& s);

// What one line says. Empty strings / unset addresses are fields Istio leaves out; they are
// written as "-" (text) and null (JSON) so every line has every field.
struct AccessLogRecord {
  int64_t time_ms = 0;      // wall clock when the connection ended
  uint64_t connection_id = 0;
  std::string direction;    // "outbound" | "inbound"
  std::string path;         // "hbone" | "plain"
  SocketAddress src_addr;
  std::string src_workload, src_namespace, src_identity;
  SocketAddress dst_addr;       // the address connected to (HBONE: the pod's 15008)
  SocketAddress dst_hbone_addr; // HBONE: the tunnel's target (pod IP:port); unset otherwise
  std::string dst_service, dst_workload, dst_namespace, dst_identity;
  // Istio's sense: outbound = to/from the destination, inbound = to/from the source.
  uint64_t bytes_sent = 0, bytes_recv = 0;
  uint64_t duration_ms = 0;
  std::string error;        // empty = the connection ended cleanly
  std::string response_flags = "-";
};

// One line, '\n'-terminated. Text: `<time> <level> access connection complete key=value ...`
// with values quoted (and \" \\ \n escaped) when they hold spaces, quotes, '=' or are empty.
std::string formatAccessLog(const AccessLogRecord& r, AccessLogFormat format);

struct AccessLogOptions {
  std::string sink = "off";  // "off" | "stderr" | a file path (opened O_APPEND, created 0640)
  AccessLogFormat format = AccessLogFormat::kText;
  size_t max_buffered = 1 << 20;  // bytes waiting to be written; more lines are dropped
  // Lines are gathered for up to this long (or until flush_bytes are waiting) and written
  // together: one thread-pool write per line cost a wake-up and a context switch per
  // connection. 0 = write as soon as the sink is idle.
  uint64_t flush_delay_ms = 50;
  size_t flush_bytes = 64 << 10;
  // A file sink: at most this often, before a batch is written (on the thread pool), the path
  // is stat()ed and reopened when it no longer names the open file (renamed away by logrotate,
  // deleted, replaced). 0 = only on reopen().
  uint64_t reopen_check_ms = 1000;
};

struct AccessLogStats {
  uint64_t lines = 0;         // handed to the sink and written
  uint64_t dropped = 0;       // did not fit in the buffer, or lost in a failed write
  uint64_t write_errors = 0;
  uint64_t reopens = 0;        // the file reopened (rotated away, or reopen())
  uint64_t reopen_errors = 0;  // reopen attempts that failed (the old file kept)
};

class AccessLog {
 public:
  // Null (and ok) for sink "off".
  static Result<std::unique_ptr<AccessLog>> open(uv_loop_t* loop, const AccessLogOptions& o);
  // Pending lines are written (blocking, once) and the file closed; a write still in flight
  // finishes on the loop first.
  ~AccessLog();
  AccessLog(const AccessLog&) = delete;
  AccessLog& operator=(const AccessLog&) = delete;

  void write(const AccessLogRecord& r);
  AccessLogFormat format() const;
  void setFormat(AccessLogFormat f);
  const std::string& sink() const;
  // Reopen the file at the path now (SIGHUP): off the loop, before the next batch, which goes
  // to the new file; a no-op for stderr. A failure is counted and logged; the old file stays.
  void reopen();
  AccessLogStats stats() const;
  // Bytes the line buffers hold allocated (their capacity, the batch in flight's included). A
  // burst's growth is given back once written.
  size_t bufferCapacity() const;

  struct Impl;

 private:
  explicit AccessLog(Impl* impl) : impl_(impl) {}
  Impl* impl_;  // deletes itself once no write is in flight after we are gone
};
using AccessLogPtr = std::unique_ptr<AccessLog>;

}  // namespace weft::ztunnel
