// Dataplane implementations: the kernel one (loads, pins, adopts, enrolls via BPF maps and
// links) and the in-memory one used by unit tests (DataplaneOptions.testing).
#include "agent/bpf/dataplane.h"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <dirent.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <spdlog/spdlog.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <set>

#include "bind_guard.skel.h"
#include "bpf/abi/maps.h"
#include "bpf/abi/progs.h"
#include "common/fd.h"
#include "common/netns.h"
#include "dns_redirect.skel.h"
#include "inbound_lookup.skel.h"
#include "local_hop.skel.h"
#include "orig_dst.skel.h"
#include "redirect_connect.skel.h"
#include "sockops.skel.h"

namespace weft::agent {
namespace {

constexpr const char* kMapNames[] = {WEFT_MAP_ENROLLED,       WEFT_MAP_SK_ORIG_DST,
                                     WEFT_MAP_ORIG_DST,       WEFT_MAP_INBOUND_LISTENERS,
                                     WEFT_MAP_INBOUND_BYPASS, WEFT_MAP_EVENTS,
                                     WEFT_MAP_DNS_DST,        WEFT_MAP_FAST_VERDICT,
                                     WEFT_MAP_FAST_CONN,      WEFT_MAP_SK_FAST,
                                     WEFT_MAP_FAST_STATS,     WEFT_MAP_HOP_SOCKS,
                                     WEFT_MAP_SK_HOP,         WEFT_MAP_HOP_CONFIG,
                                     WEFT_MAP_HOP_STATS};
// Programs attached at the cgroup root, each with a pinned link of the same name.
constexpr const char* kCgroupProgs[] = {WEFT_PROG_CONNECT4,   WEFT_PROG_CONNECT6, WEFT_PROG_SOCKOPS,
                                        WEFT_PROG_GETSOCKOPT, WEFT_PROG_BIND4,    WEFT_PROG_BIND6,
                                        WEFT_PROG_SENDMSG4,   WEFT_PROG_SENDMSG6, WEFT_PROG_RECVMSG4,
                                        WEFT_PROG_RECVMSG6,   WEFT_PROG_SOCK_RELEASE};
// The kernel keeps BPF_OBJ_NAME_LEN - 1 characters of a program name.
constexpr size_t kKernelNameLen = 15;

// ---------------------------------------------------------------------------------------------
// Testing mode: the same contract with no kernel objects, so the agent's logic is testable
// without root. netns_fd is not touched.
class MemoryDataplane final : public Dataplane {
 public:
  explicit MemoryDataplane(bool local_hop) : local_hop_(local_hop) { info_.programs = {"memory"}; }

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

  Status setLocalHopAccel(bool on) override {
    if (destroyed_) return Status::error("dataplane destroyed");
    local_hop_ = on;
    return Status::ok();
  }

