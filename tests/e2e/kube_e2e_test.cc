// End-to-end with the Kubernetes API source: a 2-node sim whose agents list+watch the fake API
// server (tests/fixtures/kube/fake_apiserver.py, `scripts/sim up --kube-api fake`) instead of
// reading the manifest directory; pods reach the agents as watch events, then get enrolled.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <thread>

#include "tests/e2e/sim_cluster.h"
#include "tests/e2e/sim_suite.h"

namespace weft::e2e {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Json = nlohmann::json;

constexpr const char* kClient = "mesh/client";    // node1
constexpr const char* kServerIp = "10.244.2.40";  // mesh/server, node2
constexpr int kPort = 8080;
// mesh/web: selector app=server, targetPort "http" (the server's container port of that name);
// its EndpointSlices come from the fake API server's EndpointSlice controller.
constexpr const char* kWebVip = "10.96.50.1";
// mesh/manual: no selector; its endpoints are an EndpointSlice the test writes itself.
constexpr const char* kManualVip = "10.96.50.2";
constexpr int kSvcPort = 80;

std::string servicesYaml() {
  return fmt::format(
      "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: mesh}}\n"
      "spec:\n  selector: {{app: server}}\n  clusterIP: \"{}\"\n"
      "  ports:\n  - {{name: web, port: {}, targetPort: http}}\n"
      "---\n"
      "apiVersion: v1\nkind: Service\nmetadata: {{name: manual, namespace: mesh}}\n"
      "spec:\n  clusterIP: \"{}\"\n  ports:\n  - {{name: tcp, port: {}, targetPort: {}}}\n",
      kWebVip, kSvcPort, kManualVip, kSvcPort, kPort);
}

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

class KubeE2E : public SimSuite<KubeE2E> {
 protected:
  static void SetUpTestSuite() {
    setupError_.clear();
    if (::geteuid() != 0) return;
    if (!makeLogDir("kube")) return;
    PodSpec client;
    client.ns = "mesh", client.name = "client", client.node = "node1";
    client.ip4 = "10.244.1.40", client.ip6 = "fd00:10:244:1::40";
    client.command = "sleep infinity";
    PodSpec server;
    server.ns = "mesh", server.name = "server", server.node = "node2";
    server.ip4 = kServerIp, server.ip6 = "fd00:10:244:2::40";
    server.command =
        fmt::format("{} --port {} --log-peers {}/server.log", echoServerPath(), kPort, logDir_);
    server.labels = {{"app", "server"}};
    server.containerPorts = {{"http", kPort}};
    if (!bringUp(fmt::format("k{}", ::getpid() % 100000000), 2,
                 {{"ns.yaml", namespaceYaml("mesh", true)},
                  {"pods.yaml", podYaml(client) + "---\n" + podYaml(server)},
                  {"services.yaml", servicesYaml()}},
                 {"--kube-api", "fake"})) {
      return;
    }
    std::string err;
    auto st = cluster_->status(&err);
    if (!st || !st->contains("kube_api") || !(*st)["kube_api"].is_object()) {
      setupError_ = "sim status has no kube_api: " + err;
      return;
    }
    kube_ = (*st)["kube_api"];
    if (!eventually([] { return fs::exists(logDir_ + "/server.log"); }, 20s))
      setupError_ = "echo server did not start";
  }

  // POST to the fake API server's control API, from inside the fabric netns.
  static RunResult kubeControl(const std::string& path, const Json& body) {
    std::string token = slurp(kube_["token_file"].get<std::string>());
    while (!token.empty() && token.back() == '\n') token.pop_back();
    RunOptions o = withTimeout(15s);
    o.stdinText = body.dump();
    return run({"ip", "netns", "exec", kube_["netns"].get<std::string>(), "curl", "-sS", "-f",
                "--max-time", "10", "--cacert", kube_["ca_file"].get<std::string>(), "-H",
                "Authorization: Bearer " + token, "--data-binary", "@-",
                kube_["url"].get<std::string>() + path},
               o);
  }

  // /workloads of `node`'s agent, the entry for ns/name (null if absent).
  static Json workload(const std::string& node, const std::string& key) {
    auto body = cluster_->agentAdmin(node, "/workloads");
    if (!body) return nullptr;
    auto j = Json::parse(*body, nullptr, false);
    if (!j.is_array()) return nullptr;
    for (auto& w : j)
      if (w.value("namespace", "") + "/" + w.value("name", "") == key) return w;
    return nullptr;
  }

  static double opened(const std::string& node, const std::string& reporter) {
    auto m = cluster_->metrics(node);
    return m ? sumSamples(*m, "istio_tcp_connections_opened_total", {{"reporter", reporter}}) : -1;
  }

  static Json echo(int count, int seed) {
    return echoTo(fmt::format("{}:{}", kServerIp, kPort), count, seed);
  }

