// HBONE connection core: nghttp2 session fed from TlsStream, CONNECT tunnels bridged to TCP.
// Flow control: automatic WINDOW_UPDATEs are off; received DATA is "consumed" only once the TCP
// write of it completed, so a slow upstream stops the peer after one window (4 MiB per stream).
#include "ztunnel/hbone/session.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include <sys/socket.h>

#include "common/log.h"

namespace weft::hbone {
namespace {

constexpr size_t kFlushBatch = 256 * 1024;  // ciphertext per socket write, at most about
constexpr size_t kRecord = 16 * 1024;       // a full TLS record's plaintext
constexpr size_t kMinReadRoom = 32 * 1024;  // a socket read gets at least this much room

struct TcpWrite {
  uv_write_t req;
  std::vector<uint8_t> buf;
  int32_t streamId;
};

void closeAndDelete(uv_tcp_t* tcp, bool reset) {
  tcp->data = nullptr;
  auto* h = reinterpret_cast<uv_handle_t*>(tcp);
  if (uv_is_closing(h)) return;
  auto cb = [](uv_handle_t* x) { delete reinterpret_cast<uv_tcp_t*>(x); };
  if (reset && uv_tcp_close_reset(tcp, cb) == 0) return;
  uv_close(h, cb);
}

}  // namespace

void endWatch(const TunnelWatchPtr& w, bool reset) {
  if (!w || w->ended) return;
  w->ended = true;
  w->reset = reset || !w->attached;
  w->abort = nullptr;
  auto cb = std::move(w->onEnd);
  w->onEnd = nullptr;
  if (cb) cb();
}

// ---------------------------------------------------------------------------------------------
// LocalSocket

LocalSocket::LocalSocket(LocalSocket&& o) noexcept
    : fd_(std::move(o.fd_)), tcp_(std::exchange(o.tcp_, nullptr)) {}

LocalSocket& LocalSocket::operator=(LocalSocket&& o) noexcept {
  if (this != &o) {
    reset();
    fd_ = std::move(o.fd_);
    tcp_ = std::exchange(o.tcp_, nullptr);
  }
  return *this;
}

void LocalSocket::reset() {
  if (tcp_ != nullptr) closeAndDelete(std::exchange(tcp_, nullptr), /*reset=*/true);
  fd_.reset();
}

Result<uv_tcp_t*> LocalSocket::take(uv_loop_t* loop) {
  if (tcp_ != nullptr) return std::exchange(tcp_, nullptr);
  if (!fd_.valid()) return Status::error("no local socket");
  auto* tcp = new uv_tcp_t{};
  int rc = uv_tcp_init(loop, tcp);
  if (rc != 0) {
    delete tcp;
    return Status::errorf("local socket: {}", uv_strerror(rc));
  }
  rc = uv_tcp_open(tcp, fd_.get());
  if (rc != 0) {
    closeAndDelete(tcp, false);
    return Status::errorf("local socket: {}", uv_strerror(rc));
  }
  fd_.release();
  return tcp;
}

// ---------------------------------------------------------------------------------------------
// Tunnel

Tunnel::Tunnel(H2Session* session, int32_t streamId) : session_(session), streamId_(streamId) {}

Tunnel::~Tunnel() {
  // Writes cancelled by the close never reach their callback's consume: give the connection
  // window back here so the other streams do not starve.
  if (tcpQueued_ > 0 && session_->h2_ != nullptr) {
    nghttp2_session_consume_connection(session_->h2_, tcpQueued_);
  }
  if (tcp_ != nullptr) closeAndDelete(tcp_, resetTcp_);
  toH2Bytes_ = 0;
  releaseChunks();
  endWatch(watch_, resetTcp_);
}

// Gives sent (or, when nothing is left to send, all) chunks back to the loop's pool: an idle
// tunnel holds no buffer.
void Tunnel::releaseChunks() {
  while (!toH2_.empty() && (toH2_.front().size() == 0) &&
         (toH2_.size() > 1 || toH2Bytes_ == 0)) {
    ChunkPool::local().give(std::move(toH2_.front()));
    toH2_.pop_front();
  }
}

void Tunnel::setWatch(TunnelWatchPtr w) {
  watch_ = std::move(w);
  if (!watch_) return;
  watch_->attached = true;
  H2Session* session = session_;
  int32_t id = streamId_;
  // Only ever called while this tunnel exists: the destructor clears it (endWatch).
  watch_->abort = [session, id]() { session->resetStream(id, NGHTTP2_CANCEL); };
  auto cb = std::move(watch_->onAttach);
  watch_->onAttach = nullptr;
  if (cb) cb();
}

Status Tunnel::attach(uv_tcp_t* tcp) {
  tcp_ = tcp;
  tcp_->data = this;
  uv_tcp_nodelay(tcp_, 1);
  relaying_ = true;
  startReading();
  maybeShutdownTcp();
  return Status::ok();
}

// The socket reads straight into the tail of the last chunk (no copy out of a scratch buffer).
void Tunnel::onAlloc(uv_handle_t* h, size_t, uv_buf_t* buf) {
  auto* self = static_cast<Tunnel*>(h->data);
  if (self == nullptr) {
    *buf = uv_buf_init(nullptr, 0);  // libuv reports UV_ENOBUFS; the handle is closing
    return;
  }
  auto& q = self->toH2_;
  if (!q.empty() && q.back().size() == 0) q.back().begin = q.back().end = 0;
  if (q.empty() || q.back().room() < kMinReadRoom) q.push_back(ChunkPool::local().take());
  Chunk& c = q.back();
  *buf = uv_buf_init(reinterpret_cast<char*>(c.data.get() + c.end),
                     static_cast<unsigned>(c.room()));
}

void Tunnel::startReading() {
  if (reading_ || tcpEof_ || tcp_ == nullptr) return;
  if (uv_read_start(reinterpret_cast<uv_stream_t*>(tcp_), onAlloc, onRead) == 0) reading_ = true;
}

void Tunnel::stopReading() {
  if (!reading_ || tcp_ == nullptr) return;
  uv_read_stop(reinterpret_cast<uv_stream_t*>(tcp_));
  reading_ = false;
}

void Tunnel::onRead(uv_stream_t* s, ssize_t n, const uv_buf_t* buf) {
  auto* self = static_cast<Tunnel*>(s->data);
  if (self == nullptr) return;
  H2Session* session = self->session_;
  if (n > 0) {
    if (self->watch_) self->watch_->tcpToH2 += static_cast<uint64_t>(n);
    // onAlloc handed out the last chunk's tail and nothing ran in between.
    Chunk& c = self->toH2_.back();
    if (reinterpret_cast<const uint8_t*>(buf->base) != c.data.get() + c.end) {
      std::abort();  // impossible: libuv reads into the buffer onAlloc just gave
    }
    c.end += static_cast<size_t>(n);
    self->toH2Bytes_ += static_cast<size_t>(n);
    if (self->toH2Bytes_ >= session->settings_.tcpReadBound) self->stopReading();
  } else if (n == UV_EOF) {
    self->tcpEof_ = true;
    self->stopReading();
    self->releaseChunks();
  } else if (n < 0) {
    // The TCP side reset or failed: reset the stream, and the socket.
    self->stopReading();
    self->resetTcp_ = true;
    nghttp2_submit_rst_stream(session->h2_, NGHTTP2_FLAG_NONE, self->streamId_, NGHTTP2_CANCEL);
    session->scheduleFlush();
    return;
  } else {
    self->releaseChunks();  // EAGAIN: an idle tunnel gives its empty chunk back
    return;
  }
  if (self->dataDeferred_) {
    self->dataDeferred_ = false;
    nghttp2_session_resume_data(session->h2_, self->streamId_);
  }
  session->scheduleFlush();
}

void Tunnel::writeToTcp(const uint8_t* data, size_t len) {
  if (tcp_ == nullptr || tcpShutdown_) {
    nghttp2_session_consume(session_->h2_, streamId_, len);
    return;
  }
  if (tcpQueued_ == 0) {
    // Nothing queued: hand the bytes to the kernel straight away and copy only what it did
    // not take.
    uv_buf_t direct = uv_buf_init(const_cast<char*>(reinterpret_cast<const char*>(data)),
                                  static_cast<unsigned>(len));
    int n = uv_try_write(reinterpret_cast<uv_stream_t*>(tcp_), &direct, 1);
    if (n > 0) {
      if (watch_) watch_->h2ToTcp += static_cast<uint64_t>(n);
      nghttp2_session_consume(session_->h2_, streamId_, static_cast<size_t>(n));
      data += n;
      len -= static_cast<size_t>(n);
      if (len == 0) return;
    } else if (n < 0 && n != UV_EAGAIN) {
      nghttp2_session_consume(session_->h2_, streamId_, len);
      resetTcp_ = true;
      nghttp2_submit_rst_stream(session_->h2_, NGHTTP2_FLAG_NONE, streamId_, NGHTTP2_CANCEL);
      return;
    }
  }
  auto* w = new TcpWrite{};
  w->buf.assign(data, data + len);
  w->streamId = streamId_;
  uv_buf_t b = uv_buf_init(reinterpret_cast<char*>(w->buf.data()),
                           static_cast<unsigned>(w->buf.size()));
  int rc = uv_write(&w->req, reinterpret_cast<uv_stream_t*>(tcp_), &b, 1,
                    [](uv_write_t* req, int status) {
                      auto* wr = reinterpret_cast<TcpWrite*>(req);
                      size_t sz = wr->buf.size();
                      auto* self = static_cast<Tunnel*>(req->handle->data);
                      delete wr;
                      if (self == nullptr) return;
                      self->tcpQueued_ -= sz;
                      H2Session* session = self->session_;
                      if (status != 0) {
                        self->resetTcp_ = true;
                        nghttp2_session_consume_connection(session->h2_, sz);
                        nghttp2_submit_rst_stream(session->h2_, NGHTTP2_FLAG_NONE,
                                                  self->streamId_, NGHTTP2_CANCEL);
                      } else {
                        if (self->watch_) self->watch_->h2ToTcp += sz;
                        nghttp2_session_consume(session->h2_, self->streamId_, sz);
                      }
                      session->scheduleFlush();
                    });
  if (rc != 0) {
    delete w;
    nghttp2_session_consume(session_->h2_, streamId_, len);
    resetTcp_ = true;
    nghttp2_submit_rst_stream(session_->h2_, NGHTTP2_FLAG_NONE, streamId_, NGHTTP2_CANCEL);
    return;
  }
  tcpQueued_ += len;
}

void Tunnel::maybeShutdownTcp() {
  if (!h2EndReceived_ || tcpShutdown_ || tcp_ == nullptr) return;
  tcpShutdown_ = true;
  // Nothing queued: shut down now. uv_shutdown would arm the socket for writability, wake the
  // loop once more and re-arm it again afterwards (two epoll_ctl calls and a loop turn per
  // tunnel) only to make the same call.
  auto* stream = reinterpret_cast<uv_stream_t*>(tcp_);
  uv_os_fd_t fd = -1;
  if (tcpQueued_ == 0 && uv_stream_get_write_queue_size(stream) == 0 &&
      uv_fileno(reinterpret_cast<uv_handle_t*>(tcp_), &fd) == 0) {
    // A failure (the peer already reset) shows up on the socket's next read or write.
    ::shutdown(fd, SHUT_WR);
    shutdownDone_ = true;
    return;
  }
  auto* req = new uv_shutdown_t{};
  // uv_shutdown waits for the queued writes, then shutdown(SHUT_WR): the peer's FIN, exactly.
  int rc = uv_shutdown(req, reinterpret_cast<uv_stream_t*>(tcp_), [](uv_shutdown_t* r, int) {
    auto* self = static_cast<Tunnel*>(r->handle->data);
    delete r;
    if (self == nullptr) return;
    self->shutdownDone_ = true;
    if (self->streamClosed_) self->session_->eraseTunnel(self->streamId_);  // destroys self
  });
  if (rc != 0) {
    delete req;
    shutdownDone_ = true;
  }
}

// ---------------------------------------------------------------------------------------------
// H2Session

Result<std::unique_ptr<H2Session>> H2Session::create(uv_loop_t* loop, UniqueFd fd, Role role,
                                                     SslCtxPtr ctx, TlsStream::PeerCheck check,
                                                     H2Settings settings, Callbacks callbacks) {
  std::unique_ptr<H2Session> s(new H2Session());
  s->loop_ = loop;
  s->role_ = role;
  s->settings_ = settings;
  s->cb_ = std::move(callbacks);
  H2Session* raw = s.get();
  TlsStream::Callbacks tcb;
  tcb.onHandshake = [raw](const Status& st) { raw->onTlsHandshake(st); };
  tcb.onData = [raw](const uint8_t* d, size_t n) { raw->onTlsData(d, n); };
  tcb.onWritable = [raw]() { raw->flush(); };
  tcb.onClosed = [raw](const Status& st) { raw->onTlsClosed(st); };
  auto tls = TlsStream::create(loop, std::move(fd), std::move(ctx),
                               role == Role::kClient ? TlsRole::kClient : TlsRole::kServer,
                               std::move(check), std::move(tcb));
  if (!tls) return tls.status();
  s->tls_ = std::move(tls.value());

  nghttp2_session_callbacks* cbs = nullptr;
  if (nghttp2_session_callbacks_new(&cbs) != 0) return Status::error("nghttp2: out of memory");
  nghttp2_session_callbacks_set_on_header_callback(cbs, onHeader);
  nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, onBeginHeaders);
  nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, onFrameRecv);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, onDataChunk);
  nghttp2_session_callbacks_set_on_stream_close_callback(cbs, onStreamClose);
  nghttp2_session_callbacks_set_send_data_callback(cbs, sendData);
  nghttp2_session_callbacks_set_data_source_read_length_callback(cbs, dataLength);
  nghttp2_option* opt = nullptr;
  if (nghttp2_option_new(&opt) != 0) {
    nghttp2_session_callbacks_del(cbs);
    return Status::error("nghttp2: out of memory");
  }
  nghttp2_option_set_no_auto_window_update(opt, 1);
  nghttp2_option_set_max_send_header_block_length(opt, settings.maxHeaderList);
  int rc = role == Role::kClient ? nghttp2_session_client_new2(&s->h2_, cbs, raw, opt)
                                 : nghttp2_session_server_new2(&s->h2_, cbs, raw, opt);
  nghttp2_session_callbacks_del(cbs);
  nghttp2_option_del(opt);
  if (rc != 0) return Status::errorf("nghttp2 session: {}", nghttp2_strerror(rc));

  std::vector<nghttp2_settings_entry> iv = {
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, settings.streamWindow},
      {NGHTTP2_SETTINGS_MAX_FRAME_SIZE, settings.maxFrameSize},
      {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, settings.maxHeaderList},
      {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
  };
  if (role == Role::kServer) {
    iv.push_back({NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, settings.maxConcurrentStreams});
  }
  rc = nghttp2_submit_settings(s->h2_, NGHTTP2_FLAG_NONE, iv.data(), iv.size());
  if (rc != 0) return Status::errorf("nghttp2 settings: {}", nghttp2_strerror(rc));
  rc = nghttp2_session_set_local_window_size(s->h2_, NGHTTP2_FLAG_NONE, 0,
                                             static_cast<int32_t>(settings.connectionWindow));
  if (rc != 0) return Status::errorf("nghttp2 connection window: {}", nghttp2_strerror(rc));
  return s;
}

