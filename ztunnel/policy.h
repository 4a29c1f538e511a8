// L4 authorization (AuthorizationPolicy, Istio's semantics): the policies as the ztunnel holds
// them, the attributes of one inbound connection, and the pure evaluate() that decides it.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/address.h"
#include "common/status.h"
#include "weft/node/v1/node.pb.h"

namespace weft::ztunnel {

// Policies in this namespace apply mesh-wide (DESIGN §6).
constexpr const char* kPolicyRootNamespace = "weft-system";

enum class PolicyAction { kAllow, kDeny, kAudit };
const char* policyActionName(PolicyAction a);  // "ALLOW", "DENY", "AUDIT"

// Istio's string match: "abc" exact, "abc*" prefix, "*abc" suffix, "*" any non-empty value.
struct StringMatcher {
  enum class Kind { kExact, kPrefix, kSuffix, kPresence };
  Kind kind = Kind::kExact;
  std::string value;

  static StringMatcher parse(const std::string& text);
  bool matches(std::string_view s) const;
};

// "10.0.0.0/8", "fd00::/64", or a single address (a full-length prefix).
struct IpBlock {
  IpAddr base;  // host bits cleared
  int prefix_len = 0;

  static Result<IpBlock> parse(const std::string& text);
  bool contains(const IpAddr& ip) const;
};

struct PolicySource {
  std::vector<StringMatcher> principals, not_principals;  // "td/ns/N/sa/S" forms
  std::vector<StringMatcher> namespaces, not_namespaces;
  std::vector<IpBlock> ip_blocks, not_ip_blocks;
  std::vector<IpBlock> remote_ip_blocks, not_remote_ip_blocks;
};

struct PolicyOperation {
  std::vector<uint16_t> ports, not_ports;
};

enum class ConditionKey {
  kSourceIp,
  kRemoteIp,
  kSourceNamespace,
  kSourcePrincipal,
  kDestinationIp,
  kDestinationPort,
  kL7,  // request.* and the like: nothing the ztunnel can see
};

struct PolicyCondition {
  ConditionKey key = ConditionKey::kL7;
  std::string name;  // the key as written
  std::vector<StringMatcher> strings, not_strings;  // namespace / principal keys
  std::vector<IpBlock> ips, not_ips;                // IP keys
  std::vector<uint16_t> ports, not_ports;           // destination.port
};

struct PolicyRule {
  std::vector<PolicySource> from;    // any one; empty = any source
  std::vector<PolicyOperation> to;   // any one; empty = any operation
  std::vector<PolicyCondition> when; // all of them
  std::vector<std::string> l7_fields;  // L7-only attributes found in the rule (see below)
};

struct AuthorizationPolicy {
  std::string name;
  std::string namespace_;
  PolicyAction action = PolicyAction::kAllow;
  bool has_selector = false;  // false: the whole namespace (or mesh, in the root namespace)
  std::map<std::string, std::string> match_labels;
  std::vector<PolicyRule> rules;  // ALLOW/DENY/AUDIT with no rules match nothing
  bool dry_run = false;

  std::string key() const { return namespace_ + "/" + name; }
  // True if the policy's scope covers a workload of `ns` with `labels`: its own namespace
  // (every namespace for the root namespace), narrowed by matchLabels when it has a selector.
  bool appliesTo(const std::string& ns, const std::map<std::string, std::string>& labels) const;
};
using AuthorizationPolicyPtr = std::shared_ptr<const AuthorizationPolicy>;

// Converts and validates a protocol message; errors name the policy and the field.
Result<AuthorizationPolicy> authorizationPolicyFromProto(const node::v1::AuthorizationPolicy& p);

// What the destination ztunnel knows about one inbound connection.
struct ConnectionAttributes {
  IpAddr source_ip;             // the peer of the connection (HBONE: the source pod)
  IpAddr remote_ip;             // the original client (HBONE `forwarded`), else source_ip
  std::string principal;        // "spiffe://td/ns/N/sa/S"; empty = unauthenticated (plaintext)
  std::string source_namespace; // from the principal; empty when unauthenticated
  std::string destination_namespace;
  std::map<std::string, std::string> destination_labels;
  IpAddr destination_ip;
  uint16_t destination_port = 0;
};

// "spiffe://td/ns/N/sa/S" -> "N"; empty if it is not of that shape.
std::string namespaceOfPrincipal(const std::string& principal);

enum class VerdictReason {
  kNoAllowPolicy,   // allowed: no ALLOW policy applies to the workload
  kDenyMatched,     // denied by a matching DENY policy
  kAllowMatched,    // allowed by a matching ALLOW policy
  kNoAllowMatched,  // denied: ALLOW policies apply, none matched
  kStrictMtls,      // denied before any policy: plaintext to a pod under STRICT peer authn
};
const char* verdictReasonName(VerdictReason r);

struct PolicyHit {
  std::string policy;  // "namespace/name"
  int rule = -1;       // index in spec.rules
  bool operator==(const PolicyHit&) const = default;
};

// The outcome of one evaluation.
struct PolicyOutcome {
  bool allowed = true;
  VerdictReason reason = VerdictReason::kNoAllowPolicy;
  PolicyHit decided_by;          // the DENY or ALLOW policy and rule; empty policy otherwise
  std::vector<PolicyHit> audit;  // every matching AUDIT policy (first matching rule)
};

struct Verdict : PolicyOutcome {
  // Set when a dry-run policy applies to the workload: the outcome had the dry-run policies
  // been enforced too. Never changes `allowed`.
  std::optional<PolicyOutcome> dry_run;
};

// Istio's order: a matching DENY denies; otherwise, if any ALLOW policy applies to the
// workload, allow only if one matches; otherwise allow. AUDIT only marks. Policies whose scope
// does not cover the destination are skipped. Dry-run policies do not take part in the
// enforced outcome; a second pass with them counts fills `dry_run`.
//
// L7-only attributes (no waypoint here): a rule of an ALLOW policy that has any matches
// nothing; in DENY and AUDIT rules those conditions count as met and the rule's L4 conditions
// still apply — never more permissive than written.
Verdict evaluate(const std::vector<AuthorizationPolicyPtr>& policies,
                 const ConnectionAttributes& conn);

// One policy's rules against the connection (scope not checked): the index of the first
// matching rule, or -1.
int firstMatchingRule(const AuthorizationPolicy& policy, const ConnectionAttributes& conn);

}  // namespace weft::ztunnel
