// EventHub (GET /events): filters, verdict and BPF events fanned out to real HTTP clients over
// the admin server, a slow client's drops counted and reported, and the ring buffer opened
// from a pinned map (as root).
#include "ztunnel/events.h"

#include <bpf/bpf.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <chrono>
#include <functional>
#include <thread>

#include "common/fd.h"

namespace weft::ztunnel {
namespace {

using nlohmann::json;
using namespace std::chrono_literals;

VerdictEvent verdict(bool allowed, const char* src, const char* dst, int port) {
  VerdictEvent e;
  e.path = "hbone";
  e.source = *SocketAddress::parse("10.244.1.10:40000");
  e.source_workload = src;
  e.destination_workload = dst;
  e.destination = SocketAddress(*IpAddr::parse("10.244.2.10"), static_cast<uint16_t>(port));
  e.verdict.allowed = allowed;
  e.verdict.reason = allowed ? VerdictReason::kNoAllowPolicy : VerdictReason::kDenyMatched;
  if (!allowed) e.verdict.decided_by = PolicyHit{"app/deny", 0};
  e.time_ms = 1;
  return e;
}

weft_event redirect(uint64_t cookie, const char* dst) {
  weft_event e{};
  e.netns_cookie = cookie;
  e.type = WEFT_EVENT_REDIRECT;
  e.dst = SocketAddress::parse(dst)->toAbi();
  return e;
}

TEST(EventFilter, ParseAndMatch) {
  EXPECT_FALSE(EventFilter::parse("verdict=maybe"));
  EXPECT_FALSE(EventFilter::parse("colour=red"));
  auto f = EventFilter::parse("pod=app%2Fserver&verdict=deny");
  ASSERT_TRUE(f) << f.status().message();
  json deny = VerdictLog::eventJson(verdict(false, "front/client", "app/server", 80));
  deny["kind"] = "verdict";
  json allow = VerdictLog::eventJson(verdict(true, "front/client", "app/server", 80));
  allow["kind"] = "verdict";
  json other = VerdictLog::eventJson(verdict(false, "front/client", "app/web", 80));
  other["kind"] = "verdict";
  json redir = {{"kind", "redirect"}, {"pod", "app/server"}};
  EXPECT_TRUE(f->matches(deny));
  EXPECT_FALSE(f->matches(allow));
  EXPECT_FALSE(f->matches(other));
  EXPECT_FALSE(f->matches(redir)) << "a verdict filter keeps redirect events out";
  auto ns = EventFilter::parse("namespace=front");
  EXPECT_TRUE(ns->matches(other)) << "the source's namespace counts";
  EXPECT_FALSE(ns->matches(redir));
  auto byname = EventFilter::parse("pod=server&kind=redirect");
  EXPECT_TRUE(byname->matches(redir));
  EXPECT_FALSE(byname->matches(deny));
}

// The hub and an admin server on a loop thread; tests post work to the loop.
class EventsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(uv_loop_init(&loop_), 0);
    EventPodResolver r;
    r.by_cookie = [](uint64_t c) { return c == 7 ? std::string("front/client") : ""; };
    r.by_ip = [](const IpAddr&) { return std::string(); };
    hub_ = std::make_unique<EventHub>(&loop_, r);
    auto s = HttpAdminServer::listenTcp(&loop_, *SocketAddress::parse("127.0.0.1:0"),
                                        [this](const HttpRequest& req) {
                                          if (req.path == "/events") return hub_->subscribe(req);
                                          return HttpResponse{404, "text/plain", "no\n"};
                                        });
    ASSERT_TRUE(s) << s.status().message();
    server_ = std::move(s.value());
    addr_ = server_->boundAddress();
    ASSERT_EQ(uv_async_init(&loop_, &async_,
                            [](uv_async_t* a) {
                              auto* self = static_cast<EventsTest*>(a->data);
                              std::function<void()> f;
                              {
                                std::lock_guard<std::mutex> l(self->mu_);
                                f = std::move(self->work_);
                                self->work_ = nullptr;
                              }
                              if (f) f();
                              if (self->stop_) uv_stop(a->loop);
                            }),
              0);
    async_.data = this;
    thread_ = std::thread([this] { uv_run(&loop_, UV_RUN_DEFAULT); });
  }
  void TearDown() override {
    onLoop([this] { stop_ = true; });
    thread_.join();
    hub_.reset();
    server_.reset();
    uv_close(reinterpret_cast<uv_handle_t*>(&async_), nullptr);
    uv_run(&loop_, UV_RUN_DEFAULT);
    EXPECT_EQ(uv_loop_close(&loop_), 0);
  }
  // Runs f on the loop thread and waits for it.
  void onLoop(std::function<void()> f) {
    std::atomic<bool> done{false};
    {
      std::lock_guard<std::mutex> l(mu_);
      work_ = [&, f] {
        f();
        done = true;
      };
    }
    uv_async_send(&async_);
    for (int i = 0; i < 500 && !done; i++) std::this_thread::sleep_for(10ms);
    ASSERT_TRUE(done);
  }
  int connectEvents(const std::string& query) {
    sockaddr_storage ss;
    socklen_t len = addr_.toSockaddr(&ss);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&ss), len), 0);
    std::string req = "GET /events" + query + " HTTP/1.1\r\n\r\n";
    EXPECT_EQ(send(fd, req.data(), req.size(), MSG_NOSIGNAL), static_cast<ssize_t>(req.size()));
    return fd;
  }
  // Reads until `needle` arrived (or 5 s).
  static std::string readUntil(int fd, const std::string& needle, std::string* acc) {
    char buf[65536];
    auto deadline = std::chrono::steady_clock::now() + 5s;
    while (acc->find(needle) == std::string::npos && std::chrono::steady_clock::now() < deadline) {
      pollfd p{fd, POLLIN, 0};
      if (poll(&p, 1, 100) <= 0) continue;
      ssize_t n = recv(fd, buf, sizeof(buf), 0);
      if (n <= 0) break;
      acc->append(buf, static_cast<size_t>(n));
    }
    return *acc;
  }

  uv_loop_t loop_;
  uv_async_t async_;
  std::mutex mu_;
  std::function<void()> work_;
  bool stop_ = false;
  std::unique_ptr<EventHub> hub_;
  HttpAdminServerPtr server_;
  SocketAddress addr_;
  std::thread thread_;
};

