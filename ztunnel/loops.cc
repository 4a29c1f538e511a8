// Worker event loops of a multi-loop ztunnel and the mailboxes between them and the main loop.
#include "ztunnel/loops.h"

#include <fcntl.h>
#include <sched.h>
#include <spdlog/spdlog.h>

#include <algorithm>

#include "ztunnel/hbone/buffer_pools.h"

namespace weft::ztunnel {

unsigned defaultLoopCount() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
  int n = CPU_COUNT(&set);
  return static_cast<unsigned>(std::clamp(n, 1, static_cast<int>(kMaxLoops)));
}

void addCounters(ZtunnelStats& into, const ZtunnelStats& from) {
#define WEFT_ADD_STAT(name, help) into.name += from.name;
  WEFT_ZTUNNEL_COUNTERS(WEFT_ADD_STAT)
#undef WEFT_ADD_STAT
}

// ---------------------------------------------------------------------------------------------
// LoopMailbox

Result<std::shared_ptr<LoopMailbox>> LoopMailbox::create(uv_loop_t* loop) {
  auto m = std::shared_ptr<LoopMailbox>(new LoopMailbox());
  int rc = m->async_.init(uv_async_init(loop, m->async_.get(), [](uv_async_t* a) {
    static_cast<LoopMailbox*>(a->data)->drain();
  }));
  if (rc != 0) return Status::errorf("loop mailbox: uv_async_init: {}", uv_strerror(rc));
  m->async_.get()->data = m.get();
  return m;
}

LoopMailbox::~LoopMailbox() {
  // close() ran on the owning thread; a handle never closed is a bug, not something to close
  // from whichever thread dropped the last reference.
}

bool LoopMailbox::post(std::function<void()> fn, bool bounded) {
  std::lock_guard<std::mutex> lk(mu_);
  if (closed_ || (bounded && bounded_queued_ >= kMaxBounded)) {
    dropped_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  queue_.emplace_back(std::move(fn), bounded);
  if (bounded) bounded_queued_++;
  // Under the lock, so close() cannot run between the check and the send.
  uv_async_send(async_.get());
  return true;
}

void LoopMailbox::drain() {
  // A bounded batch per wakeup: posts made while it runs wait for the next turn of the loop.
  std::deque<std::pair<std::function<void()>, bool>> batch;
  {
    std::lock_guard<std::mutex> lk(mu_);
    batch.swap(queue_);
    bounded_queued_ = 0;
  }
  for (auto& [fn, bounded] : batch) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (closed_) return;  // a closure closed it (a worker's stop): the rest is dropped
    }
    fn();
  }
}

void LoopMailbox::close() {
  std::deque<std::pair<std::function<void()>, bool>> dropped;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (closed_) return;
    closed_ = true;
    dropped.swap(queue_);
  }
  async_.close();
}

void LoopMailbox::unref() {
  if (async_.get() != nullptr) uv_unref(async_.handle());
}

void LoopMailbox::ref() {
  if (async_.get() != nullptr) uv_ref(async_.handle());
}

// ---------------------------------------------------------------------------------------------
// CertificateMirror

CertificateMirror::CertificateMirror(uv_loop_t* loop) : loop_(loop) {
  int rc = timer_.init(uv_timer_init(loop_, timer_.get()));
  if (rc != 0) spdlog::error("certificate mirror timer: {}", uv_strerror(rc));
  timer_.get()->data = this;
}

CertificateMirror::~CertificateMirror() { timer_.close(); }

void CertificateMirror::set(const Identity& identity, CertificatePtr cert) {
  std::string key = identity.toString();
  if (cert) certs_[key] = cert;
  else certs_.erase(key);
  std::vector<WaitCallback> due;
  for (auto it = waiters_.begin(); it != waiters_.end();) {
    if (it->second.identity == identity) {
      due.push_back(std::move(it->second.cb));
      it = waiters_.erase(it);
    } else {
      ++it;
    }
  }
  for (auto& cb : due) cb(cert);  // the map is consistent: a callback may wait again
  arm();
}

CertificatePtr CertificateMirror::current(const Identity& identity) const {
  auto it = certs_.find(identity.toString());
  if (it == certs_.end()) return nullptr;
  if (std::chrono::system_clock::now() >= it->second->not_after) return nullptr;
  return it->second;
}

