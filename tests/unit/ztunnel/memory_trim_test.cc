// The idle memory trim (ztunnel/memory_trim.h): a loop's HBONE buffer pools are freed after the
// idle period and kept while in use; the heap trim runs only when quiet and something was freed;
// the live-connection set shrinks after a burst.
#include "ztunnel/memory_trim.h"

#include <gtest/gtest.h>
#include <uv.h>

#include <chrono>
#include <thread>

#include "ztunnel/hbone/buffer_pools.h"
#include "ztunnel/ztunnel.h"

namespace weft::ztunnel {
namespace {

using hbone::Chunk;
using hbone::ChunkPool;
using hbone::CipherBufferPool;
using std::chrono::milliseconds;

// The pools are thread_local: each test body runs on a fresh thread, as a loop thread would,
// so what other tests left in this thread's pools does not count.
template <typename Fn>
void onFreshThread(Fn fn) {
  std::thread t(fn);
  t.join();
}

// Puts `cipher` ciphertext buffers and `chunks` chunks into this thread's pools, the way the
// TLS stream and the tunnels do: taken, used, given back.
void fillPools(size_t cipher, size_t chunks) {
  std::vector<std::vector<char>> bufs;
  for (size_t i = 0; i < cipher; ++i) bufs.push_back(CipherBufferPool::local().take());
  for (auto& b : bufs) CipherBufferPool::local().give(std::move(b));
  std::vector<Chunk> cs;
  for (size_t i = 0; i < chunks; ++i) cs.push_back(ChunkPool::local().take());
  for (auto& c : cs) ChunkPool::local().give(std::move(c));
}

// One buffer taken and given back: what a loop with traffic does between two looks.
void useOnce() {
  CipherBufferPool::local().give(CipherBufferPool::local().take());
  ChunkPool::local().give(ChunkPool::local().take());
}

MemoryTrimOptions fastOptions() {
  MemoryTrimOptions o;
  o.pool_idle = milliseconds(100);
  o.tick = milliseconds(10);
  o.trim_interval = milliseconds(50);
  o.quiet = milliseconds(20);
  o.ended_connections = 10;
  o.free_growth_bytes = 0;  // the free-heap look has its own test (with free bytes injected)
  return o;
}

TEST(BufferPools, ReleaseFreesWhatIsPooledOnly) {
  onFreshThread([] {
    fillPools(3, 5);
    hbone::BufferPoolUsage u = hbone::localBufferPoolUsage();
    EXPECT_EQ(u.cipher_bytes, 3 * CipherBufferPool::kBytes);
    EXPECT_EQ(u.chunk_bytes, 5 * Chunk::kBytes);
    EXPECT_EQ(u.takes, 8u);
    // A buffer in use stays with its user.
    std::vector<char> held = CipherBufferPool::local().take();
    Chunk chunk = ChunkPool::local().take();
    EXPECT_EQ(hbone::releaseLocalBufferPools(),
              2 * CipherBufferPool::kBytes + 4 * Chunk::kBytes);
    EXPECT_EQ(hbone::localBufferPoolUsage().pooledBytes(), 0u);
    EXPECT_GE(held.capacity(), CipherBufferPool::kBytes);
    ASSERT_TRUE(chunk.data);
    chunk.data[Chunk::kBytes - 1] = 1;
    // The pools work as before after a release.
    CipherBufferPool::local().give(std::move(held));
    ChunkPool::local().give(std::move(chunk));
    EXPECT_EQ(hbone::localBufferPoolUsage().pooledBytes(),
              CipherBufferPool::kBytes + Chunk::kBytes);
  });
}

TEST(LoopMemory, FreesPoolsAfterTheIdlePeriodAndKeepsThemWhileInUse) {
  onFreshThread([] {
    MemoryActivity activity;
    MemoryTrimOptions o = fastOptions();  // 100 ms idle period, a look every 10 ms
    LoopMemory m(nullptr, o, &activity, nullptr, false);
    fillPools(2, 3);
    size_t pooled = hbone::localBufferPoolUsage().pooledBytes();
    ASSERT_GT(pooled, 0u);
    // In use: every buffer taken between every two looks, for ten idle periods.
    uint64_t now = 1000;
    m.tick(now);
    for (int i = 0; i < 100; ++i) {
      fillPools(2, 3);
      m.tick(now += 10);
    }
    EXPECT_EQ(hbone::localBufferPoolUsage().pooledBytes(), pooled);
    EXPECT_EQ(activity.poolReleases(), 0u);
    // Unused for nine looks (90 ms): still kept.
    for (int i = 0; i < 9; ++i) m.tick(now += 10);
    EXPECT_EQ(hbone::localBufferPoolUsage().pooledBytes(), pooled);
    // Unused through a whole idle period: freed, counted once.
    m.tick(now += 10);
    EXPECT_EQ(hbone::localBufferPoolUsage().pooledBytes(), 0u);
    EXPECT_EQ(activity.poolReleases(), 1u);
    EXPECT_EQ(activity.releasedBytes(), pooled);
    for (int i = 0; i < 30; ++i) m.tick(now += 10);
    EXPECT_EQ(activity.poolReleases(), 1u);  // nothing more to free
    EXPECT_EQ(activity.lastBusyMs(), 0u);    // no connection began
  });
}

// A light steady use (an HBONE PING every few looks takes one ciphertext buffer) keeps what
// it needs; the rest of the pools goes.
TEST(LoopMemory, KeepsWhatALightUseNeedsAndFreesTheRest) {
  onFreshThread([] {
    MemoryActivity activity;
    LoopMemory m(nullptr, fastOptions(), &activity, nullptr, false);
    fillPools(4, 6);
    uint64_t now = 1000;
    m.tick(now);
    for (int i = 0; i < 50; ++i) {
      if (i % 3 == 0) CipherBufferPool::local().give(CipherBufferPool::local().take());
      m.tick(now += 10);
    }
    hbone::BufferPoolUsage u = hbone::localBufferPoolUsage();
    EXPECT_EQ(u.cipher_bytes, CipherBufferPool::kBytes);
    EXPECT_EQ(u.chunk_bytes, 0u);
    EXPECT_EQ(activity.releasedBytes(), 3 * CipherBufferPool::kBytes + 6 * Chunk::kBytes);
  });
}

TEST(LoopMemory, ZeroIdlePeriodNeverFrees) {
  onFreshThread([] {
    MemoryActivity activity;
    MemoryTrimOptions o = fastOptions();
    o.pool_idle = milliseconds(0);
    LoopMemory m(nullptr, o, &activity, nullptr, false);
    fillPools(1, 1);
    m.tick(0);
    m.tick(1'000'000);
    EXPECT_GT(hbone::localBufferPoolUsage().pooledBytes(), 0u);
    EXPECT_EQ(activity.poolReleases(), 0u);
  });
}

TEST(LoopMemory, HeapTrimOnlyWhenQuietAndSomethingWasFreed) {
  onFreshThread([] {
    MemoryActivity activity;
    MemoryTrimOptions o = fastOptions();
    LoopMemory::ConnectionCounts counts;
    int trims = 0;
    LoopMemory m(nullptr, o, &activity, [&counts] { return counts; }, true, [&trims] { trims++; });
    uint64_t now = 1000;
    m.tick(now);
    // Nothing freed, no connection ended: no trim.
    for (int i = 0; i < 10; ++i) m.tick(now += 10);
    EXPECT_EQ(trims, 0);
    // A few connections ended (below the threshold): still none.
    counts.begun = 5;
    counts.ended = 5;
    m.tick(now += 10);
    for (int i = 0; i < 10; ++i) m.tick(now += 10);
    EXPECT_EQ(trims, 0);
    // Many connections begin and end: busy while they begin, one trim once quiet.
    for (int i = 0; i < 5; ++i) {
      counts.begun += 10;
      counts.ended += 10;
      m.tick(now += 10);
      EXPECT_EQ(trims, 0) << "trimmed while connections were being opened";
    }
    m.tick(now += 10);  // 10 ms quiet: not yet (quiet is 20 ms)
    EXPECT_EQ(trims, 0);
    m.tick(now += 10);
    EXPECT_EQ(trims, 1);
    EXPECT_EQ(activity.trims(), 1u);
    EXPECT_EQ(activity.ended(), 55u);
    // Nothing new since: no second trim however long it stays quiet.
    for (int i = 0; i < 20; ++i) m.tick(now += 10);
    EXPECT_EQ(trims, 1);
    // Pools released on a loop (this one): a trim once they are freed (after the idle period).
    fillPools(1, 0);
    for (int i = 0; i < 20 && trims == 1; ++i) m.tick(now += 10);
    EXPECT_EQ(activity.poolReleases(), 1u);
    EXPECT_EQ(trims, 2);
    // Straight after: more connections end, but the interval since that trim has not passed.
    counts.ended += 100;
    m.tick(now += 10);
    EXPECT_EQ(trims, 2);
    for (int i = 0; i < 10; ++i) m.tick(now += 10);
    EXPECT_EQ(trims, 3);
  });
}

// Memory freed after the trim its burst caused (nothing announces it: no pool release, no
// ended connections): the free heap's growth, looked at once per interval while quiet, trims.
TEST(LoopMemory, HeapTrimWhenTheFreeHeapGrewSinceTheLastTrim) {
  onFreshThread([] {
    MemoryActivity activity;
    MemoryTrimOptions o = fastOptions();  // trim_interval 50 ms, quiet 20 ms
    o.free_growth_bytes = 1000;
    LoopMemory::ConnectionCounts counts;
    int trims = 0, looks = 0;
    size_t free_bytes = 500;
    LoopMemory m(
        nullptr, o, &activity, [&counts] { return counts; }, true, [&trims] { trims++; },
        [&] {
          looks++;
          return free_bytes;
        });
    uint64_t now = 1000;
    m.tick(now);
    for (int i = 0; i < 10; ++i) m.tick(now += 10);
    EXPECT_EQ(trims, 0) << "500 free bytes are below the growth that trims";
    EXPECT_LE(looks, 3) << "looked more often than once per interval";
    // 10000 connections end: one trim once quiet (announced by the ended count).
    counts.begun = counts.ended = 10000;
    m.tick(now += 10);
    m.tick(now += 30);
    ASSERT_EQ(trims, 1);
    // Later frees, nothing announced: trimmed at the next look.
    free_bytes = 500 + 1500;
    for (int i = 0; i < 10; ++i) m.tick(now += 10);
    EXPECT_EQ(trims, 2);
    // Free bytes reused and freed again by less than the growth: no trim.
    free_bytes = 1200;
    for (int i = 0; i < 10; ++i) m.tick(now += 10);
    free_bytes = 2100;
    for (int i = 0; i < 10; ++i) m.tick(now += 10);
    EXPECT_EQ(trims, 2) << "900 bytes more than the low point is below the growth";
    free_bytes = 2300;
    for (int i = 0; i < 10; ++i) m.tick(now += 10);
    EXPECT_EQ(trims, 3);
    // Not while connections are being opened.
    free_bytes = 9000;
    for (int i = 0; i < 10; ++i) {
      counts.begun += 1;
      m.tick(now += 10);
    }
    EXPECT_EQ(trims, 3) << "trimmed while connections were being opened";
    // Switched off: never looks.
    MemoryTrimOptions off = fastOptions();
    int off_looks = 0;
    LoopMemory m2(
        nullptr, off, &activity, [] { return LoopMemory::ConnectionCounts{}; }, true, [] {},
        [&off_looks] {
          off_looks++;
          return size_t{1} << 30;
        });
    for (int i = 0; i < 20; ++i) m2.tick(now += 10);
    EXPECT_EQ(off_looks, 0);
  });
}

TEST(LoopMemory, TimerOnARealLoopFreesAndDoesNotKeepTheLoopAlive) {
  onFreshThread([] {
    uv_loop_t loop;
    ASSERT_EQ(uv_loop_init(&loop), 0);
    MemoryActivity activity;
    MemoryTrimOptions o = fastOptions();
    int trims = 0;
    auto m = std::make_unique<LoopMemory>(&loop, o, &activity, nullptr, true,
                                          [&trims] { trims++; });
    ASSERT_TRUE(m->start());
    // Unref'd: with nothing else on the loop, run returns at once.
    EXPECT_EQ(uv_run(&loop, UV_RUN_DEFAULT), 0);
    fillPools(4, 4);
    // A referenced timer keeps the loop turning; bounded by a 10 s deadline.
    uv_timer_t poll;
    ASSERT_EQ(uv_timer_init(&loop, &poll), 0);
    struct Ctx {
      MemoryActivity* activity;
      int* trims;
      uint64_t deadline;
    } ctx{&activity, &trims, uv_now(&loop) + 10'000};
    poll.data = &ctx;
    ASSERT_EQ(uv_timer_start(
                  &poll,
                  [](uv_timer_t* t) {
                    auto* c = static_cast<Ctx*>(t->data);
                    bool done = c->activity->poolReleases() > 0 && *c->trims > 0;
                    if (done || uv_now(t->loop) > c->deadline) uv_stop(t->loop);
                  },
                  10, 10),
              0);
    uv_run(&loop, UV_RUN_DEFAULT);
    EXPECT_EQ(hbone::localBufferPoolUsage().pooledBytes(), 0u);
    EXPECT_EQ(activity.poolReleases(), 1u);
    EXPECT_EQ(activity.releasedBytes(), 4 * CipherBufferPool::kBytes + 4 * Chunk::kBytes);
    EXPECT_GE(trims, 1);
    uv_close(reinterpret_cast<uv_handle_t*>(&poll), nullptr);
    m.reset();
    uv_run(&loop, UV_RUN_DEFAULT);
    EXPECT_EQ(uv_loop_close(&loop), 0);
  });
}

// /metrics carries the trim counters and the pooled bytes of every loop (the main loop's here:
// the test thread is its loop thread; the worker's pools are empty without traffic).
TEST(LoopMemory, MetricsShowTheTrimsAndThePooledBytes) {
  onFreshThread([] {
    uv_loop_t loop;
    ASSERT_EQ(uv_loop_init(&loop), 0);
    {
      ZtunnelOptions o;
      o.agent_socket = "/nonexistent/weft-test.sock";
      o.loops = 2;
      Ztunnel zt(&loop, o);
      ASSERT_TRUE(zt.startLoops());
      fillPools(1, 2);
      std::string body = zt.handleMetrics({"GET", "/metrics", "", ""}).body;
      EXPECT_NE(body.find("# TYPE weft_ztunnel_memory_trims_total counter\n"
                          "weft_ztunnel_memory_trims_total 0\n"),
                std::string::npos)
          << body;
      EXPECT_NE(body.find("weft_ztunnel_memory_pooled_bytes{pool=\"ciphertext\"} " +
                          std::to_string(CipherBufferPool::kBytes) + "\n"),
                std::string::npos);
      EXPECT_NE(body.find("weft_ztunnel_memory_pooled_bytes{pool=\"chunk\"} " +
                          std::to_string(2 * Chunk::kBytes) + "\n"),
                std::string::npos);
      EXPECT_NE(body.find("# TYPE weft_ztunnel_memory_pool_releases_total counter"),
                std::string::npos);
      auto dump = nlohmann::json::parse(zt.handleAdmin({"GET", "/config_dump", "", ""}).body);
      EXPECT_EQ(dump["memory"]["trims"], 0);
      EXPECT_EQ(dump["memory"]["buffer_idle_ms"], 10'000);
      ASSERT_EQ(dump["loops"].size(), 2u);
      EXPECT_EQ(dump["loops"][0]["pooled_buffer_bytes"],
                CipherBufferPool::kBytes + 2 * Chunk::kBytes);
      EXPECT_EQ(dump["loops"][1]["pooled_buffer_bytes"], 0);
      zt.shutdown();
      uv_run(&loop, UV_RUN_DEFAULT);
    }
    uv_run(&loop, UV_RUN_DEFAULT);
    EXPECT_EQ(uv_loop_close(&loop), 0);
  });
}

// The live-connection set gives back the bucket array a burst grew once the burst is over,
// and keeps a small one. (track/untrack only hash the pointers: stand-ins are enough.)
TEST(ProxyConnections, BucketsShrinkAfterABurst) {
  uv_loop_t loop;
  ASSERT_EQ(uv_loop_init(&loop), 0);
  {
    Proxy proxy(&loop);
    auto conn = [](size_t i) { return reinterpret_cast<ProxyConnection*>(64 * (i + 1)); };
    for (size_t i = 0; i < 10000; ++i) proxy.track(conn(i));
    EXPECT_EQ(proxy.activeConnections(), 10000u);
    size_t grown = proxy.connectionBuckets();
    EXPECT_GE(grown, 10000u);
    for (size_t i = 0; i < 9990; ++i) proxy.untrack(conn(i));
    EXPECT_EQ(proxy.activeConnections(), 10u);
    EXPECT_LE(proxy.connectionBuckets(), Proxy::kKeptConnectionBuckets) << "kept " << grown;
    for (size_t i = 9990; i < 10000; ++i) proxy.untrack(conn(i));
    EXPECT_EQ(proxy.connectionsEnded(), 10000u);
    // Growing again works as before.
    for (size_t i = 0; i < 3000; ++i) proxy.track(conn(i));
    EXPECT_EQ(proxy.activeConnections(), 3000u);
    for (size_t i = 0; i < 3000; ++i) proxy.untrack(conn(i));
    EXPECT_EQ(proxy.activeConnections(), 0u);
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  EXPECT_EQ(uv_loop_close(&loop), 0);
}

}  // namespace
}  // namespace weft::ztunnel
