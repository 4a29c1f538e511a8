// IdentityManager: the ztunnel's workload certificates (ARCHITECTURE "Identity and
// certificates"). One P-256 key + certificate per identity (service account) with a local
// workload; the key is made here and never leaves; renewed at half life; used by the HBONE side.
#pragma once

#include <uv.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "common/status.h"
#include "common/tls/tls.h"
#include "common/uv_handle.h"
#include "weft/node/v1/node.pb.h"

namespace weft::ztunnel {

using tls::Identity;

// One issued certificate with its private key, immutable once made. Hold the shared_ptr for as
// long as a TLS connection uses it: a renewal makes a new object and leaves this one intact.
struct Certificate {
  Identity identity;
  tls::PkeyPtr key;                   // P-256, generated in this process
  tls::X509Ptr leaf;
  std::vector<tls::X509Ptr> chain;    // intermediates, leaf's issuer first (may be empty)
  std::vector<tls::X509Ptr> roots;    // trust anchors for verifying peers
  std::string serial;                 // hex
  tls::TimePoint not_before;
  tls::TimePoint not_after;
  tls::TimePoint received_at;         // our clock; renewal counts from max(not_before, this)
};
using CertificatePtr = std::shared_ptr<const Certificate>;

enum class CertState { kPending, kValid, kRenewing, kExpired };
const char* certStateName(CertState s);

// What the admin API shows of one identity: never key material.
struct IdentityView {
  std::string identity;
  CertState state = CertState::kPending;
  std::string serial;                 // empty while pending
  tls::TimePoint not_before{};
  tls::TimePoint not_after{};
  tls::TimePoint renew_at{};
  size_t workloads = 0;
  uint64_t issued = 0;                // certificates received for it
  uint64_t failures = 0;              // failed requests (refused, bad answer, timeout)
  std::string last_error;
};

struct IdentityManagerOptions {
  std::chrono::milliseconds backoff_initial{1000};
  std::chrono::milliseconds backoff_max{30000};
  std::chrono::milliseconds request_timeout{10000};  // no answer: counts as a failure
  // Injected in tests; all renewal/backoff/expiry decisions use it.
  std::function<tls::TimePoint()> now = [] { return std::chrono::system_clock::now(); };
};

// What the TLS side needs of certificates: the identity manager on the main loop, or a worker
// loop's CertificateMirror (ztunnel/loops.h) of it.
class CertificateSource {
 public:
  using WaitCallback = std::function<void(CertificatePtr)>;  // nullptr: timed out / forgotten
  using WaitId = uint64_t;
  virtual ~CertificateSource() = default;
  virtual CertificatePtr current(const Identity& identity) const = 0;
  virtual WaitId waitFor(const Identity& identity, WaitCallback cb,
                         std::chrono::milliseconds timeout) = 0;
  virtual void cancelWait(WaitId id) = 0;
  virtual size_t pendingWaits() const = 0;
};

class IdentityManager : public CertificateSource {
 public:
  // Sends one CertificateRequest to the agent; false if it could not be sent (not connected),
  // which counts as a failed attempt and is retried with backoff.
  using SendFn = std::function<bool(const node::v1::CertificateRequest&)>;
  using WaitCallback = CertificateSource::WaitCallback;
  using WaitId = CertificateSource::WaitId;

  IdentityManager(uv_loop_t* loop, SendFn send, IdentityManagerOptions options = {});
  ~IdentityManager();
  IdentityManager(const IdentityManager&) = delete;
  IdentityManager& operator=(const IdentityManager&) = delete;

  // Local workloads: the first workload of an identity starts fetching its certificate, the
  // last one leaving forgets it (key and certificate dropped; open connections keep theirs).
  void addWorkload(const std::string& uid, const Identity& identity);
  void removeWorkload(const std::string& uid);
  // Drops workloads not in `uids` (after an agent snapshot).
  void retainOnly(const std::set<std::string>& uids);

  // An AgentMessage.certificate_response. An error Status (bad chain, wrong key, wrong SAN) is
  // also recorded as a failed attempt; it is returned so the ack can carry it.
  Status onCertificateResponse(const node::v1::CertificateResponse& response);
  // The agent connection dropped: requests in flight will never be answered; retry with backoff.
  void onAgentDisconnected();
  // The agent connection is up (again): retry what is waiting now instead of after the backoff.
  void onAgentConnected();

  // --- For the TLS side ---
  // The certificate to present for `identity` now: a non-expired one, or nullptr.
  CertificatePtr current(const Identity& identity) const override;
  // Calls `cb` with the certificate once one exists (at once, synchronously, if it does now), or
  // with nullptr after `timeout` or when the identity is forgotten. Cancel with cancelWait (e.g.
  // the connection closed first); after cb ran the id is dead.
  WaitId waitFor(const Identity& identity, WaitCallback cb,
                 std::chrono::milliseconds timeout) override;
  void cancelWait(WaitId id) override;
  // Told of every new certificate of an identity, and of a forgotten one (nullptr): how worker
  // loops' mirrors follow (ztunnel/loops.h).
  void setCertificateObserver(std::function<void(const Identity&, CertificatePtr)> observer) {
    cert_observer_ = std::move(observer);
  }

  // --- Introspection ---
  std::vector<IdentityView> view() const;
  size_t pendingWaits() const override { return waiters_.size(); }
  uint64_t waitsTimedOut() const { return waits_timed_out_; }

  // Re-evaluates every identity against now(): sends due requests, times out lost ones, and
  // re-arms the timer. Public so tests with an injected clock can drive it.
  void tick();

 private:
  struct Entry {
    Identity identity;
    std::set<std::string> workloads;
    CertificatePtr cert;
    uint64_t in_flight = 0;           // request id, 0 = none
    tls::TimePoint sent_at{};
    tls::PkeyPtr pending_key;         // key of the request in flight
    tls::TimePoint next_attempt{};    // backoff: no request before this
    std::chrono::milliseconds backoff{0};
    uint64_t issued = 0;
    uint64_t failures = 0;
    std::string last_error;
  };
  struct WaitCtx {
    IdentityManager* self;
    WaitId id;
  };
  struct Waiter {
    Identity identity;
    WaitCallback cb;
    std::unique_ptr<WaitCtx> ctx;  // the timer's data; outlives nothing but the timer
    std::unique_ptr<UvHandle<uv_timer_t>> timer;
  };

  tls::TimePoint renewAt(const Certificate& c) const;
  bool needsRequest(const Entry& e, tls::TimePoint now) const;
  void sendRequest(Entry& e);
  void fail(Entry& e, const std::string& why);
  Result<CertificatePtr> accept(Entry& e, const node::v1::CertificateResponse& r);
  void forget(const Identity& identity);
  void resolveWaiters(const Identity& identity, const CertificatePtr& cert);
  void armTimer(tls::TimePoint when);
  void onWaitTimeout(WaitId id);

  uv_loop_t* loop_;
  SendFn send_;
  IdentityManagerOptions options_;
  std::map<Identity, Entry> entries_;
  std::map<std::string, Identity> workload_identity_;  // uid -> identity
  std::map<WaitId, Waiter> waiters_;
  uint64_t next_request_id_ = 1;
  WaitId next_wait_id_ = 1;
  UvHandle<uv_timer_t> timer_;
  uint64_t waits_timed_out_ = 0;
  bool in_tick_ = false;
  std::function<void(const Identity&, CertificatePtr)> cert_observer_;
};

}  // namespace weft::ztunnel
