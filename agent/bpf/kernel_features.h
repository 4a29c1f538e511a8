// What this kernel offers of what Weft's BPF dataplane needs (program, map and helper types,
// BTF, cgroup v2, bpffs), probed once at agent start and shown in the admin API's /status.
#pragma once

#include <string>
#include <vector>

namespace weft::agent {

struct KernelFeature {
  std::string name;      // e.g. "prog:sk_lookup", "map:ringbuf", "btf"
  std::string used_for;  // what Weft does with it
  bool available = false;
  std::string detail;    // why not, when not available
};

struct KernelFeatures {
  std::string kernel_release;  // uname -r
  std::vector<KernelFeature> features;
  // Names of the features that are not available (every one listed is required).
  std::vector<std::string> missing() const;
};

// Probes with libbpf (loads tiny programs and creates tiny maps; needs CAP_BPF/root, without
// which everything reads as unavailable with the error). cgroup_root and pin_dir are checked
// for being a cgroup2 mount / on a bpffs.
KernelFeatures probeKernelFeatures(const std::string& cgroup_root, const std::string& pin_dir);

}  // namespace weft::agent
