// Authorization verdicts of one proxy loop: the bounded ring of recent decisions behind the
// admin /verdicts endpoint and the weft_ztunnel_policy_* counters.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>

#include <nlohmann/json.hpp>

#include "common/address.h"
#include "ztunnel/policy.h"
#include "ztunnel/verdict_ring.h"

namespace weft::ztunnel {

// One inbound decision, as the monitor sees it.
struct VerdictEvent {
  uint64_t seq = 0;     // set by the log, increasing from 1
  int64_t time_ms = 0;  // wall clock, set by the log
  std::string path;     // "hbone" or "plaintext"
  SocketAddress source;  // the connection's peer
  IpAddr remote_ip;      // the original client (HBONE forwarded), else the peer
  std::string source_principal;  // empty = unauthenticated
  std::string source_namespace;
  std::string source_workload;   // "ns/name" of the pod with the source IP, if known
  std::string destination_workload;  // "ns/name"
  SocketAddress destination;
  Verdict verdict;
};

// Ring of the last `capacity` events plus counters. Per loop (lives in Proxy), like the other
// mutable proxy state. The events are kept packed (VerdictRing): recording one allocates
// nothing once the ring's array exists.
class VerdictLog {
 public:
  static constexpr size_t kDefaultCapacity = 4096;
  explicit VerdictLog(size_t capacity = kDefaultCapacity) : ring_(capacity) {}

  void record(VerdictEvent event);

  // The newest events with seq > `since`, oldest first, at most `limit` (the newest ones).
  nlohmann::json toJson(uint64_t since = 0, size_t limit = kDefaultCapacity) const;
  static nlohmann::json eventJson(const VerdictEvent& e);
  // weft_ztunnel_policy_verdicts_total{result, action_policy},
  // weft_ztunnel_policy_dry_run_verdicts_total{result}, weft_ztunnel_policy_audit_total.
  std::string renderPrometheus() const;

  // Called with every event as it is recorded (the /events stream); one observer.
  void setObserver(std::function<void(const VerdictEvent&)> observer) {
    observer_ = std::move(observer);
  }
  // How many events the ring keeps; 0 = none (counted and observed only). Drops the oldest.
  void setCapacity(size_t capacity) { ring_.setCapacity(capacity); }
  size_t capacity() const { return ring_.capacity(); }

  uint64_t lastSeq() const { return seq_; }
  size_t size() const { return ring_.size(); }
  // (result, action_policy) -> count; action_policy is "none" | "ALLOW" | "DENY".
  const std::map<std::pair<std::string, std::string>, uint64_t>& counts() const {
    return counts_;
  }

 private:
  uint64_t seq_ = 0;
  VerdictRing ring_;
  std::map<std::pair<std::string, std::string>, uint64_t> counts_;
  uint64_t dry_run_allow_ = 0;
  uint64_t dry_run_deny_ = 0;
  uint64_t audit_ = 0;
  std::function<void(const VerdictEvent&)> observer_;
};

// An outcome as JSON: result, reason, the deciding policy and rule ("decided_by": "ns/name rule
// N" or "default") and the AUDIT hits. Verdict events and /trace show the same shape.
nlohmann::json outcomeJson(const PolicyOutcome& o);

// The label value of action_policy for an outcome: the kind of policy that decided it.
const char* actionPolicyLabel(const PolicyOutcome& o);

}  // namespace weft::ztunnel
