// resolveLocal(): which names the DNS proxy answers from the cluster state (services' VIPs,
// headless endpoints, NXDOMAIN under svc.<domain>, short forms) and which it forwards.
#include <gtest/gtest.h>

#include "ztunnel/dns.h"
#include "tests/unit/ztunnel/test_addr.h"

namespace weft::ztunnel {
namespace {

using testutil::ip;

dns::Query q(const std::string& name, uint16_t type = dns::kTypeA) {
  dns::Query out;
  out.qtype = type;
  out.qclass = dns::kClassIN;
  size_t start = 0;
  while (start < name.size()) {
    size_t dot = name.find('.', start);
    if (dot == std::string::npos) dot = name.size();
    out.labels.push_back(name.substr(start, dot - start));
    start = dot + 1;
  }
  return out;
}

class DnsResolveTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ServiceInfo web;
    web.name = "web";
    web.namespace_ = "mesh";
    web.vips = {ip("10.96.0.20"), ip("fd00:10:96::20")};
    web.endpoints = {{"u1", ip("10.244.2.11")}};
    state_.addService(web);
    ServiceInfo v4;
    v4.name = "api";
    v4.namespace_ = "shop";
    v4.vips = {ip("10.96.0.30")};
    state_.addService(v4);
    ServiceInfo headless;
    headless.name = "db";
    headless.namespace_ = "shop";
    headless.endpoints = {{"u2", ip("10.244.1.5")},
                          {"u3", ip("10.244.2.5")},
                          {"u4", ip("fd00:10:244:2::5")},
                          {"u5", ip("10.244.1.5")}};
    state_.addService(headless);
  }
  DnsDecision resolve(const dns::Query& query, const std::string& ns = "mesh",
                      const std::string& domain = "cluster.local") {
    return resolveLocal(query, state_, ns, domain);
  }
  ClusterState state_;
};

using Kind = DnsDecision::Kind;

TEST_F(DnsResolveTest, FullServiceNameGivesVipsOfTheFamily) {
  auto a = resolve(q("web.mesh.svc.cluster.local"));
  EXPECT_EQ(a.kind, Kind::kAnswer);
  EXPECT_EQ(a.ips, std::vector<IpAddr>{ip("10.96.0.20")});
  EXPECT_EQ(a.service, "mesh/web");
  auto aaaa = resolve(q("web.mesh.svc.cluster.local", dns::kTypeAAAA));
  EXPECT_EQ(aaaa.ips, std::vector<IpAddr>{ip("fd00:10:96::20")});
}

TEST_F(DnsResolveTest, CaseAndTrailingDomainSpellingDoNotMatter) {
  auto a = resolve(q("WEB.Mesh.SVC.cluster.LOCAL"));
  EXPECT_EQ(a.kind, Kind::kAnswer);
  EXPECT_EQ(a.ips.size(), 1u);
  auto other = resolve(q("web.mesh.svc.corp.example"), "mesh", "corp.example");
  EXPECT_EQ(other.kind, Kind::kAnswer);
  // Under another domain the same name is not ours.
  EXPECT_EQ(resolve(q("web.mesh.svc.cluster.local"), "mesh", "corp.example").kind, Kind::kForward);
}

TEST_F(DnsResolveTest, NoRecordOfThatTypeIsNodata) {
  auto aaaa = resolve(q("api.shop.svc.cluster.local", dns::kTypeAAAA));
  EXPECT_EQ(aaaa.kind, Kind::kAnswer);
  EXPECT_TRUE(aaaa.ips.empty());
  auto mx = resolve(q("web.mesh.svc.cluster.local", 15));
  EXPECT_EQ(mx.kind, Kind::kAnswer);
  EXPECT_TRUE(mx.ips.empty());
}

