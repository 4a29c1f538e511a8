// HBONE client: pooled TLS+HTTP/2 connections and CONNECT streams. A connection is dialled
// with libuv, then handed (as a dup of its fd) to an H2Session that does TLS and HTTP/2.
#include "ztunnel/hbone/client.h"

#include <algorithm>
#include <random>

#include <fcntl.h>
#include <openssl/rand.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/log.h"

namespace weft::hbone {
namespace {

struct Deferred {
  uv_timer_t timer;
  std::function<void()> fn;
};

struct DialOp {
  uv_connect_t req;
  uv_tcp_t* tcp = nullptr;
  std::shared_ptr<bool> alive;
  uint64_t serial = 0;
  OutboundConnect out;
  std::function<void(uint64_t, int, UniqueFd, OutboundConnect)> done;
};

void closeTcp(uv_tcp_t* tcp) {
  tcp->data = nullptr;
  if (uv_is_closing(reinterpret_cast<uv_handle_t*>(tcp))) return;
  uv_close(reinterpret_cast<uv_handle_t*>(tcp),
           [](uv_handle_t* h) { delete reinterpret_cast<uv_tcp_t*>(h); });
}

}  // namespace

size_t HboneClient::Conn::load() const {
  return waiting.size() + (session ? session->activeStreams() : 0);
}

HboneClient::HboneClient(uv_loop_t* loop, ClientConfig config)
    : loop_(loop), config_(std::move(config)) {}

HboneClient::~HboneClient() {
  *alive_ = false;
  for (auto& [serial, c] : conns_) {
    if (c->connecting != nullptr) closeTcp(c->connecting);
  }
  conns_.clear();
}

size_t HboneClient::bufferedBytes() const {
  size_t n = 0;
  for (const auto& [serial, c] : conns_) {
    if (c->session) n += c->session->bufferedBytes();
  }
  return n;
}

void HboneClient::later(uv_loop_t* loop, std::function<void()> fn) {
  auto* d = new Deferred{};
  d->fn = std::move(fn);
  if (uv_timer_init(loop, &d->timer) != 0) {
    auto f = std::move(d->fn);
    delete d;
    f();  // cannot defer: run now rather than lose it
    return;
  }
  d->timer.data = d;
  uv_timer_start(&d->timer, [](uv_timer_t* t) {
    auto* dd = static_cast<Deferred*>(t->data);
    auto f = std::move(dd->fn);
    uv_close(reinterpret_cast<uv_handle_t*>(t),
             [](uv_handle_t* h) { delete static_cast<Deferred*>(h->data); });
    f();
  }, 0, 0);
}

std::string HboneClient::poolKey(const OutboundConnect& req) {
  return req.sourceIdentity + "#" + req.credentialsVersion + "|" + req.destinationIdentity + "|" +
         req.hboneAddress.toString();
}

namespace {

// Random ids for traceparent: xoshiro256** per thread, seeded once from OpenSSL's RNG. Asking
// RAND_bytes per CONNECT cost a getpid() system call (its fork check) and a DRBG round each
// time; trace ids need to be unique and unguessable in practice, not secret keys.
class TraceIdSource {
 public:
  static TraceIdSource& local() {
    static thread_local TraceIdSource source;
    return source;
  }
  uint64_t next() {
    uint64_t result = rotl(s_[1] * 5, 7) * 9;
    uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }

