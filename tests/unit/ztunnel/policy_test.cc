// AuthorizationPolicy evaluation: Istio's order, scope, every source/operation/condition field
// and its not-form, unauthenticated callers, AUDIT, dry-run, L7-only rules; the protocol
// conversion, the cluster state's policy set, the verdict ring and the forwarded header.
#include "ztunnel/policy.h"

#include <gtest/gtest.h>

#include "ztunnel/cluster_state.h"
#include "ztunnel/inbound_policy.h"
#include "ztunnel/verdicts.h"
#include "tests/unit/ztunnel/test_addr.h"

namespace weft::ztunnel {
namespace {

using testutil::ip;

namespace pb = weft::node::v1;

constexpr const char* kClient = "spiffe://cluster.local/ns/front/sa/client";
constexpr const char* kAdmin = "spiffe://cluster.local/ns/ops/sa/admin";


// An HBONE connection from front/client (10.244.1.10) to app/server 10.244.2.10:8080.
ConnectionAttributes conn(const std::string& principal = kClient, uint16_t port = 8080) {
  ConnectionAttributes c;
  c.source_ip = ip("10.244.1.10");
  c.remote_ip = c.source_ip;
  c.principal = principal;
  c.source_namespace = namespaceOfPrincipal(principal);
  c.destination_namespace = "app";
  c.destination_labels = {{"app", "server"}, {"tier", "backend"}};
  c.destination_ip = ip("10.244.2.10");
  c.destination_port = port;
  return c;
}

ConnectionAttributes plaintext(const char* source = "10.244.1.20", uint16_t port = 8080) {
  ConnectionAttributes c = conn("", port);
  c.source_ip = ip(source);
  c.remote_ip = c.source_ip;
  return c;
}

// Policies are written as the agent sends them (protocol messages), so the conversion is
// exercised by every test.
struct P {
  pb::AuthorizationPolicy msg;
  P(const std::string& ns, const std::string& name, pb::AuthorizationPolicy::Action a) {
    msg.set_namespace_(ns);
    msg.set_name(name);
    msg.set_action(a);
  }
  P& selector(std::map<std::string, std::string> labels) {
    msg.set_has_selector(true);
    for (auto& [k, v] : labels) (*msg.mutable_match_labels())[k] = v;
    return *this;
  }
  P& dryRun() {
    msg.set_dry_run(true);
    return *this;
  }
  pb::AuthorizationPolicyRule* rule() { return msg.add_rules(); }
  P& anyRule() {
    msg.add_rules();
    return *this;
  }
  AuthorizationPolicyPtr build() const {
    auto p = authorizationPolicyFromProto(msg);
    EXPECT_TRUE(p.isOk()) << p.status().message();
    return std::make_shared<const AuthorizationPolicy>(p.isOk() ? *p : AuthorizationPolicy{});
  }
};
constexpr auto ALLOW = pb::AuthorizationPolicy::ALLOW;
constexpr auto DENY = pb::AuthorizationPolicy::DENY;
constexpr auto AUDIT = pb::AuthorizationPolicy::AUDIT;

// One policy of `action` in namespace app with one rule, shaped by `fill`.
template <typename F>
AuthorizationPolicyPtr oneRule(pb::AuthorizationPolicy::Action action, F fill,
                               const std::string& ns = "app") {
  P p(ns, "p", action);
  fill(p.rule());
  return p.build();
}

// Whether a single-rule ALLOW policy built by `fill` lets `c` through.
template <typename F>
bool allows(F fill, const ConnectionAttributes& c) {
  return evaluate({oneRule(ALLOW, fill)}, c).allowed;
}

TEST(StringMatcher, IstioForms) {
  EXPECT_TRUE(StringMatcher::parse("abc").matches("abc"));
  EXPECT_FALSE(StringMatcher::parse("abc").matches("abcd"));
  EXPECT_TRUE(StringMatcher::parse("abc*").matches("abc"));
  EXPECT_TRUE(StringMatcher::parse("abc*").matches("abcd"));
  EXPECT_FALSE(StringMatcher::parse("abc*").matches("xabc"));
  EXPECT_TRUE(StringMatcher::parse("*abc").matches("xabc"));
  EXPECT_TRUE(StringMatcher::parse("*abc").matches("abc"));
  EXPECT_FALSE(StringMatcher::parse("*abc").matches("abcx"));
  EXPECT_TRUE(StringMatcher::parse("*").matches("x"));
  EXPECT_FALSE(StringMatcher::parse("*").matches("")) << "presence needs a value";
}

TEST(IpBlock, ParseAndContain) {
  auto b = IpBlock::parse("10.244.1.77/24");
  ASSERT_TRUE(b.isOk());
  EXPECT_EQ(b->base.toString(), "10.244.1.0") << "host bits cleared";
  EXPECT_TRUE(b->contains(ip("10.244.1.10")));
  EXPECT_FALSE(b->contains(ip("10.244.2.10")));
  EXPECT_FALSE(b->contains(ip("fd00::1"))) << "families never mix";
  auto one = IpBlock::parse("10.244.1.10");
  ASSERT_TRUE(one.isOk());
  EXPECT_EQ(one->prefix_len, 32);
  EXPECT_TRUE(one->contains(ip("10.244.1.10")));
  EXPECT_FALSE(one->contains(ip("10.244.1.11")));
  auto v6 = IpBlock::parse("fd00:10:244:1::/64");
  ASSERT_TRUE(v6.isOk());
  EXPECT_TRUE(v6->contains(ip("fd00:10:244:1::10")));
  EXPECT_FALSE(v6->contains(ip("fd00:10:244:2::10")));
  auto odd = IpBlock::parse("fd00:10:244:1::/57");
  ASSERT_TRUE(odd.isOk());
  EXPECT_TRUE(odd->contains(ip("fd00:10:244:7f::1")));
  EXPECT_FALSE(odd->contains(ip("fd00:10:244:80::1")));
  auto all = IpBlock::parse("0.0.0.0/0");
  ASSERT_TRUE(all.isOk());
  EXPECT_TRUE(all->contains(ip("1.2.3.4")));
  EXPECT_FALSE(IpBlock::parse("10.0.0.0/33").isOk());
  EXPECT_FALSE(IpBlock::parse("10.0.0/8").isOk());
  EXPECT_FALSE(IpBlock::parse("10.0.0.0/").isOk());
  EXPECT_FALSE(IpBlock::parse("host").isOk());
}

TEST(Principal, NamespaceOf) {
  EXPECT_EQ(namespaceOfPrincipal(kClient), "front");
  EXPECT_EQ(namespaceOfPrincipal(""), "");
  EXPECT_EQ(namespaceOfPrincipal("cluster.local/ns/x/sa/y"), "") << "needs spiffe://";
  EXPECT_EQ(namespaceOfPrincipal("spiffe://td/ns//sa/y"), "");
}

// --- Istio's order -------------------------------------------------------------------------

TEST(Evaluate, NoPolicyAllows) {
  Verdict v = evaluate({}, conn());
  EXPECT_TRUE(v.allowed);
  EXPECT_EQ(v.reason, VerdictReason::kNoAllowPolicy);
  EXPECT_EQ(v.decided_by.policy, "");
  EXPECT_FALSE(v.dry_run.has_value());
}

TEST(Evaluate, AllowWithNoRulesAllowsNothing) {
  Verdict v = evaluate({P("app", "allow-nothing", ALLOW).build()}, conn());
  EXPECT_FALSE(v.allowed);
  EXPECT_EQ(v.reason, VerdictReason::kNoAllowMatched);
}

TEST(Evaluate, EmptyRuleMatchesEverything) {
  Verdict v = evaluate({P("app", "allow-all", ALLOW).anyRule().build()}, plaintext());
  EXPECT_TRUE(v.allowed);
  EXPECT_EQ(v.reason, VerdictReason::kAllowMatched);
  EXPECT_EQ(v.decided_by, (PolicyHit{"app/allow-all", 0}));
  Verdict d = evaluate({P("app", "deny-all", DENY).anyRule().build()}, conn());
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.reason, VerdictReason::kDenyMatched);
}

TEST(Evaluate, DenyWithNoRulesDeniesNothing) {
  Verdict v = evaluate({P("app", "deny-nothing", DENY).build()}, conn());
  EXPECT_TRUE(v.allowed);
  EXPECT_EQ(v.reason, VerdictReason::kNoAllowPolicy);
}

TEST(Evaluate, DenyBeatsAllow) {
  auto allow = P("app", "a-allow", ALLOW).anyRule().build();
  auto deny = P("app", "z-deny", DENY).anyRule().build();
  Verdict v = evaluate({allow, deny}, conn());
  EXPECT_FALSE(v.allowed);
  EXPECT_EQ(v.reason, VerdictReason::kDenyMatched);
  EXPECT_EQ(v.decided_by.policy, "app/z-deny");
}

TEST(Evaluate, NonMatchingDenyThenAllow) {
  auto deny = oneRule(DENY, [](auto* r) { r->add_to()->add_ports(9999); });
  auto allow = P("app", "allow", ALLOW).anyRule().build();
  Verdict v = evaluate({deny, allow}, conn());
  EXPECT_TRUE(v.allowed);
  EXPECT_EQ(v.decided_by.policy, "app/allow");
}

TEST(Evaluate, AnyMatchingAllowOfSeveral) {
  auto a = oneRule(ALLOW, [](auto* r) { r->add_to()->add_ports(1); });
  P second("app", "second", ALLOW);
  second.rule()->add_to()->add_ports(2);
  second.rule()->add_to()->add_ports(8080);  // rule 1 matches
  Verdict v = evaluate({a, second.build()}, conn());
  EXPECT_TRUE(v.allowed);
  EXPECT_EQ(v.decided_by, (PolicyHit{"app/second", 1}));
  Verdict none = evaluate({a}, conn());
  EXPECT_FALSE(none.allowed);
  EXPECT_EQ(none.reason, VerdictReason::kNoAllowMatched);
  EXPECT_EQ(none.decided_by.policy, "");
}

// --- scope ---------------------------------------------------------------------------------

TEST(Scope, NamespacePolicyOnlyInItsNamespace) {
  auto other = P("elsewhere", "allow-nothing", ALLOW).build();
  EXPECT_TRUE(evaluate({other}, conn()).allowed)
      << "an ALLOW policy of another namespace does not apply to app's workloads";
  auto mine = P("app", "allow-nothing", ALLOW).build();
  EXPECT_FALSE(evaluate({mine}, conn()).allowed);
}

TEST(Scope, RootNamespaceIsMeshWide) {
  auto mesh = P(kPolicyRootNamespace, "deny-all", DENY).anyRule().build();
  Verdict v = evaluate({mesh}, conn());
  EXPECT_FALSE(v.allowed);
  EXPECT_EQ(v.decided_by.policy, "weft-system/deny-all");
  ConnectionAttributes elsewhere = conn();
  elsewhere.destination_namespace = "zzz";
  EXPECT_FALSE(evaluate({mesh}, elsewhere).allowed);
}

TEST(Scope, SelectorNarrows) {
  auto sel = P("app", "p", DENY).selector({{"app", "server"}}).anyRule().build();
  EXPECT_FALSE(evaluate({sel}, conn()).allowed);
  ConnectionAttributes other = conn();
  other.destination_labels = {{"app", "web"}};
  EXPECT_TRUE(evaluate({sel}, other).allowed);
  auto both =
      P("app", "p", DENY).selector({{"app", "server"}, {"tier", "front"}}).anyRule().build();
  EXPECT_TRUE(evaluate({both}, conn()).allowed) << "every matchLabel must match";
  // A selector in the root namespace picks workloads of every namespace.
  auto meshSel =
      P(kPolicyRootNamespace, "p", DENY).selector({{"tier", "backend"}}).anyRule().build();
  EXPECT_FALSE(evaluate({meshSel}, conn()).allowed);
  EXPECT_TRUE(evaluate({meshSel}, other).allowed);
  // A selector does not leave its namespace.
  auto foreign = P("elsewhere", "p", DENY).selector({{"app", "server"}}).anyRule().build();
  EXPECT_TRUE(evaluate({foreign}, conn()).allowed);
}

TEST(Scope, AllowAppliesOnlyWhereSelected) {
  // An ALLOW policy selecting other workloads does not put app/server under "allow-list" mode.
  auto web = P("app", "web-only", ALLOW).selector({{"app", "web"}}).anyRule().build();
  Verdict v = evaluate({web}, conn());
  EXPECT_TRUE(v.allowed);
  EXPECT_EQ(v.reason, VerdictReason::kNoAllowPolicy);
}

// --- from.source ---------------------------------------------------------------------------

TEST(Source, Principals) {
  auto exact = [](auto* r) { r->add_from()->add_principals("cluster.local/ns/front/sa/client"); };
  EXPECT_TRUE(allows(exact, conn()));
  EXPECT_FALSE(allows(exact, conn(kAdmin)));
  EXPECT_FALSE(allows(exact, plaintext())) << "an unauthenticated caller has no principal";
  auto prefix = [](auto* r) { r->add_from()->add_principals("cluster.local/ns/front/*"); };
  EXPECT_TRUE(allows(prefix, conn()));
  EXPECT_FALSE(allows(prefix, conn(kAdmin)));
  auto suffix = [](auto* r) { r->add_from()->add_principals("*/sa/admin"); };
  EXPECT_TRUE(allows(suffix, conn(kAdmin)));
  EXPECT_FALSE(allows(suffix, conn()));
  auto any = [](auto* r) { r->add_from()->add_principals("*"); };
  EXPECT_TRUE(allows(any, conn()));
  EXPECT_FALSE(allows(any, plaintext())) << "'*' = any authenticated caller";
  auto list = [](auto* r) {
    auto* s = r->add_from();
    s->add_principals("cluster.local/ns/x/sa/y");
    s->add_principals("cluster.local/ns/ops/sa/admin");
  };
  EXPECT_TRUE(allows(list, conn(kAdmin))) << "values of one field are ORed";
  EXPECT_FALSE(allows(list, conn()));
}

TEST(Source, NotPrincipals) {
  auto notAdmin = [](auto* r) { r->add_from()->add_not_principals("cluster.local/ns/ops/*"); };
  EXPECT_TRUE(allows(notAdmin, conn()));
  EXPECT_FALSE(allows(notAdmin, conn(kAdmin)));
  EXPECT_TRUE(allows(notAdmin, plaintext())) << "no principal is not one of those";
  auto onlyUnauthenticated = [](auto* r) { r->add_from()->add_not_principals("*"); };
  EXPECT_TRUE(allows(onlyUnauthenticated, plaintext()));
  EXPECT_FALSE(allows(onlyUnauthenticated, conn()));
}

TEST(Source, Namespaces) {
  auto front = [](auto* r) { r->add_from()->add_namespaces("front"); };
  EXPECT_TRUE(allows(front, conn()));
  EXPECT_FALSE(allows(front, conn(kAdmin)));
  EXPECT_FALSE(allows(front, plaintext())) << "no namespace without mTLS";
  auto prefixed = [](auto* r) { r->add_from()->add_namespaces("fr*"); };
  EXPECT_TRUE(allows(prefixed, conn()));
  auto notFront = [](auto* r) { r->add_from()->add_not_namespaces("front"); };
  EXPECT_FALSE(allows(notFront, conn()));
  EXPECT_TRUE(allows(notFront, conn(kAdmin)));
  EXPECT_TRUE(allows(notFront, plaintext()));
  auto notAny = [](auto* r) { r->add_from()->add_not_namespaces("*"); };
  EXPECT_TRUE(allows(notAny, plaintext()));
  EXPECT_FALSE(allows(notAny, conn()));
}

TEST(Source, IpBlocks) {
  auto node1 = [](auto* r) { r->add_from()->add_ip_blocks("10.244.1.0/24"); };
  EXPECT_TRUE(allows(node1, conn()));
  EXPECT_TRUE(allows(node1, plaintext()));
  EXPECT_FALSE(allows(node1, plaintext("10.244.3.5")));
  auto single = [](auto* r) { r->add_from()->add_ip_blocks("10.244.1.20"); };
  EXPECT_TRUE(allows(single, plaintext()));
  EXPECT_FALSE(allows(single, conn()));
  auto notSingle = [](auto* r) { r->add_from()->add_not_ip_blocks("10.244.1.20"); };
  EXPECT_FALSE(allows(notSingle, plaintext()));
  EXPECT_TRUE(allows(notSingle, conn()));
  auto v6 = [](auto* r) { r->add_from()->add_ip_blocks("fd00:10:244:1::/64"); };
  EXPECT_TRUE(allows(v6, plaintext("fd00:10:244:1::20")));
  EXPECT_FALSE(allows(v6, plaintext()));
}

TEST(Source, RemoteIpBlocksUseTheOriginalClient) {
  ConnectionAttributes c = conn();
  c.remote_ip = ip("192.168.7.7");  // forwarded: for= differs from the peer
  auto remote = [](auto* r) { r->add_from()->add_remote_ip_blocks("192.168.0.0/16"); };
  EXPECT_TRUE(allows(remote, c));
  EXPECT_FALSE(allows(remote, conn()));
  auto peer = [](auto* r) { r->add_from()->add_ip_blocks("192.168.0.0/16"); };
  EXPECT_FALSE(allows(peer, c)) << "ipBlocks is the peer, not the forwarded client";
  auto notRemote = [](auto* r) { r->add_from()->add_not_remote_ip_blocks("192.168.0.0/16"); };
  EXPECT_FALSE(allows(notRemote, c));
  EXPECT_TRUE(allows(notRemote, conn()));
}

TEST(Source, FieldsAreAndedSourcesAreOred) {
  auto anded = [](auto* r) {
    auto* s = r->add_from();
    s->add_namespaces("front");
    s->add_ip_blocks("10.244.9.0/24");
  };
  EXPECT_FALSE(allows(anded, conn())) << "namespace matches but the IP does not";
  auto ored = [](auto* r) {
    r->add_from()->add_namespaces("nope");
    r->add_from()->add_ip_blocks("10.244.1.0/24");
  };
  EXPECT_TRUE(allows(ored, conn()));
  auto both = [](auto* r) {
    auto* s = r->add_from();
    s->add_principals("*");
    s->add_not_principals("cluster.local/ns/front/*");
  };
  EXPECT_TRUE(allows(both, conn(kAdmin)));
  EXPECT_FALSE(allows(both, conn())) << "positive and negative forms are ANDed";
}

// --- to.operation --------------------------------------------------------------------------

TEST(Operation, PortsAndNotPorts) {
  auto ports = [](auto* r) {
    r->add_to()->add_ports(8080);
    r->mutable_to(0)->add_ports(8081);
  };
  EXPECT_TRUE(allows(ports, conn(kClient, 8081)));
  EXPECT_FALSE(allows(ports, conn(kClient, 9090)));
  auto notPorts = [](auto* r) { r->add_to()->add_not_ports(9090); };
  EXPECT_TRUE(allows(notPorts, conn()));
  EXPECT_FALSE(allows(notPorts, conn(kClient, 9090)));
  auto ored = [](auto* r) {
    r->add_to()->add_ports(1);
    r->add_to()->add_ports(9090);
  };
  EXPECT_TRUE(allows(ored, conn(kClient, 9090)));
}

// --- when ----------------------------------------------------------------------------------

auto whenRule(const char* key, std::initializer_list<const char*> values,
              std::initializer_list<const char*> notValues = {}) {
  std::vector<std::string> v(values.begin(), values.end()), nv(notValues.begin(), notValues.end());
  return [key, v, nv](pb::AuthorizationPolicyRule* r) {
    auto* w = r->add_when();
    w->set_key(key);
    for (auto& s : v) w->add_values(s);
    for (auto& s : nv) w->add_not_values(s);
  };
}

TEST(When, EachL4Key) {
  EXPECT_TRUE(allows(whenRule("source.ip", {"10.244.1.0/24"}), conn()));
  EXPECT_FALSE(allows(whenRule("source.ip", {"10.244.2.0/24"}), conn()));
  EXPECT_FALSE(allows(whenRule("source.ip", {}, {"10.244.1.10"}), conn()));
  ConnectionAttributes fwd = conn();
  fwd.remote_ip = ip("192.168.1.1");
  EXPECT_TRUE(allows(whenRule("remote.ip", {"192.168.1.1"}), fwd));
  EXPECT_FALSE(allows(whenRule("remote.ip", {"192.168.1.1"}), conn()));
  EXPECT_TRUE(allows(whenRule("source.namespace", {"front"}), conn()));
  EXPECT_FALSE(allows(whenRule("source.namespace", {"front"}), plaintext()));
  EXPECT_TRUE(allows(whenRule("source.namespace", {}, {"front"}), plaintext()));
  EXPECT_TRUE(allows(whenRule("source.principal", {"*/sa/client"}), conn()));
  EXPECT_FALSE(allows(whenRule("source.principal", {"*/sa/client"}), conn(kAdmin)));
  EXPECT_FALSE(allows(whenRule("source.principal", {}, {"*"}), conn()));
  EXPECT_TRUE(allows(whenRule("source.principal", {}, {"*"}), plaintext()));
  EXPECT_TRUE(allows(whenRule("destination.ip", {"10.244.2.10"}), conn()));
  EXPECT_FALSE(allows(whenRule("destination.ip", {}, {"10.244.2.0/24"}), conn()));
  EXPECT_TRUE(allows(whenRule("destination.port", {"8080", "8081"}), conn()));
  EXPECT_FALSE(allows(whenRule("destination.port", {"8080"}), conn(kClient, 9090)));
  EXPECT_TRUE(allows(whenRule("destination.port", {}, {"8080"}), conn(kClient, 9090)));
  EXPECT_FALSE(allows(whenRule("destination.port", {"8080"}, {"8080"}), conn()))
      << "values and notValues are ANDed";
}

TEST(When, ConditionsAreAndedWithFromAndTo) {
  P p("app", "p", ALLOW);
  auto* r = p.rule();
  r->add_from()->add_namespaces("front");
  r->add_to()->add_ports(8080);
  whenRule("source.ip", {"10.244.1.0/24"})(r);
  whenRule("destination.port", {}, {"8081"})(r);
  auto policy = p.build();
  EXPECT_TRUE(evaluate({policy}, conn()).allowed);
  EXPECT_FALSE(evaluate({policy}, conn(kAdmin)).allowed) << "from fails";
  EXPECT_FALSE(evaluate({policy}, conn(kClient, 8081)).allowed) << "to fails";
  ConnectionAttributes far = conn();
  far.source_ip = ip("10.244.3.3");
  EXPECT_FALSE(evaluate({policy}, far).allowed) << "when fails";
}

TEST(When, BadValuesAreRefusedInConversion) {
  P p("app", "p", ALLOW);
  whenRule("destination.port", {"http"})(p.rule());
  EXPECT_FALSE(authorizationPolicyFromProto(p.msg).isOk());
  P q("app", "q", ALLOW);
  whenRule("source.ip", {"10.0.0.0/40"})(q.rule());
  auto r = authorizationPolicyFromProto(q.msg);
  ASSERT_FALSE(r.isOk());
  EXPECT_NE(r.status().message().find("rules[0].when[0]"), std::string::npos)
      << r.status().message();
  P u("app", "u", ALLOW);
  whenRule("source.color", {"red"})(u.rule());
  EXPECT_FALSE(authorizationPolicyFromProto(u.msg).isOk());
}

// --- AUDIT, dry-run, L7 --------------------------------------------------------------------

TEST(Audit, MarksWithoutDeciding) {
  auto audit = P("app", "audit-all", AUDIT).anyRule().build();
  auto audit2 = oneRule(AUDIT, [](auto* r) { r->add_to()->add_ports(8080); }, "weft-system");
  auto auditNo = P("app", "audit-9090", AUDIT).build();
  Verdict v = evaluate({audit, audit2, auditNo}, conn());
  EXPECT_TRUE(v.allowed);
  EXPECT_EQ(v.reason, VerdictReason::kNoAllowPolicy) << "AUDIT is not an ALLOW policy";
  ASSERT_EQ(v.audit.size(), 2u);
  EXPECT_EQ(v.audit[0], (PolicyHit{"app/audit-all", 0}));
  EXPECT_EQ(v.audit[1], (PolicyHit{"weft-system/p", 0}));
  auto deny = P("app", "deny", DENY).anyRule().build();
  Verdict d = evaluate({audit, deny}, conn());
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.audit.size(), 1u) << "audited whatever the verdict";
}

