// End-to-end tests on a 2-node simulated cluster (scripts/sim): redirect, meshing across nodes,
// plaintext inbound, live enrollment, agent restart, data integrity, bad input and IPv6.
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
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

// The cluster every test here runs on: node1 holds the clients, node2 the servers.
constexpr const char* kMeshClient = "mesh/client";  // enrolled namespace, node1
constexpr const char* kPlainClient = "plain/client";  // not enrolled, node1
constexpr const char* kLiveClient = "live/client";  // enrolled and left during a test, node1
constexpr const char* kMeshClientIp = "10.244.1.10";
constexpr const char* kPlainClientIp = "10.244.1.20";
constexpr const char* kMeshServerIp = "10.244.2.10";
constexpr const char* kMeshServerIp6 = "fd00:10:244:2::10";
constexpr const char* kPlainServerIp = "10.244.2.20";
constexpr const char* kMeshWebIp = "10.244.2.11";  // nginx, enrolled, node2
constexpr const char* kLocalServerIp = "10.244.1.11";  // enrolled, node1: same node as the client
constexpr const char* kMeshInboundSource = "127.0.0.6";  // ARCHITECTURE.md "Inbound to the app"
constexpr int kHashPort = 8080;
constexpr int kHashPort2 = 8081;
constexpr int kStreamPort = 9090;
constexpr const char* kOpened = "istio_tcp_connections_opened_total";

// One line of weft-echo-server's peer log: "accept peer=IP:PORT local=IP:PORT mode=M".
struct Accepted {
  std::string peerIp, localIp;
  int localPort = 0;
};

class ServerLog {
 public:
  ServerLog() = default;
  explicit ServerLog(std::string path) : path_(std::move(path)) {}
  const std::string& path() const { return path_; }
  std::vector<std::string> lines() const {
    std::vector<std::string> out;
    std::ifstream in(path_);
    std::string l;
    while (std::getline(in, l)) out.push_back(l);
    return out;
  }
  size_t mark() const { return lines().size(); }
  // "accept" lines written after `mark`.
  std::vector<Accepted> acceptedSince(size_t mark) const {
    std::vector<Accepted> out;
    auto all = lines();
    for (size_t i = mark; i < all.size(); ++i) {
      std::istringstream in(all[i]);
      std::string word;
      in >> word;
      if (word != "accept") continue;
      Accepted a;
      while (in >> word) {
        if (word.rfind("peer=", 0) == 0) a.peerIp = splitHostPort(word.substr(5)).first;
        if (word.rfind("local=", 0) == 0) {
          std::tie(a.localIp, a.localPort) = splitHostPort(word.substr(6));
        }
      }
      out.push_back(a);
    }
    return out;
  }

 private:
  std::string path_;
};

// nginx in a pod, every path under $POD_DIR, answering with the caller's address as nginx saw
// it: a server nobody here wrote, for a client nobody here wrote (curl).
constexpr const char* kWebScript = R"(#!/bin/sh
set -eu
mkdir -p "$POD_DIR/tmp"
cat > "$POD_DIR/nginx.conf" <<CONF
daemon off;
worker_processes 1;
pid $POD_DIR/nginx.pid;
error_log $POD_DIR/nginx-error.log warn;
events { worker_connections 256; }
http {
  access_log $POD_DIR/access.log;
  client_body_temp_path $POD_DIR/tmp/body;
  proxy_temp_path $POD_DIR/tmp/proxy;
  fastcgi_temp_path $POD_DIR/tmp/fastcgi;
  uwsgi_temp_path $POD_DIR/tmp/uwsgi;
  scgi_temp_path $POD_DIR/tmp/scgi;
  server {
    listen 80;
    listen [::]:80;
    location / {
      default_type text/plain;
      return 200 "client=\$remote_addr\n";
    }
  }
}
CONF
exec nginx -e "$POD_DIR/nginx-error.log" -c "$POD_DIR/nginx.conf"
)";

// One sim per test suite, shared by its tests to keep the run short.
class MeshSim : public SimSuite<MeshSim> {
 protected:
  static void SetUpTestSuite() {
    setupError_.clear();
    if (::geteuid() != 0) return;  // each test skips with the reason
    if (!makeLogDir("logs")) return;
    meshServer_ = ServerLog(logDir_ + "/mesh-server.log");
    localServer_ = ServerLog(logDir_ + "/local-server.log");
    plainServer_ = ServerLog(logDir_ + "/plain-server.log");
    if (!bringUp(fmt::format("e2e{}", ::getpid()), 2, manifests())) return;
    // The sim returns once pods are started; the servers may still be binding.
    for (auto* log : {&meshServer_, &plainServer_, &localServer_}) {
      if (!eventually([&] { return log->mark() > 0; }, 20s)) {
        setupError_ = "echo server did not start: no 'listening' line in " + log->path();
        return;
      }
    }
  }

  static std::vector<ManifestFile> manifests() {
    std::string server = fmt::format("{} --port {} --port {} --stream-port {} --log-peers ",
                                     echoServerPath(), kHashPort, kHashPort2, kStreamPort);
    auto pod = [](std::string ns, std::string name, std::string node, std::string ip4,
                  std::string ip6, std::string cmd) {
      PodSpec p;
      p.ns = ns, p.name = name, p.node = node, p.ip4 = ip4, p.ip6 = ip6, p.command = cmd;
      if (cmd.find("--stream-port") != std::string::npos) p.readyPort = kStreamPort;
      return podYaml(p);
    };
    return {
        {"ns-mesh.yaml", namespaceYaml("mesh", true)},
        {"ns-plain.yaml", namespaceYaml("plain", false)},
        {"ns-live.yaml", namespaceYaml("live", false)},
        {"pods-mesh.yaml",
         pod("mesh", "client", "node1", kMeshClientIp, "fd00:10:244:1::10", "sleep infinity") +
             "---\n" +
             pod("mesh", "server", "node2", kMeshServerIp, kMeshServerIp6,
                 server + meshServer_.path()) +
             "---\n" +
             pod("mesh", "local", "node1", kLocalServerIp, "fd00:10:244:1::11",
                 server + localServer_.path())},
        {"pods-plain.yaml",
         pod("plain", "client", "node1", kPlainClientIp, "fd00:10:244:1::20", "sleep infinity") +
             "---\n" +
             pod("plain", "server", "node2", kPlainServerIp, "fd00:10:244:2::20",
                 server + plainServer_.path())},
        {"web.sh", kWebScript},
        {"pods-web.yaml",
         [&] {
           PodSpec p;
           p.ns = "mesh", p.name = "web", p.node = "node2", p.ip4 = kMeshWebIp;
           p.ip6 = "fd00:10:244:2::11";
           p.command = "sh $WEFT_SIM_MANIFESTS/web.sh";
           p.readyPort = 80;
           return podYaml(p);
         }()},
        {"pods-live.yaml",
         pod("live", "client", "node1", "10.244.1.30", "fd00:10:244:1::30", "sleep infinity")},
    };
  }

