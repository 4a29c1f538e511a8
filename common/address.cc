// IpAddr / SocketAddress parsing, formatting and ABI conversion.
#include "common/address.h"

#include <arpa/inet.h>

#include <cstring>

namespace weft {

std::optional<IpAddr> IpAddr::parse(std::string_view text) {
  std::string s(text);
  IpAddr a;
  if (inet_pton(AF_INET, s.c_str(), &a.v4_) == 1) {
    a.family_ = AF_INET;
    return a;
  }
  if (inet_pton(AF_INET6, s.c_str(), &a.v6_) == 1) {
    a.family_ = AF_INET6;
    return a;
  }
  return std::nullopt;
}

IpAddr IpAddr::v4(uint32_t host_order) {
  IpAddr a;
  a.family_ = AF_INET;
  a.v4_.s_addr = htonl(host_order);
  return a;
}

IpAddr IpAddr::fromV4(const in_addr& in) {
  IpAddr a;
  a.family_ = AF_INET;
  a.v4_ = in;
  return a;
}

IpAddr IpAddr::fromV6(const in6_addr& in) {
  IpAddr a;
  if (IN6_IS_ADDR_V4MAPPED(&in)) {
    a.family_ = AF_INET;
    memcpy(&a.v4_.s_addr, &in.s6_addr[12], 4);
    return a;
  }
  a.family_ = AF_INET6;
  a.v6_ = in;
  return a;
}

bool IpAddr::isLoopback() const {
  if (isV4()) return (ntohl(v4_.s_addr) >> 24) == 127;
  if (isV6()) return IN6_IS_ADDR_LOOPBACK(&v6_);
  return false;
}

std::string IpAddr::toString() const {
  char buf[INET6_ADDRSTRLEN] = {0};
  if (isV4()) inet_ntop(AF_INET, &v4_, buf, sizeof(buf));
  else if (isV6()) inet_ntop(AF_INET6, &v6_, buf, sizeof(buf));
  else return "<unset>";
  return buf;
}

struct weft_ip IpAddr::toAbi() const {
  struct weft_ip out{};
  if (isV4()) {
    out.family = WEFT_AF_INET;
    out.ip[0] = v4_.s_addr;
  } else if (isV6()) {
    out.family = WEFT_AF_INET6;
    memcpy(out.ip, &v6_, 16);
  }
  return out;
}

IpAddr IpAddr::fromAbi(const struct weft_ip& ip) {
  IpAddr a;
  if (ip.family == WEFT_AF_INET) {
    a.family_ = AF_INET;
    a.v4_.s_addr = ip.ip[0];
  } else if (ip.family == WEFT_AF_INET6) {
    a.family_ = AF_INET6;
    memcpy(&a.v6_, ip.ip, 16);
  }
  return a;
}

bool IpAddr::operator==(const IpAddr& o) const {
  if (family_ != o.family_) return false;
  if (isV4()) return v4_.s_addr == o.v4_.s_addr;
  if (isV6()) return memcmp(&v6_, &o.v6_, 16) == 0;
  return true;
}

bool IpAddr::operator<(const IpAddr& o) const {
  if (family_ != o.family_) return family_ < o.family_;
  if (isV4()) return ntohl(v4_.s_addr) < ntohl(o.v4_.s_addr);
  if (isV6()) return memcmp(&v6_, &o.v6_, 16) < 0;
  return false;
}

SocketAddress::SocketAddress(const IpAddr& ip, uint16_t port) : ip_(ip), port_(port) {}

std::optional<SocketAddress> SocketAddress::fromSockaddr(const sockaddr* sa, socklen_t len) {
  if (sa->sa_family == AF_INET && len >= sizeof(sockaddr_in)) {
    auto* in = reinterpret_cast<const sockaddr_in*>(sa);
    return SocketAddress(IpAddr::fromV4(in->sin_addr), ntohs(in->sin_port));
  }
  if (sa->sa_family == AF_INET6 && len >= sizeof(sockaddr_in6)) {
    auto* in6 = reinterpret_cast<const sockaddr_in6*>(sa);
    return SocketAddress(IpAddr::fromV6(in6->sin6_addr), ntohs(in6->sin6_port));
  }
  return std::nullopt;
}

std::optional<SocketAddress> SocketAddress::parse(std::string_view text) {
  std::string_view host;
  std::string_view port;
  if (!text.empty() && text.front() == '[') {
    auto close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':')
      return std::nullopt;
    host = text.substr(1, close - 1);
    port = text.substr(close + 2);
  } else {
    auto colon = text.rfind(':');
    if (colon == std::string_view::npos) return std::nullopt;
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
    if (host.find(':') != std::string_view::npos) return std::nullopt;
  }
  if (port.empty() || port.size() > 5) return std::nullopt;
  uint32_t p = 0;
  for (char c : port) {
    if (c < '0' || c > '9') return std::nullopt;
    p = p * 10 + (c - '0');
  }
  if (p > 65535) return std::nullopt;
  auto ip = IpAddr::parse(host);
  if (!ip) return std::nullopt;
  return SocketAddress(*ip, static_cast<uint16_t>(p));
}

std::string SocketAddress::toString() const {
  if (ip_.isV6()) return "[" + ip_.toString() + "]:" + std::to_string(port_);
  return ip_.toString() + ":" + std::to_string(port_);
}

socklen_t SocketAddress::toSockaddr(sockaddr_storage* out) const {
  memset(out, 0, sizeof(*out));
  if (ip_.isV4()) {
    auto* in = reinterpret_cast<sockaddr_in*>(out);
    in->sin_family = AF_INET;
    in->sin_port = htons(port_);
    in->sin_addr = ip_.v4addr();
    return sizeof(sockaddr_in);
  }
  auto* in6 = reinterpret_cast<sockaddr_in6*>(out);
  in6->sin6_family = AF_INET6;
  in6->sin6_port = htons(port_);
  in6->sin6_addr = ip_.v6addr();
  return sizeof(sockaddr_in6);
}

struct weft_sockaddr SocketAddress::toAbi() const {
  struct weft_ip ip = ip_.toAbi();
  struct weft_sockaddr out{};
  memcpy(out.ip, ip.ip, sizeof(out.ip));
  out.family = ip.family;
  out.port = htons(port_);
  return out;
}

SocketAddress SocketAddress::fromAbi(const struct weft_sockaddr& a) {
  struct weft_ip ip{};
  memcpy(ip.ip, a.ip, sizeof(ip.ip));
  ip.family = a.family;
  return SocketAddress(IpAddr::fromAbi(ip), ntohs(a.port));
}

std::optional<SocketAddress> localAddress(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return std::nullopt;
  return SocketAddress::fromSockaddr(reinterpret_cast<sockaddr*>(&ss), len);
}

std::optional<SocketAddress> peerAddress(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return std::nullopt;
  return SocketAddress::fromSockaddr(reinterpret_cast<sockaddr*>(&ss), len);
}

}  // namespace weft
