// The Service annotation weft.dev/load-balancer: parsed and validated from manifests, and
// carried to the ztunnel as Service.load_balancer (an annotation change is a delta).
#include <gtest/gtest.h>

#include "agent/cluster_sync.h"
#include "agent/manifests.h"
#include "agent/model.h"

namespace weft::agent {
namespace {

std::string serviceYaml(const std::string& annotations) {
  return "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\n" +
         annotations +
         "spec:\n  selector: {app: web}\n  clusterIP: 10.96.0.10\n  ports:\n  - port: 80\n";
}

Service parsedService(const std::string& annotations) {
  auto r = parseManifest("svc.yaml", serviceYaml(annotations));
  EXPECT_TRUE(r) << r.status().message();
  if (!r || r->services.size() != 1) return Service{};
  return r->services[0];
}

TEST(LoadBalancerAnnotation, AbsentIsRoundRobin) {
  Service s = parsedService("");
  EXPECT_EQ(serviceLoadBalancer(s, nullptr), LoadBalancer::kRoundRobin);
  EXPECT_EQ(serviceProto(ClusterModel{}, s).load_balancer(),
            weft::node::v1::LOAD_BALANCER_ROUND_ROBIN);
}

TEST(LoadBalancerAnnotation, NamedValues) {
  Service rr = parsedService("  annotations: {weft.dev/load-balancer: round-robin}\n");
  EXPECT_EQ(serviceLoadBalancer(rr, nullptr), LoadBalancer::kRoundRobin);
  Service ewma = parsedService("  annotations: {weft.dev/load-balancer: peak-ewma}\n");
  EXPECT_EQ(serviceLoadBalancer(ewma, nullptr), LoadBalancer::kPeakEwma);
  EXPECT_EQ(serviceProto(ClusterModel{}, ewma).load_balancer(),
            weft::node::v1::LOAD_BALANCER_PEAK_EWMA);
}

TEST(LoadBalancerAnnotation, UnknownValueRejectsTheFileNamingTheField) {
  auto r = parseManifest("svc.yaml",
                         serviceYaml("  annotations: {weft.dev/load-balancer: least-conn}\n"));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.status().message(),
            "svc.yaml: Service shop/web: metadata.annotations.weft.dev/load-balancer: "
            "\"least-conn\" is not round-robin or peak-ewma");
}

TEST(LoadBalancerAnnotation, UnknownValueFromASourceThatCannotRefuseIsRoundRobin) {
  Service s;
  s.meta.name = "web";
  s.meta.namespace_ = "shop";
  s.meta.annotations[kLoadBalancerAnnotation] = "Peak-EWMA";
  std::string err;
  EXPECT_FALSE(serviceLoadBalancer(s, &err));
  EXPECT_EQ(err, "\"Peak-EWMA\" is not round-robin or peak-ewma");
  EXPECT_EQ(serviceProto(ClusterModel{}, s).load_balancer(),
            weft::node::v1::LOAD_BALANCER_ROUND_ROBIN);
}

TEST(LoadBalancerAnnotation, ChangingItIsAServiceUpsert) {
  ClusterModel before, after;
  Service s = parsedService("");
  before.services["shop/web"] = s;
  s.meta.annotations[kLoadBalancerAnnotation] = "peak-ewma";
  after.services["shop/web"] = s;
  auto delta = clusterDelta(before, after);
  ASSERT_EQ(delta.upsert_services_size(), 1);
  EXPECT_EQ(delta.upsert_services(0).load_balancer(), weft::node::v1::LOAD_BALANCER_PEAK_EWMA);
}

}  // namespace
}  // namespace weft::agent
