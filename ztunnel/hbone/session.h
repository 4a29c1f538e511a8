// One HBONE HTTP/2 connection (nghttp2 over TlsStream) and its CONNECT tunnels, each bridged to
// a TCP socket with HTTP/2 flow control, half-close and reset mapping. Shared by client and server.
#pragma once

#include <nghttp2/nghttp2.h>
#include <uv.h>

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/address.h"
#include "common/fd.h"
#include "common/status.h"
#include "ztunnel/hbone/chunk_pool.h"
#include "ztunnel/hbone/tls_stream.h"

namespace weft::hbone {

struct H2Settings {
  uint32_t streamWindow = 4u << 20;       // SETTINGS_INITIAL_WINDOW_SIZE
  uint32_t connectionWindow = 16u << 20;  // connection-level receive window
  uint32_t maxFrameSize = 1u << 20;       // SETTINGS_MAX_FRAME_SIZE
  uint32_t maxHeaderList = 64u << 10;     // SETTINGS_MAX_HEADER_LIST_SIZE
  uint32_t maxConcurrentStreams = 200;    // advertised (server)
  std::chrono::milliseconds pingInterval{10000};
  std::chrono::milliseconds pingTimeout{20000};
  std::chrono::milliseconds idleTimeout{300000};  // no streams for this long: close
  // Client: no streams for this long while the pool holds another connection to the same peer
  // that would take new streams (Callbacks::isSpare): close. A burst that opened many pooled
  // connections gives them back within seconds; one stays for the idleTimeout.
  std::chrono::milliseconds spareIdleTimeout{10000};
  // Bytes read from a tunnel's TCP socket and not yet sent as DATA; reading pauses above this.
  // The kernel's socket buffer behind it holds more; a bigger user-space buffer only spreads
  // the copies over more memory (4 streams at 1 MiB each ran the chunk pool dry).
  size_t tcpReadBound = 512u << 10;
  // Largest DATA payload we send (capped by the peer's SETTINGS_MAX_FRAME_SIZE): big frames
  // mean fewer frames, callbacks and (at the peer) socket writes per byte.
  uint32_t maxDataFrame = 128u << 10;
};

using Headers = std::vector<std::pair<std::string, std::string>>;

// The most one HBONE connection with `tunnels` tunnels holds for their bytes
// (H2Session::bufferedBytes()), however slow its readers: per tunnel, TCP -> HTTP/2 up to
// tcpReadBound plus one socket read (in whole chunks); HTTP/2 -> TCP up to the stream window per
// tunnel and the connection window over all; ciphertext up to TlsStream::kWriteBound plus one
// flush batch and one DATA frame; 64 KiB for staged plaintext, control frames and record overhead.
size_t bufferBound(const H2Settings& s, size_t tunnels);

class H2Session;

// The local end of a client tunnel until the server answers: a socket descriptor, or a libuv
// handle the caller already holds on this loop (then no dup, no second handle and no second
// epoll registration per tunnel). Dropped without becoming a tunnel, a handle is closed with a
// reset (RST) and freed, a descriptor just closed.
class LocalSocket {
 public:
  LocalSocket() = default;
  explicit LocalSocket(UniqueFd fd) : fd_(std::move(fd)) {}
  // `handle`: allocated with new, initialised on the session's loop, connected, not reading.
  explicit LocalSocket(uv_tcp_t* handle) : tcp_(handle) {}
  LocalSocket(LocalSocket&& o) noexcept;
  LocalSocket& operator=(LocalSocket&& o) noexcept;
  LocalSocket(const LocalSocket&) = delete;
  LocalSocket& operator=(const LocalSocket&) = delete;
  ~LocalSocket() { reset(); }
  bool valid() const { return tcp_ != nullptr || fd_.valid(); }
  // Hands over the handle for the tunnel: the one given, or a new one opened on the descriptor.
  Result<uv_tcp_t*> take(uv_loop_t* loop);
  void reset();

