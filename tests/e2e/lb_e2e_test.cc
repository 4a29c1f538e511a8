// End-to-end load balancing on a 2-node sim: round robin over a service's three endpoints
// (IPv4 and IPv6 VIPs), ejection of an endpoint that refuses connects, and peak-EWMA avoiding an
// endpoint whose packets are held 200 ms (weft-delay-queue: netem's delay via NFQUEUE).
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <thread>

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/e2e/sim_cluster.h"
#include "tests/e2e/sim_suite.h"

namespace weft::e2e {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Json = nlohmann::json;

// node1: the client and backend-3; node2: backend-1, backend-2 and `dead` (no server).
constexpr const char* kClient = "lb/client";
constexpr int kBackendPort = 8080;
constexpr int kServicePort = 80;
constexpr const char* kRrVip = "10.96.40.1";
constexpr const char* kRrVip6 = "fd00:10:96::40:1";
constexpr const char* kEwmaVip = "10.96.40.2";
constexpr const char* kEjectVip = "10.96.40.3";
// targetPort "echo": backends 1 and 2 name their 8080 so; backend-3 has no such port.
constexpr const char* kNamedVip = "10.96.40.4";
constexpr int kBackends = 3;
constexpr const char* kBackendIps[kBackends] = {"10.244.2.41", "10.244.2.42", "10.244.1.43"};
constexpr const char* kBackendIps6[kBackends] = {"fd00:10:244:2::41", "fd00:10:244:2::42",
                                                 "fd00:10:244:1::43"};
constexpr const char* kBackendNodes[kBackends] = {"node2", "node2", "node1"};
constexpr int kSlow = 1;  // backend-2 gets the 200 ms delay
constexpr int kDelayQueue = 40;

std::string delayQueuePath() { return WEFT_E2E_DELAY_QUEUE; }

// Connections each backend's echo server accepted: its peer log has one "accept" line each.
size_t acceptLines(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  size_t n = 0;
  while (std::getline(in, line)) n += line.rfind("accept ", 0) == 0;
  return n;
}

std::string serviceYaml(const std::string& name, const std::vector<std::string>& ips,
                        const std::string& selector, const std::string& lb) {
  std::string y = fmt::format("apiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n"
                              "  namespace: lb\n",
                              name);
  if (!lb.empty()) y += fmt::format("  annotations:\n    weft.dev/load-balancer: {}\n", lb);
  y += fmt::format("spec:\n  selector: {{{}}}\n  clusterIPs:\n", selector);
  for (const std::string& ip : ips) y += fmt::format("  - \"{}\"\n", ip);
  y += fmt::format("  ports:\n  - name: tcp\n    port: {}\n    targetPort: {}\n", kServicePort,
                   kBackendPort);
  return y;
}

// A Service whose targetPort is a port name, resolved per pod from its container ports.
std::string namedPortServiceYaml() {
  return fmt::format(
      "apiVersion: v1\nkind: Service\nmetadata:\n  name: lb-named\n  namespace: lb\n"
      "spec:\n  selector: {{app: lb-backend}}\n  clusterIP: \"{}\"\n"
      "  ports:\n  - name: tcp\n    port: {}\n    targetPort: echo\n",
      kNamedVip, kServicePort);
}

class LbE2E : public SimSuite<LbE2E> {
 protected:
  static void SetUpTestSuite() {
    setupError_.clear();
    if (::geteuid() != 0) return;
    if (!makeLogDir("lb")) return;
    bringUp(fmt::format("lb{}", ::getpid() % 10000000), 2, manifests());
  }

  static std::string backendLog(int i) { return fmt::format("{}/backend-{}.log", logDir_, i + 1); }