  // Agents a test restarted log to files of their own.
  std::vector<std::pair<std::string, std::string>> extraLogs() const override {
    std::vector<std::pair<std::string, std::string>> out;
    for (const char* node : {"node1", "node2"}) {
      std::string restarted = cluster_->restartedAgentLog(node);
      if (fs::exists(restarted)) out.push_back({std::string(node) + " restarted agent", restarted});
    }
    return out;
  }

  // Connections opened as counted by `node`'s ztunnel with the given reporter.
  static double opened(const std::string& node, const std::string& reporter) {
    std::string err;
    auto m = cluster_->metrics(node, &err);
    if (!m) {
      ADD_FAILURE() << err;
      return -1;
    }
    return sumSamples(*m, kOpened, {{"reporter", reporter}});
  }

  // Waits until the counter reaches `expect` (metrics may trail the client by a moment), then
  // returns its value, which the caller compares for equality.
  static double openedReaching(const std::string& node, const std::string& reporter,
                               double expect, std::chrono::milliseconds limit = 5s) {
    double v = -1;
    eventually([&] { return (v = opened(node, reporter)) >= expect; }, limit, 250ms);
    return v;
  }

  // weft-echo-client in a pod; the parsed JSON summary (or an error description in "error").
  static Json echo(const std::string& pod, const std::string& target, int count,
                   uint64_t maxBytes, int concurrency, int seed,
                   std::chrono::milliseconds limit = 120s) {
    auto r = cluster_->exec(pod,
                            {echoClientPath(), "--target", target, "--count",
                             std::to_string(count), "--max-bytes", std::to_string(maxBytes),
                             "--concurrency", std::to_string(concurrency), "--seed",
                             std::to_string(seed)},
                            limit);
    auto j = Json::parse(r.out, nullptr, false);
    if (j.is_discarded() || !j.is_object()) {
      return Json{{"error", "echo client in " + pod + ": " + r.describe()}, {"ok", -1}};
    }
    j["exit_code"] = r.exitCode;
    return j;
  }

  static std::string target(const std::string& ip, int port) {
    return ip.find(':') != std::string::npos ? fmt::format("[{}]:{}", ip, port)
                                             : fmt::format("{}:{}", ip, port);
  }

  static inline ServerLog meshServer_;
  static inline ServerLog plainServer_;
  static inline ServerLog localServer_;
};

class MeshE2E : public MeshSim {};
class ResilienceE2E : public MeshSim {};

#define EXPECT_ECHO_OK(j, n)                                                         \
  do {                                                                               \
    EXPECT_EQ((j).value("ok", -1), (n)) << (j).dump();                               \
    EXPECT_EQ((j).value("mismatches", -1), 0) << (j).dump();                         \
    EXPECT_EQ((j).value("failures", -1), 0) << (j).dump();                           \
  } while (0)

// An enrolled client on node1 reaches an enrolled server on node2 through both ztunnels.
TEST_F(MeshE2E, CrossNodeConnectionIsMeshed) {
  constexpr int kConns = 5;
  size_t mark = meshServer_.mark();
  double src0 = opened("node1", "source");
  double dst0 = opened("node2", "destination");
  auto j = echo(kMeshClient, target(kMeshServerIp, kHashPort), kConns, 65536, 2, 1);
  EXPECT_ECHO_OK(j, kConns);
  EXPECT_EQ(openedReaching("node1", "source", src0 + kConns), src0 + kConns)
      << "node1's ztunnel must count each outbound connection once (reporter=source)";
  EXPECT_EQ(openedReaching("node2", "destination", dst0 + kConns), dst0 + kConns)
      << "node2's ztunnel must count each inbound connection once (reporter=destination)";
  auto seen = meshServer_.acceptedSince(mark);
  ASSERT_EQ(seen.size(), static_cast<size_t>(kConns));
  for (auto& a : seen) {
    EXPECT_EQ(a.peerIp, kMeshInboundSource) << "the app must see the mesh's inbound source";
    EXPECT_EQ(a.localPort, kHashPort);
  }
}

// curl to nginx across nodes from an enrolled pod: meshed, nginx sees the mesh's source.
TEST_F(MeshE2E, CurlToNginxAcrossNodesIsMeshed) {
  constexpr int kRequests = 3;
  double src0 = opened("node1", "source");
  for (int i = 0; i < kRequests; ++i) {
    auto r = cluster_->exec(kMeshClient, {"curl", "-sS", "--max-time", "10",
                                          fmt::format("http://{}:80/", kMeshWebIp)});
    EXPECT_EQ(r.exitCode, 0) << r.describe();
    EXPECT_EQ(r.out, fmt::format("client={}\n", kMeshInboundSource)) << r.describe();
  }
  EXPECT_EQ(openedReaching("node1", "source", src0 + kRequests), src0 + kRequests);
}

// A pod of a namespace without the label talks directly: no ztunnel counts it.
TEST_F(MeshE2E, NotEnrolledNamespaceIsNotRedirected) {
  constexpr int kConns = 3;
  size_t mark = plainServer_.mark();
  double n1 = opened("node1", "source") + opened("node1", "destination");
  double n2 = opened("node2", "source") + opened("node2", "destination");
  auto j = echo(kPlainClient, target(kPlainServerIp, kHashPort), kConns, 65536, 1, 2);
  EXPECT_ECHO_OK(j, kConns);
  std::this_thread::sleep_for(500ms);  // give a wrongly counted connection time to show
  EXPECT_EQ(opened("node1", "source") + opened("node1", "destination"), n1);
  EXPECT_EQ(opened("node2", "source") + opened("node2", "destination"), n2);
  auto seen = plainServer_.acceptedSince(mark);
  ASSERT_EQ(seen.size(), static_cast<size_t>(kConns));
  for (auto& a : seen) EXPECT_EQ(a.peerIp, kPlainClientIp) << "the server must see the caller";
}

