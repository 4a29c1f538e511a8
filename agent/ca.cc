// CertificateAuthority: root generation and storage, file-backed CA with hot reload, CSR signing.
#include "agent/ca.h"

#include "common/fd.h"

#include <fcntl.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <ctime>
#include <filesystem>

namespace weft::agent {
namespace {

constexpr const char* kKeyFile = "ca-key.pem";
constexpr const char* kCertFile = "ca-cert.pem";

std::string isoTime(tls::TimePoint t) {
  time_t secs = std::chrono::system_clock::to_time_t(t);
  struct tm tm {};
  gmtime_r(&secs, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

// Writes via a temp file + rename so a crash never leaves half a key; mode set before data.
Status writeFileAtomic(const std::string& path, const std::string& data, mode_t mode) {
  std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  if (fd < 0) return Status::error("create " + tmp + ": " + errnoText(errno));
  UniqueFd guard(fd);
  if (::fchmod(fd, mode) != 0) return Status::error("chmod " + tmp + ": " + errnoText(errno));
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::error("write " + tmp + ": " + errnoText(errno));
    }
    off += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) return Status::error("fsync " + tmp + ": " + errnoText(errno));
  guard.reset();
  if (::rename(tmp.c_str(), path.c_str()) != 0)
    return Status::error("rename " + tmp + ": " + errnoText(errno));
  return Status::ok();
}

Status addExt(X509* cert, X509V3_CTX* ctx, int nid, const std::string& value) {
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, ctx, nid, value.c_str());
  if (ext == nullptr) return tls::opensslError(std::string("building extension ") + OBJ_nid2sn(nid));
  int rc = X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
  if (rc != 1) return tls::opensslError(std::string("adding extension ") + OBJ_nid2sn(nid));
  return Status::ok();
}

Status randomSerial(X509* cert) {
  unsigned char bytes[16];
  if (RAND_bytes(bytes, sizeof(bytes)) != 1) return tls::opensslError("RAND_bytes");
  bytes[0] &= 0x7f;  // positive
  bytes[0] |= 0x01;  // and a full 16 bytes, never a short/zero serial
  BIGNUM* bn = BN_bin2bn(bytes, sizeof(bytes), nullptr);
  if (bn == nullptr) return tls::opensslError("BN_bin2bn");
  ASN1_INTEGER* serial = BN_to_ASN1_INTEGER(bn, nullptr);
  BN_free(bn);
  if (serial == nullptr) return tls::opensslError("BN_to_ASN1_INTEGER");
  int rc = X509_set_serialNumber(cert, serial);
  ASN1_INTEGER_free(serial);
  if (rc != 1) return tls::opensslError("X509_set_serialNumber");
  return Status::ok();
}

Status setValidity(X509* cert, tls::TimePoint from, tls::TimePoint to) {
  if (ASN1_TIME_set(X509_getm_notBefore(cert), std::chrono::system_clock::to_time_t(from)) ==
          nullptr ||
      ASN1_TIME_set(X509_getm_notAfter(cert), std::chrono::system_clock::to_time_t(to)) == nullptr)
    return tls::opensslError("setting validity");
  return Status::ok();
}

bool selfSigned(X509* cert) {
  return X509_check_issued(cert, cert) == X509_V_OK;
}

Result<tls::X509Ptr> makeRoot(EVP_PKEY* key, const std::string& trust_domain,
                              std::chrono::seconds validity) {
  tls::X509Ptr cert(X509_new());
  if (!cert) return tls::opensslError("X509_new");
  if (X509_set_version(cert.get(), 2) != 1) return tls::opensslError("X509_set_version");
  if (Status s = randomSerial(cert.get()); !s) return s;
  auto now = std::chrono::system_clock::now();
  if (Status s = setValidity(cert.get(), now - std::chrono::minutes(1), now + validity); !s)
    return s;
  X509_NAME* name = X509_get_subject_name(cert.get());
  if (X509_NAME_add_entry_by_txt(name, "O", MBSTRING_UTF8,
                                 reinterpret_cast<const unsigned char*>(trust_domain.c_str()), -1,
                                 -1, 0) != 1 ||
      X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                                 reinterpret_cast<const unsigned char*>("Weft Root CA"), -1, -1,
                                 0) != 1)
    return tls::opensslError("building root subject");
  if (X509_set_issuer_name(cert.get(), name) != 1) return tls::opensslError("set issuer");
  if (X509_set_pubkey(cert.get(), key) != 1) return tls::opensslError("X509_set_pubkey");
  X509V3_CTX ctx;
  X509V3_set_ctx(&ctx, cert.get(), cert.get(), nullptr, nullptr, 0);
  for (auto [nid, value] : {std::pair{NID_basic_constraints, "critical,CA:TRUE"},
                            std::pair{NID_key_usage, "critical,keyCertSign,cRLSign"},
                            std::pair{NID_subject_key_identifier, "hash"},
                            std::pair{NID_authority_key_identifier, "keyid:always"}}) {
    if (Status s = addExt(cert.get(), &ctx, nid, value); !s) return s;
  }
  if (X509_sign(cert.get(), key, EVP_sha256()) <= 0) return tls::opensslError("signing root");
  return cert;
}

}  // namespace

