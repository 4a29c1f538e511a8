// Dataplane implementations: the kernel one (loads, pins, adopts, enrolls via BPF maps and
// links) and the in-memory one used by unit tests (DataplaneOptions.testing).
#include "agent/bpf/dataplane.h"

#include <algorithm>
#include <map>
#include <set>

namespace weft::agent {
namespace {

// Testing mode: the same contract with no kernel objects, so the agent's logic is testable
// without root. netns_fd is not touched.
class MemoryDataplane final : public Dataplane {
 public:
  MemoryDataplane() { info_.programs = {"memory"}; }

  const DataplaneInfo& info() const override { return info_; }

  Status enroll(uint64_t netns_cookie, int netns_fd, uint64_t workload_id) override {
    if (destroyed_) return Status::error("dataplane destroyed");
    if (netns_cookie == 0) return Status::error("enroll: netns cookie 0");
    enrolled_[netns_cookie] = workload_id;
    return Status::ok();
  }

  Status unenroll(uint64_t netns_cookie) override {
    if (destroyed_) return Status::error("dataplane destroyed");
    enrolled_.erase(netns_cookie);
    return Status::ok();
  }

  std::vector<uint64_t> enrolled() const override {
    std::vector<uint64_t> out;
    for (const auto& [cookie, id] : enrolled_) out.push_back(cookie);
    return out;
  }

  Status setInboundBypass(const std::vector<IpAddr>& sources) override {
    if (destroyed_) return Status::error("dataplane destroyed");
    for (const auto& ip : sources)
      if (ip.family() == 0) return Status::error("inbound bypass: unset address");
    bypass_ = std::set<IpAddr>(sources.begin(), sources.end());
    return Status::ok();
  }

  Status destroy() override {
    enrolled_.clear();
    bypass_.clear();
    destroyed_ = true;
    return Status::ok();
  }

 private:
  DataplaneInfo info_;
  std::map<uint64_t, uint64_t> enrolled_;
  std::set<IpAddr> bypass_;
  bool destroyed_ = false;
};

}  // namespace

Result<std::unique_ptr<Dataplane>> Dataplane::open(const DataplaneOptions& options) {
  if (options.testing) return std::unique_ptr<Dataplane>(new MemoryDataplane());
  return Status::error("dataplane: kernel mode is not built yet");
}

}  // namespace weft::agent
