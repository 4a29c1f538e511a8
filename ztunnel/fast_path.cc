// The same-node fast path in the ztunnel: verdict cache writes and clears, kernel events to
// connections, metrics and access logs. The kernel half: bpf/lib/fast.h.
#include "ztunnel/fast_path.h"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cstring>
#include <ctime>

#include "ztunnel/inbound_policy.h"
#include "ztunnel/policy.h"
#include "ztunnel/traffic_labels.h"

namespace weft::ztunnel {

namespace {

uint64_t monotonicNs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}


}  // namespace

Status FastPath::setPinDir(const std::string& pin_dir) {
  if (pin_dir == pin_dir_ && verdicts_.valid()) return Status::ok();
  pin_dir_ = pin_dir;
  verdicts_.reset();
  stats_.reset();
  if (pin_dir.empty()) {
    unavailable_reason_ = "no BPF pin dir (no agent BPF programs)";
    return Status::ok();
  }
  std::string vpath = pin_dir + "/maps/" WEFT_MAP_FAST_VERDICT;
  std::string spath = pin_dir + "/maps/" WEFT_MAP_FAST_STATS;
  int v = bpf_obj_get(vpath.c_str());
  if (v < 0) {
    unavailable_reason_ = vpath + ": " + errnoText(errno);
    return Status::errorf("fast path unavailable: {}", unavailable_reason_);
  }
  UniqueFd vfd(v);
  LIBBPF_OPTS(bpf_obj_get_opts, opts, .file_flags = BPF_F_RDONLY);
  int s = bpf_obj_get_opts(spath.c_str(), &opts);
  if (s < 0) {
    unavailable_reason_ = spath + ": " + errnoText(errno);
    return Status::errorf("fast path unavailable: {}", unavailable_reason_);
  }
  verdicts_ = std::move(vfd);
  stats_ = UniqueFd(s);
  unavailable_reason_.clear();
  clearMap(true);  // verdicts of an earlier ztunnel were decided on a state we do not know
  spdlog::info("fast path: {} ({})", enabled_ ? "on" : "off (--fast-path off)", vpath);
  return Status::ok();
}

void FastPath::setEnabled(bool on) {
  if (on == enabled_) return;
  enabled_ = on;
  if (!on) clearMap();
  spdlog::info("fast path: {}", on ? "on" : "off");
}

void FastPath::addPod(const std::string& uid, uint64_t netns_cookie) {
  uid_by_cookie_[netns_cookie] = uid;
  cookie_by_uid_[uid] = netns_cookie;
}

void FastPath::removePod(const std::string& uid) {
  auto it = cookie_by_uid_.find(uid);
  if (it == cookie_by_uid_.end()) return;
  uid_by_cookie_.erase(it->second);
  cookie_by_uid_.erase(it);
  invalidate("a local pod left");
}

void FastPath::invalidate(const char* why) {
  if (!verdicts_.valid()) return;
  proxy_.stats().fast_path_invalidations_total++;
  spdlog::debug("fast path: clearing cached verdicts: {}", why);
  clearMap();
}

void FastPath::clearMap(bool force) {
  if (!verdicts_.valid() || !(force || map_dirty_)) return;
  map_dirty_ = false;
  weft_fast_key key;
  // Always the first key: each delete makes the next one first. Bounded by the map's size.
  for (int i = 0; i <= WEFT_MAX_FAST_VERDICT; ++i) {
    if (bpf_map_get_next_key(verdicts_.get(), nullptr, &key) != 0) break;
    if (bpf_map_delete_elem(verdicts_.get(), &key) != 0 && errno != ENOENT) {
      spdlog::warn("fast path: clearing {}: {}", WEFT_MAP_FAST_VERDICT, errnoText(errno));
      break;
    }
  }
}

void FastPath::consider(const WorkloadInfo& src, const Route& route,
                        const SocketAddress& destination) {
  if (forwarder_) {
    forwarder_(src, route, destination);
    return;
  }
  if (!enabled_ || !verdicts_.valid()) return;
  if (route.kind != RouteKind::kDirectWorkload || !route.destination_workload) return;
  const WorkloadInfo& dst = *route.destination_workload;
  if (!dst.enrolled) return;
  auto s = cookie_by_uid_.find(src.uid);
  auto d = cookie_by_uid_.find(dst.uid);
  if (s == cookie_by_uid_.end() || d == cookie_by_uid_.end()) return;  // not both on this node
  const IpAddr* src_ip = src.ipOfFamily(destination.family());
  if (src_ip == nullptr) return;

  // What the destination's side of the HBONE path would decide: the source pod's identity
  // (here the kernel vouches for it: the connect() comes from that pod's netns).
  InboundPeer peer;
  peer.path = "fast";
  peer.source = SocketAddress(*src_ip, 0);
  peer.principal = workloadPrincipal(src, proxy_.trustDomain());
  const ClusterStatePtr& state = proxy_.state();
  WorkloadInfoPtr live = state ? state->workloadByUid(dst.uid) : nullptr;
  static const std::vector<AuthorizationPolicyPtr> kNone;
  Verdict v = evaluate(state ? state->authorizationPolicies() : kNone,
                       inboundAttributes(live ? *live : dst, peer, destination));
  // Only plain allows are cached: a deny must be seen per connection, and so must AUDIT and
  // dry-run denies (they are recorded per connection on the ztunnel path).
  if (!v.allowed || !v.audit.empty() || (v.dry_run && !v.dry_run->allowed)) return;

  weft_fast_key key{};
  key.src_netns_cookie = s->second;
  key.dst = destination.toAbi();
  weft_fast_verdict value{d->second, monotonicNs()};
  if (bpf_map_update_elem(verdicts_.get(), &key, &value, BPF_ANY) != 0) {
    proxy_.stats().fast_path_cache_failures_total++;
    if (cache_failures_logged_++ % 100 == 0)
      spdlog::warn("fast path: caching {} -> {}: {} (the ztunnel path stays)", src.name,
                   destination.toString(), errnoText(errno));
    return;
  }
  map_dirty_ = true;
  proxy_.stats().fast_path_verdicts_cached_total++;
}