  static Json echoTo(const std::string& target, int count, int seed) {
    auto r = cluster_->exec(kClient,
                            {echoClientPath(), "--target", target,
                             "--count", std::to_string(count), "--max-bytes", "4096",
                             "--concurrency", "1", "--seed", std::to_string(seed),
                             "--timeout-s", "5"},
                            60s);
    auto j = Json::parse(r.out, nullptr, false);
    if (!j.is_object()) return Json{{"error", r.describe()}, {"ok", -1}};
    return j;
  }

  static inline Json kube_;
};

// The agents run with --source kubernetes and learned every pod from a watch event: their
// first pod list was empty (the sim creates pods through the API as it starts them).
TEST_F(KubeE2E, AgentsWatchTheApiServerAndPodsArriveAsWatchEvents) {
  for (const char* node : {"node1", "node2"}) {
    auto cmd = cluster_->agentCommand(node);
    ASSERT_TRUE(cmd);
    std::string joined;
    for (auto& a : *cmd) joined += a + " ";
    EXPECT_NE(joined.find("--source kubernetes"), std::string::npos) << joined;
    EXPECT_EQ(joined.find("--manifests"), std::string::npos) << joined;
    auto st = cluster_->status();
    ASSERT_TRUE(st);
    std::string log;
    for (auto& n : (*st)["nodes"])
      if (n["name"] == node) log = slurp(n["agent"]["log"].get<std::string>());
    EXPECT_NE(log.find(fmt::format("kubernetes pods (node {}): listed 0 objects", node)),
              std::string::npos)
        << "the agent's first list of its pods must be empty";
  }
  Json w = workload("node1", kClient);
  ASSERT_TRUE(w.is_object());
  EXPECT_TRUE(w.value("enrolled", false)) << w.dump();
  Json remote = workload("node1", "mesh/server");
  ASSERT_TRUE(remote.is_object()) << "node1 knows node2's pod (other nodes' pods watch)";
  EXPECT_EQ(remote.value("node", ""), "node2");
}

// An enrolled client on node1 reaches an enrolled server on node2 through both ztunnels.
TEST_F(KubeE2E, CrossNodeConnectionIsMeshed) {
  double src0 = opened("node1", "source"), dst0 = opened("node2", "destination");
  Json j = echo(3, 1);
  EXPECT_EQ(j.value("ok", -1), 3) << j.dump();
  EXPECT_EQ(j.value("mismatches", -1), 0) << j.dump();
  EXPECT_TRUE(eventually([&] { return opened("node1", "source") >= src0 + 3; }, 5s));
  EXPECT_TRUE(eventually([&] { return opened("node2", "destination") >= dst0 + 3; }, 5s));
}

// A Namespace MODIFIED through the API takes the pod out of the mesh and back in.
TEST_F(KubeE2E, NamespaceLabelChangedThroughTheApiLeavesAndRejoins) {
  Json ns = {{"kind", "Namespace"}, {"apiVersion", "v1"}, {"metadata", {{"name", "mesh"}}}};
  auto r = kubeControl("/fixture/apply", ns);
  ASSERT_EQ(r.exitCode, 0) << r.describe();
  EXPECT_TRUE(eventually([] { return !workload("node1", kClient).value("enrolled", true); }, 10s))
      << workload("node1", kClient).dump();
  double src0 = opened("node1", "source");
  Json j = echo(2, 2);
  EXPECT_EQ(j.value("ok", -1), 2) << j.dump();
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(opened("node1", "source"), src0) << "not meshed while the label is gone";
  ns["metadata"]["labels"] = {{"weft.dev/dataplane-mode", "ambient"}};
  r = kubeControl("/fixture/apply", ns);
  ASSERT_EQ(r.exitCode, 0) << r.describe();
  EXPECT_TRUE(eventually([] { return workload("node1", kClient).value("enrolled", false); }, 10s));
  j = echo(2, 3);
  EXPECT_EQ(j.value("ok", -1), 2) << j.dump();
  EXPECT_TRUE(eventually([&] { return opened("node1", "source") >= src0 + 2; }, 5s));
}

// A real API server learns a pod's IPs only after its CNI ADD returned, and ADD waits for
// enrollment: the sim creates each pod without status.podIPs, so the agent enrolled it with the
// addresses of the CNI request's prevResult.
TEST_F(KubeE2E, PodWithoutPodIpsWasEnrolledByCniAdd) {
  auto st = cluster_->status();
  ASSERT_TRUE(st);
  for (auto& n : (*st)["nodes"]) {
    std::string log = slurp(n["agent"]["log"].get<std::string>());
    const std::string pod = n["name"] == "node1" ? "mesh/client" : "mesh/server";
    EXPECT_NE(log.find("pod " + pod + ": no status.podIPs yet; using the CNI prevResult's"),
              std::string::npos)
        << n["name"] << " agent log";
  }
  Json w = workload("node1", kClient);
  EXPECT_TRUE(w.value("enrolled", false)) << w.dump();
  EXPECT_EQ(w["ips"][0], "10.244.1.40") << w.dump();
}

// mesh/web's endpoints are its EndpointSlices (written by the fake API server's controller from
// the server pod, on node2), with targetPort "http" resolved to the pod's container port.
TEST_F(KubeE2E, ServiceEndpointsFromEndpointSlicesAreReachableThroughTheMesh) {
  auto body = cluster_->agentAdmin("node1", "/services");
  ASSERT_TRUE(body);
  Json svcs = Json::parse(*body, nullptr, false);
  Json web;
  for (auto& s : svcs)
    if (s.value("name", "") == "web") web = s;
  ASSERT_TRUE(web.is_object()) << *body;
  EXPECT_EQ(web.value("endpoints_from", ""), "endpointslices") << web.dump();
  ASSERT_TRUE(eventually([&] {
    auto b = cluster_->agentAdmin("node1", "/services");
    return b && b->find("\"10.244.2.40\"") != std::string::npos;
  }, 10s)) << *body;
  double src0 = opened("node1", "source"), dst0 = opened("node2", "destination");
  Json j = echoTo(fmt::format("{}:{}", kWebVip, kSvcPort), 3, 4);
  EXPECT_EQ(j.value("ok", -1), 3) << j.dump();
  EXPECT_TRUE(eventually([&] { return opened("node1", "source") >= src0 + 3; }, 5s));
  EXPECT_TRUE(eventually([&] { return opened("node2", "destination") >= dst0 + 3; }, 5s));

  // A Service without a selector: nothing until its owner writes an EndpointSlice.
  Json none = echoTo(fmt::format("{}:{}", kManualVip, kSvcPort), 1, 5);
  EXPECT_EQ(none.value("ok", -1), 0) << none.dump();
  Json slice = {
      {"kind", "EndpointSlice"},
      {"apiVersion", "discovery.k8s.io/v1"},
      {"metadata",
       {{"name", "manual-1"},
        {"namespace", "mesh"},
        {"labels", {{"kubernetes.io/service-name", "manual"}}}}},
      {"addressType", "IPv4"},
      {"endpoints",
       {{{"addresses", {kServerIp}},
         {"conditions", {{"ready", true}}},
         {"targetRef", {{"kind", "Pod"}, {"namespace", "mesh"}, {"name", "server"}}}}}},
      {"ports", {{{"name", "tcp"}, {"port", kPort}, {"protocol", "TCP"}}}}};
  auto r = kubeControl("/fixture/apply", slice);
  ASSERT_EQ(r.exitCode, 0) << r.describe();
  ASSERT_TRUE(eventually([] {
    Json k = echoTo(fmt::format("{}:{}", kManualVip, kSvcPort), 1, 6);
    return k.value("ok", -1) == 1;
  }, 10s));
  r = kubeControl("/fixture/delete", {{"kind", "EndpointSlice"}, {"namespace", "mesh"},
                                      {"name", "manual-1"}});
  ASSERT_EQ(r.exitCode, 0) << r.describe();
  EXPECT_TRUE(eventually([] {
    return echoTo(fmt::format("{}:{}", kManualVip, kSvcPort), 1, 7).value("ok", -1) == 0;
  }, 10s)) << "the deleted slice's endpoint is gone";
}

// An AuthorizationPolicy delivered through the API is enforced by the destination ztunnel: an
// ALLOW that names another identity refuses the client; edited to name the client, it works.
TEST_F(KubeE2E, AuthorizationPolicyFromTheApiDeniesAndAllows) {
  auto policy = [](const std::string& principal) {
    return Json{{"kind", "AuthorizationPolicy"},
                {"apiVersion", "security.weft.dev/v1"},
                {"metadata", {{"name", "server-callers"}, {"namespace", "mesh"}}},
                {"spec",
                 {{"selector", {{"matchLabels", {{"app", "server"}}}}},
                  {"action", "ALLOW"},
                  {"rules", {{{"from", {{{"source", {{"principals", {principal}}}}}}}}}}}}};
  };
  auto r = kubeControl("/fixture/apply", policy("cluster.local/ns/mesh/sa/nobody"));
  ASSERT_EQ(r.exitCode, 0) << r.describe();
  EXPECT_TRUE(eventually([] { return echo(1, 10).value("ok", -1) == 0; }, 10s))
      << "the client is not the allowed identity";
  Json denied = echo(2, 11);
  EXPECT_EQ(denied.value("ok", -1), 0) << denied.dump();
  r = kubeControl("/fixture/apply", policy("cluster.local/ns/mesh/sa/default"));
  ASSERT_EQ(r.exitCode, 0) << r.describe();
  EXPECT_TRUE(eventually([] { return echo(1, 12).value("ok", -1) == 1; }, 10s))
      << "edited to allow the client's identity";
  Json allowed = echoTo(fmt::format("{}:{}", kWebVip, kSvcPort), 2, 13);
  EXPECT_EQ(allowed.value("ok", -1), 2) << allowed.dump();
  r = kubeControl("/fixture/delete", {{"kind", "AuthorizationPolicy"}, {"namespace", "mesh"},
                                      {"name", "server-callers"}});
  EXPECT_EQ(r.exitCode, 0) << r.describe();
}

}  // namespace
}  // namespace weft::e2e
