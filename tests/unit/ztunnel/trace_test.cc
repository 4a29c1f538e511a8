// traceConnection() (GET /trace): enrollment and redirect, route (service endpoint and
// candidates, direct, passthrough, refused), expected identity, and the destination's verdict
// from the same evaluate() with the attributes the inbound paths build (HBONE principal,
// plaintext without one, STRICT peer authentication); the live balancer never moves.
#include "ztunnel/trace.h"

#include <gtest/gtest.h>

#include "ztunnel/route.h"

namespace weft::ztunnel {
namespace {

namespace pb = weft::node::v1;
using nlohmann::json;

pb::Workload pod(const char* uid, const char* ns, const char* name, const char* node,
                 std::vector<const char*> ips, bool enrolled,
                 std::map<std::string, std::string> labels = {}, bool strict = false) {
  pb::Workload w;
  w.set_uid(uid);
  w.set_namespace_(ns);
  w.set_name(name);
  w.set_node(node);
  w.set_service_account("default");
  for (const char* ip : ips) w.add_ips(ip);
  w.set_enrolled(enrolled);
  for (auto& [k, v] : labels) (*w.mutable_labels())[k] = v;
  w.set_strict_mtls(strict);
  return w;
}

class TraceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pb::ClusterUpdate u;
    u.set_full(true);
    *u.add_upsert_workloads() = pod("u1", "front", "client", "node1", {"10.244.1.10"}, true);
    *u.add_upsert_workloads() = pod("u2", "plain", "client", "node1", {"10.244.1.20"}, false);
    *u.add_upsert_workloads() =
        pod("u3", "app", "server", "node2", {"10.244.2.10"}, true, {{"app", "server"}});
    *u.add_upsert_workloads() =
        pod("u4", "app", "web", "node2", {"10.244.2.11"}, true, {{"app", "web"}});
    *u.add_upsert_workloads() = pod("u5", "legacy", "db", "node2", {"10.244.2.20"}, false);
    *u.add_upsert_workloads() =
        pod("u6", "secure", "vault", "node2", {"10.244.2.30"}, true, {}, true);
    pb::Service* s = u.add_upsert_services();
    s->set_name("web");
    s->set_namespace_("app");
    s->add_vips("10.96.0.20");
    auto* p = s->add_ports();
    p->set_port(80);
    p->set_target_port(8080);
    for (const char* ip : {"10.244.2.10", "10.244.2.11"}) s->add_endpoints()->set_ip(ip);
    // app/server: only front may call it (ALLOW on a principal); DENY port 9999 for all.
    pb::AuthorizationPolicy* a = u.add_upsert_authorization_policies();
    a->set_namespace_("app");
    a->set_name("server-allow");
    a->set_action(pb::AuthorizationPolicy::ALLOW);
    a->set_has_selector(true);
    (*a->mutable_match_labels())["app"] = "server";
    a->add_rules()->add_from()->add_principals("cluster.local/ns/front/sa/default");
    pb::AuthorizationPolicy* d = u.add_upsert_authorization_policies();
    d->set_namespace_("app");
    d->set_name("deny-9999");
    d->set_action(pb::AuthorizationPolicy::DENY);
    d->add_rules();  // unused rule 0: a namespace that matches nothing
    d->mutable_rules(0)->add_from()->add_namespaces("nobody");
    d->add_rules()->add_to()->add_ports(9999);
    auto st = ClusterState::apply(nullptr, u);
    ASSERT_TRUE(st) << st.status().message();
    state_ = st.value();
  }

  json trace(const std::string& src, const std::string& dst) {
    TraceContext ctx;
    ctx.state = state_.get();
    ctx.balancer = &balancer_;
    auto r = traceConnection(ctx, TraceQuery{src, dst});
    EXPECT_TRUE(r) << r.status().message();
    return r ? r.value() : json();
  }

  ClusterStatePtr state_;
  Balancer balancer_{BalancerOptions{.seed = 1}};
};

TEST_F(TraceTest, MeshedSourceOverHboneAllowedByPrincipal) {
  json t = trace("front/client", "10.244.2.10:8080");
  EXPECT_EQ(t["source"]["enrolled"], true);
  EXPECT_EQ(t["redirected"], true);
  EXPECT_EQ(t["route"]["kind"], "direct-to-workload");
  EXPECT_EQ(t["route"]["protocol"], "hbone");
  EXPECT_TRUE(t["route"]["waypoint"].is_null());
  EXPECT_EQ(t["expected_identity"], "spiffe://cluster.local/ns/app/sa/default");
  EXPECT_EQ(t["inbound"]["path"], "hbone");
  EXPECT_EQ(t["inbound"]["principal"], "spiffe://cluster.local/ns/front/sa/default");
  EXPECT_EQ(t["verdict"]["result"], "allow");
  EXPECT_EQ(t["verdict"]["policy"], "app/server-allow");
  EXPECT_EQ(t["verdict"]["rule"], 0);
  EXPECT_EQ(t["outcome"], "allowed");
}

