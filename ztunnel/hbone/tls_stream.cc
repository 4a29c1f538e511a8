// TLS over libuv through a BIO of our own: SSL reads ciphertext straight from the socket's read
// buffer and appends records to a buffer that goes to uv_write as is. Peer identity is checked in
// the verify callback so a wrong identity fails the handshake with an alert.
#include "ztunnel/hbone/tls_stream.h"

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>

#include <cstring>
#include <vector>

#include "ztunnel/hbone/buffer_pools.h"

namespace weft::hbone {
namespace {

constexpr char kCiphers[] = "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256";
constexpr unsigned char kAlpnH2[] = {2, 'h', '2'};

// Drains OpenSSL's error queue into one line. noPeerCertificate (optional) is set when one of
// the errors is the server's "peer did not return a certificate".
std::string sslErrors(bool* noPeerCertificate = nullptr) {
  std::string out;
  unsigned long e;
  while ((e = ERR_get_error()) != 0) {
    if (noPeerCertificate != nullptr && ERR_GET_LIB(e) == ERR_LIB_SSL &&
        ERR_GET_REASON(e) == SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE) {
      *noPeerCertificate = true;
    }
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    if (!out.empty()) out += "; ";
    out += buf;
  }
  return out.empty() ? "unknown TLS error" : out;
}

int exIndex() {
  static int idx = SSL_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
  return idx;
}

std::vector<std::string> uriSans(X509* cert) {
  std::vector<std::string> out;
  auto* names = static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name,
                                                             nullptr, nullptr));
  if (names == nullptr) return out;
  for (int i = 0; i < sk_GENERAL_NAME_num(names); ++i) {
    GENERAL_NAME* n = sk_GENERAL_NAME_value(names, i);
    if (n->type != GEN_URI) continue;
    const ASN1_IA5STRING* s = n->d.uniformResourceIdentifier;
    out.emplace_back(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                     static_cast<size_t>(ASN1_STRING_length(s)));
  }
  GENERAL_NAMES_free(names);
  return out;
}

// OpenSSL's chain verdicts as refusal reasons: validity dates have their own, the rest (no
// issuer among the roots, bad signature, self-signed, chain too long, ...) is "untrusted".
TlsRefusal chainRefusal(int x509Error) {
  switch (x509Error) {
    case X509_V_ERR_CERT_HAS_EXPIRED: return TlsRefusal::kExpired;
    case X509_V_ERR_CERT_NOT_YET_VALID: return TlsRefusal::kNotYetValid;
    default: return TlsRefusal::kUntrusted;
  }
}

// The SPIFFE rule on the leaf's URI SANs. kNone = acceptable, *accepted = the SAN that was.
// Client: one SAN equals the expected identity. Server: one SAN is a strict SPIFFE ID of the
// trust domain. Otherwise the reason depends on whether any SAN was a SPIFFE ID at all.
TlsRefusal identityRefusal(TlsRole role, const TlsStream::PeerCheck& check,
                           const std::vector<std::string>& sans, std::string* accepted,
                           std::string* why) {
  bool anySpiffe = false;
  for (const auto& s : sans) {
    std::string td = spiffeTrustDomain(s);
    anySpiffe = anySpiffe || !td.empty();
    bool ok = role == TlsRole::kClient ? s == check.expectedIdentity
                                       : !td.empty() && td == check.trustDomain;
    if (ok) {
      if (accepted != nullptr) *accepted = s;
      return TlsRefusal::kNone;
    }
  }
  if (!anySpiffe) {
    *why = "peer certificate has no well-formed SPIFFE URI SAN (spiffe://<td>/ns/<ns>/sa/<sa>)";
    return TlsRefusal::kBadIdentity;
  }
  if (role == TlsRole::kClient) {
    *why = "server identity is not " + check.expectedIdentity;
    return TlsRefusal::kWrongIdentity;
  }
  *why = "client has no SPIFFE identity in trust domain " + check.trustDomain;
  return TlsRefusal::kTrustDomain;
}

