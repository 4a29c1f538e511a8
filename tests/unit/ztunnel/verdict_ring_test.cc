// The packed verdict ring: every field reads back as recorded (spilled events too), order,
// eviction and capacity changes, and /verdicts' JSON (since, limit) equal to what the earlier
// deque of VerdictEvent served for the same events.
#include "ztunnel/verdict_ring.h"

#include <gtest/gtest.h>

#include <deque>
#include <string>

#include "tests/unit/ztunnel/test_addr.h"
#include "ztunnel/verdicts.h"

namespace weft::ztunnel {
namespace {

using nlohmann::json;
using testutil::addr;

PolicyOutcome outcome(bool allowed, VerdictReason reason, const std::string& policy, int rule,
                      std::vector<PolicyHit> audit = {}) {
  PolicyOutcome o;
  o.allowed = allowed;
  o.reason = reason;
  o.decided_by = PolicyHit{policy, rule};
  o.audit = std::move(audit);
  return o;
}

// Events of every shape: IPv4 and IPv6, with and without remote IP, principal, workloads,
// AUDIT hits and a dry-run outcome.
VerdictEvent event(int i) {
  VerdictEvent e;
  e.seq = static_cast<uint64_t>(i + 1);
  e.time_ms = 1764190000000 + i * 1234;
  e.path = i % 2 ? "hbone" : "plaintext";
  e.source = i % 3 ? addr("10.244.1.10:40000") : addr("[fd00:10:244:1::10]:51234");
  if (i % 4 == 1) e.remote_ip = *IpAddr::parse("10.244.3.7");
  if (i % 2) {
    e.source_principal = "spiffe://cluster.local/ns/front/sa/client-" + std::to_string(i);
    e.source_namespace = "front";
  }
  if (i % 5) e.source_workload = "front/client-" + std::to_string(i);
  e.destination_workload = "app/server";
  e.destination = i % 3 ? addr("10.244.2.10:8080") : addr("[fd00:10:244:2::10]:8080");
  switch (i % 4) {
    case 0:
      static_cast<PolicyOutcome&>(e.verdict) = outcome(true, VerdictReason::kNoAllowPolicy, "", -1);
      break;
    case 1:
      static_cast<PolicyOutcome&>(e.verdict) =
          outcome(false, VerdictReason::kDenyMatched, "app/deny-front", 2, {{"app/audit", 0}});
      break;
    case 2:
      static_cast<PolicyOutcome&>(e.verdict) =
          outcome(true, VerdictReason::kAllowMatched, "app/allow", 0);
      e.verdict.dry_run = outcome(false, VerdictReason::kNoAllowMatched, "", -1,
                                  {{"app/audit", 1}, {"front/audit", 3}});
      break;
    default:
      static_cast<PolicyOutcome&>(e.verdict) = outcome(false, VerdictReason::kStrictMtls, "", -1);
  }
  return e;
}

// More than a slot holds: long names (a length of 255 or more takes the wide form) and many
// AUDIT hits.
VerdictEvent bigEvent(uint64_t seq) {
  VerdictEvent e = event(2);
  e.seq = seq;
  e.source_principal = "spiffe://cluster.local/ns/" + std::string(300, 'n') + "/sa/x";
  e.source_workload = std::string(255, 'w');
  for (int i = 0; i < 20; i++) e.verdict.audit.push_back({"app/audit-" + std::to_string(i), i});
  return e;
}

TEST(VerdictRing, EveryFieldReadsBack) {
  VerdictRing ring(64);
  for (int i = 0; i < 20; i++) ring.push(event(i));
  ring.push(bigEvent(21));
  ASSERT_EQ(ring.size(), 21u);
  for (int i = 0; i < 20; i++) {
    VerdictEvent want = event(i);
    VerdictEvent got = ring.eventAt(static_cast<size_t>(i));
    EXPECT_EQ(got.seq, want.seq);
    EXPECT_EQ(got.time_ms, want.time_ms);
    EXPECT_EQ(got.path, want.path);
    EXPECT_EQ(got.source, want.source);
    EXPECT_EQ(got.remote_ip, want.remote_ip);
    EXPECT_EQ(got.source_principal, want.source_principal);
    EXPECT_EQ(got.source_namespace, want.source_namespace);
    EXPECT_EQ(got.source_workload, want.source_workload);
    EXPECT_EQ(got.destination_workload, want.destination_workload);
    EXPECT_EQ(got.destination, want.destination);
    EXPECT_EQ(got.verdict.allowed, want.verdict.allowed);
    EXPECT_EQ(got.verdict.reason, want.verdict.reason);
    EXPECT_EQ(got.verdict.decided_by, want.verdict.decided_by);
    EXPECT_EQ(got.verdict.audit, want.verdict.audit);
    ASSERT_EQ(got.verdict.dry_run.has_value(), want.verdict.dry_run.has_value()) << i;
    if (want.verdict.dry_run) {
      EXPECT_EQ(got.verdict.dry_run->reason, want.verdict.dry_run->reason);
      EXPECT_EQ(got.verdict.dry_run->audit, want.verdict.dry_run->audit);
    }
    EXPECT_EQ(VerdictLog::eventJson(got), VerdictLog::eventJson(want)) << i;
  }
  EXPECT_EQ(VerdictLog::eventJson(ring.eventAt(20)), VerdictLog::eventJson(bigEvent(21)));
  EXPECT_EQ(ring.spilled(), 1u) << "only the oversized event has a block of its own";
}

TEST(VerdictRing, KeepsTheNewestInOrder) {
  VerdictRing ring(3);
  EXPECT_EQ(ring.size(), 0u);
  for (int i = 0; i < 7; i++) ring.push(event(i));
  ASSERT_EQ(ring.size(), 3u);
  EXPECT_EQ(ring.capacity(), 3u);
  for (size_t i = 0; i < 3; i++) EXPECT_EQ(ring.seqAt(i), 5 + i);
  EXPECT_EQ(ring.eventAt(0).source_workload, event(4).source_workload);
  EXPECT_EQ(ring.eventAt(2).source_principal, event(6).source_principal);
  // An oversized event evicted (or overwritten) gives its block back.
  ring.push(bigEvent(8));
  EXPECT_EQ(ring.spilled(), 1u);
  EXPECT_EQ(ring.eventAt(2).source_workload, std::string(255, 'w'));
  for (int i = 8; i < 11; i++) ring.push(event(i));
  EXPECT_EQ(ring.spilled(), 0u);
  EXPECT_EQ(ring.seqAt(0), 9u);
}

TEST(VerdictRing, CapacityChangesKeepTheNewest) {
  VerdictRing ring(4);
  for (int i = 0; i < 6; i++) ring.push(event(i));  // holds 3..6, wrapped
  ring.setCapacity(2);
  ASSERT_EQ(ring.size(), 2u);
  EXPECT_EQ(ring.seqAt(0), 5u);
  EXPECT_EQ(ring.seqAt(1), 6u);
  ring.setCapacity(5);
  for (int i = 6; i < 9; i++) ring.push(event(i));
  ASSERT_EQ(ring.size(), 5u);
  for (size_t i = 0; i < 5; i++) EXPECT_EQ(ring.seqAt(i), 5 + i);
  ring.push(event(9));
  EXPECT_EQ(ring.size(), 5u);
  EXPECT_EQ(ring.seqAt(0), 6u);
  ring.setCapacity(0);
  EXPECT_EQ(ring.size(), 0u);
  ring.push(event(10));
  EXPECT_EQ(ring.size(), 0u) << "capacity 0 keeps nothing";
}

// The earlier VerdictLog: a deque of the last `capacity` events, served as below. The packed
// ring must give the same JSON for the same events.
struct DequeModel {
  size_t capacity;
  std::deque<VerdictEvent> events;
  void record(const VerdictEvent& e) {
    events.push_back(e);
    while (events.size() > capacity) events.pop_front();
  }
  json toJson(uint64_t since, size_t limit, uint64_t last_seq) const {
    json list = json::array();
    size_t newer = 0;
    for (auto it = events.rbegin(); it != events.rend() && it->seq > since; ++it) newer++;
    size_t skip = newer > limit ? newer - limit : 0;
    for (size_t i = events.size() - newer + skip; i < events.size(); i++)
      list.push_back(VerdictLog::eventJson(events[i]));
    return {{"capacity", capacity}, {"last_seq", last_seq}, {"verdicts", list}};
  }
};

TEST(VerdictRing, VerdictsJsonIsWhatTheDequeServed) {
  constexpr size_t kCapacity = 16;
  VerdictLog log(kCapacity);
  DequeModel model{kCapacity, {}};
  log.setObserver([&model](const VerdictEvent& e) { model.record(e); });  // seq, time set
  json empty = log.toJson();
  EXPECT_EQ(empty, model.toJson(0, VerdictLog::kDefaultCapacity, 0));
  for (int i = 0; i < 40; i++) {
    VerdictEvent e = i == 33 ? bigEvent(0) : event(i);
    log.record(std::move(e));
    if (i == 5 || i == 15 || i == 39) {
      for (uint64_t since : {0ull, 3ull, 20ull, 30ull, 39ull, 40ull, 1000ull})
        for (size_t limit : {size_t{0}, size_t{1}, size_t{5}, size_t{16}, size_t{4096}})
          EXPECT_EQ(log.toJson(since, limit), model.toJson(since, limit, log.lastSeq()))
              << "after " << i + 1 << " events, since " << since << " limit " << limit;
    }
  }
  EXPECT_EQ(log.size(), kCapacity);
  EXPECT_EQ(log.capacity(), kCapacity);
}

// One event as /verdicts has always shown it (the format, pinned).
TEST(VerdictRing, OneEventsJsonAsBefore) {
  VerdictLog log(8);
  VerdictEvent e = event(1);
  log.record(std::move(e));
  json j = log.toJson()["verdicts"][0];
  j.erase("time");  // wall clock
  EXPECT_EQ(j, json::parse(R"({
    "seq": 1, "path": "hbone", "result": "deny", "reason": "deny_matched",
    "policy": "app/deny-front", "rule": 2, "decided_by": "app/deny-front rule 2",
    "audit": [{"policy": "app/audit", "rule": 0}], "action": "denied", "dry_run": null,
    "source": {"ip": "10.244.1.10", "port": 40000, "remote_ip": "10.244.3.7",
               "principal": "spiffe://cluster.local/ns/front/sa/client-1",
               "namespace": "front", "workload": "front/client-1"},
    "destination": {"workload": "app/server", "ip": "10.244.2.10", "port": 8080}})"))
      << j.dump();
}

}  // namespace
}  // namespace weft::ztunnel
