// Local workloads: listeners in pod namespaces and their inbound-steering registration.
#include "ztunnel/workloads.h"

#include <spdlog/spdlog.h>

#include "ztunnel/sockets.h"

namespace weft::ztunnel {

Status PodListeners::add(Proxy& proxy, const LocalPodPtr& pod, const SocketAddress& addr,
                         Kind kind) {
  auto fd = listenIn(pod->netns.get(), addr);
  if (!fd) return fd.status();
  auto l = std::make_unique<Listener>();
  l->proxy = &proxy;
  l->pod = pod;
  l->kind = kind;
  l->addr = addr;
  int rc = l->handle.init(uv_tcp_init(proxy.loop(), l->handle.get()));
  if (rc != 0) return Status::errorf("listener {}: uv_tcp_init: {}", addr.toString(), uv_strerror(rc));
  rc = uv_tcp_open(l->handle.get(), fd->get());
  if (rc != 0) return Status::errorf("listener {}: uv_tcp_open: {}", addr.toString(), uv_strerror(rc));
  l->fd = fd->release();  // owned by the handle from here on
  l->handle.get()->data = l.get();
  // The socket already listens; uv_listen only registers the accept callback.
  rc = uv_listen(l->handle.stream(), 1024, [](uv_stream_t* s, int status) {
    auto* self = static_cast<Listener*>(s->data);
    if (status != 0) {
      self->proxy->stats().accept_failures_total++;
      spdlog::warn("listener {}: {}", self->addr.toString(), uv_strerror(status));
      return;
    }
    switch (self->kind) {
      case Kind::kOutbound: self->proxy->acceptOutbound(s, self->pod); break;
      case Kind::kInbound: self->proxy->acceptInbound(s, self->pod); break;
      case Kind::kHbone: self->proxy->acceptHbone(s, self->pod); break;
    }
  });
  if (rc != 0) return Status::errorf("listener {}: uv_listen: {}", addr.toString(), uv_strerror(rc));
  listeners_.push_back(std::move(l));
  return Status::ok();
}

Result<std::unique_ptr<PodListeners>> PodListeners::create(Proxy& proxy, LocalPodPtr pod,
                                                           ListenerPorts ports,
                                                           DnsResolverLookup dns_lookup) {
  auto out = std::unique_ptr<PodListeners>(new PodListeners());
  IpAddr any4 = *IpAddr::parse("0.0.0.0"), any6 = *IpAddr::parse("::");
  IpAddr lo4 = *IpAddr::parse("127.0.0.1"), lo6 = *IpAddr::parse("::1");
  Status st = out->add(proxy, pod, SocketAddress(lo4, ports.outbound), Kind::kOutbound);
  if (st) st = out->add(proxy, pod, SocketAddress(any4, ports.inbound), Kind::kInbound);
  if (st && ports.hbone != 0)
    st = out->add(proxy, pod, SocketAddress(any4, ports.hbone), Kind::kHbone);
  if (!st) return st;
  bool need_v6 = pod->info->ipOfFamily(AF_INET6) != nullptr;
  Status st6 = out->add(proxy, pod, SocketAddress(lo6, ports.outbound), Kind::kOutbound);
  if (st6) st6 = out->add(proxy, pod, SocketAddress(any6, ports.inbound), Kind::kInbound);
  if (st6 && ports.hbone != 0)
    st6 = out->add(proxy, pod, SocketAddress(any6, ports.hbone), Kind::kHbone);
  if (!st6) {
    if (need_v6) return st6;
    spdlog::info("{}/{}: no IPv6 listeners: {}", pod->info->namespace_, pod->info->name,
                 st6.message());
  }
  if (ports.dns != 0) {
    DnsOptions dns_options;
    dns_options.port = ports.dns;
    auto dns = PodDnsServer::create(proxy, pod, dns_options, std::move(dns_lookup));
    if (!dns) return dns.status();
    out->dns_ = std::move(dns.value());
  }
  return out;
}

int PodListeners::inboundFd(int family) const {
  for (const auto& l : listeners_)
    if (l->kind == Kind::kInbound && l->addr.family() == family) return l->fd;
  return -1;
}

std::vector<std::string> PodListeners::describe() const {
  std::vector<std::string> out;
  for (const auto& l : listeners_)
    out.push_back(std::string(l->kind == Kind::kInbound  ? "inbound "
                              : l->kind == Kind::kHbone ? "hbone "
                                                        : "outbound ") +
                  l->addr.toString());
  if (dns_)
    for (auto& d : dns_->describe()) out.push_back(std::move(d));
  return out;
}

Status LocalWorkloads::setPinDir(const std::string& pin_dir) {
  if (pin_dir == pin_dir_ && (map_ || pin_dir.empty())) return Status::ok();
  pin_dir_ = pin_dir;
  map_.reset();
  if (pin_dir.empty()) return Status::ok();
  return openMap();
}

Status LocalWorkloads::openMap() {
  auto m = InboundListenerMap::open(pin_dir_);
  if (!m) return m.status().context("inbound listener map under " + pin_dir_);
  map_.emplace(std::move(m.value()));
  return Status::ok();
}

Status LocalWorkloads::add(const WorkloadInfo& info, UniqueFd netns) {
  if (pods_.count(info.uid)) return Status::ok();  // kept as is: no listener churn
  std::string what = "workload " + info.namespace_ + "/" + info.name;
  if (!netns.valid()) return Status::error(what + ": netns fd missing");
  if (!pin_dir_.empty() && !map_) {
    Status st = openMap();
    if (!st) return st.context(what);
  }
  auto pod = std::make_shared<LocalPod>();
  pod->info = std::make_shared<const WorkloadInfo>(info);
  pod->netns = std::move(netns);
  auto listeners = PodListeners::create(proxy_, pod, ports_, dnsLookup());
  if (!listeners) return listeners.status().context(what);
  Entry e;
  e.pod = pod;
  e.listeners = std::move(listeners.value());
  if (map_) {
    for (const IpAddr& ip : info.ips) {
      int fd = e.listeners->inboundFd(ip.family());
      if (fd < 0) continue;  // unreachable: a pod with an IPv6 IP has IPv6 listeners
      Status st = map_->add(ip, fd);
      if (!st) {
        unregister(e);
        return st.context(what + ": registering inbound listener for " + ip.toString());
      }
      e.registered.push_back(ip);
    }
  }
  // Every loop listens for every pod; the one that steers (the main loop) says so at info.
  spdlog::log(map_ ? spdlog::level::info : spdlog::level::debug,
              "{} ({}): listening in its netns, {} IPs steered", what, info.uid,
              e.registered.size());
  for (const IpAddr& ip : info.ips) pod_by_ip_.emplace(ip, pod);
  pods_.emplace(info.uid, std::move(e));
  return Status::ok();
}

DnsResolverLookup LocalWorkloads::dnsLookup() {
  if (dns_lookup_for_test_) return dns_lookup_for_test_;
  std::string pin_dir = pin_dir_;
  if (pin_dir.empty()) return {};  // no BPF: forwarded queries get SERVFAIL
  struct Lazy {
    std::string pin_dir;
    DnsResolverLookup opened;
  };
  auto lazy = std::make_shared<Lazy>(Lazy{pin_dir, {}});
  return [lazy](const DnsQueryOrigin& o) -> Result<SocketAddress> {
    if (!lazy->opened) {
      auto l = openBpfResolverLookup(lazy->pin_dir);
      if (!l) return l.status();
      lazy->opened = std::move(l.value());
    }
    return lazy->opened(o);
  };
}

void LocalWorkloads::unregister(Entry& e) {
  if (!map_) return;
  for (const IpAddr& ip : e.registered) {
    Status st = map_->remove(ip);
    if (!st) spdlog::warn("unregistering inbound listener {}: {}", ip.toString(), st.message());
  }
  e.registered.clear();
}

Status LocalWorkloads::remove(const std::string& uid) {
  auto it = pods_.find(uid);
  if (it == pods_.end()) return Status::ok();
  unregister(it->second);
  spdlog::info("workload {}/{} ({}): listeners closed", it->second.pod->info->namespace_,
               it->second.pod->info->name, uid);
  LocalPodPtr gone = it->second.pod;
  pods_.erase(it);  // closes the listeners; connections hold the pod until they end
  for (const IpAddr& ip : gone->info->ips) {
    auto at = pod_by_ip_.find(ip);
    if (at == pod_by_ip_.end() || at->second != gone) continue;
    pod_by_ip_.erase(at);
    // Another held pod with the same IP (a stale uid the next snapshot drops) takes it over.
    for (const auto& [other_uid, other] : pods_)
      if (other.pod->info->hasIp(ip)) {
        pod_by_ip_.emplace(ip, other.pod);
        break;
      }
  }
  return Status::ok();
}

LocalPodPtr LocalWorkloads::podByIp(const IpAddr& ip) const {
  auto it = pod_by_ip_.find(ip);
  return it == pod_by_ip_.end() ? nullptr : it->second;
}

void LocalWorkloads::retainOnly(const std::set<std::string>& keep) {
  std::vector<std::string> drop;
  for (const auto& [uid, e] : pods_)
    if (!keep.count(uid)) drop.push_back(uid);
  for (const std::string& uid : drop) remove(uid);
}

void LocalWorkloads::closeAllListeners() {
  for (auto& [uid, e] : pods_) e.listeners.reset();
}

nlohmann::json LocalWorkloads::toJson() const {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& [uid, e] : pods_) {
    const WorkloadInfo& w = *e.pod->info;
    nlohmann::json ips = nlohmann::json::array();
    for (const IpAddr& ip : w.ips) ips.push_back(ip.toString());
    nlohmann::json steered = nlohmann::json::array();
    for (const IpAddr& ip : e.registered) steered.push_back(ip.toString());
    out.push_back({{"uid", w.uid},
                   {"name", w.name},
                   {"namespace", w.namespace_},
                   {"service_account", w.service_account},
                   {"ips", ips},
                   {"listeners", e.listeners ? e.listeners->describe()
                                             : std::vector<std::string>{}},
                   {"steered_ips", steered}});
  }
  return out;
}

}  // namespace weft::ztunnel
