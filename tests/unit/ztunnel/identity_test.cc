// IdentityManager against a fake signer (the agent's CertificateAuthority called directly, with
// an on/off switch for failures) and an injected clock: fetch, renewal, backoff, forget, waits.
#include "ztunnel/identity.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>

#include "agent/ca.h"

namespace weft::ztunnel {
namespace {

using namespace std::chrono_literals;
namespace nodepb = weft::node::v1;

class IdentityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/weft-identity-test-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    agent::CaOptions o;
    o.ca_dir = dir_ + "/ca";
    o.default_ttl = 3600s;
    auto ca = agent::CertificateAuthority::create(o);
    ASSERT_TRUE(ca.isOk()) << ca.status().message();
    ca_ = std::move(ca.value());
    ASSERT_EQ(uv_loop_init(&loop_), 0);
    now_ = std::chrono::system_clock::now();
    IdentityManagerOptions opts;
    opts.now = [this] { return now_; };
    mgr_ = std::make_unique<IdentityManager>(
        &loop_,
        [this](const nodepb::CertificateRequest& r) {
          if (!connected_) return false;
          requests_.push_back(r);
          return true;
        },
        opts);
  }
  void TearDown() override {
    mgr_.reset();
    for (int i = 0; i < 100 && uv_run(&loop_, UV_RUN_NOWAIT) != 0; i++) {
    }
    uv_loop_close(&loop_);
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  // Answers the oldest request as the agent would (or with `error`).
  Status answer(const std::string& error = "") {
    EXPECT_FALSE(requests_.empty());
    if (requests_.empty()) return Status::error("no request");
    nodepb::CertificateRequest req = requests_.front();
    requests_.erase(requests_.begin());
    nodepb::CertificateResponse resp;
    resp.set_request_id(req.id());
    if (!error.empty()) {
      resp.set_error(error);
    } else {
      auto id = Identity::parse(req.identity());
      EXPECT_TRUE(id.isOk());
      auto issued = ca_->sign(req.csr_pem(), id.value());
      EXPECT_TRUE(issued.isOk()) << issued.status().message();
      resp.set_cert_chain_pem(issued->leaf_pem + issued->chain_pem);
      resp.set_roots_pem(issued->roots_pem);
    }
    return mgr_->onCertificateResponse(resp);
  }

  void advance(std::chrono::milliseconds d) {
    now_ += d;
    mgr_->tick();
  }

  IdentityView only() {
    auto v = mgr_->view();
    EXPECT_EQ(v.size(), 1u);
    return v.empty() ? IdentityView{} : v.front();
  }

  const Identity cart_{"cluster.local", "shop", "cart"};
  std::string dir_;
  std::unique_ptr<agent::CertificateAuthority> ca_;
  uv_loop_t loop_;
  tls::TimePoint now_;
  bool connected_ = true;
  std::vector<nodepb::CertificateRequest> requests_;
  std::unique_ptr<IdentityManager> mgr_;
};

TEST_F(IdentityTest, FetchesAheadForFirstWorkloadOnly) {
  mgr_->addWorkload("uid-1", cart_);
  ASSERT_EQ(requests_.size(), 1u);
  EXPECT_EQ(requests_[0].identity(), "spiffe://cluster.local/ns/shop/sa/cart");
  // The CSR carries the identity and no private key material.
  EXPECT_EQ(requests_[0].csr_pem().find("PRIVATE KEY"), std::string::npos);
  mgr_->addWorkload("uid-2", cart_);
  EXPECT_EQ(requests_.size(), 1u);
  EXPECT_EQ(only().state, CertState::kPending);
  EXPECT_EQ(mgr_->current(cart_), nullptr);

  ASSERT_TRUE(answer().isOk());
  CertificatePtr c = mgr_->current(cart_);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(X509_check_private_key(c->leaf.get(), c->key.get()), 1);
  EXPECT_EQ(tls::uriSans(c->leaf.get()), std::vector<std::string>{cart_.toString()});
  EXPECT_EQ(c->roots.size(), 1u);
  IdentityView v = only();
  EXPECT_EQ(v.state, CertState::kValid);
  EXPECT_EQ(v.serial, c->serial);
  EXPECT_EQ(v.workloads, 2u);
  EXPECT_EQ(v.issued, 1u);
  // Nothing more is asked for before half life.
  advance(1000s);
  EXPECT_TRUE(requests_.empty());
}

TEST_F(IdentityTest, RenewsAtHalfLifeAndOldCertStaysUsable) {
  mgr_->addWorkload("uid-1", cart_);
  ASSERT_TRUE(answer().isOk());
  CertificatePtr first = mgr_->current(cart_);
  ASSERT_NE(first, nullptr);
  // Lifetime is 3660 s (not-before is a minute back): half life is ~1770 s from now.
  advance(1700s);
  EXPECT_TRUE(requests_.empty());
  EXPECT_EQ(only().state, CertState::kValid);
  // Half life counts from when it arrived (the fake clock) to not_after, which the signer set
  // from the wall clock in whole seconds, up to a second after the fake clock's start: a
  // renewal is due within 1800.5 s.
  advance(101s);
  ASSERT_EQ(requests_.size(), 1u);
  EXPECT_EQ(only().state, CertState::kRenewing);
  EXPECT_EQ(mgr_->current(cart_), first);  // still served while renewing
  ASSERT_TRUE(answer().isOk());
  CertificatePtr second = mgr_->current(cart_);
  ASSERT_NE(second, nullptr);
  EXPECT_NE(second->serial, first->serial);
  EXPECT_EQ(only().state, CertState::kValid);
  // A connection holding the first certificate still has all of it.
  EXPECT_EQ(X509_check_private_key(first->leaf.get(), first->key.get()), 1);
  // A new key per renewal.
  EXPECT_NE(EVP_PKEY_eq(first->key.get(), second->key.get()), 1);
}

TEST_F(IdentityTest, FailedRenewalKeepsCertAndBacksOff) {
  mgr_->addWorkload("uid-1", cart_);
  ASSERT_TRUE(answer().isOk());
  CertificatePtr first = mgr_->current(cart_);
  advance(1801s);  // past half life, however the signer's second fell (see above)
  ASSERT_EQ(requests_.size(), 1u);
  // Backoff doubles from 1 s and stops at 30 s.
  std::vector<int> expected_ms = {1000, 2000, 4000, 8000, 16000, 30000, 30000};
  for (int wait : expected_ms) {
    ASSERT_TRUE(answer("CA unavailable").isOk());
    EXPECT_EQ(mgr_->current(cart_), first);
    EXPECT_EQ(only().state, CertState::kRenewing);
    advance(std::chrono::milliseconds(wait - 50));
    EXPECT_TRUE(requests_.empty()) << "retried before " << wait << " ms";
    advance(100ms);
    ASSERT_EQ(requests_.size(), 1u) << "no retry after " << wait << " ms";
  }
  EXPECT_EQ(only().failures, expected_ms.size());
  EXPECT_NE(only().last_error.find("CA unavailable"), std::string::npos);
  // The agent going away counts as a failure too; reconnecting retries at once.
  connected_ = false;
  mgr_->onAgentDisconnected();
  requests_.clear();  // the one in flight will never be answered
  advance(40s);  // the retry cannot be sent: another failure, not a crash
  EXPECT_TRUE(requests_.empty());
  connected_ = true;
  mgr_->onAgentConnected();
  ASSERT_EQ(requests_.size(), 1u);
  // Past not-after with nothing new: expired, and nothing is presented any more.
  advance(2000s);
  EXPECT_EQ(only().state, CertState::kExpired);
  EXPECT_EQ(mgr_->current(cart_), nullptr);
  // The request sent on reconnect got no answer within the request timeout: a failure, and
  // the next attempt waits for the (capped) backoff.
  EXPECT_NE(only().last_error.find("no answer"), std::string::npos);
  EXPECT_EQ(requests_.size(), 1u);
  advance(30100ms);
  EXPECT_EQ(requests_.size(), 2u);
}

TEST_F(IdentityTest, RejectsACertificateForAnotherKeyOrIdentity) {
  mgr_->addWorkload("uid-1", cart_);
  ASSERT_EQ(requests_.size(), 1u);
  // Signed for a CSR from another key: refused, counted, retried later.
  auto other_key = tls::generateP256Key();
  auto csr = tls::makeCsr(other_key->get(), cart_);
  auto issued = ca_->sign(tls::csrToPem(csr->get()).value(), cart_);
  ASSERT_TRUE(issued.isOk());
  nodepb::CertificateResponse resp;
  resp.set_request_id(requests_[0].id());
  resp.set_cert_chain_pem(issued->leaf_pem);
  resp.set_roots_pem(issued->roots_pem);
  Status s = mgr_->onCertificateResponse(resp);
  EXPECT_FALSE(s.isOk());
  EXPECT_EQ(mgr_->current(cart_), nullptr);
  EXPECT_EQ(only().failures, 1u);
  requests_.clear();
  advance(1100ms);
  ASSERT_EQ(requests_.size(), 1u);
  ASSERT_TRUE(answer().isOk());
  EXPECT_NE(mgr_->current(cart_), nullptr);
}

TEST_F(IdentityTest, ForgetsWhenLastWorkloadLeaves) {
  mgr_->addWorkload("uid-1", cart_);
  mgr_->addWorkload("uid-2", cart_);
  ASSERT_TRUE(answer().isOk());
  CertificatePtr held = mgr_->current(cart_);
  ASSERT_NE(held, nullptr);
  mgr_->removeWorkload("uid-1");
  EXPECT_NE(mgr_->current(cart_), nullptr);
  mgr_->removeWorkload("uid-2");
  EXPECT_EQ(mgr_->current(cart_), nullptr);
  EXPECT_TRUE(mgr_->view().empty());
  EXPECT_EQ(X509_check_private_key(held->leaf.get(), held->key.get()), 1);  // still intact
  // Back again: a fresh fetch. A snapshot without it forgets it again, and a late answer to the
  // forgotten request is ignored.
  mgr_->addWorkload("uid-3", cart_);
  ASSERT_EQ(requests_.size(), 1u);
  mgr_->retainOnly({"uid-9"});
  EXPECT_TRUE(mgr_->view().empty());
  EXPECT_TRUE(answer().isOk());
  EXPECT_EQ(mgr_->current(cart_), nullptr);
}

TEST_F(IdentityTest, WaitForResolvesOrTimesOut) {
  // Unknown until its certificate arrives: the wait resolves with it.
  mgr_->addWorkload("uid-1", cart_);
  CertificatePtr got;
  bool called = false;
  mgr_->waitFor(cart_, [&](CertificatePtr c) { called = true; got = std::move(c); }, 5000ms);
  EXPECT_FALSE(called);
  EXPECT_EQ(mgr_->pendingWaits(), 1u);
  ASSERT_TRUE(answer().isOk());
  EXPECT_TRUE(called);
  ASSERT_NE(got, nullptr);
  EXPECT_EQ(mgr_->pendingWaits(), 0u);
  // Already there: answered at once.
  called = false;
  mgr_->waitFor(cart_, [&](CertificatePtr c) { called = (c != nullptr); }, 5000ms);
  EXPECT_TRUE(called);

  // No answer: nullptr after the (real-time) timeout, bounded.
  Identity other{"cluster.local", "shop", "other"};
  mgr_->addWorkload("uid-2", other);
  // No wall-clock bounds here (shared machines are noisy): the wait must not end at once, and
  // must end with nullptr once the loop has run its timer.
  bool timed_out = false;
  mgr_->waitFor(other, [&](CertificatePtr c) { timed_out = (c == nullptr); }, 150ms);
  EXPECT_FALSE(timed_out);
  EXPECT_EQ(mgr_->pendingWaits(), 1u);
  for (int i = 0; i < 200 && !timed_out; i++) uv_run(&loop_, UV_RUN_ONCE);
  EXPECT_TRUE(timed_out);
  EXPECT_EQ(mgr_->waitsTimedOut(), 1u);
  EXPECT_EQ(mgr_->pendingWaits(), 0u);

  // A cancelled wait never calls back; a forgotten identity ends its waits with nullptr.
  bool cancelled_called = false;
  auto id = mgr_->waitFor(other, [&](CertificatePtr) { cancelled_called = true; }, 50ms);
  mgr_->cancelWait(id);
  bool forgotten = false;
  mgr_->waitFor(other, [&](CertificatePtr c) { forgotten = (c == nullptr); }, 5000ms);
  mgr_->removeWorkload("uid-2");
  EXPECT_TRUE(forgotten);
  for (int i = 0; i < 5; i++) uv_run(&loop_, UV_RUN_NOWAIT);
  EXPECT_FALSE(cancelled_called);
}

}  // namespace
}  // namespace weft::ztunnel