  Result<LocalHopStatus> localHop() const override {
    LocalHopStatus st;
    st.on = local_hop_;
    for (const char* name : kWeftHopStatNames) st.counters.emplace_back(name, 0);
    return st;
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
  bool local_hop_ = false;
  bool destroyed_ = false;
};

// ---------------------------------------------------------------------------------------------
// libbpf plumbing.

int libbpfPrint(enum libbpf_print_level level, const char* format, va_list args) {
  // Verifier logs come as one long message whose reason is at the end: keep the tail.
  constexpr size_t kMax = 16384;
  std::string text(kMax, '\0');
  va_list copy;
  va_copy(copy, args);
  int n = vsnprintf(text.data(), text.size(), format, copy);
  va_end(copy);
  if (n < 0) return 0;
  if (static_cast<size_t>(n) >= kMax) {
    std::string full(static_cast<size_t>(n) + 1, '\0');
    vsnprintf(full.data(), full.size(), format, args);
    text = "..." + full.substr(full.size() - kMax);
  }
  text.resize(strnlen(text.c_str(), text.size()));
  while (!text.empty() && text.back() == '\n') text.pop_back();
  if (level == LIBBPF_WARN)
    spdlog::warn("libbpf: {}", text);
  else
    spdlog::debug("libbpf: {}", text);
  return n;
}

void routeLibbpfLogs() {
  static std::once_flag once;
  std::call_once(once, [] { libbpf_set_print(libbpfPrint); });
}

// libbpf 1.x returns -errno (and sets errno).
Status libbpfError(const std::string& what, int ret) {
  int err = ret < 0 ? -ret : errno;
  return Status::errorf("{}: {}", what, errnoText(err));
}

std::string joinPath(const std::string& a, const std::string& b) {
  if (!a.empty() && a.back() == '/') return a + b;
  return a + "/" + b;
}

bool exists(const std::string& path) {
  struct stat st;
  return lstat(path.c_str(), &st) == 0;
}

Status mkdirOne(const std::string& path) {
  if (::mkdir(path.c_str(), 0700) != 0 && errno != EEXIST)
    return Status::errorf("mkdir {}: {}", path, errnoText(errno));
  return Status::ok();
}

Status mkdirAll(const std::string& path) {
  std::string cur;
  size_t pos = 0;
  while (pos != std::string::npos) {
    size_t next = path.find('/', pos + 1);
    cur = path.substr(0, next);
    if (!cur.empty() && cur != "/") {
      if (auto st = mkdirOne(cur); !st) return st;
    }
    pos = next;
  }
  return Status::ok();
}

// Removes a directory tree on bpffs (unpins every object in it). Bounded by depth.
Status removeTree(const std::string& path, int depth = 0) {
  if (depth > 8) return Status::errorf("remove {}: too deep", path);
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return Status::ok();
    return Status::errorf("stat {}: {}", path, errnoText(errno));
  }
  if (!S_ISDIR(st.st_mode)) {
    if (::unlink(path.c_str()) != 0 && errno != ENOENT)
      return Status::errorf("unpin {}: {}", path, errnoText(errno));
    return Status::ok();
  }
  DIR* dir = opendir(path.c_str());
  if (!dir) return Status::errorf("opendir {}: {}", path, errnoText(errno));
  std::vector<std::string> names;
  while (struct dirent* de = readdir(dir)) {
    if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0) continue;
    names.emplace_back(de->d_name);
  }
  closedir(dir);
  for (const auto& name : names)
    if (auto s = removeTree(joinPath(path, name), depth + 1); !s) return s;
  if (::rmdir(path.c_str()) != 0 && errno != ENOENT)
    return Status::errorf("rmdir {}: {}", path, errnoText(errno));
  return Status::ok();
}

std::vector<std::string> listDir(const std::string& path) {
  std::vector<std::string> names;
  DIR* dir = opendir(path.c_str());
  if (!dir) return names;
  while (struct dirent* de = readdir(dir)) {
    if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0) continue;
    names.emplace_back(de->d_name);
  }
  closedir(dir);
  return names;
}

// Detaches the link pinned at `path` (whoever else holds it) and removes the pin.
Status detachPinnedLink(const std::string& path) {
  int fd = bpf_obj_get(path.c_str());
  if (fd < 0) {
    if (errno == ENOENT) return Status::ok();
    return Status::errorf("open pinned link {}: {}", path, errnoText(errno));
  }
  UniqueFd link(fd);
  // A link whose cgroup or netns is gone is already detached; detach then says ENOLINK/EINVAL.
  if (bpf_link_detach(link.get()) != 0 && errno != ENOLINK && errno != EINVAL)
    return Status::errorf("detach link {}: {}", path, errnoText(errno));
  if (::unlink(path.c_str()) != 0 && errno != ENOENT)
    return Status::errorf("unpin {}: {}", path, errnoText(errno));
  return Status::ok();
}

// Detaches every pinned link (cgroup and netns) under pin_dir and removes all pins, keeping
// pin_dir itself.
Status removePinSet(const std::string& pin_dir) {
  for (const char* dir : {WEFT_PIN_LINKS, WEFT_PIN_NETNS}) {
    std::string sub = joinPath(pin_dir, dir);
    for (const auto& name : listDir(sub))
      if (auto st = detachPinnedLink(joinPath(sub, name)); !st) return st;
  }
  for (const auto& name : listDir(pin_dir))
    if (auto st = removeTree(joinPath(pin_dir, name)); !st) return st;
  return Status::ok();
}

