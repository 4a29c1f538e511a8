// The multi-loop ztunnel (ARCHITECTURE "ztunnel internals", Threads): worker event loops, each
// on its own thread with its own Proxy, mTLS side and SO_REUSEPORT listeners per pod, and the
// control path between them and the main loop (mailboxes; nothing on the data path is shared).
#pragma once

#include <uv.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/uv_handle.h"
#include "ztunnel/fast_path.h"
#include "ztunnel/identity.h"
#include "ztunnel/memory_trim.h"
#include "ztunnel/mesh_tls.h"
#include "ztunnel/proxy.h"
#include "ztunnel/workloads.h"

namespace weft::ztunnel {

// Loops a ztunnel runs by default: the CPUs this process may run on (sched_getaffinity),
// within [1, kMaxLoops].
inline constexpr unsigned kMaxLoops = 64;
unsigned defaultLoopCount();

// Closures posted to one loop from any thread, run on that loop (uv_async + a mutex-protected
// queue). Control messages are never dropped; data-path reports (access-log lines, verdicts,
// fast-path candidates) are bounded: beyond kMaxBounded queued they are dropped and counted.
class LoopMailbox {
 public:
  static constexpr size_t kMaxBounded = 65536;
  // On the owning loop's thread.
  static Result<std::shared_ptr<LoopMailbox>> create(uv_loop_t* loop);
  ~LoopMailbox();
  // Any thread. False when the mailbox is closed or (bounded) full.
  bool post(std::function<void()> fn, bool bounded = false);
  // On the owning loop's thread: stops taking posts, drops what is queued, closes the handle.
  void close();
  // Keeps the loop alive or not (the main loop's does only while a drain waits for workers).
  void unref();
  void ref();
  uint64_t dropped() const { return dropped_.load(std::memory_order_relaxed); }

 private:
  LoopMailbox() = default;
  void drain();

  UvHandle<uv_async_t> async_;
  std::mutex mu_;
  std::deque<std::pair<std::function<void()>, bool>> queue_;
  size_t bounded_queued_ = 0;
  bool closed_ = false;
  std::atomic<uint64_t> dropped_{0};
};
using LoopMailboxPtr = std::shared_ptr<LoopMailbox>;

// A worker loop's view of the identity manager's certificates: the main loop pushes every new
// certificate (and every forgotten identity) here; connections read and wait on the worker loop.
class CertificateMirror : public CertificateSource {
 public:
  explicit CertificateMirror(uv_loop_t* loop);
  ~CertificateMirror() override;
  void set(const Identity& identity, CertificatePtr cert);

  CertificatePtr current(const Identity& identity) const override;
  WaitId waitFor(const Identity& identity, WaitCallback cb,
                 std::chrono::milliseconds timeout) override;
  void cancelWait(WaitId id) override;
  size_t pendingWaits() const override { return waiters_.size(); }
  void close() { timer_.close(); }

 private:
  struct Waiter {
    Identity identity;
    WaitCallback cb;
    uint64_t deadline_ms = 0;  // loop time
  };
  void arm();
  void onTimer();

