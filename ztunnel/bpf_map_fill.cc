// Pinned map fill: open each pin read-only, ask the kernel for its type and size, walk its keys.
#include "ztunnel/bpf_map_fill.h"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <dirent.h>

#include <algorithm>
#include <cerrno>
#include <memory>

#include "common/fd.h"
#include "ztunnel/prometheus_text.h"

namespace weft::ztunnel {

namespace {

// Map types whose keys user space cannot walk (BPF_MAP_GET_NEXT_KEY is not supported).
bool walkable(uint32_t type) {
  switch (type) {
    case BPF_MAP_TYPE_RINGBUF:
    case BPF_MAP_TYPE_SK_STORAGE:
    case BPF_MAP_TYPE_INODE_STORAGE:
    case BPF_MAP_TYPE_TASK_STORAGE:
    case BPF_MAP_TYPE_PERF_EVENT_ARRAY:
    case BPF_MAP_TYPE_USER_RINGBUF:
    case BPF_MAP_TYPE_BLOOM_FILTER:
    case BPF_MAP_TYPE_QUEUE:
    case BPF_MAP_TYPE_STACK:
      return false;
    default:
      return true;
  }
}

}  // namespace

Result<std::vector<BpfMapFill>> readPinnedMapFill(const std::string& maps_dir) {
  std::unique_ptr<DIR, int (*)(DIR*)> dir(opendir(maps_dir.c_str()), closedir);
  if (!dir) return Status::errorf("BPF maps {}: {}", maps_dir, errnoText(errno));
  std::vector<std::string> names;
  while (dirent* e = readdir(dir.get())) {
    std::string n = e->d_name;
    if (n != "." && n != "..") names.push_back(n);
  }
  std::sort(names.begin(), names.end());
  std::vector<BpfMapFill> out;
  for (const std::string& n : names) {
    std::string path = maps_dir + "/" + n;
    LIBBPF_OPTS(bpf_obj_get_opts, opts, .file_flags = BPF_F_RDONLY);
    UniqueFd fd(bpf_obj_get_opts(path.c_str(), &opts));
    if (!fd.valid()) return Status::errorf("open pinned map {}: {}", path, errnoText(errno));
    bpf_map_info info{};
    uint32_t len = sizeof(info);
    if (bpf_obj_get_info_by_fd(fd.get(), &info, &len) != 0)
      return Status::errorf("pinned map {}: get info: {}", path, errnoText(errno));
    BpfMapFill m;
    m.name = n;
    const char* t = libbpf_bpf_map_type_str(static_cast<bpf_map_type>(info.type));
    m.type = t ? t : "unknown";
    m.max_entries = info.max_entries;
    if (walkable(info.type) && info.key_size > 0 && info.key_size <= 512) {
      std::vector<uint8_t> key(info.key_size), next(info.key_size);
      uint64_t count = 0;
      bool ok = true;
      void* prev = nullptr;  // null = start from the first key
      // Bounded: a map never holds more than max_entries (+1 for a race with a concurrent
      // delete that restarts the walk).
      while (count <= static_cast<uint64_t>(info.max_entries) + 1) {
        if (bpf_map_get_next_key(fd.get(), prev, next.data()) != 0) {
          ok = errno == ENOENT;
          break;
        }
        count++;
        key.swap(next);
        prev = key.data();
      }
      if (ok) m.entries = std::min<uint64_t>(count, info.max_entries);
    }
    out.push_back(std::move(m));
  }
  return out;
}

std::string renderBpfMapFill(const std::vector<BpfMapFill>& maps, uint64_t read_errors) {
  PromText p;
  p.family("weft_bpf_map_entries", "gauge",
           "Entries in each pinned BPF map of this node (maps that can be walked)");
  for (const BpfMapFill& m : maps)
    if (m.entries)
      p.sample("weft_bpf_map_entries", {{"map", m.name}, {"type", m.type}}, *m.entries);
  p.family("weft_bpf_map_max_entries", "gauge",
           "Capacity of each pinned BPF map of this node (ring buffers: bytes)");
  for (const BpfMapFill& m : maps)
    p.sample("weft_bpf_map_max_entries", {{"map", m.name}, {"type", m.type}},
             static_cast<uint64_t>(m.max_entries));
  p.family("weft_bpf_map_read_errors_total", "counter",
           "Scrapes that could not read the pinned BPF maps");
  p.sample("weft_bpf_map_read_errors_total", PromLabels{}, read_errors);
  return p.take();
}

}  // namespace weft::ztunnel