// Makes sure `dir` is on a bpffs, mounting one at `mount_point` when dir lies under it and the
// mount point is not a bpffs yet.
Status ensureBpffs(const std::string& dir, const std::string& mount_point) {
  std::string probe = dir;
  while (!probe.empty() && !exists(probe)) {
    size_t slash = probe.rfind('/');
    probe = slash == 0 ? "/" : (slash == std::string::npos ? "" : probe.substr(0, slash));
  }
  if (probe.empty()) return Status::errorf("pin dir {}: not an absolute path", dir);
  struct statfs sfs;
  if (statfs(probe.c_str(), &sfs) != 0)
    return Status::errorf("statfs {}: {}", probe, errnoText(errno));
  if (static_cast<unsigned long>(sfs.f_type) == BPF_FS_MAGIC) return Status::ok();

  bool under_mount =
      !mount_point.empty() && (dir == mount_point || dir.rfind(joinPath(mount_point, ""), 0) == 0);
  if (!under_mount || probe.size() > mount_point.size())
    return Status::errorf(
        "pin dir {}: {} is not on a bpffs (filesystem magic {:#x}); mount one "
        "with `mount -t bpf bpf DIR`",
        dir, probe, static_cast<unsigned long>(sfs.f_type));
  if (auto st = mkdirAll(mount_point); !st) return st;
  if (::mount("bpf", mount_point.c_str(), "bpf", 0, "mode=0700") != 0)
    return Status::errorf("mount bpffs at {}: {}", mount_point, errnoText(errno));
  spdlog::info("mounted bpffs at {}", mount_point);
  return Status::ok();
}

Result<uint64_t> cgroupId(const std::string& cgroup_dir) {
  struct stat st;
  if (stat(cgroup_dir.c_str(), &st) != 0)
    return Status::errorf("cgroup root {}: {}", cgroup_dir, errnoText(errno));
  struct statfs sfs;
  if (statfs(cgroup_dir.c_str(), &sfs) != 0)
    return Status::errorf("statfs {}: {}", cgroup_dir, errnoText(errno));
  if (static_cast<unsigned long>(sfs.f_type) != CGROUP2_SUPER_MAGIC)
    return Status::errorf("cgroup root {}: not a cgroup v2 directory", cgroup_dir);
  // On cgroup2 the directory's inode number is the cgroup id the kernel reports for links.
  return static_cast<uint64_t>(st.st_ino);
}

// One opened skeleton, type-erased so that all objects go through one load loop.
struct OpenedObject {
  std::string name;
  bpf_object* obj = nullptr;
  std::function<int()> load;
  std::function<void()> destroy;
};

template <typename Skel>
Status openSkeleton(const char* name, const bpf_object_open_opts* opts,
                    std::function<void(Skel*)> tune, std::vector<OpenedObject>* out) {
  Skel* skel = Skel::open(opts);
  if (!skel) return Status::errorf("open BPF object {}: {}", name, errnoText(errno));
  if (tune) tune(skel);
  out->push_back(OpenedObject{name, skel->obj, [skel] { return Skel::load(skel); },
                              [skel] { Skel::destroy(skel); }});
  return Status::ok();
}

// ---------------------------------------------------------------------------------------------
// The kernel dataplane. Owns only fds to pinned objects: everything that must outlive the agent
// is held by a pin, so dropping this object detaches nothing.
class KernelDataplane final : public Dataplane {
 public:
  explicit KernelDataplane(DataplaneOptions options) : options_(std::move(options)) {
    while (options_.pin_dir.size() > 1 && options_.pin_dir.back() == '/')
      options_.pin_dir.pop_back();
  }
  KernelDataplane(const KernelDataplane&) = delete;
  KernelDataplane& operator=(const KernelDataplane&) = delete;

  Status open() {
    routeLibbpfLogs();
    if (options_.pin_dir.empty() || options_.pin_dir[0] != '/')
      return Status::errorf("dataplane: pin dir '{}' must be an absolute path", options_.pin_dir);
    auto cg = cgroupId(options_.cgroup_root);
    if (!cg) return cg.status();
    cgroup_id_ = *cg;
    if (auto st = ensureBpffs(options_.pin_dir, options_.bpffs_mount); !st) return st;
    if (auto st = mkdirAll(options_.pin_dir); !st) return st;

    std::string why;
    if (pinSetComplete(&why)) {
      if (auto st = adopt(); !st) return st.context("adopting pins under " + options_.pin_dir);
      if (auto st = pruneNetnsLinks(); !st) return st.context("adopting pins");
      info_.adopted = true;
      spdlog::info("dataplane: adopted pinned programs under {}", options_.pin_dir);
      return Status::ok();
    }
    if (!listDir(options_.pin_dir).empty()) {
      spdlog::warn("dataplane: pins under {} are stale ({}); removing them and loading afresh",
                   options_.pin_dir, why);
      if (auto st = removePins(); !st) return st;
    }
    if (auto st = loadAndPin(); !st) {
      // Leave no partial set behind: the next start would only remove it again.
      if (auto rm = removePins(); !rm) spdlog::warn("dataplane: cleanup: {}", rm.message());
      return st;
    }
    if (auto st = adopt(); !st) return st.context("opening fresh pins under " + options_.pin_dir);
    info_.adopted = false;
    spdlog::info("dataplane: loaded and attached {} programs at {}, pinned under {}",
                 info_.programs.size(), options_.cgroup_root, options_.pin_dir);
    return Status::ok();
  }