H2Session::~H2Session() {
  tunnels_.clear();
  if (timer_ != nullptr) {
    timer_->data = nullptr;
    uv_close(reinterpret_cast<uv_handle_t*>(timer_),
             [](uv_handle_t* h) { delete reinterpret_cast<uv_timer_t*>(h); });
  }
  if (flusher_ != nullptr) {
    flusher_->data = nullptr;
    uv_close(reinterpret_cast<uv_handle_t*>(flusher_),
             [](uv_handle_t* h) { delete reinterpret_cast<uv_prepare_t*>(h); });
  }
  tls_.reset();
  if (h2_ != nullptr) nghttp2_session_del(h2_);
}

Status H2Session::start() {
  timer_ = new uv_timer_t{};
  int rc = uv_timer_init(loop_, timer_);
  if (rc != 0) {
    delete timer_;
    timer_ = nullptr;
    return Status::errorf("uv_timer_init: {}", uv_strerror(rc));
  }
  timer_->data = this;
  flusher_ = new uv_prepare_t{};
  rc = uv_prepare_init(loop_, flusher_);
  if (rc != 0) {
    delete flusher_;
    flusher_ = nullptr;  // scheduleFlush() then flushes at once
  } else {
    flusher_->data = this;
  }
  auto shortest = std::min(settings_.pingInterval, settings_.idleTimeout);
  if (cb_.isSpare) shortest = std::min(shortest, settings_.spareIdleTimeout);
  uint64_t tick = std::clamp<uint64_t>(static_cast<uint64_t>(shortest.count()) / 4, 10, 1000);
  uv_timer_start(timer_, [](uv_timer_t* t) {
    auto* self = static_cast<H2Session*>(t->data);
    if (self != nullptr) self->onTimer();
  }, tick, tick);
  lastPingMs_ = uv_now(loop_);
  return tls_->start();
}

