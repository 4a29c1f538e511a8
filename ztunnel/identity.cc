// IdentityManager: key generation, CSR round trips through the agent, renewal at half life,
// backoff on failure, bounded waits for the TLS side.
#include "ztunnel/identity.h"

#include <openssl/x509_vfy.h>
#include <spdlog/spdlog.h>

#include <algorithm>

namespace weft::ztunnel {
namespace {

using Clock = std::chrono::system_clock;

struct StoreDeleter {
  void operator()(X509_STORE* s) const { X509_STORE_free(s); }
};
struct StoreCtxDeleter {
  void operator()(X509_STORE_CTX* s) const { X509_STORE_CTX_free(s); }
};

}  // namespace

const char* certStateName(CertState s) {
  switch (s) {
    case CertState::kPending: return "pending";
    case CertState::kValid: return "valid";
    case CertState::kRenewing: return "renewing";
    case CertState::kExpired: return "expired";
  }
  return "unknown";
}

IdentityManager::IdentityManager(uv_loop_t* loop, SendFn send, IdentityManagerOptions options)
    : loop_(loop), send_(std::move(send)), options_(std::move(options)) {
  if (int rc = timer_.init(uv_timer_init(loop_, timer_.get())); rc != 0) {
    spdlog::error("identity: uv_timer_init: {} (renewals only happen on events)", uv_strerror(rc));
  }
  timer_.get()->data = this;
}

IdentityManager::~IdentityManager() {
  // Waiters are dropped without their callbacks: the owner is going away.
  waiters_.clear();
}

tls::TimePoint IdentityManager::renewAt(const Certificate& c) const {
  // Half of the lifetime left when it arrived: robust to clock skew against the agent.
  tls::TimePoint from = std::max(c.not_before, c.received_at);
  return from + (c.not_after - from) / 2;
}

bool IdentityManager::needsRequest(const Entry& e, tls::TimePoint now) const {
  if (e.in_flight != 0) return false;
  return !e.cert || now >= renewAt(*e.cert);
}

void IdentityManager::addWorkload(const std::string& uid, const Identity& identity) {
  auto old = workload_identity_.find(uid);
  if (old != workload_identity_.end()) {
    if (old->second == identity) return;
    removeWorkload(uid);  // its service account changed
  }
  workload_identity_[uid] = identity;
  auto [it, inserted] = entries_.try_emplace(identity);
  it->second.identity = identity;
  it->second.workloads.insert(uid);
  if (inserted) {
    spdlog::info("identity {}: first local workload {}, fetching a certificate",
                 identity.toString(), uid);
    tick();
  }
}

void IdentityManager::removeWorkload(const std::string& uid) {
  auto wi = workload_identity_.find(uid);
  if (wi == workload_identity_.end()) return;
  Identity identity = wi->second;
  workload_identity_.erase(wi);
  auto it = entries_.find(identity);
  if (it == entries_.end()) return;
  it->second.workloads.erase(uid);
  if (it->second.workloads.empty()) forget(identity);
}

void IdentityManager::retainOnly(const std::set<std::string>& uids) {
  std::vector<std::string> gone;
  for (const auto& [uid, id] : workload_identity_) {
    if (!uids.count(uid)) gone.push_back(uid);
  }
  for (const auto& uid : gone) removeWorkload(uid);
}

void IdentityManager::forget(const Identity& identity) {
  spdlog::info("identity {}: last local workload left, forgetting its certificate",
               identity.toString());
  entries_.erase(identity);
  resolveWaiters(identity, nullptr);
}

void IdentityManager::sendRequest(Entry& e) {
  auto key = tls::generateP256Key();
  if (!key) return fail(e, key.status().message());
  auto csr = tls::makeCsr(key->get(), e.identity);
  if (!csr) return fail(e, csr.status().message());
  auto pem = tls::csrToPem(csr->get());
  if (!pem) return fail(e, pem.status().message());
  node::v1::CertificateRequest req;
  req.set_id(next_request_id_++);
  req.set_identity(e.identity.toString());
  req.set_csr_pem(pem.value());
  e.in_flight = req.id();
  e.sent_at = options_.now();
  e.pending_key = std::move(key.value());
  spdlog::debug("identity {}: certificate request {}", e.identity.toString(), req.id());
  if (!send_ || !send_(req)) {
    e.in_flight = 0;
    e.pending_key.reset();
    fail(e, "agent not connected");
  }
}

void IdentityManager::fail(Entry& e, const std::string& why) {
  e.failures++;
  e.last_error = why;
  e.in_flight = 0;
  e.pending_key.reset();
  e.backoff = e.backoff.count() == 0
                  ? options_.backoff_initial
                  : std::min(options_.backoff_max, e.backoff * 2);
  e.next_attempt = options_.now() + e.backoff;
  spdlog::warn("identity {}: certificate request failed ({}); retry in {} ms{}",
               e.identity.toString(), why, e.backoff.count(),
               e.cert && options_.now() < e.cert->not_after ? ", keeping the current certificate"
                                                            : "");
}

Result<CertificatePtr> IdentityManager::accept(Entry& e, const node::v1::CertificateResponse& r) {
  auto chain = tls::certsFromPem(r.cert_chain_pem());
  if (!chain) return chain.status().context("cert_chain_pem");
  auto roots = tls::certsFromPem(r.roots_pem());
  if (!roots) return roots.status().context("roots_pem");
  auto c = std::make_shared<Certificate>();
  c->identity = e.identity;
  c->key = std::move(e.pending_key);
  c->leaf = std::move(chain->front());
  for (size_t i = 1; i < chain->size(); i++) c->chain.push_back(std::move((*chain)[i]));
  c->roots = std::move(roots.value());
  if (X509_check_private_key(c->leaf.get(), c->key.get()) != 1)
    return tls::opensslError("certificate does not match the key we generated");
  auto sans = tls::uriSans(c->leaf.get());
  if (sans != std::vector<std::string>{e.identity.toString()})
    return Status::errorf("certificate names {} instead of {}",
                          sans.empty() ? std::string("nothing") : sans.front(),
                          e.identity.toString());
  auto nb = tls::notBefore(c->leaf.get());
  auto na = tls::notAfter(c->leaf.get());
  if (!nb) return nb.status();
  if (!na) return na.status();
  c->not_before = nb.value();
  c->not_after = na.value();
  c->serial = tls::serialHex(c->leaf.get());
  c->received_at = options_.now();
  if (c->not_after <= options_.now()) return Status::error("certificate already expired");

  // It must chain to the roots it came with (what peers will check), at our clock.
  std::unique_ptr<X509_STORE, StoreDeleter> store(X509_STORE_new());
  std::unique_ptr<X509_STORE_CTX, StoreCtxDeleter> ctx(X509_STORE_CTX_new());
  STACK_OF(X509)* untrusted = sk_X509_new_null();
  if (!store || !ctx || untrusted == nullptr) {
    sk_X509_free(untrusted);
    return tls::opensslError("X509_STORE_new");
  }
  for (auto& root : c->roots) {
    if (X509_STORE_add_cert(store.get(), root.get()) != 1) {
      sk_X509_free(untrusted);
      return tls::opensslError("adding a root");
    }
  }
  for (auto& ic : c->chain) sk_X509_push(untrusted, ic.get());
  int ok = X509_STORE_CTX_init(ctx.get(), store.get(), c->leaf.get(), untrusted);
  if (ok == 1) {
    X509_STORE_CTX_set_time(ctx.get(), 0, Clock::to_time_t(options_.now()));
    ok = X509_verify_cert(ctx.get());
  }
  int err = X509_STORE_CTX_get_error(ctx.get());
  sk_X509_free(untrusted);
  if (ok != 1)
    return Status::errorf("certificate does not verify against the roots: {}",
                          X509_verify_cert_error_string(err));
  return CertificatePtr(std::move(c));
}

Status IdentityManager::onCertificateResponse(const node::v1::CertificateResponse& response) {
  Entry* e = nullptr;
  for (auto& [id, entry] : entries_) {
    if (entry.in_flight != 0 && entry.in_flight == response.request_id()) e = &entry;
  }
  if (e == nullptr) {
    // Forgotten meanwhile, or an answer to a request we already gave up on: harmless.
    spdlog::debug("identity: response to unknown request {}", response.request_id());
    return Status::ok();
  }
  Status result;
  if (!response.error().empty()) {
    fail(*e, "agent refused: " + response.error());
    // The agent's refusal is its own answer, not a fault in applying the message.
  } else {
    auto cert = accept(*e, response);
    if (!cert) {
      fail(*e, cert.status().message());
      result = cert.status().context("certificate for " + e->identity.toString());
    } else {
      e->cert = std::move(cert.value());
      e->in_flight = 0;
      e->backoff = std::chrono::milliseconds(0);
      e->next_attempt = {};
      e->issued++;
      e->last_error.clear();
      spdlog::info("identity {}: certificate {} valid until {}", e->identity.toString(),
                   e->cert->serial, Clock::to_time_t(e->cert->not_after));
      Identity id = e->identity;
      CertificatePtr c = e->cert;
      resolveWaiters(id, c);
    }
  }
  tick();
  return result;
}

void IdentityManager::onAgentDisconnected() {
  for (auto& [id, e] : entries_) {
    if (e.in_flight != 0) fail(e, "agent connection lost");
  }
  tick();
}

void IdentityManager::onAgentConnected() {
  for (auto& [id, e] : entries_) e.next_attempt = {};
  tick();
}

void IdentityManager::tick() {
  if (in_tick_) return;
  in_tick_ = true;
  auto now = options_.now();
  tls::TimePoint next = tls::TimePoint::max();
  for (auto& [id, e] : entries_) {
    if (e.in_flight != 0 && now - e.sent_at >= options_.request_timeout)
      fail(e, "no answer from the agent");
    if (needsRequest(e, now) && now >= e.next_attempt) sendRequest(e);
    tls::TimePoint due;
    if (e.in_flight != 0) {
      due = e.sent_at + options_.request_timeout;
    } else if (needsRequest(e, now)) {
      due = e.next_attempt;
    } else {
      due = renewAt(*e.cert);
    }
    next = std::min(next, due);
  }
  in_tick_ = false;
  if (next != tls::TimePoint::max()) armTimer(next);
}

void IdentityManager::armTimer(tls::TimePoint when) {
  auto delay = std::chrono::duration_cast<std::chrono::milliseconds>(when - options_.now());
  // Bounded: at least 10 ms (no busy loop), at most an hour (re-check wall-clock jumps).
  uint64_t ms = static_cast<uint64_t>(std::clamp<int64_t>(delay.count(), 10, 3600 * 1000));
  if (int rc = uv_timer_start(
          timer_.get(), [](uv_timer_t* t) { static_cast<IdentityManager*>(t->data)->tick(); },
          ms, 0);
      rc != 0)
    spdlog::error("identity: uv_timer_start: {}", uv_strerror(rc));
}

CertificatePtr IdentityManager::current(const Identity& identity) const {
  auto it = entries_.find(identity);
  if (it == entries_.end() || !it->second.cert) return nullptr;
  auto now = options_.now();
  const Certificate& c = *it->second.cert;
  if (now >= c.not_after) return nullptr;
  return it->second.cert;
}

IdentityManager::WaitId IdentityManager::waitFor(const Identity& identity, WaitCallback cb,
                                                 std::chrono::milliseconds timeout) {
  WaitId id = next_wait_id_++;
  if (CertificatePtr c = current(identity)) {
    cb(std::move(c));
    return id;
  }
  Waiter w;
  w.identity = identity;
  w.cb = std::move(cb);
  w.ctx = std::make_unique<WaitCtx>(WaitCtx{this, id});
  w.timer = std::make_unique<UvHandle<uv_timer_t>>();
  int rc = w.timer->init(uv_timer_init(loop_, w.timer->get()));
  if (rc == 0) {
    w.timer->get()->data = w.ctx.get();
    rc = uv_timer_start(
        w.timer->get(),
        [](uv_timer_t* t) {
          auto* ctx = static_cast<WaitCtx*>(t->data);
          ctx->self->onWaitTimeout(ctx->id);
        },
        static_cast<uint64_t>(std::max<int64_t>(0, timeout.count())), 0);
  }
  if (rc != 0) {
    spdlog::error("identity: wait timer: {}", uv_strerror(rc));
    cb(nullptr);
    return id;
  }
  waiters_.emplace(id, std::move(w));
  return id;
}

void IdentityManager::cancelWait(WaitId id) { waiters_.erase(id); }

void IdentityManager::onWaitTimeout(WaitId id) {
  auto it = waiters_.find(id);
  if (it == waiters_.end()) return;
  WaitCallback cb = std::move(it->second.cb);
  spdlog::warn("identity {}: no certificate within the wait; giving up on one connection",
               it->second.identity.toString());
  waits_timed_out_++;
  waiters_.erase(it);  // closes the timer (deferred by UvHandle), after which cb may reenter
  cb(nullptr);
}

void IdentityManager::resolveWaiters(const Identity& identity, const CertificatePtr& cert) {
  if (cert_observer_) cert_observer_(identity, cert);
  std::vector<WaitCallback> due;
  for (auto it = waiters_.begin(); it != waiters_.end();) {
    if (it->second.identity == identity) {
      due.push_back(std::move(it->second.cb));
      it = waiters_.erase(it);
    } else {
      ++it;
    }
  }
  // Called after the map is consistent: a callback may call waitFor/cancelWait again.
  for (auto& cb : due) cb(cert);
}

std::vector<IdentityView> IdentityManager::view() const {
  std::vector<IdentityView> out;
  auto now = options_.now();
  for (const auto& [id, e] : entries_) {
    IdentityView v;
    v.identity = id.toString();
    v.workloads = e.workloads.size();
    v.issued = e.issued;
    v.failures = e.failures;
    v.last_error = e.last_error;
    if (!e.cert) {
      v.state = CertState::kPending;
    } else {
      v.serial = e.cert->serial;
      v.not_before = e.cert->not_before;
      v.not_after = e.cert->not_after;
      v.renew_at = renewAt(*e.cert);
      if (now >= e.cert->not_after)
        v.state = CertState::kExpired;
      else if (now >= v.renew_at)
        v.state = CertState::kRenewing;
      else
        v.state = CertState::kValid;
    }
    out.push_back(std::move(v));
  }
  return out;
}

}  // namespace weft::ztunnel
