// Blocking socket I/O with deadlines and SHA-256, shared by the echo test tools.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "common/address.h"
#include "common/fd.h"
#include "common/status.h"

namespace weft::echo {

using Clock = std::chrono::steady_clock;

// Bytes of the digest that prefixes every answer of the echo server.
constexpr size_t kDigestSize = 32;

// SHA-256 of data; fails only if OpenSSL does.
Result<std::vector<uint8_t>> sha256(const uint8_t* data, size_t len);

// Non-blocking connect finished with poll before `deadline`; returns a blocking-style fd that
// the other helpers drive with poll.
Result<UniqueFd> connectTo(const SocketAddress& target, Clock::time_point deadline);

// Writes all of buf or fails (timeout, reset, ...).
Status writeAll(int fd, const uint8_t* buf, size_t len, Clock::time_point deadline);

// Reads until EOF, appending to out; fails when more than cap bytes arrive or on timeout.
Status readToEof(int fd, std::vector<uint8_t>* out, size_t cap, Clock::time_point deadline);

// "ip:port" with IPv4-mapped IPv6 addresses shown as plain IPv4 (dual-stack listeners).
std::string displayAddress(const sockaddr_storage& ss, socklen_t len);

}  // namespace weft::echo
