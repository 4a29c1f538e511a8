// As root, in a throwaway netns: a ztunnel with several event loops spreads a pod's outbound
// connections over its loops' SO_REUSEPORT listeners, relays every byte, and its merged
// /metrics, /stats, /connections and access log equal the per-loop sums exactly; the drain
// closes every loop's listeners and cuts what stays open on any loop; workers forward their
// verdicts to the main loop's ring and keep none.
#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <functional>
#include <regex>
#include <set>
#include <thread>

#include "common/netns.h"
#include "tests/unit/ztunnel/pod_netns.h"
#include "ztunnel/ztunnel.h"

namespace weft::ztunnel {
namespace {

constexpr const char* kPodV4 = "10.251.0.5";

using podtest::connectIn;
using podtest::PodNetns;
using podtest::readToEof;
using podtest::sendAll;

// The app in the pod: accepts up to `max` connections (each on its own thread), answers each
// with every byte it read, after the client's EOF; `hold` = read nothing, answer never.
class EchoServer {
 public:
  EchoServer(int netns, const std::string& addr, int max, bool hold = false) : hold_(hold) {
    auto a = SocketAddress::parse(addr);
    auto s = socketIn(netns, a->family(), SOCK_STREAM);
    int one = 1;
    setsockopt(s->get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    sockaddr_storage ss;
    socklen_t len = a->toSockaddr(&ss);
    EXPECT_EQ(bind(s->get(), reinterpret_cast<sockaddr*>(&ss), len), 0) << addr;
    EXPECT_EQ(listen(s->get(), 256), 0);
    fd_ = std::move(s.value());
    acceptor_ = std::thread([this, max] {
      for (int i = 0; i < max && !stop_; ) {
        pollfd p{fd_.get(), POLLIN, 0};
        if (poll(&p, 1, 100) != 1) continue;
        int c = accept(fd_.get(), nullptr, nullptr);
        if (c < 0) continue;
        ++i;
        std::lock_guard<std::mutex> lk(mu_);
        conns_.push_back(c);
        if (!hold_) workers_.emplace_back([c] {
          std::string req = readToEof(c);
          sendAll(c, req);
          close(c);
        });
      }
    });
  }
  ~EchoServer() {
    stop_ = true;
    acceptor_.join();
    for (auto& t : workers_) t.join();
    if (hold_)
      for (int c : conns_) close(c);
  }

 private:
  bool hold_;
  UniqueFd fd_;
  std::atomic<bool> stop_{false};
  std::thread acceptor_;
  std::mutex mu_;
  std::vector<int> conns_;
  std::vector<std::thread> workers_;
};

node::v1::Workload podProto() {
  node::v1::Workload w;
  w.set_uid("u1");
  w.set_name("app");
  w.set_namespace_("default");
  w.add_ips(kPodV4);
  return w;
}

// The value of the one series of `family` whose labels contain `match`, or -1.
long long metric(const std::string& text, const std::string& family, const std::string& match) {
  std::istringstream in(text);
  std::string line;
  long long found = -1;
  while (std::getline(in, line)) {
    if (line.rfind(family + "{", 0) != 0 && line.rfind(family + " ", 0) != 0) continue;
    if (line.find(match) == std::string::npos) continue;
    if (found >= 0) return -2;  // not one series
    found = std::stoll(line.substr(line.rfind(' ') + 1));
  }
  return found;
}

class LoopsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (geteuid() != 0) GTEST_SKIP() << "needs root: creates a network namespace";
    netns_ = std::make_unique<PodNetns>("weft-zt-loops-",
                                        std::vector<std::string>{std::string(kPodV4) + "/32"});
    ASSERT_TRUE(netns_->ok()) << "could not create a test netns";
    ASSERT_EQ(uv_loop_init(&loop_), 0);
    loop_ok_ = true;
    log_path_ = std::filesystem::temp_directory_path() /
                ("weft-loops-test-" + std::to_string(getpid()) + ".log");
    std::filesystem::remove(log_path_);
  }
  void make(unsigned loops, uint64_t drain_ms = 5000) {
    ZtunnelOptions o;
    o.agent_socket = "/nonexistent/weft-test.sock";  // no agent: we call the handler directly
    o.loops = loops;
    o.drain_timeout_ms = drain_ms;
    o.access_log.sink = log_path_.string();
    o.access_log.format = AccessLogFormat::kJson;
    zt_ = std::make_unique<Ztunnel>(&loop_, o);
    Status st = zt_->start();
    ASSERT_TRUE(st) << st.message();
    ASSERT_EQ(zt_->loopCount(), loops);
    ASSERT_TRUE(zt_->onNodeConfig({}));
    node::v1::ClusterUpdate cu;
    cu.set_full(true);
    *cu.add_upsert_workloads() = podProto();
    ASSERT_TRUE(zt_->onClusterUpdate(cu));
    st = zt_->onAddWorkload(podProto(), netns_->dupFd());
    ASSERT_TRUE(st) << st.message();
    ASSERT_TRUE(zt_->setDestinationHookForTest([](int, bool) -> Result<SocketAddress> {
      return *SocketAddress::parse(std::string(kPodV4) + ":7070");
    }));
  }
  // Runs the main loop while `client` runs on a thread.
  void runWithClient(const std::function<void()>& client) {
    auto* stop = new uv_async_t;
    ASSERT_EQ(uv_async_init(&loop_, stop, [](uv_async_t* a) { uv_stop(a->loop); }), 0);
    std::thread t([&] {
      client();
      uv_async_send(stop);
    });
    uv_run(&loop_, UV_RUN_DEFAULT);
    t.join();
    uv_close(reinterpret_cast<uv_handle_t*>(stop),
             [](uv_handle_t* h) { delete reinterpret_cast<uv_async_t*>(h); });
  }
  nlohmann::json admin(const std::string& path) {
    return nlohmann::json::parse(zt_->handleAdmin({"GET", path, "", ""}).body);
  }
  // `conns` connections to `via` in the pod, eight clients at a time: connection i sends
  // payload(i) and its FIN, then reads to EOF. Returns how many got their payload back whole.
  int echoInPod(const char* via, int conns, const std::function<std::string(int)>& payload) {
    std::atomic<int> intact{0};
    int nfd = netns_->fd();
    runWithClient([&] {
      std::vector<std::thread> ts;
      for (int t = 0; t < 8; ++t) {
        ts.emplace_back([&, t] {
          for (int i = t; i < conns; i += 8) {
            std::string data = payload(i);
            int fd = connectIn(nfd, via);
            if (fd < 0) continue;
            if (sendAll(fd, data) && shutdown(fd, SHUT_WR) == 0 && readToEof(fd) == data)
              intact++;
            close(fd);
          }
        });
      }
      for (auto& th : ts) th.join();
    });
    return intact.load();
  }
  // Runs the main loop (bounded) until no loop has a connection open.
  bool waitIdle() {
    for (int i = 0; i < 100; ++i) {
      if (admin("/stats")["active_connections"] == 0) return true;
      runWithClient([] { std::this_thread::sleep_for(std::chrono::milliseconds(50)); });
    }
    return false;
  }
  void TearDown() override {
    if (zt_) {
      zt_->shutdown();
      uv_run(&loop_, UV_RUN_DEFAULT);
      zt_.reset();
    }
    if (loop_ok_) {
      uv_run(&loop_, UV_RUN_DEFAULT);
      EXPECT_EQ(uv_loop_close(&loop_), 0);
    }
    netns_.reset();
    std::filesystem::remove(log_path_);
  }
  uv_loop_t loop_;
  bool loop_ok_ = false;
  std::unique_ptr<PodNetns> netns_;
  std::unique_ptr<Ztunnel> zt_;
  std::filesystem::path log_path_;
};

TEST_F(LoopsTest, ConnectionsSpreadOverLoopsAndMetricsAreExactSums) {
  constexpr int kConns = 64;
  make(3);
  EchoServer app(netns_->fd(), std::string(kPodV4) + ":7070", kConns);
  uint64_t bytes = 0;
  for (int i = 0; i < kConns; ++i) bytes += 1000 + 997 * static_cast<uint64_t>(i);
  // Each connection its own payload size and content.
  int intact = echoInPod("127.0.0.1:15001", kConns, [](int i) {
    return std::string(1000 + 997 * static_cast<size_t>(i), static_cast<char>('a' + i % 26));
  });
  EXPECT_EQ(intact, kConns) << "every byte, both ways, on every connection";
  ASSERT_TRUE(waitIdle());

  // Per loop: who accepted what. More than one loop took connections, and they add up.
  nlohmann::json dump = admin("/config_dump");
  ASSERT_EQ(dump["loops"].size(), 3u);
  uint64_t sum = 0;
  int loops_used = 0;
  for (const auto& l : dump["loops"]) {
    uint64_t n = l["stats"]["outbound_accepted_total"].get<uint64_t>();
    sum += n;
    if (n > 0) loops_used++;
  }
  EXPECT_EQ(sum, static_cast<uint64_t>(kConns));
  EXPECT_GE(loops_used, 2) << dump["loops"].dump();

  nlohmann::json stats = admin("/stats");
  EXPECT_EQ(stats["outbound_accepted_total"], kConns);
  EXPECT_EQ(stats["loops"], 3);
  EXPECT_EQ(stats["active_connections"], 0);
  EXPECT_EQ(admin("/connections").size(), 0u);

  std::string m = zt_->handleMetrics({"GET", "/metrics", "", ""}).body;
  const std::string src = "reporter=\"source\"";
  EXPECT_EQ(metric(m, "istio_tcp_connections_opened_total", src), kConns) << m;
  EXPECT_EQ(metric(m, "istio_tcp_connections_closed_total", src), kConns);
  EXPECT_EQ(metric(m, "istio_tcp_received_bytes_total", src), static_cast<long long>(bytes));
  EXPECT_EQ(metric(m, "istio_tcp_sent_bytes_total", src), static_cast<long long>(bytes));
  EXPECT_EQ(metric(m, "weft_ztunnel_outbound_accepted_total", ""), kConns);
  EXPECT_EQ(metric(m, "weft_ztunnel_loops", ""), 3);

  // The access log (on the main loop) got one line per connection from every loop, with ids
  // unique across loops.
  zt_->shutdown();
  uv_run(&loop_, UV_RUN_DEFAULT);
  zt_.reset();  // writes what is pending
  std::ifstream in(log_path_);
  std::string line;
  std::set<uint64_t> ids;
  int lines = 0;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    lines++;
    ids.insert(j["conn_id"].get<uint64_t>());
  }
  EXPECT_EQ(lines, kConns);
  EXPECT_EQ(ids.size(), static_cast<size_t>(kConns));
}