void H2Session::onTimer() {
  if (closing_) return;
  uint64_t now = uv_now(loop_);
  if (!tls_->established()) {
    if (now - lastPingMs_ > static_cast<uint64_t>(settings_.pingTimeout.count())) {
      Status why = Status::error("TLS handshake timed out");
      if (cb_.onHandshake) cb_.onHandshake(why);  // counted as a failed handshake
      close(why);
    }
    return;
  }
  if (pingSentMs_ != 0 &&
      now - pingSentMs_ > static_cast<uint64_t>(settings_.pingTimeout.count())) {
    close(Status::error("HTTP/2 PING not answered"));
    return;
  }
  if (pingSentMs_ == 0 &&
      now - lastPingMs_ >= static_cast<uint64_t>(settings_.pingInterval.count())) {
    if (nghttp2_submit_ping(h2_, NGHTTP2_FLAG_NONE, nullptr) == 0) {
      pingSentMs_ = now;
      lastPingMs_ = now;
      flush();
      if (closing_) return;
    }
  }
  if (activeStreams() == 0) {
    if (idleSinceMs_ == 0) {
      idleSinceMs_ = now;
      return;
    }
    uint64_t idle = now - idleSinceMs_;
    bool expired = idle >= static_cast<uint64_t>(settings_.idleTimeout.count());
    bool spare = !expired && cb_.isSpare &&
                 idle >= static_cast<uint64_t>(settings_.spareIdleTimeout.count()) &&
                 cb_.isSpare();
    if (expired || spare) {
      nghttp2_submit_goaway(h2_, NGHTTP2_FLAG_NONE,
                            nghttp2_session_get_last_proc_stream_id(h2_), NGHTTP2_NO_ERROR,
                            nullptr, 0);
      flush();
      if (closing_) return;
      close(Status::error(expired ? "idle timeout" : "idle spare connection"));
    }
  } else {
    idleSinceMs_ = 0;
  }
}

