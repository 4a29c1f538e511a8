// Node-protocol framing over a SOCK_SEQPACKET socketpair: messages, fds, and bad datagrams.
#include "common/seqpacket.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include "weft/node/v1/node.pb.h"

namespace weft {
namespace {

struct Pair {
  UniqueFd a, b;
};

Pair makePair() {
  int sv[2];
  EXPECT_EQ(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
  return Pair{UniqueFd(sv[0]), UniqueFd(sv[1])};
}

TEST(Seqpacket, MessageRoundTrip) {
  Pair p = makePair();
  node::v1::ZtunnelMessage out;
  out.mutable_hello()->set_protocol_version(1);
  out.mutable_hello()->set_ztunnel_version("0.1.0");
  ASSERT_TRUE(sendNodeMessage(p.a.get(), out).isOk());
  node::v1::ZtunnelMessage in;
  std::vector<UniqueFd> fds;
  std::string err;
  ASSERT_EQ(recvNodeMessage(p.b.get(), &in, &fds, &err), RecvResult::kMessage) << err;
  EXPECT_EQ(in.hello().protocol_version(), 1u);
  EXPECT_EQ(in.hello().ztunnel_version(), "0.1.0");
  EXPECT_TRUE(fds.empty());
}

TEST(Seqpacket, CarriesFileDescriptors) {
  Pair p = makePair();
  int fd = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  UniqueFd owned(fd);
  node::v1::AgentMessage out;
  out.set_id(7);
  out.mutable_add_workload()->mutable_workload()->set_uid("u1");
  ASSERT_TRUE(sendNodeMessage(p.a.get(), out, {fd}).isOk());
  node::v1::AgentMessage in;
  std::vector<UniqueFd> fds;
  std::string err;
  ASSERT_EQ(recvNodeMessage(p.b.get(), &in, &fds, &err), RecvResult::kMessage) << err;
  EXPECT_EQ(in.id(), 7u);
  ASSERT_EQ(fds.size(), 1u);
  struct stat s1, s2;
  ASSERT_EQ(fstat(fd, &s1), 0);
  ASSERT_EQ(fstat(fds[0].get(), &s2), 0);
  EXPECT_EQ(s1.st_ino, s2.st_ino);
  EXPECT_NE(fds[0].get(), fd);
}

TEST(Seqpacket, GarbageIsAnError) {
  Pair p = makePair();
  // A varint that never ends: does not parse as any protobuf message.
  const char junk[] = {'\x08', '\xff', '\xff', '\xff'};
  ASSERT_EQ(send(p.a.get(), junk, sizeof(junk), 0), static_cast<ssize_t>(sizeof(junk)));
  node::v1::AgentMessage in;
  std::vector<UniqueFd> fds;
  std::string err;
  EXPECT_EQ(recvNodeMessage(p.b.get(), &in, &fds, &err), RecvResult::kError);
  EXPECT_FALSE(err.empty());
}

TEST(Seqpacket, ClosedAndAgain) {
  Pair p = makePair();
  ASSERT_EQ(fcntl(p.b.get(), F_SETFL, O_NONBLOCK), 0);
  node::v1::AgentMessage in;
  std::vector<UniqueFd> fds;
  std::string err;
  EXPECT_EQ(recvNodeMessage(p.b.get(), &in, &fds, &err), RecvResult::kAgain);
  p.a.reset();
  EXPECT_EQ(recvNodeMessage(p.b.get(), &in, &fds, &err), RecvResult::kClosed);
}

TEST(Seqpacket, OversizedMessageRefusedBySender) {
  Pair p = makePair();
  node::v1::ZtunnelMessage out;
  out.mutable_hello()->set_ztunnel_version(std::string(kMaxNodeMessageBytes + 1, 'x'));
  EXPECT_FALSE(sendNodeMessage(p.a.get(), out).isOk());
}

}  // namespace
}  // namespace weft
