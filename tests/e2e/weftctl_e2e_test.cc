// weftctl against a live 2-node sim (the policy matrix cluster plus a service): every verb in
// table and JSON form run inside a node's netns (`scripts/sim node`), `monitor --verdict deny`
// seeing a denied connection within a second, `trace` agreeing with every row of the matrix,
// no key material in `cert show` or the config dump, and one-line errors when the agent or the
// ztunnel is down.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <set>
#include <thread>

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/e2e/policy_matrix.h"
#include "tests/e2e/sim_cluster.h"
#include "tests/e2e/sim_suite.h"

namespace weft::e2e {
namespace {

using namespace std::chrono_literals;
using Json = nlohmann::json;

constexpr const char* kServiceVip = "10.96.50.1";

std::string weftctlPath() { return buildDir() + "/cli/weftctl"; }

std::string serviceYaml() {
  return R"(apiVersion: v1
kind: Service
metadata: {name: web-svc, namespace: app}
spec:
  selector: {app: web}
  clusterIP: 10.96.50.1
  ports: [{name: http, port: 80, targetPort: 8080}]
)";
}

bool processGone(int pid) {
  if (::kill(pid, 0) != 0) return errno == ESRCH;
  std::ifstream st("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  std::getline(st, line);
  size_t close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() && line[close + 2] == 'Z';
}

size_t lineCount(const std::string& s) {
  size_t n = 0;
  for (char c : s) n += c == '\n';
  if (!s.empty() && s.back() != '\n') n++;
  return n;
}

class WeftctlE2E : public SimSuite<WeftctlE2E> {
 protected:
  static void SetUpTestSuite() {
    setupError_.clear();
    if (::geteuid() != 0) return;
    auto files = policyMatrixManifests();
    files.push_back({"services.yaml", serviceYaml()});
    bringUp(fmt::format("ctl{}", ::getpid()), 2, files);
  }

  // weftctl ARGS inside `node`'s netns, with the environment `scripts/sim node` sets.
  static RunResult ctl(const std::string& node, std::vector<std::string> args,
                       std::chrono::milliseconds timeout = 30s) {
    args.insert(args.begin(), weftctlPath());
    return cluster_->onNode(node, args, timeout);
  }
  // The same with -j; the parsed stdout (discarded JSON when it does not parse).
  static Json ctlJson(const std::string& node, std::vector<std::string> args, RunResult* r) {
    args.insert(args.begin(), "-j");
    *r = ctl(node, args);
    return Json::parse(r->out, nullptr, false);
  }

  static bool connects(const std::string& pod, const std::string& ip, int port) {
    auto r = cluster_->exec(pod, {echoClientPath(), "--target", fmt::format("{}:{}", ip, port),
                                  "--count", "1", "--max-bytes", "512", "--timeout-s", "5"},
                            20s);
    auto j = Json::parse(r.out, nullptr, false);
    return r.exitCode == 0 && j.is_object() && j.value("ok", 0) == 1;
  }

};

// One verb: table form exits 0 with output, JSON form parses; `check` looks at the JSON.
struct VerbCase {
  std::string node;
  std::vector<std::string> args;
  std::function<void(const Json&, const std::string& what)> check;
};

void hasFields(const Json& j, const std::vector<const char*>& fields, const std::string& what) {
  ASSERT_TRUE(j.is_object()) << what << ": " << j.dump();
  for (const char* f : fields) EXPECT_TRUE(j.contains(f)) << what << ": no \"" << f << "\" in " << j.dump();
}

const Json* findBy(const Json& list, const char* key, const std::string& value) {
  for (const Json& e : list)
    if (e.is_object() && e.contains(key) && e[key] == value) return &e;
  return nullptr;
}

TEST_F(WeftctlE2E, EveryVerbInTableAndJsonForm) {
  // The agents and ztunnels have the policies and the service before we look.
  ASSERT_TRUE(eventually(
      [] {
        RunResult r;
        Json j = ctlJson("node1", {"policy", "list"}, &r);
        return j.is_array() && j.size() == 7;
      },
      20s))
      << "node1's agent never listed the 7 policies";
  // A live connection for `connection list`: socat from front/client keeps it open.
  Child hold;
  ASSERT_TRUE(hold.start(cluster_->execArgv(kFront, {"socat", "-", "TCP:10.244.2.10:8080"})));
  ASSERT_TRUE(hold.send("hello\n"));
  ASSERT_TRUE(eventually(
      [] {
        RunResult r;
        Json j = ctlJson("node1", {"connection", "list", "--pod", kFront}, &r);
        return j.is_array() && !j.empty();
      },
      10s))
      << "no connection from front/client seen by node1's ztunnel";

  std::vector<VerbCase> cases = {
      {"node1", {"status"},
       [](const Json& j, const std::string& w) {
         hasFields(j, {"agent", "ztunnel", "kernel", "pods", "certificates"}, w);
         EXPECT_EQ(j["agent"]["up"], true) << w;
         EXPECT_EQ(j["agent"]["node"], "node1") << w;
         EXPECT_FALSE(j["agent"]["version"].get<std::string>().empty()) << w;
         EXPECT_EQ(j["ztunnel"]["ready"], true) << w;
         EXPECT_FALSE(j["ztunnel"]["version"].get<std::string>().empty()) << w;
         for (const char* need : {"map:ringbuf", "prog:sk_lookup"}) {
           bool found = false;
           for (const Json& f : j["kernel"]["features"])
             if (f.value("name", "") == need) found = f.value("available", false);
           EXPECT_TRUE(found) << need << " " << w;
         }
         EXPECT_TRUE(j["kernel"]["missing"].empty()) << w;
         EXPECT_EQ(j["pods"]["enrolled"], 2) << w;  // front/client, ops/admin
         hasFields(j["certificates"], {"valid", "expiring", "expired", "pending"}, w);
         EXPECT_EQ(j["certificates"]["expired"], 0) << w;
       }},
      {"node1", {"workload", "list"},
       [](const Json& j, const std::string& w) {
         ASSERT_TRUE(j.is_array()) << w;
         const Json* fc = nullptr;
         for (const Json& e : j)
           if (e.value("namespace", "") == "front" && e.value("name", "") == "client") fc = &e;
         ASSERT_NE(fc, nullptr) << w;
         hasFields(*fc, {"node", "ips", "service_account", "enrolled", "netns_cookie"}, w);
         EXPECT_EQ((*fc)["enrolled"], true) << w;
       }},
      {"node1", {"workload", "show", "front/client"},
       [](const Json& j, const std::string& w) {
         hasFields(j, {"uid", "ips", "enrolled", "certificate", "ztunnel_listeners"}, w);
         EXPECT_EQ(j["certificate"]["identity"], "spiffe://cluster.local/ns/front/sa/default")
             << w;
       }},
      {"node1", {"service", "list"},
       [](const Json& j, const std::string& w) {
         ASSERT_TRUE(j.is_array()) << w;
         const Json* s = findBy(j, "name", "web-svc");
         ASSERT_NE(s, nullptr) << w;
         hasFields(*s, {"vips", "ports", "endpoints", "load_balancer"}, w);
       }},
      {"node1", {"service", "show", "app/web-svc"},
       [](const Json& j, const std::string& w) {
         hasFields(j, {"vips", "ports", "endpoints"}, w);
         EXPECT_EQ(j["vips"][0], kServiceVip) << w;
         ASSERT_EQ(j["endpoints"].size(), 2u) << w;  // app/web's IPv4 and IPv6 address
         for (const Json& e : j["endpoints"]) EXPECT_EQ(e["workload"], "app/web") << w;
       }},
      {"node1", {"policy", "list"},
       [](const Json& j, const std::string& w) {
         ASSERT_TRUE(j.is_array()) << w;
         const Json* p = findBy(j, "name", "server-allow");
         ASSERT_NE(p, nullptr) << w;
         hasFields(*p, {"kind", "namespace", "action", "scope", "rules", "dry_run"}, w);
       }},
      {"node1", {"policy", "show", "app/web-l7"},
       [](const Json& j, const std::string& w) {
         hasFields(j, {"action", "status", "ztunnel"}, w);
         EXPECT_EQ(j["action"], "DENY") << w;
         EXPECT_EQ(j["ztunnel"]["rules"][0]["l7_fields"].size(), 1u) << w;
       }},
      {"node1", {"cert", "list"},
       [](const Json& j, const std::string& w) {
         ASSERT_TRUE(j.is_array()) << w;
         ASSERT_EQ(j.size(), 2u) << w;
         for (const Json& c : j)
           hasFields(c, {"identity", "serial", "not_before", "not_after", "state"}, w);
       }},
      {"node1", {"cert", "show", "front/default"},
       [](const Json& j, const std::string& w) {
         hasFields(j, {"identity", "serial", "not_before", "not_after", "state"}, w);
         EXPECT_EQ(j["state"], "valid") << w;
       }},
      {"node1", {"connection", "list", "--pod", kFront},
       [](const Json& j, const std::string& w) {
         ASSERT_TRUE(j.is_array() && !j.empty()) << w;
         hasFields(j[0], {"src", "dst", "path", "peer_identity", "bytes_sent", "bytes_received",
                          "age_ms", "source_workload", "destination_workload"},
                   w);
         EXPECT_EQ(j[0]["path"], "hbone") << w;
         EXPECT_EQ(j[0]["peer_identity"], "spiffe://cluster.local/ns/app/sa/default") << w;
         EXPECT_EQ(j[0]["destination_identity"], "spiffe://cluster.local/ns/app/sa/default") << w;
         EXPECT_EQ(j[0]["source_identity"], "spiffe://cluster.local/ns/front/sa/default") << w;
       }},
      {"node2", {"connection", "list", "--namespace", "front", "--identity", "ns/front/sa/default"},
       [](const Json& j, const std::string& w) {
         ASSERT_TRUE(j.is_array() && !j.empty()) << w << " (node2's inbound side)";
         EXPECT_EQ(j[0]["direction"], "inbound") << w;
         EXPECT_EQ(j[0]["source_identity"], "spiffe://cluster.local/ns/front/sa/default") << w;
       }},
      {"node1", {"bpf", "prog", "show"},
       [](const Json& j, const std::string& w) {
         ASSERT_TRUE(j.is_array()) << w;
         EXPECT_EQ(j.size(), 13u) << w;  // the ABI's thirteen programs (bpf/abi/progs.h)
         ASSERT_NE(findBy(j, "name", "weft_connect4"), nullptr) << w;
         ASSERT_NE(findBy(j, "name", "weft_hop_msg"), nullptr) << w;
         hasFields(j[0], {"id", "type", "tag"}, w);
       }},
      {"node1", {"bpf", "link", "show"},
       [](const Json& j, const std::string& w) {
         ASSERT_TRUE(j.is_array()) << w;
         int netns = 0;
         for (const Json& l : j) netns += l.contains("netns_cookie") ? 1 : 0;
         EXPECT_EQ(netns, 2) << w << ": one sk_lookup link per enrolled pod";
         for (const Json& l : j) {
           if (l.contains("netns_cookie")) {
             EXPECT_TRUE(l["pod"].is_string()) << w;
           }
         }
       }},
      {"node1", {"bpf", "map", "list"},
       [](const Json& j, const std::string& w) {
         ASSERT_TRUE(j.is_array()) << w;
         const Json* e = findBy(j, "name", "weft_enrolled");
         ASSERT_NE(e, nullptr) << w;
         EXPECT_EQ((*e)["entries"], 2) << w;
         const Json* ev = findBy(j, "name", "weft_events");
         ASSERT_NE(ev, nullptr) << w;
         hasFields((*ev)["ring"], {"capacity_bytes", "pending_bytes"}, w);
       }},
      {"node1", {"bpf", "map", "dump", "enrolled"},
       [](const Json& j, const std::string& w) {
         ASSERT_EQ(j["entries"].size(), 2u) << w;
         std::set<std::string> pods;
         for (const Json& e : j["entries"]) pods.insert(e.value("pod", ""));
         EXPECT_EQ(pods, (std::set<std::string>{"front/client", "ops/admin"})) << w;
       }},
      {"node1", {"bpf", "map", "dump", "weft_orig_dst"},
       [](const Json& j, const std::string& w) {
         // The held socat connection was redirected: its original destination is recorded.
         bool found = false;
         for (const Json& e : j["entries"])
           found = found || (e["original_destination"] == "10.244.2.10:8080" &&
                             e["pod"] == "front/client");
         EXPECT_TRUE(found) << w;
       }},
      {"node2", {"bpf", "map", "dump", "inbound_lst"},
       [](const Json& j, const std::string& w) {
         ASSERT_TRUE(j["entries"].is_array()) << w;
         ASSERT_NE(findBy(j["entries"], "pod_ip", "10.244.2.10"), nullptr) << w;
         EXPECT_EQ((*findBy(j["entries"], "pod_ip", "10.244.2.10"))["pod"], "app/server") << w;
       }},
      {"node1", {"bpf", "map", "dump", "weft_events"},
       [](const Json& j, const std::string& w) {
         hasFields(j, {"ring", "ztunnel_consumer"}, w);
         EXPECT_EQ(j["ztunnel_consumer"]["consuming_bpf"], true) << w;
       }},
      {"node1", {"bpf", "map", "dump", "dns_dst"},
       [](const Json& j, const std::string& w) { EXPECT_TRUE(j["entries"].is_array()) << w; }},
      {"node1", {"bpf", "map", "dump", "in_bypass"},
       [](const Json& j, const std::string& w) {
         ASSERT_NE(findBy(j["entries"], "source_ip", "10.244.1.1"), nullptr) << w;
       }},
      {"node1", {"bpf", "map", "dump", "sk_dst"},
       [](const Json& j, const std::string& w) { hasFields(j, {"note"}, w); }},
      {"node1", {"monitor", "--timeout", "1"},
       [](const Json& j, const std::string& w) {
         // -j prints one JSON document per line: the first is the stream's start.
         EXPECT_EQ(j["kind"], "start") << w;
         EXPECT_EQ(j["bpf_events"], true) << w;
       }},
      {"node1", {"trace", kFront, fmt::format("{}:80", kServiceVip)},
       [](const Json& j, const std::string& w) {
         hasFields(j, {"source", "redirected", "route", "expected_identity", "verdict"}, w);
         EXPECT_EQ(j["route"]["kind"], "service-endpoint") << w;
         EXPECT_EQ(j["route"]["service"], "app/web-svc") << w;
         EXPECT_EQ(j["route"]["next_hop"], "10.244.2.11:8080") << w;
         EXPECT_EQ(j["route"]["protocol"], "hbone") << w;
         EXPECT_EQ(j["expected_identity"], "spiffe://cluster.local/ns/app/sa/default") << w;
       }},
      {"node1", {"log", "level"},
       [](const Json& j, const std::string& w) {
         hasFields(j, {"ztunnel", "agent"}, w);
         EXPECT_FALSE(j["ztunnel"]["level"].get<std::string>().empty()) << w;
       }},
      {"node1", {"log", "level", "info"},
       [](const Json& j, const std::string& w) { EXPECT_EQ(j["ztunnel"]["level"], "info") << w; }},
  };
  for (const VerbCase& c : cases) {
    std::string what = c.node + ": weftctl";
    for (const auto& a : c.args) what += " " + a;
    RunResult table = ctl(c.node, c.args);
    EXPECT_EQ(table.exitCode, 0) << what << ": " << table.describe();
    EXPECT_FALSE(table.out.empty()) << what;
    RunResult r;
    Json j = ctlJson(c.node, c.args, &r);
    EXPECT_EQ(r.exitCode, 0) << what << " -j: " << r.describe();
    if (c.args[0] == "monitor") {
      // JSON lines: parse the first.
      j = Json::parse(r.out.substr(0, r.out.find('\n')), nullptr, false);
    }
    ASSERT_FALSE(j.is_discarded()) << what << " -j: not JSON: " << r.out;
    c.check(j, what + " -j");
    std::printf("%s: %zu table lines, JSON ok\n", what.c_str(), lineCount(table.out));
  }
  // Abbreviations and help work on the live node too.
  RunResult ab = ctl("node1", {"wo", "li"});
  EXPECT_EQ(ab.exitCode, 0) << ab.describe();
  EXPECT_NE(ab.out.find("front/client"), std::string::npos) << ab.out;
  RunResult amb = ctl("node1", {"-j", "s"});
  EXPECT_NE(amb.exitCode, 0);
  EXPECT_EQ(Json::parse(amb.out, nullptr, false).value("error", ""),
            "ambiguous object 's': status, service")
      << amb.describe();
  hold.closeStdin();
}

// A denied connection shows up in `weftctl monitor --verdict deny` within a second; the
// source node's monitor shows the redirect (BPF ring) of a meshed pod's connection.
TEST_F(WeftctlE2E, MonitorShowsDenyWithinASecond) {
  Child mon;
  ASSERT_TRUE(mon.start({repoRoot() + "/scripts/sim", "node", "--name", cluster_->name(),
                         "node2", "--", weftctlPath(), "-j", "monitor", "--verdict", "deny",
                         "--timeout", "30"}));
  auto started = mon.readUntil("\"kind\":\"start\"", 10s);
  ASSERT_TRUE(started && started->find("\"kind\":\"start\"") != std::string::npos)
      << "monitor did not start: " << (started ? *started : "");
  // An allowed connection first: it must not show.
  EXPECT_TRUE(connects(kFront, kServerIp, 8080));
  EXPECT_FALSE(connects(kBot, kServerIp, 8080));
  auto done = std::chrono::steady_clock::now();
  auto got = mon.readUntil("\"result\":\"deny\"", 1s);
  auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::steady_clock::now() - done);
  ASSERT_TRUE(got && got->find("\"result\":\"deny\"") != std::string::npos)
      << "no deny event within 1 s of the denied connection; got: " << (got ? *got : "");
  EXPECT_EQ(got->find("\"result\":\"allow\""), std::string::npos) << *got;
  EXPECT_NE(got->find("weft-system/mesh-deny-bot"), std::string::npos) << *got;
  EXPECT_NE(got->find("plain/bot"), std::string::npos) << *got;
  std::printf("deny event arrived %lld ms after the denied connection returned\n",
              static_cast<long long>(waited.count()));
  mon.kill();

  // BPF redirect events of node1's enrolled pod, in table form.
  Child red;
  ASSERT_TRUE(red.start({repoRoot() + "/scripts/sim", "node", "--name", cluster_->name(),
                         "node1", "--", weftctlPath(), "monitor", "--pod", kFront, "--timeout",
                         "30"}));
  std::this_thread::sleep_for(1s);  // "monitoring ..." goes to stderr; give it time to subscribe
  EXPECT_TRUE(connects(kFront, kWebIp, 8080));
  auto r = red.readUntil("redirect", 5s);
  ASSERT_TRUE(r && r->find("redirect") != std::string::npos) << (r ? *r : "");
  EXPECT_NE(r->find("front/client"), std::string::npos) << *r;
  EXPECT_NE(r->find("10.244.2.11:8080"), std::string::npos) << *r;
  red.kill();
}

// `weftctl trace` (the ztunnel's route decision and policy evaluation, no traffic) agrees with
// what a real connection does for every row of the policy matrix.
TEST_F(WeftctlE2E, TraceAgreesWithEveryMatrixRow) {
  std::string table;
  for (const Row& row : kTable) {
    std::string ip = std::string(row.dest) == "server" ? kServerIp : kWebIp;
    std::string what = fmt::format("trace {} {}:{}", row.source, ip, row.port);
    RunResult r;
    Json t = ctlJson("node1", {"trace", row.source, fmt::format("{}:{}", ip, row.port)}, &r);
    ASSERT_FALSE(t.is_discarded()) << what << ": " << r.describe();
    bool actual = connects(row.source, ip, row.port);
    EXPECT_EQ(actual, row.allowed) << what << ": the matrix itself";
    EXPECT_EQ(t["outcome"] == "allowed", actual) << what << ": trace says " << t.dump();
    EXPECT_EQ(t["inbound"]["path"], row.path) << what << " " << t.dump();
    if (row.policy[0] != '\0') {
      EXPECT_EQ(t["verdict"]["policy"], row.policy) << what << " " << t.dump();
      EXPECT_EQ(t["verdict"]["rule"], row.rule) << what << " " << t.dump();
    } else {
      EXPECT_TRUE(t["verdict"]["policy"].is_null()) << what << " " << t.dump();
    }
    RunResult human = ctl("node1", {"trace", row.source, fmt::format("{}:{}", ip, row.port)});
    EXPECT_EQ(human.exitCode, 0) << human.describe();
    EXPECT_NE(human.out.find(actual ? "outcome:     allowed" : "outcome:     denied"),
              std::string::npos)
        << human.out;
    table += fmt::format("{:<14} {:<20} trace {:<8} actual {:<6} {}\n", row.source,
                         fmt::format("{}:{}", ip, row.port), t["outcome"].get<std::string>(),
                         actual ? "allow" : "deny", t["verdict"]["decided_by"].dump());
  }
  std::printf("%s", table.c_str());
}

// Certificates in `cert show`/`cert list` and the ztunnel's config dump carry no key material.
TEST_F(WeftctlE2E, NoKeyMaterialAnywhere) {
  std::vector<std::string> outputs;
  for (auto args : std::vector<std::vector<std::string>>{
           {"cert", "show", "front/default"}, {"-j", "cert", "show", "ops/default"},
           {"cert", "list"}, {"-p", "cert", "list"}, {"-j", "workload", "show", "front/client"}}) {
    RunResult r = ctl("node1", args);
    EXPECT_EQ(r.exitCode, 0) << r.describe();
    outputs.push_back(r.out);
  }
  RunResult dump = cluster_->onNode(
      "node1", {"curl", "-sS", "--max-time", "5", "http://127.0.0.1:15000/config_dump"});
  ASSERT_EQ(dump.exitCode, 0) << dump.describe();
  ASSERT_NE(dump.out.find("\"certificates\""), std::string::npos);
  outputs.push_back(dump.out);
  for (const std::string& o : outputs) {
    EXPECT_EQ(o.find("PRIVATE KEY"), std::string::npos) << o;
    EXPECT_EQ(o.find("-----BEGIN"), std::string::npos) << o;
  }
}

// Down components: one line naming the socket (or address), non-zero exit; then back up.
TEST_F(WeftctlE2E, AgentOrZtunnelDownIsOneLine) {
  auto sock = cluster_->agentSocket("node1", "admin");
  ASSERT_TRUE(sock);
  auto pid = cluster_->agentPid("node1");
  ASSERT_TRUE(pid);
  ASSERT_EQ(::kill(*pid, SIGKILL), 0) << strerror(errno);
  ASSERT_TRUE(eventually([&] { return processGone(*pid); }, 5s, 50ms)) << "agent still alive";
  RunResult r = ctl("node1", {"status"});
  RunResult j = ctl("node1", {"-j", "status"});
  std::string err;
  bool restarted = cluster_->restartAgent("node1", &err);
  EXPECT_NE(r.exitCode, 0) << r.describe();
  EXPECT_TRUE(r.out.empty()) << r.out;
  EXPECT_EQ(lineCount(r.err), 1u) << r.err;
  EXPECT_NE(r.err.find(*sock), std::string::npos) << r.err;
  std::printf("agent down: %s", r.err.c_str());
  EXPECT_NE(j.exitCode, 0);
  EXPECT_EQ(lineCount(j.out), 1u) << j.out;
  auto doc = Json::parse(j.out, nullptr, false);
  ASSERT_TRUE(doc.is_object()) << j.out;
  EXPECT_NE(doc.value("error", "").find(*sock), std::string::npos) << j.out;
  ASSERT_TRUE(restarted) << err;
  EXPECT_TRUE(eventually([] { return ctl("node1", {"status"}).exitCode == 0; }, 20s))
      << "status after the agent restart";

  // The ztunnel: a ztunnel-only verb.
  auto s = cluster_->status();
  ASSERT_TRUE(s);
  int zpid = 0;
  for (auto& n : (*s)["nodes"])
    if (n.value("name", "") == "node1") zpid = n["ztunnel"].value("pid", 0);
  ASSERT_GT(zpid, 0);
  ASSERT_EQ(::kill(zpid, SIGKILL), 0);
  ASSERT_TRUE(eventually([&] { return processGone(zpid); }, 5s, 50ms));
  RunResult c = ctl("node1", {"connection", "list"});
  RunResult cj = ctl("node1", {"-j", "connection", "list"});
  RunResult restart = run({repoRoot() + "/scripts/sim", "restart-ztunnel", "--name",
                           cluster_->name(), "node1"},
                          withTimeout(60s));
  EXPECT_NE(c.exitCode, 0);
  EXPECT_EQ(lineCount(c.err), 1u) << c.err;
  EXPECT_NE(c.err.find("127.0.0.1:15000"), std::string::npos) << c.err;
  std::printf("ztunnel down: %s", c.err.c_str());
  EXPECT_NE(cj.exitCode, 0);
  EXPECT_EQ(lineCount(cj.out), 1u) << cj.out;
  EXPECT_NE(Json::parse(cj.out, nullptr, false).value("error", "").find("127.0.0.1:15000"),
            std::string::npos)
      << cj.out;
  ASSERT_EQ(restart.exitCode, 0) << restart.describe();
  EXPECT_EQ(ctl("node1", {"connection", "list"}).exitCode, 0);
}

}  // namespace
}  // namespace weft::e2e
