// End-to-end observability on a 2-node sim: a live scrape of 15020 passes `promtool check
// metrics`; N meshed cross-node connections of known size move Istio's TCP counters by exactly N
// and N*S / N*R on both reporters and write exactly N access-log lines per side (text, then
// JSON); a denied connection is logged with its error and counted as failed; no key material in
// any admin output; log levels change at run time on agent and ztunnel; the agent's /status
// lists kernel features and certificate health; /connections shows a live connection; the
// access log renamed away and SIGHUP to the ztunnel: the next line is in a new file at the path.
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <regex>
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

// node1: obs/client (enrolled). node2: obs/server (enrolled; app=echo; 8080 hash, 8081 hash but
// denied by policy, 9090 stream) behind Service obs/echo (10.96.50.1:80 -> 8080).
constexpr const char* kClient = "obs/client";
constexpr const char* kServerIp = "10.244.2.10";
constexpr const char* kServiceVip = "10.96.50.1";
constexpr const char* kClientIdentity = "spiffe://cluster.local/ns/obs/sa/client";
constexpr const char* kServerIdentity = "spiffe://cluster.local/ns/obs/sa/server";
constexpr const char* kServiceHost = "echo.obs.svc.cluster.local";

std::string readFrom(const std::string& path, std::streamoff offset) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "";
  in.seekg(offset);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::streamoff sizeOf(const std::string& path) {
  std::error_code ec;
  auto n = fs::file_size(path, ec);
  return ec ? 0 : static_cast<std::streamoff>(n);
}

std::vector<std::string> linesOf(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string l; std::getline(in, l);)
    if (!l.empty()) out.push_back(l);
  return out;
}

// key=value fields of a text access-log line (after the tab-separated head); string values are
// quoted with \" \\ \n escapes.
std::map<std::string, std::string> textFields(const std::string& line) {
  std::map<std::string, std::string> f;
  size_t tab = line.rfind('\t');
  std::string rest = tab == std::string::npos ? line : line.substr(tab + 1);
  size_t i = 0;
  while (i < rest.size()) {
    size_t eq = rest.find('=', i);
    if (eq == std::string::npos) break;
    std::string key = rest.substr(i, eq - i), val;
    size_t j = eq + 1;
    if (j < rest.size() && rest[j] == '"') {
      for (++j; j < rest.size() && rest[j] != '"'; ++j) {
        if (rest[j] == '\\' && j + 1 < rest.size()) {
          char e = rest[++j];
          val += e == 'n' ? '\n' : e;
        } else {
          val += rest[j];
        }
      }
      ++j;
    } else {
      for (; j < rest.size() && rest[j] != ' '; ++j) val += rest[j];
    }
    f[key] = val;
    i = j + 1;
  }
  f["level"] = line.substr(line.find('\t') + 1, line.find('\t', line.find('\t') + 1) -
                                                    line.find('\t') - 1);
  return f;
}