bool FastPath::labelsOf(const Live& c, TcpLabels* out) const {
  const ClusterStatePtr& state = proxy_.state();
  if (!state) return false;
  WorkloadInfoPtr src = state->workloadByUid(c.src_uid);
  WorkloadInfoPtr dst = c.dst_uid.empty() ? state->workloadByIp(c.dst.ip())
                                          : state->workloadByUid(c.dst_uid);
  if (!dst) dst = state->workloadByIp(c.dst.ip());
  if (!src) return false;
  TcpLabels l;
  l.reporter = "source";
  setSourceLabels(l, *src);
  // The kernel attests the source (the connect() came from its pod's netns).
  l.source_principal = workloadPrincipal(*src, proxy_.trustDomain());
  if (dst) setDestinationLabels(l, *dst, proxy_.trustDomain());
  *out = std::move(l);
  return true;
}

void FastPath::logLine(const Live& c, const TcpLabels& l, const char* direction,
                       uint64_t bytes_up, uint64_t bytes_down, uint64_t duration_ms,
                       const std::string& error) const {
  AccessLog* log = proxy_.accessLog();
  if (log == nullptr) return;
  AccessLogRecord r;
  r.time_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                  std::chrono::system_clock::now().time_since_epoch())
                  .count();
  r.connection_id = c.id;
  r.direction = direction;
  r.path = "fast";
  r.src_addr = c.src;
  r.src_workload = l.source_workload;
  r.src_namespace = l.source_workload_namespace;
  r.src_identity = l.source_principal;
  r.dst_addr = c.dst;
  r.dst_workload = l.destination_workload;
  r.dst_namespace = l.destination_workload_namespace;
  r.dst_identity = l.destination_principal;
  // Istio's sense: outbound = toward/from the destination, inbound = toward/from the source.
  bool outbound = std::strcmp(direction, "outbound") == 0;
  r.bytes_sent = outbound ? bytes_up : bytes_down;
  r.bytes_recv = outbound ? bytes_down : bytes_up;
  r.duration_ms = duration_ms;
  r.error = error;
  if (!error.empty()) r.response_flags = "CONNECT";
  log->write(r);
}

void FastPath::onEvent(const weft_fast_event& e) {
  if (e.head.src.family != WEFT_AF_INET && e.head.src.family != WEFT_AF_INET6) return;
  if (e.head.dst.family != WEFT_AF_INET && e.head.dst.family != WEFT_AF_INET6) return;
  SocketAddress src = SocketAddress::fromAbi(e.head.src);
  LiveKey key{e.head.netns_cookie, src.toString()};
  auto src_uid = uid_by_cookie_.find(e.head.netns_cookie);
  auto dst_uid = uid_by_cookie_.find(e.dst_netns_cookie);
  auto describe = [&]() {
    Live c;
    c.id = proxy_.nextConnectionId();
    c.start_ms = uv_now(proxy_.loop());
    c.src = src;
    c.dst = SocketAddress::fromAbi(e.head.dst);
    if (src_uid != uid_by_cookie_.end()) c.src_uid = src_uid->second;
    if (dst_uid != uid_by_cookie_.end()) c.dst_uid = dst_uid->second;
    return c;
  };
  // Labels are built once per event; the destination reporter's differ only in `reporter`.
  auto count = [](TcpLabels l, auto&& fn) {
    fn(l);
    l.reporter = "destination";
    fn(l);
  };

  if (e.head.type == WEFT_EVENT_FAST_OPEN) {
    Live c = describe();
    proxy_.stats().fast_path_connections_total++;
    TcpLabels l;
    if (labelsOf(c, &l)) count(l, [&](const TcpLabels& x) { proxy_.tcpMetrics().opened(x); });
    live_[key] = std::move(c);
    return;
  }
  if (e.head.type != WEFT_EVENT_FAST_CLOSE) return;
  uint64_t duration_ms =
      e.head.timestamp_ns > e.start_ns ? (e.head.timestamp_ns - e.start_ns) / 1000000 : 0;
  auto it = live_.find(key);
  bool had_open = it != live_.end();
  Live c = had_open ? it->second : describe();
  if (had_open) live_.erase(it);
  bool failed = e.old_state == BPF_TCP_SYN_SENT;
  if (failed) proxy_.stats().fast_path_connect_failures_total++;
  TcpLabels labels;
  if (!labelsOf(c, &labels)) return;  // not a pod this ztunnel knows: no labels to count under
  if (failed) {
    // Never connected (refused, unreachable): a failed connection, as on the ztunnel path.
    labels.response_flags = "CONNECT";
    count(labels, [&](const TcpLabels& x) { proxy_.tcpMetrics().failed(x); });
    labels.response_flags = "-";
    logLine(c, labels, "outbound", 0, 0, duration_ms, "connect failed");
    return;
  }
  // A close whose open was lost (ring full, or before this ztunnel started) still counts as
  // opened, so opened == closed + live holds.
  count(labels, [&](const TcpLabels& x) {
    if (!had_open) proxy_.tcpMetrics().opened(x);
    // sent = destination -> source, received = source -> destination (both reporters).
    proxy_.tcpMetrics().closed(x, e.bytes_received, e.bytes_sent);
  });
  logLine(c, labels, "outbound", e.bytes_sent, e.bytes_received, duration_ms, "");
  logLine(c, labels, "inbound", e.bytes_sent, e.bytes_received, duration_ms, "");
}

