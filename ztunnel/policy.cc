// AuthorizationPolicy evaluation: protocol conversion, Istio's string/IP/port matching and the
// DENY → ALLOW → default order, with AUDIT marks and a dry-run shadow pass.
#include "ztunnel/policy.h"

#include <algorithm>
#include <charconv>
#include <cstring>

namespace weft::ztunnel {

namespace pb = weft::node::v1;

const char* policyActionName(PolicyAction a) {
  switch (a) {
    case PolicyAction::kAllow: return "ALLOW";
    case PolicyAction::kDeny: return "DENY";
    case PolicyAction::kAudit: return "AUDIT";
  }
  return "ALLOW";
}

const char* verdictReasonName(VerdictReason r) {
  switch (r) {
    case VerdictReason::kNoAllowPolicy: return "no_allow_policy";
    case VerdictReason::kDenyMatched: return "deny_matched";
    case VerdictReason::kAllowMatched: return "allow_matched";
    case VerdictReason::kNoAllowMatched: return "no_allow_matched";
    case VerdictReason::kStrictMtls: return "strict_mtls";
  }
  return "no_allow_policy";
}

StringMatcher StringMatcher::parse(const std::string& text) {
  StringMatcher m;
  if (text == "*") {
    m.kind = Kind::kPresence;
  } else if (!text.empty() && text.front() == '*') {
    m.kind = Kind::kSuffix;
    m.value = text.substr(1);
  } else if (!text.empty() && text.back() == '*') {
    m.kind = Kind::kPrefix;
    m.value = text.substr(0, text.size() - 1);
  } else {
    m.value = text;
  }
  return m;
}

bool StringMatcher::matches(std::string_view s) const {
  switch (kind) {
    case Kind::kExact: return s == value;
    case Kind::kPrefix: return s.size() >= value.size() && s.compare(0, value.size(), value) == 0;
    case Kind::kSuffix:
      return s.size() >= value.size() &&
             s.compare(s.size() - value.size(), value.size(), value) == 0;
    case Kind::kPresence: return !s.empty();
  }
  return false;
}

namespace {

// The address bytes (4 or 16) of an IP, for prefix comparison.
std::pair<const uint8_t*, int> bytesOf(const IpAddr& ip) {
  if (ip.isV4()) return {reinterpret_cast<const uint8_t*>(&ip.v4addr().s_addr), 4};
  if (ip.isV6()) return {ip.v6addr().s6_addr, 16};
  return {nullptr, 0};
}

bool prefixEqual(const uint8_t* a, const uint8_t* b, int bits) {
  int whole = bits / 8;
  if (std::memcmp(a, b, static_cast<size_t>(whole)) != 0) return false;
  int rest = bits % 8;
  if (rest == 0) return true;
  uint8_t mask = static_cast<uint8_t>(0xff << (8 - rest));
  return (a[whole] & mask) == (b[whole] & mask);
}

}  // namespace

Result<IpBlock> IpBlock::parse(const std::string& text) {
  std::string addr = text;
  int len = -1;
  size_t slash = text.find('/');
  if (slash != std::string::npos) {
    addr = text.substr(0, slash);
    std::string l = text.substr(slash + 1);
    int v = -1;
    auto [p, ec] = std::from_chars(l.data(), l.data() + l.size(), v);
    if (l.empty() || ec != std::errc() || p != l.data() + l.size())
      return Status::errorf("\"{}\" is not an IP address or CIDR block", text);
    len = v;
  }
  auto ip = IpAddr::parse(addr);
  if (!ip) return Status::errorf("\"{}\" is not an IP address or CIDR block", text);
  int max = ip->isV4() ? 32 : 128;
  if (len < 0) len = max;
  if (len > max) return Status::errorf("\"{}\": prefix length over {}", text, max);
  IpBlock b;
  b.prefix_len = len;
  // Clear the host bits so that contains() compares prefixes only.
  if (ip->isV4()) {
    uint32_t host = ntohl(ip->v4addr().s_addr);
    uint32_t mask = len == 0 ? 0 : ~uint32_t{0} << (32 - len);
    b.base = IpAddr::v4(host & mask);
  } else {
    in6_addr a = ip->v6addr();
    for (int i = 0; i < 16; i++) {
      int bits = std::clamp(len - i * 8, 0, 8);
      a.s6_addr[i] &= static_cast<uint8_t>(bits == 0 ? 0 : 0xff << (8 - bits));
    }
    b.base = IpAddr::fromV6(a);
  }
  return b;
}

bool IpBlock::contains(const IpAddr& ip) const {
  if (ip.family() != base.family() || ip.family() == 0) return false;
  auto [a, n] = bytesOf(ip);
  auto [b, m] = bytesOf(base);
  return n == m && prefixEqual(a, b, prefix_len);
}

bool AuthorizationPolicy::appliesTo(const std::string& ns,
                                    const std::map<std::string, std::string>& labels) const {
  if (namespace_ != kPolicyRootNamespace && namespace_ != ns) return false;
  if (!has_selector) return true;
  for (const auto& [k, v] : match_labels) {
    auto it = labels.find(k);
    if (it == labels.end() || it->second != v) return false;
  }
  return true;
}

std::string namespaceOfPrincipal(const std::string& principal) {
  // spiffe://<td>/ns/<ns>/sa/<sa>
  constexpr std::string_view kScheme = "spiffe://";
  if (principal.compare(0, kScheme.size(), kScheme) != 0) return {};
  size_t ns = principal.find("/ns/", kScheme.size());
  if (ns == std::string::npos) return {};
  size_t start = ns + 4;
  size_t end = principal.find('/', start);
  if (end == std::string::npos || end == start) return {};
  return principal.substr(start, end - start);
}

namespace {

Status parseBlocks(const google::protobuf::RepeatedPtrField<std::string>& in,
                   const std::string& field, std::vector<IpBlock>* out) {
  for (const std::string& s : in) {
    auto b = IpBlock::parse(s);
    if (!b) return b.status().context(field);
    out->push_back(*b);
  }
  return Status::ok();
}

void parseStrings(const google::protobuf::RepeatedPtrField<std::string>& in,
                  std::vector<StringMatcher>* out) {
  for (const std::string& s : in) out->push_back(StringMatcher::parse(s));
}

Status parsePorts(const google::protobuf::RepeatedField<uint32_t>& in, const std::string& field,
                  std::vector<uint16_t>* out) {
  for (uint32_t p : in) {
    if (p == 0 || p > 65535) return Status::errorf("{}: port {} out of range", field, p);
    out->push_back(static_cast<uint16_t>(p));
  }
  return Status::ok();
}

Status parseCondition(const pb::AuthorizationPolicyCondition& c, const std::string& where,
                      PolicyCondition* out) {
  out->name = c.key();
  if (c.l7()) {
    out->key = ConditionKey::kL7;
    return Status::ok();
  }
  static const std::pair<const char*, ConditionKey> kKeys[] = {
      {"source.ip", ConditionKey::kSourceIp},
      {"remote.ip", ConditionKey::kRemoteIp},
      {"source.namespace", ConditionKey::kSourceNamespace},
      {"source.principal", ConditionKey::kSourcePrincipal},
      {"destination.ip", ConditionKey::kDestinationIp},
      {"destination.port", ConditionKey::kDestinationPort},
  };
  bool known = false;
  for (const auto& [name, key] : kKeys) {
    if (c.key() == name) {
      out->key = key;
      known = true;
    }
  }
  if (!known) return Status::errorf("{}: unknown key \"{}\"", where, c.key());
  switch (out->key) {
    case ConditionKey::kSourceIp:
    case ConditionKey::kRemoteIp:
    case ConditionKey::kDestinationIp: {
      Status st = parseBlocks(c.values(), where + ".values", &out->ips);
      if (st) st = parseBlocks(c.not_values(), where + ".notValues", &out->not_ips);
      return st;
    }
    case ConditionKey::kDestinationPort:
      for (const auto* list : {&c.values(), &c.not_values()}) {
        for (const std::string& s : *list) {
          unsigned v = 0;
          auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
          if (s.empty() || ec != std::errc() || p != s.data() + s.size() || v == 0 || v > 65535)
            return Status::errorf("{}: \"{}\" is not a port", where, s);
          (list == &c.values() ? out->ports : out->not_ports).push_back(static_cast<uint16_t>(v));
        }
      }
      return Status::ok();
    default:
      parseStrings(c.values(), &out->strings);
      parseStrings(c.not_values(), &out->not_strings);
      return Status::ok();
  }
}

}  // namespace

Result<AuthorizationPolicy> authorizationPolicyFromProto(const pb::AuthorizationPolicy& p) {
  std::string what = "authorization policy " + p.namespace_() + "/" + p.name();
  if (p.name().empty() || p.namespace_().empty())
    return Status::error(what + ": name and namespace are required");
  AuthorizationPolicy out;
  out.name = p.name();
  out.namespace_ = p.namespace_();
  switch (p.action()) {
    case pb::AuthorizationPolicy::ALLOW: out.action = PolicyAction::kAllow; break;
    case pb::AuthorizationPolicy::DENY: out.action = PolicyAction::kDeny; break;
    case pb::AuthorizationPolicy::AUDIT: out.action = PolicyAction::kAudit; break;
    default: return Status::errorf("{}: action: unknown value {}", what, p.action());
  }
  out.has_selector = p.has_selector();
  for (const auto& [k, v] : p.match_labels()) out.match_labels[k] = v;
  out.dry_run = p.dry_run();
  for (int i = 0; i < p.rules_size(); i++) {
    const auto& r = p.rules(i);
    const std::string rp = what + ": rules[" + std::to_string(i) + "]";
    PolicyRule rule;
    for (int j = 0; j < r.from_size(); j++) {
      const auto& s = r.from(j);
      const std::string sp = rp + ".from[" + std::to_string(j) + "].source";
      PolicySource src;
      parseStrings(s.principals(), &src.principals);
      parseStrings(s.not_principals(), &src.not_principals);
      parseStrings(s.namespaces(), &src.namespaces);
      parseStrings(s.not_namespaces(), &src.not_namespaces);
      Status st = parseBlocks(s.ip_blocks(), sp + ".ipBlocks", &src.ip_blocks);
      if (st) st = parseBlocks(s.not_ip_blocks(), sp + ".notIpBlocks", &src.not_ip_blocks);
      if (st) st = parseBlocks(s.remote_ip_blocks(), sp + ".remoteIpBlocks",
                               &src.remote_ip_blocks);
      if (st) st = parseBlocks(s.not_remote_ip_blocks(), sp + ".notRemoteIpBlocks",
                               &src.not_remote_ip_blocks);
      if (!st) return st;
      rule.from.push_back(std::move(src));
    }
    for (int j = 0; j < r.to_size(); j++) {
      const std::string op = rp + ".to[" + std::to_string(j) + "].operation";
      PolicyOperation o;
      Status st = parsePorts(r.to(j).ports(), op + ".ports", &o.ports);
      if (st) st = parsePorts(r.to(j).not_ports(), op + ".notPorts", &o.not_ports);
      if (!st) return st;
      rule.to.push_back(std::move(o));
    }
    for (int j = 0; j < r.when_size(); j++) {
      PolicyCondition c;
      Status st = parseCondition(r.when(j), rp + ".when[" + std::to_string(j) + "]", &c);
      if (!st) return st;
      rule.when.push_back(std::move(c));
    }
    rule.l7_fields.assign(r.l7_fields().begin(), r.l7_fields().end());
    out.rules.push_back(std::move(rule));
  }
  return out;
}

namespace {

// Istio's positive/negative pair: every positive list must have a hit (when not empty), no
// negative list may have one.
template <typename T, typename Pred>
bool matchPair(const std::vector<T>& positive, const std::vector<T>& negative, Pred pred) {
  if (!positive.empty() && std::none_of(positive.begin(), positive.end(), pred)) return false;
  if (std::any_of(negative.begin(), negative.end(), pred)) return false;
  return true;
}

// Principals are matched without "spiffe://" (Istio's spelling); an unauthenticated caller
// has no principal, so no positive principal pattern can match it, and every negative one
// lets it through.
bool principalMatches(const StringMatcher& m, const std::string& principal) {
  constexpr std::string_view kScheme = "spiffe://";
  if (principal.compare(0, kScheme.size(), kScheme) != 0) return false;
  return m.matches(std::string_view(principal).substr(kScheme.size()));
}

bool sourceMatches(const PolicySource& s, const ConnectionAttributes& c) {
  auto principal = [&](const StringMatcher& m) { return principalMatches(m, c.principal); };
  auto ns = [&](const StringMatcher& m) { return m.matches(c.source_namespace); };
  auto src_ip = [&](const IpBlock& b) { return b.contains(c.source_ip); };
  auto remote_ip = [&](const IpBlock& b) { return b.contains(c.remote_ip); };
  return matchPair(s.principals, s.not_principals, principal) &&
         matchPair(s.namespaces, s.not_namespaces, ns) &&
         matchPair(s.ip_blocks, s.not_ip_blocks, src_ip) &&
         matchPair(s.remote_ip_blocks, s.not_remote_ip_blocks, remote_ip);
}

bool operationMatches(const PolicyOperation& o, const ConnectionAttributes& c) {
  return matchPair(o.ports, o.not_ports, [&](uint16_t p) { return p == c.destination_port; });
}

bool conditionMatches(const PolicyCondition& w, const ConnectionAttributes& c) {
  switch (w.key) {
    case ConditionKey::kSourceIp:
      return matchPair(w.ips, w.not_ips, [&](const IpBlock& b) { return b.contains(c.source_ip); });
    case ConditionKey::kRemoteIp:
      return matchPair(w.ips, w.not_ips, [&](const IpBlock& b) { return b.contains(c.remote_ip); });
    case ConditionKey::kDestinationIp:
      return matchPair(w.ips, w.not_ips,
                       [&](const IpBlock& b) { return b.contains(c.destination_ip); });
    case ConditionKey::kDestinationPort:
      return matchPair(w.ports, w.not_ports, [&](uint16_t p) { return p == c.destination_port; });
    case ConditionKey::kSourceNamespace:
      return matchPair(w.strings, w.not_strings,
                       [&](const StringMatcher& m) { return m.matches(c.source_namespace); });
    case ConditionKey::kSourcePrincipal:
      return matchPair(w.strings, w.not_strings,
                       [&](const StringMatcher& m) { return principalMatches(m, c.principal); });
    case ConditionKey::kL7:
      // Only reached in DENY/AUDIT rules (an ALLOW rule with L7 never matches): met, so the
      // rule is enforced on its L4 conditions — more restrictive than written, never less.
      return true;
  }
  return false;
}

bool ruleMatches(const PolicyRule& r, PolicyAction action, const ConnectionAttributes& c) {
  if (action == PolicyAction::kAllow && !r.l7_fields.empty()) return false;
  if (!r.from.empty() &&
      std::none_of(r.from.begin(), r.from.end(),
                   [&](const PolicySource& s) { return sourceMatches(s, c); }))
    return false;
  if (!r.to.empty() &&
      std::none_of(r.to.begin(), r.to.end(),
                   [&](const PolicyOperation& o) { return operationMatches(o, c); }))
    return false;
  return std::all_of(r.when.begin(), r.when.end(),
                     [&](const PolicyCondition& w) { return conditionMatches(w, c); });
}

PolicyOutcome evaluatePass(const std::vector<const AuthorizationPolicy*>& applicable,
                           const ConnectionAttributes& c, bool with_dry_run) {
  PolicyOutcome out;
  bool any_allow = false;
  std::optional<PolicyHit> deny, allow;
  for (const AuthorizationPolicy* p : applicable) {
    if (p->dry_run && !with_dry_run) continue;
    if (p->action == PolicyAction::kAllow) any_allow = true;
    // The first DENY and the first ALLOW (in key order) that match are the ones reported.
    if (p->action == PolicyAction::kDeny && deny) continue;
    if (p->action == PolicyAction::kAllow && allow) continue;
    int rule = firstMatchingRule(*p, c);
    if (rule < 0) continue;
    PolicyHit hit{p->key(), rule};
    switch (p->action) {
      case PolicyAction::kDeny: deny = hit; break;
      case PolicyAction::kAllow: allow = hit; break;
      case PolicyAction::kAudit: out.audit.push_back(hit); break;
    }
  }
  if (deny) {
    out.allowed = false;
    out.reason = VerdictReason::kDenyMatched;
    out.decided_by = *deny;
  } else if (!any_allow) {
    out.allowed = true;
    out.reason = VerdictReason::kNoAllowPolicy;
  } else if (allow) {
    out.allowed = true;
    out.reason = VerdictReason::kAllowMatched;
    out.decided_by = *allow;
  } else {
    out.allowed = false;
    out.reason = VerdictReason::kNoAllowMatched;
  }
  return out;
}

}  // namespace

int firstMatchingRule(const AuthorizationPolicy& p, const ConnectionAttributes& c) {
  for (size_t i = 0; i < p.rules.size(); i++)
    if (ruleMatches(p.rules[i], p.action, c)) return static_cast<int>(i);
  return -1;
}

Verdict evaluate(const std::vector<AuthorizationPolicyPtr>& policies,
                 const ConnectionAttributes& conn) {
  std::vector<const AuthorizationPolicy*> applicable;
  bool any_dry_run = false;
  for (const AuthorizationPolicyPtr& p : policies) {
    if (!p || !p->appliesTo(conn.destination_namespace, conn.destination_labels)) continue;
    applicable.push_back(p.get());
    any_dry_run = any_dry_run || p->dry_run;
  }
  Verdict v;
  static_cast<PolicyOutcome&>(v) = evaluatePass(applicable, conn, false);
  if (any_dry_run) v.dry_run = evaluatePass(applicable, conn, true);
  return v;
}

}  // namespace weft::ztunnel