// Chain verification is OpenSSL's; at the leaf we add the SPIFFE identity rule. Both kinds of
// refusal are recorded on the stream with their reason before failing the handshake.
int verifyCallback(int preverifyOk, X509_STORE_CTX* store) {
  auto* ssl = static_cast<SSL*>(
      X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx()));
  auto* self = static_cast<TlsStream*>(SSL_get_ex_data(ssl, exIndex()));
  if (self == nullptr) return 0;
  if (!preverifyOk) {
    int err = X509_STORE_CTX_get_error(store);
    self->refuse(chainRefusal(err), std::string("peer certificate chain refused: ") +
                                        X509_verify_cert_error_string(err));
    return 0;
  }
  if (X509_STORE_CTX_get_error_depth(store) != 0) return 1;
  X509* leaf = X509_STORE_CTX_get_current_cert(store);
  std::string why;
  TlsRefusal r = identityRefusal(self->role(), self->peerCheck(), uriSans(leaf), nullptr, &why);
  if (r == TlsRefusal::kNone) return 1;
  self->refuse(r, why);
  X509_STORE_CTX_set_error(store, X509_V_ERR_APPLICATION_VERIFICATION);
  return 0;
}

int alpnSelect(SSL*, const unsigned char** out, unsigned char* outlen, const unsigned char* in,
               unsigned int inlen, void*) {
  // The client's list is length-prefixed names; only "h2" is acceptable.
  unsigned int i = 0;
  while (i < inlen) {
    unsigned int n = in[i];
    if (i + 1 + n > inlen) break;
    if (n == 2 && std::memcmp(in + i + 1, "h2", 2) == 0) {
      *out = in + i + 1;
      *outlen = 2;
      return SSL_TLSEXT_ERR_OK;
    }
    i += 1 + n;
  }
  return SSL_TLSEXT_ERR_ALERT_FATAL;
}

// The BIO both ways: a memory BIO would cost a copy in (BIO_write) and a copy out (BIO_read)
// of every byte. Made once per process; never freed (BIO_meth objects are tiny and shared).
BIO_METHOD* ioMethod() {
  static BIO_METHOD* method = [] {
    BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "weft-tls-io");
    if (m == nullptr) return m;
    if (BIO_meth_set_write(m, TlsStream::bioWrite) != 1 ||
        BIO_meth_set_read(m, TlsStream::bioRead) != 1 ||
        BIO_meth_set_ctrl(m, TlsStream::bioCtrl) != 1 ||
        BIO_meth_set_create(m, [](BIO* b) {
          BIO_set_init(b, 1);
          return 1;
        }) != 1) {
      BIO_meth_free(m);
      return static_cast<BIO_METHOD*>(nullptr);
    }
    return m;
  }();
  return method;
}

// The loop thread's read buffers: ciphertext from the socket, plaintext for onData. A stream
// uses them only within one read callback, and read callbacks do not nest.
struct ReadBuffers {
  std::unique_ptr<char[]> cipher{new char[TlsStream::kReadBytes]};
  std::unique_ptr<uint8_t[]> plain{new uint8_t[TlsStream::kReadBytes]};
  bool plainInUse = false;
};
ReadBuffers& readBuffers() {
  static thread_local ReadBuffers buffers;
  return buffers;
}

// Output smaller than this waits while a socket write is in flight (flushCiphertext).
constexpr size_t kDeferBelow = 256 * 1024;

}  // namespace

// One socket write of ciphertext; its buffer goes back to the pool when the write is done.
struct TlsWriteReq {
  uv_write_t req;
  std::vector<char> data;
  size_t bytes = 0;  // handed to uv_write: data minus what a uv_try_write already sent
};

int TlsStream::bioWrite(BIO* b, const char* data, int len) {
  auto* self = static_cast<TlsStream*>(BIO_get_data(b));
  BIO_clear_retry_flags(b);
  if (self == nullptr || len < 0) return -1;
  // Never refuses: the HTTP/2 layer stops producing while writeBlocked() (the bound). A full
  // buffer goes to the socket first, so buffers never grow (no realloc, no fresh pages).
  if (!self->out_.empty() &&
      self->out_.size() + static_cast<size_t>(len) > CipherBufferPool::kBytes) {
    Status st = self->flushCiphertext();
    if (!st) return -1;
  }
  if (self->out_.capacity() == 0) self->out_ = CipherBufferPool::local().take();
  self->out_.insert(self->out_.end(), data, data + len);
  return len;
}

