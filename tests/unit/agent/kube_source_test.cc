// The Kubernetes API source against tests/fixtures/kube/fake_apiserver.py on loopback (HTTPS with
// a CA made here by the openssl CLI): list+watch, pagination, bookmarks, 410 Gone both ways,
// disconnects, malformed events, auth and certificate failures; plus the pure conversions.
#include "agent/kube/kube_source.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <thread>
#include <vector>

#include "agent/kube/kube_config.h"
#include "agent/cluster_sync.h"
#include "agent/kube/kube_objects.h"

namespace weft::agent::kube {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Json = nlohmann::json;

constexpr const char* kToken = "test-token-0123456789";
constexpr const char* kPython = "/usr/bin/python3";

std::string fixturePath() {
  return std::string(WEFT_SOURCE_DIR) + "/tests/fixtures/kube/fake_apiserver.py";
}

int sh(const std::string& cmd) {
  return std::system(cmd.c_str());
}

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void writeFile(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  out << text;
}

Json nsObj(const std::string& name, bool ambient) {
  Json j = {{"kind", "Namespace"}, {"apiVersion", "v1"}, {"metadata", {{"name", name}}}};
  if (ambient) j["metadata"]["labels"] = {{"weft.dev/dataplane-mode", "ambient"}};
  return j;
}

Json podObj(const std::string& ns, const std::string& name, const std::string& node,
            const std::string& ip, Json labels = Json::object()) {
  Json j = {{"kind", "Pod"},
            {"apiVersion", "v1"},
            {"metadata", {{"name", name}, {"namespace", ns}, {"labels", labels}}},
            {"spec",
             {{"nodeName", node},
              {"serviceAccountName", "sa-" + name},
              {"containers", Json::array({{{"name", "app"}, {"image", "busybox"}}})}}},
            {"status", {{"phase", "Running"}, {"podIP", ip}, {"podIPs", {{{"ip", ip}}}}}}};
  return j;
}

// An EndpointSlice as the EndpointSlice controller writes it (one address family).
Json sliceObj(const std::string& ns, const std::string& name, const std::string& service,
              const std::string& type, const Json& endpoints, const Json& ports) {
  return {{"kind", "EndpointSlice"},
          {"apiVersion", "discovery.k8s.io/v1"},
          {"metadata",
           {{"name", name},
            {"namespace", ns},
            {"labels",
             {{"kubernetes.io/service-name", service},
              {"endpointslice.kubernetes.io/managed-by", "endpointslice-controller.k8s.io"}}},
            {"ownerReferences",
             {{{"apiVersion", "v1"}, {"kind", "Service"}, {"name", service}}}}}},
          {"addressType", type},
          // {oneEndpoint} brace-initializes a copy, not a list: wrap a single one.
          {"endpoints", endpoints.is_object() ? Json::array({endpoints}) : endpoints},
          {"ports", ports.is_object() ? Json::array({ports}) : ports}};
}

Json sliceEp(const std::string& ip, const std::string& pod, const std::string& node,
             bool ready = true) {
  return {{"addresses", {ip}},
          {"conditions", {{"ready", ready}, {"serving", ready}, {"terminating", false}}},
          {"nodeName", node},
          {"targetRef", {{"kind", "Pod"}, {"namespace", "mesh"}, {"name", pod}}}};
}

Json apObj(const std::string& ns, const std::string& name, const std::string& action,
           const Json& rules) {
  return {{"kind", "AuthorizationPolicy"},
          {"apiVersion", "security.weft.dev/v1"},
          {"metadata", {{"name", name}, {"namespace", ns}, {"generation", 1}}},
          {"spec",
           {{"selector", {{"matchLabels", {{"app", "web"}}}}},
            {"action", action},
            {"rules", rules}}}};
}

Json paObj(const std::string& ns, const std::string& name, const std::string& mode) {
  return {{"kind", "PeerAuthentication"},
          {"apiVersion", "security.weft.dev/v1"},
          {"metadata", {{"name", name}, {"namespace", ns}}},
          {"spec", {{"mtls", {{"mode", mode}}}}}};
}

Json svcObj(const std::string& ns, const std::string& name, const std::string& vip) {
  return {
      {"kind", "Service"},
      {"apiVersion", "v1"},
      {"metadata", {{"name", name}, {"namespace", ns}}},
      {"spec",
       {{"selector", {{"app", name}}},
        {"clusterIP", vip},
        {"clusterIPs", {vip}},
        {"ports", {{{"name", "http"}, {"port", 80}, {"targetPort", 8080}, {"protocol", "TCP"}}}}}}};
}

// Certificates, token and objects shared by the suite.
class KubeSourceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    char tmpl[] = "/tmp/weft-kube-test-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    const std::string d = dir_;
    // A CA, a server certificate for 127.0.0.1 signed by it, and an unrelated CA.
    std::string cmd =
        "cd " + d +
        " && "
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 "
        "-subj /CN=test-kube-ca -keyout ca.key -out ca.crt >/dev/null 2>&1 && "
        "openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
        "-subj /CN=kube-apiserver -keyout server.key -out server.csr >/dev/null 2>&1 && "
        "printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' > ext.cnf && "
        "openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 "
        "-extfile ext.cnf -out server.crt >/dev/null 2>&1 && "
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 "
        "-subj /CN=other-ca -keyout other.key -out other.crt >/dev/null 2>&1";
    ASSERT_EQ(sh(cmd), 0) << "openssl failed: " << cmd;
    writeFile(d + "/token", std::string(kToken) + "\n");
  }
  static void TearDownTestSuite() {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  void SetUp() override {
    if (::access(kPython, X_OK) != 0) GTEST_SKIP() << "no " << kPython;
    if (::access("/usr/bin/curl", X_OK) != 0) GTEST_SKIP() << "no /usr/bin/curl (control API)";
    ASSERT_EQ(uv_loop_init(&loop_), 0);
  }

  void TearDown() override {
    source_.reset();
    for (int i = 0; i < 100 && uv_run(&loop_, UV_RUN_NOWAIT) != 0; i++) {
    }
    uv_loop_close(&loop_);
    stopServer();
  }

  // Starts the fake server with `objects` (a JSON file of a list) and extra env.
  void startServer(const Json& objects, const std::string& env = "") {
    const std::string objFile = dir_ + "/objects.json";
    // The fixture reads YAML; JSON is YAML, one document with a list is not a kind: write
    // one document per object.
    std::string text;
    for (const Json& o : objects) text += "---\n" + o.dump() + "\n";
    writeFile(objFile, text);
    const std::string portFile = dir_ + "/port";
    fs::remove(portFile);
    pid_ = ::fork();
    ASSERT_GE(pid_, 0);
    if (pid_ == 0) {
      if (!env.empty())
        ::setenv(env.substr(0, env.find('=')).c_str(), env.substr(env.find('=') + 1).c_str(), 1);
      std::string log = dir_ + "/server.log";
      FILE* f = std::freopen(log.c_str(), "a", stderr);
      (void)f;
      std::vector<std::string> args = {kPython,       fixturePath(),
                                       "--listen",    "127.0.0.1:0",
                                       "--cert",      dir_ + "/server.crt",
                                       "--key",       dir_ + "/server.key",
                                       "--token",     kToken,
                                       "--objects",   objFile,
                                       "--port-file", portFile};
      for (const std::string& a : server_args_) args.push_back(a);
      std::vector<char*> argv;
      for (std::string& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(kPython, argv.data());
      ::_exit(127);
    }
    for (int i = 0; i < 200 && !fs::exists(portFile); i++) std::this_thread::sleep_for(25ms);
    ASSERT_TRUE(fs::exists(portFile))
        << "fake apiserver did not start: " << slurp(dir_ + "/server.log");
    port_ = std::stoi(slurp(portFile));
  }

  void stopServer() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
  }

  // POST to the fixture's control API (via curl, verified against the test CA).
  Json control(const std::string& path, const Json& body = Json::object()) {
    const std::string bodyFile = dir_ + "/body.json";
    writeFile(bodyFile, body.dump());
    std::string cmd =
        "curl -sS --max-time 10 --cacert " + dir_ + "/ca.crt -H 'Authorization: Bearer " + kToken +
        "' " + (path.rfind("GET ", 0) == 0 ? "" : "-X POST --data-binary @" + bodyFile + " ") +
        "https://127.0.0.1:" + std::to_string(port_) +
        (path.rfind("GET ", 0) == 0 ? path.substr(4) : path);
    FILE* p = ::popen(cmd.c_str(), "r");
    std::string out;
    char buf[4096];
    size_t n;
    while (p && (n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
    if (p) ::pclose(p);
    auto j = Json::parse(out, nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << cmd << " -> " << out;
    return j;
  }

  KubeSourceOptions options() {
    KubeSourceOptions o;
    o.config.host = "127.0.0.1";
    o.config.port = static_cast<uint16_t>(port_);
    o.config.token_file = dir_ + "/token";
    o.config.ca_file = dir_ + "/ca.crt";
    o.node_name = "node1";
    o.backoff_initial = 50ms;
    o.backoff_max = 400ms;
    o.connect_timeout = 3s;
    o.list_timeout = 5s;
    o.watch_timeout_s = 30;
    return o;
  }

  void startSource(KubeSourceOptions o) {
    auto s = KubeSource::create(&loop_, std::move(o));
    ASSERT_TRUE(s) << s.status().message();
    source_ = std::move(s.value());
    source_->setOnChange([this] { changes_++; });
    source_->start();
  }

  // Runs the loop until pred() or the limit.
  bool runUntil(const std::function<bool()>& pred, std::chrono::milliseconds limit = 10s) {
    auto deadline = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < deadline) {
      uv_run(&loop_, UV_RUN_NOWAIT);
      if (pred()) return true;
      std::this_thread::sleep_for(20ms);
    }
    uv_run(&loop_, UV_RUN_NOWAIT);
    return pred();
  }

  KubeResourceStats stat(const std::string& name) {
    for (auto& s : source_->stats())
      if (s.name == name) return s;
    ADD_FAILURE() << "no resource " << name;
    return {};
  }

  // The /api requests the server saw for pods with this field selector.
  std::vector<Json> podRequests(const std::string& selector, bool watch) {
    std::vector<Json> out;
    for (const Json& r : control("GET /fixture/requests")) {
      if (r["path"] != "/api/v1/pods") continue;
      if (r["query"].value("fieldSelector", "") != selector) continue;
      if ((r["query"].value("watch", "") == "1") != watch) continue;
      out.push_back(r["query"]);
    }
    return out;
  }

  const ClusterModel& model() { return source_->model(); }
  bool hasPod(const std::string& key) { return model().pods.count(key) > 0; }

  static Json baseObjects() {
    return Json::array({nsObj("mesh", true), nsObj("plain", false),
                        podObj("mesh", "a", "node1", "10.244.1.10", {{"app", "web"}}),
                        podObj("mesh", "b", "node2", "10.244.2.10", {{"app", "web"}}),
                        svcObj("mesh", "web", "10.96.0.10")});
  }

  static inline std::string dir_;
  std::vector<std::string> server_args_;  // extra fake_apiserver.py flags
  uv_loop_t loop_{};
  pid_t pid_ = -1;
  int port_ = 0;
  KubeSourcePtr source_;
  int changes_ = 0;
};

constexpr const char* kLocal = "pods (node node1)";
constexpr const char* kLocalSel = "spec.nodeName=node1";

TEST_F(KubeSourceTest, ListsThenWatchesIntoTheSameModelAsManifests) {
  startServer(baseObjects());
  startSource(options());
  ASSERT_TRUE(source_->waitForSync(10s)) << stat(kLocal).last_error;
  const ClusterModel& m = model();
  ASSERT_EQ(m.namespaces.size(), 2u);
  EXPECT_EQ(m.namespaces.at("mesh").meta.labels.at("weft.dev/dataplane-mode"), "ambient");
  ASSERT_TRUE(hasPod("mesh/a"));
  ASSERT_TRUE(hasPod("mesh/b")) << "other nodes' pods come from the second watch";
  const Pod& a = m.pods.at("mesh/a");
  EXPECT_EQ(a.node_name, "node1");
  EXPECT_EQ(a.service_account, "sa-a");
  ASSERT_EQ(a.ips.size(), 1u);
  EXPECT_EQ(a.ips[0].toString(), "10.244.1.10");
  EXPECT_EQ(a.meta.uid, deriveUid("Pod", "mesh", "a")) << "the server's uid is kept";
  ASSERT_EQ(m.services.count("mesh/web"), 1u);
  const Service& web = m.services.at("mesh/web");
  EXPECT_EQ(web.cluster_ips.at(0).toString(), "10.96.0.10");
  EXPECT_EQ(web.ports.at(0).target_port, 8080);
  EXPECT_EQ(serviceEndpoints(m, web).size(), 2u);

  // The requests a real server would see.
  auto lists = podRequests(kLocalSel, false);
  ASSERT_EQ(lists.size(), 1u);
  EXPECT_EQ(lists[0].value("limit", ""), "500");
  EXPECT_EQ(podRequests("spec.nodeName!=node1", false).size(), 1u);
  ASSERT_TRUE(runUntil([&] { return podRequests(kLocalSel, true).size() == 1; }));
  auto w = podRequests(kLocalSel, true)[0];
  EXPECT_EQ(w.value("resourceVersion", ""), stat(kLocal).resource_version);
  EXPECT_EQ(w.value("allowWatchBookmarks", ""), "true");

  // ADDED, MODIFIED, DELETED.
  control("/fixture/apply", podObj("mesh", "c", "node1", "10.244.1.11"));
  ASSERT_TRUE(runUntil([&] { return hasPod("mesh/c"); }));
  EXPECT_GT(changes_, 0);
  control("/fixture/apply",
          podObj("mesh", "c", "node1", "10.244.1.11", {{"weft.dev/dataplane-mode", "none"}}));
  ASSERT_TRUE(runUntil([&] {
    return hasPod("mesh/c") &&
           model().pods.at("mesh/c").meta.labels.count("weft.dev/dataplane-mode");
  }));
  EXPECT_FALSE(meshEnrolledByLabels(model(), model().pods.at("mesh/c")));
  control("/fixture/delete", {{"kind", "Pod"}, {"namespace", "mesh"}, {"name", "c"}});
  ASSERT_TRUE(runUntil([&] { return !hasPod("mesh/c"); }));
  control("/fixture/apply", nsObj("plain", true));
  ASSERT_TRUE(runUntil([&] {
    return model().namespaces.at("plain").meta.labels.count("weft.dev/dataplane-mode") == 1;
  }));
  EXPECT_EQ(stat(kLocal).lists, 1u) << "no re-list without a reason";
  EXPECT_EQ(stat(kLocal).events, 3u);
  EXPECT_EQ(stat(kLocal).malformed, 0u);
}

TEST_F(KubeSourceTest, ListIsPaginatedWithContinue) {
  Json objs = Json::array({nsObj("mesh", true)});
  for (int i = 0; i < 7; i++)
    objs.push_back(
        podObj("mesh", "p" + std::to_string(i), "node1", "10.244.1." + std::to_string(20 + i)));
  startServer(objs);
  auto o = options();
  o.list_page_size = 3;
  startSource(o);
  ASSERT_TRUE(source_->waitForSync(10s));
  EXPECT_EQ(model().pods.size(), 7u);
  auto lists = podRequests(kLocalSel, false);
  ASSERT_EQ(lists.size(), 3u) << "7 pods in pages of 3";
  EXPECT_FALSE(lists[1].value("continue", "").empty());
}

TEST_F(KubeSourceTest, DisconnectMidStreamResumesFromTheLastResourceVersion) {
  startServer(baseObjects());
  startSource(options());
  ASSERT_TRUE(source_->waitForSync(10s));
  ASSERT_TRUE(runUntil([&] { return podRequests(kLocalSel, true).size() == 1; }));
  control("/fixture/apply", podObj("mesh", "c", "node1", "10.244.1.11"));
  ASSERT_TRUE(runUntil([&] { return hasPod("mesh/c"); }));
  const std::string rvAfterC = stat(kLocal).resource_version;
  control("/fixture/script",
          {{"resource", "pods"}, {"selector", kLocalSel}, {"action", "disconnect"}});
  ASSERT_TRUE(runUntil([&] { return podRequests(kLocalSel, true).size() == 2; }))
      << "no new watch after the disconnect";
  EXPECT_EQ(podRequests(kLocalSel, true)[1].value("resourceVersion", ""), rvAfterC)
      << "the watch resumes where the stream broke";
  control("/fixture/apply", podObj("mesh", "d", "node1", "10.244.1.12"));
  ASSERT_TRUE(runUntil([&] { return hasPod("mesh/d"); }));
  EXPECT_EQ(stat(kLocal).lists, 1u) << "a disconnect is not a reason to re-list";
  EXPECT_GE(stat(kLocal).errors, 1u);
  EXPECT_NE(stat(kLocal).last_error.find("pods (node node1)"), std::string::npos)
      << stat(kLocal).last_error;
}

TEST_F(KubeSourceTest, HttpGoneOnWatchRelists) {
  startServer(baseObjects());
  startSource(options());
  ASSERT_TRUE(source_->waitForSync(10s));
  ASSERT_TRUE(runUntil([&] { return podRequests(kLocalSel, true).size() == 1; }));
  control("/fixture/script", {{"resource", "pods"},
                              {"selector", kLocalSel},
                              {"action", "status"},
                              {"code", 410},
                              {"verb", "watch"}});
  control("/fixture/script", {{"resource", "pods"}, {"selector", kLocalSel}, {"action", "end"}});
  ASSERT_TRUE(runUntil([&] { return stat(kLocal).lists == 2; })) << stat(kLocal).last_error;
  EXPECT_EQ(stat(kLocal).gone, 1u);
  EXPECT_TRUE(hasPod("mesh/a"));
  ASSERT_TRUE(runUntil([&] { return podRequests(kLocalSel, true).size() == 3; }));
  control("/fixture/apply", podObj("mesh", "e", "node1", "10.244.1.13"));
  ASSERT_TRUE(runUntil([&] { return hasPod("mesh/e"); })) << "watching again after the re-list";
}

TEST_F(KubeSourceTest, ErrorEvent410RelistsAndDropsWhatWasDeletedMeanwhile) {
  startServer(baseObjects());
  startSource(options());
  ASSERT_TRUE(source_->waitForSync(10s));
  ASSERT_TRUE(runUntil([&] { return podRequests(kLocalSel, true).size() == 1; }));
  // The object goes while its event is compacted away, then the watch breaks: the next watch
  // from the old version gets 200 + an ERROR event with a 410 Status, as from a real server.
  control("/fixture/delete",
          {{"kind", "Pod"}, {"namespace", "mesh"}, {"name", "a"}, {"silent", true}});
  control("/fixture/compact");
  control("/fixture/script",
          {{"resource", "pods"}, {"selector", kLocalSel}, {"action", "disconnect"}});
  ASSERT_TRUE(runUntil([&] { return stat(kLocal).gone >= 1 && stat(kLocal).lists == 2; }))
      << stat(kLocal).last_error;
  ASSERT_TRUE(runUntil([&] { return !hasPod("mesh/a"); }));
  // And an ERROR 410 event on a healthy stream.
  control("/fixture/script", {{"resource", "services"}, {"action", "gone_event"}});
  ASSERT_TRUE(runUntil([&] { return stat("services").lists == 2; }));
  EXPECT_EQ(stat("services").gone, 1u);
}

TEST_F(KubeSourceTest, MalformedEventsAreCountedAndSkippedAndTheWatchContinues) {
  startServer(baseObjects());
  auto o = options();
  o.max_event_bytes = 4096;
  startSource(o);
  ASSERT_TRUE(source_->waitForSync(10s));
  ASSERT_TRUE(runUntil([&] { return podRequests(kLocalSel, true).size() == 1; }));
  Json badIp = {{"type", "ADDED"}, {"object", podObj("mesh", "x", "node1", "10.244.1.300")}};
  Json badKind = {{"type", "ADDED"}, {"object", svcObj("mesh", "y", "10.96.0.11")}};
  Json goodButModifiedBad = {{"type", "MODIFIED"},
                             {"object", podObj("mesh", "a", "node1", "nope")}};
  std::vector<std::string> lines = {
      "this is not json",
      R"({"type": "ADDED"})",
      R"({"type": "RENAMED", "object": {}})",
      R"({"type": "ADDED", "object": "a string"})",
      badIp.dump(),
      badKind.dump(),
      goodButModifiedBad.dump(),
      std::string(5000, 'x'),
      std::string(100, '[') + std::string(100, ']'),
  };
  Json script = Json::array();
  for (const auto& l : lines)
    script.push_back(
        {{"resource", "pods"}, {"selector", kLocalSel}, {"action", "line"}, {"text", l}});
  control("/fixture/script", script);
  control("/fixture/apply", podObj("mesh", "ok", "node1", "10.244.1.14"));
  ASSERT_TRUE(runUntil([&] { return hasPod("mesh/ok"); }));
  EXPECT_EQ(stat(kLocal).malformed, lines.size());
  EXPECT_FALSE(hasPod("mesh/x"));
  EXPECT_EQ(model().pods.at("mesh/a").ips.at(0).toString(), "10.244.1.10")
      << "an invalid MODIFIED keeps the last good version";
  EXPECT_EQ(stat(kLocal).watches, 1u) << "the watch continued";
  EXPECT_EQ(stat(kLocal).lists, 1u);
}

TEST_F(KubeSourceTest, BookmarkMovesTheResourceVersionForTheNextWatch) {
  startServer(baseObjects());
  startSource(options());
  ASSERT_TRUE(source_->waitForSync(10s));
  ASSERT_TRUE(runUntil([&] { return podRequests(kLocalSel, true).size() == 1; }));
  // Changes elsewhere move the server's version; the bookmark tells this watch.
  control("/fixture/apply", svcObj("mesh", "other", "10.96.0.12"));
  control("/fixture/apply", svcObj("mesh", "other2", "10.96.0.13"));
  Json st = control("GET /fixture/state");
  const std::string serverRv = std::to_string(st["resourceVersion"].get<int>());
  control("/fixture/script",
          {{"resource", "pods"}, {"selector", kLocalSel}, {"action", "bookmark"}});
  ASSERT_TRUE(runUntil([&] { return stat(kLocal).bookmarks == 1; }));
  EXPECT_EQ(stat(kLocal).resource_version, serverRv);
  control("/fixture/script", {{"resource", "pods"}, {"selector", kLocalSel}, {"action", "end"}});
  ASSERT_TRUE(runUntil([&] { return podRequests(kLocalSel, true).size() == 2; }, 5s));
  EXPECT_EQ(podRequests(kLocalSel, true)[1].value("resourceVersion", ""), serverRv);
}

TEST_F(KubeSourceTest, EventsSplitAcrossChunksAreReassembled) {
  startServer(baseObjects(), "FAKE_APISERVER_FRAGMENT=1");
  startSource(options());
  ASSERT_TRUE(source_->waitForSync(10s));
  control("/fixture/apply", podObj("mesh", "c", "node1", "10.244.1.11"));
  ASSERT_TRUE(runUntil([&] { return hasPod("mesh/c"); }));
  EXPECT_EQ(stat(kLocal).malformed, 0u);
}

TEST_F(KubeSourceTest, PodsWithoutAddressFinishedOrHostNetworkStayOutOfTheModel) {
  startServer(baseObjects());
  startSource(options());
  ASSERT_TRUE(source_->waitForSync(10s));
  Json pending = podObj("mesh", "p", "node2", "10.244.2.15");  // another node's
  pending["status"] = {{"phase", "Pending"}};
  control("/fixture/apply", pending);
  Json host = podObj("mesh", "h", "node1", "10.243.0.1");
  host["spec"]["hostNetwork"] = true;
  control("/fixture/apply", host);
  Json done = podObj("mesh", "d", "node1", "10.244.1.16");
  done["status"]["phase"] = "Succeeded";
  control("/fixture/apply", done);
  control("/fixture/apply", podObj("mesh", "marker", "node1", "10.244.1.17"));
  ASSERT_TRUE(runUntil([&] { return hasPod("mesh/marker"); }));
  EXPECT_FALSE(hasPod("mesh/p"));
  EXPECT_FALSE(hasPod("mesh/h"));
  EXPECT_FALSE(hasPod("mesh/d"));
  EXPECT_EQ(stat(kLocal).malformed, 0u) << "these are normal states, not bad input";
  control("/fixture/apply", podObj("mesh", "p", "node2", "10.244.2.15"));  // got its IP
  ASSERT_TRUE(runUntil([&] { return hasPod("mesh/p"); }));
}

// This node's pods are kept while they have no address: the API server learns it only after
// CNI ADD returned, and ADD enrolls the pod (with the CNI prevResult's addresses) meanwhile.
TEST_F(KubeSourceTest, LocalPodWithoutAddressIsInTheModelWithNoIps) {
  startServer(baseObjects());
  startSource(options());
  ASSERT_TRUE(source_->waitForSync(10s));
  Json pending = podObj("mesh", "p", "node1", "10.244.1.15");
  pending["status"] = {{"phase", "Pending"}};
  control("/fixture/apply", pending);
  ASSERT_TRUE(runUntil([&] { return hasPod("mesh/p"); }));
  EXPECT_TRUE(model().pods.at("mesh/p").ips.empty());
  EXPECT_EQ(model().pods.at("mesh/p").service_account, "sa-p");
  control("/fixture/apply", podObj("mesh", "p", "node1", "10.244.1.15"));
  ASSERT_TRUE(runUntil([&] { return !model().pods.at("mesh/p").ips.empty(); }));
  EXPECT_EQ(model().pods.at("mesh/p").ips[0].toString(), "10.244.1.15");
}

TEST_F(KubeSourceTest, WrongTokenFailsNamingTheResourceUntilTheFileIsFixed) {
  startServer(baseObjects());
  auto o = options();
  o.config.token_file = dir_ + "/token-wrong";
  writeFile(o.config.token_file, "not-the-token");
  startSource(o);
  EXPECT_FALSE(source_->waitForSync(1s));
  auto s = stat("namespaces");
  EXPECT_GE(s.errors, 1u);
  EXPECT_NE(s.last_error.find("kubernetes namespaces: list: HTTP 401"), std::string::npos)
      << s.last_error;
  writeFile(o.config.token_file, kToken);  // rotated: read again on the next connect
  EXPECT_TRUE(source_->waitForSync(10s));
}

TEST_F(KubeSourceTest, ServerNotSignedByTheClusterCaIsRefused) {
  startServer(baseObjects());
  auto o = options();
  o.config.ca_file = dir_ + "/other.crt";
  startSource(o);
  EXPECT_FALSE(source_->waitForSync(1s));
  auto s = stat("services");
  EXPECT_NE(s.last_error.find("certificate"), std::string::npos) << s.last_error;
  EXPECT_EQ(podRequests(kLocalSel, false).size(), 0u) << "nothing was sent to that server";
}

TEST_F(KubeSourceTest, StopsPromptlyWhileWatching) {
  startServer(baseObjects());
  startSource(options());
  ASSERT_TRUE(source_->waitForSync(10s));
  auto t0 = std::chrono::steady_clock::now();
  source_->stop();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 1s);
}

// Pure parts.

TEST(KubeConfig, InClusterEnvironmentAndOverrides) {
  KubeConfig c;
  ASSERT_TRUE(parseServer("https://[fd00::1]:6443", &c));
  EXPECT_EQ(c.host, "fd00::1");
  EXPECT_EQ(c.port, 6443);
  ASSERT_TRUE(parseServer("10.0.0.1:443", &c));
  EXPECT_EQ(c.host, "10.0.0.1");
  EXPECT_FALSE(parseServer("http://10.0.0.1:80", &c)) << "plain http is refused";
  EXPECT_FALSE(parseServer("https://10.0.0.1:99999", &c));
  EXPECT_FALSE(parseServer("https://fd00::1:443", &c)) << "IPv6 needs brackets";
  ::unsetenv("KUBERNETES_SERVICE_HOST");
  auto r = loadKubeConfig({});
  ASSERT_FALSE(r);
  EXPECT_NE(r.status().message().find("KUBERNETES_SERVICE_HOST"), std::string::npos);
}

// --- EndpointSlices and the security.weft.dev kinds ---------------------------------------

constexpr const char* kSlices = "endpointslices";

std::vector<std::string> endpointsOf(const ClusterModel& m, const std::string& svc) {
  std::vector<std::string> out;
  auto it = m.services.find(svc);
  if (it == m.services.end()) return out;
  for (const ResolvedEndpoint& e : resolveServiceEndpoints(m, it->second)) {
    std::string s = e.ip.toString();
    for (const auto& [sp, tp] : e.target_ports) s += fmt::format(" {}->{}", sp, tp);
    out.push_back(s);
  }
  return out;
}

using Strings = std::vector<std::string>;

// A Service's endpoints come from its EndpointSlices (not its selector): ready addresses of both
// families, other nodes' pods included, ports by name; add/modify/delete of a slice by watch.
TEST_F(KubeSourceTest, EndpointSlicesByWatchChangeTheServicesEndpoints) {
  Json objs = baseObjects();
  objs.push_back(sliceObj("mesh", "web-abc", "web", "IPv4",
                          {sliceEp("10.244.1.10", "a", "node1"),
                           sliceEp("10.244.2.10", "b", "node2"),
                           sliceEp("10.244.2.11", "gone", "node2", /*ready=*/false)},
                          {{{"name", "http"}, {"port", 8080}, {"protocol", "TCP"}}}));
  // Not a Service's slice (no label): the label selector keeps it out of the list.
  Json stray = sliceObj("mesh", "stray", "web", "IPv4", {sliceEp("10.244.9.9", "x", "node1")},
                        Json::array());
  stray["metadata"]["labels"].erase("kubernetes.io/service-name");
  objs.push_back(stray);
  startServer(objs);
  startSource(options());
  ASSERT_TRUE(source_->waitForSync(10s));
  EXPECT_TRUE(model().endpoints_from_slices);
  EXPECT_EQ(endpointsOf(model(), "mesh/web"),
            (Strings{"10.244.1.10 80->8080", "10.244.2.10 80->8080"}));
  auto proto = [&] {
    return weft::agent::serviceProto(model(), model().services.at("mesh/web"));
  };
  ASSERT_EQ(proto().endpoints_size(), 2);
  EXPECT_EQ(proto().endpoints(1).workload_uid(), model().pods.at("mesh/b").meta.uid)
      << "the endpoint on node2 names its workload (HBONE to it)";
  // ADDED: the IPv6 slice of the same service.
  control("/fixture/apply",
          sliceObj("mesh", "web-v6", "web", "IPv6", {sliceEp("fd00:10:244:2::10", "b", "node2")},
                   {{{"name", "http"}, {"port", 8080}, {"protocol", "TCP"}}}));
  ASSERT_TRUE(runUntil([&] { return endpointsOf(model(), "mesh/web").size() == 3; }));
  // MODIFIED: a pod turns unready, the port moves.
  control("/fixture/apply",
          sliceObj("mesh", "web-abc", "web", "IPv4",
                   {sliceEp("10.244.1.10", "a", "node1", false),
                    sliceEp("10.244.2.10", "b", "node2")},
                   {{{"name", "http"}, {"port", 9090}, {"protocol", "TCP"}}}));
  ASSERT_TRUE(runUntil([&] {
    return endpointsOf(model(), "mesh/web") ==
           Strings{"10.244.2.10 80->9090", "fd00:10:244:2::10 80->8080"};
  })) << fmt::format("{}", fmt::join(endpointsOf(model(), "mesh/web"), ", "));
  // DELETED.
  control("/fixture/delete",
          {{"kind", "EndpointSlice"}, {"namespace", "mesh"}, {"name", "web-abc"}});
  ASSERT_TRUE(runUntil([&] {
    return endpointsOf(model(), "mesh/web") == Strings{"fd00:10:244:2::10 80->8080"};
  }));
  EXPECT_EQ(stat(kSlices).malformed, 0u);
  // The requests carried the label selector.
  bool selected = false;
  for (const Json& r : control("GET /fixture/requests"))
    if (r["path"] == "/apis/discovery.k8s.io/v1/endpointslices")
      selected = r["query"].value("labelSelector", "") == "kubernetes.io/service-name";
  EXPECT_TRUE(selected);
}

TEST_F(KubeSourceTest, MalformedEndpointSliceIsRefusedNamingTheFieldAndLastGoodStays) {
  Json objs = baseObjects();
  objs.push_back(sliceObj("mesh", "web-abc", "web", "IPv4", {sliceEp("10.244.1.10", "a", "node1")},
                          {{{"name", "http"}, {"port", 8080}}}));
  startServer(objs);
  startSource(options());
  ASSERT_TRUE(source_->waitForSync(10s));
  ASSERT_EQ(endpointsOf(model(), "mesh/web"), Strings{"10.244.1.10 80->8080"});
  // An IPv6 address in an IPv4 slice: refused, the previous version stays in force.
  control("/fixture/apply",
          sliceObj("mesh", "web-abc", "web", "IPv4", {sliceEp("fd00::1", "a", "node1")},
                   {{{"name", "http"}, {"port", 8080}}}));
  ASSERT_TRUE(runUntil([&] { return stat(kSlices).malformed >= 1; }));
  EXPECT_EQ(endpointsOf(model(), "mesh/web"), Strings{"10.244.1.10 80->8080"});
  auto bad = toModelObject(ResourceKind::kEndpointSlice,
                           sliceObj("mesh", "web-abc", "web", "IPv4",
                                    {sliceEp("fd00::1", "a", "node1")}, Json::array()));
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.status().message(),
            "EndpointSlice mesh/web-abc: endpoints[0].addresses[0]: \"fd00::1\" is not an IPv4 "
            "address");
  Json badPort = sliceObj("mesh", "s", "web", "IPv4", Json::array(), {{{"port", 0}}});
  EXPECT_EQ(toModelObject(ResourceKind::kEndpointSlice, badPort).status().message(),
            "EndpointSlice mesh/s: ports[0].port: must be an integer 1-65535");
  // The stream goes on: a good version applies.
  control("/fixture/apply",
          sliceObj("mesh", "web-abc", "web", "IPv4", {sliceEp("10.244.1.12", "a", "node1")},
                   {{{"name", "http"}, {"port", 8080}}}));
  ASSERT_TRUE(runUntil([&] {
    return endpointsOf(model(), "mesh/web") == Strings{"10.244.1.12 80->8080"};
  }));
}