TEST(DryRun, DenyIsReportedNotEnforced) {
  auto dry = P("app", "dry-deny", DENY).dryRun().anyRule().build();
  Verdict v = evaluate({dry}, conn());
  EXPECT_TRUE(v.allowed);
  EXPECT_EQ(v.reason, VerdictReason::kNoAllowPolicy);
  ASSERT_TRUE(v.dry_run.has_value());
  EXPECT_FALSE(v.dry_run->allowed);
  EXPECT_EQ(v.dry_run->decided_by, (PolicyHit{"app/dry-deny", 0}));
}

TEST(DryRun, AllowDoesNotSwitchToAllowListMode) {
  auto dry = oneRule(ALLOW, [](auto* r) { r->add_from()->add_namespaces("front"); });
  P p("app", "dry-allow", ALLOW);
  p.rule()->add_from()->add_namespaces("front");
  p.dryRun();
  auto dryAllow = p.build();
  Verdict admin = evaluate({dryAllow}, conn(kAdmin));
  EXPECT_TRUE(admin.allowed) << "a dry-run ALLOW does not count as an ALLOW policy";
  ASSERT_TRUE(admin.dry_run.has_value());
  EXPECT_FALSE(admin.dry_run->allowed);
  EXPECT_EQ(admin.dry_run->reason, VerdictReason::kNoAllowMatched);
  Verdict client = evaluate({dryAllow}, conn());
  ASSERT_TRUE(client.dry_run.has_value());
  EXPECT_TRUE(client.dry_run->allowed);
  EXPECT_EQ(client.dry_run->decided_by.policy, "app/dry-allow");
  // With an enforced ALLOW too, the dry-run pass sees both.
  Verdict both = evaluate({dry, dryAllow}, conn(kAdmin));
  EXPECT_FALSE(both.allowed);
  EXPECT_FALSE(both.dry_run->allowed);
}