 private:
  UniqueFd fd_;
  uv_tcp_t* tcp_ = nullptr;
};

// What the owner of a proxied connection learns about one tunnel's TCP side (bytes each way,
// its end) and how it cuts it. Shared between the session and the owner; loop thread only.
struct TunnelWatch {
  uint64_t tcpToH2 = 0;  // bytes read from the TCP socket and sent into the tunnel
  uint64_t h2ToTcp = 0;  // bytes from the tunnel written to the TCP socket
  bool attached = false;  // a tunnel (200) existed
  bool ended = false;
  bool reset = false;  // ended by a reset / error on either side (or never attached)
  std::function<void()> onAttach;  // runs once, when the tunnel exists (200)
  std::function<void()> onEnd;  // runs once, when the tunnel is gone (or will never exist)
  std::function<void()> abort;  // set while the tunnel lives: resets it
};
using TunnelWatchPtr = std::shared_ptr<TunnelWatch>;
// Marks `w` ended (once) and runs its onEnd. Safe on null.
void endWatch(const TunnelWatchPtr& w, bool reset);

// One CONNECT stream bridged to a TCP socket.
class Tunnel {
 public:
  Tunnel(H2Session* session, int32_t streamId);
  ~Tunnel();
  // Takes a connected socket (or a uv handle already connected) and starts relaying.
  Status attach(uv_tcp_t* tcp);
  int32_t streamId() const { return streamId_; }
  void setStreamId(int32_t id) { streamId_ = id; }
  void setWatch(TunnelWatchPtr w);

 private:
  friend class H2Session;
  static void onAlloc(uv_handle_t* h, size_t suggested, uv_buf_t* buf);
  static void onRead(uv_stream_t* s, ssize_t n, const uv_buf_t* buf);
  void startReading();
  void stopReading();
  void writeToTcp(const uint8_t* data, size_t len);
  void maybeShutdownTcp();
  void closeTcp(bool reset);

  H2Session* session_;
  int32_t streamId_;
  TunnelWatchPtr watch_;
  uv_tcp_t* tcp_ = nullptr;
  bool reading_ = false;
  // Sends `len` bytes of toH2_ as the payload of a DATA frame (nghttp2's NO_COPY path).
  Status sendPayload(size_t len);
  void releaseChunks();

  std::deque<Chunk> toH2_;  // TCP bytes waiting to go out as DATA (the socket reads into back)
  size_t toH2Bytes_ = 0;
  bool tcpEof_ = false;    // TCP peer sent FIN: END_STREAM after toH2_ drains
  bool dataDeferred_ = false;
  bool h2EndReceived_ = false;  // END_STREAM from the peer: shutdown(SHUT_WR) after writes
  bool tcpShutdown_ = false;
  size_t tcpQueued_ = 0;  // bytes handed to uv_write, not yet written
  bool relaying_ = false;
  bool shutdownDone_ = false;
  bool streamClosed_ = false;
  bool resetTcp_ = false;
};

// An established (or establishing) HBONE connection.
class H2Session {
 public:
  enum class Role { kClient, kServer };
  struct Callbacks {
    // Server: a complete request header block on a new stream (the headers are the callee's).
    std::function<void(int32_t streamId, Headers&& headers)> onRequest;
    // Client: the response to a CONNECT.
    std::function<void(int32_t streamId, int status)> onResponse;
    // Client: a stream ended before a response (reset, connection lost).
    std::function<void(int32_t streamId, const Status& why)> onStreamFailed;
    // Client: the server refused a stream before answering it (RST_STREAM REFUSED_STREAM, or
    // the stream was above a GOAWAY's last stream id): it was not processed (RFC 9113 §8.7), so
    // it may be sent again. The local socket and watch come back. Unset: onStreamFailed runs.
    std::function<void(int32_t streamId, LocalSocket local, TunnelWatchPtr watch)>
        onStreamRefused;
    std::function<void(const Status&)> onHandshake;
    std::function<void()> onStreamCountChanged;
    // Client: whether this connection is a spare (see H2Settings::spareIdleTimeout); asked
    // only while it has no streams.
    std::function<bool()> isSpare;
    std::function<void(const Status&)> onClosed;  // may destroy the session
  };

  static Result<std::unique_ptr<H2Session>> create(uv_loop_t* loop, UniqueFd fd, Role role,
                                                   SslCtxPtr ctx, TlsStream::PeerCheck check,
                                                   H2Settings settings, Callbacks callbacks);
  ~H2Session();
  Status start();
  void close(const Status& why);

  // Client: opens a CONNECT stream; the returned id identifies it in callbacks.
  Result<int32_t> submitConnect(const Headers& headers, LocalSocket local,
                                TunnelWatchPtr watch = nullptr);
  // Server: answer with status; for 200 the upstream socket is bridged. A watch that gets no
  // tunnel (not 200, or the stream is gone) is ended at once.
  Status respond(int32_t streamId, int status, uv_tcp_t* upstream,
                 TunnelWatchPtr watch = nullptr);
  void resetStream(int32_t streamId, uint32_t errorCode);