TEST_F(KubeSourceTest, GoneOnTheEndpointSliceWatchRelists) {
  Json objs = baseObjects();
  objs.push_back(sliceObj("mesh", "web-abc", "web", "IPv4", {sliceEp("10.244.1.10", "a", "node1")},
                          {{{"name", "http"}, {"port", 8080}}}));
  startServer(objs);
  startSource(options());
  ASSERT_TRUE(source_->waitForSync(10s));
  ASSERT_TRUE(runUntil([&] { return stat(kSlices).watches >= 1; }));
  // Deleted while compacted away (no event), then 410 both ways: only a re-list can tell.
  control("/fixture/delete", {{"kind", "EndpointSlice"},
                              {"namespace", "mesh"},
                              {"name", "web-abc"},
                              {"silent", true}});
  control("/fixture/compact");
  control("/fixture/script", {{"resource", kSlices}, {"action", "gone_event"}});
  ASSERT_TRUE(runUntil([&] { return endpointsOf(model(), "mesh/web").empty(); }));
  EXPECT_GE(stat(kSlices).gone, 1u);
  EXPECT_GE(stat(kSlices).lists, 2u);
  control("/fixture/script", {{"resource", kSlices}, {"action", "status"}, {"code", 410},
                              {"verb", "watch"}});
  control("/fixture/script", {{"resource", kSlices}, {"action", "end"}});
  ASSERT_TRUE(runUntil([&] { return stat(kSlices).gone >= 2; }));
  control("/fixture/apply", sliceObj("mesh", "web-new", "web", "IPv4",
                                     {sliceEp("10.244.2.10", "b", "node2")},
                                     {{{"name", "http"}, {"port", 8080}}}));
  ASSERT_TRUE(runUntil([&] {
    return endpointsOf(model(), "mesh/web") == Strings{"10.244.2.10 80->8080"};
  }));
}