  const DataplaneInfo& info() const override { return info_; }

  Status enroll(uint64_t netns_cookie, int netns_fd, uint64_t workload_id) override {
    if (destroyed_) return Status::error("dataplane destroyed");
    if (netns_cookie == 0) return Status::error("enroll: netns cookie 0");
    // The cookie is the key everything else uses; a mismatch would steer one pod and redirect
    // another, so verify it against the fd we attach to.
    auto actual = netnsCookie(netns_fd);
    if (!actual) return actual.status().context("enroll: netns fd");
    if (*actual != netns_cookie)
      return Status::errorf("enroll: netns fd has cookie {}, not {}", *actual, netns_cookie);

    std::string pin = netnsPin(netns_cookie);
    bool created = false;
    struct stat ns_st;
    if (fstat(netns_fd, &ns_st) != 0)
      return Status::errorf("enroll: fstat netns fd: {}", errnoText(errno));
    if (auto st = checkNetnsLink(pin, ns_st.st_ino); !st) {
      spdlog::warn("dataplane: replacing sk_lookup link {}: {}", pin, st.message());
      if (auto d = detachPinnedLink(pin); !d) return d;
    }
    if (!exists(pin)) {
      LIBBPF_OPTS(bpf_link_create_opts, link_opts);
      int fd = bpf_link_create(sk_lookup_fd_.get(), netns_fd, BPF_SK_LOOKUP, &link_opts);
      if (fd < 0) return libbpfError(fmt::format("attach sk_lookup to netns {}", netns_cookie), fd);
      UniqueFd link(fd);
      if (bpf_obj_pin(link.get(), pin.c_str()) != 0)
        return Status::errorf("pin sk_lookup link {}: {}", pin, errnoText(errno));
      created = true;
    }

    struct weft_enrollment e {};
    e.flags = WEFT_ENROLL_REDIRECT_OUTBOUND | WEFT_ENROLL_REDIRECT_DNS;
    e.workload_id = workload_id;
    if (bpf_map_update_elem(enrolled_fd_.get(), &netns_cookie, &e, BPF_ANY) != 0) {
      Status err =
          Status::errorf("map {} update {}: {}", WEFT_MAP_ENROLLED, netns_cookie, errnoText(errno));
      if (created) (void)detachPinnedLink(pin);
      return err;
    }
    return Status::ok();
  }

  Status unenroll(uint64_t netns_cookie) override {
    if (destroyed_) return Status::error("dataplane destroyed");
    if (bpf_map_delete_elem(enrolled_fd_.get(), &netns_cookie) != 0 && errno != ENOENT)
      return Status::errorf("map {} delete {}: {}", WEFT_MAP_ENROLLED, netns_cookie,
                            errnoText(errno));
    return detachPinnedLink(netnsPin(netns_cookie));
  }

  std::vector<uint64_t> enrolled() const override {
    std::vector<uint64_t> out;
    if (destroyed_) return out;
    uint64_t key = 0;
    uint64_t next = 0;
    const void* prev = nullptr;
    // Bounded by the map's size: a concurrent delete can restart iteration, never loop forever.
    for (size_t i = 0; i < WEFT_MAX_ENROLLED; ++i) {
      if (bpf_map_get_next_key(enrolled_fd_.get(), prev, &next) != 0) break;
      out.push_back(next);
      key = next;
      prev = &key;
    }
    return out;
  }