TEST_F(EventsTest, FilteredStreamOfVerdictsAndRedirects) {
  int all = connectEvents("");
  int deny = connectEvents("?verdict=deny&pod=app/server");
  std::string a, d;
  readUntil(all, "\"kind\":\"start\"", &a);
  readUntil(deny, "\"kind\":\"start\"", &d);
  ASSERT_NE(d.find("Transfer-Encoding: chunked"), std::string::npos) << d;
  onLoop([&] {
    EXPECT_EQ(hub_->clients(), 2u);
    hub_->publishVerdict(verdict(true, "front/client", "app/server", 8080));
    hub_->publishBpf(redirect(7, "10.96.0.20:80"));
    hub_->publishVerdict(verdict(false, "ops/admin", "app/web", 8080));
    hub_->publishVerdict(verdict(false, "ops/admin", "app/server", 8081));
  });
  readUntil(all, "8081", &a);
  readUntil(deny, "8081", &d);
  EXPECT_NE(a.find("\"result\":\"allow\""), std::string::npos) << a;
  EXPECT_NE(a.find("\"kind\":\"redirect\""), std::string::npos) << a;
  EXPECT_NE(a.find("\"pod\":\"front/client\""), std::string::npos) << a;
  EXPECT_NE(a.find("\"dst\":\"10.96.0.20:80\""), std::string::npos) << a;
  EXPECT_EQ(d.find("\"result\":\"allow\""), std::string::npos) << d;
  EXPECT_EQ(d.find("\"kind\":\"redirect\""), std::string::npos) << d;
  EXPECT_EQ(d.find("app/web"), std::string::npos) << d;
  EXPECT_NE(d.find("\"policy\":\"app/deny\""), std::string::npos) << d;
  close(all);
  close(deny);
  std::this_thread::sleep_for(100ms);
  onLoop([&] {
    hub_->publishVerdict(verdict(true, "a/b", "c/d", 1));  // prunes the closed clients
    EXPECT_EQ(hub_->clients(), 0u);
  });
}

TEST_F(EventsTest, SlowClientLosesEventsNotMemory) {
  int fd = connectEvents("");
  std::string got;
  readUntil(fd, "\"kind\":\"start\"", &got);
  // One loop turn: nothing is written back yet, so the client's queue bound is what limits.
  onLoop([&] {
    for (int i = 0; i < 5000; i++)
      hub_->publishVerdict(verdict(true, "front/client", "app/server", 8080));
    json s = hub_->statsJson();
    EXPECT_GT(s["dropped"].get<uint64_t>(), 0u) << s.dump();
    EXPECT_LT(s["dropped"].get<uint64_t>(), 5000u) << s.dump();
  });
  // A later event is preceded by the count of what this client lost.
  onLoop([&] { hub_->publishVerdict(verdict(false, "x/y", "app/server", 9)); });
  readUntil(fd, "\"port\":9", &got);
  EXPECT_NE(got.find("\"kind\":\"dropped\""), std::string::npos);
  close(fd);
}

TEST_F(EventsTest, ConsumesAPinnedRingBuffer) {
  if (geteuid() != 0) GTEST_SKIP() << "pinning a BPF map needs root";
  struct statfs fs {};
  if (statfs("/sys/fs/bpf", &fs) != 0 || fs.f_type != 0xcafe4a11)
    GTEST_SKIP() << "no bpffs at /sys/fs/bpf";
  char tmpl[] = "/sys/fs/bpf/weft-events-test-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  std::string dir = tmpl, maps = dir + "/maps", pin = maps + "/" WEFT_MAP_EVENTS;
  ASSERT_EQ(mkdir(maps.c_str(), 0700), 0);
  UniqueFd map(bpf_map_create(BPF_MAP_TYPE_RINGBUF, WEFT_MAP_EVENTS, 0, 0, 4096, nullptr));
  ASSERT_TRUE(map.valid());
  ASSERT_EQ(bpf_obj_pin(map.get(), pin.c_str()), 0);
  onLoop([&] {
    Status st = hub_->setPinDir(dir);
    EXPECT_TRUE(st) << st.message();
    EXPECT_TRUE(hub_->consumingBpf());
    EXPECT_FALSE(hub_->setPinDir(dir + "/absent"));
    EXPECT_FALSE(hub_->consumingBpf());
    EXPECT_TRUE(hub_->setPinDir(""));
  });
  unlink(pin.c_str());
  rmdir(maps.c_str());
  rmdir(dir.c_str());
}

}  // namespace
}  // namespace weft::ztunnel
