// The ztunnel's agent message handling, readiness and drain.
#include "ztunnel/ztunnel.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>

#include <cstring>

#include "common/netns.h"
#include "weft/version.h"
#include "ztunnel/bpf_map_fill.h"
#include "ztunnel/hbone/buffer_pools.h"
#include "ztunnel/weft_metrics.h"

namespace weft::ztunnel {

Ztunnel::Ztunnel(uv_loop_t* loop, ZtunnelOptions options)
    : loop_(loop), options_(std::move(options)), proxy_(loop), workloads_(proxy_, options_.ports) {
  identities_ = std::make_unique<IdentityManager>(
      loop_, [this](const node::v1::CertificateRequest& req) {
        return agent_ && agent_->sendCertificateRequest(req);
      });
  MeshTlsOptions mo;
  mo.cert_wait = std::chrono::milliseconds(options_.cert_wait_ms);
  mesh_tls_ = std::make_unique<MeshTls>(
      proxy_, *identities_, [this](const IpAddr& ip) { return workloads_.podByIp(ip); }, mo);
  proxy_.setMeshTls(mesh_tls_.get());
  EventPodResolver resolver;
  resolver.by_cookie = [this](uint64_t cookie) {
    LocalPodPtr pod = workloads_.pod(fast_path_->uidByCookie(cookie));
    return pod ? pod->info->namespace_ + "/" + pod->info->name : std::string();
  };
  resolver.by_ip = [this](const IpAddr& ip) {
    WorkloadInfoPtr w = proxy_.state() ? proxy_.state()->workloadByIp(ip) : nullptr;
    return w ? w->namespace_ + "/" + w->name : std::string();
  };
  events_ = std::make_unique<EventHub>(loop_, std::move(resolver));
  fast_path_ = std::make_unique<FastPath>(proxy_, options_.fast_path);
  proxy_.setFastPath(fast_path_.get());
  events_->onFastEvent([this](const weft_fast_event& e) { fast_path_->onEvent(e); });
  proxy_.verdicts().setObserver([this](const VerdictEvent& e) {
    if (events_) events_->publishVerdict(e);
  });
}

Ztunnel::~Ztunnel() {
  shutdown();
  proxy_.setAccessLog(nullptr);
  access_log_.reset();  // writes what is pending
}

Status Ztunnel::startLoops() {
  if (options_.loops <= 1 || !workers_.empty()) return Status::ok();
  if (options_.loops > kMaxLoops)
    return Status::errorf("--loops {}: at most {}", options_.loops, kMaxLoops);
  proxy_.setLoopIndex(0, options_.loops);
  // One balancer for the node: round robin stays exact and ejections count every loop's
  // failures. Its calls serialise on a mutex held only inside them (connection setup and end
  // of service connections; never the bytes).
  proxy_.balancer().shareBetweenThreads();
  auto inbox = LoopMailbox::create(loop_);
  if (!inbox) return inbox.status();
  main_inbox_ = std::move(inbox.value());
  main_inbox_->unref();  // only a drain waiting for the workers keeps the loop alive for it
  LoopWorkerSinks sinks;
  sinks.main = main_inbox_;
  sinks.access_log = [this](const AccessLogRecord& r) {
    if (access_log_) access_log_->write(r);
  };
  // Recorded again on the main loop's log: /verdicts, the verdict metrics and /events see
  // every loop's verdicts in one sequence.
  sinks.verdict = [this](const VerdictEvent& e) { proxy_.verdicts().record(e); };
  sinks.fast_path = [this](const WorkloadInfo& src, const Route& route,
                           const SocketAddress& to) { fast_path_->consider(src, route, to); };
  for (unsigned i = 1; i < options_.loops; ++i) {
    LoopWorkerOptions wo;
    wo.index = i;
    wo.count = options_.loops;
    wo.ports = options_.ports;
    wo.cert_wait = std::chrono::milliseconds(options_.cert_wait_ms);
    wo.drain_timeout_ms = options_.drain_timeout_ms;
    wo.balancer = &proxy_.balancer();
    wo.memory = memory_activity_;
    wo.memory_trim = options_.memory_trim;
    auto w = std::make_unique<LoopWorker>(wo, sinks);
    Status st = w->start();
    if (!st) return st;
    workers_.push_back(std::move(w));
  }
  if (identities_) {
    identities_->setCertificateObserver([this](const Identity& id, CertificatePtr cert) {
      for (auto& w : workers_) w->setCertificate(id, cert);
    });
  }
  spdlog::info("{} event loops: the main loop and {} workers", options_.loops, workers_.size());
  return Status::ok();
}

Status Ztunnel::setDestinationHookForTest(Proxy::DestinationHook hook) {
  proxy_.setDestinationHookForTest(hook);
  for (auto& w : workers_) {
    Status st = w->setDestinationHookForTest(hook);
    if (!st) return st;
  }
  return Status::ok();
}

std::vector<LoopSnapshot> Ztunnel::workerSnapshots() {
  std::vector<LoopSnapshot> out;
  for (auto& w : workers_) {
    auto s = w->snapshot();
    if (s) out.push_back(std::move(*s));
    else spdlog::warn("loop {}: no snapshot within {} ms", w->index(),
                      LoopWorker::kSyncTimeout.count());
  }
  return out;
}

void Ztunnel::loopDrained() {
  if (drain_pending_ == 0 || --drain_pending_ != 0) return;
  drain_timer_.close();
  if (main_inbox_) main_inbox_->unref();
  spdlog::info("drained");
  if (drain_done_) {
    auto cb = std::move(drain_done_);
    drain_done_ = nullptr;
    cb();
  }
}

Status Ztunnel::start() {
  Status loops = startLoops();
  if (!loops) return loops;
  memory_ = std::make_unique<LoopMemory>(
      loop_, options_.memory_trim, memory_activity_.get(),
      [this] {
        return LoopMemory::ConnectionCounts{proxy_.connectionsBegun(), proxy_.connectionsEnded()};
      },
      true);
  Status mem = memory_->start();
  if (!mem) return mem;
  auto serve = [this](const std::optional<SocketAddress>& addr, HttpAdminServerPtr* out,
                      HttpResponse (Ztunnel::*fn)(const HttpRequest&), const char* what) {
    if (!addr) return Status::ok();
    auto s = HttpAdminServer::listenTcp(loop_, *addr,
                                        [this, fn](const HttpRequest& r) { return (this->*fn)(r); });
    if (!s) return s.status().context(what);
    *out = std::move(s.value());
    spdlog::info("{} on {}", what, (*out)->boundAddress().toString());
    return Status::ok();
  };
  auto log = AccessLog::open(loop_, options_.access_log);
  if (!log) return log.status();
  access_log_ = std::move(log.value());
  proxy_.setAccessLog(access_log_.get());
  if (access_log_) {
    spdlog::info("access log: {} ({})", access_log_->sink(),
                 accessLogFormatName(access_log_->format()));
  }
  Status st = serve(options_.admin_addr, &admin_, &Ztunnel::handleAdmin, "admin");
  if (st) st = serve(options_.metrics_addr, &metrics_, &Ztunnel::handleMetrics, "metrics");
  if (st) st = serve(options_.readiness_addr, &readiness_, &Ztunnel::handleReadiness, "readiness");
  if (!st) return st;
  AgentClientOptions ao;
  ao.socket_path = options_.agent_socket;
  ao.ztunnel_version = WEFT_VERSION;
  agent_ = std::make_unique<AgentClient>(loop_, ao, *this, proxy_.stats());
  return agent_->start();
}

void Ztunnel::drain(std::function<void()> done) {
  if (draining_) return;
  draining_ = true;
  drain_done_ = std::move(done);
  spdlog::info("draining: closing listeners, {} connections open on the main loop, waiting up "
               "to {} ms on each of {} loops",
               proxy_.activeConnections(), options_.drain_timeout_ms, loopCount());
  if (agent_) agent_->stop();
  // Every loop stops accepting and drains on its own; done when all of them are.
  drain_pending_ = 1 + workers_.size();
  if (main_inbox_) main_inbox_->ref();  // the workers' "drained" posts must be heard
  for (auto& w : workers_) w->drain([this] { loopDrained(); });
  workloads_.closeAllListeners();
  int rc = drain_timer_.init(uv_timer_init(loop_, drain_timer_.get()));
  drain_timer_.get()->data = this;
  auto finish = [this] {
    drain_timer_.close();
    loopDrained();
  };
  if (proxy_.activeConnections() == 0) {
    finish();
    return;
  }
  proxy_.onIdle(finish);
  if (rc == 0) rc = uv_timer_start(
      drain_timer_.get(),
      [](uv_timer_t* t) {
        auto* self = static_cast<Ztunnel*>(t->data);
        spdlog::warn("drain timeout: cutting {} connections", self->proxy_.activeConnections());
        self->proxy_.abortAll("drain timeout");  // onIdle fires once their handles closed
      },
      options_.drain_timeout_ms, 0);
  if (rc != 0) {
    spdlog::error("drain timer: {}", uv_strerror(rc));
    proxy_.abortAll("drain");
  }
}

void Ztunnel::shutdown() {
  // Worker loops first: their connections end and their threads are joined, so nothing posts
  // to the main loop any more.
  for (auto& w : workers_) w->stop();
  workers_.clear();
  if (main_inbox_) {
    main_inbox_->close();
    main_inbox_.reset();
  }
  if (identities_) identities_->setCertificateObserver(nullptr);
  agent_.reset();
  // Connections first (certificate waits are cancelled, tunnels reset), then the HBONE side
  // (its sessions end the tunnels still open), then the certificates.
  proxy_.onIdle(nullptr);
  proxy_.abortAll("shutdown");
  proxy_.setMeshTls(nullptr);
  mesh_tls_.reset();
  identities_.reset();
  proxy_.verdicts().setObserver(nullptr);
  events_.reset();
  admin_.reset();
  metrics_.reset();
  readiness_.reset();
  drain_timer_.close();
  if (memory_) memory_->close();
  workloads_.closeAllListeners();
}

void Ztunnel::onAgentConnected() {
  snapshot_uids_.clear();
  if (identities_) identities_->onAgentConnected();
}

void Ztunnel::onAgentDisconnected() {
  // Keep serving everything we hold; the next connection brings a new snapshot.
  snapshot_uids_.clear();
  if (identities_) identities_->onAgentDisconnected();
}

Status Ztunnel::onNodeConfig(const node::v1::NodeConfig& config) {
  node_config_ = config;
  have_node_config_ = true;
  if (!config.cluster_domain().empty()) proxy_.setClusterDomain(config.cluster_domain());
  proxy_.setTrustDomain(config.trust_domain().empty() ? "cluster.local"
                                                       : config.trust_domain());
  if (mesh_tls_) {
    mesh_tls_->setTrustDomain(config.trust_domain().empty() ? "cluster.local"
                                                            : config.trust_domain());
  }
  for (auto& w : workers_) {
    Status st = w->setDomains(config.cluster_domain(), config.trust_domain().empty()
                                                           ? "cluster.local"
                                                           : config.trust_domain());
    if (!st) return st;
  }
  if (events_) {
    // Monitor events are best effort: without the ring the stream still carries verdicts.
    Status ev = events_->setPinDir(config.bpf_pin_dir());
    if (!ev) spdlog::warn("events: {}", ev.message());
  }
  // Without its maps (an older BPF set) connections take the ztunnel path; /fast_path says why.
  Status fp = fast_path_->setPinDir(config.bpf_pin_dir());
  if (!fp) spdlog::warn("{}", fp.message());
  return workloads_.setPinDir(config.bpf_pin_dir());
}

Status Ztunnel::onClusterUpdate(const node::v1::ClusterUpdate& update) {
  auto next = ClusterState::apply(proxy_.state().get(), update);
  if (!next) return next.status();
  // Every loop gets the same immutable snapshot; the main loop's last, so a worker that did not
  // answer in time leaves the update reported failed (it is queued there and applies when that
  // loop runs again: there is nothing to undo).
  for (auto& w : workers_) {
    Status st = w->setState(next.value());
    if (!st) return st;
  }
  proxy_.setState(std::move(next.value()));
  fast_path_->invalidate("cluster update");
  return Status::ok();
}

Status Ztunnel::onAddWorkload(const node::v1::Workload& workload, UniqueFd netns) {
  auto info = workloadFromProto(workload);
  if (!info) return info.status();
  snapshot_uids_.insert(info->uid);
  if (draining_) return Status::error("draining");
  auto cookie = netnsCookie(netns.get());
  // Each worker loop opens its own listeners in the pod's netns (one SO_REUSEPORT group per
  // address with the main loop's); the pod is added on every loop or on none.
  bool held = workloads_.contains(info->uid);
  std::vector<UniqueFd> netns_dups;
  for (size_t i = 0; i < workers_.size(); ++i) {
    netns_dups.emplace_back(::fcntl(netns.get(), F_DUPFD_CLOEXEC, 0));
    if (netns.valid() && !netns_dups.back().valid()) {
      proxy_.stats().workload_listener_failures_total++;
      return Status::errorf("workload {}/{}: dup of its netns fd: {}", info->namespace_,
                            info->name, strerror(errno));
    }
  }
  Status st = workloads_.add(*info, std::move(netns));
  if (!st) {
    proxy_.stats().workload_listener_failures_total++;
    return st;
  }
  for (size_t i = 0; i < workers_.size() && !held; ++i) {
    st = workers_[i]->addPod(*info, std::move(netns_dups[i]));
    if (!st) {
      for (size_t j = 0; j <= i; ++j) {
        Status rm = workers_[j]->removePod(info->uid);
        if (!rm) spdlog::warn("{}", rm.message());
      }
      workloads_.remove(info->uid);
      proxy_.stats().workload_listener_failures_total++;
      return st.context("workload " + info->namespace_ + "/" + info->name);
    }
  }
  if (cookie) fast_path_->addPod(info->uid, cookie.value());
  // Fetch its certificate ahead of its first connection.
  if (identities_) {
    Identity id{node_config_.trust_domain().empty() ? "cluster.local" : node_config_.trust_domain(),
                workload.namespace_(),
                workload.service_account().empty() ? "default" : workload.service_account()};
    auto checked = Identity::parse(id.toString());
    if (!checked) {
      spdlog::warn("workload {}: no certificate: {}", info->uid, checked.status().message());
    } else {
      identities_->addWorkload(info->uid, checked.value());
    }
  }
  return st;
}

Status Ztunnel::onDelWorkload(const std::string& uid) {
  snapshot_uids_.erase(uid);
  fast_path_->removePod(uid);
  if (identities_) identities_->removeWorkload(uid);
  for (auto& w : workers_) {
    Status st = w->removePod(uid);
    if (!st) spdlog::warn("{}", st.message());
  }
  return workloads_.remove(uid);
}

Status Ztunnel::onCertificateResponse(const node::v1::CertificateResponse& response) {
  if (!identities_) return Status::error("shutting down");
  return identities_->onCertificateResponse(response);
}

Status Ztunnel::onSnapshotSent() {
  for (auto& w : workers_) {
    Status st = w->retainOnly(snapshot_uids_);
    if (!st) spdlog::warn("{}", st.message());
  }
  workloads_.retainOnly(snapshot_uids_);
  if (identities_) identities_->retainOnly(snapshot_uids_);
  if (!ready_) spdlog::info("snapshot applied: {} local workloads; ready", workloads_.size());
  ready_ = true;
  return Status::ok();
}

void Ztunnel::refreshGauges() {
  ZtunnelStats& s = proxy_.stats();
  s.workloads = workloads_.size();
  s.enrolled_pods = workloads_.size();
  if (access_log_) {
    AccessLogStats a = access_log_->stats();
    s.access_log_lines_total = a.lines;
    s.access_log_dropped_total = a.dropped;
    s.access_log_write_errors_total = a.write_errors;
    s.access_log_reopens_total = a.reopens;
    s.access_log_reopen_errors_total = a.reopen_errors;
  }
  if (main_inbox_) s.loop_reports_dropped_total = main_inbox_->dropped();
  s.active_connections = proxy_.activeConnections() + fast_path_->activeConnections();
  s.fast_path_enabled = fast_path_->available() && fast_path_->enabled() ? 1 : 0;
  s.fast_path_active_connections = fast_path_->activeConnections();
  s.agent_connected = agent_ && agent_->connected() ? 1 : 0;
  s.ready = ready_ ? 1 : 0;
  s.draining = draining_ ? 1 : 0;
  if (mesh_tls_) {
    // Counted by the HBONE objects; copied here when rendered (they only grow).
    s.hbone_client_handshakes_total = mesh_tls_->client().handshakes();
    s.hbone_client_handshake_failures_total = mesh_tls_->client().handshakeFailures();
    s.hbone_client_stream_retries_total = mesh_tls_->client().streamRetries();
    hbone::ServerStats ss = mesh_tls_->serverStats();
    s.hbone_server_handshakes_total = ss.handshakes;
    s.hbone_server_handshake_failures_total = ss.handshakeFailures;
    s.hbone_pool_connections = mesh_tls_->client().connections();
  }
}

ZtunnelStats Ztunnel::mergedStats(const std::vector<LoopSnapshot>& workers) {
  refreshGauges();
  ZtunnelStats s = proxy_.stats();
  s.loops = loopCount();
  for (const LoopSnapshot& w : workers) {
    addCounters(s, w.stats);
    s.active_connections += w.active_connections;
    s.hbone_client_handshakes_total += w.mtls.client_handshakes;
    s.hbone_client_handshake_failures_total += w.mtls.client_handshake_failures;
    s.hbone_client_stream_retries_total += w.mtls.client_stream_retries;
    s.hbone_server_handshakes_total += w.mtls.server.handshakes;
    s.hbone_server_handshake_failures_total += w.mtls.server.handshakeFailures;
    s.hbone_pool_connections += w.mtls.pool_connections;
  }
  return s;
}

std::string Ztunnel::renderWeftMetrics() {
  std::string out;
  std::vector<BpfMapFill> maps;
  if (have_node_config_ && !node_config_.bpf_pin_dir().empty()) {
    auto m = readPinnedMapFill(node_config_.bpf_pin_dir() + "/maps");
    if (m) {
      maps = std::move(m.value());
    } else {
      if (bpf_map_read_errors_++ == 0) spdlog::warn("metrics: {}", m.status().message());
      else spdlog::debug("metrics: {}", m.status().message());
    }
  }
  out += renderBpfMapFill(maps, bpf_map_read_errors_);
  out += renderCertificateMetrics(identities_ ? identities_->view() : std::vector<IdentityView>{},
                                  std::chrono::system_clock::now());
  out += renderDnsOutcomes(proxy_.stats());
  out += renderBuildInfo(WEFT_VERSION);
  return out;
}

std::string Ztunnel::renderMemoryMetrics(const std::vector<LoopSnapshot>& workers) {
  MemoryMetrics m;
  m.trims = memory_activity_->trims();
  m.trim_microseconds = memory_activity_->trimMicrosTotal();
  m.pool_releases = memory_activity_->poolReleases();
  m.released_bytes = memory_activity_->releasedBytes();
  // The main loop's pools are this thread's; the workers' came with their snapshots.
  hbone::BufferPoolUsage own = hbone::localBufferPoolUsage();
  m.pooled_cipher_bytes = own.cipher_bytes;
  m.pooled_chunk_bytes = own.chunk_bytes;
  for (const LoopSnapshot& w : workers) {
    m.pooled_cipher_bytes += w.pooled_cipher_bytes;
    m.pooled_chunk_bytes += w.pooled_chunk_bytes;
  }
  return ztunnel::renderMemoryMetrics(m);
}

nlohmann::json Ztunnel::memoryJson() const {
  const MemoryActivity& a = *memory_activity_;
  return {{"buffer_idle_ms", options_.memory_trim.pool_idle.count()},
          {"trims", a.trims()},
          {"trim_microseconds_total", a.trimMicrosTotal()},
          {"last_trim_microseconds", a.lastTrimMicros()},
          {"pool_releases", a.poolReleases()},
          {"pool_released_bytes", a.releasedBytes()},
          {"connections_ended", a.ended()}};
}

nlohmann::json Ztunnel::accessLogJson() const {
  if (!access_log_) return {{"sink", "off"}};
  AccessLogStats a = access_log_->stats();
  return {{"sink", access_log_->sink()},
          {"format", accessLogFormatName(access_log_->format())},
          {"lines", a.lines},
          {"dropped", a.dropped},
          {"write_errors", a.write_errors},
          {"reopens", a.reopens},
          {"reopen_errors", a.reopen_errors}};
}

}  // namespace weft::ztunnel