TEST_F(TraceTest, PlaintextSourceHasNoPrincipalAndIsDenied) {
  json t = trace("plain/client", "app/server:8080");
  EXPECT_EQ(t["source"]["enrolled"], false);
  EXPECT_EQ(t["redirected"], false);
  EXPECT_EQ(t["route"]["kind"], "not-redirected");
  EXPECT_EQ(t["inbound"]["path"], "plaintext");
  EXPECT_TRUE(t["inbound"]["principal"].is_null());
  EXPECT_EQ(t["verdict"]["result"], "deny");
  EXPECT_EQ(t["verdict"]["reason"], "no_allow_matched");
  EXPECT_TRUE(t["verdict"]["policy"].is_null());
  EXPECT_EQ(t["verdict"]["decided_by"], "default");
  EXPECT_EQ(t["outcome"], "denied");
}

TEST_F(TraceTest, DenyRuleIndexAndPort) {
  json t = trace("front/client", "10.244.2.10:9999");
  EXPECT_EQ(t["verdict"]["result"], "deny");
  EXPECT_EQ(t["verdict"]["policy"], "app/deny-9999");
  EXPECT_EQ(t["verdict"]["rule"], 1);
}

TEST_F(TraceTest, ServiceVipPicksFromADetachedBalancer) {
  json t = trace("front/client", "web.app:80");
  EXPECT_EQ(t["destination"]["address"], "10.96.0.20:80");
  EXPECT_EQ(t["route"]["kind"], "service-endpoint");
  EXPECT_EQ(t["route"]["service"], "app/web");
  EXPECT_EQ(t["route"]["candidates"].size(), 2u);
  EXPECT_EQ(t["route"]["next_hop"], "10.244.2.10:8080");
  // Traced again: the same pick, since tracing does not move the live round-robin cursor.
  EXPECT_EQ(trace("front/client", "10.96.0.20:80")["route"]["next_hop"], "10.244.2.10:8080");
  EXPECT_EQ(trace("front/client", "web.app.svc.cluster.local")["route"]["next_hop"],
            "10.244.2.10:8080")
      << "the service's first port when none is given";
  Route real = decideOutbound(*SocketAddress::parse("10.96.0.20:80"),
                              state_->workloadByUid("u1").get(), *state_, balancer_);
  EXPECT_EQ(real.next_hop.toString(), "10.244.2.10:8080");
  EXPECT_EQ(trace("front/client", "10.96.0.20:80")["route"]["next_hop"], "10.244.2.11:8080")
      << "after a real connection, the trace shows the next endpoint";
}

TEST_F(TraceTest, OutsideTheMeshPassthroughAndStrict) {
  json db = trace("front/client", "10.244.2.20:5432");
  EXPECT_EQ(db["route"]["protocol"], "plain");
  EXPECT_EQ(db["inbound"]["enforced"], false);
  EXPECT_TRUE(db["verdict"].is_null());
  EXPECT_EQ(db["outcome"], "allowed");
  json ext = trace("front/client", "192.0.2.1:443");
  EXPECT_EQ(ext["route"]["kind"], "passthrough");
  EXPECT_EQ(ext["route"]["protocol"], "passthrough");
  json strict = trace("plain/client", "10.244.2.30:8200");
  EXPECT_EQ(strict["verdict"]["result"], "deny");
  EXPECT_EQ(strict["verdict"]["reason"], "strict_mtls");
  EXPECT_EQ(trace("front/client", "10.244.2.30:8200")["outcome"], "allowed")
      << "STRICT does not affect HBONE";
  json refused = trace("front/client", "10.96.0.20:81");
  EXPECT_EQ(refused["route"]["kind"], "refused");
  EXPECT_EQ(refused["outcome"], "refused");
}

TEST_F(TraceTest, Errors) {
  TraceContext ctx;
  ctx.state = state_.get();
  EXPECT_FALSE(traceConnection(ctx, TraceQuery{"front/nobody", "10.244.2.10:80"}));
  EXPECT_FALSE(traceConnection(ctx, TraceQuery{"front/client", "10.244.2.10"}));  // no port
  EXPECT_FALSE(traceConnection(ctx, TraceQuery{"front/client", "app/server:99999"}));
  EXPECT_FALSE(traceConnection(ctx, TraceQuery{"front/client", "nosuch.app:80"}));
  EXPECT_FALSE(traceConnection(TraceContext{}, TraceQuery{"front/client", "1.2.3.4:80"}));
  auto q = parseTraceQuery("src=front%2Fclient&dst=%5Bfd00%3A%3A1%5D%3A80");
  ASSERT_TRUE(q) << q.status().message();
  EXPECT_EQ(q->source, "front/client");
  EXPECT_EQ(q->destination, "[fd00::1]:80");
  EXPECT_FALSE(parseTraceQuery("src=a"));
  EXPECT_FALSE(parseTraceQuery("src=a&dst=b&x=1"));
}

}  // namespace
}  // namespace weft::ztunnel