// A JSON access-log line as the same string map (numbers as text, null = absent).
std::map<std::string, std::string> jsonFields(const std::string& line) {
  std::map<std::string, std::string> f;
  auto j = Json::parse(line, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return f;
  for (auto& [k, v] : j.items()) {
    if (v.is_null()) continue;
    f[k] = v.is_string() ? v.get<std::string>() : v.dump();
  }
  return f;
}

class ObservabilityE2E : public SimSuite<ObservabilityE2E> {
 protected:
  static void SetUpTestSuite() {
    setupError_.clear();
    if (::geteuid() != 0) return;
    if (!bringUp(fmt::format("obs{}", ::getpid()), 2, manifests())) return;
    std::string err;
    auto st = cluster_->status(&err);
    if (!st) {
      setupError_ = err;
      return;
    }
    status_ = *st;
  }

  std::vector<std::pair<std::string, std::string>> extraLogs() const override {
    return {{"node1 access log", accessLog("node1")}, {"node2 access log", accessLog("node2")}};
  }

  static std::vector<ManifestFile> manifests() {
    std::string echo = echoServerPath();
    PodSpec client;
    client.ns = "obs", client.name = "client", client.node = "node1";
    client.ip4 = "10.244.1.10", client.ip6 = "fd00:10:244:1::10";
    client.command = "sleep infinity";
    PodSpec server;
    server.ns = "obs", server.name = "server", server.node = "node2";
    server.ip4 = kServerIp, server.ip6 = "fd00:10:244:2::10";
    server.command = echo + " --port 8080 --port 8081 --stream-port 9090";
    server.readyPort = 8080;
    server.labels = {{"app", "echo"}, {"version", "v1"}};
    // Service accounts so the two ends have distinct identities.
    std::string clientYaml = podYaml(client);
    std::string serverYaml = podYaml(server);
    auto withSa = [](std::string y, const char* sa) {
      const std::string from = "serviceAccountName: default";
      size_t at = y.find(from);
      return at == std::string::npos
                 ? y
                 : y.replace(at, from.size(), fmt::format("serviceAccountName: {}", sa));
    };
    return {
        {"namespaces.yaml", namespaceYaml("obs", true)},
        {"pods.yaml", withSa(clientYaml, "client") + "---\n" + withSa(serverYaml, "server")},
        {"service.yaml", fmt::format(R"(apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: obs}}
spec:
  selector: {{app: echo}}
  clusterIP: {}
  ports:
  - {{port: 80, targetPort: 8080}}
)",
                                     kServiceVip)},
        {"policy.yaml", R"(apiVersion: security.weft.dev/v1
kind: AuthorizationPolicy
metadata: {name: deny-8081, namespace: obs}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules:
  - to: [{operation: {ports: ["8081"]}}]
)"},
    };
  }

  static std::string nodeField(const std::string& node, const char* which, const char* key) {
    if (!status_.contains("nodes")) return "";
    for (auto& n : status_["nodes"])
      if (n.value("name", "") == node && n.contains(which) && n[which].contains(key) &&
          n[which][key].is_string())
        return n[which][key];
    return "";
  }
  static std::string accessLog(const std::string& node) {
    return nodeField(node, "ztunnel", "access_log");
  }

  static std::string ztunnelGet(const std::string& node, const std::string& path) {
    auto r = cluster_->onNode(node, {"curl", "-sS", "--max-time", "5",
                                     "http://127.0.0.1:15000" + path});
    EXPECT_EQ(r.exitCode, 0) << node << " GET " << path << ": " << r.describe();
    return r.out;
  }
  static std::string ztunnelPost(const std::string& node, const std::string& path) {
    auto r = cluster_->onNode(node, {"curl", "-sS", "--max-time", "5", "-X", "POST",
                                     "http://127.0.0.1:15000" + path});
    EXPECT_EQ(r.exitCode, 0) << node << " POST " << path << ": " << r.describe();
    return r.out;
  }
  static std::string agentPost(const std::string& node, const std::string& path) {
    std::string sock = nodeField(node, "agent", "admin_socket");
    auto r = run({"curl", "-sS", "--max-time", "5", "-X", "POST", "--unix-socket", sock,
                  "http://agent" + path},
                 withTimeout(10s));
    EXPECT_EQ(r.exitCode, 0) << node << " agent POST " << path << ": " << r.describe();
    return r.out;
  }

  // N connections from the client through the service, each sending `bytes` and reading the
  // echo server's 32-byte digest + the bytes back.
  static Json echo(const std::string& target, int count, int bytes, int seed) {
    auto r = cluster_->exec(kClient, {echoClientPath(), "--target", target, "--count",
                                      std::to_string(count), "--min-bytes", std::to_string(bytes),
                                      "--max-bytes", std::to_string(bytes), "--seed",
                                      std::to_string(seed), "--timeout-s", "20"},
                            120s);
    auto j = Json::parse(r.out, nullptr, false);
    if (j.is_discarded() || !j.is_object()) return Json{{"error", r.describe()}, {"ok", -1}};
    j["exit_code"] = r.exitCode;
    return j;
  }

  static inline Json status_;
};

// The series of the client -> server connections, per reporter.
std::map<std::string, std::string> pairLabels(const char* reporter) {
  return {{"reporter", reporter},
          {"source_workload", "client"},
          {"source_workload_namespace", "obs"},
          {"destination_workload", "server"},
          {"destination_workload_namespace", "obs"},
          {"connection_security_policy", "mutual_tls"},
          {"response_flags", "-"}};
}

