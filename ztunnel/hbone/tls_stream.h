// TLS 1.3 over a libuv TCP stream through memory BIOs, with Istio-compatible settings (ALPN h2,
// no SNI, mandatory client certificates, no resumption) and SPIFFE URI SAN peer checks.
#pragma once

#include <openssl/ssl.h>
#include <uv.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/fd.h"
#include "common/status.h"

namespace weft::hbone {

struct TlsWriteReq;

enum class TlsRole { kClient, kServer };

// Why a handshake failed, one reason per failed handshake (the label of
// weft_ztunnel_tls_refused_total). kNone: not refused (yet).
enum class TlsRefusal {
  kNone,
  kNoPeerCertificate,  // server: the client sent no certificate
  kUntrusted,          // chain does not verify against the roots (issuer, signature, ...)
  kExpired,            // a certificate of the chain is past notAfter
  kNotYetValid,        // a certificate of the chain is before notBefore
  kTrustDomain,        // server: the client's SPIFFE ID is of another trust domain
  kWrongIdentity,      // client: the server's SPIFFE ID is not the expected one
  kBadIdentity,        // no or malformed SPIFFE URI SAN
  kProtocol,           // anything else in the handshake: TLS version, ALPN, alerts, ...
};
inline constexpr size_t kTlsRefusalCount = static_cast<size_t>(TlsRefusal::kProtocol) + 1;
using TlsRefusalCounts = std::array<uint64_t, kTlsRefusalCount>;  // indexed by TlsRefusal

// "none", "no_peer_certificate", "untrusted", "expired", "not_yet_valid", "trust_domain",
// "wrong_identity", "bad_identity", "protocol".
const char* tlsRefusalName(TlsRefusal r);

// What a workload identity needs for mTLS: supplied by the identity manager (PEM text).
struct Credentials {
  std::string keyPem;
  std::string chainPem;  // leaf first, then intermediates
  std::string rootsPem;  // trust anchors for the peer's chain
};

struct SslCtxDeleter {
  void operator()(SSL_CTX* c) const { SSL_CTX_free(c); }
};
using SslCtxPtr = std::shared_ptr<SSL_CTX>;

// One SSL_CTX per role and credential set: TLS 1.3 only, AES-GCM suites, ALPN h2, client
// certificates required (server), chain verification against the roots, no tickets/resumption.
Result<SslCtxPtr> makeTlsContext(TlsRole role, const Credentials& creds);

// "spiffe://<td>/ns/<ns>/sa/<sa>" strictly; returns the trust domain or empty when malformed.
std::string spiffeTrustDomain(const std::string& uri);

// A TLS session on one TCP socket. The stream owns the socket; callbacks run on the loop thread.
// After onClosed has run the object may be destroyed (from inside onClosed too).
class TlsStream {
 public:
  struct Callbacks {
    std::function<void(const Status&)> onHandshake;              // ok or why refused
    std::function<void(const uint8_t* data, size_t len)> onData;  // decrypted bytes
    std::function<void()> onWritable;  // queued ciphertext fell below the bound again
    std::function<void(const Status&)> onClosed;  // the socket is gone
  };
  // Client: expectedPeer is the SPIFFE ID one URI SAN must equal. Server: trustDomain the
  // client's SPIFFE ID must belong to.
  struct PeerCheck {
    std::string expectedIdentity;
    std::string trustDomain;
    // Runs once when the handshake fails, just before onHandshake(error), with the reason.
    // Lives here so the owner of the counters (HboneServer/HboneClient) gets it through
    // H2Session, which passes the check on unchanged.
    std::function<void(TlsRefusal)> onRefused;
  };

  static Result<std::unique_ptr<TlsStream>> create(uv_loop_t* loop, UniqueFd fd, SslCtxPtr ctx,
                                                   TlsRole role, PeerCheck check,
                                                   Callbacks callbacks);
  ~TlsStream();
  TlsStream(const TlsStream&) = delete;
  TlsStream& operator=(const TlsStream&) = delete;

  // Starts reading; the client sends its ClientHello.
  Status start();
  // Encrypts and queues bytes (only after the handshake); len > 16 KiB makes full 16 KiB
  // records. With flushNow false the records stay in the output buffer until flush(): one
  // socket write for many HTTP/2 frames.
  Status write(const uint8_t* data, size_t len, bool flushNow = true);
  Status flush() { return flushCiphertext(); }
  // Ciphertext made and not yet handed to libuv.
  size_t pendingCiphertext() const { return out_.size(); }
  // Ciphertext handed to libuv and not yet written to the socket.
  size_t queuedBytes() const { return queued_; }
  bool writeBlocked() const { return queued_ >= kWriteBound; }
  void close(const Status& why);
  bool established() const { return established_; }
  bool closing() const { return closing_; }
  // The verified peer SPIFFE ID (after the handshake).
  const std::string& peerIdentity() const { return peerIdentity_; }
  // Why the handshake failed; kNone while it has not (or succeeded).
  TlsRefusal refusal() const { return refusal_; }
  // The verify callback's refusal, for the handshake error; the first one wins.
  void refuse(TlsRefusal why, std::string text);
  const PeerCheck& peerCheck() const { return check_; }
  TlsRole role() const { return role_; }

  static constexpr size_t kWriteBound = 1 << 20;
  static constexpr size_t kSpareWrites = 2;
  // Socket reads of ciphertext and the plaintext handed to onData at once, per loop thread.
  static constexpr size_t kReadBytes = 256 * 1024;

  // The BIO glue (tls_stream.cc): SSL reads ciphertext straight from the socket's read buffer
  // and writes records straight into out_, with no memory BIO copy in between.
  static int bioWrite(BIO* b, const char* data, int len);
  static int bioRead(BIO* b, char* data, int len);
  static long bioCtrl(BIO* b, int cmd, long num, void* ptr);

 private:
  TlsStream() = default;
  static void onAlloc(uv_handle_t* h, size_t suggested, uv_buf_t* buf);
  static void onRead(uv_stream_t* s, ssize_t n, const uv_buf_t* buf);
  void handleCiphertext(const char* data, size_t len);
  void driveHandshake();
  void readPlaintext();
  Status flushCiphertext();
  Status finishHandshake(TlsRefusal* why);
  void failHandshake(TlsRefusal why, const Status& st);

  uv_tcp_t* tcp_ = nullptr;
  SSL* ssl_ = nullptr;
  SslCtxPtr ctx_;
  TlsRole role_ = TlsRole::kClient;
  PeerCheck check_;
  Callbacks cb_;
  bool established_ = false;
  bool closing_ = false;
  size_t queued_ = 0;
  std::string peerIdentity_;
  std::string verifyError_;
  TlsRefusal refusal_ = TlsRefusal::kNone;
  Status closeStatus_;
  std::vector<TlsWriteReq*> spareWrites_;  // finished socket writes whose buffers are reused
  std::vector<char> out_;        // records made, not yet handed to uv_write
  const char* in_ = nullptr;     // ciphertext SSL has not read yet (the socket's read buffer)
  size_t inLen_ = 0;
  std::vector<char> inCarry_;    // ciphertext left unread when a read callback returned
};

}  // namespace weft::hbone