CertificateSource::WaitId CertificateMirror::waitFor(const Identity& identity, WaitCallback cb,
                                                     std::chrono::milliseconds timeout) {
  WaitId id = next_id_++;
  if (CertificatePtr c = current(identity)) {
    cb(std::move(c));
    return id;
  }
  uv_update_time(loop_);
  waiters_.emplace(id, Waiter{identity, std::move(cb),
                              uv_now(loop_) + static_cast<uint64_t>(
                                                  std::max<int64_t>(0, timeout.count()))});
  arm();
  return id;
}

void CertificateMirror::cancelWait(WaitId id) { waiters_.erase(id); }

void CertificateMirror::arm() {
  if (timer_.get() == nullptr) return;
  if (waiters_.empty()) {
    uv_timer_stop(timer_.get());
    return;
  }
  uint64_t first = UINT64_MAX;
  for (const auto& [id, w] : waiters_) first = std::min(first, w.deadline_ms);
  uint64_t now = uv_now(loop_);
  int rc = uv_timer_start(
      timer_.get(), [](uv_timer_t* t) { static_cast<CertificateMirror*>(t->data)->onTimer(); },
      first > now ? first - now : 0, 0);
  if (rc != 0) spdlog::error("certificate mirror timer: {}", uv_strerror(rc));
}

void CertificateMirror::onTimer() {
  uint64_t now = uv_now(loop_);
  std::vector<WaitCallback> due;
  for (auto it = waiters_.begin(); it != waiters_.end();) {
    if (it->second.deadline_ms <= now) {
      spdlog::warn("identity {}: no certificate within the wait; giving up on one connection",
                   it->second.identity.toString());
      due.push_back(std::move(it->second.cb));
      it = waiters_.erase(it);
    } else {
      ++it;
    }
  }
  for (auto& cb : due) cb(nullptr);
  arm();
}

// ---------------------------------------------------------------------------------------------
// LoopWorker

LoopWorker::LoopWorker(LoopWorkerOptions options, LoopWorkerSinks sinks)
    : options_(options), sinks_(std::move(sinks)) {
  options_.ports.dns = 0;
}

LoopWorker::~LoopWorker() { stop(); }

Status LoopWorker::start() {
  struct Ready {
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    Status status;
  } ready;
  thread_ = std::thread([this, &ready] {
    Status st;
    int rc = uv_loop_init(&loop_);
    if (rc != 0) st = Status::errorf("loop {}: uv_loop_init: {}", options_.index, uv_strerror(rc));
    if (st) {
      auto inbox = LoopMailbox::create(&loop_);
      if (inbox) inbox_ = std::move(inbox.value());
      else st = inbox.status();
    }
    if (st) {
      proxy_ = std::make_unique<Proxy>(&loop_);
      proxy_->setLoopIndex(options_.index, options_.count);
      proxy_->setSharedBalancer(options_.balancer);
      LoopMailboxPtr main = sinks_.main;
      auto log = sinks_.access_log;
      proxy_->setAccessLogForwarder([main, log](AccessLogRecord r) {
        main->post([log, r = std::move(r)] { log(r); }, true);
      });
      auto verdict = sinks_.verdict;
      // The main loop's ring is the node's (/verdicts); a worker only counts and forwards. Its
      // own ring of 4096 events, long-lived among each burst's connection allocations, kept
      // ~1.7 MiB and pinned heap pages that malloc_trim could not return.
      proxy_->verdicts().setCapacity(0);
      proxy_->verdicts().setObserver([main, verdict](const VerdictEvent& e) {
        main->post([verdict, e] { verdict(e); }, true);
      });
      certs_ = std::make_unique<CertificateMirror>(&loop_);
      MeshTlsOptions mo;
      mo.cert_wait = options_.cert_wait;
      mesh_tls_ = std::make_unique<MeshTls>(
          *proxy_, *certs_,
          [this](const IpAddr& ip) { return workloads_ ? workloads_->podByIp(ip) : nullptr; },
          mo);
      proxy_->setMeshTls(mesh_tls_.get());
      fast_path_ = std::make_unique<FastPath>(*proxy_, true);
      auto consider = sinks_.fast_path;
      fast_path_->setForwarder(
          [main, consider](const WorkloadInfo& src, const Route& route, const SocketAddress& to) {
            // Only what the main loop's FastPath could cache is worth the copy.
            if (route.kind != RouteKind::kDirectWorkload || !route.destination_workload ||
                !route.destination_workload->enrolled)
              return;
            main->post([consider, src, route, to] { consider(src, route, to); }, true);
          });
      proxy_->setFastPath(fast_path_.get());
      workloads_ = std::make_unique<LocalWorkloads>(*proxy_, options_.ports);
      if (options_.memory) {
        Proxy* proxy = proxy_.get();
        memory_ = std::make_unique<LoopMemory>(
            &loop_, options_.memory_trim, options_.memory.get(),
            [proxy] {
              return LoopMemory::ConnectionCounts{proxy->connectionsBegun(),
                                                  proxy->connectionsEnded()};
            },
            false);
        // Without it the loop still serves; it only keeps its pools (logged, not fatal: the
        // failure path below could not close the handles made so far).
        Status ms = memory_->start();
        if (!ms) {
          spdlog::error("loop {}: {}", options_.index, ms.message());
          memory_.reset();
        }
      }
    }
    {
      std::lock_guard<std::mutex> lk(ready.mu);
      ready.status = st;
      ready.done = true;
      ready.cv.notify_all();
    }
    if (!st) {
      if (rc == 0) {
        uv_run(&loop_, UV_RUN_DEFAULT);
        uv_loop_close(&loop_);
      }
      return;
    }
    run();
  });
  std::unique_lock<std::mutex> lk(ready.mu);
  ready.cv.wait(lk, [&] { return ready.done; });
  if (!ready.status) {
    lk.unlock();
    thread_.join();
    return ready.status;
  }
  started_ = true;
  return Status::ok();
}