TEST(DryRun, AbsentWhenNoDryRunPolicyApplies) {
  auto dryElsewhere = P("other", "dry", DENY).dryRun().anyRule().build();
  EXPECT_FALSE(evaluate({dryElsewhere}, conn()).dry_run.has_value());
}

TEST(L7, AllowRuleWithL7MatchesNothing) {
  P p("app", "get-only", ALLOW);
  auto* r = p.rule();
  r->add_from()->add_namespaces("front");
  r->add_l7_fields("spec.rules[0].to[0].operation.methods");
  auto policy = p.build();
  Verdict v = evaluate({policy}, conn());
  EXPECT_FALSE(v.allowed) << "would have been allowed on its L4 part alone";
  EXPECT_EQ(v.reason, VerdictReason::kNoAllowMatched);
  p.rule()->add_to()->add_ports(8080);  // a second, L4-only rule still works
  Verdict w = evaluate({p.build()}, conn());
  EXPECT_TRUE(w.allowed);
  EXPECT_EQ(w.decided_by.rule, 1);
}

TEST(L7, DenyRuleIsEnforcedOnItsL4Part) {
  P p("app", "no-post", DENY);
  auto* r = p.rule();
  r->add_from()->add_namespaces("front");
  auto* w = r->add_when();
  w->set_key("request.headers[x-user]");
  w->set_l7(true);
  w->add_values("bob");
  r->add_l7_fields("spec.rules[0].when[0]");
  auto policy = p.build();
  EXPECT_FALSE(evaluate({policy}, conn()).allowed) << "the L7 condition counts as met";
  EXPECT_TRUE(evaluate({policy}, conn(kAdmin)).allowed) << "its L4 part still applies";
  P only("app", "only-l7", DENY);
  only.rule()->add_l7_fields("spec.rules[0].to[0].operation.paths");
  EXPECT_FALSE(evaluate({only.build()}, plaintext()).allowed)
      << "a DENY rule whose conditions are all L7 denies everything";
}

