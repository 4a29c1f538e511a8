// How full the node's pinned BPF maps are: entries and max_entries of every map the agent
// pinned under <pin dir>/maps, read by the ztunnel (read-only) when /metrics is scraped.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"

namespace weft::ztunnel {

struct BpfMapFill {
  std::string name;              // the pin's file name (= the map's name)
  std::string type;              // "hash", "lru_hash", "sockhash", "ringbuf", ...
  uint32_t max_entries = 0;
  std::optional<uint64_t> entries;  // unset: the map type cannot be walked from user space
};

// Every map pinned in `maps_dir`, by name. Each map is opened BPF_F_RDONLY; entries are counted
// by walking keys (bounded by max_entries). A map that cannot be opened is an error naming it.
Result<std::vector<BpfMapFill>> readPinnedMapFill(const std::string& maps_dir);

// weft_bpf_map_entries{map,type} and weft_bpf_map_max_entries{map,type} (gauges), plus
// weft_bpf_map_read_errors_total when reading failed (`error` non-empty).
std::string renderBpfMapFill(const std::vector<BpfMapFill>& maps, uint64_t read_errors);

}  // namespace weft::ztunnel