int TlsStream::bioRead(BIO* b, char* data, int len) {
  auto* self = static_cast<TlsStream*>(BIO_get_data(b));
  BIO_clear_retry_flags(b);
  if (self == nullptr || len < 0) return -1;
  if (self->inLen_ == 0) {
    BIO_set_retry_read(b);  // SSL_ERROR_WANT_READ: wait for the socket
    return -1;
  }
  size_t n = std::min(self->inLen_, static_cast<size_t>(len));
  std::memcpy(data, self->in_, n);
  self->in_ += n;
  self->inLen_ -= n;
  return static_cast<int>(n);
}

long TlsStream::bioCtrl(BIO* b, int cmd, long, void*) {
  auto* self = static_cast<TlsStream*>(BIO_get_data(b));
  switch (cmd) {
    case BIO_CTRL_FLUSH: return 1;
    case BIO_CTRL_PENDING: return self == nullptr ? 0 : static_cast<long>(self->inLen_);
    case BIO_CTRL_WPENDING: return self == nullptr ? 0 : static_cast<long>(self->out_.size());
    default: return 0;
  }
}

const char* tlsRefusalName(TlsRefusal r) {
  switch (r) {
    case TlsRefusal::kNone: return "none";
    case TlsRefusal::kNoPeerCertificate: return "no_peer_certificate";
    case TlsRefusal::kUntrusted: return "untrusted";
    case TlsRefusal::kExpired: return "expired";
    case TlsRefusal::kNotYetValid: return "not_yet_valid";
    case TlsRefusal::kTrustDomain: return "trust_domain";
    case TlsRefusal::kWrongIdentity: return "wrong_identity";
    case TlsRefusal::kBadIdentity: return "bad_identity";
    case TlsRefusal::kProtocol: return "protocol";
  }
  return "protocol";
}

std::string spiffeTrustDomain(const std::string& uri) {
  constexpr std::string_view kPrefix = "spiffe://";
  if (uri.size() > 2048 || uri.compare(0, kPrefix.size(), kPrefix) != 0) return "";
  std::string rest = uri.substr(kPrefix.size());
  // td / ns / <ns> / sa / <sa>: exactly five non-empty segments.
  std::vector<std::string> parts;
  size_t start = 0;
  while (true) {
    size_t slash = rest.find('/', start);
    parts.push_back(rest.substr(start, slash == std::string::npos ? std::string::npos
                                                                  : slash - start));
    if (slash == std::string::npos) break;
    start = slash + 1;
  }
  if (parts.size() != 5 || parts[1] != "ns" || parts[3] != "sa") return "";
  for (const auto& p : parts) {
    if (p.empty()) return "";
  }
  return parts[0];
}

