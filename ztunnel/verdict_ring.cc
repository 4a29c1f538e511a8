// Packing verdict events into the ring's fixed-size slots and reading them back.
#include "ztunnel/verdict_ring.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#include "ztunnel/verdicts.h"

namespace weft::ztunnel {
namespace {

// The packed part of an event, in this order: path, source principal, source namespace,
// source workload, destination workload, the outcome, a dry-run flag and (if set) the dry-run
// outcome. An outcome: allowed, reason, deciding policy and rule, AUDIT hit count, then each
// hit's policy and rule. Lengths and counts take one byte below 255, else 0xff and four bytes.
// Host byte order: the bytes never leave this process.
class Packer {
 public:
  explicit Packer(char* out) : out_(out) {}  // null: only count
  size_t size() const { return n_; }

  void event(const VerdictEvent& e) {
    str(e.path);
    str(e.source_principal);
    str(e.source_namespace);
    str(e.source_workload);
    str(e.destination_workload);
    outcome(e.verdict);
    u8(e.verdict.dry_run ? 1 : 0);
    if (e.verdict.dry_run) outcome(*e.verdict.dry_run);
  }

 private:
  void outcome(const PolicyOutcome& o) {
    u8(o.allowed ? 1 : 0);
    u8(static_cast<uint8_t>(o.reason));
    hit(o.decided_by);
    length(o.audit.size());
    for (const PolicyHit& h : o.audit) hit(h);
  }
  void hit(const PolicyHit& h) {
    str(h.policy);
    int32_t rule = h.rule;
    bytes(&rule, sizeof(rule));
  }
  void str(const std::string& s) {
    length(s.size());
    bytes(s.data(), s.size());
  }
  void length(size_t n) {
    if (n < 0xff) return u8(static_cast<uint8_t>(n));
    u8(0xff);
    uint32_t wide = static_cast<uint32_t>(n);
    bytes(&wide, sizeof(wide));
  }
  void u8(uint8_t v) { bytes(&v, 1); }
  void bytes(const void* p, size_t len) {
    if (out_ != nullptr && len > 0) std::memcpy(out_ + n_, p, len);
    n_ += len;
  }

  char* out_;
  size_t n_ = 0;
};

// Reads what Packer wrote. The bytes are this process's own, so a short or malformed record
// is a bug: it aborts loudly rather than serve a wrong event.
class Unpacker {
 public:
  Unpacker(const char* p, size_t len) : p_(p), left_(len) {}

  void event(VerdictEvent& e) {
    e.path = str();
    e.source_principal = str();
    e.source_namespace = str();
    e.source_workload = str();
    e.destination_workload = str();
    outcome(e.verdict);
    if (u8() != 0) outcome(e.verdict.dry_run.emplace());
    if (left_ != 0) corrupt();
  }

 private:
  void outcome(PolicyOutcome& o) {
    o.allowed = u8() != 0;
    o.reason = static_cast<VerdictReason>(u8());
    o.decided_by = hit();
    size_t n = length();
    o.audit.reserve(n);
    for (size_t i = 0; i < n; i++) o.audit.push_back(hit());
  }
  PolicyHit hit() {
    PolicyHit h;
    h.policy = str();
    int32_t rule = 0;
    bytes(&rule, sizeof(rule));
    h.rule = rule;
    return h;
  }
  std::string str() {
    size_t n = length();
    if (n > left_) corrupt();
    std::string s(p_, n);
    p_ += n;
    left_ -= n;
    return s;
  }
  size_t length() {
    uint8_t n = u8();
    if (n < 0xff) return n;
    uint32_t wide = 0;
    bytes(&wide, sizeof(wide));
    return wide;
  }
  uint8_t u8() {
    uint8_t v = 0;
    bytes(&v, 1);
    return v;
  }
  void bytes(void* out, size_t len) {
    if (len > left_) corrupt();
    std::memcpy(out, p_, len);
    p_ += len;
    left_ -= len;
  }
  [[noreturn]] static void corrupt() {
    spdlog::critical("verdict ring: a packed event does not read back (bug)");
    std::abort();
  }

  const char* p_;
  size_t left_;
};

}  // namespace

void VerdictRing::fill(Slot& s, const VerdictEvent& e) {
  s.h.seq = e.seq;
  s.h.time_ms = e.time_ms;
  s.h.source = e.source;
  s.h.destination = e.destination;
  s.h.remote_ip = e.remote_ip;
  Packer count(nullptr);
  count.event(e);
  s.h.packed_bytes = static_cast<uint32_t>(count.size());
  char* out = s.packed;
  if (count.size() <= sizeof(s.packed)) {
    s.h.spill.reset();
  } else {
    s.h.spill = std::make_unique_for_overwrite<char[]>(count.size());
    out = s.h.spill.get();
  }
  Packer(out).event(e);
}

void VerdictRing::push(const VerdictEvent& e) {
  static_assert(sizeof(Slot) == kSlotBytes, "a slot is kSlotBytes");
  if (capacity_ == 0) return;
  if (slots_.size() < capacity_) {
    if (slots_.empty()) slots_.reserve(capacity_);  // the one allocation
    fill(slots_.emplace_back(), e);
    return;
  }
  fill(slots_[first_], e);
  first_ = (first_ + 1) % slots_.size();
}

void VerdictRing::setCapacity(size_t capacity) {
  capacity_ = capacity;
  std::vector<Slot> next;
  size_t keep = std::min(slots_.size(), capacity);
  if (keep > 0) {
    next.reserve(capacity);
    for (size_t i = slots_.size() - keep; i < slots_.size(); i++)
      next.push_back(std::move(slots_[(first_ + i) % slots_.size()]));
  }
  slots_.swap(next);
  first_ = 0;
}

VerdictEvent VerdictRing::eventAt(size_t i) const {
  const Slot& s = slot(i);
  VerdictEvent e;
  e.seq = s.h.seq;
  e.time_ms = s.h.time_ms;
  e.source = s.h.source;
  e.destination = s.h.destination;
  e.remote_ip = s.h.remote_ip;
  Unpacker(s.h.spill ? s.h.spill.get() : s.packed, s.h.packed_bytes).event(e);
  return e;
}

size_t VerdictRing::spilled() const {
  size_t n = 0;
  for (const Slot& s : slots_) n += s.h.spill ? 1 : 0;
  return n;
}

}  // namespace weft::ztunnel