std::map<std::string, uint64_t> FastPath::kernelStats() const {
  std::map<std::string, uint64_t> out;
  if (!stats_.valid()) return out;
  int ncpu = libbpf_num_possible_cpus();
  if (ncpu <= 0) return out;
  std::vector<uint64_t> per(static_cast<size_t>(ncpu));
  for (uint32_t i = 0; i < std::size(kWeftFastStatNames); ++i) {
    if (bpf_map_lookup_elem(stats_.get(), &i, per.data()) != 0) continue;
    uint64_t sum = 0;
    for (uint64_t v : per) sum += v;
    out[kWeftFastStatNames[i]] = sum;
  }
  return out;
}

nlohmann::json FastPath::statusJson() const {
  size_t cached = 0;
  if (verdicts_.valid()) {
    weft_fast_key key, next;
    const void* prev = nullptr;
    while (cached <= WEFT_MAX_FAST_VERDICT &&
           bpf_map_get_next_key(verdicts_.get(), prev, &next) == 0) {
      key = next;
      prev = &key;
      ++cached;
    }
  }
  const ZtunnelStats& s = proxy_.stats();
  nlohmann::json kernel = nlohmann::json::object();
  for (const auto& [k, v] : kernelStats()) kernel[k] = v;
  std::string state = !verdicts_.valid() ? "unavailable" : enabled_ ? "on" : "off";
  // Where the kernel refused and the connection took the ztunnel path instead.
  uint64_t fallbacks = kernel.value("no_storage", uint64_t{0}) +
                       kernel.value("no_conn_entry", uint64_t{0}) +
                       s.fast_path_cache_failures_total;
  return {{"state", state},
          {"reason", verdicts_.valid() ? (enabled_ ? "" : "switched off") : unavailable_reason_},
          {"cached_verdicts", cached},
          {"active_connections", live_.size()},
          {"connections", s.fast_path_connections_total},
          {"connect_failures", s.fast_path_connect_failures_total},
          {"verdicts_cached", s.fast_path_verdicts_cached_total},
          {"cache_failures", s.fast_path_cache_failures_total},
          {"invalidations", s.fast_path_invalidations_total},
          {"fallbacks", fallbacks},
          {"kernel", kernel}};
}

nlohmann::json FastPath::connectionsJson() const {
  nlohmann::json out = nlohmann::json::array();
  uint64_t now = uv_now(proxy_.loop());
  for (const auto& [key, c] : live_) {
    TcpLabels l;
    bool known = labelsOf(c, &l);
    auto ref = [](const std::string& ns, const std::string& name) {
      return ns.empty() ? std::string() : ns + "/" + name;
    };
    out.push_back({{"id", c.id},
                   {"direction", "outbound"},
                   {"state", "fast"},
                   {"src", c.src.toString()},
                   {"dst", c.dst.toString()},
                   {"upstream", c.dst.toString()},
                   {"route", "fast path: app to app in the kernel"},
                   {"path", "fast"},
                   {"peer_identity", ""},
                   {"source_identity", known ? l.source_principal : ""},
                   {"destination_identity", known ? l.destination_principal : ""},
                   {"source_workload", known ? ref(l.source_workload_namespace, l.source_workload)
                                             : ""},
                   {"destination_workload",
                    known ? ref(l.destination_workload_namespace, l.destination_workload) : ""},
                   {"destination_service", ""},
                   {"bytes_received", nullptr},
                   {"bytes_sent", nullptr},
                   {"age_ms", now - c.start_ms}});
  }
  return out;
}

}  // namespace weft::ztunnel
