// Kernel feature probes: libbpf_probe_bpf_{prog,map}_type and _helper load tiny programs and
// report what this kernel accepts; SO_NETNS_COOKIE is tried on a socket.
#include "agent/kernel_features.h"

#include <bpf/libbpf.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <cstdint>

namespace weft::agent {

namespace {

#ifndef SO_NETNS_COOKIE
#define SO_NETNS_COOKIE 71
#endif

nlohmann::json probe() {
  nlohmann::json features = nlohmann::json::object();
  auto prog = [&](const char* name, bpf_prog_type t) {
    features[name] = libbpf_probe_bpf_prog_type(t, nullptr) == 1;
  };
  auto map = [&](const char* name, bpf_map_type t) {
    features[name] = libbpf_probe_bpf_map_type(t, nullptr) == 1;
  };
  prog("cgroup_sock_addr", BPF_PROG_TYPE_CGROUP_SOCK_ADDR);  // connect/sendmsg/recvmsg/bind
  prog("sock_ops", BPF_PROG_TYPE_SOCK_OPS);
  prog("cgroup_sockopt", BPF_PROG_TYPE_CGROUP_SOCKOPT);      // SO_ORIGINAL_DST
  prog("sk_lookup", BPF_PROG_TYPE_SK_LOOKUP);                // inbound steering
  map("ringbuf", BPF_MAP_TYPE_RINGBUF);                      // weft_events
  map("sockhash", BPF_MAP_TYPE_SOCKHASH);                    // weft_inbound_lst
  map("sk_storage", BPF_MAP_TYPE_SK_STORAGE);                // weft_sk_dst
  map("lru_hash", BPF_MAP_TYPE_LRU_HASH);
  features["helper_get_netns_cookie_sockops"] =
      libbpf_probe_bpf_helper(BPF_PROG_TYPE_SOCK_OPS, BPF_FUNC_get_netns_cookie, nullptr) == 1;
  features["helper_get_netns_cookie_sock_addr"] =
      libbpf_probe_bpf_helper(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_FUNC_get_netns_cookie,
                              nullptr) == 1;
  bool cookie = false;
  int fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd >= 0) {
    uint64_t v = 0;
    socklen_t len = sizeof(v);
    cookie = ::getsockopt(fd, SOL_SOCKET, SO_NETNS_COOKIE, &v, &len) == 0;
    ::close(fd);
  }
  features["so_netns_cookie"] = cookie;
  nlohmann::json missing = nlohmann::json::array();
  for (auto& [k, v] : features.items())
    if (!v.get<bool>()) missing.push_back(k);
  utsname u{};
  std::string release = ::uname(&u) == 0 ? u.release : "unknown";
  return {{"release", release}, {"features", features}, {"missing", missing}};
}

}  // namespace

const nlohmann::json& kernelFeatures() {
  static const nlohmann::json cached = probe();
  return cached;
}

}  // namespace weft::agent