Result<SslCtxPtr> makeTlsContext(TlsRole role, const Credentials& creds) {
  SSL_CTX* raw = SSL_CTX_new(role == TlsRole::kClient ? TLS_client_method() : TLS_server_method());
  if (raw == nullptr) return Status::error("SSL_CTX_new: " + sslErrors());
  SslCtxPtr ctx(raw, SslCtxDeleter{});
  if (SSL_CTX_set_min_proto_version(raw, TLS1_3_VERSION) != 1 ||
      SSL_CTX_set_max_proto_version(raw, TLS1_3_VERSION) != 1) {
    return Status::error("TLS version bounds: " + sslErrors());
  }
  if (SSL_CTX_set_ciphersuites(raw, kCiphers) != 1) {
    return Status::error("TLS 1.3 cipher suites: " + sslErrors());
  }
  // No resumption: every connection does a full handshake with certificates.
  SSL_CTX_set_options(raw, SSL_OP_NO_TICKET);
  SSL_CTX_set_session_cache_mode(raw, SSL_SESS_CACHE_OFF);
  if (SSL_CTX_set_num_tickets(raw, 0) != 1) return Status::error("tickets: " + sslErrors());

  BIO* kb = BIO_new_mem_buf(creds.keyPem.data(), static_cast<int>(creds.keyPem.size()));
  EVP_PKEY* key = kb ? PEM_read_bio_PrivateKey(kb, nullptr, nullptr, nullptr) : nullptr;
  BIO_free(kb);
  if (key == nullptr) return Status::error("credentials key: not a PEM private key");
  int rc = SSL_CTX_use_PrivateKey(raw, key);
  EVP_PKEY_free(key);
  if (rc != 1) return Status::error("credentials key: " + sslErrors());

  BIO* cb = BIO_new_mem_buf(creds.chainPem.data(), static_cast<int>(creds.chainPem.size()));
  if (cb == nullptr) return Status::error("credentials chain: out of memory");
  X509* leaf = PEM_read_bio_X509(cb, nullptr, nullptr, nullptr);
  if (leaf == nullptr) {
    BIO_free(cb);
    return Status::error("credentials chain: no PEM certificate");
  }
  rc = SSL_CTX_use_certificate(raw, leaf);
  X509_free(leaf);
  while (rc == 1) {
    X509* extra = PEM_read_bio_X509(cb, nullptr, nullptr, nullptr);
    if (extra == nullptr) break;
    if (SSL_CTX_add0_chain_cert(raw, extra) != 1) {
      X509_free(extra);
      rc = 0;
    }
  }
  BIO_free(cb);
  ERR_clear_error();  // the chain loop ends on a PEM "no start line"
  if (rc != 1) return Status::error("credentials chain: " + sslErrors());
  if (SSL_CTX_check_private_key(raw) != 1) {
    return Status::error("credentials: key does not match the leaf certificate");
  }

  X509_STORE* store = SSL_CTX_get_cert_store(raw);
  BIO* rb = BIO_new_mem_buf(creds.rootsPem.data(), static_cast<int>(creds.rootsPem.size()));
  int roots = 0;
  while (rb != nullptr) {
    X509* root = PEM_read_bio_X509(rb, nullptr, nullptr, nullptr);
    if (root == nullptr) break;
    if (X509_STORE_add_cert(store, root) == 1) ++roots;
    X509_free(root);
  }
  BIO_free(rb);
  ERR_clear_error();
  if (roots == 0) return Status::error("credentials roots: no PEM certificate");

  if (role == TlsRole::kClient) {
    if (SSL_CTX_set_alpn_protos(raw, kAlpnH2, sizeof(kAlpnH2)) != 0) {
      return Status::error("ALPN: " + sslErrors());
    }
    SSL_CTX_set_verify(raw, SSL_VERIFY_PEER, verifyCallback);
  } else {
    SSL_CTX_set_alpn_select_cb(raw, alpnSelect, nullptr);
    SSL_CTX_set_verify(raw, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, verifyCallback);
  }
  return ctx;
}

Result<std::unique_ptr<TlsStream>> TlsStream::create(uv_loop_t* loop, UniqueFd fd,
                                                     SslCtxPtr ctx, TlsRole role,
                                                     PeerCheck check, Callbacks callbacks) {
  std::unique_ptr<TlsStream> s(new TlsStream());
  s->ctx_ = std::move(ctx);
  s->role_ = role;
  s->check_ = std::move(check);
  s->cb_ = std::move(callbacks);
  s->ssl_ = SSL_new(s->ctx_.get());
  if (s->ssl_ == nullptr) return Status::error("SSL_new: " + sslErrors());
  BIO_METHOD* method = ioMethod();
  BIO* io = method == nullptr ? nullptr : BIO_new(method);
  if (io == nullptr) return Status::error("BIO_new: " + sslErrors());
  BIO_set_data(io, s.get());
  SSL_set_bio(s->ssl_, io, io);  // one BIO both ways: SSL holds one reference per direction
  // Read as many records as the BIO has per call instead of a header, then a body.
  SSL_set_read_ahead(s->ssl_, 1);
  SSL_set_ex_data(s->ssl_, exIndex(), s.get());
  if (role == TlsRole::kClient) {
    SSL_set_connect_state(s->ssl_);  // no SSL_set_tlsext_host_name: no SNI, as Istio
  } else {
    SSL_set_accept_state(s->ssl_);
  }
  auto* tcp = new uv_tcp_t{};
  int rc = uv_tcp_init(loop, tcp);
  if (rc != 0) {
    delete tcp;
    return Status::errorf("uv_tcp_init: {}", uv_strerror(rc));
  }
  tcp->data = s.get();
  s->tcp_ = tcp;
  rc = uv_tcp_open(tcp, fd.get());
  if (rc != 0) return Status::errorf("uv_tcp_open: {}", uv_strerror(rc));
  fd.release();
  uv_tcp_nodelay(tcp, 1);
  return s;
}

