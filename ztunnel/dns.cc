// The DNS proxy: the cluster-name decision, the BPF lookup of the resolver a pod asked for, and
// the per-pod UDP/TCP server that answers or forwards.
#include "ztunnel/dns.h"

#include <bpf/bpf.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <optional>

#include "bpf/abi/maps.h"
#include "bpf/abi/ports.h"
#include "common/netns.h"
#include "ztunnel/sockets.h"

namespace weft::ztunnel {

// ---------------------------------------------------------------------------------------------
// Decide

namespace {

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::vector<std::string> splitDomain(const std::string& domain) {
  std::vector<std::string> out;
  size_t start = 0;
  std::string d = lower(domain);
  while (start <= d.size()) {
    size_t dot = d.find('.', start);
    if (dot == std::string::npos) dot = d.size();
    if (dot > start) out.push_back(d.substr(start, dot - start));
    start = dot + 1;
  }
  return out;
}

bool namespaceHasServices(const ClusterState& state, const std::string& ns) {
  std::string prefix = ns + "/";
  auto it = state.services().lower_bound(prefix);
  return it != state.services().end() && it->first.compare(0, prefix.size(), prefix) == 0;
}

}  // namespace

DnsDecision resolveLocal(const dns::Query& q, const ClusterState& state,
                         const std::string& client_namespace, const std::string& cluster_domain) {
  DnsDecision d;
  if (q.qclass != dns::kClassIN || q.opcode() != 0) return d;
  std::vector<std::string> name;
  for (const std::string& l : q.labels) name.push_back(lower(l));
  const std::vector<std::string> domain = splitDomain(cluster_domain);

  auto service = [&](const std::string& ns, const std::string& svc) {
    auto it = state.services().find(ns + "/" + svc);
    if (it == state.services().end()) return false;
    const ServiceInfo& s = *it->second;
    d.kind = DnsDecision::Kind::kAnswer;
    d.service = s.key();
    int family = q.qtype == dns::kTypeA ? AF_INET : q.qtype == dns::kTypeAAAA ? AF_INET6 : 0;
    if (family == 0) return true;
    for (const IpAddr& vip : s.vips)
      if (vip.family() == family) d.ips.push_back(vip);
    if (s.vips.empty()) {  // headless: the endpoints themselves
      for (const auto& ep : s.endpoints)
        if (ep.ip.family() == family && std::find(d.ips.begin(), d.ips.end(), ep.ip) == d.ips.end())
          d.ips.push_back(ep.ip);
    }
    return true;
  };

  bool under_domain = !domain.empty() && name.size() > domain.size() &&
                      std::equal(domain.begin(), domain.end(), name.end() - domain.size());
  if (under_domain) {
    std::vector<std::string> rest(name.begin(), name.end() - domain.size());
    if (rest.back() != "svc") return d;  // pod.<domain> and the like: the cluster's DNS
    rest.pop_back();
    if (rest.empty()) {
      d.kind = DnsDecision::Kind::kAnswer;  // svc.<domain> exists, holds no records
    } else if (rest.size() == 1) {
      d.kind = namespaceHasServices(state, rest[0]) ? DnsDecision::Kind::kAnswer
                                                    : DnsDecision::Kind::kNxDomain;
    } else if (rest.size() != 2 || !service(rest[1], rest[0])) {
      d = DnsDecision{};
      d.kind = DnsDecision::Kind::kNxDomain;
    }
    return d;
  }
  // Short forms that reach us unexpanded (a resolver without the cluster's search list).
  if (name.size() == 1 && !client_namespace.empty()) {
    service(client_namespace, name[0]);
  } else if (name.size() == 2) {
    service(name[1], name[0]);
  } else if (name.size() == 3 && name[2] == "svc") {
    service(name[1], name[0]);
  }
  return d;
}

// ---------------------------------------------------------------------------------------------
// Where the pod's query was going

Result<uint64_t> udpSocketCookie(int diag_fd, const SocketAddress& app,
                                 const SocketAddress& proxy) {
  if (diag_fd < 0) return Status::error("no sock_diag socket in the pod's netns");
  if (app.family() != proxy.family()) return Status::error("address families differ");
  static uint32_t seq = 0;
  struct {
    nlmsghdr nlh;
    inet_diag_req_v2 req;
  } msg{};
  msg.nlh.nlmsg_len = sizeof(msg);
  msg.nlh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
  msg.nlh.nlmsg_flags = NLM_F_REQUEST;
  msg.nlh.nlmsg_seq = ++seq;
  msg.req.sdiag_family = static_cast<uint8_t>(app.family());
  msg.req.sdiag_protocol = IPPROTO_UDP;
  msg.req.idiag_states = ~0u;
  // The kernel looks up the socket that would receive a datagram from id.src:sport sent to
  // id.dst:dport (udp_dump_one): the proxy is the sender, the app socket the receiver.
  if (app.family() == AF_INET) {
    msg.req.id.idiag_src[0] = proxy.ip().v4addr().s_addr;
    msg.req.id.idiag_dst[0] = app.ip().v4addr().s_addr;
  } else {
    memcpy(msg.req.id.idiag_src, &proxy.ip().v6addr(), 16);
    memcpy(msg.req.id.idiag_dst, &app.ip().v6addr(), 16);
  }
  msg.req.id.idiag_sport = htons(proxy.port());
  msg.req.id.idiag_dport = htons(app.port());
  msg.req.id.idiag_cookie[0] = INET_DIAG_NOCOOKIE;
  msg.req.id.idiag_cookie[1] = INET_DIAG_NOCOOKIE;
  sockaddr_nl kernel{};
  kernel.nl_family = AF_NETLINK;
  if (sendto(diag_fd, &msg, sizeof(msg), 0, reinterpret_cast<sockaddr*>(&kernel), sizeof(kernel)) <
      0)
    return Status::errorf("sock_diag send: {}", errnoText(errno));
  // The kernel answers within sendto(); earlier answers (of a failed exchange) are skipped.
  alignas(nlmsghdr) char buf[4096];
  for (int i = 0; i < 8; ++i) {
    ssize_t n = recv(diag_fd, buf, sizeof(buf), MSG_DONTWAIT);
    if (n < 0) return Status::errorf("sock_diag recv: {}", errnoText(errno));
    auto* nlh = reinterpret_cast<nlmsghdr*>(buf);
    if (!NLMSG_OK(nlh, static_cast<size_t>(n))) return Status::error("sock_diag: short answer");
    if (nlh->nlmsg_seq != msg.nlh.nlmsg_seq) continue;
    if (nlh->nlmsg_type == NLMSG_ERROR) {
      auto* e = static_cast<nlmsgerr*>(NLMSG_DATA(nlh));
      if (nlh->nlmsg_len < NLMSG_LENGTH(sizeof(*e))) return Status::error("sock_diag: short error");
      return Status::errorf("no UDP socket at {} sending to {}: {}", app.toString(),
                            proxy.toString(), errnoText(-e->error));
    }
    if (nlh->nlmsg_type != SOCK_DIAG_BY_FAMILY ||
        nlh->nlmsg_len < NLMSG_LENGTH(sizeof(inet_diag_msg)))
      return Status::errorf("sock_diag: unexpected answer type {}", nlh->nlmsg_type);
    auto* d = static_cast<inet_diag_msg*>(NLMSG_DATA(nlh));
    return static_cast<uint64_t>(d->id.idiag_cookie[0]) |
           (static_cast<uint64_t>(d->id.idiag_cookie[1]) << 32);
  }
  return Status::error("sock_diag: no answer to this request");
}

namespace {

struct ResolverMaps {
  UniqueFd dns_dst;
  UniqueFd orig_dst;
};

}  // namespace

Result<DnsResolverLookup> openBpfResolverLookup(const std::string& pin_dir) {
  auto maps = std::make_shared<ResolverMaps>();
  for (auto [name, fd] : {std::pair{WEFT_MAP_DNS_DST, &maps->dns_dst},
                          std::pair{WEFT_MAP_ORIG_DST, &maps->orig_dst}}) {
    std::string path = pin_dir + "/maps/" + name;
    int f = bpf_obj_get(path.c_str());
    if (f < 0) return Status::errorf("open pinned map {}: {}", path, errnoText(errno));
    fd->reset(f);
  }
  return DnsResolverLookup([maps](const DnsQueryOrigin& o) -> Result<SocketAddress> {
    struct weft_sockaddr v {};
    if (o.tcp) {
      struct weft_orig_dst_key key {};
      key.netns_cookie = o.netns_cookie;
      key.client = o.client.toAbi();
      if (bpf_map_lookup_elem(maps->orig_dst.get(), &key, &v) != 0)
        return Status::errorf("{} {}: {}", WEFT_MAP_ORIG_DST, o.client.toString(),
                              errnoText(errno));
    } else {
      auto cookie = udpSocketCookie(o.diag_fd, o.client, o.local);
      if (!cookie) return cookie.status();
      struct weft_dns_key key {};
      key.socket_cookie = *cookie;
      key.netns_cookie = o.netns_cookie;
      if (bpf_map_lookup_elem(maps->dns_dst.get(), &key, &v) != 0)
        return Status::errorf("{} socket {}: {}", WEFT_MAP_DNS_DST, *cookie, errnoText(errno));
    }
    SocketAddress a = SocketAddress::fromAbi(v);
    if (a.family() == 0 || a.port() == 0) return Status::error("resolver address unset");
    return a;
  });
}

// ---------------------------------------------------------------------------------------------
// Do

struct PodDnsServer::UdpSocket {
  PodDnsServer* server = nullptr;
  SocketAddress addr;
  UvHandle<uv_udp_t> handle;
};

struct PodDnsServer::UdpForward {
  PodDnsServer* server = nullptr;
  UdpSocket* sock = nullptr;  // where the query came in (and the answer goes out)
  SocketAddress client;
  dns::Query query;
  UvHandle<uv_udp_t> handle;
  UvHandle<uv_timer_t> timer;
};

struct PodDnsServer::TcpListener {
  PodDnsServer* server = nullptr;
  SocketAddress addr;
  UvHandle<uv_tcp_t> handle;
};

// One TCP client: length-prefixed messages handled one at a time (a forwarded one holds the
// next until its answer came back).
struct PodDnsServer::TcpSession {
  PodDnsServer* server = nullptr;
  SocketAddress peer, local;
  UvHandle<uv_tcp_t> client;
  UvHandle<uv_timer_t> timer;
  std::unique_ptr<UvHandle<uv_tcp_t>> upstream;  // null: no upstream connection
  bool upstream_connected = false;
  bool client_eof = false;
  std::vector<uint8_t> in;  // client bytes not handled yet
  std::vector<uint8_t> upstream_in;
  std::vector<uint8_t> upstream_pending;  // the framed query, until the connect finished
  std::optional<dns::Query> waiting;      // forwarded, answer not back yet

