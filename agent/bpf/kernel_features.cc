// Kernel feature probes for the admin /status: libbpf's probe API, statfs, uname.
#include "agent/bpf/kernel_features.h"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <linux/magic.h>
#include <sys/statfs.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common/status.h"

namespace weft::agent {

std::vector<std::string> KernelFeatures::missing() const {
  std::vector<std::string> out;
  for (const KernelFeature& f : features)
    if (!f.available) out.push_back(f.name);
  return out;
}

namespace {

// libbpf probes answer 1 (supported), 0 (not), or a negative errno (could not tell).
KernelFeature probed(std::string name, std::string used_for, int rc) {
  KernelFeature f{std::move(name), std::move(used_for), rc == 1, ""};
  if (rc == 0) f.detail = "not supported by this kernel";
  else if (rc < 0) f.detail = "probe failed: " + errnoText(-rc);
  return f;
}

KernelFeature fsType(std::string name, std::string used_for, const std::string& path,
                     long magic, const char* want) {
  KernelFeature f{std::move(name), std::move(used_for), false, ""};
  struct statfs s {};
  if (path.empty()) {
    f.detail = "no path configured";
  } else if (statfs(path.c_str(), &s) != 0) {
    f.detail = path + ": " + errnoText(errno);
  } else if (static_cast<long>(s.f_type) != magic) {
    f.detail = path + " is not " + want;
  } else {
    f.available = true;
  }
  return f;
}

}  // namespace

KernelFeatures probeKernelFeatures(const std::string& cgroup_root, const std::string& pin_dir) {
  KernelFeatures k;
  struct utsname u {};
  if (uname(&u) == 0) k.kernel_release = u.release;
  auto& f = k.features;
  {
    KernelFeature btf{"btf", "CO-RE relocations of every program (/sys/kernel/btf/vmlinux)",
                      access("/sys/kernel/btf/vmlinux", R_OK) == 0, ""};
    if (!btf.available) btf.detail = "/sys/kernel/btf/vmlinux: " + errnoText(errno);
    f.push_back(btf);
  }
  f.push_back(probed("prog:cgroup_sock_addr",
                     "cgroup connect4/6 (redirect), sendmsg/recvmsg (DNS), bind4/6 (port guard)",
                     libbpf_probe_bpf_prog_type(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, nullptr)));
  f.push_back(probed("prog:sock_ops", "re-keying the original destination by 4-tuple",
                     libbpf_probe_bpf_prog_type(BPF_PROG_TYPE_SOCK_OPS, nullptr)));
  f.push_back(probed("prog:cgroup_sockopt", "SO_ORIGINAL_DST answers (cgroup/getsockopt)",
                     libbpf_probe_bpf_prog_type(BPF_PROG_TYPE_CGROUP_SOCKOPT, nullptr)));
  f.push_back(probed("prog:sk_lookup", "inbound steering to the 15006 listeners",
                     libbpf_probe_bpf_prog_type(BPF_PROG_TYPE_SK_LOOKUP, nullptr)));
  f.push_back(probed("map:ringbuf", "redirect and verdict events (weft_events)",
                     libbpf_probe_bpf_map_type(BPF_MAP_TYPE_RINGBUF, nullptr)));
  f.push_back(probed("map:sk_storage", "the original destination on the app's socket",
                     libbpf_probe_bpf_map_type(BPF_MAP_TYPE_SK_STORAGE, nullptr)));
  f.push_back(probed("map:sockhash", "the inbound listener map (weft_inbound_lst)",
                     libbpf_probe_bpf_map_type(BPF_MAP_TYPE_SOCKHASH, nullptr)));
  f.push_back(probed("map:lru_hash", "original destinations and DNS resolvers",
                     libbpf_probe_bpf_map_type(BPF_MAP_TYPE_LRU_HASH, nullptr)));
  f.push_back(probed("helper:get_netns_cookie(sock_ops)", "enrollment keyed by netns cookie",
                     libbpf_probe_bpf_helper(BPF_PROG_TYPE_SOCK_OPS,
                                             BPF_FUNC_get_netns_cookie, nullptr)));
  f.push_back(probed("helper:get_netns_cookie(cgroup_sock_addr)",
                     "enrollment check at connect()",
                     libbpf_probe_bpf_helper(BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                                             BPF_FUNC_get_netns_cookie, nullptr)));
  f.push_back(fsType("cgroup2", "where the cgroup programs attach (--cgroup-root)", cgroup_root,
                     CGROUP2_SUPER_MAGIC, "a cgroup v2 mount"));
  f.push_back(fsType("bpffs", "pins that outlive the agent (--bpf-pin-dir)", pin_dir,
                     BPF_FS_MAGIC, "on a bpffs"));
  return k;
}

}  // namespace weft::agent
