// IpAddr / SocketAddress parsing, formatting and conversions.
#include "common/address.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>

namespace weft {
namespace {

TEST(IpAddr, ParsesV4AndV6) {
  auto a = IpAddr::parse("10.244.1.5");
  ASSERT_TRUE(a);
  EXPECT_TRUE(a->isV4());
  EXPECT_EQ(a->toString(), "10.244.1.5");
  auto b = IpAddr::parse("fd00:10:244:1::5");
  ASSERT_TRUE(b);
  EXPECT_TRUE(b->isV6());
  EXPECT_EQ(b->toString(), "fd00:10:244:1::5");
}

TEST(IpAddr, RejectsGarbage) {
  EXPECT_FALSE(IpAddr::parse(""));
  EXPECT_FALSE(IpAddr::parse("10.244.1"));
  EXPECT_FALSE(IpAddr::parse("10.244.1.256"));
  EXPECT_FALSE(IpAddr::parse("fd00::1::2"));
  EXPECT_FALSE(IpAddr::parse("[fd00::1]"));
  EXPECT_FALSE(IpAddr::parse("example.com"));
}

TEST(IpAddr, LoopbackAndOrdering) {
  EXPECT_TRUE(IpAddr::parse("127.0.0.6")->isLoopback());
  EXPECT_TRUE(IpAddr::parse("::1")->isLoopback());
  EXPECT_FALSE(IpAddr::parse("10.0.0.1")->isLoopback());
  EXPECT_TRUE(*IpAddr::parse("10.0.0.1") < *IpAddr::parse("10.0.0.2"));
  EXPECT_TRUE(*IpAddr::parse("9.255.255.255") < *IpAddr::parse("10.0.0.0"));
  EXPECT_FALSE(*IpAddr::parse("10.0.0.1") == *IpAddr::parse("::ffff:10.0.0.2"));
}

TEST(IpAddr, V4MappedV6BecomesV4) {
  in6_addr in6{};
  ASSERT_EQ(inet_pton(AF_INET6, "::ffff:10.1.2.3", &in6), 1);
  IpAddr a = IpAddr::fromV6(in6);
  EXPECT_TRUE(a.isV4());
  EXPECT_EQ(a.toString(), "10.1.2.3");
}

TEST(IpAddr, AbiRoundTrip) {
  for (const char* s : {"10.244.1.5", "fd00:10:244:1::5"}) {
    IpAddr a = *IpAddr::parse(s);
    EXPECT_EQ(IpAddr::fromAbi(a.toAbi()), a) << s;
  }
  weft_ip v4 = IpAddr::parse("1.2.3.4")->toAbi();
  EXPECT_EQ(v4.family, WEFT_AF_INET);
  EXPECT_EQ(v4.ip[0], htonl(0x01020304));
  EXPECT_EQ(v4.ip[1], 0u);
}

TEST(SocketAddress, ParsesBothFamilies) {
  auto a = SocketAddress::parse("127.0.0.1:15000");
  ASSERT_TRUE(a);
  EXPECT_EQ(a->port(), 15000);
  EXPECT_EQ(a->toString(), "127.0.0.1:15000");
  auto b = SocketAddress::parse("[::]:15006");
  ASSERT_TRUE(b);
  EXPECT_TRUE(b->ip().isV6());
  EXPECT_EQ(b->port(), 15006);
  EXPECT_EQ(b->toString(), "[::]:15006");
  auto c = SocketAddress::parse("0.0.0.0:0");
  ASSERT_TRUE(c);
  EXPECT_EQ(c->port(), 0);
}

TEST(SocketAddress, RejectsGarbage) {
  for (const char* s : {"", "1.2.3.4", "1.2.3.4:", "1.2.3.4:65536", "1.2.3.4:-1", "1.2.3.4:8a",
                        "::1:80", "[::1]", "[::1]80", "[::1]:", "[1.2.3.4]:80x", "host:80",
                        "1.2.3.4:123456"}) {
    EXPECT_FALSE(SocketAddress::parse(s)) << s;
  }
}

TEST(SocketAddress, SockaddrRoundTrip) {
  for (const char* s : {"10.96.0.10:80", "[fd00:10:96::a]:8080"}) {
    SocketAddress a = *SocketAddress::parse(s);
    sockaddr_storage ss;
    socklen_t len = a.toSockaddr(&ss);
    auto b = SocketAddress::fromSockaddr(reinterpret_cast<sockaddr*>(&ss), len);
    ASSERT_TRUE(b) << s;
    EXPECT_EQ(*b, a) << s;
    EXPECT_EQ(SocketAddress::fromAbi(a.toAbi()), a) << s;
  }
  // Too short a length for the family is refused.
  SocketAddress v6 = *SocketAddress::parse("[::1]:1");
  sockaddr_storage ss;
  v6.toSockaddr(&ss);
  EXPECT_FALSE(SocketAddress::fromSockaddr(reinterpret_cast<sockaddr*>(&ss), 8));
}

TEST(SocketAddress, AbiPortIsNetworkOrder) {
  weft_sockaddr w = SocketAddress::parse("1.2.3.4:15001")->toAbi();
  EXPECT_EQ(w.port, htons(15001));
  EXPECT_EQ(w.family, WEFT_AF_INET);
}

}  // namespace
}  // namespace weft
