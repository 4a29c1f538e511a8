// Dataplane lifecycle against the kernel: fresh load and pins, adopt on reopen without loading a
// second copy, redirect while no agent holds anything, stale pin sets replaced, destroy. Plus the
// in-memory testing mode (no root).
#include <bpf/bpf.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "bpf/abi/maps.h"
#include "bpf/abi/progs.h"
#include "common/address.h"
#include "common/netns.h"
#include "tests/bpf/bpf_test_env.h"

namespace weft::bpftest {
namespace {

bool pinned(const std::string& path) {
  struct stat st;
  return lstat(path.c_str(), &st) == 0;
}

// One attached program per cgroup hook, as ids.
std::vector<uint32_t> attachedIds(const std::string& cgroup) {
  std::vector<uint32_t> all;
  for (int type : {BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET6_CONNECT, BPF_CGROUP_SOCK_OPS,
                   BPF_CGROUP_GETSOCKOPT, BPF_CGROUP_INET4_BIND, BPF_CGROUP_INET6_BIND}) {
    auto ids = cgroupProgIds(cgroup, type);
    if (ids.size() != 1) return {};
    all.push_back(ids[0]);
  }
  return all;
}

class LifecycleTest : public BpfKernelTest {
 protected:
  // Redirect end to end: app in the pod -> fake ztunnel on 127.0.0.1:15001 -> SO_ORIGINAL_DST.
  void expectRedirect(const std::string& what) {
    pid_t zt = spawnServer(pod_fd_.get(), true, [](int out) {
      int lfd = child::listenOn("127.0.0.1:15001", true);
      if (lfd < 0) return 1;
      child::report(out, "ready", "1");
      int c = child::acceptWithTimeout(lfd, 4000);
      if (c < 0) return 2;
      sockaddr_in sin{};
      socklen_t len = sizeof(sin);
      if (getsockopt(c, IPPROTO_IP, kSoOriginalDst, &sin, &len) == 0)
        child::report(
            out, "orig",
            SocketAddress::fromSockaddr(reinterpret_cast<sockaddr*>(&sin), len)->toString());
      child::writeAll(c, "ztunnel");
      close(c);
      return 0;
    });
    auto app = run(pod_fd_.get(), true, [](int out) { return child::fetch(out, "10.250.0.1:9"); });
    EXPECT_EQ(app.get("reply"), "ztunnel") << what << ": " << app.raw;
    EXPECT_EQ(wait(zt).get("orig"), "10.250.0.1:9") << what;
  }
};

TEST_F(LifecycleTest, FreshLoadPinsEverything) {
  auto dp = openDataplane();
  ASSERT_TRUE(dp.isOk()) << dp.status().message();
  dp_ = std::move(dp.value());
  EXPECT_FALSE(dp_->info().adopted);
  EXPECT_EQ(dp_->info().programs.size(), 13u);
  for (const char* m : {WEFT_MAP_ENROLLED, WEFT_MAP_SK_ORIG_DST, WEFT_MAP_ORIG_DST,
                        WEFT_MAP_INBOUND_LISTENERS, WEFT_MAP_INBOUND_BYPASS, WEFT_MAP_EVENTS})
    EXPECT_TRUE(pinned(pin_dir_ + "/maps/" + m)) << m;
  for (const char* p : {WEFT_PROG_CONNECT4, WEFT_PROG_CONNECT6, WEFT_PROG_SOCKOPS,
                        WEFT_PROG_GETSOCKOPT, WEFT_PROG_BIND4, WEFT_PROG_BIND6}) {
    EXPECT_TRUE(pinned(pin_dir_ + "/progs/" + p)) << p;
    EXPECT_TRUE(pinned(pin_dir_ + "/links/" + p)) << p;
  }
  EXPECT_TRUE(pinned(pin_dir_ + "/progs/" + WEFT_PROG_SK_LOOKUP));
  char abi[64] = {0};
  ASSERT_GT(readlink((pin_dir_ + "/abi").c_str(), abi, sizeof(abi) - 1), 0);
  EXPECT_STREQ(abi, WEFT_BPF_ABI_VERSION);
  EXPECT_EQ(attachedIds(cgroup_dir_).size(), 6u);

  ASSERT_TRUE(dp_->enroll(pod_cookie_, pod_fd_.get(), 1).isOk());
  EXPECT_TRUE(pinned(pin_dir_ + "/netns/" + std::to_string(pod_cookie_)));
  EXPECT_EQ(dp_->enrolled(), std::vector<uint64_t>{pod_cookie_});
  // Idempotent, and the cookie must match the netns fd.
  EXPECT_TRUE(dp_->enroll(pod_cookie_, pod_fd_.get(), 1).isOk());
  EXPECT_FALSE(dp_->enroll(pod_cookie_ + 1, pod_fd_.get(), 1).isOk());
  EXPECT_FALSE(dp_->enroll(pod_cookie_, peer_fd_.get(), 1).isOk());
  EXPECT_EQ(dp_->enrolled(), std::vector<uint64_t>{pod_cookie_});
  ASSERT_TRUE(dp_->unenroll(pod_cookie_).isOk());
  EXPECT_FALSE(pinned(pin_dir_ + "/netns/" + std::to_string(pod_cookie_)));
  EXPECT_TRUE(dp_->enrolled().empty());
}

TEST_F(LifecycleTest, ReopenAdoptsWithoutLoadingASecondCopy) {
  auto first = openDataplane();
  ASSERT_TRUE(first.isOk()) << first.status().message();
  EXPECT_FALSE(first.value()->info().adopted);
  ASSERT_TRUE(first.value()->enroll(pod_cookie_, pod_fd_.get(), 3).isOk());
  auto ids_before = attachedIds(cgroup_dir_);
  ASSERT_EQ(ids_before.size(), 6u);
  first.value().reset();  // the agent exits: nothing of ours is open any more

  int loaded_before = countWeftPrograms();
  expectRedirect("with no dataplane open");

  auto second = openDataplane();
  ASSERT_TRUE(second.isOk()) << second.status().message();
  dp_ = std::move(second.value());
  EXPECT_TRUE(dp_->info().adopted);
  EXPECT_EQ(dp_->info().programs.size(), 13u);
  EXPECT_EQ(countWeftPrograms(), loaded_before);
  EXPECT_EQ(attachedIds(cgroup_dir_), ids_before);
  EXPECT_EQ(dp_->enrolled(), std::vector<uint64_t>{pod_cookie_});
  expectRedirect("after adopting");

  // A netns link without its weft_enrolled entry (an agent that died halfway) is pruned on adopt.
  dp_.reset();
  UniqueFd enrolled_map(bpf_obj_get((pin_dir_ + "/maps/" + WEFT_MAP_ENROLLED).c_str()));
  ASSERT_TRUE(enrolled_map.valid());
  ASSERT_EQ(bpf_map_delete_elem(enrolled_map.get(), &pod_cookie_), 0);
  auto third = openDataplane();
  ASSERT_TRUE(third.isOk()) << third.status().message();
  dp_ = std::move(third.value());
  EXPECT_TRUE(dp_->info().adopted);
  EXPECT_FALSE(pinned(pin_dir_ + "/netns/" + std::to_string(pod_cookie_)));
  ASSERT_TRUE(dp_->enroll(pod_cookie_, pod_fd_.get(), 3).isOk());

  // Unenroll through the adopting instance stops redirect.
  ASSERT_TRUE(dp_->unenroll(pod_cookie_).isOk());
  auto app = run(pod_fd_.get(), true, [](int out) { return child::fetch(out, "10.250.0.1:9"); });
  EXPECT_EQ(app.values.count("reply"), 0u) << app.raw;  // nobody listens on 10.250.0.1:9
  EXPECT_EQ(app.get("connect_err"), strerror(ECONNREFUSED));
}

TEST_F(LifecycleTest, PartialOrOtherAbiPinSetIsReplaced) {
  auto first = openDataplane();
  ASSERT_TRUE(first.isOk()) << first.status().message();
  ASSERT_TRUE(first.value()->enroll(pod_cookie_, pod_fd_.get(), 3).isOk());
  auto ids_first = attachedIds(cgroup_dir_);
  first.value().reset();

  // Partial: one link is gone (detached and unpinned, as a crash halfway through a load leaves
  // it).
  std::string bind4_link = pin_dir_ + "/links/" + WEFT_PROG_BIND4;
  int link_fd = bpf_obj_get(bind4_link.c_str());
  ASSERT_GE(link_fd, 0);
  ASSERT_EQ(bpf_link_detach(link_fd), 0);
  close(link_fd);
  ASSERT_EQ(unlink(bind4_link.c_str()), 0);
  auto second = openDataplane();
  ASSERT_TRUE(second.isOk()) << second.status().message();
  EXPECT_FALSE(second.value()->info().adopted);
  auto ids_second = attachedIds(cgroup_dir_);
  ASSERT_EQ(ids_second.size(), 6u);  // exactly one program per hook: the old ones detached
  EXPECT_NE(ids_second, ids_first);
  // Enrollment went with the old maps; the stale netns link too.
  EXPECT_TRUE(second.value()->enrolled().empty());
  EXPECT_FALSE(pinned(pin_dir_ + "/netns/" + std::to_string(pod_cookie_)));
  second.value().reset();

  // Another ABI version.
  ASSERT_EQ(unlink((pin_dir_ + "/abi").c_str()), 0);
  ASSERT_EQ(symlink("weft-bpf-abi-0", (pin_dir_ + "/abi").c_str()), 0);
  auto third = openDataplane();
  ASSERT_TRUE(third.isOk()) << third.status().message();
  dp_ = std::move(third.value());
  EXPECT_FALSE(dp_->info().adopted);
  auto ids_third = attachedIds(cgroup_dir_);
  ASSERT_EQ(ids_third.size(), 6u);
  EXPECT_NE(ids_third, ids_second);
  ASSERT_TRUE(dp_->enroll(pod_cookie_, pod_fd_.get(), 3).isOk());
  expectRedirect("after reloading");
}

TEST_F(LifecycleTest, DestroyDetachesAndRemovesThePinDir) {
  auto dp = openDataplane();
  ASSERT_TRUE(dp.isOk()) << dp.status().message();
  dp_ = std::move(dp.value());
  ASSERT_TRUE(dp_->enroll(pod_cookie_, pod_fd_.get(), 3).isOk());
  ASSERT_TRUE(dp_->setInboundBypass({*IpAddr::parse("10.250.0.1")}).isOk());
  Status st = dp_->destroy();
  ASSERT_TRUE(st.isOk()) << st.message();
  EXPECT_FALSE(pinned(pin_dir_));
  for (int type : {BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET6_CONNECT, BPF_CGROUP_SOCK_OPS,
                   BPF_CGROUP_GETSOCKOPT, BPF_CGROUP_INET4_BIND, BPF_CGROUP_INET6_BIND})
    EXPECT_TRUE(cgroupProgIds(cgroup_dir_, type).empty()) << type;
  EXPECT_FALSE(dp_->enroll(pod_cookie_, pod_fd_.get(), 3).isOk());
  dp_.reset();
  auto app = run(pod_fd_.get(), true, [](int out) { return child::fetch(out, "10.250.0.1:9"); });
  EXPECT_EQ(app.get("connect_err"), strerror(ECONNREFUSED)) << app.raw;
}

TEST_F(LifecycleTest, CleanupWithoutOpeningDetachesWhatWasPinned) {
  auto dp = openDataplane();
  ASSERT_TRUE(dp.isOk()) << dp.status().message();
  ASSERT_TRUE(dp.value()->enroll(pod_cookie_, pod_fd_.get(), 3).isOk());
  dp.value().reset();
  int loaded = countWeftPrograms();
  Status st = agent::Dataplane::cleanup(options());
  ASSERT_TRUE(st.isOk()) << st.message();
  EXPECT_FALSE(pinned(pin_dir_));
  EXPECT_TRUE(attachedIds(cgroup_dir_).empty());
  EXPECT_TRUE(cgroupProgIds(cgroup_dir_, BPF_CGROUP_INET4_CONNECT).empty());
  EXPECT_EQ(countWeftPrograms(), loaded - 13);  // nothing holds them any more
  auto app = run(pod_fd_.get(), true, [](int out) { return child::fetch(out, "10.250.0.1:9"); });
  EXPECT_EQ(app.get("connect_err"), strerror(ECONNREFUSED)) << app.raw;
  // Nothing there: fine.
  EXPECT_TRUE(agent::Dataplane::cleanup(options()).isOk());
}

TEST_F(LifecycleTest, UnenrollAfterThePodNetnsIsGone) {
  auto dp = openDataplane();
  ASSERT_TRUE(dp.isOk()) << dp.status().message();
  dp_ = std::move(dp.value());
  std::string ns = tag_ + "g";
  sh("ip netns add " + ns);
  ASSERT_FALSE(HasFailure());
  uint64_t cookie = 0;
  {
    auto fd = openNetns("/run/netns/" + ns);
    ASSERT_TRUE(fd.isOk()) << fd.status().message();
    auto c = netnsCookie(fd.value().get());
    ASSERT_TRUE(c.isOk());
    cookie = *c;
    Status st = dp_->enroll(cookie, fd.value().get(), 11);
    if (!st) sh("ip netns del " + ns);
    ASSERT_TRUE(st.isOk()) << st.message();
  }
  sh("ip netns del " + ns);  // the pod is gone before the agent unenrolls it
  EXPECT_TRUE(pinned(pin_dir_ + "/netns/" + std::to_string(cookie)));
  Status st = dp_->unenroll(cookie);
  EXPECT_TRUE(st.isOk()) << st.message();
  EXPECT_FALSE(pinned(pin_dir_ + "/netns/" + std::to_string(cookie)));
  EXPECT_TRUE(dp_->enrolled().empty());
}

TEST_F(LifecycleTest, PinDirOffBpffsIsAClearError) {
  agent::DataplaneOptions o = options();
  o.pin_dir = "/tmp/weft-bpftest-not-bpffs";
  auto dp = agent::Dataplane::open(o);
  ASSERT_FALSE(dp.isOk());
  EXPECT_NE(dp.status().message().find("not on a bpffs"), std::string::npos)
      << dp.status().message();
}

TEST(DataplaneMemoryTest, EnrollUnenrollBypassWithoutKernel) {
  agent::DataplaneOptions o;
  o.testing = true;
  auto dp = agent::Dataplane::open(o);
  ASSERT_TRUE(dp.isOk()) << dp.status().message();
  EXPECT_FALSE(dp.value()->info().adopted);
  EXPECT_TRUE(dp.value()->enroll(5, -1, 1).isOk());
  EXPECT_TRUE(dp.value()->enroll(6, -1, 2).isOk());
  EXPECT_TRUE(dp.value()->enroll(5, -1, 1).isOk());
  EXPECT_FALSE(dp.value()->enroll(0, -1, 1).isOk());
  auto cookies = dp.value()->enrolled();
  std::sort(cookies.begin(), cookies.end());
  EXPECT_EQ(cookies, (std::vector<uint64_t>{5, 6}));
  EXPECT_TRUE(dp.value()->unenroll(5).isOk());
  EXPECT_TRUE(dp.value()->unenroll(5).isOk());
  EXPECT_EQ(dp.value()->enrolled(), std::vector<uint64_t>{6});
  EXPECT_TRUE(dp.value()->setInboundBypass({*IpAddr::parse("10.0.0.1")}).isOk());
  EXPECT_FALSE(dp.value()->setInboundBypass({IpAddr()}).isOk());
  EXPECT_TRUE(dp.value()->destroy().isOk());
  EXPECT_TRUE(dp.value()->enrolled().empty());
  EXPECT_FALSE(dp.value()->enroll(7, -1, 1).isOk());
}

}  // namespace
}  // namespace weft::bpftest