// Plaintext from outside the mesh to an enrolled pod passes the destination's 15006 and
// arrives at the port it was sent to.
TEST_F(MeshE2E, PlaintextInboundGoesThroughZtunnelAndKeepsPort) {
  size_t mark = meshServer_.mark();
  double src0 = opened("node1", "source");
  double dst0 = opened("node2", "destination");
  auto a = echo(kPlainClient, target(kMeshServerIp, kHashPort), 2, 4096, 1, 3);
  auto b = echo(kPlainClient, target(kMeshServerIp, kHashPort2), 2, 4096, 1, 4);
  EXPECT_ECHO_OK(a, 2);
  EXPECT_ECHO_OK(b, 2);
  EXPECT_EQ(openedReaching("node2", "destination", dst0 + 4), dst0 + 4)
      << "node2's ztunnel must count the 4 plaintext inbound connections";
  EXPECT_EQ(opened("node1", "source"), src0) << "the caller is not enrolled";
  auto seen = meshServer_.acceptedSince(mark);
  ASSERT_EQ(seen.size(), 4u);
  std::multiset<int> ports;
  for (auto& s : seen) {
    EXPECT_EQ(s.peerIp, kMeshInboundSource);
    EXPECT_EQ(s.localIp, kMeshServerIp);
    ports.insert(s.localPort);
  }
  EXPECT_EQ(ports.count(kHashPort), 2u);
  EXPECT_EQ(ports.count(kHashPort2), 2u);
}

// One line through a long-lived socat connection and back.
::testing::AssertionResult roundTrip(Child& c, const std::string& line) {
  if (!c.send(line + "\n")) return ::testing::AssertionFailure() << "write to socat failed";
  auto got = c.readUntil(line + "\n", 10s);
  if (!got) return ::testing::AssertionFailure() << "no echo of '" << line << "'";
  return ::testing::AssertionSuccess();
}

// Labelling a namespace meshes its new connections within seconds without touching open
// ones; removing the label reverses that, and connections opened while meshed keep working.
TEST_F(MeshE2E, LiveEnrollmentAndLeaveKeepOpenConnections) {
  std::string err;
  struct Restore {
    ~Restore() {
      std::string e;
      if (cluster_) cluster_->writeLiveManifest("ns-live.yaml", namespaceYaml("live", false), &e);
    }
  } restore;
  auto socatArgv = cluster_->execArgv(
      kLiveClient, {"socat", "-T", "120", "-", fmt::format("TCP:{}:{}", kMeshServerIp,
                                                           kStreamPort)});
  auto meshedNow = [&](int seed) {
    double before = opened("node1", "source");
    auto j = echo(kLiveClient, target(kMeshServerIp, kHashPort), 1, 1024, 1, seed);
    if (j.value("ok", -1) != 1) {
      ADD_FAILURE() << j.dump();
      return false;
    }
    return openedReaching("node1", "source", before + 1, 1500ms) > before;
  };

  Child direct;
  ASSERT_TRUE(direct.start(socatArgv));
  ASSERT_TRUE(roundTrip(direct, "opened-before-enrollment"));
  ASSERT_FALSE(meshedNow(10)) << "namespace live is not enrolled yet";

  auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(cluster_->writeLiveManifest("ns-live.yaml", namespaceYaml("live", true), &err))
      << err;
  int seed = 11;
  ASSERT_TRUE(eventually([&] { return meshedNow(seed++); }, 10s, 100ms))
      << "new connections from namespace live not meshed 10 s after labelling it";
  auto took = std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::steady_clock::now() - t0);
  std::printf("enrollment took effect after %lld ms\n", static_cast<long long>(took.count()));
  double before = opened("node1", "source");
  auto j = echo(kLiveClient, target(kMeshServerIp, kHashPort), 3, 4096, 1, 30);
  EXPECT_ECHO_OK(j, 3);
  EXPECT_EQ(openedReaching("node1", "source", before + 3), before + 3);
  EXPECT_TRUE(roundTrip(direct, "direct-still-works-after-enrollment"));

  before = opened("node1", "source");
  Child meshed;
  ASSERT_TRUE(meshed.start(socatArgv));
  ASSERT_TRUE(roundTrip(meshed, "opened-while-enrolled"));
  EXPECT_EQ(openedReaching("node1", "source", before + 1), before + 1)
      << "the second long-lived connection must be meshed";

  ASSERT_TRUE(cluster_->writeLiveManifest("ns-live.yaml", namespaceYaml("live", false), &err))
      << err;
  ASSERT_TRUE(eventually([&] { return !meshedNow(seed++); }, 10s, 100ms))
      << "new connections still meshed 10 s after removing the label";
  before = opened("node1", "source");
  j = echo(kLiveClient, target(kMeshServerIp, kHashPort), 3, 4096, 1, 40);
  EXPECT_ECHO_OK(j, 3);
  std::this_thread::sleep_for(500ms);
  EXPECT_EQ(opened("node1", "source"), before) << "left namespace still redirected";

  EXPECT_TRUE(roundTrip(meshed, "meshed-still-works-after-leave"));
  EXPECT_TRUE(roundTrip(direct, "direct-still-works-after-leave"));
  for (auto* c : {&direct, &meshed}) {
    std::string out;
    auto code = c->wait(15s, &out);
    EXPECT_TRUE(code.has_value() && *code == 0) << "socat did not end cleanly: " << out;
  }
}

// 1000 connections of up to 4 MiB each, 8 at a time, across nodes: every byte comes back.
TEST_F(MeshE2E, IntegrityOfThousandConnections) {
  constexpr int kConns = 1000;
  double src0 = opened("node1", "source");
  auto j = echo(kMeshClient, target(kMeshServerIp, kHashPort), kConns, 4u << 20, 8, 42, 360s);
  EXPECT_ECHO_OK(j, kConns);
  std::printf("integrity: %s\n", j.dump().c_str());
  EXPECT_EQ(openedReaching("node1", "source", src0 + kConns), src0 + kConns)
      << "all of them must have gone through the mesh";
}

