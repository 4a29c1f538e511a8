// Address literals for the ztunnel unit tests: parse a known-good string or fail the test binary.
#pragma once

#include "common/address.h"

namespace weft::ztunnel::testutil {

inline IpAddr ip(const char* s) { return *IpAddr::parse(s); }
inline SocketAddress addr(const char* s) { return *SocketAddress::parse(s); }

}  // namespace weft::ztunnel::testutil