// --- conversion and state ------------------------------------------------------------------

TEST(Conversion, ErrorsNameTheField) {
  P p("app", "bad", ALLOW);
  p.rule()->add_from()->add_ip_blocks("10.0.0.0/99");
  auto r = authorizationPolicyFromProto(p.msg);
  ASSERT_FALSE(r.isOk());
  EXPECT_NE(r.status().message().find("app/bad: rules[0].from[0].source.ipBlocks"),
            std::string::npos)
      << r.status().message();
  P q("app", "port", ALLOW);
  q.rule()->add_to()->add_ports(70000);
  EXPECT_FALSE(authorizationPolicyFromProto(q.msg).isOk());
  pb::AuthorizationPolicy unnamed;
  EXPECT_FALSE(authorizationPolicyFromProto(unnamed).isOk());
}

TEST(ClusterStatePolicies, UpsertRemoveAndFull) {
  pb::ClusterUpdate u;
  u.set_full(true);
  *u.add_upsert_authorization_policies() = P("app", "b", DENY).msg;
  *u.add_upsert_authorization_policies() = P("app", "a", ALLOW).msg;
  auto s1 = ClusterState::apply(nullptr, u);
  ASSERT_TRUE(s1.isOk());
  ASSERT_EQ((*s1)->authorizationPolicies().size(), 2u);
  EXPECT_EQ((*s1)->authorizationPolicies()[0]->key(), "app/a") << "key order";
  pb::ClusterUpdate d;
  d.add_remove_authorization_policies("app/a");
  P changed("app", "b", AUDIT);
  *d.add_upsert_authorization_policies() = changed.msg;
  auto s2 = ClusterState::apply(s1->get(), d);
  ASSERT_TRUE(s2.isOk());
  ASSERT_EQ((*s2)->authorizationPolicies().size(), 1u);
  EXPECT_EQ((*s2)->authorizationPolicies()[0]->action, PolicyAction::kAudit);
  EXPECT_EQ((*s1)->authorizationPolicies().size(), 2u) << "snapshots never change";
  pb::ClusterUpdate bad;
  P broken("app", "c", ALLOW);
  broken.rule()->add_from()->add_ip_blocks("nope");
  *bad.add_upsert_authorization_policies() = broken.msg;
  EXPECT_FALSE(ClusterState::apply(s2->get(), bad).isOk()) << "rejected whole";
  pb::ClusterUpdate full;
  full.set_full(true);
  auto s3 = ClusterState::apply(s2->get(), full);
  ASSERT_TRUE(s3.isOk());
  EXPECT_TRUE((*s3)->authorizationPolicies().empty()) << "a full update replaces policies";
}