// Two enrolled pods on one node: the first connection of the pair takes the ztunnel path (which
// decides it and caches the verdict), the next ones go app to app in the kernel. 200 connections
// of random data up to 4 MiB with half-close keep every byte; each is counted once per reporter
// with its exact bytes; a DENY policy clears the cache so the next connection is denied, and
// removing it lets the pair back on the fast path.
TEST_F(MeshE2E, SameNodeFastPathKeepsEveryByteAndCountsThemExactly) {
  std::string local = target(kLocalServerIp, kHashPort);
  size_t mark = localServer_.mark();
  auto first = echo(kMeshClient, local, 1, 1024, 1, 7);
  EXPECT_ECHO_OK(first, 1);
  auto seen = localServer_.acceptedSince(mark);
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(seen[0].peerIp, kMeshInboundSource) << "the pair's first connection: ztunnel path";
  auto fp = ztunnelAdmin("node1", "/fast_path");
  ASSERT_TRUE(fp);
  ASSERT_EQ((*fp)["state"], "on") << fp->dump();
  EXPECT_GE((*fp)["cached_verdicts"].get<int>(), 1) << fp->dump();
  uint64_t fast0 = (*fp)["connections"].get<uint64_t>();

  auto metric = [&](const char* name, const char* reporter) {
    std::string err;
    auto m = cluster_->metrics("node1", &err);
    if (!m) return -1.0;
    return sumSamples(*m, name,
                      {{"reporter", reporter}, {"destination_workload", "local"}});
  };
  double closedSrc0 = metric("istio_tcp_connections_closed_total", "source");
  double closedDst0 = metric("istio_tcp_connections_closed_total", "destination");
  double upSrc0 = metric("istio_tcp_received_bytes_total", "source");
  double downSrc0 = metric("istio_tcp_sent_bytes_total", "source");
  double upDst0 = metric("istio_tcp_received_bytes_total", "destination");

  constexpr int kConns = 200;
  mark = localServer_.mark();
  auto j = echo(kMeshClient, local, kConns, 4u << 20, 8, 43, 240s);
  EXPECT_ECHO_OK(j, kConns);
  seen = localServer_.acceptedSince(mark);
  ASSERT_EQ(seen.size(), static_cast<size_t>(kConns));
  for (const auto& a : seen)
    ASSERT_EQ(a.peerIp, kMeshClientIp) << "on the fast path the app sees the client pod itself";

  // Counted once per reporter when each closes, with the bytes the client moved.
  double want = closedSrc0 + kConns;
  eventually([&] { return metric("istio_tcp_connections_closed_total", "source") >= want; }, 5s);
  EXPECT_EQ(metric("istio_tcp_connections_closed_total", "source"), want);
  EXPECT_EQ(metric("istio_tcp_connections_closed_total", "destination"), closedDst0 + kConns);
  double sent = j.value("bytes_sent", 0.0), received = j.value("bytes_received", 0.0);
  EXPECT_GT(sent, 0);
  EXPECT_EQ(metric("istio_tcp_received_bytes_total", "source") - upSrc0, sent)
      << "source -> destination bytes, as the kernel counted them";
  EXPECT_EQ(metric("istio_tcp_sent_bytes_total", "source") - downSrc0, received);
  EXPECT_EQ(metric("istio_tcp_received_bytes_total", "destination") - upDst0, sent);
  fp = ztunnelAdmin("node1", "/fast_path");
  ASSERT_TRUE(fp);
  EXPECT_EQ((*fp)["connections"].get<uint64_t>() - fast0, static_cast<uint64_t>(kConns));
  EXPECT_EQ((*fp)["fallbacks"].get<uint64_t>(), 0u) << fp->dump();

  // A policy change clears every cached verdict: the DENY holds for the very next connection.
  std::string err;
  ASSERT_TRUE(cluster_->writeLiveManifest("fast-path-deny.yaml", R"(apiVersion: security.weft.dev/v1
kind: AuthorizationPolicy
metadata: {name: deny-client-to-local, namespace: mesh}
spec:
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/mesh/sa/default"]}}]
    to: [{operation: {ports: ["8081"]}}]
)",
                                          &err))
      << err;
  std::string local2 = target(kLocalServerIp, kHashPort2);
  // Removed however this test ends: the other tests use 8081 too.
  struct RemoveOnExit {
    ~RemoveOnExit() { cluster_->removeLiveManifest("fast-path-deny.yaml"); }
  } remove_on_exit;
  bool denied = eventually(
      [&] { return echo(kMeshClient, local2, 1, 1024, 1, 9).value("ok", -1) == 0; }, 10s, 300ms);
  EXPECT_TRUE(denied) << "the DENY must reach the pair that went fast";
  mark = localServer_.mark();
  auto d = echo(kMeshClient, local2, 3, 1024, 1, 10);
  EXPECT_EQ(d.value("ok", -1), 0) << d.dump();
  EXPECT_TRUE(localServer_.acceptedSince(mark).empty()) << "denied connections never reach it";
  EXPECT_TRUE(cluster_->removeLiveManifest("fast-path-deny.yaml"));
  EXPECT_TRUE(eventually(
      [&] { return echo(kMeshClient, local2, 1, 1024, 1, 11).value("ok", -1) == 1; }, 10s,
      300ms));
  mark = localServer_.mark();
  auto again = echo(kMeshClient, local2, 2, 1024, 1, 12);
  EXPECT_ECHO_OK(again, 2);
  seen = localServer_.acceptedSince(mark);
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_EQ(seen[1].peerIp, kMeshClientIp) << "allowed again: back on the fast path";

  // A live fast connection as weftctl shows it: `connection list` has it with path fast and
  // both identities (the kernel attests them), `status` has the fast path on. The pair's first
  // connection to the stream port takes the ztunnel path; the second is the fast one.
  auto socatArgv = cluster_->execArgv(
      kMeshClient, {"socat", "-T", "60", "-", fmt::format("TCP:{}:{}", kLocalServerIp,
                                                          kStreamPort)});
  {
    Child warm;
    ASSERT_TRUE(warm.start(socatArgv));
    ASSERT_TRUE(roundTrip(warm, "warm-up-through-the-ztunnel"));
    warm.closeStdin();
    std::string out;
    warm.wait(15s, &out);
  }
  Child live;
  ASSERT_TRUE(live.start(socatArgv));
  ASSERT_TRUE(roundTrip(live, "live-on-the-fast-path"));
  std::string weftctl = buildDir() + "/cli/weftctl";
  std::string dst = target(kLocalServerIp, kStreamPort);
  Json fastEntry;
  EXPECT_TRUE(eventually(
      [&] {
        auto r = cluster_->onNode("node1", {weftctl, "-j", "connection", "list", "--pod",
                                            "mesh/local"});
        auto j = Json::parse(r.out, nullptr, false);
        if (!j.is_array()) return false;
        for (const auto& c : j)
          if (c.value("dst", "") == dst && c.value("path", "") == "fast") fastEntry = c;
        return !fastEntry.is_null();
      },
      5s));
  EXPECT_EQ(fastEntry.value("source_workload", ""), "mesh/client") << fastEntry.dump();
  EXPECT_EQ(fastEntry.value("source_identity", ""), "spiffe://cluster.local/ns/mesh/sa/default");
  EXPECT_EQ(fastEntry.value("destination_identity", ""),
            "spiffe://cluster.local/ns/mesh/sa/default");
  auto table = cluster_->onNode("node1", {weftctl, "connection", "list", "--pod", "mesh/local"});
  EXPECT_NE(table.out.find(" fast "), std::string::npos) << table.out;
  auto status = cluster_->onNode("node1", {weftctl, "-j", "status"});
  auto sj = Json::parse(status.out, nullptr, false);
  ASSERT_TRUE(sj.is_object()) << status.describe();
  EXPECT_EQ(sj["fast_path"]["state"], "on") << sj.dump();
  EXPECT_GE(sj["fast_path"]["active_connections"].get<int>(), 1) << sj.dump();
  auto statusTable = cluster_->onNode("node1", {weftctl, "status"});
  EXPECT_NE(statusTable.out.find("fast path"), std::string::npos) << statusTable.out;
  EXPECT_TRUE(roundTrip(live, "still-live"));
  live.closeStdin();
  std::string out;
  auto code = live.wait(15s, &out);
  EXPECT_TRUE(code.has_value() && *code == 0) << "socat did not end cleanly: " << out;
}

