// IP addresses and socket addresses, IPv4 and IPv6, with conversions to the BPF ABI shapes.
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "bpf/abi/addr.h"

namespace weft {

class IpAddr {
 public:
  IpAddr() = default;
  static std::optional<IpAddr> parse(std::string_view text);
  static IpAddr v4(uint32_t host_order);
  static IpAddr fromV6(const in6_addr& a);
  static IpAddr fromV4(const in_addr& a);

  int family() const { return family_; }  // AF_INET / AF_INET6 / 0 (unset)
  bool isV4() const { return family_ == AF_INET; }
  bool isV6() const { return family_ == AF_INET6; }
  bool isLoopback() const;
  const in_addr& v4addr() const { return v4_; }
  const in6_addr& v6addr() const { return v6_; }
  std::string toString() const;
  struct weft_ip toAbi() const;
  static IpAddr fromAbi(const struct weft_ip& ip);

  bool operator==(const IpAddr& o) const;
  bool operator<(const IpAddr& o) const;

 private:
  int family_ = 0;
  in_addr v4_{};
  in6_addr v6_{};
};

class SocketAddress {
 public:
  SocketAddress() = default;
  SocketAddress(const IpAddr& ip, uint16_t port);
  static std::optional<SocketAddress> fromSockaddr(const sockaddr* sa, socklen_t len);
  // "1.2.3.4:80" or "[fd00::1]:80".
  static std::optional<SocketAddress> parse(std::string_view text);

  const IpAddr& ip() const { return ip_; }
  uint16_t port() const { return port_; }
  int family() const { return ip_.family(); }
  std::string toString() const;
  // Fills storage; returns the length to pass to bind/connect.
  socklen_t toSockaddr(sockaddr_storage* out) const;
  struct weft_sockaddr toAbi() const;
  static SocketAddress fromAbi(const struct weft_sockaddr& a);

  bool operator==(const SocketAddress& o) const { return ip_ == o.ip_ && port_ == o.port_; }

 private:
  IpAddr ip_;
  uint16_t port_ = 0;
};

// Local and peer addresses of a connected or listening socket.
std::optional<SocketAddress> localAddress(int fd);
std::optional<SocketAddress> peerAddress(int fd);

}  // namespace weft
