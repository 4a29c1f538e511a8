// The agent's record of local pods' network namespaces (from CNI ADD), persisted in
// <state-dir>/pods.json so a restarted agent knows them without a new CNI ADD.
#pragma once

#include <map>
#include <string>

#include "common/status.h"

namespace weft::agent {

struct PodRecord {
  std::string namespace_;
  std::string name;
  std::string uid;  // as the runtime gave it (K8S_POD_UID); may be empty
  std::string netns;
  std::string container_id;
  bool operator==(const PodRecord&) const = default;
};

constexpr size_t kMaxPodStoreBytes = 16 * 1024 * 1024;

class PodStore {
 public:
  explicit PodStore(std::string state_dir);

  // Reads pods.json; a missing file is an empty store. A corrupt file is an error (the caller
  // logs it and starts empty: CNI ADDs rebuild it).
  Status load();
  // Writes pods.json atomically (temp file, fsync, rename).
  Status save() const;

  const std::map<std::string, PodRecord>& pods() const { return pods_; }  // by namespace/name
  const PodRecord* find(const std::string& key) const;
  void put(const PodRecord& record);
  bool erase(const std::string& key);
  std::string path() const { return dir_ + "/pods.json"; }

 private:
  std::string dir_;
  std::map<std::string, PodRecord> pods_;
};

}  // namespace weft::agent
