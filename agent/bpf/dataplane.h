// Dataplane: the agent's owner of Weft's BPF programs, maps and links on one node. Loads and
// attaches them, or adopts what an earlier agent pinned, and programs enrollment.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/address.h"
#include "common/status.h"

namespace weft::agent {

struct DataplaneOptions {
  std::string pin_dir;      // e.g. /sys/fs/bpf/weft/<instance>; bpffs mounted if absent
  std::string cgroup_root;  // cgroup v2 directory the cgroup programs attach to
  // The bpffs mount point to mount when pin_dir is under it and it is not a bpffs yet (the
  // conventional /sys/fs/bpf). A pin_dir elsewhere must already be on a bpffs.
  std::string bpffs_mount = "/sys/fs/bpf";
  // Local-hop acceleration (bpf/lib/hop.h): the app <-> ztunnel loopback hops inside enrolled
  // pods skip the loopback TCP stack (sk_msg redirect). Written to weft_hop_config on open, also
  // when adopting pins; affects connections established from then on.
  bool local_hop_accel = false;
  // Testing mode: no kernel objects at all; enroll/unenroll only update in-memory state, so the
  // agent's C++ logic runs in unit tests without root.
  bool testing = false;
};

// Local-hop acceleration: the switch as the map holds it and the counters (kWeftHopStatNames
// order, summed over CPUs).
struct LocalHopStatus {
  bool on = false;
  std::vector<std::pair<std::string, uint64_t>> counters;
};

struct DataplaneInfo {
  bool adopted = false;               // true if the programs were found pinned and reused
  std::vector<std::string> programs;  // program names attached
};

class Dataplane {
 public:
  virtual ~Dataplane() = default;

  // Loads and attaches every program, pinning maps, programs and links under pin_dir; or, when
  // a complete set of pins of the same ABI is there, adopts them without loading anything.
  static Result<std::unique_ptr<Dataplane>> open(const DataplaneOptions& options);

  // Detaches and unpins whatever a dataplane left under options.pin_dir, without loading
  // anything (weft-agent --cleanup). Nothing there is not an error. No-op in testing mode.
  static Status cleanup(const DataplaneOptions& options);

  virtual const DataplaneInfo& info() const = 0;

  // Enrolls a pod: inbound steering (sk_lookup link on its netns, pinned as
  // <pin_dir>/netns/<cookie>) and then outbound redirect and DNS capture (weft_enrolled entry).
  // Idempotent.
  virtual Status enroll(uint64_t netns_cookie, int netns_fd, uint64_t workload_id) = 0;
  // Reverses enroll: outbound redirect off first, then inbound steering. Idempotent. Existing
  // connections are not touched.
  virtual Status unenroll(uint64_t netns_cookie) = 0;
  // Netns cookies currently enrolled (from the map), for reconciling after a restart.
  virtual std::vector<uint64_t> enrolled() const = 0;

  // Sources that inbound steering never touches (the node's addresses: kubelet probes).
  virtual Status setInboundBypass(const std::vector<IpAddr>& sources) = 0;

  // Switches local-hop acceleration for connections established from now on (existing ones
  // keep what they have until they close).
  virtual Status setLocalHopAccel(bool on) = 0;
  virtual Result<LocalHopStatus> localHop() const = 0;

  // Detaches everything and removes every pin under pin_dir (node teardown).
  virtual Status destroy() = 0;
};

using DataplanePtr = std::unique_ptr<Dataplane>;

}  // namespace weft::agent
