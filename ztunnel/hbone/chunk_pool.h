// Fixed-size byte chunks for the tunnels' TCP -> HTTP/2 direction, recycled through a small
// per-loop-thread free list so a busy tunnel neither mallocs per read nor pins idle memory.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace weft::hbone {

// One chunk: bytes [begin, end) are read from TCP and not yet sent; the socket reads into
// [end, kBytes).
struct Chunk {
  static constexpr size_t kBytes = 256 * 1024;
  std::unique_ptr<uint8_t[]> data;
  size_t begin = 0;
  size_t end = 0;
  size_t room() const { return kBytes - end; }
  size_t size() const { return end - begin; }
};

// The loop thread's free chunks. Chunks are only touched on their loop thread, so the pool is
// thread_local and needs no lock. At most kKeep chunks are kept (8 MiB); the rest are freed.
// Freed chunks come back as fresh pages (page faults, the most expensive thing on this data
// path), so the pool covers several busy tunnels' bounds (each at most 4 chunks in use).
// Chunks no take needed for a while are freed (ztunnel/memory_trim.h): an idle node keeps none.
class ChunkPool {
 public:
  static constexpr size_t kKeep = 32;
  static ChunkPool& local() {
    static thread_local ChunkPool pool;
    return pool;
  }
  Chunk take() {
    takes_++;  // the idle trim's only cost on the data path (one per 256 KiB chunk)
    Chunk c;
    if (!free_.empty()) {
      c.data = std::move(free_.back());
      free_.pop_back();
    } else {
      c.data.reset(new uint8_t[Chunk::kBytes]);
    }
    if (free_.size() < low_) low_ = free_.size();
    return c;
  }
  void give(Chunk&& c) {
    if (c.data && free_.size() < kKeep) free_.push_back(std::move(c.data));
    c.data.reset();
  }
  size_t freeChunks() const { return free_.size(); }
  size_t pooledBytes() const { return free_.size() * Chunk::kBytes; }
  uint64_t takes() const { return takes_; }
  // The fewest free chunks since the last call (so many no take needed), then starts over.
  size_t lowWaterAndReset() {
    size_t low = low_;
    low_ = free_.size();
    return low;
  }
  // Frees up to n pooled chunks (chunks in use are not the pool's); returns the bytes freed.
  size_t release(size_t n = SIZE_MAX) {
    size_t bytes = 0;
    for (; n > 0 && !free_.empty(); --n) {
      bytes += Chunk::kBytes;
      free_.pop_back();
    }
    if (free_.empty()) std::vector<std::unique_ptr<uint8_t[]>>().swap(free_);
    low_ = std::min(low_, free_.size());
    return bytes;
  }

 private:
  std::vector<std::unique_ptr<uint8_t[]>> free_;
  uint64_t takes_ = 0;
  size_t low_ = 0;  // fewest free since lowWaterAndReset()
};

}  // namespace weft::hbone
