// The relay: reads each side into a reusable buffer, writes to the other with uv_try_write and
// queues only what the kernel did not take; backpressure by pausing reads.
#include "ztunnel/relay.h"

#include <sys/socket.h>

#include <cstring>

namespace weft::ztunnel {

struct Relay::WriteReq {
  uv_write_t req;
  Relay* relay;
  int dir;
  size_t len;
  std::unique_ptr<char[]> data;
};

Relay::Relay(uv_stream_t* a, uv_stream_t* b, RelayOptions options, DoneCallback done)
    : options_(options), done_(std::move(done)) {
  dirs_[0].from = a;
  dirs_[0].to = b;
  dirs_[0].from_name = "a";
  dirs_[0].to_name = "b";
  dirs_[1].from = b;
  dirs_[1].to = a;
  dirs_[1].from_name = "b";
  dirs_[1].to_name = "a";
}

Relay::~Relay() = default;

void Relay::start() {
  dirs_[0].from->data = this;
  dirs_[1].from->data = this;
  startReading(dirs_[0]);
  if (!finished_) startReading(dirs_[1]);
}

void Relay::abort(const std::string& why) { fail(-1, why); }

Relay::Direction* Relay::dirFrom(uv_stream_t* s) {
  return s == dirs_[0].from ? &dirs_[0] : &dirs_[1];
}

void Relay::startReading(Direction& d) {
  if (d.reading || d.eof || finished_) return;
  int rc = uv_read_start(d.from, onAlloc, onRead);
  if (rc != 0) {
    fail(&d == &dirs_[0] ? 0 : 1, std::string("read start ") + d.from_name + ": " + uv_strerror(rc));
    return;
  }
  d.reading = true;
}

void Relay::stopReading(Direction& d) {
  if (!d.reading) return;
  uv_read_stop(d.from);  // cannot fail on a stream
  d.reading = false;
}

void Relay::onAlloc(uv_handle_t* h, size_t, uv_buf_t* buf) {
  auto* self = static_cast<Relay*>(h->data);
  Direction* d = self->dirFrom(reinterpret_cast<uv_stream_t*>(h));
  if (!d->read_buf) d->read_buf.reset(new char[self->options_.read_buffer_bytes]);
  *buf = uv_buf_init(d->read_buf.get(), static_cast<unsigned>(self->options_.read_buffer_bytes));
}

void Relay::onRead(uv_stream_t* s, ssize_t nread, const uv_buf_t* buf) {
  auto* self = static_cast<Relay*>(s->data);
  self->handleRead(*self->dirFrom(s), nread, buf);
}

void Relay::handleRead(Direction& d, ssize_t nread, const uv_buf_t* buf) {
  if (finished_ || nread == 0) return;
  int side = &d == &dirs_[0] ? 0 : 1;
  if (nread == UV_EOF) {
    // Half-close: libuv runs the shutdown after every write queued before it, so the peer
    // sees all bytes and then the FIN.
    d.eof = true;
    stopReading(d);
    uv_shutdown_t* req = &shutdown_reqs_[side];
    req->data = this;
    int rc = uv_shutdown(req, d.to, onShutdown);
    if (rc != 0) fail(1 - side, std::string("shutdown ") + d.to_name + ": " + uv_strerror(rc));
    return;
  }
  if (nread < 0) {
    fail(side, std::string("read ") + d.from_name + ": " + uv_strerror(static_cast<int>(nread)));
    return;
  }
  if (!forward(d, buf->base, static_cast<size_t>(nread))) return;
  if (uv_stream_get_write_queue_size(d.to) > options_.max_write_queue_bytes) {
    stopReading(d);
    d.paused = true;
  }
}

bool Relay::forward(Direction& d, const char* data, size_t len) {
  int side = &d == &dirs_[0] ? 0 : 1;
  uv_buf_t b = uv_buf_init(const_cast<char*>(data), static_cast<unsigned>(len));
  size_t done = 0;
  int rc = uv_try_write(d.to, &b, 1);
  if (rc >= 0) {
    done = static_cast<size_t>(rc);
  } else if (rc != UV_EAGAIN) {
    fail(1 - side, std::string("write ") + d.to_name + ": " + uv_strerror(rc));
    return false;
  }
  d.bytes += done;
  if (done == len) return true;
  // The kernel is full (or writes are already queued): keep a copy of the rest.
  auto* w = new WriteReq{};
  w->relay = this;
  w->dir = side;
  w->len = len - done;
  w->data.reset(new char[w->len]);
  memcpy(w->data.get(), data + done, w->len);
  w->req.data = w;
  uv_buf_t rest = uv_buf_init(w->data.get(), static_cast<unsigned>(w->len));
  rc = uv_write(&w->req, d.to, &rest, 1, onWrite);
  if (rc != 0) {
    delete w;
    fail(1 - side, std::string("write ") + d.to_name + ": " + uv_strerror(rc));
    return false;
  }
  d.queued += w->len;
  return true;
}

void Relay::onWrite(uv_write_t* req, int status) {
  std::unique_ptr<WriteReq> w(static_cast<WriteReq*>(req->data));
  Relay* self = w->relay;
  Direction& d = self->dirs_[w->dir];
  d.queued -= w->len;
  if (self->finished_) return;
  if (status != 0) {
    self->fail(1 - w->dir, std::string("write ") + d.to_name + ": " + uv_strerror(status));
    return;
  }
  d.bytes += w->len;
  if (d.paused && uv_stream_get_write_queue_size(d.to) <= self->options_.max_write_queue_bytes / 2) {
    d.paused = false;
    self->startReading(d);
  }
}

void Relay::onShutdown(uv_shutdown_t* req, int status) {
  auto* self = static_cast<Relay*>(req->data);
  int side = req == &self->shutdown_reqs_[0] ? 0 : 1;
  if (self->finished_) return;
  if (status != 0) {
    self->fail(1 - side, std::string("shutdown ") + self->dirs_[side].to_name + ": " +
                             uv_strerror(status));
    return;
  }
  self->dirs_[side].shut = true;
  self->maybeFinish();
}

void Relay::maybeFinish() {
  if (finished_ || !dirs_[0].shut || !dirs_[1].shut) return;
  finished_ = true;
  RelayOutcome out;
  out.clean = true;
  out.a_to_b = dirs_[0].bytes;
  out.b_to_a = dirs_[1].bytes;
  DoneCallback cb = std::move(done_);
  cb(out);
}

void Relay::fail(int side, std::string error) {
  if (finished_) return;
  finished_ = true;
  failed_side_ = side;
  stopReading(dirs_[0]);
  stopReading(dirs_[1]);
  RelayOutcome out;
  out.clean = false;
  out.error = std::move(error);
  out.a_to_b = dirs_[0].bytes;
  out.b_to_a = dirs_[1].bytes;
  DoneCallback cb = std::move(done_);
  if (cb) cb(out);
}

void closeStream(uv_stream_t* s, bool reset, void* data, uv_close_cb on_closed) {
  auto* h = reinterpret_cast<uv_handle_t*>(s);
  h->data = data;
  if (uv_is_closing(h)) return;
  if (reset && h->type == UV_TCP) {
    uv_os_fd_t fd;
    if (uv_fileno(h, &fd) == 0) {
      // RST instead of FIN: the peer must not mistake a failure for a clean end of stream.
      linger l{1, 0};
      setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));  // best effort: close follows
    }
  }
  uv_close(h, on_closed);
}

}  // namespace weft::ztunnel