// promtool (Debian's prometheus package, installed by scripts/setup) accepts a live scrape of
// both nodes, after traffic, a denial and with certificates issued.
TEST_F(ObservabilityE2E, LiveScrapePassesPromtool) {
  auto v = run({"promtool", "--version"}, withTimeout(10s));
  ASSERT_EQ(v.exitCode, 0) << "promtool is missing (scripts/setup installs the prometheus "
                              "package): "
                           << v.describe();
  // Something in every family: a good connection, a denied one.
  Json ok = echo(fmt::format("{}:80", kServiceVip), 2, 100, 1);
  EXPECT_EQ(ok.value("ok", -1), 2) << ok.dump();
  Json denied = echo(fmt::format("{}:8081", kServerIp), 1, 100, 2);
  EXPECT_EQ(denied.value("ok", -1), 0) << denied.dump();
  for (const char* node : {"node1", "node2"}) {
    std::string err;
    auto m = cluster_->metrics(node, &err);
    ASSERT_TRUE(m) << err;
    RunOptions o = withTimeout(30s);
    o.stdinText = *m;
    auto r = run({"promtool", "check", "metrics"}, o);
    EXPECT_EQ(r.exitCode, 0) << node << ": promtool check metrics: " << r.describe() << "\n"
                             << r.out;
    std::printf("%s: promtool check metrics: exit %d, %zu bytes, %d lines%s%s\n", node,
                r.exitCode, m->size(),
                static_cast<int>(std::count(m->begin(), m->end(), '\n')),
                r.out.empty() ? "" : "; ", r.out.c_str());
    // promtool does not flag a series written twice; check that here.
    std::set<std::string> series;
    for (const std::string& line : linesOf(*m)) {
      if (line[0] == '#') continue;
      EXPECT_TRUE(series.insert(line.substr(0, line.rfind(' '))).second)
          << node << ": duplicate series " << line;
    }
    // Weft's own families with live values.
    EXPECT_GE(sumSamples(*m, "weft_bpf_map_entries", {{"map", "weft_enrolled"}}), 1) << node;
    EXPECT_GT(sumSamples(*m, "weft_bpf_map_max_entries", {{"map", "weft_enrolled"}}), 0);
    EXPECT_EQ(sumSamples(*m, "weft_ztunnel_enrolled_pods", {}), 1) << node;
    EXPECT_EQ(sumSamples(*m, "istio_build", {{"component", "ztunnel"}}), 1);
    EXPECT_GE(sumSamples(*m, "weft_ztunnel_certificates", {{"state", "valid"}}), 1) << node;
    const char* id = std::string(node) == "node1" ? kClientIdentity : kServerIdentity;
    double expiry = sumSamples(*m, "weft_ztunnel_certificate_expiry_seconds", {{"identity", id}});
    EXPECT_GT(expiry, 3600) << node << " " << id;  // the sim's 24 h certificates
    EXPECT_LE(expiry, 86400 + 60);
  }
  EXPECT_GE(metric("node1", "weft_ztunnel_hbone_client_handshakes_total", {}), 1);
  EXPECT_GE(metric("node1", "weft_ztunnel_hbone_pool_connections", {}), 1);
  EXPECT_GE(metric("node2", "weft_ztunnel_policy_verdicts_total", {{"result", "deny"}}), 1);
}