// Inbound connections on every loop: each is authorized and recorded where it was accepted,
// the workers forward their verdicts to the main loop's ring (/verdicts has them all, in one
// sequence) and keep none of their own (a second ring per worker pinned heap after bursts).
TEST_F(LoopsTest, WorkerLoopsForwardVerdictsAndKeepNoneOfTheirOwn) {
  constexpr int kConns = 48;
  make(3);
  EchoServer app(netns_->fd(), std::string(kPodV4) + ":7070", kConns);
  int intact = echoInPod("127.0.0.1:15006", kConns,
                         [](int i) { return std::string(100 + static_cast<size_t>(i), 'v'); });
  EXPECT_EQ(intact, kConns);
  ASSERT_TRUE(waitIdle());
  // A worker's events reach the main loop through its mailbox: run the main loop (bounded)
  // until all are there.
  for (int i = 0; i < 100 && admin("/verdicts")["last_seq"] != kConns; ++i)
    runWithClient([] { std::this_thread::sleep_for(std::chrono::milliseconds(50)); });
  nlohmann::json v = admin("/verdicts");
  EXPECT_EQ(v["last_seq"], kConns);
  EXPECT_EQ(v["capacity"], VerdictLog::kDefaultCapacity);
  ASSERT_EQ(v["verdicts"].size(), static_cast<size_t>(kConns));
  for (size_t i = 0; i < v["verdicts"].size(); ++i) {
    EXPECT_EQ(v["verdicts"][i]["seq"], i + 1);
    EXPECT_EQ(v["verdicts"][i]["path"], "plaintext");
    EXPECT_EQ(v["verdicts"][i]["destination"]["workload"], "default/app");
  }

  nlohmann::json dump = admin("/config_dump");
  ASSERT_EQ(dump["loops"].size(), 3u);
  uint64_t on_workers = 0;
  for (const auto& l : dump["loops"]) {
    if (l["loop"] == 0) {
      EXPECT_EQ(l["verdicts"]["capacity"], VerdictLog::kDefaultCapacity);
      EXPECT_EQ(l["verdicts"]["kept"], kConns);
      continue;
    }
    on_workers += l["stats"]["inbound_accepted_total"].get<uint64_t>();
    EXPECT_EQ(l["verdicts"]["capacity"], 0) << l.dump();
    EXPECT_EQ(l["verdicts"]["kept"], 0) << l.dump();
  }
  EXPECT_GT(on_workers, 0u) << "no worker loop accepted (and recorded) a connection: "
                            << dump["loops"].dump();
}

