// CertificateAuthority: the agent's workload CA (ARCHITECTURE "Identity and certificates").
// Embedded root kept in --ca-dir, or a root/intermediate from files that is hot-reloaded; signs
// P-256 CSRs for SPIFFE identities. authorizeIdentity decides which identities a node may get.
#pragma once

#include <uv.h>

#include <sys/stat.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "agent/enrollment.h"
#include "agent/model.h"
#include "common/status.h"
#include "common/tls/tls.h"
#include "common/uv_handle.h"

namespace weft::agent {

struct CaOptions {
  std::string trust_domain = "cluster.local";
  // Embedded mode (no ca_cert_file): the generated root lives here (ca-key.pem 0600,
  // ca-cert.pem 0644); the directory is created 0700 if missing.
  std::string ca_dir;
  // File mode: the signing certificate (a root or an intermediate) and its key; ca_chain_file
  // holds the certificates above it up to and including the root.
  std::string ca_cert_file;
  std::string ca_key_file;
  std::string ca_chain_file;
  std::chrono::seconds default_ttl{24 * 3600};
  std::chrono::seconds root_validity{10 * 365 * 24 * 3600};
};

struct IssuedCertificate {
  std::string leaf_pem;
  std::string chain_pem;  // intermediates between the leaf and the root (may be empty)
  std::string roots_pem;  // trust anchors
  std::string serial;     // hex
  tls::TimePoint not_before;
  tls::TimePoint not_after;
};

struct CaStats {
  bool file_backed = false;
  std::string source;           // ca-dir or the cert file
  std::string ca_subject;
  std::string ca_not_after;     // ISO-8601 UTC
  uint64_t issued = 0;
  uint64_t sign_errors = 0;     // bad CSRs, wrong key type, identity mismatch
  uint64_t refused_identities = 0;  // counted by the caller via countRefused()
  uint64_t reloads = 0;
  uint64_t reload_errors = 0;
  std::string last_reload_error;
};

class CertificateAuthority {
 public:
  // Loads (or in embedded mode, first creates) the CA. Errors name the file and what is wrong.
  static Result<std::unique_ptr<CertificateAuthority>> create(CaOptions options);

  // Signs `csr_pem` for `identity`. The CSR must be validly self-signed with a P-256 key; its URI
  // SANs, if any, must be exactly that identity; the identity's trust domain must be ours.
  // ttl 0 = the default TTL; never past the CA certificate's own notAfter.
  Result<IssuedCertificate> sign(std::string_view csr_pem, const tls::Identity& identity,
                                 std::chrono::seconds ttl = std::chrono::seconds(0));

  // File mode: re-reads the files if their inode/size/mtime changed. A bad new set is rejected
  // (the error returned and kept in stats) and the CA in force stays. Embedded mode: no-op.
  Status reloadIfChanged();
  // Polls reloadIfChanged every `interval` on `loop` (file mode only).
  Status startWatching(uv_loop_t* loop, std::chrono::milliseconds interval);
  void stopWatching() { watch_timer_.reset(); }

  const std::string& trustDomain() const { return options_.trust_domain; }
  std::string rootsPem() const { return roots_pem_; }
  void countRefused() { stats_.refused_identities++; }
  CaStats stats() const { return stats_; }

 private:
  struct Loaded {
    tls::PkeyPtr key;
    tls::X509Ptr cert;
    std::string chain_pem;
    std::string roots_pem;
  };
  struct FileStamp {
    ino_t ino = 0;
    off_t size = 0;
    int64_t mtime_ns = 0;
    bool operator==(const FileStamp&) const = default;
  };

  explicit CertificateAuthority(CaOptions options) : options_(std::move(options)) {}
  Status loadEmbedded();
  Result<Loaded> loadFiles() const;
  void install(Loaded loaded);
  std::vector<FileStamp> stamps() const;

  CaOptions options_;
  tls::PkeyPtr key_;
  tls::X509Ptr cert_;
  std::string chain_pem_;
  std::string roots_pem_;
  std::vector<FileStamp> stamps_;
  CaStats stats_;
  std::unique_ptr<UvHandle<uv_timer_t>> watch_timer_;
};

// The node-local authorization rule: a ztunnel may only get certificates for identities of pods
// that are enrolled on this node (their namespace + serviceAccount). Errors say why, e.g.
// "identity spiffe://td/ns/a/sa/b has no workload on this node".
Status authorizeIdentity(const ClusterModel& model, const std::vector<LocalPodView>& local_pods,
                         const std::string& trust_domain, const tls::Identity& identity);

}  // namespace weft::agent
