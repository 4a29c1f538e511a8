// Service endpoints as the ztunnel gets them: by selector with named targetPorts resolved from
// each pod's container ports (the manifest source), and from EndpointSlices (the Kubernetes
// source: ready addresses, ports by name, both families, pods of every node).
#include <gtest/gtest.h>

#include "agent/cluster_sync.h"
#include "agent/manifests.h"
#include "agent/model.h"

namespace weft::agent {
namespace {

ClusterModel fromManifest(const std::string& yaml) {
  auto r = parseManifest("m.yaml", yaml);
  EXPECT_TRUE(r) << r.status().message();
  ClusterModel m;
  if (!r) return m;
  for (const auto& ns : r->namespaces) m.namespaces[ns.meta.name] = ns;
  for (const auto& p : r->pods) m.pods[objectKey(p.meta.namespace_, p.meta.name)] = p;
  for (const auto& s : r->services) m.services[objectKey(s.meta.namespace_, s.meta.name)] = s;
  return m;
}

const char* kNamedPorts = R"(
kind: Pod
metadata: {name: a, namespace: shop, labels: {app: web}}
spec:
  nodeName: node1
  containers:
  - name: app
    ports:
    - {name: http, containerPort: 8080}
    - {name: admin, containerPort: 9000}
status: {podIPs: [{ip: 10.244.1.5}, {ip: "fd00:10:244:1::5"}]}
---
kind: Pod
metadata: {name: b, namespace: shop, labels: {app: web}}
spec:
  nodeName: node2
  containers:
  - name: side
    ports: [{containerPort: 15000}]
  - name: app
    ports: [{name: http, containerPort: 8081}]
status: {podIPs: [{ip: 10.244.2.5}]}
---
kind: Pod
metadata: {name: c, namespace: shop, labels: {app: web}}
spec:
  nodeName: node2
  containers:
  - name: app
    ports: [{name: http, containerPort: 7000, protocol: UDP}]
status: {podIPs: [{ip: 10.244.2.6}]}
---
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  clusterIP: 10.96.0.50
  ports:
  - {name: web, port: 80, targetPort: http}
)";

TEST(ServiceEndpoints, NamedTargetPortResolvesPerPodFromContainerPorts) {
  ClusterModel m = fromManifest(kNamedPorts);
  const Service& svc = m.services.at("shop/web");
  ASSERT_EQ(svc.ports.size(), 1u);
  EXPECT_EQ(svc.ports[0].target_port, 0);
  EXPECT_EQ(svc.ports[0].target_port_name, "http");
  auto eps = resolveServiceEndpoints(m, svc);
  // a (both IPs) at 8080, b at 8081; c's "http" is UDP, so it serves no TCP port 80.
  ASSERT_EQ(eps.size(), 3u);
  EXPECT_EQ(eps[0].ip.toString(), "10.244.1.5");
  EXPECT_EQ(eps[0].target_ports, (std::map<uint16_t, uint16_t>{{80, 8080}}));
  EXPECT_EQ(eps[1].ip.toString(), "fd00:10:244:1::5");
  EXPECT_EQ(eps[1].target_ports, (std::map<uint16_t, uint16_t>{{80, 8080}}));
  EXPECT_EQ(eps[2].ip.toString(), "10.244.2.5");
  EXPECT_EQ(eps[2].target_ports, (std::map<uint16_t, uint16_t>{{80, 8081}}));
  // What the ztunnel receives.
  auto proto = serviceProto(m, svc);
  EXPECT_EQ(proto.ports(0).target_port_name(), "http");
  EXPECT_EQ(proto.ports(0).target_port(), 0u);
  ASSERT_EQ(proto.endpoints_size(), 3);
  EXPECT_EQ(proto.endpoints(2).target_ports().at(80), 8081u);
}

EndpointSlice slice(const std::string& name, const std::string& svc, const std::string& type,
                    std::vector<EndpointSliceEndpoint> eps, std::vector<EndpointSlicePort> ports) {
  EndpointSlice s;
  s.meta.name = name;
  s.meta.namespace_ = "shop";
  s.service_name = svc;
  s.address_type = type;
  s.endpoints = std::move(eps);
  s.ports = std::move(ports);
  return s;
}

EndpointSliceEndpoint ep(const char* ip, bool ready, const std::string& pod = "") {
  EndpointSliceEndpoint e;
  e.addresses.push_back(*IpAddr::parse(ip));
  e.ready = ready;
  e.target_pod = pod;
  return e;
}

TEST(ServiceEndpoints, FromEndpointSlicesReadyAddressesPortsByName) {
  ClusterModel m = fromManifest(kNamedPorts);
  m.endpoints_from_slices = true;
  // With slices in charge, the selector alone yields nothing.
  EXPECT_TRUE(resolveServiceEndpoints(m, m.services.at("shop/web")).empty());
  m.endpoint_slices["shop/web-v4"] =
      slice("web-v4", "web", "IPv4",
            {ep("10.244.1.5", true, "shop/a"), ep("10.244.2.5", true, "shop/b"),
             ep("10.244.9.9", false, "shop/gone"), ep("10.244.3.3", true)},
            {{"web", 8080, "TCP"}, {"other", 1, "TCP"}});
  m.endpoint_slices["shop/web-v6"] =
      slice("web-v6", "web", "IPv6", {ep("fd00:10:244:1::5", true, "shop/a")},
            {{"web", 8080, "TCP"}});
  m.endpoint_slices["shop/other"] =
      slice("other", "not-web", "IPv4", {ep("10.244.1.99", true)}, {{"web", 1, "TCP"}});
  auto eps = resolveServiceEndpoints(m, m.services.at("shop/web"));
  ASSERT_EQ(eps.size(), 4u);
  EXPECT_EQ(eps[0].ip.toString(), "10.244.1.5");
  EXPECT_EQ(eps[0].workload, "shop/a");
  EXPECT_EQ(eps[0].workload_uid, m.pods.at("shop/a").meta.uid);
  EXPECT_EQ(eps[0].target_ports, (std::map<uint16_t, uint16_t>{{80, 8080}}));
  EXPECT_EQ(eps[1].workload, "shop/b");  // another node's pod: cross-node balancing
  EXPECT_EQ(eps[2].ip.toString(), "10.244.3.3");  // no targetRef: by IP only
  EXPECT_EQ(eps[2].workload_uid, "");
  EXPECT_EQ(eps[3].ip.toString(), "fd00:10:244:1::5");
  // A slice that lists none of the service's port names serves none of its ports.
  m.endpoint_slices["shop/web-v4"].ports = {{"nope", 80, "TCP"}};
  EXPECT_EQ(resolveServiceEndpoints(m, m.services.at("shop/web")).size(), 1u);
}

}  // namespace
}  // namespace weft::agent