TEST_F(LoopsTest, DrainClosesEveryLoopsListenersAndCutsWhatStaysOpen) {
  make(2, 500);
  EchoServer app(netns_->fd(), std::string(kPodV4) + ":7070", 64, /*hold=*/true);
  int nfd = netns_->fd();
  std::vector<int> clients;
  // Open held connections until both loops have one (the kernel's reuseport hash decides;
  // bounded).
  std::set<unsigned> loops_seen;
  for (int i = 0; i < 32 && loops_seen.size() < 2; ++i) {
    runWithClient([&] {
      clients.push_back(connectIn(nfd, "127.0.0.1:15001"));
      std::this_thread::sleep_for(std::chrono::milliseconds(30));
    });
    loops_seen.clear();
    for (const auto& c : admin("/connections")) loops_seen.insert(c["loop"].get<unsigned>());
  }
  ASSERT_EQ(loops_seen.size(), 2u);
  size_t open = admin("/connections").size();
  ASSERT_EQ(open, clients.size());
  bool drained = false;
  zt_->drain([&] {
    drained = true;
    uv_stop(&loop_);
  });
  int refused = 0;
  std::thread probe([&] { refused = connectIn(nfd, "127.0.0.1:15001"); });
  probe.join();
  EXPECT_EQ(refused, -ECONNREFUSED) << "a listener of some loop is still open";
  uv_run(&loop_, UV_RUN_DEFAULT);
  EXPECT_TRUE(drained);
  EXPECT_EQ(admin("/stats")["drain_aborted_connections_total"], open);
  EXPECT_EQ(admin("/stats")["active_connections"], 0);
  for (int c : clients) {
    int err = 0;
    readToEof(c, &err);
    EXPECT_EQ(err, ECONNRESET);
    close(c);
  }
}

TEST_F(LoopsTest, OneLoopHasNoWorkers) {
  make(1);
  EXPECT_EQ(admin("/config_dump")["loops"].size(), 1u);
  EXPECT_EQ(admin("/stats")["loops"], 1);
}

}  // namespace
}  // namespace weft::ztunnel
