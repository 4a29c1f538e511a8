// pods.json: load with validation, save atomically.
#include "agent/pod_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cerrno>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "agent/model.h"
#include "common/fd.h"

namespace weft::agent {

PodStore::PodStore(std::string state_dir) : dir_(std::move(state_dir)) {}

const PodRecord* PodStore::find(const std::string& key) const {
  auto it = pods_.find(key);
  return it == pods_.end() ? nullptr : &it->second;
}

void PodStore::put(const PodRecord& r) { pods_[objectKey(r.namespace_, r.name)] = r; }

bool PodStore::erase(const std::string& key) { return pods_.erase(key) > 0; }

Status PodStore::load() {
  pods_.clear();
  const std::string file = path();
  std::error_code ec;
  if (!std::filesystem::exists(file, ec)) return Status::ok();
  auto size = std::filesystem::file_size(file, ec);
  if (ec) return Status::errorf("{}: {}", file, ec.message());
  if (size > kMaxPodStoreBytes) return Status::errorf("{}: larger than {} bytes", file, size);
  std::ifstream in(file);
  std::stringstream buf;
  buf << in.rdbuf();
  if (!in.good() && !in.eof()) return Status::errorf("{}: read failed", file);
  auto doc = nlohmann::json::parse(buf.str(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object()) return Status::errorf("{}: not a JSON object", file);
  auto pods = doc.find("pods");
  if (pods == doc.end() || !pods->is_array()) return Status::errorf("{}: pods: missing", file);
  for (size_t i = 0; i < pods->size(); i++) {
    const auto& p = (*pods)[i];
    PodRecord r;
    auto str = [&](const char* key, std::string* out, bool required) -> bool {
      auto it = p.find(key);
      if (it == p.end()) return !required;
      if (!it->is_string()) return false;
      *out = it->get<std::string>();
      return !required || !out->empty();
    };
    if (!p.is_object() || !str("namespace", &r.namespace_, true) || !str("name", &r.name, true) ||
        !str("netns", &r.netns, true) || !str("uid", &r.uid, false) ||
        !str("container_id", &r.container_id, false))
      return Status::errorf("{}: pods[{}]: needs string namespace, name, netns", file, i);
    put(r);
  }
  return Status::ok();
}

Status PodStore::save() const {
  std::error_code ec;
  std::filesystem::create_directories(dir_, ec);
  if (ec) return Status::errorf("mkdir {}: {}", dir_, ec.message());
  nlohmann::json pods = nlohmann::json::array();
  for (const auto& [key, r] : pods_) {
    pods.push_back({{"namespace", r.namespace_},
                    {"name", r.name},
                    {"uid", r.uid},
                    {"netns", r.netns},
                    {"container_id", r.container_id}});
  }
  nlohmann::json doc = {{"version", 1}, {"pods", pods}};
  const std::string text = doc.dump(2) + "\n";
  const std::string tmp = path() + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return Status::errorf("open {}: {}", tmp, errnoText(errno));
  UniqueFd owner(fd);
  size_t off = 0;
  while (off < text.size()) {
    ssize_t n = ::write(fd, text.data() + off, text.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::errorf("write {}: {}", tmp, errnoText(errno));
    }
    off += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) return Status::errorf("fsync {}: {}", tmp, errnoText(errno));
  owner.reset();
  if (::rename(tmp.c_str(), path().c_str()) != 0)
    return Status::errorf("rename {}: {}", tmp, errnoText(errno));
  return Status::ok();
}

}  // namespace weft::agent
