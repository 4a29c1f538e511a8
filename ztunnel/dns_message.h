// DNS wire format for the ztunnel's DNS proxy: a strict, bounded parser for queries (one
// question, compression pointers with loop protection, EDNS OPT) and the encoder of the answers
// the proxy gives itself (A/AAAA, NXDOMAIN, SERVFAIL, truncation). No DNS library.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "common/address.h"
#include "common/status.h"

namespace weft::ztunnel::dns {

inline constexpr size_t kHeaderSize = 12;
inline constexpr size_t kMaxMessage = 65535;   // a TCP frame's length field
inline constexpr size_t kMaxUdpPlain = 512;    // RFC 1035 limit without EDNS
inline constexpr uint16_t kOurUdpSize = 1232;  // what we advertise in our OPT (DNS flag day 2020)
inline constexpr size_t kMaxNameWire = 255;    // whole name, length octets included
inline constexpr size_t kMaxLabel = 63;
inline constexpr int kMaxPointerHops = 32;  // more than any sane name needs

inline constexpr uint16_t kTypeA = 1;
inline constexpr uint16_t kTypeAAAA = 28;
inline constexpr uint16_t kTypeOPT = 41;
inline constexpr uint16_t kClassIN = 1;

enum Rcode : uint16_t {
  kNoError = 0,
  kFormErr = 1,
  kServFail = 2,
  kNxDomain = 3,
  kNotImp = 4,
  kRefused = 5,
  kBadVers = 16,  // extended (EDNS) rcode
};

// Header flag bits (second 16-bit word).
inline constexpr uint16_t kFlagQR = 0x8000;
inline constexpr uint16_t kFlagAA = 0x0400;
inline constexpr uint16_t kFlagTC = 0x0200;
inline constexpr uint16_t kFlagRD = 0x0100;
inline constexpr uint16_t kFlagRA = 0x0080;

// A query, as far as the proxy needs it. Everything in it was bounds-checked.
struct Query {
  uint16_t id = 0;
  uint16_t flags = 0;               // the header's flag word as sent
  std::vector<std::string> labels;  // question name, as sent (case kept); empty = the root
  uint16_t qtype = 0;
  uint16_t qclass = 0;
  bool edns = false;           // an OPT record was present
  uint16_t edns_udp_size = 0;  // its advertised payload size (as sent)
  uint8_t edns_version = 0;

  uint8_t opcode() const { return static_cast<uint8_t>((flags >> 11) & 0xf); }
  bool recursionDesired() const { return (flags & kFlagRD) != 0; }
  // "www.example.com" (labels joined with dots, bytes outside [!-~] and dots inside labels
  // escaped as \DDD), for logs.
  std::string name() const;
  // The largest answer the client takes over UDP: 512 without EDNS, else its advertised size
  // (at least 512).
  size_t maxUdpAnswer() const;
};

// Parses a query. Refused (the caller drops and counts it): shorter than a header or over 64 KiB;
// QR set (a response); QDCOUNT other than 1; a name that runs past the end, has a label over 63
// bytes, a label type other than 00/11, a pointer that does not point strictly backwards, more
// than kMaxPointerHops pointers, or more than 255 bytes; a record that runs past the end; more
// than one OPT or an OPT with a non-root name or outside the additional section; any byte left
// after the last record.
Result<Query> parseQuery(std::span<const uint8_t> msg);

// What a response header says, for checking an upstream answer before relaying it.
struct ResponseHeader {
  uint16_t id = 0;
  uint16_t flags = 0;
  uint16_t rcode() const { return flags & 0xf; }
};
// The header of a response (QR set). Refused: shorter than a header, QR clear.
Result<ResponseHeader> parseResponseHeader(std::span<const uint8_t> msg);

// Builds the proxy's own answer to `q`: the question echoed as sent, one A/AAAA record per
// address in `answers` (owner = the question name, by pointer), an OPT record if the query had
// one (advertising kOurUdpSize; BADVERS if the query's EDNS version was not 0), AA as given, RD
// copied, RA set. If the result is over `max_size`, the answers are left out and TC is set
// (`*truncated` = true). `extra_flags` are or-ed into the header (e.g. kFlagTC for a relayed
// truncated answer).
std::vector<uint8_t> buildResponse(const Query& q, uint16_t rcode,
                                   const std::vector<IpAddr>& answers, uint32_t ttl,
                                   bool authoritative, size_t max_size, bool* truncated,
                                   uint16_t extra_flags = 0);

// An upstream answer that does not fit the client's UDP limit, cut down to the header and
// question with TC set (the client retries over TCP), keeping the upstream's id, rcode and AA.
std::vector<uint8_t> truncateAnswer(const Query& q, const ResponseHeader& upstream);

}  // namespace weft::ztunnel::dns
