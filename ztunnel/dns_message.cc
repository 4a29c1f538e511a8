// DNS wire parsing and encoding (see dns_message.h for the rules).
#include "ztunnel/dns_message.h"

#include <fmt/format.h>

namespace weft::ztunnel::dns {
namespace {

uint16_t get16(std::span<const uint8_t> m, size_t at) {
  return static_cast<uint16_t>((m[at] << 8) | m[at + 1]);
}

uint32_t get32(std::span<const uint8_t> m, size_t at) {
  return (static_cast<uint32_t>(get16(m, at)) << 16) | get16(m, at + 2);
}

void put16(std::vector<uint8_t>& out, uint16_t v) {
  out.push_back(static_cast<uint8_t>(v >> 8));
  out.push_back(static_cast<uint8_t>(v & 0xff));
}

void put32(std::vector<uint8_t>& out, uint32_t v) {
  put16(out, static_cast<uint16_t>(v >> 16));
  put16(out, static_cast<uint16_t>(v & 0xffff));
}

// Reads the name at `*pos`. On success `*pos` is just past the name as it sits at that place
// (past the first pointer, if any) and `labels` (if given) holds its labels.
Status readName(std::span<const uint8_t> m, size_t* pos, std::vector<std::string>* labels) {
  size_t at = *pos;
  size_t after = 0;  // where the caller continues; set at the first pointer
  size_t wire = 0;   // length of the name uncompressed, length octets included
  int hops = 0;
  if (labels) labels->clear();
  for (;;) {
    if (at >= m.size()) return Status::errorf("name at {}: runs past the end", *pos);
    uint8_t len = m[at];
    if ((len & 0xc0) == 0xc0) {
      if (at + 1 >= m.size()) return Status::errorf("name at {}: pointer cut off", *pos);
      size_t target = (static_cast<size_t>(len & 0x3f) << 8) | m[at + 1];
      // Strictly backwards: every hop lowers the position, so a loop cannot exist; the hop
      // limit bounds the work on top of that.
      if (target >= at)
        return Status::errorf("name at {}: pointer to {} is not backwards", *pos, target);
      if (++hops > kMaxPointerHops) return Status::errorf("name at {}: too many pointers", *pos);
      if (after == 0) after = at + 2;
      at = target;
      continue;
    }
    if ((len & 0xc0) != 0) return Status::errorf("name at {}: label type {:#x}", *pos, len & 0xc0);
    wire += 1 + len;
    if (wire > kMaxNameWire) return Status::errorf("name at {}: longer than 255 bytes", *pos);
    if (len == 0) {
      *pos = after != 0 ? after : at + 1;
      return Status::ok();
    }
    if (at + 1 + len > m.size()) return Status::errorf("name at {}: label runs past the end", *pos);
    if (labels) labels->emplace_back(reinterpret_cast<const char*>(&m[at + 1]), len);
    at += 1 + len;
  }
}

void putName(std::vector<uint8_t>& out, const std::vector<std::string>& labels) {
  for (const std::string& l : labels) {
    out.push_back(static_cast<uint8_t>(l.size()));
    out.insert(out.end(), l.begin(), l.end());
  }
  out.push_back(0);
}

}  // namespace

std::string Query::name() const {
  if (labels.empty()) return ".";
  std::string out;
  for (size_t i = 0; i < labels.size(); ++i) {
    if (i) out += '.';
    for (unsigned char c : labels[i]) {
      if (c == '.' || c == '\\' || c < '!' || c > '~')
        out += fmt::format("\\{:03d}", c);
      else
        out += static_cast<char>(c);
    }
  }
  return out;
}

size_t Query::maxUdpAnswer() const {
  if (!edns) return kMaxUdpPlain;
  return edns_udp_size < kMaxUdpPlain ? kMaxUdpPlain : edns_udp_size;
}

Result<Query> parseQuery(std::span<const uint8_t> m) {
  if (m.size() < kHeaderSize) return Status::errorf("{} bytes: shorter than a header", m.size());
  if (m.size() > kMaxMessage) return Status::errorf("{} bytes: too long", m.size());
  Query q;
  q.id = get16(m, 0);
  q.flags = get16(m, 2);
  if (q.flags & kFlagQR) return Status::error("QR set: a response, not a query");
  uint16_t qd = get16(m, 4), an = get16(m, 6), ns = get16(m, 8), ar = get16(m, 10);
  if (qd != 1) return Status::errorf("QDCOUNT {}: only 1 is served", qd);
  size_t pos = kHeaderSize;
  if (auto st = readName(m, &pos, &q.labels); !st) return st.context("question");
  if (pos + 4 > m.size()) return Status::error("question: type/class cut off");
  q.qtype = get16(m, pos);
  q.qclass = get16(m, pos + 2);
  pos += 4;
  // Every record of the other sections is walked with the same bounds; each takes at least 11
  // bytes, so their number is bounded by the message size whatever the counts say.
  uint32_t records = static_cast<uint32_t>(an) + ns + ar;
  for (uint32_t i = 0; i < records; ++i) {
    bool additional = i >= static_cast<uint32_t>(an) + ns;
    size_t start = pos;
    std::vector<std::string> owner;
    if (auto st = readName(m, &pos, &owner); !st) return st.context(fmt::format("record {}", i));
    if (pos + 10 > m.size()) return Status::errorf("record {}: header cut off", i);
    uint16_t type = get16(m, pos);
    uint16_t klass = get16(m, pos + 2);
    uint32_t ttl = get32(m, pos + 4);
    uint16_t rdlen = get16(m, pos + 8);
    pos += 10;
    if (pos + rdlen > m.size()) return Status::errorf("record {}: data runs past the end", i);
    if (type == kTypeOPT) {
      if (!additional) return Status::errorf("record {}: OPT outside the additional section", i);
      if (q.edns) return Status::errorf("record {}: a second OPT", i);
      if (!owner.empty() || m[start] != 0) return Status::errorf("record {}: OPT name not root", i);
      q.edns = true;
      q.edns_udp_size = klass;
      q.edns_version = static_cast<uint8_t>((ttl >> 16) & 0xff);
      // Options: each a 4-byte header and its data, exactly filling rdata.
      size_t o = pos, end = pos + rdlen;
      while (o < end) {
        if (o + 4 > end) return Status::errorf("record {}: OPT option cut off", i);
        size_t olen = get16(m, o + 2);
        if (o + 4 + olen > end) return Status::errorf("record {}: OPT option runs past rdata", i);
        o += 4 + olen;
      }
    }
    pos += rdlen;
  }
  if (pos != m.size()) return Status::errorf("{} bytes after the last record", m.size() - pos);
  return q;
}

Result<ResponseHeader> parseResponseHeader(std::span<const uint8_t> m) {
  if (m.size() < kHeaderSize) return Status::errorf("{} bytes: shorter than a header", m.size());
  ResponseHeader h;
  h.id = get16(m, 0);
  h.flags = get16(m, 2);
  if (!(h.flags & kFlagQR)) return Status::error("QR clear: not a response");
  return h;
}

std::vector<uint8_t> buildResponse(const Query& q, uint16_t rcode,
                                   const std::vector<IpAddr>& answers, uint32_t ttl,
                                   bool authoritative, size_t max_size, bool* truncated,
                                   uint16_t extra_flags) {
  if (truncated) *truncated = false;
  bool badvers = q.edns && q.edns_version != 0;
  if (badvers) rcode = kBadVers;
  auto build = [&](bool with_answers) {
    std::vector<uint8_t> out;
    out.reserve(64 + answers.size() * 28);
    put16(out, q.id);
    uint16_t flags =
        kFlagQR | (q.flags & 0x7800) | (q.flags & kFlagRD) | kFlagRA | extra_flags | (rcode & 0xf);
    if (authoritative) flags |= kFlagAA;
    if (!with_answers) flags |= kFlagTC;
    put16(out, flags);
    put16(out, 1);
    put16(out, with_answers && !badvers ? static_cast<uint16_t>(answers.size()) : 0);
    put16(out, 0);
    put16(out, q.edns ? 1 : 0);
    putName(out, q.labels);
    put16(out, q.qtype);
    put16(out, q.qclass);
    if (with_answers && !badvers) {
      for (const IpAddr& ip : answers) {
        put16(out, 0xc000 | kHeaderSize);  // the question's name
        put16(out, ip.isV4() ? kTypeA : kTypeAAAA);
        put16(out, kClassIN);
        put32(out, ttl);
        if (ip.isV4()) {
          put16(out, 4);
          const auto* b = reinterpret_cast<const uint8_t*>(&ip.v4addr().s_addr);
          out.insert(out.end(), b, b + 4);
        } else {
          put16(out, 16);
          const auto* b = ip.v6addr().s6_addr;
          out.insert(out.end(), b, b + 16);
        }
      }
    }
    if (q.edns) {
      out.push_back(0);  // root
      put16(out, kTypeOPT);
      put16(out, kOurUdpSize);
      put32(out, static_cast<uint32_t>((rcode >> 4) & 0xff) << 24);  // extended rcode, version 0
      put16(out, 0);
    }
    return out;
  };
  std::vector<uint8_t> full = build(true);
  if (full.size() <= max_size) return full;
  if (truncated) *truncated = true;
  return build(false);
}

std::vector<uint8_t> truncateAnswer(const Query& q, const ResponseHeader& upstream) {
  Query copy = q;
  copy.id = upstream.id;
  return buildResponse(copy, upstream.rcode(), {}, 0, (upstream.flags & kFlagAA) != 0, 0, nullptr);
}

}  // namespace weft::ztunnel::dns