// Exactly N connections of S bytes out and R bytes back: the Istio counters move by N, N*S and
// N*R on both reporters, and each ztunnel writes exactly N access-log lines for them — text
// first, then JSON after switching the format at run time.
TEST_F(ObservabilityE2E, CountersAndAccessLogsForNConnections) {
  constexpr int kN = 20;
  constexpr int kS = 1000;
  constexpr int kR = 32 + kS;  // the echo server answers SHA-256 + the bytes
  for (const char* format : {"text", "json"}) {
    SCOPED_TRACE(format);
    for (const char* node : {"node1", "node2"}) {
      Json a = Json::parse(ztunnelPost(node, fmt::format("/access_log?format={}", format)),
                           nullptr, false);
      ASSERT_EQ(a.value("format", ""), format) << node << " " << a.dump();
    }
    std::map<std::string, std::map<std::string, double>> before;
    for (auto [node, reporter] : {std::pair{"node1", "source"}, {"node2", "destination"}}) {
      for (const char* fam :
           {"istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total",
            "istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total"})
        before[node][fam] = metric(node, fam, pairLabels(reporter));
    }
    std::streamoff log1 = sizeOf(accessLog("node1")), log2 = sizeOf(accessLog("node2"));

    Json j = echo(fmt::format("{}:80", kServiceVip), kN, kS, 7);
    ASSERT_EQ(j.value("ok", -1), kN) << j.dump();
    EXPECT_EQ(j.value("bytes_sent", -1), kN * kS) << j.dump();
    EXPECT_EQ(j.value("bytes_received", -1), kN * kR) << j.dump();

    for (auto [node, reporter] : {std::pair{"node1", "source"}, {"node2", "destination"}}) {
      SCOPED_TRACE(std::string(node) + " reporter=" + reporter);
      double closed = -1;
      eventually(
          [&] {
            closed = metric(node, "istio_tcp_connections_closed_total", pairLabels(reporter));
            return closed >= before[node]["istio_tcp_connections_closed_total"] + kN;
          },
          10s);
      auto delta = [&](const char* fam) {
        return metric(node, fam, pairLabels(reporter)) - before[node][fam];
      };
      EXPECT_EQ(delta("istio_tcp_connections_opened_total"), kN);
      EXPECT_EQ(delta("istio_tcp_connections_closed_total"), kN);
      EXPECT_EQ(delta("istio_tcp_received_bytes_total"), kN * kS) << "source -> destination";
      EXPECT_EQ(delta("istio_tcp_sent_bytes_total"), kN * kR) << "destination -> source";
    }

    // Access logs: a line is written when the connection ends; the writer is asynchronous.
    auto parse = [&](const std::string& line) {
      return std::string(format) == "json" ? jsonFields(line) : textFields(line);
    };
    auto newLines = [&](const std::string& node, std::streamoff from) {
      return linesOf(readFrom(accessLog(node), from));
    };
    std::vector<std::string> out, in;
    eventually(
        [&] {
          out = newLines("node1", log1);
          in = newLines("node2", log2);
          return out.size() >= kN && in.size() >= kN;
        },
        10s);
    ASSERT_EQ(out.size(), static_cast<size_t>(kN)) << "node1 access log: new lines";
    ASSERT_EQ(in.size(), static_cast<size_t>(kN)) << "node2 access log: new lines";
    std::set<std::string> ids;
    for (const std::string& line : out) {
      auto f = parse(line);
      SCOPED_TRACE(line);
      if (std::string(format) == "json") {
        EXPECT_EQ(line.front(), '{');
      }
      EXPECT_EQ(f["level"], "info");
      EXPECT_EQ(f["direction"], "outbound");
      EXPECT_EQ(f["path"], "hbone");
      EXPECT_EQ(f["src.workload"], "client");
      EXPECT_EQ(f["src.namespace"], "obs");
      EXPECT_EQ(f["src.identity"], kClientIdentity);
      EXPECT_EQ(f["src.addr"].rfind("10.244.1.10:", 0), 0u);
      EXPECT_EQ(f["dst.addr"], fmt::format("{}:15008", kServerIp));
      EXPECT_EQ(f["dst.hbone_addr"], fmt::format("{}:8080", kServerIp));
      EXPECT_EQ(f["dst.service"], kServiceHost);
      EXPECT_EQ(f["dst.workload"], "server");
      EXPECT_EQ(f["dst.namespace"], "obs");
      EXPECT_EQ(f["dst.identity"], kServerIdentity);
      EXPECT_EQ(f["bytes_sent"], std::to_string(kS));
      EXPECT_EQ(f["bytes_recv"], std::to_string(kR));
      EXPECT_TRUE(std::regex_match(f["duration"], std::regex("[0-9]+ms"))) << f["duration"];
      EXPECT_EQ(f.count("error"), 0u);
      EXPECT_FALSE(f["conn_id"].empty());
      ids.insert(f["conn_id"]);
    }
    EXPECT_EQ(ids.size(), static_cast<size_t>(kN)) << "connection ids are distinct";
    for (const std::string& line : in) {
      auto f = parse(line);
      SCOPED_TRACE(line);
      EXPECT_EQ(f["level"], "info");
      EXPECT_EQ(f["direction"], "inbound");
      EXPECT_EQ(f["path"], "hbone");
      EXPECT_EQ(f["src.workload"], "client");
      EXPECT_EQ(f["src.namespace"], "obs");
      EXPECT_EQ(f["src.identity"], kClientIdentity);
      EXPECT_EQ(f["dst.addr"], fmt::format("{}:15008", kServerIp));
      EXPECT_EQ(f["dst.hbone_addr"], fmt::format("{}:8080", kServerIp));
      EXPECT_EQ(f["dst.workload"], "server");
      EXPECT_EQ(f["dst.namespace"], "obs");
      EXPECT_EQ(f["dst.identity"], kServerIdentity);
      EXPECT_EQ(f["bytes_sent"], std::to_string(kR)) << "inbound: toward the source";
      EXPECT_EQ(f["bytes_recv"], std::to_string(kS));
      EXPECT_EQ(f.count("error"), 0u);
    }
  }
  for (const char* node : {"node1", "node2"}) ztunnelPost(node, "/access_log?format=text");
}

