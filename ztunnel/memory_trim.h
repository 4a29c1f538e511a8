// Giving memory back after a burst (ARCHITECTURE "ztunnel memory"): each loop frees its HBONE
// buffer pools on its own thread once they went unused for a while, and the main loop returns
// free heap pages to the kernel (malloc_trim) when something was freed and the node is quiet.
#pragma once

#include <uv.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <string>

#include "common/status.h"
#include "common/uv_handle.h"

namespace weft::ztunnel {

struct MemoryTrimOptions {
  // A loop frees the pooled buffers that no take needed for this long (0: never): those that
  // stayed free through every tick of the period. Not "no take at all": each pooled HBONE
  // connection writes a PING every 10 s, which takes a ciphertext buffer, so a node with peers
  // is never without takes; what its pings need (one buffer) stays. 10 s: far longer than any
  // gap inside a transfer or between a client's requests (a pool freed and refilled costs page
  // faults on the data path again), short enough that a node is back to its idle size soon
  // after a burst.
  std::chrono::milliseconds pool_idle{10'000};
  // How often each loop looks (one timer per loop; the data path only counts takes).
  std::chrono::milliseconds tick{1'000};
  // malloc_trim at most this often (it locks and walks every arena: a few ms on a heap of
  // hundreds of MiB; ARCHITECTURE "ztunnel memory" has the measured cost).
  std::chrono::milliseconds trim_interval{5'000};
  // ... and only when no loop saw a new connection within this long.
  std::chrono::milliseconds quiet{1'000};
  // ... and only when some pool was freed or at least this many connections ended since the
  // last trim (what a closed connection leaves is free heap, not pooled buffers).
  uint64_t ended_connections = 64;
  // ... or, looked at no more often than trim_interval while quiet, when the heap's free bytes
  // (mallinfo2 fordblks) grew by this much since the last trim: memory freed late, after the
  // trim its burst caused (0: no such look). 1 MiB: well above what a quiet node's own work
  // frees between two looks.
  size_t free_growth_bytes = 1u << 20;
};

// What every loop tells the main loop's trim, and the counters for /metrics. Shared between the
// loop threads: atomics, written once per tick, never on the data path.
class MemoryActivity {
 public:
  void noteBusy(uint64_t now_ms);  // a loop saw a new connection (loop clock, ms)
  void addEnded(uint64_t n) { ended_.fetch_add(n, std::memory_order_relaxed); }
  void addRelease(size_t bytes);
  void addTrim(uint64_t micros);

  uint64_t lastBusyMs() const { return last_busy_ms_.load(std::memory_order_relaxed); }
  uint64_t ended() const { return ended_.load(std::memory_order_relaxed); }
  uint64_t poolReleases() const { return pool_releases_.load(std::memory_order_relaxed); }
  uint64_t releasedBytes() const { return released_bytes_.load(std::memory_order_relaxed); }
  uint64_t trims() const { return trims_.load(std::memory_order_relaxed); }
  uint64_t trimMicrosTotal() const { return trim_us_total_.load(std::memory_order_relaxed); }
  uint64_t lastTrimMicros() const { return last_trim_us_.load(std::memory_order_relaxed); }

 private:
  std::atomic<uint64_t> last_busy_ms_{0};
  std::atomic<uint64_t> ended_{0};
  std::atomic<uint64_t> pool_releases_{0};
  std::atomic<uint64_t> released_bytes_{0};
  std::atomic<uint64_t> trims_{0};
  std::atomic<uint64_t> trim_us_total_{0};
  std::atomic<uint64_t> last_trim_us_{0};
};

// One per loop, on that loop's thread: a repeating unref'd timer that frees the thread's pooled
// buffers no take needed for `pool_idle`; the main loop's (trims_heap) also decides the
// malloc_trim.
class LoopMemory {
 public:
  struct ConnectionCounts {
    uint64_t begun = 0;
    uint64_t ended = 0;
  };
  using CountsFn = std::function<ConnectionCounts()>;
  // The heap trim (default trimHeap; tests inject one that only counts).
  using TrimFn = std::function<void()>;
  // The heap's free bytes (default freeHeapBytes; tests inject their own).
  using FreeBytesFn = std::function<size_t()>;

  // `activity` must outlive this. `counts` reads this loop's connection counters.
  LoopMemory(uv_loop_t* loop, MemoryTrimOptions options, MemoryActivity* activity,
             CountsFn counts, bool trims_heap, TrimFn trim = nullptr,
             FreeBytesFn free_bytes = nullptr);
  ~LoopMemory();
  LoopMemory(const LoopMemory&) = delete;
  LoopMemory& operator=(const LoopMemory&) = delete;

  // Starts the timer (not at all when both the pool idle period and the trim are off).
  Status start();
  void close();

  // One look at `now_ms` (loop clock): the timer's callback; public so tests drive time.
  void tick(uint64_t now_ms);

  // This thread's pooled bytes (call on the loop's thread).
  static size_t pooledBytes();

 private:
  void maybeTrimHeap(uint64_t now_ms);

  uv_loop_t* loop_;
  MemoryTrimOptions options_;
  MemoryActivity* activity_;
  CountsFn counts_;
  bool trims_heap_;
  TrimFn trim_;
  FreeBytesFn free_bytes_;
  UvHandle<uv_timer_t> timer_;
  bool started_ = false;
  // This loop's last looks: per tick of the idle period, the fewest free buffers of each pool
  // (oldest first); what stayed free through all of them is freed.
  bool looked_ = false;
  std::deque<size_t> cipher_lows_;
  std::deque<size_t> chunk_lows_;
  ConnectionCounts counts_seen_;
  // Main loop: the activity at the last trim.
  uint64_t last_trim_ms_ = 0;
  bool trimmed_ = false;
  uint64_t released_at_trim_ = 0;
  uint64_t ended_at_trim_ = 0;
  size_t free_at_trim_ = 0;        // free heap bytes right after the last trim
  uint64_t last_free_look_ms_ = 0;  // when they were last looked at
};

// The process's heap trim: malloc_trim(0) (glibc: every arena's free pages, MADV_DONTNEED).
void trimHeap();
// Free bytes in the heap's arenas (mallinfo2().fordblks): what a trim could give back, and what
// trimmed pages still count (they stay free chunks).
size_t freeHeapBytes();

}  // namespace weft::ztunnel