TlsStream::~TlsStream() {
  if (tcp_ != nullptr) {
    tcp_->data = nullptr;
    if (!uv_is_closing(reinterpret_cast<uv_handle_t*>(tcp_))) {
      uv_close(reinterpret_cast<uv_handle_t*>(tcp_),
               [](uv_handle_t* h) { delete reinterpret_cast<uv_tcp_t*>(h); });
    }
    // else: the pending close callback frees it and sees data == nullptr.
  }
  if (ssl_ != nullptr) SSL_free(ssl_);
  for (TlsWriteReq* w : spareWrites_) delete w;
}

Status TlsStream::start() {
  int rc = uv_read_start(reinterpret_cast<uv_stream_t*>(tcp_), onAlloc, onRead);
  if (rc != 0) return Status::errorf("uv_read_start: {}", uv_strerror(rc));
  if (role_ == TlsRole::kClient) driveHandshake();
  return Status::ok();
}

void TlsStream::onAlloc(uv_handle_t*, size_t, uv_buf_t* buf) {
  buf->base = readBuffers().cipher.get();
  buf->len = kReadBytes;
}

void TlsStream::onRead(uv_stream_t* s, ssize_t n, const uv_buf_t* buf) {
  auto* self = static_cast<TlsStream*>(s->data);
  if (self == nullptr || self->closing_) return;
  if (n < 0) {
    self->close(n == UV_EOF ? Status::error("peer closed the connection")
                            : Status::errorf("read: {}", uv_strerror(static_cast<int>(n))));
    return;
  }
  if (n > 0) self->handleCiphertext(buf->base, static_cast<size_t>(n));
}

void TlsStream::handleCiphertext(const char* data, size_t len) {
  // SSL reads from (in_, inLen_) through bioRead. Whatever it leaves (only when something
  // stopped reading early) is carried to the next read, in order.
  if (!inCarry_.empty()) {
    inCarry_.insert(inCarry_.end(), data, data + len);
    data = inCarry_.data();
    len = inCarry_.size();
  }
  in_ = data;
  inLen_ = len;
  if (!established_) driveHandshake();
  if (established_ && !closing_) readPlaintext();
  if (inLen_ > 0 && !closing_) {
    if (in_ != inCarry_.data()) {
      std::vector<char> rest(in_, in_ + inLen_);
      inCarry_.swap(rest);
    } else {
      inCarry_.resize(inLen_);
    }
  } else {
    inCarry_.clear();
  }
  in_ = nullptr;
  inLen_ = 0;
}

void TlsStream::refuse(TlsRefusal why, std::string text) {
  if (refusal_ != TlsRefusal::kNone) return;
  refusal_ = why;
  verifyError_ = std::move(text);
}

void TlsStream::driveHandshake() {
  int rc = SSL_do_handshake(ssl_);
  if (rc == 1) {
    TlsRefusal why = TlsRefusal::kNone;
    Status st = finishHandshake(&why);
    Status fl = flushCiphertext();
    if (!st) {
      failHandshake(why, st);
      return;
    }
    if (!fl) {
      close(fl);
      return;
    }
    established_ = true;
    if (cb_.onHandshake) cb_.onHandshake(Status::ok());
    return;
  }
  int err = SSL_get_error(ssl_, rc);
  Status fl = flushCiphertext();  // handshake messages, or the alert on failure
  if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
    if (!fl) close(fl);
    return;
  }
  // Not refused by our verify callback: a certificate the server required and did not get, or
  // the handshake itself (version, ALPN, an alert from the peer, a malformed message).
  bool noPeerCertificate = false;
  std::string errors = sslErrors(&noPeerCertificate);
  ERR_clear_error();
  TlsRefusal why = noPeerCertificate && role_ == TlsRole::kServer
                       ? TlsRefusal::kNoPeerCertificate
                       : TlsRefusal::kProtocol;
  std::string text = verifyError_.empty() ? errors : verifyError_;
  failHandshake(why, Status::error("TLS handshake failed: " + text));
}

