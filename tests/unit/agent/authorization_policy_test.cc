// AuthorizationPolicy manifests: every field into the node-protocol message, refusals that name
// the field, L7 warnings, dry-run, duplicates across files, last good state and deltas.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "agent/admin.h"
#include "agent/authorization_policy.h"
#include "agent/cluster_sync.h"
#include "agent/manifests.h"
#include "test_util.h"

namespace weft::agent {
namespace {

using ::testing::HasSubstr;
using testing::TempDir;
namespace pb = weft::node::v1;

constexpr const char* kFull = R"(apiVersion: security.weft.dev/v1
kind: AuthorizationPolicy
metadata:
  name: full
  namespace: app
  annotations:
    security.weft.dev/dry-run: "true"
spec:
  selector:
    matchLabels:
      app: server
  action: DENY
  rules:
  - from:
    - source:
        principals: ["spiffe://cluster.local/ns/front/sa/client", "cluster.local/ns/x/*"]
        notPrincipals: ["*/sa/admin"]
        namespaces: ["front"]
        notNamespaces: ["ops"]
        ipBlocks: ["10.244.1.0/24"]
        notIpBlocks: ["10.244.1.99"]
        remoteIpBlocks: ["fd00::/8"]
        notRemoteIpBlocks: ["fd00::1"]
    - source:
        requestPrincipals: ["issuer/subject"]
    to:
    - operation:
        ports: ["8080", 8081]
        notPorts: [9090]
    - operation:
        methods: ["GET"]
    when:
    - key: destination.port
      values: ["8080"]
    - key: source.ip
      notValues: ["10.0.0.0/8"]
    - key: request.headers[x-user]
      values: ["bob"]
  - {}
)";

TEST(AuthorizationPolicyParse, EveryField) {
  auto r = parseManifest("ap.yaml", kFull);
  ASSERT_TRUE(r) << r.status().message();
  ASSERT_EQ(r->authorization_policies.size(), 1u);
  const AuthorizationPolicy& ap = r->authorization_policies[0];
  const pb::AuthorizationPolicy& s = ap.spec;
  EXPECT_EQ(s.name(), "full");
  EXPECT_EQ(s.namespace_(), "app");
  EXPECT_EQ(s.action(), pb::AuthorizationPolicy::DENY);
  EXPECT_TRUE(s.dry_run());
  EXPECT_TRUE(s.has_selector());
  EXPECT_EQ(s.match_labels().at("app"), "server");
  ASSERT_EQ(s.rules_size(), 2);
  const auto& rule = s.rules(0);
  ASSERT_EQ(rule.from_size(), 2);
  const auto& src = rule.from(0);
  EXPECT_EQ(src.principals(0), "cluster.local/ns/front/sa/client") << "spiffe:// dropped";
  EXPECT_EQ(src.principals(1), "cluster.local/ns/x/*");
  EXPECT_EQ(src.not_principals(0), "*/sa/admin");
  EXPECT_EQ(src.namespaces(0), "front");
  EXPECT_EQ(src.not_namespaces(0), "ops");
  EXPECT_EQ(src.ip_blocks(0), "10.244.1.0/24");
  EXPECT_EQ(src.not_ip_blocks(0), "10.244.1.99");
  EXPECT_EQ(src.remote_ip_blocks(0), "fd00::/8");
  EXPECT_EQ(src.not_remote_ip_blocks(0), "fd00::1");
  ASSERT_EQ(rule.to_size(), 2);
  EXPECT_EQ(rule.to(0).ports_size(), 2);
  EXPECT_EQ(rule.to(0).ports(1), 8081u);
  EXPECT_EQ(rule.to(0).not_ports(0), 9090u);
  ASSERT_EQ(rule.when_size(), 3);
  EXPECT_EQ(rule.when(1).key(), "source.ip");
  EXPECT_EQ(rule.when(1).not_values(0), "10.0.0.0/8");
  EXPECT_TRUE(rule.when(2).l7());
  EXPECT_FALSE(rule.when(0).l7());
  ASSERT_EQ(rule.l7_fields_size(), 3);
  EXPECT_EQ(rule.l7_fields(0), "spec.rules[0].from[1].source.requestPrincipals");
  EXPECT_EQ(rule.l7_fields(1), "spec.rules[0].to[1].operation.methods");
  EXPECT_THAT(rule.l7_fields(2), HasSubstr("spec.rules[0].when[2]"));
  EXPECT_EQ(s.rules(1).from_size() + s.rules(1).to_size() + s.rules(1).when_size(), 0)
      << "an empty rule matches everything";
  ASSERT_EQ(ap.warnings.size(), 3u);
  EXPECT_THAT(ap.warnings[1], HasSubstr("operation.methods: L7 (HTTP) attribute"));
  EXPECT_THAT(ap.warnings[1], HasSubstr("DENY rule is enforced without its L7 conditions"));
}

TEST(AuthorizationPolicyParse, DefaultsAndScopes) {
  auto r = parseManifest("ap.yaml",
                         "kind: AuthorizationPolicy\n"
                         "metadata: {name: allow-nothing, namespace: a}\n"
                         "spec: {}\n---\n"
                         "kind: AuthorizationPolicy\nmetadata: {name: nospec, namespace: a}\n---\n"
                         "kind: AuthorizationPolicy\n"
                         "metadata: {name: mesh, namespace: weft-system}\n"
                         "spec: {action: AUDIT, selector: {}, rules: [{}]}\n---\n"
                         "kind: AuthorizationPolicy\nmetadata: {name: get, namespace: a}\n"
                         "spec: {rules: [{to: [{operation: {paths: [\"/x\"]}}]}]}\n");
  ASSERT_TRUE(r) << r.status().message();
  ASSERT_EQ(r->authorization_policies.size(), 4u);
  EXPECT_EQ(r->authorization_policies[0].spec.action(), pb::AuthorizationPolicy::ALLOW);
  EXPECT_EQ(r->authorization_policies[0].spec.rules_size(), 0);
  EXPECT_EQ(r->authorization_policies[1].spec.rules_size(), 0);
  EXPECT_FALSE(r->authorization_policies[1].spec.dry_run());
  EXPECT_EQ(r->authorization_policies[2].spec.action(), pb::AuthorizationPolicy::AUDIT);
  EXPECT_FALSE(r->authorization_policies[2].spec.has_selector()) << "empty selector = all";
  ASSERT_EQ(r->authorization_policies[3].warnings.size(), 1u);
  EXPECT_THAT(r->authorization_policies[3].warnings[0],
              HasSubstr("this ALLOW rule matches nothing"));
}

struct PolicyBadCase {
  const char* name;
  std::string spec;      // the YAML under "spec:" (indented by 2), or a full "metadata" override
  std::string expected;  // the message after "bad.yaml: AuthorizationPolicy app/p: "
};

class AuthorizationPolicyValidation : public ::testing::TestWithParam<PolicyBadCase> {};

TEST_P(AuthorizationPolicyValidation, RefusedNamingTheField) {
  const PolicyBadCase& c = GetParam();
  std::string text = "apiVersion: security.weft.dev/v1\nkind: AuthorizationPolicy\nmetadata:\n"
                     "  name: p\n  namespace: app\n";
  if (c.spec.rfind("  annotations:", 0) == 0) text += c.spec;
  else text += "spec:\n" + c.spec;
  auto r = parseManifest("bad.yaml", text);
  ASSERT_FALSE(r) << text;
  EXPECT_EQ(r.status().message(), "bad.yaml: AuthorizationPolicy app/p: " + c.expected);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, AuthorizationPolicyValidation,
    ::testing::Values(
        PolicyBadCase{"Custom", "  action: CUSTOM\n",
                "spec.action: CUSTOM is not supported (no external authorizer)"},
        PolicyBadCase{"LowercaseAction", "  action: deny\n",
                "spec.action: \"deny\" is not ALLOW, DENY or AUDIT"},
        PolicyBadCase{"TargetRefs", "  targetRefs: [{kind: Service, name: x}]\n",
                "spec.targetRefs: not supported: attaching a policy to a Service or Gateway "
                "needs a waypoint, which Weft does not have yet; use spec.selector"},
        PolicyBadCase{"UnknownSpec", "  rulez: []\n",
                "spec.rulez: unknown field (known: selector, action, rules)"},
        PolicyBadCase{"MatchExpressions", "  selector: {matchExpressions: []}\n",
                "spec.selector.matchExpressions: unknown field (known: matchLabels)"},
        PolicyBadCase{"BadCidr", "  rules: [{from: [{source: {ipBlocks: [\"10.0.0.0/33\"]}}]}]\n",
                "spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.0/33\" is not an IP "
                "address or CIDR block"},
        PolicyBadCase{"BadRemoteCidr",
                "  rules: [{from: [{source: {notRemoteIpBlocks: [\"nope\"]}}]}]\n",
                "spec.rules[0].from[0].source.notRemoteIpBlocks[0]: \"nope\" is not an IP "
                "address or CIDR block"},
        PolicyBadCase{"EmptySource", "  rules: [{from: [{source: {}}]}]\n",
                "spec.rules[0].from[0].source: must be a non-empty mapping (principals, "
                "namespaces, ...)"},
        PolicyBadCase{"EmptyFrom", "  rules: [{from: []}]\n",
                "spec.rules[0].from: must be a non-empty list (omit it to match any)"},
        PolicyBadCase{"UnknownSourceField", "  rules: [{from: [{source: {serviceAccounts: [a]}}]}]\n",
                "spec.rules[0].from[0].source.serviceAccounts: unknown field (known: principals, "
                "notPrincipals, namespaces, notNamespaces, ipBlocks, notIpBlocks, remoteIpBlocks, "
                "notRemoteIpBlocks, requestPrincipals, notRequestPrincipals)"},
        PolicyBadCase{"MiddleStar", "  rules: [{from: [{source: {principals: [\"a*b\"]}}]}]\n",
                "spec.rules[0].from[0].source.principals[0]: \"a*b\": '*' may only be the whole "
                "value, its first or its last character"},
        PolicyBadCase{"PortZero", "  rules: [{to: [{operation: {ports: [0]}}]}]\n",
                "spec.rules[0].to[0].operation.ports[0]: must be a port number 1-65535 (ranges "
                "are not supported)"},
        PolicyBadCase{"PortName", "  rules: [{to: [{operation: {notPorts: [http]}}]}]\n",
                "spec.rules[0].to[0].operation.notPorts[0]: must be a port number 1-65535 "
                "(ranges are not supported)"},
        PolicyBadCase{"NoOperation", "  rules: [{to: [{}]}]\n",
                "spec.rules[0].to[0].operation: required"},
        PolicyBadCase{"WhenNoValues", "  rules: [{when: [{key: source.ip}]}]\n",
                "spec.rules[0].when[0]: values or notValues must be set"},
        PolicyBadCase{"WhenUnknownKey", "  rules: [{when: [{key: source.colour, values: [x]}]}]\n",
                "spec.rules[0].when[0].key: unknown key \"source.colour\" (L4 keys: source.ip, "
                "remote.ip, source.namespace, source.principal, destination.ip, "
                "destination.port)"},
        PolicyBadCase{"WhenBadPort", "  rules: [{when: [{key: destination.port, notValues: [\"x\"]}]}]\n",
                "spec.rules[0].when[0].notValues[0]: \"x\" is not a port number 1-65535"},
        PolicyBadCase{"WhenBadIp", "  rules: [{when: [{key: destination.ip, values: [\"1.2.3\"]}]}]\n",
                "spec.rules[0].when[0].values[0]: \"1.2.3\" is not an IP address or CIDR block"},
        PolicyBadCase{"UnknownRuleField", "  rules: [{form: []}]\n",
                "spec.rules[0].form: unknown field (known: from, to, when)"},
        PolicyBadCase{"DryRunValue", "  annotations: {security.weft.dev/dry-run: \"yes\"}\n",
                "metadata.annotations.security.weft.dev/dry-run: must be \"true\" or \"false\""}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(AuthorizationPolicyParse, WrongApiVersion) {
  auto r = parseManifest("bad.yaml",
                         "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
                         "metadata: {name: p, namespace: app}\n");
  ASSERT_FALSE(r);
  EXPECT_EQ(r.status().message(),
            "bad.yaml: AuthorizationPolicy app/p: apiVersion: must be security.weft.dev/v1");
}

std::string policyYaml(const std::string& name, const std::string& action) {
  return "kind: AuthorizationPolicy\nmetadata: {name: " + name +
         ", namespace: app}\nspec: {action: " + action + ", rules: [{}]}\n";
}

TEST(AuthorizationPolicySource, DuplicatesLastGoodAndDeltas) {
  TempDir dir;
  dir.write("a.yaml", policyYaml("p", "DENY"));
  ManifestSource src(dir.path());
  ASSERT_TRUE(src.rescan());
  ASSERT_EQ(src.model().authorization_policies.size(), 1u);
  ClusterModel before = src.model();
  // The same policy in a second file: that file is rejected, the first stays.
  dir.write("b.yaml", policyYaml("p", "ALLOW"));
  src.rescan();
  ASSERT_EQ(src.errors().size(), 1u);
  EXPECT_THAT(src.errors()[0], HasSubstr("b.yaml: AuthorizationPolicy app/p: also defined in"));
  EXPECT_EQ(src.model().authorization_policies.at("app/p").spec.action(),
            pb::AuthorizationPolicy::DENY);
  // A bad edit keeps the last good policy.
  dir.write("a.yaml", policyYaml("p", "MAYBE") + "# changed\n");
  src.rescan();
  EXPECT_EQ(src.model().authorization_policies.at("app/p").spec.action(),
            pb::AuthorizationPolicy::DENY);
  // Fixing it (AUDIT) and removing the duplicate: one upsert in the delta.
  ::unlink(dir.file("b.yaml").c_str());
  dir.write("a.yaml", policyYaml("p", "AUDIT"));
  ASSERT_TRUE(src.rescan());
  EXPECT_TRUE(src.errors().empty());
  pb::ClusterUpdate d = clusterDelta(before, src.model());
  ASSERT_EQ(d.upsert_authorization_policies_size(), 1);
  EXPECT_EQ(d.upsert_authorization_policies(0).action(), pb::AuthorizationPolicy::AUDIT);
  EXPECT_FALSE(isEmptyUpdate(d));
  EXPECT_TRUE(isEmptyUpdate(clusterDelta(src.model(), src.model())));
  pb::ClusterUpdate full = fullClusterUpdate(src.model());
  EXPECT_EQ(full.upsert_authorization_policies_size(), 1);
  // Removing the file removes the policy.
  ClusterModel withPolicy = src.model();
  ::unlink(dir.file("a.yaml").c_str());
  ASSERT_TRUE(src.rescan());
  pb::ClusterUpdate gone = clusterDelta(withPolicy, src.model());
  ASSERT_EQ(gone.remove_authorization_policies_size(), 1);
  EXPECT_EQ(gone.remove_authorization_policies(0), "app/p");
}

}  // namespace
}  // namespace weft::agent