// One meshed cross-node connection over IPv6.
TEST_F(MeshE2E, Ipv6CrossNodeIsMeshed) {
  size_t mark = meshServer_.mark();
  double src0 = opened("node1", "source");
  auto j = echo(kMeshClient, target(kMeshServerIp6, kHashPort), 1, 65536, 1, 5);
  EXPECT_ECHO_OK(j, 1);
  EXPECT_EQ(openedReaching("node1", "source", src0 + 1), src0 + 1);
  auto seen = meshServer_.acceptedSince(mark);
  ASSERT_EQ(seen.size(), 1u);
  // ARCHITECTURE.md: for IPv6 the ztunnel connects to the app from the pod's own address.
  EXPECT_EQ(seen[0].peerIp, kMeshServerIp6);
  EXPECT_EQ(seen[0].localIp, kMeshServerIp6);
}

// --- resilience: agent restart and bad input -------------------------------------------------

// What the node's BPF state is, as IDs: every pinned prog and link, and every program attached
// to the node's cgroup root. A second copy shows as new IDs in either.
struct BpfState {
  std::map<std::string, int> pins;              // path relative to the pin dir -> id
  std::multiset<std::string> cgroupAttachments;  // "attach_type:id"
  bool operator==(const BpfState& o) const {
    return pins == o.pins && cgroupAttachments == o.cgroupAttachments;
  }
  std::string describe() const {
    std::string s = "pins:";
    for (auto& [p, id] : pins) s += fmt::format(" {}={}", p, id);
    s += "; cgroup:";
    for (auto& a : cgroupAttachments) s += " " + a;
    return s;
  }
};

std::optional<Json> bpftoolJson(const std::vector<std::string>& args, std::string* err) {
  std::vector<std::string> argv = {"bpftool", "-j"};
  argv.insert(argv.end(), args.begin(), args.end());
  auto r = run(argv, withTimeout(20s));
  auto j = Json::parse(r.out, nullptr, false);
  if (r.exitCode != 0 || j.is_discarded()) {
    *err = "bpftool " + fmt::format("{}", fmt::join(args, " ")) + ": " + r.describe();
    return std::nullopt;
  }
  return j;
}

std::optional<std::string> cgroup2Mount() {
  std::ifstream in("/proc/mounts");
  std::string dev, dir, type, rest;
  while (in >> dev >> dir >> type && std::getline(in, rest)) {
    if (type == "cgroup2") return dir;
  }
  return std::nullopt;
}

std::optional<BpfState> bpfState(SimCluster& c, const std::string& node, std::string* err) {
  BpfState st;
  auto pinDir = c.pinDir(node);
  if (!pinDir || !fs::is_directory(*pinDir)) {
    *err = "no pin directory for " + node + " (" + pinDir.value_or("?") + ")";
    return std::nullopt;
  }
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(*pinDir, ec);
       !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (it->is_directory()) continue;
    std::string rel = fs::relative(it->path(), *pinDir).string();
    std::string top = rel.substr(0, rel.find('/'));
    std::optional<Json> j;
    if (top == "progs") {
      j = bpftoolJson({"prog", "show", "pinned", it->path().string()}, err);
    } else if (top == "links" || top == "netns") {
      j = bpftoolJson({"link", "show", "pinned", it->path().string()}, err);
    } else {
      continue;  // maps and the abi file: their IDs do not tell a second copy apart
    }
    if (!j) return std::nullopt;
    st.pins[rel] = j->value("id", -1);
  }
  if (st.pins.empty()) {
    *err = "no programs or links pinned under " + *pinDir;
    return std::nullopt;
  }
  auto cg = c.nodeCgroup(node);
  if (!cg) {
    auto mount = cgroup2Mount();
    if (!mount) {
      *err = "no cgroup2 mount";
      return std::nullopt;
    }
    cg = *mount + "/weft-" + c.name() + "/" + node;  // ARCHITECTURE.md "The sim"
  }
  auto j = bpftoolJson({"cgroup", "show", *cg}, err);
  if (!j) return std::nullopt;
  for (auto& a : *j) {
    st.cgroupAttachments.insert(a.value("attach_type", "?") + ":" +
                                std::to_string(a.value("id", -1)));
  }
  if (st.cgroupAttachments.empty()) {
    *err = "nothing attached to " + *cg;
    return std::nullopt;
  }
  return st;
}

