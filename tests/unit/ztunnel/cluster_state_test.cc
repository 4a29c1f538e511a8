// ClusterState::apply(): full replace, upserts and removals, and all-or-nothing validation.
#include "ztunnel/cluster_state.h"

#include <gtest/gtest.h>

namespace weft::ztunnel {
namespace {

node::v1::Workload wl(const std::string& uid, const std::string& ip) {
  node::v1::Workload w;
  w.set_uid(uid);
  w.set_name("pod-" + uid);
  w.set_namespace_("default");
  w.add_ips(ip);
  return w;
}

node::v1::Service svc(const std::string& name, const std::string& vip) {
  node::v1::Service s;
  s.set_name(name);
  s.set_namespace_("default");
  s.add_vips(vip);
  auto* p = s.add_ports();
  p->set_port(80);
  p->set_target_port(8080);
  return s;
}

TEST(ClusterState, FullThenDelta) {
  node::v1::ClusterUpdate full;
  full.set_full(true);
  *full.add_upsert_workloads() = wl("a", "10.244.1.2");
  *full.add_upsert_workloads() = wl("b", "10.244.1.3");
  *full.add_upsert_services() = svc("web", "10.96.0.10");
  auto s1 = ClusterState::apply(nullptr, full);
  ASSERT_TRUE(s1) << s1.status().message();
  EXPECT_EQ((*s1)->workloads().size(), 2u);
  EXPECT_EQ((*s1)->workloadByIp(*IpAddr::parse("10.244.1.3"))->uid, "b");
  EXPECT_EQ((*s1)->serviceByVip(*IpAddr::parse("10.96.0.10"))->name, "web");

  node::v1::ClusterUpdate delta;
  delta.add_remove_workloads("a");
  *delta.add_upsert_workloads() = wl("c", "10.244.1.4");
  delta.add_remove_services("default/web");
  auto s2 = ClusterState::apply(s1->get(), delta);
  ASSERT_TRUE(s2);
  EXPECT_FALSE((*s2)->workloadByUid("a"));
  EXPECT_TRUE((*s2)->workloadByUid("b"));
  EXPECT_TRUE((*s2)->workloadByUid("c"));
  EXPECT_FALSE((*s2)->workloadByIp(*IpAddr::parse("10.244.1.2")));
  EXPECT_FALSE((*s2)->serviceByVip(*IpAddr::parse("10.96.0.10")));
  // The old snapshot is untouched (connections may still read it).
  EXPECT_TRUE((*s1)->workloadByUid("a"));

  node::v1::ClusterUpdate replace;
  replace.set_full(true);
  *replace.add_upsert_workloads() = wl("d", "10.244.1.5");
  auto s3 = ClusterState::apply(s2->get(), replace);
  ASSERT_TRUE(s3);
  EXPECT_EQ((*s3)->workloads().size(), 1u);
  EXPECT_TRUE((*s3)->workloadByUid("d"));
}

TEST(ClusterState, InvalidObjectRejectsWholeUpdate) {
  node::v1::ClusterUpdate u;
  *u.add_upsert_workloads() = wl("a", "10.244.1.2");
  *u.add_upsert_workloads() = wl("b", "10.244.1.999");
  auto s = ClusterState::apply(nullptr, u);
  ASSERT_FALSE(s);
  EXPECT_NE(s.status().message().find("pod-b"), std::string::npos) << s.status().message();
  EXPECT_NE(s.status().message().find("ips"), std::string::npos);

  node::v1::ClusterUpdate bad_port;
  auto sv = svc("web", "10.96.0.10");
  sv.mutable_ports(0)->set_port(70000);
  *bad_port.add_upsert_services() = sv;
  EXPECT_FALSE(ClusterState::apply(nullptr, bad_port));

  node::v1::ClusterUpdate no_uid;
  *no_uid.add_upsert_workloads() = wl("", "10.244.1.2");
  EXPECT_FALSE(ClusterState::apply(nullptr, no_uid));
}

TEST(ClusterState, StrictMtlsFollowsUpserts) {
  node::v1::Workload w = wl("a", "10.244.1.2");
  auto info = workloadFromProto(w);
  ASSERT_TRUE(info);
  EXPECT_FALSE(info->strict_mtls);  // PERMISSIVE unless the agent says otherwise
  w.set_strict_mtls(true);
  info = workloadFromProto(w);
  ASSERT_TRUE(info);
  EXPECT_TRUE(info->strict_mtls);

  // A policy change arrives as an upsert of the same uid; the new snapshot carries the new
  // mode by IP and by uid, the old one keeps the old mode.
  node::v1::ClusterUpdate full;
  full.set_full(true);
  *full.add_upsert_workloads() = wl("a", "10.244.1.2");
  auto s1 = ClusterState::apply(nullptr, full);
  ASSERT_TRUE(s1);
  EXPECT_FALSE((*s1)->workloadByIp(*IpAddr::parse("10.244.1.2"))->strict_mtls);
  node::v1::ClusterUpdate delta;
  *delta.add_upsert_workloads() = w;
  auto s2 = ClusterState::apply(s1->get(), delta);
  ASSERT_TRUE(s2);
  EXPECT_TRUE((*s2)->workloadByIp(*IpAddr::parse("10.244.1.2"))->strict_mtls);
  EXPECT_TRUE((*s2)->workloadByUid("a")->strict_mtls);
  EXPECT_FALSE((*s1)->workloadByUid("a")->strict_mtls);
}

TEST(ClusterState, ServiceHostname) {
  ServiceInfo s;
  s.name = "web";
  s.namespace_ = "shop";
  EXPECT_EQ(s.hostname("cluster.local"), "web.shop.svc.cluster.local");
  EXPECT_EQ(s.hostname(""), "web.shop.svc.cluster.local");
}

}  // namespace
}  // namespace weft::ztunnel

namespace weft::ztunnel {
namespace {

TEST(ClusterState, ServiceLoadBalancerFromProto) {
  node::v1::ClusterUpdate u;
  u.set_full(true);
  *u.add_upsert_services() = svc("plain", "10.96.0.1");
  node::v1::Service ewma = svc("ewma", "10.96.0.2");
  ewma.set_load_balancer(node::v1::LOAD_BALANCER_PEAK_EWMA);
  *u.add_upsert_services() = ewma;
  node::v1::Service future = svc("future", "10.96.0.3");
  future.set_load_balancer(static_cast<node::v1::LoadBalancer>(7));  // a newer agent's value
  *u.add_upsert_services() = future;
  auto s = ClusterState::apply(nullptr, u);
  ASSERT_TRUE(s) << s.status().message();
  auto lbOf = [&](const char* vip) {
    return (*s)->serviceByVip(*IpAddr::parse(vip))->load_balancing;
  };
  EXPECT_EQ(lbOf("10.96.0.1"), LoadBalancing::kRoundRobin);
  EXPECT_EQ(lbOf("10.96.0.2"), LoadBalancing::kPeakEwma);
  EXPECT_EQ(lbOf("10.96.0.3"), LoadBalancing::kRoundRobin);
  EXPECT_STREQ(loadBalancingName(LoadBalancing::kPeakEwma), "peak-ewma");
  EXPECT_STREQ(loadBalancingName(LoadBalancing::kRoundRobin), "round-robin");
}

}  // namespace
}  // namespace weft::ztunnel