void H2Session::onTlsHandshake(const Status& st) {
  if (cb_.onHandshake) cb_.onHandshake(st);
  if (st) scheduleFlush();
}

void H2Session::onTlsData(const uint8_t* data, size_t len) {
  if (closing_) return;
  // Callbacks may submit frames (responses, resets); they go out in the flush below, never
  // from inside nghttp2's receive.
  inFlush_ = true;
  ssize_t rc = nghttp2_session_mem_recv(h2_, data, len);
  inFlush_ = false;
  if (closing_) return;
  if (rc < 0) {
    close(Status::errorf("HTTP/2 from peer: {}", nghttp2_strerror(static_cast<int>(rc))));
    return;
  }
  scheduleFlush();
}

// Output of the events of one loop turn (reads on many tunnels, CONNECTs, answers, window
// updates) goes out together just before the loop polls again: one TLS record and one socket
// write for all of them instead of one per event. A prepare handle runs before the loop
// blocks, so nothing scheduled waits for a poll.
void H2Session::scheduleFlush() {
  if (closing_ || flushScheduled_) return;
  if (flusher_ == nullptr) {
    flush();
    return;
  }
  if (uv_prepare_start(flusher_, [](uv_prepare_t* p) {
        uv_prepare_stop(p);
        auto* self = static_cast<H2Session*>(p->data);
        if (self == nullptr) return;
        self->flushScheduled_ = false;
        self->flush();
      }) != 0) {
    flush();  // cannot defer: send now rather than hold output
    return;
  }
  flushScheduled_ = true;
}