// A connection denied by the destination's policy: an access-log line with the error on both
// sides, and istio_tcp_connections_failed_total{response_flags="DENY"} on both reporters.
TEST_F(ObservabilityE2E, DeniedConnectionIsLoggedWithItsError) {
  std::map<std::string, std::string> src = {{"reporter", "source"},
                                            {"destination_workload", "server"},
                                            {"response_flags", "DENY"}};
  std::map<std::string, std::string> dst = {{"reporter", "destination"},
                                            {"source_workload", "client"},
                                            {"response_flags", "DENY"}};
  double f1 = metric("node1", "istio_tcp_connections_failed_total", src);
  double f2 = metric("node2", "istio_tcp_connections_failed_total", dst);
  std::streamoff log1 = sizeOf(accessLog("node1")), log2 = sizeOf(accessLog("node2"));
  Json j = echo(fmt::format("{}:8081", kServerIp), 1, 10, 3);
  EXPECT_EQ(j.value("failures", -1), 1) << j.dump();
  std::vector<std::string> out, in;
  eventually(
      [&] {
        out = linesOf(readFrom(accessLog("node1"), log1));
        in = linesOf(readFrom(accessLog("node2"), log2));
        return !out.empty() && !in.empty();
      },
      10s);
  ASSERT_EQ(out.size(), 1u);
  ASSERT_EQ(in.size(), 1u);
  auto o = textFields(out[0]);
  EXPECT_EQ(o["level"], "error") << out[0];
  EXPECT_EQ(o["direction"], "outbound");
  EXPECT_EQ(o["response_flags"], "DENY") << out[0];
  EXPECT_NE(o["error"].find("HBONE CONNECT answered 401"), std::string::npos) << out[0];
  EXPECT_EQ(o["dst.hbone_addr"], fmt::format("{}:8081", kServerIp));
  auto i = textFields(in[0]);
  EXPECT_EQ(i["level"], "error") << in[0];
  EXPECT_EQ(i["direction"], "inbound");
  EXPECT_EQ(i["src.identity"], kClientIdentity);
  EXPECT_EQ(i["response_flags"], "DENY");
  EXPECT_NE(i["error"].find("denied by authorization policy: deny_matched obs/deny-8081"),
            std::string::npos)
      << in[0];
  EXPECT_EQ(metric("node1", "istio_tcp_connections_failed_total", src), f1 + 1);
  EXPECT_EQ(metric("node2", "istio_tcp_connections_failed_total", dst), f2 + 1);
}

