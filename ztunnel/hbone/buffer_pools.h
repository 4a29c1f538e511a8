// The loop threads' pools of HBONE buffers (ciphertext buffers here, chunks in chunk_pool.h) and
// what the idle trim (ztunnel/memory_trim.h) reads and frees of them on their own thread.
#pragma once

#include <cstddef>
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "ztunnel/hbone/chunk_pool.h"

namespace weft::hbone {

// Ciphertext buffers of one size, recycled through the loop thread's free list: a vector grown
// record by record (reallocating, touching fresh pages) cost more than the encryption itself.
// At most kKeep are kept (4 MiB); a connection holds one only while it has ciphertext.
class CipherBufferPool {
 public:
  static constexpr size_t kBytes = 512 * 1024;  // one flush batch (256 KiB) + a DATA frame
  static constexpr size_t kKeep = 8;
  static CipherBufferPool& local() {
    static thread_local CipherBufferPool pool;
    return pool;
  }
  std::vector<char> take() {
    std::vector<char> v = free_.take();
    if (v.capacity() == 0) v.reserve(kBytes);  // none free (a pooled one has kBytes or more)
    return v;
  }
  void give(std::vector<char>&& v) {
    // One that outgrew the size (a burst before a flush) is freed, not kept.
    if (v.capacity() >= kBytes && v.capacity() <= 2 * kBytes && free_.size() < kKeep) {
      v.clear();
      free_.put(std::move(v));
    }
    std::vector<char>().swap(v);
  }
  size_t freeBuffers() const { return free_.size(); }
  size_t pooledBytes() const {
    size_t n = 0;
    for (const auto& v : free_.buffers()) n += v.capacity();
    return n;
  }
  uint64_t takes() const { return free_.takes(); }
  size_t lowWaterAndReset() { return free_.lowWaterAndReset(); }
  size_t release(size_t n = SIZE_MAX) {
    return free_.release(n, [](const std::vector<char>& v) { return v.capacity(); });
  }

 private:
  FreeList<std::vector<char>> free_;
};

// This thread's pools.
struct BufferPoolUsage {
  uint64_t takes = 0;          // buffers taken from either pool since the thread began
  size_t cipher_bytes = 0;     // pooled (free) ciphertext buffers
  size_t chunk_bytes = 0;      // pooled (free) chunks
  size_t pooledBytes() const { return cipher_bytes + chunk_bytes; }
};
inline BufferPoolUsage localBufferPoolUsage() {
  const CipherBufferPool& c = CipherBufferPool::local();
  const ChunkPool& k = ChunkPool::local();
  return {c.takes() + k.takes(), c.pooledBytes(), k.pooledBytes()};
}
// Frees all of this thread's pooled buffers; returns the bytes freed.
inline size_t releaseLocalBufferPools() {
  return CipherBufferPool::local().release() + ChunkPool::local().release();
}

}  // namespace weft::hbone
