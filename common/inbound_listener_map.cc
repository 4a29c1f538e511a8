// InboundListenerMap: the ztunnel's handle on the pinned weft_inbound_lst SOCKHASH (pod IP ->
// its 15006 listener). The map's value is a __u64 socket fd on update (see bpf/lib/maps.h).
#include "common/inbound_listener_map.h"

#include <bpf/bpf.h>

#include <cerrno>
#include <cstdint>

#include "bpf/abi/maps.h"

namespace weft {

std::string pinnedMapPath(const std::string& pin_dir, const std::string& map_name) {
  std::string dir = pin_dir;
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  return dir + "/maps/" + map_name;
}

Result<InboundListenerMap> InboundListenerMap::open(const std::string& pin_dir) {
  std::string path = pinnedMapPath(pin_dir, WEFT_MAP_INBOUND_LISTENERS);
  int fd = bpf_obj_get(path.c_str());
  if (fd < 0) return Status::errorf("open pinned map {}: {}", path, errnoText(errno));
  UniqueFd owned(fd);
  // Check the shape before anyone writes into it: a stale pin of another ABI would otherwise
  // fail only on the first add with a less helpful EINVAL.
  bpf_map_info info{};
  uint32_t len = sizeof(info);
  if (bpf_obj_get_info_by_fd(fd, &info, &len) != 0)
    return Status::errorf("map {}: get info: {}", path, errnoText(errno));
  if (info.type != BPF_MAP_TYPE_SOCKHASH || info.key_size != sizeof(struct weft_ip) ||
      info.value_size != sizeof(uint64_t))
    return Status::errorf("map {}: unexpected shape (type {}, key {}, value {})", path, info.type,
                          info.key_size, info.value_size);
  return InboundListenerMap(std::move(owned));
}

Status InboundListenerMap::add(const IpAddr& pod_ip, int listener_fd) {
  if (pod_ip.family() == 0) return Status::error("weft_inbound_lst add: pod IP unset");
  if (listener_fd < 0) return Status::error("weft_inbound_lst add: invalid listener fd");
  struct weft_ip key = pod_ip.toAbi();
  uint64_t value = static_cast<uint64_t>(listener_fd);
  // BPF_ANY: a restarted ztunnel replaces its predecessor's listener for the same pod IP.
  if (bpf_map_update_elem(fd_.get(), &key, &value, BPF_ANY) != 0)
    return Status::errorf("weft_inbound_lst add {} (fd {}): {}", pod_ip.toString(), listener_fd,
                          errnoText(errno));
  return Status::ok();
}

Status InboundListenerMap::remove(const IpAddr& pod_ip) {
  if (pod_ip.family() == 0) return Status::error("weft_inbound_lst remove: pod IP unset");
  struct weft_ip key = pod_ip.toAbi();
  if (bpf_map_delete_elem(fd_.get(), &key) != 0 && errno != ENOENT)
    return Status::errorf("weft_inbound_lst remove {}: {}", pod_ip.toString(), errnoText(errno));
  return Status::ok();
}

}  // namespace weft