  static std::vector<ManifestFile> manifests() {
    std::vector<ManifestFile> files = {{"ns-lb.yaml", namespaceYaml("lb", true)}};
    std::string pods;
    PodSpec client;
    client.ns = "lb", client.name = "client", client.node = "node1";
    client.ip4 = "10.244.1.40", client.ip6 = "fd00:10:244:1::40";
    client.command = "sleep infinity";
    pods += podYaml(client);
    for (int i = 0; i < kBackends; i++) {
      PodSpec b;
      b.ns = "lb", b.name = fmt::format("backend-{}", i + 1), b.node = kBackendNodes[i];
      b.ip4 = kBackendIps[i], b.ip6 = kBackendIps6[i];
      b.command = fmt::format("{} --port {} --log-peers {}", echoServerPath(), kBackendPort,
                              backendLog(i));
      b.readyPort = kBackendPort;
      b.labels = {{"app", "lb-backend"}, {"lb-eject", "yes"}};
      if (i != 2) b.containerPorts = {{"echo", kBackendPort}};
      pods += "---\n" + podYaml(b);
    }
    // In the mesh but serving nothing: its ztunnel answers the CONNECT with 503.
    PodSpec dead;
    dead.ns = "lb", dead.name = "dead", dead.node = "node2";
    dead.ip4 = "10.244.2.44", dead.ip6 = "fd00:10:244:2::44";
    dead.command = "sleep infinity";
    dead.labels = {{"lb-eject", "yes"}};
    pods += "---\n" + podYaml(dead);
    files.push_back({"pods-lb.yaml", pods});
    files.push_back({"services-lb.yaml",
                     serviceYaml("lb-rr", {kRrVip, kRrVip6}, "app: lb-backend", "") + "---\n" +
                         serviceYaml("lb-ewma", {kEwmaVip}, "app: lb-backend", "peak-ewma") +
                         "---\n" +
                         serviceYaml("lb-eject", {kEjectVip}, "lb-eject: \"yes\"",
                                     "round-robin") +
                         "---\n" + namedPortServiceYaml()});
    return files;
  }

  static std::string target(const std::string& ip, int port) {
    return ip.find(':') != std::string::npos ? fmt::format("[{}]:{}", ip, port)
                                             : fmt::format("{}:{}", ip, port);
  }

  // weft-echo-client in the client pod; its JSON summary (or {"error": ...}).
  static Json echo(const std::string& vip, int count, int concurrency, int seed) {
    auto r = cluster_->exec(kClient,
                            {echoClientPath(), "--target", target(vip, kServicePort), "--count",
                             std::to_string(count), "--min-bytes", "16", "--max-bytes", "256",
                             "--concurrency", std::to_string(concurrency), "--seed",
                             std::to_string(seed), "--timeout-s", "10"},
                            120s);
    auto j = Json::parse(r.out, nullptr, false);
    if (j.is_discarded() || !j.is_object()) return Json{{"error", r.describe()}, {"ok", -1}};
    return j;
  }

  static std::vector<size_t> accepted() {
    std::vector<size_t> v;
    for (int i = 0; i < kBackends; i++) v.push_back(acceptLines(backendLog(i)));
    return v;
  }
  // Connections per backend since `before`, once the servers logged `total` of them.
  static std::vector<size_t> acceptedSince(const std::vector<size_t>& before, size_t total) {
    std::vector<size_t> d;
    eventually(
        [&] {
          d = accepted();
          size_t sum = 0;
          for (int i = 0; i < kBackends; i++) sum += (d[i] -= before[i]);
          return sum >= total;
        },
        5s, 100ms);
    return d;
  }

  static double counter(const std::string& node, const std::string& name) {
    std::string err;
    auto m = cluster_->metrics(node, &err);
    if (!m) {
      ADD_FAILURE() << err;
      return -1;
    }
    return sumSamples(*m, "weft_ztunnel_" + name, {});
  }