TEST_F(DnsResolveTest, HeadlessServiceGivesItsEndpoints) {
  auto a = resolve(q("db.shop.svc.cluster.local"));
  EXPECT_EQ(a.kind, Kind::kAnswer);
  EXPECT_EQ(a.ips, (std::vector<IpAddr>{ip("10.244.1.5"), ip("10.244.2.5")}));  // no duplicate
  auto aaaa = resolve(q("db.shop.svc.cluster.local", dns::kTypeAAAA));
  EXPECT_EQ(aaaa.ips, std::vector<IpAddr>{ip("fd00:10:244:2::5")});
}

TEST_F(DnsResolveTest, UnknownNamesUnderTheServiceZoneAreNxdomain) {
  EXPECT_EQ(resolve(q("nope.mesh.svc.cluster.local")).kind, Kind::kNxDomain);
  EXPECT_EQ(resolve(q("web.other.svc.cluster.local")).kind, Kind::kNxDomain);
  EXPECT_EQ(resolve(q("x.web.mesh.svc.cluster.local")).kind, Kind::kNxDomain);
  EXPECT_EQ(resolve(q("_http._tcp.web.mesh.svc.cluster.local")).kind, Kind::kNxDomain);
  // The search-path expansions of short forms that do not exist.
  EXPECT_EQ(resolve(q("web.mesh.mesh.svc.cluster.local")).kind, Kind::kNxDomain);
  EXPECT_EQ(resolve(q("web.mesh.svc.svc.cluster.local")).kind, Kind::kNxDomain);
  EXPECT_EQ(resolve(q("nothere.svc.cluster.local")).kind, Kind::kNxDomain);
}

TEST_F(DnsResolveTest, ZoneAndNamespaceNamesExistWithoutRecords) {
  auto zone = resolve(q("svc.cluster.local"));
  EXPECT_EQ(zone.kind, Kind::kAnswer);
  EXPECT_TRUE(zone.ips.empty());
  auto ns = resolve(q("shop.svc.cluster.local"));
  EXPECT_EQ(ns.kind, Kind::kAnswer);
  EXPECT_TRUE(ns.ips.empty());
}

TEST_F(DnsResolveTest, OtherNamesUnderTheDomainAreForwarded) {
  EXPECT_EQ(resolve(q("10-244-1-5.shop.pod.cluster.local")).kind, Kind::kForward);
  EXPECT_EQ(resolve(q("cluster.local")).kind, Kind::kForward);
  EXPECT_EQ(resolve(q("foo.cluster.local")).kind, Kind::kForward);
}

TEST_F(DnsResolveTest, ShortFormsThatReachUsUnexpanded) {
  EXPECT_EQ(resolve(q("web"), "mesh").ips, std::vector<IpAddr>{ip("10.96.0.20")});
  EXPECT_EQ(resolve(q("web"), "shop").kind, Kind::kForward);  // not in the client's namespace
  EXPECT_EQ(resolve(q("api.shop"), "mesh").ips, std::vector<IpAddr>{ip("10.96.0.30")});
  EXPECT_EQ(resolve(q("api.shop.svc"), "mesh").ips, std::vector<IpAddr>{ip("10.96.0.30")});
  EXPECT_EQ(resolve(q("api.shop.cluster"), "mesh").kind, Kind::kForward);
}

TEST_F(DnsResolveTest, ExternalNamesAreForwarded) {
  EXPECT_EQ(resolve(q("example.com")).kind, Kind::kForward);
  EXPECT_EQ(resolve(q("www.example.com")).kind, Kind::kForward);
  EXPECT_EQ(resolve(q("")).kind, Kind::kForward);  // the root
}

TEST_F(DnsResolveTest, OtherClassesAndOpcodesAreForwarded) {
  auto chaos = q("web.mesh.svc.cluster.local");
  chaos.qclass = 3;
  EXPECT_EQ(resolve(chaos).kind, Kind::kForward);
  auto notify = q("web.mesh.svc.cluster.local");
  notify.flags = 4 << 11;
  EXPECT_EQ(resolve(notify).kind, Kind::kForward);
}

}  // namespace
}  // namespace weft::ztunnel
