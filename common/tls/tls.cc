// OpenSSL 3 helpers: every return code checked, errors carry OpenSSL's own error text.
#include "common/tls/tls.h"

#include <openssl/bio.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include <cerrno>
#include <cstdio>
#include <ctime>
#include <fstream>

namespace weft::tls {
namespace {

struct BioDeleter {
  void operator()(BIO* b) const { BIO_free(b); }
};
using BioPtr = std::unique_ptr<BIO, BioDeleter>;

BioPtr memBio(std::string_view data) {
  return BioPtr(BIO_new_mem_buf(data.data(), static_cast<int>(data.size())));
}

Result<std::string> bioContents(BIO* bio) {
  char* data = nullptr;
  long n = BIO_get_mem_data(bio, &data);
  if (n < 0 || data == nullptr) return opensslError("reading memory BIO");
  return std::string(data, static_cast<size_t>(n));
}

// Trust domain: lowercase letters, digits, '.', '-', '_' (SPIFFE spec).
bool validTrustDomain(std::string_view s) {
  if (s.empty() || s.size() > 255) return false;
  for (char c : s) {
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '-' || c == '_'))
      return false;
  }
  return true;
}

// A path segment: SPIFFE allows letters, digits, '.', '-', '_'; "." and ".." are not allowed.
bool validSegment(std::string_view s) {
  if (s.empty() || s.size() > 253 || s == "." || s == "..") return false;
  for (char c : s) {
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
          c == '.' || c == '-' || c == '_'))
      return false;
  }
  return true;
}

std::vector<std::string> urisOf(GENERAL_NAMES* names) {
  std::vector<std::string> out;
  if (names == nullptr) return out;
  for (int i = 0; i < sk_GENERAL_NAME_num(names); i++) {
    const GENERAL_NAME* gn = sk_GENERAL_NAME_value(names, i);
    if (gn->type != GEN_URI) continue;
    const ASN1_IA5STRING* s = gn->d.uniformResourceIdentifier;
    out.emplace_back(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                     static_cast<size_t>(ASN1_STRING_length(s)));
  }
  return out;
}

Result<TimePoint> asn1Time(const ASN1_TIME* t, const char* which) {
  struct tm tm {};
  if (t == nullptr || ASN1_TIME_to_tm(t, &tm) != 1) return opensslError(which);
  time_t secs = timegm(&tm);
  return std::chrono::system_clock::from_time_t(secs);
}

}  // namespace

Status opensslError(std::string_view what) {
  std::string text;
  unsigned long e;
  while ((e = ERR_get_error()) != 0) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    if (!text.empty()) text += "; ";
    text += buf;
  }
  if (text.empty()) return Status::error(std::string(what));
  return Status::errorf("{}: {}", what, text);
}

Result<Identity> Identity::parse(std::string_view uri) {
  constexpr std::string_view kScheme = "spiffe://";
  auto bad = [&](const char* why) {
    return Status::errorf("identity \"{}\": {}", uri.substr(0, 300), why);
  };
  if (uri.size() > 2048) return bad("too long");
  if (uri.substr(0, kScheme.size()) != kScheme) return bad("not a spiffe:// URI");
  std::string_view rest = uri.substr(kScheme.size());
  std::vector<std::string_view> parts;
  while (true) {
    size_t slash = rest.find('/');
    parts.push_back(rest.substr(0, slash));
    if (slash == std::string_view::npos) break;
    rest = rest.substr(slash + 1);
  }
  if (parts.size() != 5 || parts[1] != "ns" || parts[3] != "sa")
    return bad("want spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>");
  if (!validTrustDomain(parts[0])) return bad("invalid trust domain");
  if (!validSegment(parts[2])) return bad("invalid namespace");
  if (!validSegment(parts[4])) return bad("invalid service account");
  return Identity{std::string(parts[0]), std::string(parts[2]), std::string(parts[4])};
}

std::string Identity::toString() const {
  return "spiffe://" + trust_domain + "/ns/" + ns + "/sa/" + sa;
}

Result<PkeyPtr> generateP256Key() {
  PkeyPtr key(EVP_EC_gen("P-256"));
  if (!key) return opensslError("generating a P-256 key");
  return key;
}

bool isP256(EVP_PKEY* key) {
  if (key == nullptr || EVP_PKEY_is_a(key, "EC") != 1) return false;
  char group[64];
  size_t len = 0;
  if (EVP_PKEY_get_group_name(key, group, sizeof(group), &len) != 1) {
    ERR_clear_error();
    return false;
  }
  return std::string_view(group, len) == "prime256v1" || std::string_view(group, len) == "P-256";
}

Result<std::string> keyToPem(EVP_PKEY* key) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio) return opensslError("BIO_new");
  if (PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr, nullptr) != 1)
    return opensslError("encoding private key");
  return bioContents(bio.get());
}

Result<PkeyPtr> keyFromPem(std::string_view pem) {
  BioPtr bio = memBio(pem);
  if (!bio) return opensslError("BIO_new_mem_buf");
  PkeyPtr key(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  if (!key) return opensslError("parsing private key PEM");
  return key;
}

Result<std::string> certToPem(X509* cert) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio) return opensslError("BIO_new");
  if (PEM_write_bio_X509(bio.get(), cert) != 1) return opensslError("encoding certificate");
  return bioContents(bio.get());
}

Result<X509Ptr> certFromPem(std::string_view pem) {
  BioPtr bio = memBio(pem);
  if (!bio) return opensslError("BIO_new_mem_buf");
  X509Ptr cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (!cert) return opensslError("parsing certificate PEM");
  return cert;
}