// Certificates in the ztunnel's /config_dump carry identity, serial, validity and state; no
// admin output of either process contains key material: no PEM key header, nothing of the
// CA's private key (its PEM body, its raw scalar), and no key file written by a ztunnel.
TEST_F(ObservabilityE2E, AdminOutputsHoldNoKeyMaterial) {
  std::string dump1 = ztunnelGet("node1", "/config_dump");
  Json d = Json::parse(dump1, nullptr, false);
  ASSERT_FALSE(d.is_discarded());
  bool found = false;
  for (auto& c : d["certificates"]) {
    if (c.value("identity", "") != kClientIdentity) continue;
    found = true;
    EXPECT_EQ(c.value("state", ""), "valid") << c.dump();
    EXPECT_FALSE(c.value("serial", "").empty()) << c.dump();
    EXPECT_TRUE(c["not_before"].is_string()) << c.dump();
    EXPECT_TRUE(c["not_after"].is_string()) << c.dump();
  }
  EXPECT_TRUE(found) << "no certificate for " << kClientIdentity << " in " << dump1;

  std::vector<std::pair<std::string, std::string>> outputs = {{"node1 /config_dump", dump1}};
  for (const char* node : {"node1", "node2"}) {
    for (const char* path : {"/config_dump", "/connections", "/stats", "/verdicts"})
      outputs.emplace_back(fmt::format("{} ztunnel {}", node, path), ztunnelGet(node, path));
    for (const char* path : {"/status", "/workloads", "/services", "/authorization-policies"}) {
      std::string err;
      auto body = cluster_->agentAdmin(node, path, &err);
      ASSERT_TRUE(body) << err;
      outputs.emplace_back(fmt::format("{} agent {}", node, path), *body);
    }
  }
  // The CA key is the one private key on disk (ca-dir is shared by the sim's agents).
  std::string simDir = fs::path(nodeField("node1", "agent", "log")).parent_path().parent_path();
  std::string caKey = simDir + "/ca/ca-key.pem";
  std::string pem = readFrom(caKey, 0);
  ASSERT_NE(pem.find("PRIVATE KEY"), std::string::npos) << caKey;
  std::vector<std::string> needles = {"PRIVATE KEY", "-----BEGIN", "BEGIN EC", "ENCRYPTED"};
  for (const std::string& l : linesOf(pem))
    if (l.rfind("-----", 0) != 0 && l.size() >= 16) needles.push_back(l.substr(0, 32));
  auto priv = run({"openssl", "ec", "-in", caKey, "-text", "-noout"}, withTimeout(10s));
  ASSERT_EQ(priv.exitCode, 0) << priv.describe();
  // "priv:" then hex lines "    aa:bb:..." up to "pub:"
  std::string hex;
  size_t a = priv.out.find("priv:"), b = priv.out.find("pub:");
  ASSERT_NE(a, std::string::npos);
  for (char c : priv.out.substr(a + 5, b - a - 5))
    if (isxdigit(static_cast<unsigned char>(c))) hex += c;
  ASSERT_GE(hex.size(), 60u);
  needles.push_back(hex.substr(hex.size() - 32));  // the raw scalar, as hex without colons
  std::string colon;
  for (size_t i = hex.size() - 32; i < hex.size(); i += 2) colon += hex.substr(i, 2) + ":";
  needles.push_back(colon.substr(0, colon.size() - 1));
  for (auto& [what, body] : outputs) {
    EXPECT_FALSE(body.empty()) << what;
    for (const std::string& n : needles)
      EXPECT_EQ(body.find(n), std::string::npos) << what << " contains key material: " << n;
  }
  // Workload keys live only in the ztunnels' memory: no file of the sim holds any other key.
  std::vector<std::string> keyFiles;
  for (auto& e :
       fs::recursive_directory_iterator(simDir, fs::directory_options::skip_permission_denied)) {
    if (!e.is_regular_file() || e.file_size() > (8u << 20)) continue;
    if (readFrom(e.path(), 0).find("PRIVATE KEY") != std::string::npos)
      keyFiles.push_back(e.path());
  }
  EXPECT_EQ(keyFiles, std::vector<std::string>{caKey});
}

