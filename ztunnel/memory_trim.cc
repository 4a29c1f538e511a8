// The idle trim of the loops' HBONE buffer pools and the main loop's conditional malloc_trim.
#include "ztunnel/memory_trim.h"

#include <malloc.h>
#include <spdlog/spdlog.h>

#include <algorithm>

#include "ztunnel/hbone/buffer_pools.h"

namespace weft::ztunnel {

void MemoryActivity::noteBusy(uint64_t now_ms) {
  // The latest of every loop's (their clocks are the same monotonic clock, read at different
  // moments).
  uint64_t seen = last_busy_ms_.load(std::memory_order_relaxed);
  while (seen < now_ms &&
         !last_busy_ms_.compare_exchange_weak(seen, now_ms, std::memory_order_relaxed)) {
  }
}

void MemoryActivity::addRelease(size_t bytes) {
  pool_releases_.fetch_add(1, std::memory_order_relaxed);
  released_bytes_.fetch_add(bytes, std::memory_order_relaxed);
}

void MemoryActivity::addTrim(uint64_t micros) {
  trims_.fetch_add(1, std::memory_order_relaxed);
  trim_us_total_.fetch_add(micros, std::memory_order_relaxed);
  last_trim_us_.store(micros, std::memory_order_relaxed);
}

void trimHeap() { malloc_trim(0); }

size_t freeHeapBytes() { return mallinfo2().fordblks; }

LoopMemory::LoopMemory(uv_loop_t* loop, MemoryTrimOptions options, MemoryActivity* activity,
                       CountsFn counts, bool trims_heap, TrimFn trim,
                       FreeBytesFn free_bytes)
    : loop_(loop),
      options_(options),
      activity_(activity),
      counts_(std::move(counts)),
      trims_heap_(trims_heap),
      trim_(trim ? std::move(trim) : TrimFn(trimHeap)),
      free_bytes_(free_bytes ? std::move(free_bytes) : FreeBytesFn(freeHeapBytes)) {}

LoopMemory::~LoopMemory() { close(); }

Status LoopMemory::start() {
  if (started_) return Status::ok();
  if (options_.pool_idle.count() <= 0 && !trims_heap_) return Status::ok();
  if (options_.tick.count() <= 0) return Status::error("memory trim: tick must be > 0");
  int rc = timer_.init(uv_timer_init(loop_, timer_.get()));
  if (rc != 0) return Status::errorf("memory trim: uv_timer_init: {}", uv_strerror(rc));
  timer_.get()->data = this;
  auto period = static_cast<uint64_t>(options_.tick.count());
  rc = uv_timer_start(
      timer_.get(),
      [](uv_timer_t* t) {
        auto* self = static_cast<LoopMemory*>(t->data);
        self->tick(uv_now(self->loop_));
      },
      period, period);
  if (rc != 0) {
    timer_.close();
    return Status::errorf("memory trim: uv_timer_start: {}", uv_strerror(rc));
  }
  // Never what keeps a loop alive.
  uv_unref(timer_.handle());
  started_ = true;
  return Status::ok();
}

void LoopMemory::close() {
  timer_.close();
  started_ = false;
}

size_t LoopMemory::pooledBytes() { return hbone::localBufferPoolUsage().pooledBytes(); }

namespace {

// Records this tick's low-water mark; once a whole idle period is recorded, frees the buffers
// that stayed free through all of it. Returns the bytes freed.
template <typename Pool>
size_t releaseUnused(Pool& pool, std::deque<size_t>& lows, size_t ticks) {
  lows.push_back(pool.lowWaterAndReset());
  if (lows.size() > ticks) lows.pop_front();
  if (lows.size() < ticks) return 0;
  size_t unused = *std::min_element(lows.begin(), lows.end());
  if (unused == 0) return 0;
  for (size_t& l : lows) l -= unused;
  return pool.release(unused);
}

}  // namespace

void LoopMemory::tick(uint64_t now_ms) {
  ConnectionCounts c = counts_ ? counts_() : ConnectionCounts{};
  if (!looked_) {
    looked_ = true;  // the first look is the baseline
  } else {
    if (c.begun != counts_seen_.begun) activity_->noteBusy(now_ms);
    if (c.ended > counts_seen_.ended) activity_->addEnded(c.ended - counts_seen_.ended);
  }
  counts_seen_ = c;
  if (options_.pool_idle.count() > 0) {
    auto ticks = static_cast<size_t>(
        std::max<int64_t>(1, (options_.pool_idle.count() + options_.tick.count() - 1) /
                                 std::max<int64_t>(1, options_.tick.count())));
    size_t freed = releaseUnused(hbone::CipherBufferPool::local(), cipher_lows_, ticks) +
                   releaseUnused(hbone::ChunkPool::local(), chunk_lows_, ticks);
    if (freed > 0) {
      activity_->addRelease(freed);
      spdlog::debug("buffer pools: freed {} KiB no take needed for {} ms", freed / 1024,
                    options_.pool_idle.count());
    }
  }
  if (trims_heap_) maybeTrimHeap(now_ms);
}

void LoopMemory::maybeTrimHeap(uint64_t now_ms) {
  if (trimmed_ && now_ms - last_trim_ms_ < static_cast<uint64_t>(options_.trim_interval.count()))
    return;
  // Off busy periods: a trim holds each arena's lock while it walks it.
  uint64_t busy = activity_->lastBusyMs();
  if (busy != 0 && now_ms < busy + static_cast<uint64_t>(options_.quiet.count())) return;
  uint64_t releases = activity_->poolReleases();
  uint64_t ended = activity_->ended();
  bool grew = false;
  if (releases == released_at_trim_ && ended - ended_at_trim_ < options_.ended_connections) {
    // Nothing announced: look whether memory was freed after the last trim anyway (a late
    // close, a spare HBONE connection's idle timeout), at most once per interval.
    if (options_.free_growth_bytes == 0 ||
        now_ms - last_free_look_ms_ < static_cast<uint64_t>(options_.trim_interval.count()))
      return;
    last_free_look_ms_ = now_ms;
    size_t free_now = free_bytes_();
    if (free_now < free_at_trim_ + options_.free_growth_bytes) {
      // Reused since (the free bytes shrank): measure growth from here.
      free_at_trim_ = std::min(free_at_trim_, free_now);
      return;
    }
    grew = true;
  }
  auto t0 = std::chrono::steady_clock::now();
  trim_();
  auto us = std::chrono::duration_cast<std::chrono::microseconds>(
                std::chrono::steady_clock::now() - t0)
                .count();
  activity_->addTrim(static_cast<uint64_t>(us));
  spdlog::debug("malloc_trim after {} pool releases and {} ended connections{}: {} us",
                releases - released_at_trim_, ended - ended_at_trim_,
                grew ? " (free heap grew)" : "", us);
  trimmed_ = true;
  last_trim_ms_ = now_ms;
  released_at_trim_ = releases;
  ended_at_trim_ = ended;
  if (options_.free_growth_bytes != 0) {
    free_at_trim_ = free_bytes_();
    last_free_look_ms_ = now_ms;
  }
}

}  // namespace weft::ztunnel
