// The verdict ring and counters: JSON for /verdicts, Prometheus text for /metrics.
#include "ztunnel/verdicts.h"

#include <fmt/format.h>

#include <chrono>
#include <ctime>
#include <string_view>

namespace weft::ztunnel {

const char* actionPolicyLabel(const PolicyOutcome& o) {
  switch (o.reason) {
    case VerdictReason::kNoAllowPolicy: return "none";
    case VerdictReason::kDenyMatched: return "DENY";
    case VerdictReason::kAllowMatched:
    case VerdictReason::kNoAllowMatched: return "ALLOW";  // the ALLOW policies decided
    case VerdictReason::kStrictMtls: return "PeerAuthentication";
  }
  return "none";
}

void VerdictLog::record(VerdictEvent e) {
  e.seq = ++seq_;
  e.time_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                  std::chrono::system_clock::now().time_since_epoch())
                  .count();
  counts_[{e.verdict.allowed ? "allow" : "deny", actionPolicyLabel(e.verdict)}]++;
  if (e.verdict.dry_run) (e.verdict.dry_run->allowed ? dry_run_allow_ : dry_run_deny_)++;
  if (!e.verdict.audit.empty()) audit_++;
  if (observer_) observer_(e);
  ring_.push(e);
}

namespace {

std::string isoTime(int64_t ms) {
  time_t secs = static_cast<time_t>(ms / 1000);
  struct tm tm {};
  gmtime_r(&secs, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%S", &tm);
  return fmt::format("{}.{:03d}Z", buf, static_cast<int>(ms % 1000));
}

nlohmann::json hitJson(const PolicyHit& h) {
  if (h.policy.empty()) return nullptr;
  return {{"policy", h.policy}, {"rule", h.rule}};
}

nlohmann::json orNull(const std::string& s) {
  return s.empty() ? nlohmann::json(nullptr) : nlohmann::json(s);
}

}  // namespace

nlohmann::json outcomeJson(const PolicyOutcome& o) {
  nlohmann::json audit = nlohmann::json::array();
  for (const PolicyHit& h : o.audit) audit.push_back(hitJson(h));
  bool decided = !o.decided_by.policy.empty();
  const char* undecided =
      o.reason == VerdictReason::kStrictMtls ? "PeerAuthentication STRICT" : "default";
  return {{"result", o.allowed ? "allow" : "deny"},
          {"reason", verdictReasonName(o.reason)},
          {"policy", decided ? nlohmann::json(o.decided_by.policy) : nlohmann::json(nullptr)},
          {"rule", decided ? nlohmann::json(o.decided_by.rule) : nlohmann::json(nullptr)},
          {"decided_by", decided ? nlohmann::json(o.decided_by.policy + " rule " +
                                                  std::to_string(o.decided_by.rule))
                                 : nlohmann::json(undecided)},
          {"audit", audit}};
}

nlohmann::json VerdictLog::eventJson(const VerdictEvent& e) {
  nlohmann::json j = outcomeJson(e.verdict);
  j["seq"] = e.seq;
  j["time"] = isoTime(e.time_ms);
  j["path"] = e.path;
  j["source"] = {{"ip", e.source.ip().toString()},
                 {"port", e.source.port()},
                 {"remote_ip", e.remote_ip.family() ? e.remote_ip.toString() : std::string()},
                 {"principal", orNull(e.source_principal)},
                 {"namespace", orNull(e.source_namespace)},
                 {"workload", orNull(e.source_workload)}};
  j["destination"] = {{"workload", e.destination_workload},
                      {"ip", e.destination.ip().toString()},
                      {"port", e.destination.port()}};
  j["action"] = e.verdict.allowed ? "allowed" : "denied";
  j["dry_run"] = e.verdict.dry_run ? outcomeJson(*e.verdict.dry_run) : nlohmann::json(nullptr);
  return j;
}

nlohmann::json VerdictLog::toJson(uint64_t since, size_t limit) const {
  nlohmann::json list = nlohmann::json::array();
  size_t n = ring_.size(), newer = 0;
  while (newer < n && ring_.seqAt(n - 1 - newer) > since) newer++;
  size_t skip = newer > limit ? newer - limit : 0;
  for (size_t i = n - newer + skip; i < n; i++) list.push_back(eventJson(ring_.eventAt(i)));
  return {{"capacity", ring_.capacity()}, {"last_seq", seq_}, {"verdicts", list}};
}

std::string VerdictLog::renderPrometheus() const {
  std::string out =
      "# HELP weft_ztunnel_policy_verdicts_total Inbound authorization decisions, by result and "
      "the kind of policy that decided (none = no ALLOW policy applies; PeerAuthentication = "
      "plaintext refused under STRICT mTLS)\n"
      "# TYPE weft_ztunnel_policy_verdicts_total counter\n";
  for (const char* result : {"allow", "deny"}) {
    for (const char* action : {"none", "ALLOW", "DENY", "PeerAuthentication"}) {
      auto it = counts_.find({result, action});
      uint64_t n = it == counts_.end() ? 0 : it->second;
      // Only the combinations that can happen, so dashboards see zeros, not gaps.
      std::string_view a = action;
      bool possible = std::string_view(result) == "allow" ? a == "none" || a == "ALLOW"
                                                          : a != "none";
      if (!possible) continue;
      out += fmt::format(
          "weft_ztunnel_policy_verdicts_total{{result=\"{}\",action_policy=\"{}\"}} {}\n", result,
          action, n);
    }
  }
  out += fmt::format(
      "# HELP weft_ztunnel_policy_dry_run_verdicts_total What decisions would have been with "
      "the dry-run policies enforced (connections where one applies)\n"
      "# TYPE weft_ztunnel_policy_dry_run_verdicts_total counter\n"
      "weft_ztunnel_policy_dry_run_verdicts_total{{result=\"allow\"}} {}\n"
      "weft_ztunnel_policy_dry_run_verdicts_total{{result=\"deny\"}} {}\n"
      "# HELP weft_ztunnel_policy_audit_total Connections marked by a matching AUDIT policy\n"
      "# TYPE weft_ztunnel_policy_audit_total counter\n"
      "weft_ztunnel_policy_audit_total {}\n",
      dry_run_allow_, dry_run_deny_, audit_);
  return out;
}

}  // namespace weft::ztunnel
