// OpenSSL 3 helpers shared by the agent's CA and the ztunnel's identity manager: RAII owners,
// PEM encode/decode, P-256 keys and CSRs, SPIFFE identities, certificate fields.
#pragma once

#include <openssl/evp.h>
#include <openssl/x509.h>

#include <chrono>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace weft::tls {

struct PkeyDeleter {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
struct X509Deleter {
  void operator()(X509* p) const { X509_free(p); }
};
struct X509ReqDeleter {
  void operator()(X509_REQ* p) const { X509_REQ_free(p); }
};
using PkeyPtr = std::unique_ptr<EVP_PKEY, PkeyDeleter>;
using X509Ptr = std::unique_ptr<X509, X509Deleter>;
using X509ReqPtr = std::unique_ptr<X509_REQ, X509ReqDeleter>;
using TimePoint = std::chrono::system_clock::time_point;

// Drains OpenSSL's error queue into one line ("<what>: <lib errors>"); "<what>" alone if empty.
Status opensslError(std::string_view what);

// A SPIFFE workload identity as Kubernetes meshes use it: spiffe://<td>/ns/<ns>/sa/<sa>.
struct Identity {
  std::string trust_domain;
  std::string ns;
  std::string sa;

  // Strict: exactly that shape, lowercase trust domain of [a-z0-9.-_], namespace and service
  // account of [a-zA-Z0-9.-_] (not "." or ".."), bounded lengths, nothing else.
  static Result<Identity> parse(std::string_view uri);
  std::string toString() const;
  bool operator==(const Identity&) const = default;
  auto operator<=>(const Identity&) const = default;
};

// A fresh ECDSA P-256 key.
Result<PkeyPtr> generateP256Key();
// True if the key is EC on prime256v1.
bool isP256(EVP_PKEY* key);

Result<std::string> keyToPem(EVP_PKEY* key);  // PKCS#8, unencrypted
Result<PkeyPtr> keyFromPem(std::string_view pem);
Result<std::string> certToPem(X509* cert);
// The first certificate in `pem`.
Result<X509Ptr> certFromPem(std::string_view pem);
// Every certificate in `pem`, in order; an error if none or if anything unparsable is in it.
Result<std::vector<X509Ptr>> certsFromPem(std::string_view pem);
Result<std::string> csrToPem(X509_REQ* csr);
Result<X509ReqPtr> csrFromPem(std::string_view pem);

// A CSR carrying `identity` as its only URI SAN, signed with `key` (SHA-256).
Result<X509ReqPtr> makeCsr(EVP_PKEY* key, const Identity& identity);

// URI subjectAltNames of a certificate / a CSR (its extension request), in order.
std::vector<std::string> uriSans(X509* cert);
Result<std::vector<std::string>> csrUriSans(X509_REQ* csr);

Result<TimePoint> notBefore(X509* cert);
Result<TimePoint> notAfter(X509* cert);
// The serial number as uppercase hex.
std::string serialHex(X509* cert);

// Reads a whole small file (bounded: `max_bytes`); errors name the path.
Result<std::string> readFile(const std::string& path, size_t max_bytes = 1 << 20);

}  // namespace weft::tls
