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
    takes_++;  // the idle trim's only cost on the data path (one per buffer)
    std::vector<char> v;
    if (!free_.empty()) {
      v = std::move(free_.back());
      free_.pop_back();
    } else {
      v.reserve(kBytes);
    }
    if (free_.size() < low_) low_ = free_.size();
    return v;
  }
  void give(std::vector<char>&& v) {
    // One that outgrew the size (a burst before a flush) is freed, not kept.
    if (v.capacity() >= kBytes && v.capacity() <= 2 * kBytes && free_.size() < kKeep) {
      v.clear();
      free_.push_back(std::move(v));
    }
    std::vector<char>().swap(v);
  }
  size_t freeBuffers() const { return free_.size(); }
  size_t pooledBytes() const {
    size_t n = 0;
    for (const auto& v : free_) n += v.capacity();
    return n;
  }
  uint64_t takes() const { return takes_; }
  // The fewest free buffers since the last call (so many no take needed), then starts over.
  size_t lowWaterAndReset() {
    size_t low = low_;
    low_ = free_.size();
    return low;
  }
  // Frees up to n pooled buffers (buffers in use are not the pool's); returns the bytes freed.
  size_t release(size_t n = SIZE_MAX) {
    size_t bytes = 0;
    for (; n > 0 && !free_.empty(); --n) {
      bytes += free_.back().capacity();
      free_.pop_back();
    }
    if (free_.empty()) std::vector<std::vector<char>>().swap(free_);
    low_ = std::min(low_, free_.size());
    return bytes;
  }

 private:
  std::vector<std::vector<char>> free_;
  uint64_t takes_ = 0;
  size_t low_ = 0;
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