Result<std::unique_ptr<CertificateAuthority>> CertificateAuthority::create(CaOptions options) {
  if (options.default_ttl.count() <= 0) return Status::error("certificate TTL must be > 0");
  std::unique_ptr<CertificateAuthority> ca(new CertificateAuthority(std::move(options)));
  const CaOptions& o = ca->options_;
  if (!o.ca_cert_file.empty() || !o.ca_key_file.empty()) {
    if (o.ca_cert_file.empty() || o.ca_key_file.empty())
      return Status::error("--ca-cert and --ca-key must be given together");
    ca->stats_.file_backed = true;
    ca->stats_.source = o.ca_cert_file;
    ca->stamps_ = ca->stamps();
    auto loaded = ca->loadFiles();
    if (!loaded) return loaded.status();
    ca->install(std::move(loaded.value()));
  } else {
    if (o.ca_dir.empty()) return Status::error("no CA: give --ca-dir or --ca-cert/--ca-key");
    ca->stats_.source = o.ca_dir;
    if (Status s = ca->loadEmbedded(); !s) return s;
  }
  return ca;
}

Status CertificateAuthority::loadEmbedded() {
  const std::string& dir = options_.ca_dir;
  std::error_code ec;
  auto parent = std::filesystem::path(dir).parent_path();
  if (!parent.empty()) std::filesystem::create_directories(parent, ec);
  if (ec) return Status::errorf("mkdir {}: {}", parent.string(), ec.message());
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST)
    return Status::error("mkdir " + dir + ": " + errnoText(errno));
  // Agents sharing one --ca-dir may start together: one generates, the others wait and load.
  UniqueFd lock(::open((dir + "/.lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  if (!lock.valid()) return Status::error("open " + dir + "/.lock: " + errnoText(errno));
  while (::flock(lock.get(), LOCK_EX) != 0) {
    if (errno != EINTR) return Status::error("flock " + dir + "/.lock: " + errnoText(errno));
  }
  std::string key_path = dir + "/" + kKeyFile;
  std::string cert_path = dir + "/" + kCertFile;
  struct stat st {};
  bool have_key = ::stat(key_path.c_str(), &st) == 0;
  bool have_cert = ::access(cert_path.c_str(), F_OK) == 0;
  if (have_key != have_cert)
    return Status::errorf("{}: only one of {} and {} exists; refusing to guess (remove both to "
                          "generate a new root)", dir, kKeyFile, kCertFile);
  if (!have_key) {
    auto key = tls::generateP256Key();
    if (!key) return key.status();
    auto cert = makeRoot(key->get(), options_.trust_domain, options_.root_validity);
    if (!cert) return cert.status();
    auto key_pem = tls::keyToPem(key->get());
    auto cert_pem = tls::certToPem(cert->get());
    if (!key_pem) return key_pem.status();
    if (!cert_pem) return cert_pem.status();
    if (Status s = writeFileAtomic(key_path, key_pem.value(), 0600); !s) return s;
    if (Status s = writeFileAtomic(cert_path, cert_pem.value(), 0644); !s) return s;
    spdlog::info("generated a new root CA for {} in {}", options_.trust_domain, dir);
  } else if ((st.st_mode & 077) != 0) {
    spdlog::warn("{}: mode {:o} is readable by others; should be 0600", key_path,
                 st.st_mode & 0777);
  }
  options_.ca_cert_file = cert_path;
  options_.ca_key_file = key_path;
  auto loaded = loadFiles();
  options_.ca_cert_file.clear();
  options_.ca_key_file.clear();
  if (!loaded) return loaded.status();
  if (!selfSigned(loaded->cert.get()))
    return Status::error(cert_path + ": the embedded CA certificate is not self-signed");
  install(std::move(loaded.value()));
  return Status::ok();
}

Result<CertificateAuthority::Loaded> CertificateAuthority::loadFiles() const {
  Loaded out;
  const std::string& cert_path = options_.ca_cert_file;
  const std::string& key_path = options_.ca_key_file;
  auto cert_pem = tls::readFile(cert_path);
  if (!cert_pem) return cert_pem.status();
  auto key_pem = tls::readFile(key_path);
  if (!key_pem) return key_pem.status();
  auto certs = tls::certsFromPem(cert_pem.value());
  if (!certs) return certs.status().context(cert_path);
  auto key = tls::keyFromPem(key_pem.value());
  if (!key) return key.status().context(key_path);
  out.cert = std::move(certs->front());
  out.key = std::move(key.value());
  if (X509_check_private_key(out.cert.get(), out.key.get()) != 1)
    return tls::opensslError(key_path + ": key does not match the certificate in " + cert_path);
  if (X509_check_ca(out.cert.get()) == 0)
    return Status::error(cert_path + ": not a CA certificate (basicConstraints CA:TRUE missing)");
  auto not_after = tls::notAfter(out.cert.get());
  if (!not_after) return not_after.status().context(cert_path);
  if (not_after.value() <= std::chrono::system_clock::now())
    return Status::error(cert_path + ": CA certificate expired on " + isoTime(not_after.value()));

  // Everything above the signing certificate: extra certs in the cert file, then the chain file.
  std::vector<tls::X509Ptr> above;
  for (size_t i = 1; i < certs->size(); i++) above.push_back(std::move((*certs)[i]));
  if (!options_.ca_chain_file.empty()) {
    auto chain_pem = tls::readFile(options_.ca_chain_file);
    if (!chain_pem) return chain_pem.status();
    auto chain = tls::certsFromPem(chain_pem.value());
    if (!chain) return chain.status().context(options_.ca_chain_file);
    for (auto& c : chain.value()) above.push_back(std::move(c));
  }
  std::vector<X509*> all{out.cert.get()};
  for (auto& c : above) all.push_back(c.get());
  // Each certificate must be issued by the next; the last must be a self-signed root.
  for (size_t i = 0; i + 1 < all.size(); i++) {
    if (X509_check_issued(all[i + 1], all[i]) != X509_V_OK)
      return Status::errorf("{}: certificate {} of the CA chain is not issued by the next one",
                            cert_path, i + 1);
  }
  if (!selfSigned(all.back()))
    return Status::error(cert_path + ": the CA chain does not end in a self-signed root (give "
                         "--ca-chain with the certificates up to the root)");
  for (size_t i = 0; i < all.size(); i++) {
    auto pem = tls::certToPem(all[i]);
    if (!pem) return pem.status();
    if (i + 1 == all.size())
      out.roots_pem = pem.value();
    else
      out.chain_pem += pem.value();
  }
  return out;
}

void CertificateAuthority::install(Loaded loaded) {
  key_ = std::move(loaded.key);
  cert_ = std::move(loaded.cert);
  chain_pem_ = std::move(loaded.chain_pem);
  roots_pem_ = std::move(loaded.roots_pem);
  char buf[256];
  X509_NAME_oneline(X509_get_subject_name(cert_.get()), buf, sizeof(buf));
  stats_.ca_subject = buf;
  auto na = tls::notAfter(cert_.get());
  stats_.ca_not_after = na ? isoTime(na.value()) : "";
}

std::vector<CertificateAuthority::FileStamp> CertificateAuthority::stamps() const {
  std::vector<FileStamp> out;
  for (const std::string* p :
       {&options_.ca_cert_file, &options_.ca_key_file, &options_.ca_chain_file}) {
    FileStamp fs;
    struct stat st {};
    if (!p->empty() && ::stat(p->c_str(), &st) == 0) {
      fs.ino = st.st_ino;
      fs.size = st.st_size;
      fs.mtime_ns = int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
    }
    out.push_back(fs);
  }
  return out;
}

Status CertificateAuthority::reloadIfChanged() {
  if (!stats_.file_backed) return Status::ok();
  auto now = stamps();
  if (now == stamps_) return Status::ok();
  stamps_ = now;
  auto loaded = loadFiles();
  if (!loaded) {
    stats_.reload_errors++;
    stats_.last_reload_error = loaded.status().message();
    spdlog::error("CA reload rejected, the previous CA stays in force: {}",
                  loaded.status().message());
    return loaded.status();
  }
  install(std::move(loaded.value()));
  stats_.reloads++;
  stats_.last_reload_error.clear();
  spdlog::info("CA reloaded from {}: {}", options_.ca_cert_file, stats_.ca_subject);
  return Status::ok();
}

Status CertificateAuthority::startWatching(uv_loop_t* loop, std::chrono::milliseconds interval) {
  if (!stats_.file_backed) return Status::ok();
  watch_timer_ = std::make_unique<UvHandle<uv_timer_t>>();
  if (int rc = watch_timer_->init(uv_timer_init(loop, watch_timer_->get())); rc != 0)
    return Status::errorf("uv_timer_init: {}", uv_strerror(rc));
  watch_timer_->get()->data = this;
  uint64_t ms = static_cast<uint64_t>(interval.count());
  if (int rc = uv_timer_start(
          watch_timer_->get(),
          [](uv_timer_t* t) { static_cast<CertificateAuthority*>(t->data)->reloadIfChanged(); },
          ms, ms);
      rc != 0)
    return Status::errorf("uv_timer_start: {}", uv_strerror(rc));
  return Status::ok();
}

Result<IssuedCertificate> CertificateAuthority::sign(std::string_view csr_pem,
                                                     const tls::Identity& identity,
                                                     std::chrono::seconds ttl) {
  auto fail = [&](Status s) -> Result<IssuedCertificate> {
    stats_.sign_errors++;
    return s.context("signing for " + identity.toString());
  };
  if (identity.trust_domain != options_.trust_domain)
    return fail(Status::errorf("trust domain {} is not this CA's ({})", identity.trust_domain,
                               options_.trust_domain));
  auto csr = tls::csrFromPem(csr_pem);
  if (!csr) return fail(csr.status());
  EVP_PKEY* pub = X509_REQ_get0_pubkey(csr->get());
  if (pub == nullptr) return fail(tls::opensslError("CSR has no public key"));
  if (!tls::isP256(pub)) return fail(Status::error("CSR key is not ECDSA P-256"));
  if (X509_REQ_verify(csr->get(), pub) != 1)
    return fail(tls::opensslError("CSR signature does not verify"));
  auto sans = tls::csrUriSans(csr->get());
  if (!sans) return fail(sans.status());
  for (const auto& san : sans.value()) {
    if (san != identity.toString())
      return fail(Status::errorf("CSR names {} but {} was requested", san.substr(0, 300),
                                 identity.toString()));
  }
  if (ttl.count() <= 0) ttl = options_.default_ttl;

  tls::X509Ptr cert(X509_new());
  if (!cert) return fail(tls::opensslError("X509_new"));
  if (X509_set_version(cert.get(), 2) != 1) return fail(tls::opensslError("X509_set_version"));
  if (Status s = randomSerial(cert.get()); !s) return fail(s);
  auto now = std::chrono::system_clock::now();
  auto nb = now - std::chrono::minutes(1);
  auto na = now + ttl;
  auto ca_na = tls::notAfter(cert_.get());
  if (!ca_na) return fail(ca_na.status());
  if (na > ca_na.value()) na = ca_na.value();
  if (Status s = setValidity(cert.get(), nb, na); !s) return fail(s);
  // Empty subject, as Istio does: the identity is the (critical) URI SAN.
  if (X509_set_issuer_name(cert.get(), X509_get_subject_name(cert_.get())) != 1)
    return fail(tls::opensslError("X509_set_issuer_name"));
  if (X509_set_pubkey(cert.get(), pub) != 1) return fail(tls::opensslError("X509_set_pubkey"));
  X509V3_CTX ctx;
  X509V3_set_ctx(&ctx, cert_.get(), cert.get(), nullptr, nullptr, 0);
  std::string san = "critical,URI:" + identity.toString();
  for (auto [nid, value] :
       {std::pair<int, std::string>{NID_basic_constraints, "critical,CA:FALSE"},
        {NID_key_usage, "critical,digitalSignature,keyAgreement"},
        {NID_ext_key_usage, "serverAuth,clientAuth"},
        {NID_subject_key_identifier, "hash"},
        {NID_authority_key_identifier, "keyid:always"},
        {NID_subject_alt_name, san}}) {
    if (Status s = addExt(cert.get(), &ctx, nid, value); !s) return fail(s);
  }
  if (X509_sign(cert.get(), key_.get(), EVP_sha256()) <= 0)
    return fail(tls::opensslError("X509_sign"));
  auto leaf = tls::certToPem(cert.get());
  if (!leaf) return fail(leaf.status());
  IssuedCertificate out;
  out.leaf_pem = std::move(leaf.value());
  out.chain_pem = chain_pem_;
  out.roots_pem = roots_pem_;
  out.serial = tls::serialHex(cert.get());
  out.not_before = std::chrono::time_point_cast<std::chrono::system_clock::duration>(
      std::chrono::system_clock::from_time_t(std::chrono::system_clock::to_time_t(nb)));
  out.not_after = std::chrono::system_clock::from_time_t(std::chrono::system_clock::to_time_t(na));
  stats_.issued++;
  return out;
}

Status authorizeIdentity(const ClusterModel& model, const std::vector<LocalPodView>& local_pods,
                         const std::string& trust_domain, const tls::Identity& identity) {
  if (identity.trust_domain != trust_domain)
    return Status::errorf("identity {} is not in trust domain {}", identity.toString(),
                          trust_domain);
  for (const auto& lp : local_pods) {
    if (!(lp.wanted || lp.enrolled || lp.ztunnel_has)) continue;
    auto it = model.pods.find(lp.key);
    if (it == model.pods.end()) continue;
    const Pod& pod = it->second;
    if (pod.meta.namespace_ == identity.ns && pod.service_account == identity.sa)
      return Status::ok();
  }
  return Status::errorf("identity {} has no workload on this node", identity.toString());
}

}  // namespace weft::agent