// One failed handshake: one reason (the verify callback's, when it refused), reported to the
// counter before the owner hears of the failure.
void TlsStream::failHandshake(TlsRefusal why, const Status& st) {
  if (refusal_ == TlsRefusal::kNone) {
    refusal_ = why == TlsRefusal::kNone ? TlsRefusal::kProtocol : why;
  }
  if (check_.onRefused) check_.onRefused(refusal_);
  if (cb_.onHandshake) cb_.onHandshake(st);
  close(st);
}

// Checks after OpenSSL completed the handshake. The verify callback has already enforced the
// chain and the identity; these are the belt and braces (and ALPN, which OpenSSL lets a client
// complete without).
Status TlsStream::finishHandshake(TlsRefusal* why) {
  const unsigned char* alpn = nullptr;
  unsigned int alpnLen = 0;
  SSL_get0_alpn_selected(ssl_, &alpn, &alpnLen);
  if (alpnLen != 2 || std::memcmp(alpn, "h2", 2) != 0) {
    *why = TlsRefusal::kProtocol;
    return Status::error("TLS handshake failed: peer did not negotiate ALPN h2");
  }
  X509* peer = SSL_get1_peer_certificate(ssl_);
  if (peer == nullptr) {
    *why = TlsRefusal::kNoPeerCertificate;
    return Status::error("TLS handshake failed: no peer certificate");
  }
  std::vector<std::string> sans = uriSans(peer);
  X509_free(peer);
  long verified = SSL_get_verify_result(ssl_);
  if (verified != X509_V_OK) {
    *why = chainRefusal(static_cast<int>(verified));
    return Status::error("TLS handshake failed: peer certificate not verified");
  }
  std::string text;
  *why = identityRefusal(role_, check_, sans, &peerIdentity_, &text);
  if (*why != TlsRefusal::kNone) return Status::error("TLS handshake failed: " + text);
  return Status::ok();
}

void TlsStream::readPlaintext() {
  // Records are gathered into one buffer and handed over together: nghttp2 then sees whole
  // large DATA frames and the tunnel writes them to its socket in one call each.
  ReadBuffers& rb = readBuffers();
  uint8_t small[16 * 1024];
  bool own = !rb.plainInUse;
  uint8_t* buf = own ? rb.plain.get() : small;
  size_t cap = own ? kReadBytes : sizeof(small);
  rb.plainInUse = rb.plainInUse || own;
  size_t have = 0;
  auto deliver = [&] {
    if (have > 0 && cb_.onData && !closing_) cb_.onData(buf, have);
    have = 0;
  };
  while (!closing_) {
    if (cap - have < 16 * 1024) deliver();
    if (closing_) break;
    size_t n = 0;
    int rc = SSL_read_ex(ssl_, buf + have, cap - have, &n);
    if (rc == 1) {
      have += n;
      continue;
    }
    // The reason first: onData below runs SSL_write, which would overwrite it.
    int err = SSL_get_error(ssl_, rc);
    std::string failure;
    if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_ZERO_RETURN) {
      failure = verifyError_.empty() ? sslErrors() : verifyError_;
      ERR_clear_error();
    }
    deliver();
    if (closing_) break;
    Status fl = flushCiphertext();  // e.g. key updates
    if (!fl) {
      close(fl);
      break;
    }
    if (err == SSL_ERROR_WANT_READ) break;
    if (err == SSL_ERROR_ZERO_RETURN) {
      close(Status::error("peer sent close_notify"));
      break;
    }
    close(Status::error("TLS read: " + failure));
    break;
  }
  if (own) rb.plainInUse = false;
}

Status TlsStream::write(const uint8_t* data, size_t len, bool flushNow) {
  if (closing_) return Status::error("TLS stream closing");
  if (!established_) return Status::error("TLS write before the handshake completed");
  size_t off = 0;
  while (off < len) {
    // SSL_write_ex cuts len into full 16 KiB records and (our BIO never blocks) takes it all.
    size_t n = 0;
    if (SSL_write_ex(ssl_, data + off, len - off, &n) != 1 || n == 0) {
      return Status::error("SSL_write: " + sslErrors());
    }
    off += n;
  }
  return flushNow ? flushCiphertext() : Status::ok();
}

