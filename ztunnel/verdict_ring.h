// The storage behind VerdictLog: the newest verdict events packed into fixed-size slots of one
// array allocated once, so recording an event allocates nothing (ARCHITECTURE "Verdicts").
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/address.h"

namespace weft::ztunnel {

struct VerdictEvent;

// A ring of the last `capacity` events. Each slot holds the fixed fields (seq, time,
// addresses) and the strings and outcome packed back to back in an inline area; an event whose
// packed form does not fit (many AUDIT hits, very long names) keeps it in one heap block owned
// by its slot until the slot is overwritten. Why not a deque of VerdictEvent: that is one heap
// node plus several strings per event, allocated among the connections' own objects during a
// burst and alive long after them; the newest 4096 such events pinned heap pages all over the
// heap that malloc_trim could not return.
class VerdictRing {
 public:
  static constexpr size_t kSlotBytes = 256;

  explicit VerdictRing(size_t capacity) : capacity_(capacity) {}

  // Stores `e` (seq and time_ms as set), dropping the oldest event when full. The slot array is
  // allocated on the first push, whole (its pages are touched only as slots fill).
  void push(const VerdictEvent& e);
  // Keeps the newest min(size, capacity) events in a new array; 0 frees it.
  void setCapacity(size_t capacity);

  size_t capacity() const { return capacity_; }
  size_t size() const { return slots_.size(); }
  // i = 0 is the oldest event held.
  uint64_t seqAt(size_t i) const { return slot(i).h.seq; }
  VerdictEvent eventAt(size_t i) const;
  // Slots whose packed event is in a heap block of its own (tests; 0 for the events a mesh
  // normally sees: names of tens of bytes, a few AUDIT hits at most).
  size_t spilled() const;

 private:
  struct SlotHeader {
    uint64_t seq = 0;
    int64_t time_ms = 0;
    SocketAddress source;
    SocketAddress destination;
    IpAddr remote_ip;
    uint32_t packed_bytes = 0;      // the packed strings and outcome, in `packed` or `spill`
    std::unique_ptr<char[]> spill;  // set when packed_bytes > sizeof(Slot::packed)
  };
  struct Slot {
    SlotHeader h;
    char packed[kSlotBytes - sizeof(SlotHeader)];
  };

  const Slot& slot(size_t i) const { return slots_[(first_ + i) % slots_.size()]; }
  static void fill(Slot& s, const VerdictEvent& e);

  size_t capacity_;
  // Never reallocated while in use: reserve(capacity_) once, then emplace_back until full and
  // overwrite in place after that.
  std::vector<Slot> slots_;
  size_t first_ = 0;  // index of the oldest slot once the ring is full
};

}  // namespace weft::ztunnel