  uv_loop_t* loop_;
  std::map<std::string, CertificatePtr> certs_;  // by identity
  std::map<WaitId, Waiter> waiters_;
  WaitId next_id_ = 1;
  UvHandle<uv_timer_t> timer_;
};

// What one loop reports for the admin and metrics endpoints (copied out on its own thread).
struct LoopSnapshot {
  unsigned loop = 0;
  ZtunnelStats stats;  // counters; gauges of its own: active_connections, hbone_pool_connections
  std::map<TcpLabels, TcpCounters> tcp;
  std::map<TcpLabels, uint64_t> tcp_failures;
  MeshTlsCounters mtls;
  nlohmann::json connections = nlohmann::json::array();
  size_t active_connections = 0;
  size_t certificate_waits = 0;
  // The loop thread's pooled (free) HBONE buffers (ztunnel/memory_trim.h).
  size_t pooled_cipher_bytes = 0;
  size_t pooled_chunk_bytes = 0;
  // Its VerdictLog's ring: a worker keeps none (capacity 0), it forwards to the main loop's.
  size_t verdict_capacity = 0;
  size_t verdicts_kept = 0;
};
// Counters of `from` added to `into` (not the gauges).
void addCounters(ZtunnelStats& into, const ZtunnelStats& from);

struct LoopWorkerOptions {
  unsigned index = 1;  // 1..count-1; loop 0 is the main loop
  unsigned count = 2;
  ListenerPorts ports;  // the DNS proxies stay on the main loop: dns is ignored
  std::chrono::milliseconds cert_wait{5000};
  uint64_t drain_timeout_ms = 5000;
  Balancer* balancer = nullptr;  // the main loop's, shareBetweenThreads()'d; null = its own
  // The idle trim of this loop's buffer pools, reporting to the main loop's; null = none.
  std::shared_ptr<MemoryActivity> memory;
  MemoryTrimOptions memory_trim;
};

// What a worker sends to the main loop (through the main loop's mailbox, bounded).
struct LoopWorkerSinks {
  LoopMailboxPtr main;
  std::function<void(AccessLogRecord)> access_log;  // run on the main loop
  std::function<void(VerdictEvent)> verdict;
  FastPath::ConsiderForwarder fast_path;
};

class LoopWorker {
 public:
  LoopWorker(LoopWorkerOptions options, LoopWorkerSinks sinks);
  ~LoopWorker();  // stops and joins
  LoopWorker(const LoopWorker&) = delete;
  LoopWorker& operator=(const LoopWorker&) = delete;

  // Starts the thread and waits until its loop runs.
  Status start();
  unsigned index() const { return options_.index; }

  // --- From the main loop. The synchronous ones wait at most kSyncTimeout for the worker. ---
  static constexpr std::chrono::milliseconds kSyncTimeout{5000};
  Status setState(ClusterStatePtr state);
  Status setDomains(const std::string& cluster_domain, const std::string& trust_domain);
  Status addPod(const WorkloadInfo& info, UniqueFd netns);
  Status removePod(const std::string& uid);
  Status retainOnly(const std::set<std::string>& uids);
  void setCertificate(const Identity& identity, CertificatePtr cert);  // async
  Status setDestinationHookForTest(Proxy::DestinationHook hook);
  std::optional<LoopSnapshot> snapshot();
  nlohmann::json localWorkloadsJson();
  // Closes the listeners, lets connections finish for up to the drain timeout, cuts the rest,
  // then runs `done` on the main loop.
  void drain(std::function<void()> done);
  // Ends every connection and handle, stops the loop and joins the thread.
  void stop();

  // Runs `fn` on the worker loop and waits for its result (bounded by kSyncTimeout).
  template <typename T>
  std::optional<T> call(std::function<T()> fn);

 private:
  void run();
  void teardown();  // on the worker thread

  LoopWorkerOptions options_;
  LoopWorkerSinks sinks_;
  std::thread thread_;
  LoopMailboxPtr inbox_;
  bool started_ = false;
  bool stopped_ = false;
  // Worker-thread state (touched only on the worker thread once it runs).
  uv_loop_t loop_{};
  std::unique_ptr<Proxy> proxy_;
  std::unique_ptr<CertificateMirror> certs_;
  std::unique_ptr<MeshTls> mesh_tls_;
  std::unique_ptr<FastPath> fast_path_;
  std::unique_ptr<LocalWorkloads> workloads_;
  std::unique_ptr<UvHandle<uv_timer_t>> drain_timer_;
  std::function<void()> drain_done_;
  std::unique_ptr<LoopMemory> memory_;
};

template <typename T>
std::optional<T> LoopWorker::call(std::function<T()> fn) {
  struct Sync {
    std::mutex mu;
    std::condition_variable cv;
    std::optional<T> result;
  };
  auto sync = std::make_shared<Sync>();
  // The closure owns what it touches: after a timeout it may still run, harmlessly.
  bool posted = inbox_ && inbox_->post([sync, fn = std::move(fn)] {
    T r = fn();
    std::lock_guard<std::mutex> lk(sync->mu);
    sync->result = std::move(r);
    sync->cv.notify_all();
  });
  if (!posted) return std::nullopt;
  std::unique_lock<std::mutex> lk(sync->mu);
  sync->cv.wait_for(lk, kSyncTimeout, [&] { return sync->result.has_value(); });
  return std::move(sync->result);
}

}  // namespace weft::ztunnel