TEST_F(KubeSourceTest, AuthorizationPolicyByWatchChangesTheModelAndBadOnesAreRefused) {
  startServer(baseObjects());
  startSource(options());
  ASSERT_TRUE(source_->waitForSync(10s));
  EXPECT_TRUE(model().authorization_policies.empty());
  Json deny = apObj("mesh", "deny-plain", "DENY",
                    {{{"from", {{{"source", {{"namespaces", {"plain"}}}}}}},
                      {"to", {{{"operation", {{"ports", {"8080"}}}}}}}}});
  control("/fixture/apply", deny);
  ASSERT_TRUE(runUntil([&] { return model().authorization_policies.count("mesh/deny-plain"); }));
  const auto& spec = model().authorization_policies.at("mesh/deny-plain").spec;
  EXPECT_EQ(spec.action(), weft::node::v1::AuthorizationPolicy::DENY);
  ASSERT_EQ(spec.rules_size(), 1);
  EXPECT_EQ(spec.rules(0).from(0).namespaces(0), "plain");
  EXPECT_EQ(spec.rules(0).to(0).ports(0), 8080u);
  EXPECT_EQ(spec.match_labels().at("app"), "web");
  // What reaches the ztunnel in the next delta.
  ClusterModel before;
  auto delta = clusterDelta(before, model());
  ASSERT_EQ(delta.upsert_authorization_policies_size(), 1);
  // A bad edit (CUSTOM) is refused naming kind ns/name and field; the good version stays.
  Json custom = deny;
  custom["spec"]["action"] = "CUSTOM";
  auto r = toModelObject(ResourceKind::kAuthorizationPolicy, custom);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.status().message(),
            "AuthorizationPolicy mesh/deny-plain: spec.action: CUSTOM is not supported (no "
            "external authorizer)");
  control("/fixture/apply", custom);
  ASSERT_TRUE(runUntil([&] { return stat("authorizationpolicies").malformed >= 1; }));
  EXPECT_EQ(model().authorization_policies.at("mesh/deny-plain").spec.action(),
            weft::node::v1::AuthorizationPolicy::DENY);
  Json unknown = deny;
  unknown["spec"]["rules"][0]["from"][0]["source"]["bogus"] = {"x"};
  EXPECT_NE(toModelObject(ResourceKind::kAuthorizationPolicy, unknown)
                .status()
                .message()
                .find("AuthorizationPolicy mesh/deny-plain: spec.rules[0].from[0].source.bogus"),
            std::string::npos);
  // Deleted by watch: gone from the model.
  control("/fixture/delete",
          {{"kind", "AuthorizationPolicy"}, {"namespace", "mesh"}, {"name", "deny-plain"}});
  ASSERT_TRUE(runUntil([&] { return model().authorization_policies.empty(); }));
  // 410 on the policy watch: re-listed, and a deletion nobody saw (compacted) is noticed.
  control("/fixture/apply", apObj("mesh", "second", "DENY",
                                  {{{"from", {{{"source", {{"namespaces", {"plain"}}}}}}}}}));
  ASSERT_TRUE(runUntil([&] { return model().authorization_policies.count("mesh/second"); }));
  const uint64_t lists = stat("authorizationpolicies").lists;
  control("/fixture/delete", {{"kind", "AuthorizationPolicy"},
                              {"namespace", "mesh"},
                              {"name", "second"},
                              {"silent", true}});
  control("/fixture/compact");
  control("/fixture/script", {{"resource", "authorizationpolicies"}, {"action", "gone_event"}});
  ASSERT_TRUE(runUntil([&] { return model().authorization_policies.empty(); }));
  EXPECT_GE(stat("authorizationpolicies").gone, 1u);
  EXPECT_GT(stat("authorizationpolicies").lists, lists);
}