  const std::string& peerIdentity() const { return tls_->peerIdentity(); }
  bool established() const { return tls_->established() && !goingAway_; }
  bool closing() const { return closing_; }
  // Tunnels, requests the server has not answered yet and (client) CONNECTs waiting for their
  // response: every stream that counts against the peer's SETTINGS_MAX_CONCURRENT_STREAMS.
  size_t activeStreams() const {
    return tunnels_.size() + pending_.size() + pendingLocal_.size();
  }
  // The peer's SETTINGS_MAX_CONCURRENT_STREAMS (unbounded until its SETTINGS arrive).
  size_t remoteMaxStreams() const;
  uv_loop_t* loop() const { return loop_; }
  bool acceptingStreams() const { return !closing_ && !goingAway_; }
  // Memory this connection holds for its tunnels' bytes right now: TCP -> HTTP/2 chunks
  // (whole chunks, as allocated), HTTP/2 -> TCP writes queued, staged plaintext and ciphertext
  // not yet written. Bounded: see docs/ARCHITECTURE.md "HBONE in the ztunnel".
  size_t bufferedBytes() const;

 private:
  friend class Tunnel;
  H2Session() = default;
  void onTlsHandshake(const Status& st);
  void onTlsData(const uint8_t* data, size_t len);
  void flush();
  // flush() once, before the loop next polls (see session.cc).
  void scheduleFlush();
  void onTimer();
  void touch();
  Tunnel* tunnel(int32_t id);
  void eraseTunnel(int32_t id);
  static ssize_t readData(nghttp2_session*, int32_t streamId, uint8_t* buf, size_t len,
                                uint32_t* flags, nghttp2_data_source* src, void* user);
  static int sendData(nghttp2_session*, nghttp2_frame* frame, const uint8_t* framehd,
                      size_t length, nghttp2_data_source* src, void* user);
  static ssize_t dataLength(nghttp2_session*, uint8_t frameType, int32_t streamId,
                            int32_t sessionWindow, int32_t streamWindow, uint32_t remoteMaxFrame,
                            void* user);
  // Plaintext into TLS so that records come out full (16 KiB): small pieces are staged until
  // they fill one, whole records of a large span go straight from the caller's memory.
  Status stage(const uint8_t* data, size_t len);
  Status writeStaged();

  static int onHeader(nghttp2_session*, const nghttp2_frame* f, const uint8_t* name,
                      size_t namelen, const uint8_t* value, size_t valuelen, uint8_t flags,
                      void* user);
  static int onBeginHeaders(nghttp2_session*, const nghttp2_frame* f, void* user);
  static int onFrameRecv(nghttp2_session*, const nghttp2_frame* f, void* user);
  static int onDataChunk(nghttp2_session*, uint8_t flags, int32_t streamId, const uint8_t* data,
                         size_t len, void* user);
  static int onStreamClose(nghttp2_session*, int32_t streamId, uint32_t errorCode, void* user);

  uv_loop_t* loop_ = nullptr;
  Role role_ = Role::kClient;
  H2Settings settings_;
  Callbacks cb_;
  std::unique_ptr<TlsStream> tls_;
  nghttp2_session* h2_ = nullptr;
  std::map<int32_t, std::unique_ptr<Tunnel>> tunnels_;
  std::map<int32_t, Headers> pending_;        // server: requests awaiting a decision
  std::map<int32_t, LocalSocket> pendingLocal_;  // client: local sockets awaiting the 200
  std::map<int32_t, TunnelWatchPtr> pendingWatch_;  // client: their watches
  // Takes a client stream's local socket (`local`, in pendingLocal_) and its watch, if any, out
  // of the pending maps.
  std::pair<LocalSocket, TunnelWatchPtr> takePending(
      std::map<int32_t, LocalSocket>::iterator local);
  std::map<int32_t, int> responseStatus_;     // client: :status seen
  std::map<int32_t, bool> pendingEnd_;        // server: request already carried END_STREAM
  std::map<int32_t, size_t> headerBytes_;     // bound on a request header block
  void onTlsClosed(const Status& st);
  void cleanup(const Status& why);
  uv_timer_t* timer_ = nullptr;
  uv_prepare_t* flusher_ = nullptr;  // runs a scheduled flush; active only while one is due
  bool flushScheduled_ = false;
  std::vector<uint8_t> staged_;  // HTTP/2 output not yet encrypted (see flush())
  Status sendError_;             // why sendData failed (it can only return a code)
  bool closing_ = false;
  bool goingAway_ = false;
  bool inFlush_ = false;
  uint64_t pingSentMs_ = 0;  // 0: no ping outstanding
  uint64_t lastPingMs_ = 0;
  uint64_t idleSinceMs_ = 0;
};

}  // namespace weft::hbone
