// The ztunnel's DNS proxy: one per enrolled pod, on 127.0.0.1:15053 and [::1]:15053 (UDP and TCP)
// inside the pod's netns, reached by the BPF DNS capture. Answers A/AAAA for the cluster's
// services from the node's state (pure decision: resolveLocal) and forwards everything else to
// the resolver the pod asked for, relaying the answer.
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "common/address.h"
#include "common/fd.h"
#include "common/status.h"
#include "common/uv_handle.h"
#include "ztunnel/cluster_state.h"
#include "ztunnel/dns_message.h"
#include "ztunnel/proxy.h"

namespace weft::ztunnel {

// ---------------------------------------------------------------------------------------------
// Decide: what the proxy does with a query, from the cluster state alone.

struct DnsDecision {
  enum class Kind {
    kForward,   // not a cluster name: send it to the resolver the pod asked
    kAnswer,    // a cluster name: answer with `ips` (empty = the name exists, no such record)
    kNxDomain,  // under <cluster domain>'s svc zone and no such service or namespace
  };
  Kind kind = Kind::kForward;
  std::vector<IpAddr> ips;
  std::string service;  // ns/name that answered, for logs
};

// Names served (case-insensitive, class IN): `<svc>.<ns>.svc.<domain>` → the service's VIPs of
// the query's family (A: IPv4, AAAA: IPv6; a headless service: its endpoints' IPs); any other
// type → no records. `svc.<domain>` and `<ns>.svc.<domain>` of a namespace with services → no
// records; anything else under `svc.<domain>` → NXDOMAIN. Short forms as a resolver without a
// search list sends them: `<svc>` (the client's namespace), `<svc>.<ns>`, `<svc>.<ns>.svc` →
// the service if it exists, else forwarded. Everything else (other names under the domain, e.g.
// `pod.<domain>`, included) is forwarded.
DnsDecision resolveLocal(const dns::Query& q, const ClusterState& state,
                         const std::string& client_namespace, const std::string& cluster_domain);

// ---------------------------------------------------------------------------------------------
// Where a forwarded query goes: the resolver the app asked for before BPF sent it to 15053.

struct DnsQueryOrigin {
  uint64_t netns_cookie = 0;
  int diag_fd = -1;  // NETLINK_SOCK_DIAG socket inside the pod's netns
  bool tcp = false;
  SocketAddress client;  // the app socket's address, as the proxy sees it
  SocketAddress local;   // the proxy's own address the query came to
};
using DnsResolverLookup = std::function<Result<SocketAddress>(const DnsQueryOrigin&)>;

// The kernel lookup: UDP → the app socket's cookie by sock_diag, then weft_dns_dst; TCP →
// weft_orig_dst[{netns cookie, client}] (published by sockops). Maps under <pin_dir>/maps.
Result<DnsResolverLookup> openBpfResolverLookup(const std::string& pin_dir);

// The cookie of the UDP socket at `app` (in the diag socket's netns) that sends to `proxy`.
Result<uint64_t> udpSocketCookie(int diag_fd, const SocketAddress& app, const SocketAddress& proxy);

// ---------------------------------------------------------------------------------------------
// Do: one pod's DNS proxy.

struct DnsOptions {
  uint16_t port = 15053;
  uint32_t ttl = 30;                   // TTL of the proxy's own answers
  uint64_t forward_timeout_ms = 5000;  // an upstream that has not answered by then: dropped
  size_t max_in_flight = 256;          // forwarded UDP queries waiting per pod
  size_t max_tcp_sessions = 64;        // TCP connections per pod
  uint64_t tcp_idle_ms = 10000;
};

class PodDnsServer {
 public:
  // Binds UDP and TCP on 127.0.0.1:<port> and [::1]:<port> in the pod's netns (the IPv6 pair
  // is required only when the pod has an IPv6 address); every socket marked 0x539.
  static Result<std::unique_ptr<PodDnsServer>> create(Proxy& proxy, LocalPodPtr pod,
                                                      DnsOptions options, DnsResolverLookup lookup);
  ~PodDnsServer();
  PodDnsServer(const PodDnsServer&) = delete;
  PodDnsServer& operator=(const PodDnsServer&) = delete;

  std::vector<std::string> describe() const;
  size_t inFlight() const { return forwards_.size(); }
  size_t tcpSessions() const { return sessions_.size(); }

 private:
  struct UdpSocket;
  struct UdpForward;
  struct TcpListener;
  struct TcpSession;

  PodDnsServer(Proxy& proxy, LocalPodPtr pod, DnsOptions options, DnsResolverLookup lookup);
  Status addUdp(const SocketAddress& addr);
  Status addTcp(const SocketAddress& addr);
  void onDatagram(UdpSocket& sock, std::span<const uint8_t> data, const SocketAddress& client);
  void forwardUdp(UdpSocket& sock, const dns::Query& q, std::span<const uint8_t> data,
                  const SocketAddress& client);
  // The proxy's own answer (true, `out` filled, counted), or false: forward it.
  bool answerLocally(const dns::Query& q, size_t max_size, std::vector<uint8_t>* out);
  Result<SocketAddress> resolverFor(bool tcp, const SocketAddress& client,
                                    const SocketAddress& local);
  void sendUdp(UdpSocket& sock, const SocketAddress& to, const std::vector<uint8_t>& data);
  void finishForward(UdpForward* f);
  void acceptTcp(TcpListener& l);
  void endSession(TcpSession* s);
  std::string who() const;

  Proxy& proxy_;
  LocalPodPtr pod_;
  DnsOptions options_;
  DnsResolverLookup lookup_;
  uint64_t netns_cookie_ = 0;
  UniqueFd diag_fd_;
  std::vector<std::unique_ptr<UdpSocket>> udp_;
  std::vector<std::unique_ptr<TcpListener>> tcp_;
  // Declared after the sockets: destroyed (their handles closed) before them.
  std::map<UdpForward*, std::unique_ptr<UdpForward>> forwards_;
  std::map<TcpSession*, std::unique_ptr<TcpSession>> sessions_;
};

}  // namespace weft::ztunnel
