// The DNS wire parser and encoder: queries as real resolvers send them, every refusal of the
// strict parser (bounds, pointers, loops, counts, OPT), the proxy's answers and truncation, and
// a seeded fuzz run of random and mutated messages that must never crash or read out of bounds.
#include "ztunnel/dns_message.h"

#include <gtest/gtest.h>

#include <random>

namespace weft::ztunnel::dns {
namespace {

using Bytes = std::vector<uint8_t>;

void put16(Bytes& b, uint16_t v) {
  b.push_back(static_cast<uint8_t>(v >> 8));
  b.push_back(static_cast<uint8_t>(v));
}

void putName(Bytes& b, const std::vector<std::string>& labels) {
  for (const auto& l : labels) {
    b.push_back(static_cast<uint8_t>(l.size()));
    b.insert(b.end(), l.begin(), l.end());
  }
  b.push_back(0);
}

Bytes header(uint16_t id, uint16_t flags, uint16_t qd, uint16_t an = 0, uint16_t ns = 0,
             uint16_t ar = 0) {
  Bytes b;
  put16(b, id);
  put16(b, flags);
  put16(b, qd);
  put16(b, an);
  put16(b, ns);
  put16(b, ar);
  return b;
}

void putOpt(Bytes& b, uint16_t size, uint8_t version = 0, const Bytes& options = {}) {
  b.push_back(0);
  put16(b, kTypeOPT);
  put16(b, size);
  put16(b, version);  // extended rcode 0, version
  put16(b, 0);        // flags
  put16(b, static_cast<uint16_t>(options.size()));
  b.insert(b.end(), options.begin(), options.end());
}

// A query like glibc's: RD set, one question, optionally EDNS.
Bytes query(const std::vector<std::string>& labels, uint16_t type, bool edns = false,
            uint16_t size = 1232) {
  Bytes b = header(0x1234, kFlagRD, 1, 0, 0, edns ? 1 : 0);
  putName(b, labels);
  put16(b, type);
  put16(b, kClassIN);
  if (edns) putOpt(b, size);
  return b;
}

TEST(DnsMessage, ParsesAPlainQuery) {
  auto q = parseQuery(query({"web", "mesh", "svc", "cluster", "local"}, kTypeA));
  ASSERT_TRUE(q.isOk()) << q.status().message();
  EXPECT_EQ(q->id, 0x1234);
  EXPECT_TRUE(q->recursionDesired());
  EXPECT_EQ(q->opcode(), 0);
  EXPECT_EQ(q->name(), "web.mesh.svc.cluster.local");
  EXPECT_EQ(q->qtype, kTypeA);
  EXPECT_EQ(q->qclass, kClassIN);
  EXPECT_FALSE(q->edns);
  EXPECT_EQ(q->maxUdpAnswer(), 512u);
}

TEST(DnsMessage, ParsesEdnsWithOptions) {
  Bytes cookie = {0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8};  // COOKIE option, client part
  Bytes b = header(7, 0, 1, 0, 0, 1);
  putName(b, {"Example", "COM"});
  put16(b, kTypeAAAA);
  put16(b, kClassIN);
  putOpt(b, 4096, 0, cookie);
  auto q = parseQuery(b);
  ASSERT_TRUE(q.isOk()) << q.status().message();
  EXPECT_TRUE(q->edns);
  EXPECT_EQ(q->edns_udp_size, 4096);
  EXPECT_EQ(q->maxUdpAnswer(), 4096u);
  EXPECT_EQ(q->name(), "Example.COM");  // case kept (0x20 randomization)
}

TEST(DnsMessage, EdnsSizeBelow512CountsAs512) {
  auto q = parseQuery(query({"a"}, kTypeA, true, 100));
  ASSERT_TRUE(q.isOk());
  EXPECT_EQ(q->maxUdpAnswer(), 512u);
}

TEST(DnsMessage, RootAndEscapedNames) {
  Bytes b = header(1, 0, 1);
  putName(b, {});
  put16(b, 2);
  put16(b, kClassIN);
  auto root = parseQuery(b);
  ASSERT_TRUE(root.isOk());
  EXPECT_TRUE(root->labels.empty());
  EXPECT_EQ(root->name(), ".");

  auto odd = parseQuery(query({std::string("a.b"), std::string("\x01z", 2)}, kTypeA));
  ASSERT_TRUE(odd.isOk());
  EXPECT_EQ(odd->name(), "a\\046b.\\001z");
}

TEST(DnsMessage, FollowsBackwardPointers) {
  // Question name = "www" + pointer to a name stored in... the question may only point back;
  // here an earlier copy cannot exist, so a pointer in an additional record is used instead.
  Bytes b = header(9, 0, 1, 0, 0, 1);
  putName(b, {"svc", "ns"});  // at offset 12
  put16(b, kTypeA);
  put16(b, kClassIN);
  b.push_back(3);
  b.insert(b.end(), {'w', 'w', 'w'});
  put16(b, 0xc000 | 12);  // -> svc.ns
  put16(b, kTypeA);
  put16(b, kClassIN);
  put16(b, 0);
  put16(b, 60);
  put16(b, 4);
  b.insert(b.end(), {1, 2, 3, 4});
  auto q = parseQuery(b);
  ASSERT_TRUE(q.isOk()) << q.status().message();
  EXPECT_EQ(q->name(), "svc.ns");
}

struct BadCase {
  const char* what;
  Bytes msg;
};

std::vector<BadCase> badCases() {
  std::vector<BadCase> c;
  c.push_back({"empty", {}});
  c.push_back({"short header", {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}});
  {
    Bytes b = query({"a"}, kTypeA);
    b[2] |= 0x80;  // QR
    c.push_back({"a response", b});
  }
  {
    Bytes b = header(1, 0, 0);
    c.push_back({"QDCOUNT 0", b});
  }
  {
    Bytes b = header(1, 0, 2);
    putName(b, {"a"});
    put16(b, 1);
    put16(b, 1);
    putName(b, {"b"});
    put16(b, 1);
    put16(b, 1);
    c.push_back({"QDCOUNT 2", b});
  }
  {
    Bytes b = query({"abc"}, kTypeA);
    b.resize(b.size() - 6);  // cut inside the name
    c.push_back({"name cut off", b});
  }
  {
    Bytes b = query({"abc"}, kTypeA);
    b.resize(b.size() - 2);
    c.push_back({"class cut off", b});
  }
  {
    Bytes b = header(1, 0, 1);
    b.push_back(64);  // label length 64
    b.insert(b.end(), 64, 'a');
    b.push_back(0);
    put16(b, 1);
    put16(b, 1);
    c.push_back({"label over 63", b});
  }
  {
    Bytes b = header(1, 0, 1);
    for (int i = 0; i < 5; ++i) {  // 5 * 64 = 320 bytes of name
      b.push_back(63);
      b.insert(b.end(), 63, 'x');
    }
    b.push_back(0);
    put16(b, 1);
    put16(b, 1);
    c.push_back({"name over 255", b});
  }
  {
    Bytes b = header(1, 0, 1);
    b.push_back(0x40);  // extended label type
    b.push_back(0);
    put16(b, 1);
    put16(b, 1);
    c.push_back({"label type 01", b});
  }
  {
    Bytes b = header(1, 0, 1);
    put16(b, 0xc000 | 12);  // points at itself
    put16(b, 1);
    put16(b, 1);
    c.push_back({"pointer to itself", b});
  }
  {
    Bytes b = header(1, 0, 1);
    put16(b, 0xc000 | 40);  // forward, past the end
    put16(b, 1);
    put16(b, 1);
    c.push_back({"forward pointer", b});
  }
  {
    // Two names pointing at each other: the second (in an additional record) points back to
    // the first, which points forward to the second.
    Bytes b = header(1, 0, 1, 0, 0, 1);
    put16(b, 0xc000 | 18);
    put16(b, 1);
    put16(b, 1);
    put16(b, 0xc000 | 12);  // offset 18
    put16(b, 1);
    put16(b, 1);
    put16(b, 0);
    put16(b, 0);
    put16(b, 0);
    c.push_back({"pointer loop", b});
  }
  {
    Bytes b = header(1, 0, 1);
    b.push_back(0xc0);  // pointer cut off
    c.push_back({"pointer cut off", b});
  }
  {
    Bytes b = query({"a"}, kTypeA);
    b.push_back(0);
    c.push_back({"trailing byte", b});
  }
  {
    Bytes b = query({"a"}, kTypeA);
    b[11] = 1;  // ARCOUNT 1, nothing there
    c.push_back({"missing record", b});
  }
  {
    Bytes b = header(1, 0, 1, 0, 0, 1);
    putName(b, {"a"});
    put16(b, 1);
    put16(b, 1);
    putOpt(b, 1232);
    b[b.size() - 1] = 9;  // rdlength 9, no data
    c.push_back({"rdata past the end", b});
  }
  {
    Bytes b = header(1, 0, 1, 0, 0, 2);
    putName(b, {"a"});
    put16(b, 1);
    put16(b, 1);
    putOpt(b, 1232);
    putOpt(b, 1232);
    c.push_back({"two OPT", b});
  }
  {
    Bytes b = header(1, 0, 1, 1);
    putName(b, {"a"});
    put16(b, 1);
    put16(b, 1);
    putOpt(b, 1232);
    c.push_back({"OPT in the answer section", b});
  }
  {
    Bytes b = header(1, 0, 1, 0, 0, 1);
    putName(b, {"a"});
    put16(b, 1);
    put16(b, 1);
    putOpt(b, 1232, 0, {0, 10, 0, 9, 1});  // option claims 9 bytes, has 1
    c.push_back({"OPT option past rdata", b});
  }
  {
    Bytes b = header(1, 0, 1, 0, 0, 1);
    putName(b, {"a"});
    put16(b, 1);
    put16(b, 1);
    putName(b, {"x"});  // OPT with a name
    put16(b, kTypeOPT);
    put16(b, 512);
    put16(b, 0);
    put16(b, 0);
    put16(b, 0);
    c.push_back({"OPT not at root", b});
  }
  c.push_back({"over 64 KiB", Bytes(70000, 0)});
  return c;
}

TEST(DnsMessage, RefusesMalformedQueries) {
  for (const auto& c : badCases()) {
    auto q = parseQuery(c.msg);
    EXPECT_FALSE(q.isOk()) << c.what << " was accepted";
  }
}

TEST(DnsMessage, AnswersWithRecordsAndEchoesTheQuestion) {
  auto q = parseQuery(query({"Web", "mesh", "svc", "cluster", "local"}, kTypeA));
  ASSERT_TRUE(q.isOk());
  bool truncated = true;
  Bytes r = buildResponse(*q, kNoError, {*IpAddr::parse("10.96.0.20"), *IpAddr::parse("fd00::1")},
                          30, true, 512, &truncated);
  EXPECT_FALSE(truncated);
  ASSERT_GE(r.size(), 12u);
  EXPECT_EQ(r[0], 0x12);
  EXPECT_EQ(r[1], 0x34);
  uint16_t flags = static_cast<uint16_t>((r[2] << 8) | r[3]);
  EXPECT_TRUE(flags & kFlagQR);
  EXPECT_TRUE(flags & kFlagAA);
  EXPECT_TRUE(flags & kFlagRD);
  EXPECT_TRUE(flags & kFlagRA);
  EXPECT_FALSE(flags & kFlagTC);
  EXPECT_EQ(flags & 0xf, kNoError);
  EXPECT_EQ(r[5], 1);  // QDCOUNT
  EXPECT_EQ(r[7], 2);  // ANCOUNT
  EXPECT_EQ(r[11], 0);
  // Question echoed byte for byte (case kept).
  Bytes asked = query({"Web", "mesh", "svc", "cluster", "local"}, kTypeA);
  EXPECT_TRUE(std::equal(asked.begin() + 12, asked.end(), r.begin() + 12));
  size_t at = asked.size();
  // First answer: pointer to the question, A, IN, TTL 30, 4 bytes.
  Bytes a1 = {0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 96, 0, 20};
  EXPECT_TRUE(std::equal(a1.begin(), a1.end(), r.begin() + static_cast<long>(at)));
  at += a1.size();
  EXPECT_EQ(r[at + 3], kTypeAAAA);
  EXPECT_EQ(r[at + 11], 16);
  EXPECT_EQ(r.size(), at + 12 + 16);
  // And the answer is itself a well-formed message: its header says response.
  auto h = parseResponseHeader(r);
  ASSERT_TRUE(h.isOk());
  EXPECT_EQ(h->id, 0x1234);
}

TEST(DnsMessage, NxDomainAndEdnsEcho) {
  auto q = parseQuery(query({"nope", "mesh", "svc", "cluster", "local"}, kTypeA, true, 4096));
  ASSERT_TRUE(q.isOk());
  Bytes r = buildResponse(*q, kNxDomain, {}, 30, true, q->maxUdpAnswer(), nullptr);
  EXPECT_EQ(r[3] & 0xf, kNxDomain);
  EXPECT_EQ(r[7], 0);
  EXPECT_EQ(r[11], 1);  // our OPT
  // Our OPT advertises 1232 and is the last 11 bytes.
  ASSERT_GE(r.size(), 11u);
  size_t opt = r.size() - 11;
  EXPECT_EQ(r[opt], 0);
  EXPECT_EQ((r[opt + 1] << 8) | r[opt + 2], kTypeOPT);
  EXPECT_EQ((r[opt + 3] << 8) | r[opt + 4], kOurUdpSize);
}

TEST(DnsMessage, BadEdnsVersionGetsBadvers) {
  Bytes b = header(5, 0, 1, 0, 0, 1);
  putName(b, {"a"});
  put16(b, kTypeA);
  put16(b, kClassIN);
  putOpt(b, 1232, 1);
  auto q = parseQuery(b);
  ASSERT_TRUE(q.isOk());
  Bytes r = buildResponse(*q, kNoError, {*IpAddr::parse("10.0.0.1")}, 30, true, 512, nullptr);
  EXPECT_EQ(r[3] & 0xf, 0);  // low bits of 16
  EXPECT_EQ(r[7], 0);        // no answers
  size_t opt = r.size() - 11;
  EXPECT_EQ(r[opt + 5], 1);  // extended rcode: 16 >> 4
}

TEST(DnsMessage, TruncatesWhenTheAnswerDoesNotFit) {
  auto q = parseQuery(query({"many", "mesh", "svc", "cluster", "local"}, kTypeA));
  ASSERT_TRUE(q.isOk());
  std::vector<IpAddr> ips;
  for (int i = 0; i < 40; ++i) ips.push_back(IpAddr::v4(0x0a600000u + static_cast<uint32_t>(i)));
  bool truncated = false;
  Bytes r = buildResponse(*q, kNoError, ips, 30, true, 512, &truncated);
  // 40 * 16 bytes of answers do not fit 512 without EDNS.
  EXPECT_TRUE(truncated);
  EXPECT_LE(r.size(), 512u);
  EXPECT_TRUE(((r[2] << 8) | r[3]) & kFlagTC);
  EXPECT_EQ(r[7], 0);
  // With a 4096-byte EDNS limit they fit.
  auto big = parseQuery(query({"many", "mesh", "svc", "cluster", "local"}, kTypeA, true, 4096));
  ASSERT_TRUE(big.isOk());
  r = buildResponse(*big, kNoError, ips, 30, true, big->maxUdpAnswer(), &truncated);
  EXPECT_FALSE(truncated);
  EXPECT_EQ(r[7], 40);
}

TEST(DnsMessage, TruncatedUpstreamAnswerKeepsIdAndRcode) {
  auto q = parseQuery(query({"big", "example", "test"}, 16));
  ASSERT_TRUE(q.isOk());
  ResponseHeader up;
  up.id = q->id;
  up.flags = kFlagQR | kFlagAA | kNxDomain;
  Bytes r = truncateAnswer(*q, up);
  auto h = parseResponseHeader(r);
  ASSERT_TRUE(h.isOk());
  EXPECT_EQ(h->id, q->id);
  EXPECT_EQ(h->rcode(), kNxDomain);
  EXPECT_TRUE(h->flags & kFlagTC);
  EXPECT_TRUE(h->flags & kFlagAA);
  EXPECT_LE(r.size(), 512u);
}

TEST(DnsMessage, ResponseHeaderRefusesQueries) {
  EXPECT_FALSE(parseResponseHeader(query({"a"}, kTypeA)).isOk());
  EXPECT_FALSE(parseResponseHeader(Bytes{1, 2, 3}).isOk());
}

// Random bytes and single-byte mutations of valid queries: the parser must return (ok or not)
// without touching memory outside the message (ASan in scripts/test checks that), and whatever
// it accepts must re-encode.
TEST(DnsMessage, FuzzNeverCrashes) {
  std::mt19937 rng(20261126);
  std::vector<Bytes> seeds = {query({"web", "mesh", "svc", "cluster", "local"}, kTypeA, true),
                              query({"example", "com"}, kTypeAAAA), badCases()[12].msg};
  size_t accepted = 0;
  for (int i = 0; i < 20000; ++i) {
    Bytes m;
    if (i % 2 == 0) {
      m.resize(rng() % 80);
      for (auto& b : m) b = static_cast<uint8_t>(rng());
      if (m.size() > 5 && (i % 4 == 0)) {
        m[2] &= 0x7f;  // look like a query
        m[4] = 0;
        m[5] = 1;
      }
    } else {
      m = seeds[rng() % seeds.size()];
      int edits = 1 + static_cast<int>(rng() % 3);
      for (int e = 0; e < edits && !m.empty(); ++e) {
        size_t at = rng() % m.size();
        switch (rng() % 3) {
          case 0:
            m[at] = static_cast<uint8_t>(rng());
            break;
          case 1:
            m.erase(m.begin() + static_cast<long>(at));
            break;
          default:
            m.insert(m.begin() + static_cast<long>(at), static_cast<uint8_t>(rng()));
        }
      }
    }
    auto q = parseQuery(m);
    if (!q) continue;
    ++accepted;
    bool truncated = false;
    Bytes r = buildResponse(*q, kNoError, {*IpAddr::parse("10.1.2.3")}, 5, true, q->maxUdpAnswer(),
                            &truncated);
    ASSERT_TRUE(parseResponseHeader(r).isOk());
    ASSERT_LE(r.size(), std::max<size_t>(q->maxUdpAnswer(), 12 + 255 + 4 + 11));
  }
  EXPECT_GT(accepted, 0u);  // some mutations stay valid: the accept path ran too
}

}  // namespace
}  // namespace weft::ztunnel::dns