TEST(ClusterStatePolicies, WorkloadLabelsKept) {
  pb::ClusterUpdate u;
  auto* w = u.add_upsert_workloads();
  w->set_uid("u1");
  w->set_name("server");
  w->set_namespace_("app");
  (*w->mutable_labels())["app"] = "server";
  auto s = ClusterState::apply(nullptr, u);
  ASSERT_TRUE(s.isOk());
  EXPECT_EQ((*s)->workloadByUid("u1")->labels.at("app"), "server");
}

// --- verdict log and forwarded --------------------------------------------------------------

TEST(VerdictLogTest, BoundedRingAndCounters) {
  VerdictLog log(3);
  auto deny = P("app", "deny", DENY).anyRule().build();
  auto dry = P("app", "dry", DENY).dryRun().anyRule().build();
  auto audit = P("app", "audit", AUDIT).anyRule().build();
  for (int i = 0; i < 5; i++) {
    VerdictEvent e;
    e.path = "hbone";
    e.source = SocketAddress(ip("10.244.1.10"), static_cast<uint16_t>(40000 + i));
    e.destination = SocketAddress(ip("10.244.2.10"), 8080);
    e.destination_workload = "app/server";
    e.verdict = i == 4 ? evaluate({deny}, conn()) : evaluate({dry, audit}, conn());
    log.record(std::move(e));
  }
  EXPECT_EQ(log.size(), 3u);
  EXPECT_EQ(log.lastSeq(), 5u);
  auto j = log.toJson();
  ASSERT_EQ(j["verdicts"].size(), 3u);
  EXPECT_EQ(j["verdicts"][0]["seq"], 3);
  EXPECT_EQ(j["verdicts"][2]["result"], "deny");
  EXPECT_EQ(j["verdicts"][2]["policy"], "app/deny");
  EXPECT_EQ(j["verdicts"][2]["rule"], 0);
  EXPECT_TRUE(j["verdicts"][2]["dry_run"].is_null());
  EXPECT_EQ(j["verdicts"][1]["result"], "allow");
  EXPECT_EQ(j["verdicts"][1]["dry_run"]["result"], "deny");
  EXPECT_EQ(j["verdicts"][1]["dry_run"]["policy"], "app/dry");
  EXPECT_EQ(j["verdicts"][1]["audit"][0]["policy"], "app/audit");
  EXPECT_EQ(j["verdicts"][1]["source"]["principal"], nullptr);
  EXPECT_EQ(j["verdicts"][1]["destination"]["port"], 8080);
  auto since = log.toJson(4);
  ASSERT_EQ(since["verdicts"].size(), 1u);
  EXPECT_EQ(since["verdicts"][0]["seq"], 5);
  EXPECT_EQ(log.toJson(0, 1)["verdicts"][0]["seq"], 5) << "limit keeps the newest";
  std::string prom = log.renderPrometheus();
  EXPECT_NE(prom.find("weft_ztunnel_policy_verdicts_total"
                      "{result=\"allow\",action_policy=\"none\"} 4"),
            std::string::npos)
      << prom;
  EXPECT_NE(prom.find("weft_ztunnel_policy_verdicts_total"
                      "{result=\"deny\",action_policy=\"DENY\"} 1"),
            std::string::npos);
  EXPECT_NE(prom.find("weft_ztunnel_policy_dry_run_verdicts_total{result=\"deny\"} 4"),
            std::string::npos);
  EXPECT_NE(prom.find("weft_ztunnel_policy_audit_total 4"), std::string::npos);
}

TEST(Forwarded, ParsesForParameter) {
  EXPECT_EQ(forwardedFor({{"forwarded", "for=\"10.244.1.10:4567\""}})->toString(), "10.244.1.10");
  EXPECT_EQ(forwardedFor({{"Forwarded", "for=\"[fd00::10]:4567\";proto=http"}})->toString(),
            "fd00::10");
  EXPECT_EQ(forwardedFor({{"forwarded", "for=10.1.2.3"}})->toString(), "10.1.2.3");
  EXPECT_FALSE(forwardedFor({{"forwarded", "for=\"unknown\""}}).has_value());
  EXPECT_FALSE(forwardedFor({{"baggage", "x"}}).has_value());
  EXPECT_FALSE(forwardedFor({{"forwarded", "for=\"[fd00::10"}}).has_value());
}

}  // namespace
}  // namespace weft::ztunnel