TEST_F(KubeSourceTest, PeerAuthenticationByWatchAndOnlyOnePerNamespace) {
  startServer(baseObjects());
  startSource(options());
  ASSERT_TRUE(source_->waitForSync(10s));
  control("/fixture/apply", paObj("mesh", "strict", "STRICT"));
  ASSERT_TRUE(runUntil([&] { return model().peer_authentications.count("mesh"); }));
  EXPECT_EQ(model().peer_authentications.at("mesh").mode, MtlsMode::kStrict);
  EXPECT_EQ(effectiveMtls(model(), "mesh").mode, MtlsMode::kStrict);
  // A second one in the namespace: the first by name stays in force.
  control("/fixture/apply", paObj("mesh", "zz-permissive", "PERMISSIVE"));
  ASSERT_TRUE(runUntil([&] { return stat("peerauthentications").objects == 2; }));
  EXPECT_EQ(model().peer_authentications.at("mesh").meta.name, "strict");
  auto bad = toModelObject(ResourceKind::kPeerAuthentication, paObj("mesh", "x", "DISABLE"));
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.status().message(),
            "PeerAuthentication mesh/x: spec.mtls.mode: DISABLE is not supported (mesh pods "
            "always accept mTLS); use PERMISSIVE");
}

// A CRD that is not installed (404 on list) does not stop the source: synced (empty), logged
// once, listed again with backoff; once installed its objects arrive.
TEST_F(KubeSourceTest, MissingCrdDoesNotBreakTheSourceAndIsRetried) {
  server_args_ = {"--missing", "authorizationpolicies", "--missing", "peerauthentications"};
  startServer(baseObjects());
  startSource(options());
  ASSERT_TRUE(source_->waitForSync(10s)) << "a missing CRD must not block the start";
  EXPECT_TRUE(hasPod("mesh/a"));
  KubeResourceStats st = stat("authorizationpolicies");
  EXPECT_TRUE(st.synced);
  EXPECT_TRUE(st.missing);
  EXPECT_NE(st.last_error.find("HTTP 404"), std::string::npos) << st.last_error;
  EXPECT_NE(st.last_error.find("CRD"), std::string::npos) << st.last_error;
  // Retried (backoff 50..400 ms here).
  ASSERT_TRUE(runUntil([&] { return stat("authorizationpolicies").errors >= 3; }));
  EXPECT_EQ(stat("authorizationpolicies").lists, 0u);
  control("/fixture/crd", {{"resource", "authorizationpolicies"}, {"installed", true}});
  control("/fixture/apply", apObj("mesh", "allow-all", "ALLOW",
                                  {{{"from", {{{"source", {{"namespaces", {"mesh"}}}}}}}}}));
  ASSERT_TRUE(runUntil([&] { return model().authorization_policies.count("mesh/allow-all"); }));
  EXPECT_FALSE(stat("authorizationpolicies").missing);
  EXPECT_TRUE(stat("peerauthentications").missing);
  // Everything else kept working meanwhile.
  control("/fixture/apply", podObj("mesh", "late", "node1", "10.244.1.30"));
  ASSERT_TRUE(runUntil([&] { return hasPod("mesh/late"); }));
}