void LoopWorker::run() {
  uv_run(&loop_, UV_RUN_DEFAULT);
  // teardown() closed every handle; what remains are objects without handles.
  memory_.reset();
  workloads_.reset();
  proxy_->setFastPath(nullptr);
  fast_path_.reset();
  certs_.reset();
  proxy_.reset();
  uv_run(&loop_, UV_RUN_DEFAULT);
  int rc = uv_loop_close(&loop_);
  if (rc != 0) spdlog::warn("loop {}: close: {}", options_.index, uv_strerror(rc));
}

void LoopWorker::teardown() {
  if (drain_timer_) drain_timer_->close();
  drain_done_ = nullptr;
  if (memory_) memory_->close();
  workloads_->closeAllListeners();
  // As Ztunnel::shutdown: connections first (certificate waits cancelled, tunnels reset), then
  // the HBONE side (its sessions end the tunnels still open), then the certificates.
  proxy_->onIdle(nullptr);
  proxy_->abortAll("shutdown");
  proxy_->setMeshTls(nullptr);
  mesh_tls_.reset();
  certs_->close();
  proxy_->verdicts().setObserver(nullptr);
  inbox_->close();
}

void LoopWorker::stop() {
  if (!started_ || stopped_) return;
  stopped_ = true;
  if (!inbox_->post([this] { teardown(); })) {
    spdlog::error("loop {}: cannot post the stop", options_.index);
  }
  thread_.join();
}

Status LoopWorker::setState(ClusterStatePtr state) {
  auto r = call<bool>([this, state = std::move(state)] {
    proxy_->setState(state);
    return true;
  });
  if (!r) return Status::errorf("loop {}: no answer to a cluster update", options_.index);
  return Status::ok();
}

Status LoopWorker::setDomains(const std::string& cluster_domain, const std::string& trust_domain) {
  auto r = call<bool>([this, cluster_domain, trust_domain] {
    if (!cluster_domain.empty()) proxy_->setClusterDomain(cluster_domain);
    proxy_->setTrustDomain(trust_domain);
    if (mesh_tls_) mesh_tls_->setTrustDomain(trust_domain);
    return true;
  });
  if (!r) return Status::errorf("loop {}: no answer to the node config", options_.index);
  return Status::ok();
}

Status LoopWorker::addPod(const WorkloadInfo& info, UniqueFd netns) {
  // The fd travels as an int inside a shared owner, so a closure that never runs still closes it.
  auto fd = std::make_shared<UniqueFd>(std::move(netns));
  auto r = call<Status>([this, info, fd] { return workloads_->add(info, std::move(*fd)); });
  if (!r) return Status::errorf("loop {}: no answer to adding a workload", options_.index);
  return r->context("loop " + std::to_string(options_.index));
}