Result<std::vector<X509Ptr>> certsFromPem(std::string_view pem) {
  std::vector<X509Ptr> out;
  // Parse block by block so trailing garbage is an error, not silently ignored.
  constexpr std::string_view kBegin = "-----BEGIN CERTIFICATE-----";
  constexpr std::string_view kEnd = "-----END CERTIFICATE-----";
  size_t pos = 0;
  while (true) {
    size_t b = pem.find("-----BEGIN", pos);
    if (b == std::string_view::npos) break;
    if (pem.substr(b, kBegin.size()) != kBegin)
      return Status::errorf("PEM block {} is not a CERTIFICATE", out.size() + 1);
    size_t e = pem.find(kEnd, b);
    if (e == std::string_view::npos)
      return Status::errorf("PEM block {} has no END line", out.size() + 1);
    e += kEnd.size();
    auto cert = certFromPem(pem.substr(b, e - b));
    if (!cert) return cert.status().context(fmt::format("certificate {}", out.size() + 1));
    out.push_back(std::move(cert.value()));
    pos = e;
    if (out.size() > 16) return Status::error("more than 16 certificates in a bundle");
  }
  if (out.empty()) return Status::error("no certificate in PEM");
  return out;
}

Result<std::string> csrToPem(X509_REQ* csr) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio) return opensslError("BIO_new");
  if (PEM_write_bio_X509_REQ(bio.get(), csr) != 1) return opensslError("encoding CSR");
  return bioContents(bio.get());
}

Result<X509ReqPtr> csrFromPem(std::string_view pem) {
  if (pem.size() > 64 * 1024) return Status::error("CSR larger than 64 KiB");
  BioPtr bio = memBio(pem);
  if (!bio) return opensslError("BIO_new_mem_buf");
  X509ReqPtr csr(PEM_read_bio_X509_REQ(bio.get(), nullptr, nullptr, nullptr));
  if (!csr) return opensslError("parsing CSR PEM");
  return csr;
}

Result<X509ReqPtr> makeCsr(EVP_PKEY* key, const Identity& identity) {
  X509ReqPtr csr(X509_REQ_new());
  if (!csr) return opensslError("X509_REQ_new");
  if (X509_REQ_set_version(csr.get(), 0) != 1) return opensslError("X509_REQ_set_version");
  if (X509_REQ_set_pubkey(csr.get(), key) != 1) return opensslError("X509_REQ_set_pubkey");
  STACK_OF(X509_EXTENSION)* exts = sk_X509_EXTENSION_new_null();
  if (exts == nullptr) return opensslError("sk_X509_EXTENSION_new_null");
  std::string san = "URI:" + identity.toString();
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, nullptr, NID_subject_alt_name, san.c_str());
  if (ext == nullptr || sk_X509_EXTENSION_push(exts, ext) == 0) {
    if (ext) X509_EXTENSION_free(ext);
    sk_X509_EXTENSION_pop_free(exts, X509_EXTENSION_free);
    return opensslError("building CSR subjectAltName");
  }
  int rc = X509_REQ_add_extensions(csr.get(), exts);
  sk_X509_EXTENSION_pop_free(exts, X509_EXTENSION_free);
  if (rc != 1) return opensslError("X509_REQ_add_extensions");
  if (X509_REQ_sign(csr.get(), key, EVP_sha256()) <= 0) return opensslError("signing CSR");
  return csr;
}

std::vector<std::string> uriSans(X509* cert) {
  auto* names = static_cast<GENERAL_NAMES*>(
      X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr));
  std::vector<std::string> out = urisOf(names);
  if (names) GENERAL_NAMES_free(names);
  return out;
}

Result<std::vector<std::string>> csrUriSans(X509_REQ* csr) {
  STACK_OF(X509_EXTENSION)* exts = X509_REQ_get_extensions(csr);
  std::vector<std::string> out;
  if (exts == nullptr) {
    ERR_clear_error();  // no extension request at all
    return out;
  }
  int idx = X509v3_get_ext_by_NID(exts, NID_subject_alt_name, -1);
  if (idx >= 0) {
    auto* names = static_cast<GENERAL_NAMES*>(
        X509V3_EXT_d2i(X509v3_get_ext(exts, idx)));
    if (names == nullptr) {
      sk_X509_EXTENSION_pop_free(exts, X509_EXTENSION_free);
      return opensslError("decoding CSR subjectAltName");
    }
    out = urisOf(names);
    GENERAL_NAMES_free(names);
    if (X509v3_get_ext_by_NID(exts, NID_subject_alt_name, idx) >= 0) {
      sk_X509_EXTENSION_pop_free(exts, X509_EXTENSION_free);
      return Status::error("CSR has more than one subjectAltName extension");
    }
  }
  sk_X509_EXTENSION_pop_free(exts, X509_EXTENSION_free);
  return out;
}

Result<TimePoint> notBefore(X509* cert) { return asn1Time(X509_get0_notBefore(cert), "notBefore"); }
Result<TimePoint> notAfter(X509* cert) { return asn1Time(X509_get0_notAfter(cert), "notAfter"); }

std::string serialHex(X509* cert) {
  BIGNUM* bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(cert), nullptr);
  if (bn == nullptr) {
    ERR_clear_error();
    return "";
  }
  char* hex = BN_bn2hex(bn);
  std::string out = hex ? hex : "";
  OPENSSL_free(hex);
  BN_free(bn);
  return out;
}

Result<std::string> readFile(const std::string& path, size_t max_bytes) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return Status::error("open " + path + ": " + errnoText(errno));
  std::string out;
  char buf[8192];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) {
    out.append(buf, n);
    if (out.size() > max_bytes) {
      std::fclose(f);
      return Status::errorf("{}: larger than {} bytes", path, max_bytes);
    }
  }
  bool err = std::ferror(f) != 0;
  std::fclose(f);
  if (err) return Status::error("read " + path + ": I/O error");
  return out;
}

}  // namespace weft::tls
