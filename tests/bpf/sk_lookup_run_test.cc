// weft_sk_lookup's decisions as a table, run with BPF_PROG_TEST_RUN: for each lookup (family,
// protocol, remote, local), is the registered ztunnel listener selected or not.
#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <linux/bpf.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cstring>

#include "bpf/abi/maps.h"
#include "bpf/abi/progs.h"
#include "common/address.h"
#include "common/inbound_listener_map.h"
#include "common/netns.h"
#include "tests/bpf/bpf_test_env.h"

#ifndef SO_COOKIE
#define SO_COOKIE 57
#endif

namespace weft::bpftest {
namespace {

struct LookupCase {
  const char* description;
  const char* remote;  // ip:port
  const char* local;   // ip:port
  int protocol;
  bool steered;  // expect the ztunnel listener to be selected
};

const LookupCase kCases[] = {
    {"v4 TCP from a peer to an app port", "10.250.0.1:40000", "10.250.0.2:8080", IPPROTO_TCP, true},
    {"v4 UDP is never steered", "10.250.0.1:40000", "10.250.0.2:8080", IPPROTO_UDP, false},
    {"to the HBONE port", "10.250.0.1:40000", "10.250.0.2:15008", IPPROTO_TCP, false},
    {"to the outbound port", "10.250.0.1:40000", "10.250.0.2:15001", IPPROTO_TCP, false},
    {"to the inbound port", "10.250.0.1:40000", "10.250.0.2:15006", IPPROTO_TCP, false},
    {"to the DNS port", "10.250.0.1:40000", "10.250.0.2:15053", IPPROTO_TCP, false},
    {"from the passthrough source", "127.0.0.6:40000", "10.250.0.2:8080", IPPROTO_TCP, false},
    {"from the pod itself", "10.250.0.2:40000", "10.250.0.2:8080", IPPROTO_TCP, false},
    {"from a bypass source", "10.250.0.77:40000", "10.250.0.2:8080", IPPROTO_TCP, false},
    {"to an IP with no listener", "10.250.0.1:40000", "10.250.0.3:8080", IPPROTO_TCP, false},
    {"v6 TCP from a peer", "[fd00:250::1]:40000", "[fd00:250::2]:443", IPPROTO_TCP, true},
    {"v6 from the pod itself", "[fd00:250::2]:40000", "[fd00:250::2]:443", IPPROTO_TCP, false},
    {"v6 to the HBONE port", "[fd00:250::1]:40000", "[fd00:250::2]:15008", IPPROTO_TCP, false},
    {"v6 from a bypass source", "[fd00:250::77]:40000", "[fd00:250::2]:443", IPPROTO_TCP, false},
};

class SkLookupRunTest : public BpfKernelTest {};

uint64_t socketCookie(int fd) {
  uint64_t cookie = 0;
  socklen_t len = sizeof(cookie);
  if (getsockopt(fd, SOL_SOCKET, SO_COOKIE, &cookie, &len) != 0) return 0;
  return cookie;
}

TEST_F(SkLookupRunTest, DecisionTable) {
  auto dp = openDataplane();
  ASSERT_TRUE(dp.isOk()) << dp.status().message();
  dp_ = std::move(dp.value());
  ASSERT_TRUE(dp_->setInboundBypass({*IpAddr::parse("10.250.0.77"), *IpAddr::parse("fd00:250::77")})
                  .isOk());

  // The ztunnel's inbound listeners, created in the pod netns (port 0: test runs send nothing).
  ScopedNetns in_pod(pod_fd_.get());
  ASSERT_TRUE(in_pod.status().isOk()) << in_pod.status().message();
  UniqueFd l4(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  UniqueFd l6(socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_TRUE(l4.valid() && l6.valid());
  int one = 1;
  ASSERT_EQ(setsockopt(l6.get(), IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)), 0);
  sockaddr_in a4{};
  a4.sin_family = AF_INET;
  sockaddr_in6 a6{};
  a6.sin6_family = AF_INET6;
  ASSERT_EQ(bind(l4.get(), reinterpret_cast<sockaddr*>(&a4), sizeof(a4)), 0);
  ASSERT_EQ(bind(l6.get(), reinterpret_cast<sockaddr*>(&a6), sizeof(a6)), 0);
  ASSERT_EQ(listen(l4.get(), 4), 0);
  ASSERT_EQ(listen(l6.get(), 4), 0);
  auto map = InboundListenerMap::open(pin_dir_);
  ASSERT_TRUE(map.isOk()) << map.status().message();
  ASSERT_TRUE(map->add(*IpAddr::parse(kPodV4), l4.get()).isOk());
  ASSERT_TRUE(map->add(*IpAddr::parse(kPodV6), l6.get()).isOk());
  uint64_t cookie4 = socketCookie(l4.get());
  uint64_t cookie6 = socketCookie(l6.get());
  ASSERT_NE(cookie4, 0u);

  UniqueFd prog(bpf_obj_get((pin_dir_ + "/progs/" + WEFT_PROG_SK_LOOKUP).c_str()));
  ASSERT_TRUE(prog.valid()) << strerror(errno);

  for (const auto& c : kCases) {
    auto remote = SocketAddress::parse(c.remote);
    auto local = SocketAddress::parse(c.local);
    ASSERT_TRUE(remote && local) << c.description;
    bpf_sk_lookup ctx{};
    ctx.family = remote->family();
    ctx.protocol = c.protocol;
    if (remote->ip().isV4()) {
      ctx.remote_ip4 = remote->ip().v4addr().s_addr;
      ctx.local_ip4 = local->ip().v4addr().s_addr;
    } else {
      memcpy(ctx.remote_ip6, &remote->ip().v6addr(), 16);
      memcpy(ctx.local_ip6, &local->ip().v6addr(), 16);
    }
    ctx.remote_port = htons(remote->port());
    ctx.local_port = local->port();
    bpf_sk_lookup out{};
    LIBBPF_OPTS(bpf_test_run_opts, opts);
    opts.ctx_in = &ctx;
    opts.ctx_size_in = sizeof(ctx);
    opts.ctx_out = &out;
    opts.ctx_size_out = sizeof(out);
    ASSERT_EQ(bpf_prog_test_run_opts(prog.get(), &opts), 0)
        << c.description << ": " << strerror(errno);
    EXPECT_EQ(opts.retval, static_cast<uint32_t>(SK_PASS)) << c.description;
    uint64_t want = !c.steered ? 0 : (remote->ip().isV4() ? cookie4 : cookie6);
    EXPECT_EQ(out.cookie, want) << c.description;
  }
}

}  // namespace
}  // namespace weft::bpftest