// POST /logging?level=debug takes effect at once on both processes: a debug line appears for
// the next event that logs at debug, and none before; back to info afterwards.
TEST_F(ObservabilityE2E, LogLevelChangesAtRunTime) {
  // ztunnel (node1): a refused HBONE CONNECT logs at debug.
  std::string ztLog = nodeField("node1", "ztunnel", "log");
  Json lv = Json::parse(ztunnelGet("node1", "/logging"), nullptr, false);
  EXPECT_EQ(lv.value("level", ""), "info") << lv.dump();
  std::streamoff mark = sizeOf(ztLog);
  echo(fmt::format("{}:8081", kServerIp), 1, 10, 4);
  std::this_thread::sleep_for(500ms);
  std::string atInfo = readFrom(ztLog, mark);
  EXPECT_EQ(atInfo.find(" debug "), std::string::npos) << "debug line at info:\n" << atInfo;
  Json set = Json::parse(ztunnelPost("node1", "/logging?level=debug"), nullptr, false);
  EXPECT_EQ(set.value("level", ""), "debug") << set.dump();
  EXPECT_EQ(Json::parse(ztunnelGet("node1", "/logging"), nullptr, false).value("level", ""),
            "debug");
  mark = sizeOf(ztLog);
  echo(fmt::format("{}:8081", kServerIp), 1, 10, 5);
  std::string atDebug;
  EXPECT_TRUE(eventually(
      [&] {
        atDebug = readFrom(ztLog, mark);
        return atDebug.find(" debug ztunnel: outbound") != std::string::npos;
      },
      5s))
      << "no debug line after setting debug:\n"
      << atDebug;
  ztunnelPost("node1", "/logging?level=info");

  // agent (node1): a cluster change is sent to the ztunnel, whose ack logs at debug.
  std::string agLog = nodeField("node1", "agent", "log");
  std::string err;
  auto st = cluster_->agentAdmin("node1", "/logging", &err);
  ASSERT_TRUE(st) << err;
  EXPECT_EQ(Json::parse(*st, nullptr, false).value("level", ""), "info") << *st;
  Json a = Json::parse(agentPost("node1", "/logging?level=debug"), nullptr, false);
  EXPECT_EQ(a.value("level", ""), "debug") << a.dump();
  auto status = cluster_->agentAdmin("node1", "/status", &err);
  ASSERT_TRUE(status) << err;
  EXPECT_EQ(Json::parse(*status, nullptr, false).value("log_level", ""), "debug");
  mark = sizeOf(agLog);
  // A new Service changes what the agent sends the ztunnel (a ClusterUpdate, then its ack).
  ASSERT_TRUE(cluster_->writeLiveManifest("svc-extra.yaml", R"(apiVersion: v1
kind: Service
metadata: {name: extra, namespace: obs}
spec:
  selector: {app: echo}
  clusterIP: 10.96.50.9
  ports:
  - {port: 81, targetPort: 8080}
)",
                                          &err))
      << err;
  std::string agDebug;
  EXPECT_TRUE(eventually(
      [&] {
        agDebug = readFrom(agLog, mark);
        return agDebug.find(" debug agent: node protocol:") != std::string::npos;
      },
      10s))
      << "no agent debug line after setting debug:\n"
      << agDebug;
  agentPost("node1", "/logging?level=info");
  cluster_->removeLiveManifest("svc-extra.yaml");
  Json bad = Json::parse(agentPost("node1", "/logging?level=loud"), nullptr, false);
  EXPECT_TRUE(bad.contains("error")) << bad.dump();
}

// The agent's /status: version, kernel features (all there on this kernel), enrolled pods,
// certificate health from the CA.
TEST_F(ObservabilityE2E, AgentStatusHasKernelFeaturesAndCertificateHealth) {
  std::string err;
  auto body = cluster_->agentAdmin("node2", "/status", &err);
  ASSERT_TRUE(body) << err;
  Json s = Json::parse(*body, nullptr, false);
  ASSERT_FALSE(s.is_discarded()) << *body;
  EXPECT_FALSE(s.value("version", "").empty());
  EXPECT_EQ(s.value("enrolled_pods", -1), 1) << *body;
  ASSERT_TRUE(s["kernel"].is_object()) << *body;
  EXPECT_FALSE(s["kernel"].value("release", "").empty());
  std::set<std::string> names;
  for (auto& f : s["kernel"]["features"]) {
    names.insert(f.value("name", ""));
    EXPECT_TRUE(f.value("available", false)) << f.dump();
  }
  for (const char* want : {"btf", "prog:cgroup_sock_addr", "prog:sock_ops", "prog:sk_lookup",
                           "prog:cgroup_sockopt", "map:ringbuf", "map:sk_storage",
                           "map:sockhash", "cgroup2", "bpffs"})
    EXPECT_TRUE(names.count(want)) << want << " not listed: " << *body;
  EXPECT_TRUE(s["kernel"]["missing"].empty()) << *body;
  ASSERT_TRUE(s["certificates"].is_object()) << *body;
  EXPECT_EQ(s["certificates"].value("health", ""), "ok") << *body;
  EXPECT_GE(s["certificates"].value("issued", 0), 1) << *body;
  EXPECT_FALSE(s["certificates"].value("ca_not_after", "").empty());
}