Status LoopWorker::removePod(const std::string& uid) {
  auto r = call<Status>([this, uid] { return workloads_->remove(uid); });
  if (!r) return Status::errorf("loop {}: no answer to removing a workload", options_.index);
  return *r;
}

Status LoopWorker::retainOnly(const std::set<std::string>& uids) {
  auto r = call<bool>([this, uids] {
    workloads_->retainOnly(uids);
    return true;
  });
  if (!r) return Status::errorf("loop {}: no answer to the snapshot", options_.index);
  return Status::ok();
}

void LoopWorker::setCertificate(const Identity& identity, CertificatePtr cert) {
  if (!inbox_) return;
  inbox_->post([this, identity, cert = std::move(cert)] {
    if (certs_) certs_->set(identity, cert);
  });
}

Status LoopWorker::setDestinationHookForTest(Proxy::DestinationHook hook) {
  auto r = call<bool>([this, hook = std::move(hook)] {
    proxy_->setDestinationHookForTest(hook);
    return true;
  });
  return r ? Status::ok() : Status::error("no answer");
}

std::optional<LoopSnapshot> LoopWorker::snapshot() {
  return call<LoopSnapshot>([this] {
    LoopSnapshot s;
    s.loop = options_.index;
    s.stats = proxy_->stats();
    s.tcp = proxy_->tcpSeries();
    s.tcp_failures = proxy_->tcpMetrics().failures();
    if (mesh_tls_) s.mtls = mesh_tls_->counters();
    s.connections = proxy_->connectionsJson();
    s.active_connections = proxy_->activeConnections();
    s.certificate_waits = certs_ ? certs_->pendingWaits() : 0;
    hbone::BufferPoolUsage pools = hbone::localBufferPoolUsage();
    s.pooled_cipher_bytes = pools.cipher_bytes;
    s.pooled_chunk_bytes = pools.chunk_bytes;
    s.verdict_capacity = proxy_->verdicts().capacity();
    s.verdicts_kept = proxy_->verdicts().size();
    return s;
  });
}

nlohmann::json LoopWorker::localWorkloadsJson() {
  auto r = call<nlohmann::json>([this] { return workloads_->toJson(); });
  return r ? *r : nlohmann::json(nullptr);
}

void LoopWorker::drain(std::function<void()> done) {
  LoopMailboxPtr main = sinks_.main;
  // Synchronously, so that when the drain call returns no loop accepts any more.
  auto closed = call<bool>([this] {
    workloads_->closeAllListeners();
    return true;
  });
  if (!closed) spdlog::error("loop {}: no answer to closing its listeners", options_.index);
  bool posted = inbox_ && inbox_->post([this, done, main] {
    workloads_->closeAllListeners();
    drain_done_ = [this, done, main] {
      if (drain_timer_) drain_timer_->close();
      main->post(done);
    };
    auto finish = [this] {
      if (!drain_done_) return;
      auto cb = std::move(drain_done_);
      drain_done_ = nullptr;
      cb();
    };
    if (proxy_->activeConnections() == 0) {
      finish();
      return;
    }
    proxy_->onIdle(finish);
    drain_timer_ = std::make_unique<UvHandle<uv_timer_t>>();
    int rc = drain_timer_->init(uv_timer_init(&loop_, drain_timer_->get()));
    drain_timer_->get()->data = this;
    if (rc == 0)
      rc = uv_timer_start(
          drain_timer_->get(),
          [](uv_timer_t* t) {
            auto* self = static_cast<LoopWorker*>(t->data);
            spdlog::warn("loop {}: drain timeout: cutting {} connections", self->options_.index,
                         self->proxy_->activeConnections());
            self->proxy_->abortAll("drain timeout");  // onIdle fires once their handles closed
          },
          options_.drain_timeout_ms, 0);
    if (rc != 0) {
      spdlog::error("loop {}: drain timer: {}", options_.index, uv_strerror(rc));
      proxy_->abortAll("drain");
    }
  });
  if (!posted) main->post(done);
}

}  // namespace weft::ztunnel
