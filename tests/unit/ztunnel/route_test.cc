// decideOutbound(): VIPs to endpoints (round robin, targetPort, IPv6), pod IPs, passthrough,
// refusals.
#include "ztunnel/route.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <map>

#include "tests/unit/ztunnel/test_addr.h"

namespace weft::ztunnel {
namespace {

using testutil::ip;
using testutil::addr;

WorkloadInfo pod(const char* uid, const char* name, std::vector<const char*> ips) {
  WorkloadInfo w;
  w.uid = uid;
  w.name = name;
  w.namespace_ = "default";
  for (const char* s : ips) w.ips.push_back(ip(s));
  return w;
}

class RouteTest : public ::testing::Test {
 protected:
  void SetUp() override {
    state_.addWorkload(pod("u-a", "client", {"10.244.1.2", "fd00:10:244:1::2"}));
    state_.addWorkload(pod("u-b1", "server-1", {"10.244.1.3", "fd00:10:244:1::3"}));
    state_.addWorkload(pod("u-b2", "server-2", {"10.244.2.3", "fd00:10:244:2::3"}));
    state_.addWorkload(pod("u-b3", "server-3", {"10.244.2.4"}));  // IPv4 only
    ServiceInfo svc;
    svc.name = "server";
    svc.namespace_ = "default";
    svc.vips = {ip("10.96.0.10"), ip("fd00:10:96::a")};
    svc.ports = {{80, 8080, true, "http"}, {443, 0, true, "https"}, {53, 5353, false, "dns"}};
    svc.endpoints = {{"u-b1", ip("10.244.1.3")}, {"u-b2", ip("10.244.2.3")},
                     {"u-b3", ip("10.244.2.4")}};
    state_.addService(svc);
    ServiceInfo empty;
    empty.name = "nobody";
    empty.namespace_ = "default";
    empty.vips = {ip("10.96.0.11")};
    empty.ports = {{80, 8080, true, ""}};
    state_.addService(empty);
    source_ = state_.workloadByUid("u-a");
  }
  Route decide(const char* dst) { return decideOutbound(addr(dst), source_.get(), state_, rr_); }

