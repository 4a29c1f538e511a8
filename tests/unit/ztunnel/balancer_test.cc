// The load balancer with an injected clock and RNG seed: round robin, power of two choices over
// peak-EWMA (peak sensitivity, decay, outstanding connections, the neutral default), ejection.
#include "ztunnel/balancer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include "tests/unit/ztunnel/test_addr.h"

namespace weft::ztunnel {
namespace {

using testutil::addr;

using namespace std::chrono_literals;

constexpr int64_t kMs = 1000000;


class BalancerTest : public ::testing::Test {
 protected:
  BalancerTest() { recreate({}); }

  void recreate(BalancerOptions o) {
    if (o.seed == 0) o.seed = 42;
    lb_ = std::make_unique<Balancer>(o, [this] { return now_; });
  }

  size_t pick(LoadBalancing alg, const std::string& svc = "ns/svc") {
    return lb_->pick(svc, alg, eps_).index;
  }

  // One connection to the picked endpoint whose connect takes `latency(endpoint)` of clock
  // time and then succeeds; returns the index picked.
  template <typename F>
  size_t connectOnce(LoadBalancing alg, F latency) {
    size_t i = pick(alg);
    auto lease = lb_->lease(eps_[i]);
    lease->begin();
    now_ += latency(i);
    lease->succeeded();
    return i;
  }

  void failTimes(const SocketAddress& ep, int n) {
    for (int k = 0; k < n; k++) lb_->lease(ep)->failed();
  }