Status TlsStream::flushCiphertext() {
  if (out_.empty() || tcp_ == nullptr) return Status::ok();
  // While a write is still in flight, small output waits for it (the write callback sends it):
  // it would only queue behind that write, and many small writes would each hold a buffer.
  if (queued_ > 0 && out_.size() < kDeferBelow && !closing_) return Status::ok();
  // Nothing in flight: the socket first. What the kernel takes whole needs no write request,
  // no completion callback on the next loop turn and no epoll change (libuv re-arms the
  // watcher after every uv_write completion: one epoll_ctl per write).
  size_t sent = 0;
  if (queued_ == 0) {
    uv_buf_t direct = uv_buf_init(out_.data(), static_cast<unsigned>(out_.size()));
    int n = uv_try_write(reinterpret_cast<uv_stream_t*>(tcp_), &direct, 1);
    if (n < 0 && n != UV_EAGAIN) return Status::errorf("write: {}", uv_strerror(n));
    if (n > 0) sent = static_cast<size_t>(n);
    if (sent == out_.size()) {
      CipherBufferPool::local().give(std::move(out_));
      out_ = std::vector<char>();
      return Status::ok();
    }
  }
  TlsWriteReq* w = nullptr;
  if (!spareWrites_.empty()) {
    w = spareWrites_.back();
    spareWrites_.pop_back();
  } else {
    w = new TlsWriteReq{};
  }
  // The records change hands without a copy; the next record takes a buffer from the pool.
  w->data = std::move(out_);
  out_ = std::vector<char>();
  size_t n = w->data.size() - sent;
  w->bytes = n;
  uv_buf_t b = uv_buf_init(w->data.data() + sent, static_cast<unsigned>(n));
  int rc = uv_write(&w->req, reinterpret_cast<uv_stream_t*>(tcp_), &b, 1,
                    [](uv_write_t* req, int status) {
                      auto* wr = reinterpret_cast<TlsWriteReq*>(req);
                      size_t sz = wr->bytes;
                      CipherBufferPool::local().give(std::move(wr->data));
                      auto* self = static_cast<TlsStream*>(req->handle->data);
                      if (self == nullptr || self->spareWrites_.size() >= kSpareWrites) {
                        delete wr;
                      } else {
                        self->spareWrites_.push_back(wr);
                      }
                      if (self == nullptr) return;
                      bool wasBlocked = self->writeBlocked();
                      self->queued_ -= sz;
                      if (status != 0) {
                        if (!self->closing_) {
                          self->close(Status::errorf("write: {}", uv_strerror(status)));
                        }
                        return;
                      }
                      if (self->queued_ == 0 && !self->out_.empty() && !self->closing_) {
                        Status st = self->flushCiphertext();  // what waited for this write
                        if (!st) {
                          self->close(st);
                          return;
                        }
                      }
                      if (wasBlocked && !self->writeBlocked() && self->cb_.onWritable) {
                        self->cb_.onWritable();
                      }
                    });
  if (rc != 0) {
    delete w;
    return Status::errorf("uv_write: {}", uv_strerror(rc));
  }
  queued_ += n;
  return Status::ok();
}

void TlsStream::close(const Status& why) {
  if (closing_) return;
  closing_ = true;
  closeStatus_ = why;
  if (tcp_ == nullptr) return;
  if (established_) {
    SSL_shutdown(ssl_);  // close_notify, best effort, queued before the close
    flushCiphertext();
  }
  uv_read_stop(reinterpret_cast<uv_stream_t*>(tcp_));
  uv_close(reinterpret_cast<uv_handle_t*>(tcp_), [](uv_handle_t* h) {
    auto* self = static_cast<TlsStream*>(h->data);
    delete reinterpret_cast<uv_tcp_t*>(h);
    if (self == nullptr) return;
    self->tcp_ = nullptr;
    auto cb = std::move(self->cb_.onClosed);
    Status st = self->closeStatus_;
    if (cb) cb(st);  // may destroy self
  });
}

}  // namespace weft::hbone