// IDs of the BPF programs `pid` holds open, directly or through a link, read from
// /proc/<pid>/fdinfo (bpftool's "pids" field needs a bpftool built with that feature).
std::set<int> progsHeldBy(int pid) {
  std::set<int> ids;
  std::error_code ec;
  for (auto it = fs::directory_iterator(fmt::format("/proc/{}/fd", pid), ec);
       !ec && it != fs::directory_iterator(); it.increment(ec)) {
    std::error_code lec;
    auto target = fs::read_symlink(it->path(), lec).string();
    if (target.find("bpf-prog") == std::string::npos &&
        target.find("bpf_link") == std::string::npos) {
      continue;
    }
    std::ifstream info(fmt::format("/proc/{}/fdinfo/{}", pid, it->path().filename().string()));
    std::string key;
    while (info >> key) {
      if (key == "prog_id:") {
        int id = -1;
        info >> id;
        ids.insert(id);
      }
    }
  }
  return ids;
}

bool processGone(int pid) {
  std::ifstream in(fmt::format("/proc/{}/stat", pid));
  if (!in) return true;
  std::string statLine;
  std::getline(in, statLine);
  size_t paren = statLine.rfind(')');
  return paren != std::string::npos && paren + 2 < statLine.size() &&
         statLine[paren + 2] == 'Z';
}