TEST(KubeObjects, ConversionUsesTheManifestValidation) {
  Json svc = svcObj("mesh", "web", "10.96.0.10");
  svc["spec"]["ports"][0]["targetPort"] = "http";  // a named port: resolved per endpoint
  auto named = toModelObject(ResourceKind::kService, svc);
  ASSERT_TRUE(named) << named.status().message();
  EXPECT_EQ(std::get<Service>(*named.value()).ports[0].target_port_name, "http");
  svc["spec"]["ports"][0]["targetPort"] = "8080";  // a string, as JSON says: not a valid name
  auto r = toModelObject(ResourceKind::kService, svc);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.status().message(),
            "Service mesh/web: spec.ports[0].targetPort: \"8080\" is neither a port number nor "
            "a port name (a name has 1-15 of a-z, 0-9, '-' and at least one letter)");
  Json pod = podObj("mesh", "a", "node1", "10.244.1.10");
  pod["kind"] = "Service";
  EXPECT_FALSE(toModelObject(ResourceKind::kPod, pod)) << "kind must match the resource";
  pod.erase("kind");  // list items carry none
  auto ok = toModelObject(ResourceKind::kPod, pod);
  ASSERT_TRUE(ok) << ok.status().message();
  ASSERT_TRUE(ok.value().has_value());
  EXPECT_EQ(std::get<Pod>(*ok.value()).meta.name, "a");
  EXPECT_FALSE(parseJson(std::string(100, '[') + std::string(100, ']')));
  EXPECT_FALSE(parseWatchEvent(R"({"type":"ADDED","object":[]})"));
  EXPECT_EQ(apiStatusOf(Json{{"kind", "Status"}, {"code", 410}}).code, 410);
}

}  // namespace
}  // namespace weft::agent::kube