void H2Session::flush() {
  if (inFlush_ || closing_ || !tls_->established()) return;
  inFlush_ = true;
  Status st;
  while (st && !closing_ && !tls_->writeBlocked()) {
    const uint8_t* out = nullptr;
    // DATA payloads go through sendData (inside this call); the rest comes back here.
    ssize_t n = nghttp2_session_mem_send(h2_, &out);
    if (n < 0) {
      st = sendError_ ? Status::errorf("HTTP/2 send: {}", nghttp2_strerror(static_cast<int>(n)))
                      : sendError_;
      break;
    }
    if (n == 0) break;
    st = stage(out, static_cast<size_t>(n));
  }
  // What is staged goes out now, as one (short) record: the end of a burst.
  if (st && !closing_) st = writeStaged();
  if (st && !closing_) st = tls_->flush();
  inFlush_ = false;
  if (!st) {
    close(st);
    return;
  }
  if (!closing_ && !nghttp2_session_want_read(h2_) && !nghttp2_session_want_write(h2_)) {
    close(Status::error("HTTP/2 session finished"));
  }
}

size_t bufferBound(const H2Settings& s, size_t tunnels) {
  // A chunk gets a new one behind it when less than kMinReadRoom is left, so all but the first
  // and the last hold at least kBytes - kMinReadRoom; the last may be an empty one (EAGAIN).
  size_t fill = Chunk::kBytes - kMinReadRoom;
  size_t chunks = (s.tcpReadBound + fill - 1) / fill + 2;
  size_t h2ToTcp = std::min<size_t>(s.connectionWindow, tunnels * size_t{s.streamWindow});
  return tunnels * chunks * Chunk::kBytes + h2ToTcp + TlsStream::kWriteBound + kFlushBatch +
         s.maxDataFrame + (64u << 10);
}

size_t H2Session::bufferedBytes() const {
  size_t n = staged_.size() + (tls_ ? tls_->pendingCiphertext() + tls_->queuedBytes() : 0);
  for (const auto& [id, t] : tunnels_) n += t->toH2_.size() * Chunk::kBytes + t->tcpQueued_;
  return n;
}

Tunnel* H2Session::tunnel(int32_t id) {
  auto it = tunnels_.find(id);
  return it == tunnels_.end() ? nullptr : it->second.get();
}

size_t H2Session::remoteMaxStreams() const {
  if (h2_ == nullptr) return 0;
  return nghttp2_session_get_remote_settings(h2_, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS);
}

void H2Session::eraseTunnel(int32_t id) {
  tunnels_.erase(id);
  if (cb_.onStreamCountChanged) cb_.onStreamCountChanged();
}

// The data provider: says how much of the tunnel's TCP bytes the next DATA frame carries and
// leaves them where they are (NO_COPY); sendData then encrypts them from the chunks.
ssize_t H2Session::readData(nghttp2_session*, int32_t streamId, uint8_t*, size_t len,
                            uint32_t* flags, nghttp2_data_source*, void* user) {
  auto* self = static_cast<H2Session*>(user);
  Tunnel* t = self->tunnel(streamId);
  if (t == nullptr) {
    // Client: the CONNECT's body waits for the 200 and the tunnel behind it.
    if (self->pendingLocal_.count(streamId)) return NGHTTP2_ERR_DEFERRED;
    return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
  }
  size_t n = std::min(len, t->toH2Bytes_);
  if (n == t->toH2Bytes_ && t->tcpEof_) {
    *flags |= NGHTTP2_DATA_FLAG_EOF;  // the TCP FIN becomes END_STREAM
  } else if (n == 0) {
    t->dataDeferred_ = true;
    return NGHTTP2_ERR_DEFERRED;
  }
  // An empty END_STREAM frame is nghttp2's to write; payloads are ours.
  if (n > 0) *flags |= NGHTTP2_DATA_FLAG_NO_COPY;
  return static_cast<ssize_t>(n);
}

int H2Session::sendData(nghttp2_session*, nghttp2_frame* frame, const uint8_t* framehd,
                        size_t length, nghttp2_data_source*, void* user) {
  auto* self = static_cast<H2Session*>(user);
  Tunnel* t = self->tunnel(frame->hd.stream_id);
  if (t == nullptr || length > t->toH2Bytes_) {
    self->sendError_ = Status::error("HTTP/2 DATA for a tunnel without those bytes");
    return NGHTTP2_ERR_CALLBACK_FAILURE;  // impossible: readData said how much there is
  }
  // We never ask for padding (no select_padding callback), so padlen is 0.
  Status st = self->stage(framehd, 9);
  if (st) st = t->sendPayload(length);
  if (!st) {
    self->sendError_ = st;
    return NGHTTP2_ERR_CALLBACK_FAILURE;
  }
  return 0;
}