// SIGKILL the agent while a client opens a connection every 50 ms; restart it: nothing fails,
// and the restarted agent adopts the pinned programs instead of loading a second copy.
TEST_F(ResilienceE2E, AgentKillAndRestartLosesNothing) {
  std::string err;
  auto before = bpfState(*cluster_, "node1", &err);
  ASSERT_TRUE(before) << err;
  auto pid = cluster_->agentPid("node1");
  ASSERT_TRUE(pid) << "no nodes[node1].agent.pid in scripts/sim status --json";
  auto heldBefore = progsHeldBy(*pid);

  double src0 = opened("node1", "source");
  Child client;
  ASSERT_TRUE(client.start(cluster_->execArgv(
      kMeshClient, {echoClientPath(), "--target", target(kMeshServerIp, kHashPort),
                    "--interval-ms", "50", "--duration-s", "8", "--max-bytes", "16384",
                    "--concurrency", "32", "--seed", "9", "--timeout-s", "20"})));
  std::this_thread::sleep_for(1500ms);
  ASSERT_EQ(::kill(*pid, SIGKILL), 0) << "kill agent pid " << *pid << ": " << strerror(errno);
  ASSERT_TRUE(eventually([&] { return processGone(*pid); }, 5s, 50ms)) << "agent still alive";
  std::this_thread::sleep_for(1500ms);  // connections keep coming while the agent is down
  ASSERT_TRUE(cluster_->restartAgent("node1", &err)) << err;
  EXPECT_TRUE(eventually(
      [&] { return cluster_->agentAdmin("node1", "/status").has_value(); }, 15s, 200ms))
      << "restarted agent does not answer /status within 15 s";

  std::string out;
  auto code = client.wait(60s, &out);
  auto j = Json::parse(out.substr(out.find('{') == std::string::npos ? 0 : out.find('{')),
                       nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << "client output: " << out;
  EXPECT_TRUE(code && *code == 0) << out;
  EXPECT_EQ(j.value("failures", -1), 0) << out;
  EXPECT_EQ(j.value("mismatches", -1), 0) << out;
  EXPECT_GE(j.value("connections", 0), 140) << out;
  EXPECT_EQ(openedReaching("node1", "source", src0 + j.value("connections", 0)),
            src0 + j.value("connections", 0))
      << "every connection, also those while the agent was down, must be meshed";

  auto after = bpfState(*cluster_, "node1", &err);
  ASSERT_TRUE(after) << err;
  std::printf("client: %s\nBPF before: %s\nBPF after:  %s\n", j.dump().c_str(),
              before->describe().c_str(), after->describe().c_str());
  EXPECT_EQ(*before, *after) << "before: " << before->describe()
                             << "\nafter:  " << after->describe();
  auto newPid = cluster_->agentPid("node1");
  if (newPid && *newPid != *pid) {
    auto held = progsHeldBy(*newPid);
    std::printf("old agent held %zu Weft programs, restarted agent (pid %d) holds %zu\n",
                heldBefore.size(), *newPid, held.size());
    std::set<int> known;
    for (auto& [path, id] : before->pins) known.insert(id);
    for (int id : heldBefore) known.insert(id);
    for (int id : held) {
      EXPECT_TRUE(known.count(id)) << "restarted agent holds a new program id " << id
                                   << ": a second copy was loaded";
    }
  }
  // Still meshed after the restart.
  double s1 = opened("node1", "source");
  auto k = echo(kMeshClient, target(kMeshServerIp, kHashPort), 3, 4096, 1, 99);
  EXPECT_ECHO_OK(k, 3);
  EXPECT_EQ(openedReaching("node1", "source", s1 + 3), s1 + 3);
}

// Malformed manifests are reported by file, object and field, and change nothing.
TEST_F(ResilienceE2E, MalformedManifestsAreReportedAndLastGoodStateStays) {
  std::string err;
  struct Restore {
    ~Restore() {
      std::string e;
      if (!cluster_) return;
      cluster_->writeLiveManifest("ns-mesh.yaml", namespaceYaml("mesh", true), &e);
      for (auto f : {"bad-syntax.yaml", "bad-kind.yaml", "bad-pod.yaml"}) {
        cluster_->removeLiveManifest(f);
      }
    }
  } restore;
  const std::string badSyntax =
      "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: [unclosed\n  labels: {a: b\n";
  const std::string badKind =
      "apiVersion: v1\nkind: Frobnicator\nmetadata:\n  name: frob\n  namespace: mesh\n";
  const std::string badPod =
      "apiVersion: v1\nkind: Pod\nmetadata:\n  name: nonode\n  namespace: mesh\n"
      "spec:\n  containers:\n  - name: app\n    image: x\nstatus:\n  podIPs:\n"
      "  - ip: 10.244.1.99\n";
  ASSERT_TRUE(cluster_->writeLiveManifest("bad-syntax.yaml", badSyntax, &err)) << err;
  ASSERT_TRUE(cluster_->writeLiveManifest("bad-kind.yaml", badKind, &err)) << err;
  ASSERT_TRUE(cluster_->writeLiveManifest("bad-pod.yaml", badPod, &err)) << err;
  // The good file that enrolls namespace mesh, broken: its last good objects must stay.
  ASSERT_TRUE(cluster_->writeLiveManifest("ns-mesh.yaml", badSyntax, &err)) << err;

  std::string body;
  bool all = eventually(
      [&] {
        auto b = cluster_->agentAdmin("node1", "/config-errors", &err);
        body = b.value_or("");
        for (auto f : {"bad-syntax.yaml", "bad-kind.yaml", "bad-pod.yaml", "ns-mesh.yaml"}) {
          if (body.find(f) == std::string::npos) return false;
        }
        return true;
      },
      10s, 250ms);
  ASSERT_TRUE(all) << "node1 /config-errors does not name all four files within 10 s: " << body
                   << " " << err;
  EXPECT_NE(body.find("Frobnicator"), std::string::npos) << "unknown kind not named: " << body;
  EXPECT_NE(body.find("frob"), std::string::npos) << "object not named: " << body;
  EXPECT_NE(body.find("nonode"), std::string::npos) << "pod not named: " << body;
  EXPECT_NE(body.find("nodeName"), std::string::npos) << "field not named: " << body;
  std::printf("/config-errors: %s\n", body.c_str());

  // Last good state: mesh/client is still a workload and still meshed.
  auto workloads = cluster_->agentAdmin("node1", "/workloads", &err);
  ASSERT_TRUE(workloads) << err;
  EXPECT_NE(workloads->find(kMeshClientIp), std::string::npos)
      << "mesh/client no longer a workload on node1: " << *workloads;
  size_t mark = meshServer_.mark();
  double src0 = opened("node1", "source");
  auto j = echo(kMeshClient, target(kMeshServerIp, kHashPort), 3, 4096, 1, 50);
  EXPECT_ECHO_OK(j, 3);
  EXPECT_EQ(openedReaching("node1", "source", src0 + 3), src0 + 3);
  for (auto& a : meshServer_.acceptedSince(mark)) EXPECT_EQ(a.peerIp, kMeshInboundSource);

  // Fixing the files clears the errors.
  ASSERT_TRUE(cluster_->writeLiveManifest("ns-mesh.yaml", namespaceYaml("mesh", true), &err));
  for (auto f : {"bad-syntax.yaml", "bad-kind.yaml", "bad-pod.yaml"}) {
    cluster_->removeLiveManifest(f);
  }
  EXPECT_TRUE(eventually(
      [&] {
        body = cluster_->agentAdmin("node1", "/config-errors", &err).value_or("?");
        return body.find(".yaml") == std::string::npos;
      },
      10s, 250ms))
      << "errors not cleared after fixing the files: " << body;
}

// weft-cni ADD with a netns that does not exist (or is not a netns) fails with CNI error JSON.
TEST_F(ResilienceE2E, CniAddWithMissingNetnsFails) {
  auto sock = cluster_->agentSocket("node1", "cni");
  ASSERT_TRUE(sock) << "no nodes[node1].agent.cni_socket in scripts/sim status --json";
  std::string cni = buildDir() + "/cni/weft-cni";
  ASSERT_TRUE(fs::exists(cni)) << cni << " not built";
  std::string notNetns = logDir_ + "/not-a-netns";
  std::ofstream(notNetns) << "plain file\n";
  for (std::string netns : {std::string("/var/run/netns/weft-e2e-does-not-exist"), notNetns}) {
    RunOptions o;
    o.timeout = 30s;
    o.env = {{"CNI_COMMAND", "ADD"},
             {"CNI_CONTAINERID", "e2e-bogus"},
             {"CNI_NETNS", netns},
             {"CNI_IFNAME", "eth0"},
             {"CNI_PATH", "/opt/cni/bin"},
             {"CNI_ARGS", "K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=ghost;K8S_POD_UID=e2e-ghost"}};
    o.stdinText = Json{{"cniVersion", "1.0.0"},
                       {"name", "weft"},
                       {"type", "weft-cni"},
                       {"agent_socket", *sock},
                       {"timeout_seconds", 10}}
                      .dump();
    auto r = run({cni}, o);
    EXPECT_NE(r.exitCode, 0) << "CNI_NETNS=" << netns << ": " << r.describe();
    auto j = Json::parse(r.out, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << "no JSON on stdout for CNI_NETNS=" << netns << ": "
                                   << r.describe();
    EXPECT_TRUE(j.contains("code") && j["code"].is_number_integer()) << j.dump();
    EXPECT_TRUE(j.contains("msg") && j["msg"].is_string()) << j.dump();
    std::printf("CNI_NETNS=%s -> exit %d %s\n", netns.c_str(), r.exitCode, r.out.c_str());
  }
  std::string err;
  EXPECT_TRUE(cluster_->agentAdmin("node1", "/status", &err)) << err;
}

// Junk on the node-protocol socket closes that connection; the agent keeps serving.
TEST_F(ResilienceE2E, GarbageOnNodeProtocolSocketIsDropped) {
  auto path = cluster_->agentSocket("node1", "ztunnel");
  ASSERT_TRUE(path) << "no nodes[node1].agent.ztunnel_socket in scripts/sim status --json";
  std::string err;
  auto statusBefore = cluster_->agentAdmin("node1", "/status", &err);
  ASSERT_TRUE(statusBefore) << err;
  auto sb = Json::parse(*statusBefore, nullptr, false);
  int protocolErrors0 = sb.is_discarded() ? -1 : sb["ztunnel"].value("protocol_errors", -1);
  int fd = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  ASSERT_LT(path->size(), sizeof(sa.sun_path));
  std::memcpy(sa.sun_path, path->c_str(), path->size());
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)), 0)
      << "connect " << *path << ": " << strerror(errno);
  std::string junk = "\xff\xff\xff\x0f not a protobuf \x01\x02\x03";
  junk.append(200, '\xa5');
  EXPECT_EQ(::send(fd, junk.data(), junk.size(), MSG_NOSIGNAL), static_cast<ssize_t>(junk.size()));
  timeval tv{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  // The agent may answer nothing or an error first; within 5 s it must close.
  bool closed = false;
  for (int i = 0; i < 16 && !closed; ++i) {
    char buf[65536];
    ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n == 0 || (n < 0 && errno == ECONNRESET)) closed = true;
    if (n < 0 && errno != ECONNRESET) break;  // timeout
  }
  ::close(fd);
  EXPECT_TRUE(closed) << "the agent kept the connection open after a datagram that does not parse";

  auto statusAfter = cluster_->agentAdmin("node1", "/status", &err);
  ASSERT_TRUE(statusAfter) << "agent stopped answering after the junk: " << err;
  // The agent's /status (agent/admin.cc): its real ztunnel is still connected, and the junk
  // was counted as a protocol error.
  auto after = Json::parse(*statusAfter, nullptr, false);
  ASSERT_FALSE(after.is_discarded()) << *statusAfter;
  EXPECT_EQ(after["ztunnel"].value("connected", false), true) << *statusAfter;
  EXPECT_GT(after["ztunnel"].value("protocol_errors", -1), protocolErrors0) << *statusAfter;
  auto ready = cluster_->onNode("node1", {"curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                          "--max-time", "5",
                                          "http://127.0.0.1:15021/healthz/ready"});
  EXPECT_EQ(ready.out, "200") << "node1 ztunnel not ready: " << ready.describe();
  double src0 = opened("node1", "source");
  auto j = echo(kMeshClient, target(kMeshServerIp, kHashPort), 2, 4096, 1, 60);
  EXPECT_ECHO_OK(j, 2);
  EXPECT_EQ(openedReaching("node1", "source", src0 + 2), src0 + 2);
}

