// weft-cni tests: parsing helpers in-process; the real binary as a subprocess with a CNI
// environment and stdin config, talking to a fake agent on a unix socket made by the test.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "cni/plugin.h"
#include "common/fd.h"

namespace weft::cni {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

// A stand-in for weft-agent's CNI socket: answers every request with `reply` after `delay`.
class FakeAgent {
 public:
  explicit FakeAgent(const std::string& path) : path_(path) {
    listen_.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    ok_ = listen_.valid() &&
          ::bind(listen_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
          ::listen(listen_.get(), 8) == 0;
    if (ok_) thread_ = std::thread([this] { serve(); });
  }
  ~FakeAgent() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
    ::unlink(path_.c_str());
  }
  bool ok() const { return ok_; }
  void setReply(json reply, std::chrono::milliseconds delay = {}) {
    std::lock_guard<std::mutex> lock(mu_);
    reply_ = std::move(reply);
    delay_ = delay;
  }
  std::vector<json> requests() {
    std::lock_guard<std::mutex> lock(mu_);
    return requests_;
  }

 private:
  void serve() {
    while (!stop_) {
      pollfd p{listen_.get(), POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      UniqueFd conn(::accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (!conn.valid()) continue;
      std::string in;
      char buf[4096];
      // Read until the plugin half-closes (bounded: 64 KiB, 5 s).
      auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
      while (in.size() < 65536 && std::chrono::steady_clock::now() < until) {
        pollfd q{conn.get(), POLLIN, 0};
        if (::poll(&q, 1, 100) <= 0) continue;
        ssize_t n = ::recv(conn.get(), buf, sizeof(buf), 0);
        if (n <= 0) break;
        in.append(buf, static_cast<size_t>(n));
      }
      json reply;
      std::chrono::milliseconds delay;
      {
        std::lock_guard<std::mutex> lock(mu_);
        requests_.push_back(json::parse(in, nullptr, false));
        reply = reply_;
        delay = delay_;
      }
      auto wake = std::chrono::steady_clock::now() + delay;
      while (!stop_ && std::chrono::steady_clock::now() < wake) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      std::string out = reply.dump();
      (void)::send(conn.get(), out.data(), out.size(), MSG_NOSIGNAL);
    }
  }

  std::string path_;
  UniqueFd listen_;
  bool ok_ = false;
  std::atomic<bool> stop_{false};
  std::thread thread_;
  std::mutex mu_;
  json reply_ = json{{"ok", true}};
  std::chrono::milliseconds delay_{0};
  std::vector<json> requests_;
};

struct PluginRun {
  int exitCode = -1;
  std::string out;
  json doc() const { return json::parse(out, nullptr, false); }
};

// Runs the built weft-cni with exactly `env` and `input` on stdin; kills it after 20 s.
PluginRun runPlugin(const std::vector<std::string>& env, const std::string& input) {
  int in[2], out[2];
  if (::pipe2(in, O_CLOEXEC) != 0 || ::pipe2(out, O_CLOEXEC) != 0) return {};
  pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(in[0], STDIN_FILENO);
    ::dup2(out[1], STDOUT_FILENO);
    std::vector<char*> envp;
    for (const auto& e : env) envp.push_back(const_cast<char*>(e.c_str()));
    envp.push_back(nullptr);
    char* argv[] = {const_cast<char*>(WEFT_CNI_BINARY), nullptr};
    ::execve(WEFT_CNI_BINARY, argv, envp.data());
    ::_exit(127);
  }
  ::close(in[0]);
  ::close(out[1]);
  signal(SIGPIPE, SIG_IGN);
  (void)::write(in[1], input.data(), input.size());
  ::close(in[1]);
  PluginRun r;
  char buf[4096];
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (std::chrono::steady_clock::now() < deadline) {
    pollfd p{out[0], POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    ssize_t n = ::read(out[0], buf, sizeof(buf));
    if (n <= 0) break;
    r.out.append(buf, static_cast<size_t>(n));
  }
  ::close(out[0]);
  int status = 0;
  if (std::chrono::steady_clock::now() >= deadline) ::kill(pid, SIGKILL);
  ::waitpid(pid, &status, 0);
  r.exitCode = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

class CniBinaryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/weft-cni-test-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    socket_ = dir_ + "/cni.sock";
    netns_ = dir_ + "/netns";  // any existing file stands for a netns path here
    std::FILE* f = std::fopen(netns_.c_str(), "w");
    ASSERT_NE(f, nullptr);
    std::fclose(f);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::vector<std::string> env(const std::string& command, const std::string& netns) {
    return {"CNI_COMMAND=" + command,
            "CNI_CONTAINERID=c0ffee-1",
            "CNI_NETNS=" + netns,
            "CNI_IFNAME=eth0",
            "CNI_PATH=/opt/cni/bin",
            "CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;"
            "K8S_POD_UID=uid-123"};
  }
  std::string config(const json& prev = nullptr, int timeout = 5) {
    json c{{"cniVersion", "1.0.0"},
           {"name", "weft"},
           {"type", "weft-cni"},
           {"agent_socket", socket_},
           {"timeout_seconds", timeout}};
    if (!prev.is_null()) c["prevResult"] = prev;
    return c.dump();
  }

  std::string dir_, socket_, netns_;
};

json samplePrevResult() {
  return json::parse(R"({
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/run/netns/x"}],
    "ips": [{"address": "10.244.1.5/32", "interface": 0},
            {"address": "fd00:10:244:1::5/128", "interface": 0}],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
    "dns": {"nameservers": ["10.96.0.10"]},
    "x-extra": {"kept": [1, 2, 3]}
  })");
}

TEST_F(CniBinaryTest, VersionListsSupportedVersions) {
  PluginRun r = runPlugin({"CNI_COMMAND=VERSION"}, R"({"cniVersion":"0.4.0"})");
  ASSERT_EQ(r.exitCode, 0) << r.out;
  json doc = r.doc();
  EXPECT_EQ(doc["cniVersion"], "0.4.0");
  EXPECT_EQ(doc["supportedVersions"], json::array({"0.4.0", "1.0.0"}));

  PluginRun empty = runPlugin({"CNI_COMMAND=VERSION"}, "");
  ASSERT_EQ(empty.exitCode, 0) << empty.out;
  EXPECT_EQ(empty.doc()["supportedVersions"], json::array({"0.4.0", "1.0.0"}));
}

TEST_F(CniBinaryTest, AddPassesPrevResultThroughAndTellsTheAgent) {
  FakeAgent agent(socket_);
  ASSERT_TRUE(agent.ok());
  json prev = samplePrevResult();
  PluginRun r = runPlugin(env("ADD", netns_), config(prev));
  ASSERT_EQ(r.exitCode, 0) << r.out;
  EXPECT_EQ(r.doc(), prev);

  auto reqs = agent.requests();
  ASSERT_EQ(reqs.size(), 1u);
  EXPECT_EQ(reqs[0], (json{{"command", "ADD"},
                           {"container_id", "c0ffee-1"},
                           {"netns", netns_},
                           {"ifname", "eth0"},
                           {"pod_name", "web-1"},
                           {"pod_namespace", "shop"},
                           {"pod_uid", "uid-123"},
                           // The agent enrolls with these while the API has no podIPs yet.
                           {"pod_ips", {"10.244.1.5", "fd00:10:244:1::5"}}}));
}

TEST_F(CniBinaryTest, AddWithoutPrevResultSendsNoPodIps) {
  FakeAgent agent(socket_);
  ASSERT_TRUE(agent.ok());
  PluginRun r = runPlugin(env("ADD", netns_), config());
  ASSERT_EQ(r.exitCode, 0) << r.out;
  auto reqs = agent.requests();
  ASSERT_EQ(reqs.size(), 1u);
  EXPECT_FALSE(reqs[0].contains("pod_ips")) << reqs[0].dump();
}

TEST_F(CniBinaryTest, AddResultCarriesTheConfigVersion) {
  FakeAgent agent(socket_);
  ASSERT_TRUE(agent.ok());
  json prev = samplePrevResult();
  prev.erase("cniVersion");
  PluginRun r = runPlugin(env("ADD", netns_), config(prev));
  ASSERT_EQ(r.exitCode, 0) << r.out;
  prev["cniVersion"] = "1.0.0";
  EXPECT_EQ(r.doc(), prev);
}

TEST_F(CniBinaryTest, AddWithoutPrevResultGivesMinimalResult) {
  FakeAgent agent(socket_);
  ASSERT_TRUE(agent.ok());
  PluginRun r = runPlugin(env("ADD", netns_), config());
  ASSERT_EQ(r.exitCode, 0) << r.out;
  json doc = r.doc();
  EXPECT_EQ(doc["cniVersion"], "1.0.0");
  EXPECT_TRUE(doc["interfaces"].is_array());
  EXPECT_TRUE(doc["ips"].is_array());
}

TEST_F(CniBinaryTest, AddWithMissingNetnsFailsWithCode4AndDoesNotAsk) {
  FakeAgent agent(socket_);
  ASSERT_TRUE(agent.ok());
  PluginRun r = runPlugin(env("ADD", dir_ + "/no-such-netns"), config(samplePrevResult()));
  EXPECT_NE(r.exitCode, 0);
  json doc = r.doc();
  ASSERT_TRUE(doc.is_object()) << r.out;
  EXPECT_EQ(doc["code"], 4);
  EXPECT_EQ(doc["cniVersion"], "1.0.0");
  EXPECT_TRUE(doc["msg"].is_string());
  EXPECT_NE(doc["details"].get<std::string>().find("no-such-netns"), std::string::npos);
  EXPECT_TRUE(agent.requests().empty());
}

TEST_F(CniBinaryTest, AgentDownIsTryAgainLater) {
  // No FakeAgent: nothing listens at socket_.
  PluginRun r = runPlugin(env("ADD", netns_), config(samplePrevResult()));
  EXPECT_NE(r.exitCode, 0);
  EXPECT_EQ(r.doc()["code"], 11) << r.out;
}

TEST_F(CniBinaryTest, AgentSilentPastTimeoutIsTryAgainLater) {
  FakeAgent agent(socket_);
  ASSERT_TRUE(agent.ok());
  agent.setReply(json{{"ok", true}}, std::chrono::milliseconds(3000));
  auto start = std::chrono::steady_clock::now();
  PluginRun r = runPlugin(env("ADD", netns_), config(samplePrevResult(), 1));
  auto took = std::chrono::steady_clock::now() - start;
  EXPECT_NE(r.exitCode, 0);
  EXPECT_EQ(r.doc()["code"], 11) << r.out;
  EXPECT_LT(took, std::chrono::milliseconds(2500));
}

TEST_F(CniBinaryTest, AgentRefusalIsPassedOn) {
  FakeAgent agent(socket_);
  ASSERT_TRUE(agent.ok());
  agent.setReply(json{{"ok", false}, {"code", 101}, {"msg", "enroll failed"}, {"details", "x"}});
  PluginRun r = runPlugin(env("ADD", netns_), config(samplePrevResult()));
  EXPECT_NE(r.exitCode, 0);
  json doc = r.doc();
  EXPECT_EQ(doc["code"], 101) << r.out;
  EXPECT_EQ(doc["msg"], "enroll failed");
  EXPECT_EQ(doc["details"], "x");
}

TEST_F(CniBinaryTest, MalformedAgentAnswerIsAnError) {
  FakeAgent agent(socket_);
  ASSERT_TRUE(agent.ok());
  agent.setReply(json::array({1, 2}));
  PluginRun r = runPlugin(env("ADD", netns_), config());
  EXPECT_NE(r.exitCode, 0);
  EXPECT_EQ(r.doc()["code"], 5) << r.out;
}

TEST_F(CniBinaryTest, DelIsIdempotentWithoutNetns) {
  FakeAgent agent(socket_);
  ASSERT_TRUE(agent.ok());
  for (int i = 0; i < 2; ++i) {
    PluginRun r = runPlugin(env("DEL", dir_ + "/gone"), config(samplePrevResult()));
    EXPECT_EQ(r.exitCode, 0) << r.out;
    EXPECT_EQ(r.out, "");
  }
  // Without CNI_NETNS at all.
  auto e = env("DEL", "");
  e.erase(e.begin() + 2);
  PluginRun r = runPlugin(e, config());
  EXPECT_EQ(r.exitCode, 0) << r.out;
  ASSERT_EQ(agent.requests().size(), 3u);
  EXPECT_EQ(agent.requests()[2]["command"], "DEL");
  EXPECT_EQ(agent.requests()[2]["netns"], "");
}

TEST_F(CniBinaryTest, DelOfAPodTheAgentDoesNotKnowSucceeds) {
  FakeAgent agent(socket_);
  ASSERT_TRUE(agent.ok());
  agent.setReply(json{{"ok", false}, {"code", 3}, {"msg", "unknown container"}});
  PluginRun r = runPlugin(env("DEL", dir_ + "/gone"), config());
  EXPECT_EQ(r.exitCode, 0) << r.out;
}

TEST_F(CniBinaryTest, DelWithAgentDownFailsSoTheRuntimeRetries) {
  PluginRun r = runPlugin(env("DEL", dir_ + "/gone"), config());
  EXPECT_NE(r.exitCode, 0);
  EXPECT_EQ(r.doc()["code"], 11) << r.out;
}

TEST_F(CniBinaryTest, CheckSucceedsSilently) {
  FakeAgent agent(socket_);
  ASSERT_TRUE(agent.ok());
  PluginRun r = runPlugin(env("CHECK", netns_), config(samplePrevResult()));
  EXPECT_EQ(r.exitCode, 0) << r.out;
  EXPECT_EQ(r.out, "");
  ASSERT_EQ(agent.requests().size(), 1u);
  EXPECT_EQ(agent.requests()[0]["command"], "CHECK");
}

TEST_F(CniBinaryTest, BadStdinIsCode6) {
  PluginRun r = runPlugin(env("ADD", netns_), "{not json");
  EXPECT_NE(r.exitCode, 0);
  EXPECT_EQ(r.doc()["code"], 6) << r.out;
}

TEST_F(CniBinaryTest, OversizedStdinIsCode6) {
  std::string big = "{\"cniVersion\":\"1.0.0\",\"pad\":\"" + std::string(2 << 20, 'a') + "\"}";
  PluginRun r = runPlugin(env("ADD", netns_), big);
  EXPECT_NE(r.exitCode, 0);
  EXPECT_EQ(r.doc()["code"], 6) << r.out;
}

TEST_F(CniBinaryTest, MissingEnvironmentIsCode4) {
  auto e = env("ADD", netns_);
  e.erase(e.begin() + 1);  // CNI_CONTAINERID
  PluginRun r = runPlugin(e, config());
  EXPECT_NE(r.exitCode, 0);
  EXPECT_EQ(r.doc()["code"], 4) << r.out;

  PluginRun none = runPlugin({}, config());
  EXPECT_NE(none.exitCode, 0);
  EXPECT_EQ(none.doc()["code"], 4) << none.out;
}

TEST_F(CniBinaryTest, UnsupportedVersionIsCode1) {
  json c = json::parse(config());
  c["cniVersion"] = "0.3.1";
  PluginRun r = runPlugin(env("ADD", netns_), c.dump());
  EXPECT_NE(r.exitCode, 0);
  EXPECT_EQ(r.doc()["code"], 1) << r.out;
}

TEST(CniArgs, ParsesPairsAndRejectsJunk) {
  std::map<std::string, std::string> out;
  EXPECT_FALSE(parseCniArgs("A=1;;B=two=2;C=", &out));
  EXPECT_EQ(out, (std::map<std::string, std::string>{{"A", "1"}, {"B", "two=2"}, {"C", ""}}));
  std::map<std::string, std::string> bad;
  auto err = parseCniArgs("A=1;junk", &bad);
  ASSERT_TRUE(err);
  EXPECT_EQ(err->code, kErrInvalidEnvironment);
  EXPECT_TRUE(parseCniArgs("=x", &bad));
}

TEST(CniEnvironment, ValidatesIdsAndNames) {
  Environment e;
  auto yes = [](const std::string&) { return true; };
  Env base{{"CNI_COMMAND", "ADD"},       {"CNI_CONTAINERID", "abc"},
           {"CNI_NETNS", "/run/netns/x"}, {"CNI_IFNAME", "eth0"},
           {"CNI_PATH", "/opt/cni/bin"},  {"CNI_ARGS", "K8S_POD_NAME=p;K8S_POD_NAMESPACE=n"}};
  EXPECT_FALSE(parseEnvironment(base, &e, yes));
  EXPECT_EQ(e.podName, "p");
  EXPECT_EQ(e.podUid, "");

  Env badId = base;
  badId["CNI_CONTAINERID"] = "-abc";
  EXPECT_TRUE(parseEnvironment(badId, &e, yes));
  Env badIf = base;
  badIf["CNI_IFNAME"] = "a-very-long-ifname0";
  EXPECT_TRUE(parseEnvironment(badIf, &e, yes));
  Env noPod = base;
  noPod["CNI_ARGS"] = "IgnoreUnknown=1";
  EXPECT_TRUE(parseEnvironment(noPod, &e, yes));
  Env bogus = base;
  bogus["CNI_COMMAND"] = "GC";
  EXPECT_TRUE(parseEnvironment(bogus, &e, yes));
}

TEST(CniConfig, TimeoutAndSocketDefaultsAndBounds) {
  Config c;
  EXPECT_FALSE(parseConfig(R"({"cniVersion":"1.0.0"})", false, &c));
  EXPECT_EQ(c.agentSocket, kDefaultAgentSocket);
  EXPECT_EQ(c.timeout, std::chrono::seconds(30));
  Config d;
  auto err = parseConfig(R"({"cniVersion":"1.0.0","timeout_seconds":0})", false, &d);
  ASSERT_TRUE(err);
  EXPECT_EQ(err->code, kErrInvalidConfig);
  Config e;
  EXPECT_TRUE(parseConfig(R"({"name":"x"})", false, &e));  // no cniVersion
}

}  // namespace
}  // namespace weft::cni