// Big DATA frames, up to the peer's limit: nghttp2 still caps them at the flow-control windows.
ssize_t H2Session::dataLength(nghttp2_session*, uint8_t, int32_t, int32_t, int32_t,
                              uint32_t remoteMaxFrame, void* user) {
  auto* self = static_cast<H2Session*>(user);
  return static_cast<ssize_t>(std::min(remoteMaxFrame, self->settings_.maxDataFrame));
}

Status Tunnel::sendPayload(size_t len) {
  Status st;
  while (len > 0 && st) {
    Chunk& c = toH2_.front();  // there is one: toH2Bytes_ >= len (sendData checked)
    if (c.size() == 0) {
      ChunkPool::local().give(std::move(c));
      toH2_.pop_front();
      continue;
    }
    size_t n = std::min(len, c.size());
    st = session_->stage(c.data.get() + c.begin, n);
    c.begin += n;
    len -= n;
    toH2Bytes_ -= n;
    if (c.size() == 0 && toH2_.size() > 1) {
      ChunkPool::local().give(std::move(c));
      toH2_.pop_front();
    }
  }
  releaseChunks();
  if (toH2Bytes_ < session_->settings_.tcpReadBound) startReading();
  return st;
}

Status H2Session::stage(const uint8_t* data, size_t len) {
  if (!staged_.empty()) {
    size_t take = std::min(len, kRecord - staged_.size() % kRecord);
    staged_.insert(staged_.end(), data, data + take);
    data += take;
    len -= take;
    if (staged_.size() % kRecord != 0) return Status::ok();
    Status st = writeStaged();
    if (!st) return st;
  }
  size_t whole = len - len % kRecord;
  if (whole > 0) {
    Status st = tls_->write(data, whole, /*flushNow=*/false);
    if (!st) return st;
    if (tls_->pendingCiphertext() >= kFlushBatch) {
      st = tls_->flush();
      if (!st) return st;
    }
  }
  staged_.insert(staged_.end(), data + whole, data + len);
  return Status::ok();
}

Status H2Session::writeStaged() {
  if (staged_.empty()) return Status::ok();
  Status st = tls_->write(staged_.data(), staged_.size(), /*flushNow=*/false);
  staged_.clear();
  if (st && tls_->pendingCiphertext() >= kFlushBatch) st = tls_->flush();
  return st;
}

int H2Session::onBeginHeaders(nghttp2_session*, const nghttp2_frame* f, void* user) {
  auto* self = static_cast<H2Session*>(user);
  if (self->role_ == Role::kServer && f->hd.type == NGHTTP2_HEADERS &&
      f->headers.cat == NGHTTP2_HCAT_REQUEST) {
    self->pending_[f->hd.stream_id] = {};
    self->headerBytes_[f->hd.stream_id] = 0;
  }
  return 0;
}

int H2Session::onHeader(nghttp2_session*, const nghttp2_frame* f, const uint8_t* name,
                        size_t namelen, const uint8_t* value, size_t valuelen, uint8_t,
                        void* user) {
  auto* self = static_cast<H2Session*>(user);
  int32_t id = f->hd.stream_id;
  if (f->hd.type != NGHTTP2_HEADERS) return 0;
  if (self->role_ == Role::kServer) {
    auto it = self->pending_.find(id);
    if (it == self->pending_.end()) return 0;  // trailers: ignored
    size_t& total = self->headerBytes_[id];
    total += namelen + valuelen + 32;
    if (total > self->settings_.maxHeaderList || it->second.size() >= 100) {
      return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;  // resets the stream
    }
    it->second.emplace_back(std::string(reinterpret_cast<const char*>(name), namelen),
                            std::string(reinterpret_cast<const char*>(value), valuelen));
    return 0;
  }
  if (namelen == 7 && std::memcmp(name, ":status", 7) == 0 && valuelen == 3) {
    int st = 0;
    for (size_t i = 0; i < 3; ++i) {
      if (value[i] < '0' || value[i] > '9') return 0;
      st = st * 10 + (value[i] - '0');
    }
    self->responseStatus_[id] = st;
  }
  return 0;
}