 private:
  TraceIdSource() {
    if (RAND_bytes(reinterpret_cast<unsigned char*>(s_), sizeof(s_)) != 1) {
      std::random_device rd;
      for (auto& x : s_) x = (uint64_t{rd()} << 32) ^ rd();
    }
    if ((s_[0] | s_[1] | s_[2] | s_[3]) == 0) s_[0] = 1;  // the one state xoshiro cannot leave
  }
  static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t s_[4];
};

void putHex(char* out, uint64_t v) {
  static const char* hex = "0123456789abcdef";
  for (int i = 15; i >= 0; --i) {
    out[i] = hex[v & 15];
    v >>= 4;
  }
}

}  // namespace

std::string HboneClient::makeTraceparent() {
  // "00-" + 32 hex (trace id) + "-" + 16 hex (span id) + "-00"; all-zero ids are invalid.
  TraceIdSource& rng = TraceIdSource::local();
  uint64_t hi = rng.next(), lo = rng.next(), span = rng.next();
  if ((hi | lo) == 0) lo = 1;
  if (span == 0) span = 1;
  std::string out(55, '-');
  out[0] = '0';
  out[1] = '0';
  putHex(&out[3], hi);
  putHex(&out[19], lo);
  putHex(&out[36], span);
  out[53] = '0';
  out[54] = '0';
  return out;
}

void HboneClient::open(const OutboundConnect& req, UniqueFd local, ConnectDone done) {
  openLocal(req, LocalSocket(std::move(local)), std::move(done));
}

void HboneClient::open(const OutboundConnect& req, uv_tcp_t* local, ConnectDone done) {
  openLocal(req, LocalSocket(local), std::move(done));
}

void HboneClient::openLocal(const OutboundConnect& req, LocalSocket local, ConnectDone done) {
  Headers h = {{":method", "CONNECT"}, {":authority", req.target.toString()}};
  if (req.forwardedFor.port() != 0) {
    h.emplace_back("forwarded", "for=\"" + req.forwardedFor.toString() + "\"");
  }
  if (!req.baggage.empty()) h.emplace_back("baggage", req.baggage);
  h.emplace_back("traceparent", req.traceparent.empty() ? makeTraceparent() : req.traceparent);
  route(poolKey(req), req, Waiter{std::move(h), std::move(local), std::move(done), req.watch});
}

void HboneClient::route(const std::string& key, const OutboundConnect& req, Waiter w) {
  Conn* c = pick(key);
  if (c == nullptr) {
    Status err;
    c = dial(req, &err);
    if (c == nullptr) {
      later(loop_, [done = std::move(w.done), err]() { done(0, err); });
      return;
    }
  }
  if (!c->ready) {
    c->waiting.push_back(std::move(w));
    return;
  }
  auto id = c->session->submitConnect(w.headers, std::move(w.local), std::move(w.watch));
  if (!id) {
    later(loop_, [done = std::move(w.done), err = id.status()]() { done(0, err); });
    return;
  }
  c->streams[id.value()] = Sent{std::move(w.done), std::move(w.headers), w.retries};
}

void HboneClient::retryRefused(uint64_t serial, int32_t id, LocalSocket local,
                               TunnelWatchPtr watch) {
  auto i = conns_.find(serial);
  if (i == conns_.end()) return;
  Conn* c = i->second.get();
  auto s = c->streams.find(id);
  if (s == c->streams.end()) return;
  Sent sent = std::move(s->second);
  c->streams.erase(s);
  if (sent.retries >= config_.maxRefusedRetries) {
    later(loop_, [done = std::move(sent.done), n = sent.retries + 1]() {
      done(0, Status::errorf("HBONE CONNECT refused unanswered by the server ({} times)", n));
    });
    return;
  }
  ++streamRetries_;
  // Sent again from the loop, not inside this session's callback: the retry may dial, or go
  // back onto this connection, whose stream limit is known by now.
  auto w = std::make_shared<Waiter>(Waiter{std::move(sent.headers), std::move(local),
                                           std::move(sent.done), std::move(watch),
                                           sent.retries + 1});
  later(loop_, [this, alive = alive_, key = c->key, origin = c->origin, w]() {
    if (*alive) route(key, *origin, std::move(*w));
  });
}

HboneClient::Conn* HboneClient::pick(const std::string& key) {
  for (auto& [serial, c] : conns_) {
    if (c->key != key || c->dead) continue;
    if (c->session && !c->session->acceptingStreams()) continue;
    // Streams past the server's limit would sit in nghttp2's queue until others end, which a
    // long-lived tunnel may never do: such a connection is full.
    size_t limit = config_.maxStreamsPerConnection;
    if (c->session) limit = std::min(limit, c->session->remoteMaxStreams());
    if (c->load() >= limit) continue;
    return c.get();
  }
  return nullptr;
}

HboneClient::Conn* HboneClient::dial(const OutboundConnect& req, Status* err) {
  if (!req.ctx) {
    *err = Status::error("HBONE: no client TLS context for " + req.sourceIdentity);
    return nullptr;
  }
  Result<UniqueFd> sock =
      req.makeSocket ? req.makeSocket(req.hboneAddress)
                     : Result<UniqueFd>(UniqueFd(::socket(
                           req.hboneAddress.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
                           0)));
  if (!sock || sock->get() < 0) {
    *err = sock ? Status::error("HBONE socket: " + errnoText(errno))
                : sock.status().context("HBONE socket");
    return nullptr;
  }
  auto* op = new DialOp{};
  op->tcp = new uv_tcp_t{};
  int rc = uv_tcp_init(loop_, op->tcp);
  if (rc != 0) {
    delete op->tcp;
    delete op;
    *err = Status::errorf("uv_tcp_init: {}", uv_strerror(rc));
    return nullptr;
  }
  rc = uv_tcp_open(op->tcp, sock->get());
  if (rc == 0) {
    sock->release();
    sockaddr_storage ss{};
    req.hboneAddress.toSockaddr(&ss);
    op->alive = alive_;
    op->serial = nextSerial_;
    op->out = req;
    op->out.watch = nullptr;  // the dial serves the pool, not this stream
    op->done = [this](uint64_t serial, int status, UniqueFd fd, OutboundConnect out) {
      onTcpConnected(serial, status, std::move(fd), std::move(out));
    };
    rc = uv_tcp_connect(&op->req, op->tcp, reinterpret_cast<sockaddr*>(&ss),
                        [](uv_connect_t* r, int status) {
                          auto* o = reinterpret_cast<DialOp*>(r);
                          UniqueFd fd;
                          if (status == 0) {
                            uv_os_fd_t raw;
                            if (uv_fileno(reinterpret_cast<uv_handle_t*>(o->tcp), &raw) == 0) {
                              fd.reset(::fcntl(raw, F_DUPFD_CLOEXEC, 0));
                            }
                            if (fd.get() < 0) status = UV_EBADF;
                          }
                          closeTcp(o->tcp);
                          if (*o->alive) o->done(o->serial, status, std::move(fd), o->out);
                          delete o;
                        });
  }
  if (rc != 0) {
    closeTcp(op->tcp);
    delete op;
    *err = Status::errorf("HBONE connect to {}: {}", req.hboneAddress.toString(),
                          uv_strerror(rc));
    return nullptr;
  }
  auto c = std::make_unique<Conn>();
  c->serial = nextSerial_++;
  c->key = poolKey(req);
  auto origin = std::make_shared<OutboundConnect>(req);
  origin->watch = nullptr;  // the connection serves the pool, not that stream
  c->origin = std::move(origin);
  c->connecting = op->tcp;
  Conn* raw = c.get();
  conns_[c->serial] = std::move(c);
  return raw;
}

void HboneClient::onTcpConnected(uint64_t serial, int status, UniqueFd fd, OutboundConnect req) {
  auto it = conns_.find(serial);
  if (it == conns_.end()) return;
  Conn* c = it->second.get();
  c->connecting = nullptr;
  if (status != 0) {
    fail(serial, Status::errorf("HBONE connect to {}: {}", req.hboneAddress.toString(),
                                uv_strerror(status)));
    return;
  }
  c->connected = true;
  H2Session::Callbacks cb;
  cb.onHandshake = [this, serial](const Status& st) {
    auto i = conns_.find(serial);
    if (i == conns_.end()) return;
    if (!st) {
      ++handshakeFailures_;
      spdlog::info("hbone client: {}", st.message());
      return;  // the session closes; onClosed fails the waiters with this reason
    }
    ++handshakes_;
    i->second->ready = true;
    submitWaiting(i->second.get());
  };
  cb.onResponse = [this, serial](int32_t id, int st) {
    auto i = conns_.find(serial);
    if (i == conns_.end()) return;
    auto s = i->second->streams.find(id);
    if (s == i->second->streams.end()) return;
    ConnectDone done = std::move(s->second.done);
    i->second->streams.erase(s);
    Status err = st == 200 ? Status::ok() : Status::errorf("HBONE CONNECT answered {}", st);
    later(loop_, [done = std::move(done), st, err]() { done(st, err); });
  };
  cb.onStreamFailed = [this, serial](int32_t id, const Status& why) {
    auto i = conns_.find(serial);
    if (i == conns_.end()) return;
    auto s = i->second->streams.find(id);
    if (s == i->second->streams.end()) return;
    ConnectDone done = std::move(s->second.done);
    i->second->streams.erase(s);
    later(loop_, [done = std::move(done), why]() { done(0, why); });
  };
  cb.onStreamRefused = [this, serial](int32_t id, LocalSocket local, TunnelWatchPtr watch) {
    retryRefused(serial, id, std::move(local), std::move(watch));
  };
  cb.onClosed = [this, serial](const Status& why) { fail(serial, why); };
  cb.isSpare = [this, serial]() { return isSpare(serial); };
  TlsStream::PeerCheck check;
  check.expectedIdentity = req.destinationIdentity;
  check.onRefused = [this](TlsRefusal why) { ++refused_[static_cast<size_t>(why)]; };
  auto s = H2Session::create(loop_, std::move(fd), H2Session::Role::kClient, req.ctx, check,
                             config_.settings, std::move(cb));
  if (!s) {
    fail(serial, s.status());
    return;
  }
  c->session = std::move(s.value());
  Status st = c->session->start();
  if (!st) fail(serial, st);
}

bool HboneClient::isSpare(uint64_t serial) const {
  auto it = conns_.find(serial);
  if (it == conns_.end()) return false;
  // Another established connection to the same peer that was dialled first: pick() offers new
  // streams to it before this one (conns_ is in serial order), so this one only serves bursts.
  // The first one is never a spare and stays for the idle timeout.
  for (const auto& [other, c] : conns_) {
    if (other >= serial) break;
    if (c->key == it->second->key && c->ready && !c->dead && c->session &&
        c->session->acceptingStreams())
      return true;
  }
  return false;
}

void HboneClient::submitWaiting(Conn* c) {
  auto waiting = std::move(c->waiting);
  c->waiting.clear();
  for (auto& w : waiting) {
    auto id = c->session->submitConnect(w.headers, std::move(w.local), std::move(w.watch));
    if (!id) {
      later(loop_, [done = std::move(w.done), err = id.status()]() { done(0, err); });
      continue;
    }
    c->streams[id.value()] = Sent{std::move(w.done), std::move(w.headers), w.retries};
  }
}

void HboneClient::fail(uint64_t serial, const Status& why) {
  auto it = conns_.find(serial);
  if (it == conns_.end()) return;
  std::unique_ptr<Conn> c = std::move(it->second);
  conns_.erase(it);
  for (auto& w : c->waiting) {
    later(loop_, [done = std::move(w.done), why]() { done(0, why); });
  }
  for (auto& [id, sent] : c->streams) {
    later(loop_, [done = std::move(sent.done), why]() { done(0, why); });
  }
  c->waiting.clear();
  c->streams.clear();
  if (c->session && !c->session->closing()) {
    // Not from the session's own onClosed: close it and let it go once closed.
    H2Session* raw = c->session.release();
    raw->close(why);
    // The session's onClosed (fail again) finds no entry; free it after its close completes.
    later(loop_, [raw]() { delete raw; });
  }
  // From onClosed the session is destroyed here with c, after its callback copy ran.
}

}  // namespace weft::hbone