// A live connection in /connections: both addresses, both identities, bytes each way, age,
// path.
TEST_F(ObservabilityE2E, ConnectionsShowsALiveConnection) {
  Child socat;
  ASSERT_TRUE(socat.start(cluster_->execArgv(
      kClient, {"socat", "-T", "30", "-", fmt::format("TCP:{}:9090", kServerIp)})));
  ASSERT_TRUE(socat.send("hello-observability\n"));
  ASSERT_TRUE(socat.readUntil("hello-observability\n", 10s)) << "no echo";
  auto find = [&](const std::string& node) {
    Json all = Json::parse(ztunnelGet(node, "/connections"), nullptr, false);
    for (auto& c : all)
      if (c.value("dst", "") == fmt::format("{}:9090", kServerIp)) return c;
    return Json();
  };
  Json out = find("node1");
  ASSERT_TRUE(out.is_object()) << ztunnelGet("node1", "/connections");
  EXPECT_EQ(out.value("direction", ""), "outbound");
  EXPECT_EQ(out.value("path", ""), "hbone");
  EXPECT_EQ(out.value("src", "").rfind("10.244.1.10:", 0), 0u) << out.dump();
  EXPECT_EQ(out.value("source_identity", ""), kClientIdentity);
  EXPECT_EQ(out.value("destination_identity", ""), kServerIdentity);
  EXPECT_EQ(out.value("source_workload", ""), "obs/client");
  EXPECT_EQ(out.value("destination_workload", ""), "obs/server");
  EXPECT_EQ(out.value("bytes_received", 0), 20) << "client -> server so far";
  EXPECT_EQ(out.value("bytes_sent", 0), 20) << "echoed back";
  EXPECT_TRUE(out["age_ms"].is_number());
  EXPECT_GT(out.value("id", 0), 0);
  Json in = find("node2");
  ASSERT_TRUE(in.is_object()) << ztunnelGet("node2", "/connections");
  EXPECT_EQ(in.value("direction", ""), "inbound");
  EXPECT_EQ(in.value("path", ""), "hbone");
  EXPECT_EQ(in.value("source_identity", ""), kClientIdentity);
  EXPECT_EQ(in.value("destination_identity", ""), kServerIdentity);
  EXPECT_EQ(in.value("bytes_received", 0), 20);
  socat.closeStdin();
}

// logrotate's `create` + `postrotate kill -HUP`: node1's access log renamed away, SIGHUP to
// node1's weft-ztunnel (its pid from the sim status) reopens the path at once (the new file
// exists before any line), the next connection's line lands there and none in the renamed file.
TEST_F(ObservabilityE2E, AccessLogReopensOnSighupAfterRotation) {
  std::string path = accessLog("node1");
  ASSERT_FALSE(path.empty());
  int pid = 0;
  for (auto& n : status_["nodes"])
    if (n.value("name", "") == "node1" && n["ztunnel"]["pid"].is_number_integer())
      pid = n["ztunnel"]["pid"];
  ASSERT_GT(pid, 1) << status_.dump();
  Json before = Json::parse(ztunnelGet("node1", "/access_log"), nullptr, false);
  ASSERT_TRUE(before.contains("reopens")) << before.dump();
  uint64_t reopens = before["reopens"];
  std::string rotated = path + ".rotated";
  ASSERT_EQ(::rename(path.c_str(), rotated.c_str()), 0) << path;
  ASSERT_EQ(::kill(pid, SIGHUP), 0);
  EXPECT_TRUE(eventually([&] { return fs::exists(path); }, 10s))
      << "no new file at " << path << " after SIGHUP";
  std::streamoff old_size = sizeOf(rotated);

  Json j = echo(fmt::format("{}:80", kServiceVip), 1, 100, 11);
  ASSERT_EQ(j.value("ok", -1), 1) << j.dump();
  std::vector<std::string> lines;
  eventually(
      [&] {
        lines = linesOf(readFrom(path, 0));
        return !lines.empty();
      },
      10s);
  ASSERT_EQ(lines.size(), 1u) << readFrom(path, 0);
  auto f = lines[0].front() == '{' ? jsonFields(lines[0]) : textFields(lines[0]);
  EXPECT_EQ(f["direction"], "outbound") << lines[0];
  EXPECT_EQ(f["dst.hbone_addr"], fmt::format("{}:8080", kServerIp)) << lines[0];
  EXPECT_EQ(f["bytes_sent"], "100") << lines[0];
  EXPECT_EQ(sizeOf(rotated), old_size) << "a line went to the renamed file";
  Json after = Json::parse(ztunnelGet("node1", "/access_log"), nullptr, false);
  EXPECT_EQ(after.value("reopens", uint64_t{0}), reopens + 1) << after.dump();
  EXPECT_EQ(after.value("reopen_errors", uint64_t{1}), 0u) << after.dump();
  EXPECT_EQ(metric("node1", "weft_ztunnel_access_log_reopens_total", {}),
            static_cast<double>(reopens + 1));
  fs::remove(rotated);
}

}  // namespace
}  // namespace weft::e2e