  void write(uv_stream_t* to, const std::vector<uint8_t>& framed);
  void writeAnswer(const std::vector<uint8_t>& msg);
  void process();
  void forward(const dns::Query& q, std::span<const uint8_t> msg);
  // The upstream is gone: the waiting query gets SERVFAIL; with `resume` (from a callback) the
  // next queries are handled, which may end the session.
  void upstreamFailed(const std::string& why, bool resume);
  void onUpstreamData(std::span<const uint8_t> data);
  void armTimer();
  void end() { server->endSession(this); }  // destroys *this
};

namespace {

constexpr size_t kTcpMaxBuffered = 2 * (2 + dns::kMaxMessage);

struct WriteReq {
  uv_write_t req{};
  std::vector<uint8_t> data;
};

std::vector<uint8_t> framed(std::span<const uint8_t> msg) {
  std::vector<uint8_t> out;
  out.reserve(2 + msg.size());
  out.push_back(static_cast<uint8_t>(msg.size() >> 8));
  out.push_back(static_cast<uint8_t>(msg.size() & 0xff));
  out.insert(out.end(), msg.begin(), msg.end());
  return out;
}

Status setMark(int fd) {
  int mark = WEFT_ZTUNNEL_MARK;
  if (setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) != 0)
    return Status::errorf("SO_MARK: {}", errnoText(errno));
  return Status::ok();
}

// The receive buffer of every DNS socket (client and upstream, UDP and TCP) on this thread's
// loop: libuv asks for it in the alloc callback and the read callback consumes or copies what
// it got before returning, so two reads never hold it at once. One per pod cost 64 KiB of
// touched memory each (6.4 MiB with 100 pods); this one is not even touched until a query
// comes (new[] without initialisation).
uv_buf_t sharedRecvBuffer() {
  constexpr size_t kSize = dns::kMaxMessage + 1;  // one more: a datagram over 64 KiB is partial
  thread_local std::unique_ptr<char[]> buf(new char[kSize]);
  return uv_buf_init(buf.get(), static_cast<unsigned>(kSize));
}

std::optional<SocketAddress> addressOf(const sockaddr* sa) {
  if (sa == nullptr) return std::nullopt;
  socklen_t len = sa->sa_family == AF_INET ? sizeof(sockaddr_in) : sizeof(sockaddr_in6);
  return SocketAddress::fromSockaddr(sa, len);
}

}  // namespace