// The multi-loop ztunnel (its default: one loop per CPU) in the sim: node1's ztunnel accepts a
// meshed client's connections on more than one loop (per-loop counters in /config_dump), every
// byte arrives, and the merged istio_tcp_connections_closed_total grows by exactly N on both
// nodes, as the per-loop counters sum to N.
TEST_F(MeshE2E, MultiLoopZtunnelServesMeshedTrafficOnEveryLoop) {
  constexpr int kConns = 200;
  auto perLoop = [&](const std::string& node, const char* counter) {
    std::vector<uint64_t> out;
    auto dump = ztunnelAdmin(node, "/config_dump");
    if (!dump) return out;
    for (const auto& l : (*dump)["loops"]) out.push_back(l["stats"].value(counter, uint64_t{0}));
    return out;
  };
  auto closed = [&](const std::string& node, const std::string& reporter) {
    return metric(node, "istio_tcp_connections_closed_total",
                  {{"reporter", reporter}, {"destination_workload", "server"},
                   {"source_workload", "client"}});
  };
  std::vector<uint64_t> out0 = perLoop("node1", "outbound_accepted_total");
  std::vector<uint64_t> in0 = perLoop("node2", "hbone_inbound_streams_total");
  if (out0.size() < 2) {
    GTEST_SKIP() << "node1's ztunnel runs " << out0.size()
                 << " loop(s): its default is one per CPU and this machine has fewer than 2";
  }
  ASSERT_EQ(in0.size(), out0.size());
  auto stats = ztunnelAdmin("node1", "/stats");
  ASSERT_TRUE(stats);
  EXPECT_EQ((*stats)["loops"].get<size_t>(), out0.size());
  double src0 = closed("node1", "source"), dst0 = closed("node2", "destination");

  auto j = echo(kMeshClient, target(kMeshServerIp, kHashPort), kConns, 65536, 8, 7);
  EXPECT_ECHO_OK(j, kConns);

  // Exact over all loops: each connection closed once on each side.
  double src = -1, dst = -1;
  eventually([&] { return (src = closed("node1", "source")) >= src0 + kConns; }, 10s, 250ms);
  eventually([&] { return (dst = closed("node2", "destination")) >= dst0 + kConns; }, 10s, 250ms);
  EXPECT_EQ(src, src0 + kConns);
  EXPECT_EQ(dst, dst0 + kConns);

  std::vector<uint64_t> out1 = perLoop("node1", "outbound_accepted_total");
  std::vector<uint64_t> in1 = perLoop("node2", "hbone_inbound_streams_total");
  ASSERT_EQ(out1.size(), out0.size());
  ASSERT_EQ(in1.size(), in0.size());
  uint64_t out_sum = 0, in_sum = 0;
  int loops_used = 0;
  for (size_t i = 0; i < out1.size(); ++i) {
    out_sum += out1[i] - out0[i];
    in_sum += in1[i] - in0[i];
    if (out1[i] > out0[i]) loops_used++;
    std::printf("node1 loop %zu accepted %llu; node2 loop %zu served %llu streams\n", i,
                static_cast<unsigned long long>(out1[i] - out0[i]), i,
                static_cast<unsigned long long>(in1[i] - in0[i]));
  }
  EXPECT_EQ(out_sum, static_cast<uint64_t>(kConns));
  EXPECT_EQ(in_sum, static_cast<uint64_t>(kConns));
  EXPECT_GE(loops_used, 2) << "node1's outbound connections all landed on one loop";

  // Plaintext inbound (a caller outside the mesh): sk_lookup assigns the main loop's 15006
  // socket, and the kernel's reuseport selection spreads the connections over its group.
  constexpr int kPlain = 40;
  std::vector<uint64_t> pin0 = perLoop("node2", "inbound_accepted_total");
  auto p = echo(kPlainClient, target(kMeshServerIp, kHashPort), kPlain, 4096, 4, 8);
  EXPECT_ECHO_OK(p, kPlain);
  std::vector<uint64_t> pin1 = perLoop("node2", "inbound_accepted_total");
  ASSERT_EQ(pin1.size(), pin0.size());
  uint64_t plain_sum = 0;
  int plain_loops = 0;
  for (size_t i = 0; i < pin1.size(); ++i) {
    plain_sum += pin1[i] - pin0[i];
    if (pin1[i] > pin0[i]) plain_loops++;
    std::printf("node2 loop %zu accepted %llu plaintext inbound\n", i,
                static_cast<unsigned long long>(pin1[i] - pin0[i]));
  }
  EXPECT_EQ(plain_sum, static_cast<uint64_t>(kPlain));
  EXPECT_GE(plain_loops, 2) << "sk_lookup's assigned socket was not spread over its group";

  // The workers' access-log lines and verdicts reached the main loop: none was dropped at its
  // mailbox, and the counter that would say so is exported.
  for (const char* node : {"node1", "node2"}) {
    auto text = cluster_->metrics(node);
    ASSERT_TRUE(text) << node << " metrics";
    EXPECT_NE(text->find("\nweft_ztunnel_loop_reports_dropped_total 0\n"), std::string::npos)
        << node;
  }
}

}  // namespace
}  // namespace weft::e2e