  ClusterState state_;
  Balancer rr_{BalancerOptions{.seed = 1}};
  WorkloadInfoPtr source_;
};

TEST_F(RouteTest, VipResolvesToEndpointWithTargetPort) {
  Route r = decide("10.96.0.10:80");
  EXPECT_EQ(r.kind, RouteKind::kServiceEndpoint);
  EXPECT_EQ(r.next_hop, addr("10.244.1.3:8080"));
  ASSERT_TRUE(r.destination_service);
  EXPECT_EQ(r.destination_service->key(), "default/server");
  ASSERT_TRUE(r.destination_workload);
  EXPECT_EQ(r.destination_workload->name, "server-1");
}

TEST_F(RouteTest, RoundRobinCyclesEndpoints) {
  std::vector<std::string> hops;
  for (int i = 0; i < 6; i++) hops.push_back(decide("10.96.0.10:80").next_hop.toString());
  EXPECT_EQ(hops, (std::vector<std::string>{"10.244.1.3:8080", "10.244.2.3:8080",
                                             "10.244.2.4:8080", "10.244.1.3:8080",
                                             "10.244.2.3:8080", "10.244.2.4:8080"}));
}

TEST_F(RouteTest, EjectedEndpointIsSkippedAndComesBack) {
  int64_t now = 0;
  Balancer lb(BalancerOptions{.seed = 1}, [&] { return now; });
  auto at = [&](const char* dst) { return decideOutbound(addr(dst), source_.get(), state_, lb); };
  for (int i = 0; i < 5; i++) lb.lease(addr("10.244.2.3:8080"))->failed();
  std::vector<std::string> hops;
  for (int i = 0; i < 4; i++) {
    Route r = at("10.96.0.10:80");
    EXPECT_FALSE(r.all_ejected);
    hops.push_back(r.next_hop.toString());
  }
  EXPECT_EQ(hops, (std::vector<std::string>{"10.244.1.3:8080", "10.244.2.4:8080",
                                             "10.244.1.3:8080", "10.244.2.4:8080"}));
  now += 10'000'000'000;  // the 10 s ejection is over
  hops.clear();
  for (int i = 0; i < 3; i++) hops.push_back(at("10.96.0.10:80").next_hop.toString());
  std::sort(hops.begin(), hops.end());
  EXPECT_EQ(hops, (std::vector<std::string>{"10.244.1.3:8080", "10.244.2.3:8080",
                                             "10.244.2.4:8080"}));
}

TEST_F(RouteTest, AllEndpointsEjectedStillRoutesAndSaysSo) {
  for (const char* ep : {"10.244.1.3:8080", "10.244.2.3:8080", "10.244.2.4:8080"})
    for (int i = 0; i < 5; i++) rr_.lease(addr(ep))->failed();
  Route r = decide("10.96.0.10:80");
  EXPECT_EQ(r.kind, RouteKind::kServiceEndpoint);
  EXPECT_TRUE(r.all_ejected);
  EXPECT_NE(r.reason.find("all endpoints ejected"), std::string::npos) << r.reason;
}

TEST_F(RouteTest, PeakEwmaServiceAvoidsTheSlowEndpoint) {
  ServiceInfo svc = *state_.serviceByVip(ip("10.96.0.10"));
  svc.load_balancing = LoadBalancing::kPeakEwma;
  state_.addService(svc);
  int64_t now = 0;
  Balancer lb(BalancerOptions{.seed = 3}, [&] { return now; });
  std::map<std::string, int> counts;
  for (int i = 0; i < 300; i++) {
    Route r = decideOutbound(addr("10.96.0.10:80"), source_.get(), state_, lb);
    ASSERT_EQ(r.kind, RouteKind::kServiceEndpoint);
    EXPECT_NE(r.reason.find("(peak-ewma)"), std::string::npos) << r.reason;
    auto lease = lb.lease(r.next_hop);
    lease->begin();
    now += r.next_hop == addr("10.244.2.4:8080") ? 200'000'000 : 1'000'000;
    lease->succeeded();
    if (i >= 30) counts[r.next_hop.toString()]++;
  }
  EXPECT_EQ(counts["10.244.2.4:8080"], 0);
  EXPECT_EQ(counts["10.244.1.3:8080"] + counts["10.244.2.3:8080"], 270);
}

TEST_F(RouteTest, TargetPortZeroMeansSamePort) {
  Route r = decide("10.96.0.10:443");
  EXPECT_EQ(r.kind, RouteKind::kServiceEndpoint);
  EXPECT_EQ(r.next_hop.port(), 443);
}

TEST_F(RouteTest, Ipv6VipUsesEndpointsIpv6Addresses) {
  Route r1 = decide("[fd00:10:96::a]:80");
  Route r2 = decide("[fd00:10:96::a]:80");
  Route r3 = decide("[fd00:10:96::a]:80");
  EXPECT_EQ(r1.kind, RouteKind::kServiceEndpoint);
  // The IPv4-only endpoint is skipped for an IPv6 VIP.
  EXPECT_EQ(r1.next_hop, addr("[fd00:10:244:1::3]:8080"));
  EXPECT_EQ(r2.next_hop, addr("[fd00:10:244:2::3]:8080"));
  EXPECT_EQ(r3.next_hop, addr("[fd00:10:244:1::3]:8080"));
}

TEST_F(RouteTest, NoEndpointsIsRefused) {
  Route r = decide("10.96.0.11:80");
  EXPECT_EQ(r.kind, RouteKind::kRefused);
  EXPECT_TRUE(r.no_endpoints);
  ASSERT_TRUE(r.destination_service);
  EXPECT_EQ(r.destination_service->name, "nobody");
}

TEST_F(RouteTest, UnknownServicePortIsRefused) {
  Route r = decide("10.96.0.10:81");
  EXPECT_EQ(r.kind, RouteKind::kRefused);
  EXPECT_FALSE(r.no_endpoints);
  // UDP ports do not carry TCP.
  EXPECT_EQ(decide("10.96.0.10:53").kind, RouteKind::kRefused);
}

TEST_F(RouteTest, PodIpGoesDirect) {
  Route r = decide("10.244.2.3:9000");
  EXPECT_EQ(r.kind, RouteKind::kDirectWorkload);
  EXPECT_EQ(r.next_hop, addr("10.244.2.3:9000"));
  ASSERT_TRUE(r.destination_workload);
  EXPECT_EQ(r.destination_workload->uid, "u-b2");
  EXPECT_FALSE(r.destination_service);
  Route r6 = decide("[fd00:10:244:2::3]:9000");
  EXPECT_EQ(r6.kind, RouteKind::kDirectWorkload);
  EXPECT_EQ(r6.destination_workload->uid, "u-b2");
}

TEST_F(RouteTest, UnknownIpPassesThrough) {
  for (const char* d : {"192.0.2.1:443", "[2001:db8::1]:443", "10.96.0.99:80"}) {
    Route r = decide(d);
    EXPECT_EQ(r.kind, RouteKind::kPassthrough) << d;
    EXPECT_EQ(r.next_hop, addr(d)) << d;
    EXPECT_FALSE(r.destination_workload);
    EXPECT_FALSE(r.destination_service);
  }
}

TEST_F(RouteTest, OwnOutboundPortIsALoop) {
  EXPECT_EQ(decide("127.0.0.1:15001").kind, RouteKind::kRefused);
  EXPECT_EQ(decide("[::1]:15001").kind, RouteKind::kRefused);
  EXPECT_EQ(decide("127.0.0.1:8080").kind, RouteKind::kPassthrough);
}

TEST_F(RouteTest, UnsetDestinationRefused) {
  EXPECT_EQ(decideOutbound(SocketAddress(), source_.get(), state_, rr_).kind,
            RouteKind::kRefused);
  EXPECT_EQ(decide("10.244.2.3:0").kind, RouteKind::kRefused);
}

TEST_F(RouteTest, EndpointWithoutWorkloadStillRoutes) {
  ServiceInfo ext;
  ext.name = "external";
  ext.namespace_ = "ops";
  ext.vips = {ip("10.96.0.20")};
  ext.ports = {{5432, 5432, true, ""}};
  ext.endpoints = {{"", ip("192.0.2.50")}};
  state_.addService(ext);
  Route r = decide("10.96.0.20:5432");
  EXPECT_EQ(r.kind, RouteKind::kServiceEndpoint);
  EXPECT_EQ(r.next_hop, addr("192.0.2.50:5432"));
  EXPECT_FALSE(r.destination_workload);
}

TEST_F(RouteTest, DualStackEndpointListedTwiceCountsOnce) {
  ServiceInfo ds;
  ds.name = "ds";
  ds.namespace_ = "default";
  ds.vips = {ip("10.96.0.40")};
  ds.ports = {{80, 80, true, ""}};
  ds.endpoints = {{"u-b1", ip("10.244.1.3")}, {"u-b1", ip("fd00:10:244:1::3")},
                  {"u-b2", ip("10.244.2.3")}, {"u-b2", ip("fd00:10:244:2::3")}};
  state_.addService(ds);
  std::vector<std::string> hops;
  for (int i = 0; i < 4; i++) hops.push_back(decide("10.96.0.40:80").next_hop.toString());
  EXPECT_EQ(hops, (std::vector<std::string>{"10.244.1.3:80", "10.244.2.3:80", "10.244.1.3:80",
                                             "10.244.2.3:80"}));
}

TEST_F(RouteTest, CursorsArePerService) {
  ServiceInfo other;
  other.name = "other";
  other.namespace_ = "default";
  other.vips = {ip("10.96.0.30")};
  other.ports = {{80, 80, true, ""}};
  other.endpoints = {{"u-b1", ip("10.244.1.3")}, {"u-b2", ip("10.244.2.3")}};
  state_.addService(other);
  EXPECT_EQ(decide("10.96.0.10:80").next_hop.ip(), ip("10.244.1.3"));
  EXPECT_EQ(decide("10.96.0.30:80").next_hop.ip(), ip("10.244.1.3"));
  EXPECT_EQ(decide("10.96.0.10:80").next_hop.ip(), ip("10.244.2.3"));
  EXPECT_EQ(decide("10.96.0.30:80").next_hop.ip(), ip("10.244.2.3"));
}

// A named targetPort ("http") is a number per endpoint (each pod's container port of that
// name); an endpoint without it is not an endpoint of that service port. The same map carries
// the ports of EndpointSlice-backed services, and wins over the service-wide targetPort.
TEST_F(RouteTest, NamedTargetPortUsesEachEndpointsOwnPort) {
  ServiceInfo svc;
  svc.name = "named";
  svc.namespace_ = "default";
  svc.vips = {ip("10.96.0.20"), ip("fd00:10:96::14")};
  ServicePortInfo http{80, 0, true, "web", "http"};
  ServicePortInfo metrics{9090, 9091, true, "metrics", ""};
  svc.ports = {http, metrics};
  svc.endpoints = {{"u-b1", ip("10.244.1.3"), {{80, 8080}}},
                   {"u-b2", ip("10.244.2.3"), {{80, 8081}, {9090, 9999}}},
                   {"u-b3", ip("10.244.2.4"), {}}};  // no port named http
  state_.addService(svc);
  std::map<std::string, int> seen;
  for (int i = 0; i < 6; i++) {
    Route r = decide("10.96.0.20:80");
    ASSERT_EQ(r.kind, RouteKind::kServiceEndpoint) << r.reason;
    seen[r.next_hop.toString()]++;
  }
  EXPECT_EQ(seen, (std::map<std::string, int>{{"10.244.1.3:8080", 3}, {"10.244.2.3:8081", 3}}));
  // IPv6 VIP: the dual-stack workloads' IPv6 addresses, same per-endpoint ports.
  Route v6 = decide("[fd00:10:96::14]:80");
  ASSERT_EQ(v6.kind, RouteKind::kServiceEndpoint);
  EXPECT_TRUE(v6.next_hop.port() == 8080 || v6.next_hop.port() == 8081) << v6.next_hop.toString();
  // The numbered port: the endpoint's own entry wins, else the service's targetPort; u-b3
  // serves it (the named port's absence matters only for that port).
  seen.clear();
  for (int i = 0; i < 6; i++) seen[decide("10.96.0.20:9090").next_hop.toString()]++;
  EXPECT_EQ(seen, (std::map<std::string, int>{
                      {"10.244.1.3:9091", 2}, {"10.244.2.3:9999", 2}, {"10.244.2.4:9091", 2}}));
}

TEST_F(RouteTest, NamedTargetPortThatNoEndpointHasIsNoEndpoint) {
  ServiceInfo svc;
  svc.name = "nameless";
  svc.namespace_ = "default";
  svc.vips = {ip("10.96.0.21")};
  svc.ports = {{80, 0, true, "web", "http"}};
  svc.endpoints = {{"u-b1", ip("10.244.1.3"), {}}};
  state_.addService(svc);
  Route r = decide("10.96.0.21:80");
  EXPECT_EQ(r.kind, RouteKind::kRefused);
  EXPECT_TRUE(r.no_endpoints);
}

TEST(ClusterStateProto, EndpointTargetPortsAndNamedPortsRoundTrip) {
  node::v1::Service s;
  s.set_name("web");
  s.set_namespace_("ns");
  s.add_vips("10.96.0.5");
  auto* p = s.add_ports();
  p->set_port(80);
  p->set_target_port_name("http");
  auto* e = s.add_endpoints();
  e->set_ip("10.244.1.5");
  (*e->mutable_target_ports())[80] = 8080;
  auto info = serviceFromProto(s);
  ASSERT_TRUE(info) << info.status().message();
  EXPECT_EQ(info->ports[0].target_port_name, "http");
  EXPECT_EQ(info->endpoints[0].target_ports.at(80), 8080);
  (*e->mutable_target_ports())[80] = 70000;
  EXPECT_FALSE(serviceFromProto(s));
}

TEST(RouteKind, Names) {
  EXPECT_STREQ(routeKindName(RouteKind::kPassthrough), "passthrough");
  EXPECT_STREQ(routeKindName(RouteKind::kServiceEndpoint), "service-endpoint");
}

}  // namespace
}  // namespace weft::ztunnel