PodDnsServer::PodDnsServer(Proxy& proxy, LocalPodPtr pod, DnsOptions options,
                           DnsResolverLookup lookup)
    : proxy_(proxy), pod_(std::move(pod)), options_(options), lookup_(std::move(lookup)) {}

PodDnsServer::~PodDnsServer() = default;

std::string PodDnsServer::who() const {
  return "dns " + pod_->info->namespace_ + "/" + pod_->info->name;
}

Result<std::unique_ptr<PodDnsServer>> PodDnsServer::create(Proxy& proxy, LocalPodPtr pod,
                                                           DnsOptions options,
                                                           DnsResolverLookup lookup) {
  std::unique_ptr<PodDnsServer> s(new PodDnsServer(proxy, pod, options, std::move(lookup)));
  auto cookie = netnsCookie(pod->netns.get());
  if (!cookie) return cookie.status().context("dns proxy");
  s->netns_cookie_ = *cookie;
  auto diag = socketIn(pod->netns.get(), AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
  if (diag) {
    s->diag_fd_ = std::move(diag.value());
  } else {
    spdlog::warn("{}: no sock_diag socket, UDP queries cannot be forwarded: {}", s->who(),
                 diag.status().message());
  }
  IpAddr lo4 = *IpAddr::parse("127.0.0.1"), lo6 = *IpAddr::parse("::1");
  Status st = s->addUdp(SocketAddress(lo4, options.port));
  if (st) st = s->addTcp(SocketAddress(lo4, options.port));
  if (!st) return st;
  Status st6 = s->addUdp(SocketAddress(lo6, options.port));
  if (st6) st6 = s->addTcp(SocketAddress(lo6, options.port));
  if (!st6) {
    if (pod->info->ipOfFamily(AF_INET6) != nullptr) return st6;
    spdlog::info("{}: no IPv6 DNS listeners: {}", s->who(), st6.message());
  }
  return s;
}

std::vector<std::string> PodDnsServer::describe() const {
  std::vector<std::string> out;
  for (const auto& u : udp_) out.push_back("dns-udp " + u->addr.toString());
  for (const auto& t : tcp_) out.push_back("dns-tcp " + t->addr.toString());
  return out;
}

Status PodDnsServer::addUdp(const SocketAddress& addr) {
  std::string what = "dns udp " + addr.toString();
  auto fd = socketIn(pod_->netns.get(), addr.family(), SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
                     IPPROTO_UDP);
  if (!fd) return fd.status().context(what);
  int one = 1;
  if (auto st = setMark(fd->get()); !st) return st.context(what);
  if (setsockopt(fd->get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
      setsockopt(fd->get(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0)
    return Status::errorf("{}: SO_REUSEADDR/PORT: {}", what, errnoText(errno));
  if (addr.family() == AF_INET6 &&
      setsockopt(fd->get(), IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) != 0)
    return Status::errorf("{}: IPV6_V6ONLY: {}", what, errnoText(errno));
  sockaddr_storage ss;
  socklen_t len = addr.toSockaddr(&ss);
  if (bind(fd->get(), reinterpret_cast<sockaddr*>(&ss), len) != 0)
    return Status::errorf("{}: bind: {}", what, errnoText(errno));
  auto u = std::make_unique<UdpSocket>();
  u->server = this;
  u->addr = addr;
  int rc = u->handle.init(uv_udp_init(proxy_.loop(), u->handle.get()));
  if (rc == 0) rc = uv_udp_open(u->handle.get(), fd->get());
  if (rc != 0) return Status::errorf("{}: {}", what, uv_strerror(rc));
  fd->release();  // the handle owns it now
  u->handle.get()->data = u.get();
  rc = uv_udp_recv_start(
      u->handle.get(),
      [](uv_handle_t*, size_t, uv_buf_t* buf) { *buf = sharedRecvBuffer(); },
      [](uv_udp_t* h, ssize_t nread, const uv_buf_t* buf, const sockaddr* addr, unsigned flags) {
        auto* self = static_cast<UdpSocket*>(h->data);
        if (nread < 0) {
          spdlog::debug("{}: udp receive: {}", self->server->who(), uv_strerror(nread));
          return;
        }
        auto client = addressOf(addr);
        if (!client) return;  // nothing read
        PodDnsServer* server = self->server;
        if (flags & UV_UDP_PARTIAL) {  // over 64 KiB: cannot be DNS
          server->proxy_.stats().dns_queries_total++;
          server->proxy_.stats().dns_malformed_total++;
          return;
        }
        server->onDatagram(*self,
                           std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(buf->base),
                                                    static_cast<size_t>(nread)),
                           *client);
      });
  if (rc != 0) return Status::errorf("{}: recv: {}", what, uv_strerror(rc));
  udp_.push_back(std::move(u));
  return Status::ok();
}

Status PodDnsServer::addTcp(const SocketAddress& addr) {
  auto fd = listenIn(pod_->netns.get(), addr, 128);
  if (!fd) return fd.status().context("dns tcp");
  auto l = std::make_unique<TcpListener>();
  l->server = this;
  l->addr = addr;
  std::string what = "dns tcp " + addr.toString();
  int rc = l->handle.init(uv_tcp_init(proxy_.loop(), l->handle.get()));
  if (rc == 0) rc = uv_tcp_open(l->handle.get(), fd->get());
  if (rc != 0) return Status::errorf("{}: {}", what, uv_strerror(rc));
  fd->release();
  l->handle.get()->data = l.get();
  rc = uv_listen(l->handle.stream(), 128, [](uv_stream_t* s, int status) {
    auto* self = static_cast<TcpListener*>(s->data);
    if (status != 0) {
      self->server->proxy_.stats().accept_failures_total++;
      return;
    }
    self->server->acceptTcp(*self);
  });
  if (rc != 0) return Status::errorf("{}: listen: {}", what, uv_strerror(rc));
  tcp_.push_back(std::move(l));
  return Status::ok();
}

bool PodDnsServer::answerLocally(const dns::Query& q, size_t max_size, std::vector<uint8_t>* out) {
  DnsDecision d = resolveLocal(q, *proxy_.state(), pod_->info->namespace_, proxy_.clusterDomain());
  if (d.kind == DnsDecision::Kind::kForward) return false;
  bool truncated = false;
  *out =
      dns::buildResponse(q, d.kind == DnsDecision::Kind::kNxDomain ? dns::kNxDomain : dns::kNoError,
                         d.ips, options_.ttl, /*authoritative=*/true, max_size, &truncated);
  ZtunnelStats& st = proxy_.stats();
  st.dns_answered_locally_total++;
  if (truncated) st.dns_truncated_total++;
  spdlog::debug("{}: {} type {} -> {} ({} addresses{})", who(), q.name(), q.qtype,
                d.kind == DnsDecision::Kind::kNxDomain ? "NXDOMAIN" : d.service, d.ips.size(),
                truncated ? ", truncated" : "");
  return true;
}

Result<SocketAddress> PodDnsServer::resolverFor(bool tcp, const SocketAddress& client,
                                                const SocketAddress& local) {
  if (!lookup_) return Status::error("no resolver lookup (no BPF pin dir)");
  DnsQueryOrigin o;
  o.netns_cookie = netns_cookie_;
  o.diag_fd = diag_fd_.get();
  o.tcp = tcp;
  o.client = client;
  o.local = local;
  auto r = lookup_(o);
  if (!r) return r.status();
  // Never back into a DNS proxy: BPF does not capture loopback destinations, so this is a bug.
  if (r->ip().isLoopback() && r->port() == options_.port)
    return Status::errorf("resolver {} is the proxy itself", r->toString());
  return r;
}

void PodDnsServer::sendUdp(UdpSocket& sock, const SocketAddress& to,
                           const std::vector<uint8_t>& data) {
  sockaddr_storage ss;
  to.toSockaddr(&ss);
  uv_buf_t b = uv_buf_init(reinterpret_cast<char*>(const_cast<uint8_t*>(data.data())),
                           static_cast<unsigned>(data.size()));
  int rc = uv_udp_try_send(sock.handle.get(), &b, 1, reinterpret_cast<sockaddr*>(&ss));
  if (rc < 0) spdlog::debug("{}: answer to {} dropped: {}", who(), to.toString(), uv_strerror(rc));
}

void PodDnsServer::onDatagram(UdpSocket& sock, std::span<const uint8_t> data,
                              const SocketAddress& client) {
  ZtunnelStats& st = proxy_.stats();
  st.dns_queries_total++;
  auto q = dns::parseQuery(data);
  if (!q) {
    st.dns_malformed_total++;
    spdlog::debug("{}: malformed query from {} dropped: {}", who(), client.toString(),
                  q.status().message());
    return;
  }
  std::vector<uint8_t> out;
  if (answerLocally(*q, q->maxUdpAnswer(), &out)) {
    sendUdp(sock, client, out);
    return;
  }
  forwardUdp(sock, *q, data, client);
}

void PodDnsServer::forwardUdp(UdpSocket& sock, const dns::Query& q, std::span<const uint8_t> data,
                              const SocketAddress& client) {
  ZtunnelStats& st = proxy_.stats();
  auto servfail = [&] {
    sendUdp(sock, client,
            dns::buildResponse(q, dns::kServFail, {}, 0, false, q.maxUdpAnswer(), nullptr));
  };
  if (forwards_.size() >= options_.max_in_flight) {
    st.dns_forward_failures_total++;
    spdlog::debug("{}: {} forwards in flight, {} dropped", who(), forwards_.size(), q.name());
    return;
  }
  auto resolver = resolverFor(false, client, sock.addr);
  if (!resolver) {
    st.dns_forward_failures_total++;
    spdlog::debug("{}: {} from {}: {}", who(), q.name(), client.toString(),
                  resolver.status().message());
    servfail();
    return;
  }
  auto fail = [&](const std::string& why) {
    st.dns_forward_failures_total++;
    spdlog::debug("{}: forward {} to {}: {}", who(), q.name(), resolver->toString(), why);
    servfail();
  };
  auto fd = socketIn(pod_->netns.get(), resolver->family(),
                     SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_UDP);
  if (!fd) return fail(fd.status().message());
  if (auto m = setMark(fd->get()); !m) return fail(m.message());
  sockaddr_storage ss;
  socklen_t len = resolver->toSockaddr(&ss);
  if (connect(fd->get(), reinterpret_cast<sockaddr*>(&ss), len) != 0)
    return fail(std::string("connect: ") + errnoText(errno));
  if (send(fd->get(), data.data(), data.size(), 0) != static_cast<ssize_t>(data.size()))
    return fail(std::string("send: ") + errnoText(errno));

  auto f = std::make_unique<UdpForward>();
  f->server = this;
  f->sock = &sock;
  f->client = client;
  f->query = q;
  int rc = f->handle.init(uv_udp_init(proxy_.loop(), f->handle.get()));
  if (rc == 0) rc = uv_udp_open(f->handle.get(), fd->get());
  if (rc != 0) return fail(uv_strerror(rc));
  fd->release();
  f->handle.get()->data = f.get();
  rc = f->timer.init(uv_timer_init(proxy_.loop(), f->timer.get()));
  if (rc != 0) return fail(uv_strerror(rc));
  f->timer.get()->data = f.get();
  rc = uv_udp_recv_start(
      f->handle.get(),
      [](uv_handle_t*, size_t, uv_buf_t* buf) { *buf = sharedRecvBuffer(); },
      [](uv_udp_t* h, ssize_t nread, const uv_buf_t* buf, const sockaddr* addr, unsigned flags) {
        auto* self = static_cast<UdpForward*>(h->data);
        PodDnsServer* server = self->server;
        ZtunnelStats& stats = server->proxy_.stats();
        if (nread < 0) {  // e.g. ECONNREFUSED: the resolver's port is closed
          stats.dns_forward_failures_total++;
          spdlog::debug("{}: {}: upstream: {}", server->who(), self->query.name(),
                        uv_strerror(nread));
          server->sendUdp(*self->sock, self->client,
                          dns::buildResponse(self->query, dns::kServFail, {}, 0, false,
                                             self->query.maxUdpAnswer(), nullptr));
          server->finishForward(self);
          return;
        }
        if (addr == nullptr || (flags & UV_UDP_PARTIAL)) return;
        std::span<const uint8_t> answer(reinterpret_cast<const uint8_t*>(buf->base),
                                        static_cast<size_t>(nread));
        auto hdr = dns::parseResponseHeader(answer);
        if (!hdr || hdr->id != self->query.id) return;  // not the answer: keep waiting
        if (answer.size() > self->query.maxUdpAnswer()) {
          stats.dns_truncated_total++;
          server->sendUdp(*self->sock, self->client, dns::truncateAnswer(self->query, *hdr));
        } else {
          server->sendUdp(*self->sock, self->client,
                          std::vector<uint8_t>(answer.begin(), answer.end()));
        }
        stats.dns_upstream_answers_total++;
        server->finishForward(self);
      });
  if (rc != 0) return fail(uv_strerror(rc));
  rc = uv_timer_start(
      f->timer.get(),
      [](uv_timer_t* t) {
        auto* self = static_cast<UdpForward*>(t->data);
        self->server->proxy_.stats().dns_forward_failures_total++;
        spdlog::debug("{}: {}: no answer from upstream in time", self->server->who(),
                      self->query.name());
        self->server->finishForward(self);
      },
      options_.forward_timeout_ms, 0);
  if (rc != 0) return fail(uv_strerror(rc));
  st.dns_forwarded_total++;
  spdlog::debug("{}: {} type {} forwarded to {}", who(), q.name(), q.qtype, resolver->toString());
  UdpForward* key = f.get();
  forwards_.emplace(key, std::move(f));
}

void PodDnsServer::finishForward(UdpForward* f) {
  forwards_.erase(f);
}

// --- TCP ---

void PodDnsServer::acceptTcp(TcpListener& l) {
  auto s = std::make_unique<TcpSession>();
  s->server = this;
  s->local = l.addr;
  int rc = s->client.init(uv_tcp_init(proxy_.loop(), s->client.get()));
  if (rc == 0) rc = uv_accept(l.handle.stream(), s->client.stream());
  if (rc != 0) {
    proxy_.stats().accept_failures_total++;
    return;
  }
  proxy_.stats().dns_tcp_connections_total++;
  if (sessions_.size() >= options_.max_tcp_sessions) {
    spdlog::debug("{}: {} TCP sessions, one more refused", who(), sessions_.size());
    return;  // closed by the session's destructor
  }
  uv_os_fd_t fd;
  if (uv_fileno(s->client.handle(), &fd) == 0) {
    auto peer = peerAddress(fd);
    if (peer) s->peer = *peer;
  }
  s->client.get()->data = s.get();
  if (s->timer.init(uv_timer_init(proxy_.loop(), s->timer.get())) != 0) return;
  s->timer.get()->data = s.get();
  rc = uv_read_start(
      s->client.stream(),
      [](uv_handle_t*, size_t, uv_buf_t* buf) { *buf = sharedRecvBuffer(); },
      [](uv_stream_t* st, ssize_t nread, const uv_buf_t* buf) {
        auto* self = static_cast<TcpSession*>(st->data);
        if (nread == UV_EOF) {
          self->client_eof = true;
          if (!self->waiting) self->end();
          return;
        }
        if (nread < 0) return self->end();
        if (self->in.size() + static_cast<size_t>(nread) > kTcpMaxBuffered) {
          self->server->proxy_.stats().dns_malformed_total++;
          return self->end();
        }
        self->in.insert(self->in.end(), buf->base, buf->base + nread);
        self->process();
      });
  if (rc != 0) return;
  TcpSession* key = s.get();
  sessions_.emplace(key, std::move(s));
  key->armTimer();
}

void PodDnsServer::endSession(TcpSession* s) {
  sessions_.erase(s);
}

void PodDnsServer::TcpSession::write(uv_stream_t* to, const std::vector<uint8_t>& data) {
  auto* w = new WriteReq();
  w->data = data;
  uv_buf_t b =
      uv_buf_init(reinterpret_cast<char*>(w->data.data()), static_cast<unsigned>(w->data.size()));
  // The request owns its bytes and frees itself, also when the handle closes first (ECANCELED).
  int rc = uv_write(&w->req, to, &b, 1,
                    [](uv_write_t* req, int) { delete reinterpret_cast<WriteReq*>(req); });
  if (rc != 0) delete w;
}

void PodDnsServer::TcpSession::writeAnswer(const std::vector<uint8_t>& msg) {
  write(client.stream(), framed(msg));
}

// Handles complete client messages until one is forwarded (its answer resumes this).
void PodDnsServer::TcpSession::process() {
  ZtunnelStats& st = server->proxy_.stats();
  while (!waiting && in.size() >= 2) {
    size_t len = (static_cast<size_t>(in[0]) << 8) | in[1];
    if (in.size() < 2 + len) break;
    std::vector<uint8_t> msg(in.begin() + 2, in.begin() + 2 + static_cast<long>(len));
    in.erase(in.begin(), in.begin() + 2 + static_cast<long>(len));
    st.dns_queries_total++;
    auto q = dns::parseQuery(msg);
    if (!q) {
      st.dns_malformed_total++;
      spdlog::debug("{}: malformed TCP query from {}: {}", server->who(), peer.toString(),
                    q.status().message());
      return end();
    }
    std::vector<uint8_t> out;
    if (server->answerLocally(*q, dns::kMaxMessage, &out)) {
      writeAnswer(out);
      continue;
    }
    forward(*q, msg);
  }
  if (client_eof && !waiting) return end();
  armTimer();
}

void PodDnsServer::TcpSession::armTimer() {
  uint64_t ms = waiting ? server->options_.forward_timeout_ms : server->options_.tcp_idle_ms;
  uv_timer_start(
      timer.get(),
      [](uv_timer_t* t) {
        auto* self = static_cast<TcpSession*>(t->data);
        if (self->waiting) self->server->proxy_.stats().dns_forward_failures_total++;
        self->end();
      },
      ms, 0);
}

void PodDnsServer::TcpSession::forward(const dns::Query& q, std::span<const uint8_t> msg) {
  ZtunnelStats& st = server->proxy_.stats();
  auto resolver = server->resolverFor(true, peer, local);
  if (!resolver) {
    st.dns_forward_failures_total++;
    spdlog::debug("{}: TCP {} from {}: {}", server->who(), q.name(), peer.toString(),
                  resolver.status().message());
    writeAnswer(dns::buildResponse(q, dns::kServFail, {}, 0, false, dns::kMaxMessage, nullptr));
    return;
  }
  waiting = q;
  st.dns_forwarded_total++;
  spdlog::debug("{}: TCP {} type {} forwarded to {}", server->who(), q.name(), q.qtype,
                resolver->toString());
  if (upstream_connected) {
    write(upstream->stream(), framed(msg));
    return;
  }
  upstream_pending = framed(msg);
  if (upstream) return;  // still connecting: sent when it is
  auto fd = markedTcpSocket(server->pod_->netns.get(), resolver->family());
  if (!fd) return upstreamFailed(fd.status().message(), false);
  upstream = std::make_unique<UvHandle<uv_tcp_t>>();
  int rc = upstream->init(uv_tcp_init(server->proxy_.loop(), upstream->get()));
  if (rc == 0) rc = uv_tcp_open(upstream->get(), fd->get());
  if (rc != 0) return upstreamFailed(uv_strerror(rc), false);
  fd->release();
  upstream->get()->data = this;
  sockaddr_storage ss;
  resolver->toSockaddr(&ss);
  // Heap-allocated: when the session goes first, libuv still calls back with ECANCELED.
  auto* req = new uv_connect_t();
  req->data = this;
  rc = uv_tcp_connect(
      req, upstream->get(), reinterpret_cast<sockaddr*>(&ss), [](uv_connect_t* r, int status) {
        std::unique_ptr<uv_connect_t> own(r);
        if (status == UV_ECANCELED) return;  // the upstream (or the whole session) is gone
        auto* self = static_cast<TcpSession*>(r->data);
        if (status != 0) return self->upstreamFailed(uv_strerror(status), true);
        self->upstream_connected = true;
        self->write(self->upstream->stream(), self->upstream_pending);
        self->upstream_pending.clear();
        int rc2 = uv_read_start(
            self->upstream->stream(),
            [](uv_handle_t*, size_t, uv_buf_t* buf) { *buf = sharedRecvBuffer(); },
            [](uv_stream_t* st, ssize_t nread, const uv_buf_t* buf) {
              auto* s = static_cast<TcpSession*>(st->data);
              if (nread < 0) return s->upstreamFailed(uv_strerror(static_cast<int>(nread)), true);
              s->onUpstreamData(std::span<const uint8_t>(
                  reinterpret_cast<const uint8_t*>(buf->base), static_cast<size_t>(nread)));
            });
        if (rc2 != 0) self->upstreamFailed(uv_strerror(rc2), true);
      });
  if (rc != 0) {
    delete req;
    return upstreamFailed(uv_strerror(rc), false);
  }
}

void PodDnsServer::TcpSession::upstreamFailed(const std::string& why, bool resume) {
  spdlog::debug("{}: TCP upstream: {}", server->who(), why);
  upstream.reset();  // closes it; a pending connect is called back with ECANCELED
  upstream_connected = false;
  upstream_in.clear();
  upstream_pending.clear();
  if (waiting) {
    server->proxy_.stats().dns_forward_failures_total++;
    dns::Query q = *waiting;
    waiting.reset();
    writeAnswer(dns::buildResponse(q, dns::kServFail, {}, 0, false, dns::kMaxMessage, nullptr));
  }
  if (resume) process();
}

void PodDnsServer::TcpSession::onUpstreamData(std::span<const uint8_t> data) {
  if (upstream_in.size() + data.size() > kTcpMaxBuffered)
    return upstreamFailed("answer too long", true);
  upstream_in.insert(upstream_in.end(), data.begin(), data.end());
  while (waiting && upstream_in.size() >= 2) {
    size_t len = (static_cast<size_t>(upstream_in[0]) << 8) | upstream_in[1];
    if (upstream_in.size() < 2 + len) return;
    std::vector<uint8_t> answer(upstream_in.begin() + 2,
                                upstream_in.begin() + 2 + static_cast<long>(len));
    upstream_in.erase(upstream_in.begin(), upstream_in.begin() + 2 + static_cast<long>(len));
    auto hdr = dns::parseResponseHeader(answer);
    if (!hdr || hdr->id != waiting->id) continue;  // not the answer to this query
    server->proxy_.stats().dns_upstream_answers_total++;
    writeAnswer(answer);
    waiting.reset();
    process();  // may end the session
    return;
  }
}

}  // namespace weft::ztunnel
