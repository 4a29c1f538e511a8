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

// The free list behind both HBONE buffer pools (chunks here, ciphertext buffers in
// buffer_pools.h), with what the idle trim (ztunnel/memory_trim.h) reads and frees: the takes and
// the fewest free buffers since its last look.
template <typename Buffer>
class FreeList {
 public:
  // The newest free buffer, or an empty one (the caller allocates).
  Buffer take() {
    takes_++;  // the idle trim's only cost on the data path (one per buffer)
    Buffer b{};
    if (!free_.empty()) {
      b = std::move(free_.back());
      free_.pop_back();
    }
    low_ = std::min(low_, free_.size());
    return b;
  }
  void put(Buffer&& b) { free_.push_back(std::move(b)); }
  size_t size() const { return free_.size(); }
  const std::vector<Buffer>& buffers() const { return free_; }
  uint64_t takes() const { return takes_; }
  // The fewest free buffers since the last call (so many no take needed), then starts over.
  size_t lowWaterAndReset() {
    size_t low = low_;
    low_ = free_.size();
    return low;
  }
  // Frees up to n pooled buffers (buffers in use are not the pool's); returns the bytes freed,
  // bytesOf(buffer) each.
  template <typename BytesOf>
  size_t release(size_t n, BytesOf bytesOf) {
    size_t bytes = 0;
    for (; n > 0 && !free_.empty(); --n) {
      bytes += bytesOf(free_.back());
      free_.pop_back();
    }
    if (free_.empty()) std::vector<Buffer>().swap(free_);
    low_ = std::min(low_, free_.size());
    return bytes;
  }

 private:
  std::vector<Buffer> free_;
  uint64_t takes_ = 0;
  size_t low_ = 0;  // fewest free since lowWaterAndReset()
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
    Chunk c;
    c.data = free_.take();
    if (!c.data) c.data.reset(new uint8_t[Chunk::kBytes]);
    return c;
  }
  void give(Chunk&& c) {
    if (c.data && free_.size() < kKeep) free_.put(std::move(c.data));
    c.data.reset();
  }
  size_t freeChunks() const { return free_.size(); }
  size_t pooledBytes() const { return free_.size() * Chunk::kBytes; }
  uint64_t takes() const { return free_.takes(); }
  size_t lowWaterAndReset() { return free_.lowWaterAndReset(); }
  size_t release(size_t n = SIZE_MAX) {
    return free_.release(n, [](const std::unique_ptr<uint8_t[]>&) { return Chunk::kBytes; });
  }

 private:
  FreeList<std::unique_ptr<uint8_t[]>> free_;
};

}  // namespace weft::hbone