  // node1's ztunnel's view of the endpoints (config_dump "endpoint_load"), by endpoint.
  static std::map<std::string, Json> endpointLoad() {
    std::map<std::string, Json> out;
    auto r = cluster_->onNode("node1", {"curl", "-sS", "--max-time", "5",
                                        "http://127.0.0.1:15000/config_dump"});
    auto j = Json::parse(r.out, nullptr, false);
    if (j.is_discarded() || !j.contains("endpoint_load")) {
      ADD_FAILURE() << "config_dump: " << r.describe();
      return out;
    }
    for (auto& e : j["endpoint_load"]) out[e.value("endpoint", "")] = e;
    return out;
  }
};

// Three endpoints, round robin: 300 connections are exactly 100 each; the IPv6 VIP of the same
// service continues the same cursor: 150 more are exactly 50 each.
TEST_F(LbE2E, RoundRobinSpreadsExactlyEvenly) {
  auto before = accepted();
  auto j = echo(kRrVip, 300, 4, 1);
  EXPECT_EQ(j.value("ok", -1), 300) << j.dump();
  auto d = acceptedSince(before, 300);
  EXPECT_EQ(d, (std::vector<size_t>{100, 100, 100})) << "connections per backend";

  before = accepted();
  j = echo(kRrVip6, 150, 4, 2);
  EXPECT_EQ(j.value("ok", -1), 150) << j.dump();
  d = acceptedSince(before, 150);
  EXPECT_EQ(d, (std::vector<size_t>{50, 50, 50})) << "connections per backend over IPv6";
}

// A fourth endpoint in the mesh with no server: each connection to it gets the far ztunnel's
// 503 (the client a reset). Round robin sends it every 4th connection until its 5th failure
// ejects it for 10 s; after that every connection succeeds.
TEST_F(LbE2E, RefusingEndpointIsEjected) {
  double ejections0 = counter("node1", "lb_ejections_total");
  auto before = accepted();
  auto j = echo(kEjectVip, 40, 1, 3);
  EXPECT_EQ(j.value("failures", -1), 5) << j.dump();
  EXPECT_EQ(j.value("ok", -1), 35) << j.dump();
  auto d = acceptedSince(before, 35);
  EXPECT_EQ(d[0] + d[1] + d[2], 35u);
  EXPECT_EQ(counter("node1", "lb_ejections_total"), ejections0 + 1);
  auto load = endpointLoad();
  std::string dead = target("10.244.2.44", kBackendPort);
  ASSERT_TRUE(load.count(dead)) << "no endpoint_load entry for " << dead;
  EXPECT_GT(load[dead].value("ejected_ms", 0), 0) << load[dead].dump();
  EXPECT_EQ(load[dead].value("failures", 0), 5) << load[dead].dump();
}

// backend-2's outgoing packets are held 200 ms (NFQUEUE in its netns), so the CONNECT's 200
// from its ztunnel arrives 200 ms late. Peak-EWMA learns it within a few connections and then
// sends it under 10%; round robin on the same endpoints still gives it a third.
TEST_F(LbE2E, PeakEwmaAvoidsADelayedEndpoint) {
  std::string slowPod = fmt::format("lb/backend-{}", kSlow + 1);
  std::string rule = fmt::format("POSTROUTING -o eth0 -j NFQUEUE --queue-num {} --queue-bypass",
                                 kDelayQueue);
  Child delayer;
  ASSERT_TRUE(delayer.start(cluster_->execArgv(
      slowPod, {delayQueuePath(), "--queue", std::to_string(kDelayQueue), "--delay-ms", "200",
                "--duration-s", "120"})));
  ASSERT_TRUE(delayer.readUntil("ready", 10s)) << "weft-delay-queue did not start";
  auto addRule = [&](const char* tool, const char* op) {
    std::vector<std::string> argv = {tool, "-w", "-t", "mangle", op};
    std::istringstream in(rule);
    std::string w;
    while (in >> w) argv.push_back(w);
    return cluster_->exec(slowPod, argv, 10s);
  };
  auto r4 = addRule("iptables-legacy", "-A");
  ASSERT_EQ(r4.exitCode, 0) << r4.describe();
  struct Cleanup {
    std::function<void()> f;
    ~Cleanup() { f(); }
  } cleanup{[&] {
    addRule("iptables-legacy", "-D");
    delayer.kill();
  }};

  // Warm-up: the balancer sees the new latency on the first connections that go there.
  auto warm = echo(kEwmaVip, 30, 4, 4);
  EXPECT_EQ(warm.value("ok", -1), 30) << warm.dump();
  auto load = endpointLoad();
  std::string slow = target(kBackendIps[kSlow], kBackendPort);
  ASSERT_TRUE(load.count(slow)) << "no endpoint_load entry for " << slow;
  ASSERT_TRUE(load[slow]["latency_ms"].is_number()) << load[slow].dump();
  EXPECT_GE(load[slow]["latency_ms"].get<double>(), 150.0)
      << "the latency the balancer uses must show the delay: " << load[slow].dump();
  for (int i = 0; i < kBackends; i++) {
    if (i == kSlow) continue;
    std::string fast = target(kBackendIps[i], kBackendPort);
    ASSERT_TRUE(load[fast]["latency_ms"].is_number()) << load[fast].dump();
    EXPECT_LT(load[fast]["latency_ms"].get<double>(), 50.0) << load[fast].dump();
  }

  constexpr int kConns = 200;
  auto before = accepted();
  auto j = echo(kEwmaVip, kConns, 4, 5);
  EXPECT_EQ(j.value("ok", -1), kConns) << j.dump();
  auto d = acceptedSince(before, kConns);
  std::fprintf(stderr, "peak-ewma after warm-up: backend-1 %zu, backend-2 (delayed) %zu, "
                       "backend-3 %zu\n", d[0], d[1], d[2]);
  EXPECT_LT(d[kSlow] * 10, static_cast<size_t>(kConns))
      << "the delayed endpoint must get under 10% (got " << d[kSlow] << " of " << kConns << ")";
  EXPECT_EQ(d[0] + d[1] + d[2], static_cast<size_t>(kConns));

  // Same endpoints, same delay, round robin: a third each, so the avoidance above is the
  // balancer's doing.
  before = accepted();
  j = echo(kRrVip, 30, 4, 6);
  EXPECT_EQ(j.value("ok", -1), 30) << j.dump();
  d = acceptedSince(before, 30);
  EXPECT_EQ(d[kSlow], 10u);
}

// targetPort: echo: each pod's own container port of that name; backend-3 has none, so it is
// not an endpoint of that port. Meshed (HBONE across nodes), balanced over the other two.
TEST_F(LbE2E, NamedTargetPortReachesThePodsThatHaveIt) {
  auto before = accepted();
  auto j = echo(kNamedVip, 10, 2, 7);
  EXPECT_EQ(j.value("ok", -1), 10) << j.dump();
  EXPECT_EQ(j.value("mismatches", -1), 0) << j.dump();
  auto d = acceptedSince(before, 10);
  EXPECT_EQ(d, (std::vector<size_t>{5, 5, 0})) << "connections per backend";
  auto r = cluster_->onNode("node1", {"curl", "-sS", "--max-time", "5",
                                      "http://127.0.0.1:15000/config_dump"});
  auto dump = Json::parse(r.out, nullptr, false);
  ASSERT_TRUE(dump.is_object()) << r.describe();
  bool found = false;
  for (auto& svc : dump["services"]) {
    if (svc.value("name", "") != "lb-named") continue;
    found = true;
    EXPECT_EQ(svc["ports"][0].value("target_port_name", ""), "echo") << svc.dump();
    EXPECT_EQ(svc["endpoints"].size(), 4u) << "backend-1/2, one per family: " << svc.dump();
    for (auto& e : svc["endpoints"])
      EXPECT_EQ(e["target_ports"].value(std::to_string(kServicePort), 0), kBackendPort)
          << svc.dump();
  }
  EXPECT_TRUE(found) << r.out;
}

}  // namespace
}  // namespace weft::e2e
