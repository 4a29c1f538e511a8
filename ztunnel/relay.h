// The splice between two connected streams: bytes both ways, exact half-close, resets carried
// across, bounded buffering with backpressure. Shared by outbound, inbound and (later) HBONE.
#pragma once

#include <uv.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace weft::ztunnel {

struct RelayOptions {
  size_t read_buffer_bytes = 64 * 1024;
  // Stop reading a side while the other side's unsent bytes exceed this; resume at half.
  size_t max_write_queue_bytes = 256 * 1024;
};

// How a relay ended.
struct RelayOutcome {
  bool clean = false;      // both directions finished with EOF and a completed shutdown
  std::string error;       // otherwise: what failed ("read a: connection reset by peer")
  uint64_t a_to_b = 0;     // bytes written to b
  uint64_t b_to_a = 0;     // bytes written to a
};

// Relays between `a` and `b`, which it borrows (and whose `data` it uses while relaying). The
// owner closes both handles once done() ran (closeStream() below; reset the peer of a failed
// side), and destroys the Relay only after both close callbacks ran: libuv completes every
// write and shutdown request, cancelled, before a handle's close callback.
class Relay {
 public:
  using DoneCallback = std::function<void(const RelayOutcome&)>;
  Relay(uv_stream_t* a, uv_stream_t* b, RelayOptions options, DoneCallback done);
  ~Relay();
  Relay(const Relay&) = delete;
  Relay& operator=(const Relay&) = delete;

  // Starts reading both sides. A failure is reported through done() (on this call stack).
  void start();
  // Aborts both directions now (drain timeout, shutdown); done() reports `why`.
  void abort(const std::string& why);

  uint64_t bytesAToB() const { return dirs_[0].bytes; }
  uint64_t bytesBToA() const { return dirs_[1].bytes; }
  bool finished() const { return finished_; }
  // Bytes held in user space right now (read but not yet written), for tests and /stats.
  size_t bufferedBytes() const { return dirs_[0].queued + dirs_[1].queued; }
  // Which side failed first, if any: 0 = a, 1 = b, -1 = none. Its peer gets a reset.
  int failedSide() const { return failed_side_; }

 private:
  struct Direction {
    uv_stream_t* from = nullptr;
    uv_stream_t* to = nullptr;
    const char* from_name = "";
    const char* to_name = "";
    bool reading = false;
    bool eof = false;        // read EOF from `from`
    bool shut = false;       // shutdown of `to` completed
    bool paused = false;     // reading stopped for backpressure
    uint64_t bytes = 0;      // written to `to`
    size_t queued = 0;       // bytes handed to uv_write but not yet written
    std::unique_ptr<char[]> read_buf;
  };
  struct WriteReq;

  static void onAlloc(uv_handle_t* h, size_t suggested, uv_buf_t* buf);
  static void onRead(uv_stream_t* s, ssize_t nread, const uv_buf_t* buf);
  static void onWrite(uv_write_t* req, int status);
  static void onShutdown(uv_shutdown_t* req, int status);

  Direction* dirFrom(uv_stream_t* s);
  void handleRead(Direction& d, ssize_t nread, const uv_buf_t* buf);
  bool forward(Direction& d, const char* data, size_t len);
  void startReading(Direction& d);
  void stopReading(Direction& d);
  void fail(int side, std::string error);
  void maybeFinish();

  Direction dirs_[2];
  RelayOptions options_;
  DoneCallback done_;
  bool finished_ = false;
  int failed_side_ = -1;
  uv_shutdown_t shutdown_reqs_[2]{};
};

// Closes a stream handle after a relay (or a failed connect). With `reset`, a TCP stream is
// closed with RST (SO_LINGER 0) so its peer sees the failure instead of a clean EOF.
// Sets the handle's data to `data` first, so `on_closed` finds its owner; the handle's memory is
// the owner's to free there.
void closeStream(uv_stream_t* s, bool reset, void* data, uv_close_cb on_closed);

}  // namespace weft::ztunnel