  Status setInboundBypass(const std::vector<IpAddr>& sources) override {
    if (destroyed_) return Status::error("dataplane destroyed");
    if (sources.size() > WEFT_MAX_INBOUND_BYPASS)
      return Status::errorf("inbound bypass: {} sources, at most {}", sources.size(),
                            WEFT_MAX_INBOUND_BYPASS);
    std::vector<struct weft_ip> want;
    for (const auto& ip : sources) {
      if (ip.family() == 0) return Status::error("inbound bypass: unset address");
      want.push_back(ip.toAbi());
    }
    auto same = [](const struct weft_ip& a, const struct weft_ip& b) {
      return memcmp(&a, &b, sizeof(a)) == 0;
    };
    // Add first, then remove what is no longer wanted, so a source staying in the set is never
    // missing in between.
    uint8_t one = 1;
    for (const auto& key : want)
      if (bpf_map_update_elem(bypass_fd_.get(), &key, &one, BPF_ANY) != 0)
        return Status::errorf("map {} update {}: {}", WEFT_MAP_INBOUND_BYPASS,
                              IpAddr::fromAbi(key).toString(), errnoText(errno));
    std::vector<struct weft_ip> stale;
    struct weft_ip cur {
    }, next{};
    const void* prev = nullptr;
    for (size_t i = 0; i < WEFT_MAX_INBOUND_BYPASS + want.size(); ++i) {
      if (bpf_map_get_next_key(bypass_fd_.get(), prev, &next) != 0) break;
      bool keep = false;
      for (const auto& w : want) keep = keep || same(w, next);
      if (!keep) stale.push_back(next);
      cur = next;
      prev = &cur;
    }
    for (const auto& key : stale)
      if (bpf_map_delete_elem(bypass_fd_.get(), &key) != 0 && errno != ENOENT)
        return Status::errorf("map {} delete {}: {}", WEFT_MAP_INBOUND_BYPASS,
                              IpAddr::fromAbi(key).toString(), errnoText(errno));
    return Status::ok();
  }

  Status destroy() override {
    Status st = removePins();
    if (st && ::rmdir(options_.pin_dir.c_str()) != 0 && errno != ENOENT)
      st = Status::errorf("rmdir {}: {}", options_.pin_dir, errnoText(errno));
    enrolled_fd_.reset();
    bypass_fd_.reset();
    sk_lookup_fd_.reset();
    hop_config_fd_.reset();
    hop_stats_fd_.reset();
    destroyed_ = true;
    if (st) spdlog::info("dataplane: detached everything and removed {}", options_.pin_dir);
    return st;
  }

 private:
  std::string sub(const char* dir) const { return joinPath(options_.pin_dir, dir); }
  std::string mapPin(const char* name) const { return joinPath(sub(WEFT_PIN_MAPS), name); }
  std::string progPin(const char* name) const { return joinPath(sub(WEFT_PIN_PROGS), name); }
  std::string linkPin(const char* name) const { return joinPath(sub(WEFT_PIN_LINKS), name); }
  std::string netnsPin(uint64_t cookie) const {
    return joinPath(sub(WEFT_PIN_NETNS), std::to_string(cookie));
  }

  // Complete = the abi mark names our version, every map, program and cgroup link is pinned,
  // each link is attached to our cgroup root and runs the pinned program.
  bool pinSetComplete(std::string* why) const {
    char target[128] = {0};
    std::string abi = sub(WEFT_PIN_ABI);
    ssize_t n = readlink(abi.c_str(), target, sizeof(target) - 1);
    if (n < 0) {
      *why = fmt::format("no ABI mark {}", abi);
      return false;
    }
    if (std::string(target, n) != WEFT_BPF_ABI_VERSION) {
      *why = fmt::format("ABI {} pinned, this agent has {}", std::string(target, n),
                         WEFT_BPF_ABI_VERSION);
      return false;
    }
    for (const char* name : kMapNames) {
      UniqueFd fd(bpf_obj_get(mapPin(name).c_str()));
      if (!fd.valid()) {
        *why = fmt::format("map {}: {}", mapPin(name), errnoText(errno));
        return false;
      }
    }
    std::vector<const char*> progs(std::begin(kCgroupProgs), std::end(kCgroupProgs));
    progs.push_back(WEFT_PROG_SK_LOOKUP);
    progs.push_back(WEFT_PROG_HOP_MSG);
    std::map<std::string, uint32_t> prog_ids;
    for (const char* name : progs) {
      UniqueFd fd(bpf_obj_get(progPin(name).c_str()));
      bpf_prog_info info{};
      uint32_t len = sizeof(info);
      if (!fd.valid() || bpf_obj_get_info_by_fd(fd.get(), &info, &len) != 0) {
        *why = fmt::format("program {}: {}", progPin(name), errnoText(errno));
        return false;
      }
      if (std::string(info.name) != std::string(name).substr(0, kKernelNameLen)) {
        *why = fmt::format("program {} is named {}", progPin(name), info.name);
        return false;
      }
      prog_ids[name] = info.id;
    }
    for (const char* name : kCgroupProgs) {
      UniqueFd fd(bpf_obj_get(linkPin(name).c_str()));
      bpf_link_info info{};
      uint32_t len = sizeof(info);
      if (!fd.valid() || bpf_obj_get_info_by_fd(fd.get(), &info, &len) != 0) {
        *why = fmt::format("link {}: {}", linkPin(name), errnoText(errno));
        return false;
      }
      if (info.type != BPF_LINK_TYPE_CGROUP || info.cgroup.cgroup_id != cgroup_id_ ||
          info.prog_id != prog_ids[name]) {
        *why = fmt::format("link {} is not program {} attached to {}", linkPin(name), name,
                           options_.cgroup_root);
        return false;
      }
    }
    // The sk_msg program is attached to its map, not to a cgroup: it is there as long as the
    // pinned map is.
    UniqueFd hop_map(bpf_obj_get(mapPin(WEFT_MAP_HOP_SOCKS).c_str()));
    uint32_t ids[8] = {0};
    LIBBPF_OPTS(bpf_prog_query_opts, query);
    query.prog_ids = ids;
    query.prog_cnt = 8;
    if (!hop_map.valid() ||
        bpf_prog_query_opts(hop_map.get(), BPF_SK_MSG_VERDICT, &query) != 0 ||
        query.prog_cnt != 1 || ids[0] != prog_ids[WEFT_PROG_HOP_MSG]) {
      *why = fmt::format("program {} is not attached to map {}", WEFT_PROG_HOP_MSG,
                         mapPin(WEFT_MAP_HOP_SOCKS));
      return false;
    }
    return true;
  }