  int64_t now_ = 1000 * kMs;
  std::vector<SocketAddress> eps_ = {addr("10.244.1.3:8080"), addr("10.244.2.3:8080"),
                                     addr("10.244.2.4:8080")};
  std::unique_ptr<Balancer> lb_;
};

TEST_F(BalancerTest, RoundRobinSpreadsExactlyEvenly) {
  std::map<size_t, int> counts;
  for (int k = 0; k < 300; k++) counts[pick(LoadBalancing::kRoundRobin)]++;
  EXPECT_EQ(counts[0], 100);
  EXPECT_EQ(counts[1], 100);
  EXPECT_EQ(counts[2], 100);
}

TEST_F(BalancerTest, RoundRobinCyclesInOrderPerService) {
  EXPECT_EQ(pick(LoadBalancing::kRoundRobin, "a/x"), 0u);
  EXPECT_EQ(pick(LoadBalancing::kRoundRobin, "a/x"), 1u);
  EXPECT_EQ(pick(LoadBalancing::kRoundRobin, "b/y"), 0u);  // its own cursor
  EXPECT_EQ(pick(LoadBalancing::kRoundRobin, "a/x"), 2u);
  EXPECT_EQ(pick(LoadBalancing::kRoundRobin, "a/x"), 0u);
}

TEST_F(BalancerTest, FiveConsecutiveFailuresEjectForTenSeconds) {
  failTimes(eps_[1], 4);
  EXPECT_FALSE(lb_->ejected(eps_[1])) << "four failures are not enough";
  EXPECT_TRUE(lb_->lease(eps_[1])->failed()) << "the fifth ejects";
  EXPECT_TRUE(lb_->ejected(eps_[1]));
  std::map<size_t, int> counts;
  for (int k = 0; k < 100; k++) counts[pick(LoadBalancing::kRoundRobin)]++;
  EXPECT_EQ(counts[1], 0) << "an ejected endpoint is skipped while others are usable";
  EXPECT_EQ(counts[0], 50);
  EXPECT_EQ(counts[2], 50);
  for (int k = 0; k < 100; k++)
    EXPECT_NE(pick(LoadBalancing::kPeakEwma), 1u) << "peak-EWMA skips it too";
  now_ += 10000 * kMs - 1;
  EXPECT_TRUE(lb_->ejected(eps_[1])) << "still out 1 ns before 10 s";
  now_ += 1;
  EXPECT_FALSE(lb_->ejected(eps_[1])) << "back after 10 s";
  counts.clear();
  for (int k = 0; k < 30; k++) counts[pick(LoadBalancing::kRoundRobin)]++;
  EXPECT_EQ(counts[1], 10);
}

TEST_F(BalancerTest, ASuccessBreaksTheFailureStreak) {
  failTimes(eps_[0], 4);
  lb_->lease(eps_[0])->succeeded();
  failTimes(eps_[0], 4);
  EXPECT_FALSE(lb_->ejected(eps_[0]));
  EXPECT_EQ(lb_->load(eps_[0])->failures, 8u);
  EXPECT_TRUE(lb_->lease(eps_[0])->failed());
  EXPECT_TRUE(lb_->ejected(eps_[0]));
}

TEST_F(BalancerTest, EjectionTimeDoublesUpToTheBound) {
  BalancerOptions o;
  o.max_ejection = 60s;
  recreate(o);
  const SocketAddress& ep = eps_[2];
  std::vector<int64_t> lengths;
  for (int round = 0; round < 5; round++) {
    failTimes(ep, 5);
    ASSERT_TRUE(lb_->ejected(ep));
    int64_t start = now_;
    // Step through the ejection in 1 s steps to find its end.
    while (lb_->ejected(ep)) now_ += 1000 * kMs;
    lengths.push_back((now_ - start) / kMs);
  }
  EXPECT_EQ(lengths, (std::vector<int64_t>{10000, 20000, 40000, 60000, 60000}));
  EXPECT_EQ(lb_->load(ep)->ejections, 5u);
}

TEST_F(BalancerTest, EjectionBackoffResetsAfterHealthyAsLongAsLastEjection) {
  const SocketAddress& ep = eps_[0];
  failTimes(ep, 5);
  now_ += 10000 * kMs;  // first ejection (10 s) over
  lb_->lease(ep)->succeeded();  // right away: not yet healthy for 10 s
  failTimes(ep, 5);
  EXPECT_EQ(lb_->load(ep)->last_ejection_ns, 20000 * kMs) << "second in a row: doubled";
  now_ += 20000 * kMs;  // over
  now_ += 20000 * kMs;  // and healthy for as long as it was out
  lb_->lease(ep)->succeeded();
  failTimes(ep, 5);
  EXPECT_EQ(lb_->load(ep)->last_ejection_ns, 10000 * kMs) << "recovered: from the base again";
}

TEST_F(BalancerTest, FailuresWhileEjectedDoNotExtendIt) {
  failTimes(eps_[0], 5);
  int64_t until = lb_->load(eps_[0])->ejected_until;
  EXPECT_FALSE(lb_->lease(eps_[0])->failed());
  failTimes(eps_[0], 10);
  EXPECT_EQ(lb_->load(eps_[0])->ejected_until, until);
}

TEST_F(BalancerTest, AllEjectedStillPicksAndSaysSo) {
  for (const SocketAddress& ep : eps_) failTimes(ep, 5);
  std::map<size_t, int> counts;
  for (int k = 0; k < 30; k++) {
    Balancer::Pick p = lb_->pick("ns/svc", LoadBalancing::kRoundRobin, eps_);
    EXPECT_TRUE(p.all_ejected);
    counts[p.index]++;
  }
  EXPECT_EQ(counts[0], 10);
  EXPECT_EQ(counts[1], 10);
  EXPECT_EQ(counts[2], 10);
  EXPECT_FALSE(lb_->pick("ns/svc", LoadBalancing::kRoundRobin, {addr("10.244.9.9:80")})
                   .all_ejected);
}

TEST_F(BalancerTest, PeakSampleReplacesTheEstimateAtOnce) {
  auto lease = lb_->lease(eps_[0]);
  lease->begin();
  now_ += 1 * kMs;
  lease->succeeded();
  EXPECT_DOUBLE_EQ(*lb_->latencyNs(eps_[0]), 1.0 * kMs) << "a first sample replaces the default";
  lease = lb_->lease(eps_[0]);
  lease->begin();
  now_ += 200 * kMs;
  lease->succeeded();
  EXPECT_DOUBLE_EQ(*lb_->latencyNs(eps_[0]), 200.0 * kMs) << "a higher sample counts at once";
}

TEST_F(BalancerTest, LowerSampleIsBlendedByElapsedTime) {
  auto sample = [&](int64_t latency) {
    auto lease = lb_->lease(eps_[0]);
    lease->begin();
    now_ += latency;
    lease->succeeded();
  };
  sample(100 * kMs);
  // 10 s later (one time constant; the sample's own 10 ms included) a 10 ms sample:
  now_ += 10000 * kMs - 10 * kMs;
  sample(10 * kMs);
  double w = std::exp(-1.0);
  EXPECT_NEAR(*lb_->latencyNs(eps_[0]), 100.0 * kMs * w + 10.0 * kMs * (1 - w), 1.0);
}

TEST_F(BalancerTest, UnusedEstimateDecaysTowardsZero) {
  auto lease = lb_->lease(eps_[0]);
  lease->begin();
  now_ += 200 * kMs;
  lease->succeeded();
  lease.reset();
  now_ += 10000 * kMs;
  EXPECT_NEAR(*lb_->latencyNs(eps_[0]), 200.0 * kMs * std::exp(-1.0), 1.0);
  now_ += 66000 * kMs;  // 76 s in all: 200 ms * e^-7.6 ≈ 0.1 ms
  EXPECT_LT(*lb_->latencyNs(eps_[0]), 0.11 * kMs);
  EXPECT_FALSE(lb_->latencyNs(eps_[1])) << "never measured";
}

TEST_F(BalancerTest, CostCountsOutstandingConnections) {
  auto first = lb_->lease(eps_[0]);
  first->begin();
  now_ += 2 * kMs;
  first->succeeded();
  EXPECT_DOUBLE_EQ(lb_->cost(eps_[0], 0), 2.0 * 2 * kMs) << "its own connection is open";
  auto second = lb_->lease(eps_[0]);
  auto third = lb_->lease(eps_[0]);
  EXPECT_EQ(lb_->load(eps_[0])->outstanding, 3u);
  EXPECT_DOUBLE_EQ(lb_->cost(eps_[0], 0), 4.0 * 2 * kMs);
  first.reset();
  second.reset();
  third.reset();
  EXPECT_EQ(lb_->load(eps_[0])->outstanding, 0u);
  EXPECT_DOUBLE_EQ(lb_->cost(eps_[0], 0), 2.0 * kMs);
}

TEST_F(BalancerTest, TwoChoicesPreferFewerOpenConnectionsAtEqualLatency) {
  eps_.resize(2);  // with two endpoints both are always drawn: the cheaper always wins
  for (int k = 0; k < 2; k++) {
    auto l = lb_->lease(eps_[k]);
    l->begin();
    now_ += 1 * kMs;
    l->succeeded();
  }
  std::vector<EndpointLeasePtr> held;
  for (int k = 0; k < 3; k++) held.push_back(lb_->lease(eps_[0]));
  for (int k = 0; k < 50; k++) EXPECT_EQ(pick(LoadBalancing::kPeakEwma), 1u);
  held.clear();
  for (int k = 0; k < 4; k++) held.push_back(lb_->lease(eps_[1]));
  for (int k = 0; k < 50; k++) EXPECT_EQ(pick(LoadBalancing::kPeakEwma), 0u);
}

TEST_F(BalancerTest, PeakEwmaAvoidsASlowEndpointAfterWarmUp) {
  // Endpoint 1 takes 200 ms, the others 1 ms; connections one after another.
  auto latency = [](size_t i) { return i == 1 ? 200 * kMs : 1 * kMs; };
  std::map<size_t, int> warm, counts;
  for (int k = 0; k < 20; k++) warm[connectOnce(LoadBalancing::kPeakEwma, latency)]++;
  EXPECT_LE(warm[1], 2) << "one sample is enough to learn it is slow";
  for (int k = 0; k < 1000; k++) counts[connectOnce(LoadBalancing::kPeakEwma, latency)]++;
  EXPECT_EQ(counts[1], 0) << "its 200 ms estimate stays above the others' 1 ms";
  EXPECT_GT(counts[0], 400);
  EXPECT_GT(counts[2], 400);
}

TEST_F(BalancerTest, ASlowEndpointIsTriedAgainOnceItsEstimateDecayed) {
  auto latency = [](size_t i) { return i == 1 ? 200 * kMs : 1 * kMs; };
  for (int k = 0; k < 50; k++) connectOnce(LoadBalancing::kPeakEwma, latency);
  ASSERT_TRUE(lb_->latencyNs(eps_[1]));
  uint64_t before = lb_->load(eps_[1])->picked;
  // Connections every 100 ms for 90 s: its estimate decays below the others' after ~76 s.
  for (int k = 0; k < 900; k++) {
    connectOnce(LoadBalancing::kPeakEwma, [](size_t) { return 1 * kMs; });  // it recovered
    now_ += 99 * kMs;
  }
  EXPECT_GT(lb_->load(eps_[1])->picked, before) << "a recovered endpoint must get traffic again";
}

TEST_F(BalancerTest, NeverMeasuredEndpointCostsTheMedianOfItsPeers) {
  // 0 and 2 measured at 1 ms (at the same moment); 1 never: it stands in at 1 ms, so with
  // nothing open the three tie and the first drawn wins: roughly a third each.
  {
    auto l0 = lb_->lease(eps_[0]);
    auto l2 = lb_->lease(eps_[2]);
    l0->begin();
    l2->begin();
    now_ += 1 * kMs;
    l0->succeeded();
    l2->succeeded();
  }
  std::map<size_t, int> counts;
  for (int k = 0; k < 3000; k++) counts[pick(LoadBalancing::kPeakEwma)]++;
  EXPECT_GT(counts[1], 800);
  EXPECT_LT(counts[1], 1200);
  // With one connection open to it (a connect in flight) it costs 2 ms and loses to both.
  auto inflight = lb_->lease(eps_[1]);
  for (int k = 0; k < 100; k++) EXPECT_NE(pick(LoadBalancing::kPeakEwma), 1u);
}

TEST_F(BalancerTest, SameSeedSameChoices) {
  std::vector<size_t> a, b;
  for (int k = 0; k < 200; k++) a.push_back(pick(LoadBalancing::kPeakEwma));
  recreate({});
  for (int k = 0; k < 200; k++) b.push_back(pick(LoadBalancing::kPeakEwma));
  EXPECT_EQ(a, b);
  BalancerOptions o;
  o.seed = 7;
  recreate(o);
  std::vector<size_t> c;
  for (int k = 0; k < 200; k++) c.push_back(pick(LoadBalancing::kPeakEwma));
  EXPECT_NE(a, c);
}

TEST_F(BalancerTest, IdleEndpointRecordsAreForgotten) {
  BalancerOptions o;
  o.forget_after = 60s;
  recreate(o);
  pick(LoadBalancing::kRoundRobin);
  auto held = lb_->lease(eps_[0]);
  EXPECT_EQ(lb_->trackedEndpoints(), 3u);
  now_ += 61000 * kMs;
  // The sweep runs every 1024 picks; these go to another endpoint.
  std::vector<SocketAddress> other = {addr("10.244.3.3:80")};
  for (int k = 0; k < 1024; k++) lb_->pick("ns/other", LoadBalancing::kRoundRobin, other);
  EXPECT_EQ(lb_->trackedEndpoints(), 2u) << "the one with an open connection stays";
  EXPECT_TRUE(lb_->load(eps_[0]));
}

TEST_F(BalancerTest, ReportsOnlyOnce) {
  auto l = lb_->lease(eps_[0]);
  l->begin();
  now_ += 5 * kMs;
  l->succeeded();
  l->succeeded();
  EXPECT_FALSE(l->failed());
  EXPECT_EQ(lb_->load(eps_[0])->successes, 1u);
  EXPECT_EQ(lb_->load(eps_[0])->failures, 0u);
}

}  // namespace
}  // namespace weft::ztunnel