int H2Session::onFrameRecv(nghttp2_session* h2, const nghttp2_frame* f, void* user) {
  auto* self = static_cast<H2Session*>(user);
  int32_t id = f->hd.stream_id;
  bool endStream = (f->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;
  switch (f->hd.type) {
    case NGHTTP2_PING:
      if (f->hd.flags & NGHTTP2_FLAG_ACK) self->pingSentMs_ = 0;
      return 0;
    case NGHTTP2_GOAWAY:
      self->goingAway_ = true;
      return 0;
    case NGHTTP2_HEADERS: {
      if (self->role_ == Role::kServer && f->headers.cat == NGHTTP2_HCAT_REQUEST) {
        auto it = self->pending_.find(id);
        if (it == self->pending_.end()) return 0;
        self->headerBytes_.erase(id);
        if (endStream) self->pendingEnd_[id] = true;
        // The entry stays as the stream's "awaiting an answer" mark; its headers move on.
        Headers h = std::move(it->second);
        if (self->cb_.onRequest) self->cb_.onRequest(id, std::move(h));
        return 0;
      }
      if (self->role_ == Role::kClient && f->headers.cat == NGHTTP2_HCAT_RESPONSE) {
        int st = self->responseStatus_.count(id) ? self->responseStatus_[id] : 0;
        self->responseStatus_.erase(id);
        if (st >= 100 && st < 200) return 0;  // informational: wait for the final one
        auto local = self->pendingLocal_.find(id);
        if (local == self->pendingLocal_.end()) return 0;
        auto [sock, watch] = self->takePending(local);
        if (st == 200 && !endStream) {
          auto tun = std::make_unique<Tunnel>(self, id);
          Result<uv_tcp_t*> handle = sock.take(self->loop_);
          if (!handle) {
            endWatch(watch, true);
            nghttp2_submit_rst_stream(h2, NGHTTP2_FLAG_NONE, id, NGHTTP2_CANCEL);
            if (self->cb_.onStreamFailed) self->cb_.onStreamFailed(id, handle.status());
            return 0;
          }
          uv_tcp_t* tcp = handle.value();
          Tunnel* t = tun.get();
          t->setWatch(std::move(watch));
          self->tunnels_[id] = std::move(tun);
          // The request was submitted with a deferred body (see submitConnect); start the TCP
          // side and let nghttp2 pull from it.
          t->attach(tcp);
          nghttp2_session_resume_data(h2, id);
          if (self->cb_.onResponse) self->cb_.onResponse(id, 200);
          return 0;
        }
        // Not a tunnel: end our side; the local socket closes (a handle with a reset).
        endWatch(watch, true);
        nghttp2_submit_rst_stream(h2, NGHTTP2_FLAG_NONE, id, NGHTTP2_CANCEL);
        if (self->cb_.onResponse) self->cb_.onResponse(id, st == 200 ? 502 : st);
        return 0;
      }
      break;
    }
    default:
      break;
  }
  if (endStream && (f->hd.type == NGHTTP2_DATA || f->hd.type == NGHTTP2_HEADERS)) {
    if (Tunnel* t = self->tunnel(id)) {
      t->h2EndReceived_ = true;  // the peer's FIN: shutdown(SHUT_WR) once writes are done
      t->maybeShutdownTcp();
    } else if (self->pending_.count(id)) {
      self->pendingEnd_[id] = true;
    }
  }
  return 0;
}

int H2Session::onDataChunk(nghttp2_session* h2, uint8_t, int32_t streamId, const uint8_t* data,
                           size_t len, void* user) {
  auto* self = static_cast<H2Session*>(user);
  if (Tunnel* t = self->tunnel(streamId); t != nullptr && t->relaying_) {
    t->writeToTcp(data, len);
    return 0;
  }
  // DATA before the tunnel exists (before our 200): not part of the HBONE exchange.
  nghttp2_session_consume(h2, streamId, len);
  nghttp2_submit_rst_stream(h2, NGHTTP2_FLAG_NONE, streamId, NGHTTP2_PROTOCOL_ERROR);
  return 0;
}

std::pair<LocalSocket, TunnelWatchPtr> H2Session::takePending(
    std::map<int32_t, LocalSocket>::iterator local) {
  int32_t id = local->first;
  std::pair<LocalSocket, TunnelWatchPtr> out{std::move(local->second), nullptr};
  pendingLocal_.erase(local);
  if (auto w = pendingWatch_.find(id); w != pendingWatch_.end()) {
    out.second = std::move(w->second);
    pendingWatch_.erase(w);
  }
  return out;
}

int H2Session::onStreamClose(nghttp2_session*, int32_t streamId, uint32_t errorCode,
                             void* user) {
  auto* self = static_cast<H2Session*>(user);
  bool hadPending = self->pending_.erase(streamId) > 0;
  self->pendingEnd_.erase(streamId);
  self->headerBytes_.erase(streamId);
  self->responseStatus_.erase(streamId);
  auto local = self->pendingLocal_.find(streamId);
  if (local != self->pendingLocal_.end() && errorCode == NGHTTP2_REFUSED_STREAM &&
      self->cb_.onStreamRefused) {
    auto [sock, watch] = self->takePending(local);
    self->cb_.onStreamRefused(streamId, std::move(sock), std::move(watch));
    if (self->cb_.onStreamCountChanged) self->cb_.onStreamCountChanged();
    return 0;
  }
  if (auto w = self->pendingWatch_.find(streamId); w != self->pendingWatch_.end()) {
    TunnelWatchPtr watch = std::move(w->second);
    self->pendingWatch_.erase(w);
    endWatch(watch, true);
  }
  if (local != self->pendingLocal_.end()) {
    self->pendingLocal_.erase(local);
    if (self->cb_.onStreamFailed) {
      self->cb_.onStreamFailed(streamId,
                               Status::errorf("stream closed before a response ({})",
                                              nghttp2_http2_strerror(errorCode)));
    }
    hadPending = true;
  }
  Tunnel* t = self->tunnel(streamId);
  if (t == nullptr) {
    if (hadPending && self->cb_.onStreamCountChanged) self->cb_.onStreamCountChanged();
    return 0;
  }
  t->streamClosed_ = true;
  if (errorCode != NGHTTP2_NO_ERROR || !t->h2EndReceived_) {
    t->resetTcp_ = true;  // RST_STREAM: reset the TCP side too
    self->eraseTunnel(streamId);
  } else if (t->shutdownDone_ || !t->tcpShutdown_) {
    self->eraseTunnel(streamId);
  }
  // else: erased when the shutdown (after the queued writes) completes
  return 0;
}

Result<int32_t> H2Session::submitConnect(const Headers& headers, LocalSocket local,
                                         TunnelWatchPtr watch) {
  if (!acceptingStreams()) return Status::error("HBONE connection is closing");
  std::vector<nghttp2_nv> nva;
  nva.reserve(headers.size());
  for (const auto& [k, v] : headers) {
    nva.push_back({const_cast<uint8_t*>(reinterpret_cast<const uint8_t*>(k.data())),
                   const_cast<uint8_t*>(reinterpret_cast<const uint8_t*>(v.data())), k.size(),
                   v.size(), NGHTTP2_NV_FLAG_NONE});
  }
  // The request body is the tunnel: its data provider defers until the tunnel has bytes.
  nghttp2_data_provider prd{};
  prd.source.ptr = nullptr;
  prd.read_callback = readData;
  int32_t id = nghttp2_submit_request(h2_, nullptr, nva.data(), nva.size(), &prd, nullptr);
  if (id < 0) return Status::errorf("CONNECT submit: {}", nghttp2_strerror(id));
  pendingLocal_[id] = std::move(local);
  if (watch) pendingWatch_[id] = std::move(watch);
  idleSinceMs_ = 0;
  scheduleFlush();
  return id;
}

Status H2Session::respond(int32_t streamId, int status, uv_tcp_t* upstream,
                          TunnelWatchPtr watch) {
  auto it = pending_.find(streamId);
  if (it == pending_.end() || closing_) {
    if (upstream != nullptr) closeAndDelete(upstream, true);
    endWatch(watch, true);
    return Status::error("stream is gone");
  }
  pending_.erase(it);
  bool ended = pendingEnd_.erase(streamId) > 0;
  std::string code = std::to_string(status);
  nghttp2_nv nv = {const_cast<uint8_t*>(reinterpret_cast<const uint8_t*>(":status")),
                   const_cast<uint8_t*>(reinterpret_cast<const uint8_t*>(code.data())), 7,
                   code.size(), NGHTTP2_NV_FLAG_NONE};
  int rc;
  if (status == 200 && upstream != nullptr) {
    auto tun = std::make_unique<Tunnel>(this, streamId);
    Tunnel* t = tun.get();
    tunnels_[streamId] = std::move(tun);
    t->h2EndReceived_ = ended;
    nghttp2_data_provider prd{};
    prd.source.ptr = t;
    prd.read_callback = readData;
    rc = nghttp2_submit_response(h2_, streamId, &nv, 1, &prd);
    if (rc == 0) {
      t->setWatch(std::move(watch));
      t->attach(upstream);
    } else {
      // attach() never ran: the tunnel does not own the handle.
      closeAndDelete(upstream, true);
    }
  } else {
    if (upstream != nullptr) closeAndDelete(upstream, true);
    endWatch(watch, true);
    rc = nghttp2_submit_response(h2_, streamId, &nv, 1, nullptr);
  }
  if (rc != 0) {
    tunnels_.erase(streamId);
    endWatch(watch, true);
    return Status::errorf("response: {}", nghttp2_strerror(rc));
  }
  scheduleFlush();
  return Status::ok();
}

void H2Session::resetStream(int32_t streamId, uint32_t errorCode) {
  if (closing_) return;
  nghttp2_submit_rst_stream(h2_, NGHTTP2_FLAG_NONE, streamId, errorCode);
  scheduleFlush();
}

void H2Session::cleanup(const Status& why) {
  closing_ = true;
  for (auto& [id, t] : tunnels_) t->resetTcp_ = true;
  tunnels_.clear();
  pending_.clear();
  auto local = std::move(pendingLocal_);
  pendingLocal_.clear();
  auto watches = std::move(pendingWatch_);
  pendingWatch_.clear();
  for (auto& [id, w] : watches) endWatch(w, true);
  if (cb_.onStreamFailed) {
    for (auto& [id, fd] : local) cb_.onStreamFailed(id, why);
  }
  if (timer_ != nullptr) uv_timer_stop(timer_);
}

void H2Session::close(const Status& why) {
  if (closing_) return;
  cleanup(why);
  tls_->close(why);
}

void H2Session::onTlsClosed(const Status& st) {
  if (!closing_) cleanup(st);
  auto cb = std::move(cb_.onClosed);
  if (cb) cb(st);  // may destroy this
}

}  // namespace weft::hbone
