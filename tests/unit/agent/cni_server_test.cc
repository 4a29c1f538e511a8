// The CNI socket with a real unix stream client: request/response JSON, bounds, and the
// controller's answers for pods that are not enrolled.
#include "agent/cni_server.h"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <atomic>
#include <nlohmann/json.hpp>
#include <thread>

#include "agent/enrollment.h"
#include "test_util.h"

namespace weft::agent {
namespace {

using testing::TempDir;

// Blocking client on its own thread: write, half-close, read to EOF.
std::string roundTrip(uv_loop_t* loop, const std::string& path, const std::string& request,
                      bool half_close = true) {
  std::atomic<bool> done{false};
  std::string response;
  std::thread client([&] {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    UniqueFd sock(fd);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.data(), path.size());
    timeval tv{5, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
      size_t off = 0;
      while (off < request.size()) {
        ssize_t n = ::send(fd, request.data() + off, request.size() - off, MSG_NOSIGNAL);
        if (n <= 0) break;
        off += static_cast<size_t>(n);
      }
      if (half_close) ::shutdown(fd, SHUT_WR);
      char buf[4096];
      ssize_t n;
      while ((n = ::read(fd, buf, sizeof(buf))) > 0) response.append(buf, static_cast<size_t>(n));
    }
    done = true;
  });
  testing::runUntil(loop, [&] { return done.load(); }, 8000);
  client.join();
  return response;
}

TEST(CniRequestParse, Fields) {
  auto r = parseCniRequest(R"({"command":"ADD","container_id":"c","netns":"/run/netns/x",
      "ifname":"eth0","pod_name":"p","pod_namespace":"ns","pod_uid":"u"})");
  ASSERT_TRUE(r) << r.status().message();
  EXPECT_EQ(r->command, "ADD");
  EXPECT_EQ(r->netns, "/run/netns/x");
  EXPECT_EQ(r->pod_uid, "u");
  EXPECT_TRUE(r->pod_ips.empty());
  EXPECT_FALSE(parseCniRequest("{"));
  EXPECT_FALSE(parseCniRequest("[1]"));
  // prevResult addresses: the first of each family is kept; junk is refused by name.
  auto ips = parseCniRequest(R"({"command":"ADD","netns":"/run/netns/x","pod_name":"p",
      "pod_namespace":"ns","pod_ips":["10.244.1.5","fd00::5","10.244.1.6"]})");
  ASSERT_TRUE(ips) << ips.status().message();
  ASSERT_EQ(ips->pod_ips.size(), 2u);
  EXPECT_EQ(ips->pod_ips[0].toString(), "10.244.1.5");
  EXPECT_EQ(ips->pod_ips[1].toString(), "fd00::5");
  EXPECT_EQ(parseCniRequest(R"({"command":"ADD","netns":"/n","pod_name":"p",
      "pod_namespace":"ns","pod_ips":["10.244.1.5/32"]})").status().message(),
            "pod_ips[0]: not an IP address");
  EXPECT_FALSE(parseCniRequest(R"({"command":"ADD","netns":"/n","pod_name":"p",
      "pod_namespace":"ns","pod_ips":"10.1.1.1"})"));
  EXPECT_EQ(parseCniRequest(R"({"command":"ADD","pod_name":"p","pod_namespace":"n"})")
                .status()
                .message(),
            "netns: required (CNI_NETNS)");
  EXPECT_EQ(parseCniRequest(R"({"command":"NUKE","pod_name":"p","pod_namespace":"n"})")
                .status()
                .message(),
            "command: \"NUKE\" is not ADD, DEL or CHECK");
  EXPECT_EQ(parseCniRequest(R"({"command":"DEL","pod_name":5,"pod_namespace":"n"})")
                .status()
                .message(),
            "pod_name: must be a string");
  EXPECT_TRUE(parseCniRequest(R"({"command":"DEL","pod_name":"p","pod_namespace":"n"})"));
}

class CniServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(uv_loop_init(&loop_), 0);
    DataplaneOptions o;
    o.testing = true;
    dataplane_ = std::move(Dataplane::open(o).value());
    EnrollmentOptions eo;
    eo.node_name = "node1";
    eo.open_netns = testing::fakeNetnsOpener;
    controller_ = std::make_unique<EnrollmentController>(&loop_, eo, dataplane_.get(), &store_);
    ClusterModel m;
    Namespace ns;
    ns.meta.name = "legacy";
    m.namespaces["legacy"] = ns;
    Pod p;
    p.meta.name = "old";
    p.meta.namespace_ = "legacy";
    p.meta.uid = "u1";
    p.node_name = "node1";
    p.ips.push_back(*IpAddr::parse("10.244.1.12"));
    m.pods["legacy/old"] = p;
    ASSERT_TRUE(controller_->start(m));
    auto s = CniServer::listen(
        &loop_, path(),
        [this](const CniRequest& r, CniReply reply) {
          controller_->handleCni(r, std::move(reply));
        },
        /*read_timeout_ms=*/300);
    ASSERT_TRUE(s) << s.status().message();
    server_ = std::move(s.value());
    dir_.write("netns-old", "");
  }
  void TearDown() override {
    server_.reset();
    controller_.reset();
    for (int i = 0; i < 10; i++) uv_run(&loop_, UV_RUN_NOWAIT);
    EXPECT_EQ(uv_loop_close(&loop_), 0);
  }
  std::string path() const { return dir_.file("run/cni.sock"); }
  nlohmann::json call(const std::string& request, bool half_close = true) {
    std::string resp = roundTrip(&loop_, path(), request, half_close);
    auto j = nlohmann::json::parse(resp, nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << "response: " << resp;
    return j;
  }

  TempDir dir_;
  uv_loop_t loop_;
  DataplanePtr dataplane_;
  PodStore store_{dir_.file("state")};
  std::unique_ptr<EnrollmentController> controller_;
  CniServerPtr server_;
};

TEST_F(CniServerTest, AddOfPodOutsideTheMeshIsOk) {
  nlohmann::json req = {{"command", "ADD"},         {"container_id", "c1"},
                        {"netns", dir_.file("netns-old")}, {"ifname", "eth0"},
                        {"pod_name", "old"},        {"pod_namespace", "legacy"},
                        {"pod_uid", "u1"}};
  nlohmann::json resp = call(req.dump());
  EXPECT_EQ(resp, nlohmann::json({{"ok", true}}));
  EXPECT_TRUE(dataplane_->enrolled().empty());
  EXPECT_NE(store_.find("legacy/old"), nullptr);
  req["command"] = "DEL";
  EXPECT_EQ(call(req.dump()), nlohmann::json({{"ok", true}}));
  EXPECT_EQ(server_->requests(), 2u);
}

TEST_F(CniServerTest, MalformedJsonIsAnError) {
  nlohmann::json resp = call("{\"command\": \"ADD\", ");
  EXPECT_EQ(resp["ok"], false);
  EXPECT_EQ(resp["code"], kCniErrDecode);
  EXPECT_EQ(server_->badRequests(), 1u);
}

TEST_F(CniServerTest, MissingFieldIsAnError) {
  nlohmann::json resp = call(R"({"command":"ADD","pod_name":"old","pod_namespace":"legacy"})");
  EXPECT_EQ(resp["ok"], false);
  EXPECT_EQ(resp["code"], kCniErrInvalidRequest);
  EXPECT_EQ(resp["details"], "netns: required (CNI_NETNS)");
}

TEST_F(CniServerTest, UnopenableNetnsIsAnError) {
  nlohmann::json resp = call(R"({"command":"ADD","pod_name":"old","pod_namespace":"legacy",
                                 "netns":"/nonexistent/netns"})");
  EXPECT_EQ(resp["ok"], false);
  EXPECT_EQ(resp["code"], kCniErrIo);
}

TEST_F(CniServerTest, OversizedRequestIsRefused) {
  nlohmann::json resp = call(std::string(kMaxCniRequestBytes + 10, ' '));
  EXPECT_EQ(resp["ok"], false);
  EXPECT_EQ(resp["msg"], "request too large");
}

TEST_F(CniServerTest, ClientThatNeverFinishesIsClosed) {
  // No half-close: the server gives up after its read timeout and the client sees EOF.
  std::string resp = roundTrip(&loop_, path(), "{", /*half_close=*/false);
  EXPECT_EQ(resp, "");
  EXPECT_EQ(server_->badRequests(), 1u);
  // And it still serves the next one.
  EXPECT_EQ(call("[]")["ok"], false);
}

}  // namespace
}  // namespace weft::agent