  Status removePins() { return removePinSet(options_.pin_dir); }

  Status loadAndPin() {
    for (const char* dir : {WEFT_PIN_MAPS, WEFT_PIN_PROGS, WEFT_PIN_LINKS, WEFT_PIN_NETNS})
      if (auto st = mkdirOne(sub(dir)); !st) return st;

    std::string maps_dir = sub(WEFT_PIN_MAPS);
    LIBBPF_OPTS(bpf_object_open_opts, opts);
    opts.pin_root_path = maps_dir.c_str();

    std::vector<OpenedObject> objects;
    struct Cleanup {
      std::vector<OpenedObject>* objects;
      ~Cleanup() {
        for (auto& o : *objects) o.destroy();
      }
    } cleanup{&objects};

    uint32_t page = static_cast<uint32_t>(sysconf(_SC_PAGESIZE));
    Status st = openSkeleton<redirect_connect>("redirect_connect", &opts, nullptr, &objects);
    if (st) st = openSkeleton<sockops>("sockops", &opts, nullptr, &objects);
    if (st)
      st = openSkeleton<orig_dst>(
          "orig_dst", &opts, [page](orig_dst* s) { s->rodata->weft_page_size = page; }, &objects);
    if (st) st = openSkeleton<bind_guard>("bind_guard", &opts, nullptr, &objects);
    if (st) st = openSkeleton<inbound_lookup>("inbound_lookup", &opts, nullptr, &objects);
    if (st) st = openSkeleton<dns_redirect>("dns_redirect", &opts, nullptr, &objects);
    if (st) st = openSkeleton<local_hop>("local_hop", &opts, nullptr, &objects);
    if (!st) return st;

    // The first load creates and pins the shared maps; the others reuse them by name.
    for (auto& o : objects)
      if (int err = o.load(); err != 0) return libbpfError("load BPF object " + o.name, err);

    int cg_fd = ::open(options_.cgroup_root.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (cg_fd < 0)
      return Status::errorf("open cgroup root {}: {}", options_.cgroup_root, errnoText(errno));
    UniqueFd cgroup(cg_fd);

    info_.programs.clear();
    for (auto& o : objects) {
      bpf_program* prog = nullptr;
      bpf_object__for_each_program(prog, o.obj) {
        std::string name = bpf_program__name(prog);
        if (int err = bpf_program__pin(prog, progPin(name.c_str()).c_str()); err != 0)
          return libbpfError("pin program " + progPin(name.c_str()), err);
        info_.programs.push_back(name);
        if (bpf_program__type(prog) == BPF_PROG_TYPE_SK_LOOKUP) continue;  // per netns
        if (bpf_program__type(prog) == BPF_PROG_TYPE_SK_MSG) {
          if (auto a = attachToHopMap(prog); !a) return a;
          continue;
        }
        bpf_link* link = bpf_program__attach_cgroup(prog, cgroup.get());
        if (!link)
          return libbpfError(fmt::format("attach {} to cgroup {}", name, options_.cgroup_root),
                             -errno);
        int err = bpf_link__pin(link, linkPin(name.c_str()).c_str());
        // Dropping our handle leaves the link attached only if the pin holds it.
        bpf_link__destroy(link);
        if (err != 0) return libbpfError("pin link " + linkPin(name.c_str()), err);
      }
    }
    // The ABI mark goes last: its presence says the set is complete.
    std::string abi = sub(WEFT_PIN_ABI);
    if (::symlink(WEFT_BPF_ABI_VERSION, abi.c_str()) != 0)
      return Status::errorf("write ABI mark {}: {}", abi, errnoText(errno));
    return Status::ok();
  }

  // The sk_msg program runs on the sockets of weft_hop_socks: attached to that (pinned) map.
  Status attachToHopMap(bpf_program* prog) {
    std::string pin = mapPin(WEFT_MAP_HOP_SOCKS);
    UniqueFd map(bpf_obj_get(pin.c_str()));
    if (!map.valid()) return Status::errorf("open {}: {}", pin, errnoText(errno));
    if (bpf_prog_attach(bpf_program__fd(prog), map.get(), BPF_SK_MSG_VERDICT, 0) != 0)
      return Status::errorf("attach {} to map {}: {}", bpf_program__name(prog), pin,
                            errnoText(errno));
    return Status::ok();
  }

  // Opens what this object needs from a complete pin set.
  Status adopt() {
    int fd = bpf_obj_get(mapPin(WEFT_MAP_ENROLLED).c_str());
    if (fd < 0) return Status::errorf("open {}: {}", mapPin(WEFT_MAP_ENROLLED), errnoText(errno));
    enrolled_fd_.reset(fd);
    fd = bpf_obj_get(mapPin(WEFT_MAP_INBOUND_BYPASS).c_str());
    if (fd < 0)
      return Status::errorf("open {}: {}", mapPin(WEFT_MAP_INBOUND_BYPASS), errnoText(errno));
    bypass_fd_.reset(fd);
    fd = bpf_obj_get(progPin(WEFT_PROG_SK_LOOKUP).c_str());
    if (fd < 0)
      return Status::errorf("open {}: {}", progPin(WEFT_PROG_SK_LOOKUP), errnoText(errno));
    sk_lookup_fd_.reset(fd);
    bpf_prog_info info{};
    uint32_t len = sizeof(info);
    if (bpf_obj_get_info_by_fd(sk_lookup_fd_.get(), &info, &len) != 0)
      return Status::errorf("{}: get info: {}", progPin(WEFT_PROG_SK_LOOKUP), errnoText(errno));
    sk_lookup_id_ = info.id;
    if (auto st = mkdirOne(sub(WEFT_PIN_NETNS)); !st) return st;
    if (info_.programs.empty()) {
      info_.programs.assign(std::begin(kCgroupProgs), std::end(kCgroupProgs));
      info_.programs.push_back(WEFT_PROG_SK_LOOKUP);
      info_.programs.push_back(WEFT_PROG_HOP_MSG);
    }
    fd = bpf_obj_get(mapPin(WEFT_MAP_HOP_CONFIG).c_str());
    if (fd < 0) return Status::errorf("open {}: {}", mapPin(WEFT_MAP_HOP_CONFIG), errnoText(errno));
    hop_config_fd_.reset(fd);
    fd = bpf_obj_get(mapPin(WEFT_MAP_HOP_STATS).c_str());
    if (fd < 0) return Status::errorf("open {}: {}", mapPin(WEFT_MAP_HOP_STATS), errnoText(errno));
    hop_stats_fd_.reset(fd);
    return setLocalHopAccel(options_.local_hop_accel);
  }

 public:
  Status setLocalHopAccel(bool on) override {
    if (destroyed_) return Status::error("dataplane destroyed");
    uint32_t key = 0;
    uint32_t hops = on ? (WEFT_HOP_OUTBOUND | WEFT_HOP_INBOUND) : 0;
    if (bpf_map_update_elem(hop_config_fd_.get(), &key, &hops, BPF_ANY) != 0)
      return Status::errorf("map {} update: {}", WEFT_MAP_HOP_CONFIG, errnoText(errno));
    spdlog::info("dataplane: local-hop acceleration {}", on ? "on" : "off");
    return Status::ok();
  }

  Result<LocalHopStatus> localHop() const override {
    if (destroyed_) return Status::error("dataplane destroyed");
    LocalHopStatus out;
    uint32_t key = 0;
    uint32_t hops = 0;
    if (bpf_map_lookup_elem(hop_config_fd_.get(), &key, &hops) != 0)
      return Status::errorf("map {} lookup: {}", WEFT_MAP_HOP_CONFIG, errnoText(errno));
    out.on = hops != 0;
    int ncpu = libbpf_num_possible_cpus();
    if (ncpu <= 0) return libbpfError("number of possible CPUs", ncpu);
    std::vector<uint64_t> per(static_cast<size_t>(ncpu));
    uint32_t index = 0;
    for (const char* name : kWeftHopStatNames) {
      if (bpf_map_lookup_elem(hop_stats_fd_.get(), &index, per.data()) != 0)
        return Status::errorf("map {} lookup {}: {}", WEFT_MAP_HOP_STATS, index,
                              errnoText(errno));
      uint64_t sum = 0;
      for (uint64_t v : per) sum += v;
      out.counters.emplace_back(name, sum);
      ++index;
    }
    return out;
  }

 private:

  // An agent that died between creating a pod's sk_lookup link and its weft_enrolled entry (or
  // between deleting them on unenroll) left a link that nothing lists: steering without
  // enrollment. enrolled() is the source of truth, so such links go.
  Status pruneNetnsLinks() {
    auto cookies = enrolled();
    std::set<std::string> keep;
    for (uint64_t c : cookies) keep.insert(std::to_string(c));
    for (const auto& name : listDir(sub(WEFT_PIN_NETNS))) {
      if (keep.count(name)) continue;
      spdlog::warn("dataplane: removing sk_lookup link of netns {}: not enrolled", name);
      if (auto st = detachPinnedLink(joinPath(sub(WEFT_PIN_NETNS), name)); !st) return st;
    }
    return Status::ok();
  }

  // OK if no pin is there or the pinned link is our sk_lookup program on a live netns.
  Status checkNetnsLink(const std::string& pin, uint64_t netns_ino) const {
    int fd = bpf_obj_get(pin.c_str());
    if (fd < 0) {
      if (errno == ENOENT) return Status::ok();
      return Status::errorf("open {}: {}", pin, errnoText(errno));
    }
    UniqueFd link(fd);
    bpf_link_info info{};
    uint32_t len = sizeof(info);
    if (bpf_obj_get_info_by_fd(link.get(), &info, &len) != 0)
      return Status::errorf("{}: get info: {}", pin, errnoText(errno));
    if (info.type != BPF_LINK_TYPE_NETNS || info.prog_id != sk_lookup_id_)
      return Status::errorf("{} is not this dataplane's sk_lookup link", pin);
    if (info.netns.netns_ino != netns_ino)
      return Status::errorf("{}: attached to netns inode {}, not {}", pin, info.netns.netns_ino,
                            netns_ino);
    return Status::ok();
  }

  DataplaneOptions options_;
  DataplaneInfo info_;
  uint64_t cgroup_id_ = 0;
  UniqueFd enrolled_fd_;
  UniqueFd bypass_fd_;
  UniqueFd sk_lookup_fd_;
  UniqueFd hop_config_fd_;
  UniqueFd hop_stats_fd_;
  uint32_t sk_lookup_id_ = 0;
  bool destroyed_ = false;
};

}  // namespace

Status Dataplane::cleanup(const DataplaneOptions& options) {
  if (options.testing) return Status::ok();
  std::string dir = options.pin_dir;
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  if (dir.empty() || dir[0] != '/')
    return Status::errorf("dataplane cleanup: pin dir '{}' must be an absolute path", dir);
  if (!exists(dir)) return Status::ok();
  if (auto st = removePinSet(dir); !st) return st.context("dataplane cleanup");
  if (::rmdir(dir.c_str()) != 0 && errno != ENOENT)
    return Status::errorf("dataplane cleanup: rmdir {}: {}", dir, errnoText(errno));
  spdlog::info("dataplane: detached everything and removed {}", dir);
  return Status::ok();
}

Result<std::unique_ptr<Dataplane>> Dataplane::open(const DataplaneOptions& options) {
  if (options.testing) return std::unique_ptr<Dataplane>(new MemoryDataplane(options.local_hop_accel));
  auto dp = std::make_unique<KernelDataplane>(options);
  if (auto st = dp->open(); !st) return st.context("dataplane");
  return std::unique_ptr<Dataplane>(std::move(dp));
}

}  // namespace weft::agent
