// weftctl bpf prog show | link show | map list | map dump NAME: the pinned objects under the
// agent's pin dir, opened with libbpf, keys and values decoded in mesh terms (bpf/abi/*.h).
#include "cli/bpf_decode.h"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <dirent.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ostream>

#include "bpf/abi/progs.h"
#include "cli/command.h"
#include "cli/objects.h"
#include "cli/table.h"
#include "common/address.h"
#include "common/fd.h"

namespace weft::cli {

using nlohmann::json;

// ---- decoding (pure; unit-tested) ----

namespace {

json addrJson(const weft_sockaddr& a) {
  if (a.family != WEFT_AF_INET && a.family != WEFT_AF_INET6) return nullptr;
  return SocketAddress::fromAbi(a).toString();
}

json ipJson(const weft_ip& ip) {
  if (ip.family != WEFT_AF_INET && ip.family != WEFT_AF_INET6) return nullptr;
  return IpAddr::fromAbi(ip).toString();
}

json podOrNull(const std::string& s) { return s.empty() ? json() : json(s); }

}  // namespace

PodNames PodNames::fromWorkloads(const json& workloads) {
  PodNames p;
  for (const json& w : workloads) {
    std::string key = keyOf(w);
    if (w.contains("netns_cookie") && w["netns_cookie"].is_number_unsigned())
      p.by_cookie[w["netns_cookie"].get<uint64_t>()] = key;
    for (const json& ip : w.value("ips", json::array()))
      if (ip.is_string()) p.by_ip[ip.get<std::string>()] = key;
  }
  return p;
}

std::string PodNames::cookie(uint64_t c) const {
  auto it = by_cookie.find(c);
  return it == by_cookie.end() ? "" : it->second;
}

std::string PodNames::ip(const std::string& a) const {
  auto it = by_ip.find(a);
  return it == by_ip.end() ? "" : it->second;
}

json decodeEnrolled(uint64_t cookie, const weft_enrollment& v, const PodNames& pods) {
  json flags = json::array();
  if (v.flags & WEFT_ENROLL_REDIRECT_OUTBOUND) flags.push_back("redirect_outbound");
  if (v.flags & WEFT_ENROLL_REDIRECT_DNS) flags.push_back("redirect_dns");
  return {{"netns_cookie", cookie}, {"pod", podOrNull(pods.cookie(cookie))},
          {"flags", flags}, {"workload_id", fmt::format("{:016x}", v.workload_id)}};
}

json decodeOrigDst(const weft_orig_dst_key& k, const weft_sockaddr& v, const PodNames& pods) {
  return {{"netns_cookie", k.netns_cookie}, {"pod", podOrNull(pods.cookie(k.netns_cookie))},
          {"client", addrJson(k.client)}, {"original_destination", addrJson(v)}};
}

json decodeDnsDst(const weft_dns_key& k, const weft_sockaddr& v, const PodNames& pods) {
  return {{"socket_cookie", k.socket_cookie}, {"netns_cookie", k.netns_cookie},
          {"pod", podOrNull(pods.cookie(k.netns_cookie))}, {"resolver", addrJson(v)}};
}

json decodeInboundListener(const weft_ip& k, uint64_t socket_cookie, const PodNames& pods) {
  json ip = ipJson(k);
  return {{"pod_ip", ip}, {"pod", podOrNull(ip.is_string() ? pods.ip(ip.get<std::string>()) : "")},
          {"listener_socket_cookie", socket_cookie}};
}

json decodeBypass(const weft_ip& k) { return {{"source_ip", ipJson(k)}}; }

// A per-CPU counter array entry (the fast path's and the local hop's stats): the key is the
// counter's index in `names`, the value one 8-byte count per possible CPU, `slot` bytes apart.
template <size_t N>
json perCpuCounter(const std::vector<uint8_t>& key, const std::vector<uint8_t>& value, int ncpu,
                   size_t slot, const char* const (&names)[N]) {
  uint32_t index;
  memcpy(&index, key.data(), 4);
  uint64_t sum = 0;
  for (int c = 0; c < ncpu; ++c) {
    uint64_t v;
    memcpy(&v, value.data() + static_cast<size_t>(c) * slot, 8);
    sum += v;
  }
  return {{"counter", index < N ? json(names[index]) : json(index)}, {"value", sum}};
}

// ---- the pinned objects ----

namespace {

std::vector<std::string> listDir(const std::string& dir, std::string* error) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) {
    *error = fmt::format("{}: {}", dir, errnoText(errno));
    return out;
  }
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") out.push_back(n);
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

Result<UniqueFd> openPin(const std::string& path) {
  UniqueFd fd(bpf_obj_get(path.c_str()));
  if (!fd.valid()) return Status::errorf("open pinned {}: {}", path, errnoText(errno));
  return fd;
}

std::string str(const char* s) { return s ? s : "unknown"; }

int progShow(Context& ctx, const std::vector<std::string>& args) {
  if (!args.empty()) return ctx.fail("bpf prog show takes no arguments");
  std::string dir = ctx.pinDir() + "/" WEFT_PIN_PROGS;
  std::string err;
  auto names = listDir(dir, &err);
  if (!err.empty()) return ctx.fail("pin dir: " + err);
  json out = json::array();
  for (const std::string& n : names) {
    auto fd = openPin(dir + "/" + n);
    if (!fd) return ctx.fail(fd.status());
    bpf_prog_info info{};
    uint32_t len = sizeof(info);
    if (bpf_obj_get_info_by_fd(fd->get(), &info, &len) != 0)
      return ctx.fail(fmt::format("{}/{}: get info: {}", dir, n, errnoText(errno)));
    std::string tag;
    for (uint8_t b : info.tag) tag += fmt::format("{:02x}", b);
    out.push_back({{"pin", dir + "/" + n}, {"name", info.name}, {"id", info.id},
                   {"type", str(libbpf_bpf_prog_type_str(static_cast<bpf_prog_type>(info.type)))},
                   {"tag", tag}, {"map_ids", info.nr_map_ids},
                   {"run_count", info.run_cnt}, {"run_time_ns", info.run_time_ns}});
  }
  if (ctx.json()) {
    ctx.printJson(out);
    return 0;
  }
  Table t({"PROGRAM", "ID", "TYPE", "TAG", "MAPS", "RUNS"});
  for (const json& p : out)
    t.add({cellOf(p, "name"), cellOf(p, "id"), cellOf(p, "type"), cellOf(p, "tag"),
           cellOf(p, "map_ids"), cellOf(p, "run_count")});
  ctx.out() << "pins: " << dir << "\n" << t.render();
  return 0;
}

json linkJson(int fd, const std::string& pin, const PodNames& pods, uint64_t netns_cookie,
              std::string* err) {
  bpf_link_info info{};
  uint32_t len = sizeof(info);
  if (bpf_obj_get_info_by_fd(fd, &info, &len) != 0) {
    *err = fmt::format("{}: get info: {}", pin, errnoText(errno));
    return nullptr;
  }
  json j = {{"pin", pin}, {"id", info.id}, {"prog_id", info.prog_id},
            {"type", str(libbpf_bpf_link_type_str(static_cast<bpf_link_type>(info.type)))}};
  if (info.type == BPF_LINK_TYPE_CGROUP) {
    j["attach_type"] = str(libbpf_bpf_attach_type_str(
        static_cast<bpf_attach_type>(info.cgroup.attach_type)));
    j["cgroup_id"] = info.cgroup.cgroup_id;
  } else if (info.type == BPF_LINK_TYPE_NETNS) {
    j["attach_type"] = str(libbpf_bpf_attach_type_str(
        static_cast<bpf_attach_type>(info.netns.attach_type)));
    j["netns_ino"] = info.netns.netns_ino;
    j["netns_cookie"] = netns_cookie;
    j["pod"] = podOrNull(pods.cookie(netns_cookie));
  }
  // A program name helps people more than an id.
  UniqueFd prog(bpf_prog_get_fd_by_id(info.prog_id));
  if (prog.valid()) {
    bpf_prog_info pi{};
    uint32_t pl = sizeof(pi);
    if (bpf_obj_get_info_by_fd(prog.get(), &pi, &pl) == 0) j["prog"] = pi.name;
  }
  return j;
}

PodNames podNames(Context& ctx) {
  auto w = ctx.agentGet("/workloads");
  return w ? PodNames::fromWorkloads(w.value()) : PodNames();
}

int linkShow(Context& ctx, const std::vector<std::string>& args) {
  if (!args.empty()) return ctx.fail("bpf link show takes no arguments");
  std::string pin = ctx.pinDir();
  PodNames pods = podNames(ctx);
  json out = json::array();
  for (const char* sub : {WEFT_PIN_LINKS, WEFT_PIN_NETNS}) {
    std::string dir = pin + "/" + sub, err;
    auto names = listDir(dir, &err);
    if (!err.empty()) return ctx.fail("pin dir: " + err);
    for (const std::string& n : names) {
      auto fd = openPin(dir + "/" + n);
      if (!fd) return ctx.fail(fd.status());
      uint64_t cookie = 0;
      if (std::string(sub) == WEFT_PIN_NETNS) cookie = std::strtoull(n.c_str(), nullptr, 10);
      json j = linkJson(fd->get(), dir + "/" + n, pods, cookie, &err);
      if (!err.empty()) return ctx.fail(err);
      out.push_back(j);
    }
  }
  if (ctx.json()) {
    ctx.printJson(out);
    return 0;
  }
  Table t({"LINK", "ID", "TYPE", "ATTACH", "PROGRAM", "TARGET"});
  for (const json& l : out) {
    std::string target = l.contains("cgroup_id") ? "cgroup " + cellOf(l, "cgroup_id")
                         : l.contains("netns_ino")
                             ? "netns " + cellOf(l, "netns_cookie") + " (" + cellOf(l, "pod") + ")"
                             : "-";
    std::string pinname = l["pin"].get<std::string>().substr(pin.size() + 1);
    t.add({pinname, cellOf(l, "id"), cellOf(l, "type"), cellOf(l, "attach_type"),
           cellOf(l, "prog"), target});
  }
  ctx.out() << t.render();
  return 0;
}

struct MapInfo {
  bpf_map_info info{};
};

Result<bpf_map_info> mapInfo(int fd, const std::string& path) {
  bpf_map_info info{};
  uint32_t len = sizeof(info);
  if (bpf_obj_get_info_by_fd(fd, &info, &len) != 0)
    return Status::errorf("{}: get info: {}", path, errnoText(errno));
  return info;
}

bool enumerable(uint32_t type) {
  return type != BPF_MAP_TYPE_RINGBUF && type != BPF_MAP_TYPE_SK_STORAGE;
}

// Keys of a hash-like map, bounded by max_entries (+1 for entries added while we walk).
Result<std::vector<std::vector<uint8_t>>> keysOf(int fd, const bpf_map_info& info,
                                                 const std::string& path) {
  std::vector<std::vector<uint8_t>> keys;
  std::vector<uint8_t> prev, next(info.key_size);
  bool first = true;
  for (uint32_t i = 0; i <= info.max_entries; i++) {
    int rc = bpf_map_get_next_key(fd, first ? nullptr : prev.data(), next.data());
    if (rc != 0) {
      if (errno == ENOENT) break;
      return Status::errorf("{}: next key: {}", path, errnoText(errno));
    }
    keys.push_back(next);
    prev = next;
    first = false;
  }
  return keys;
}

// The ring's producer and consumer positions, from its read-only mapped pages.
json ringStats(int fd, const bpf_map_info& info) {
  long page = ::sysconf(_SC_PAGESIZE);
  json j = {{"capacity_bytes", info.max_entries}};
  void* cons = ::mmap(nullptr, static_cast<size_t>(page), PROT_READ, MAP_SHARED, fd, 0);
  if (cons == MAP_FAILED) {
    j["error"] = "mmap consumer page: " + errnoText(errno);
    return j;
  }
  void* prod = ::mmap(nullptr, static_cast<size_t>(page), PROT_READ, MAP_SHARED, fd, page);
  if (prod == MAP_FAILED) {
    j["error"] = "mmap producer page: " + errnoText(errno);
    ::munmap(cons, static_cast<size_t>(page));
    return j;
  }
  uint64_t c = __atomic_load_n(static_cast<uint64_t*>(cons), __ATOMIC_ACQUIRE);
  uint64_t p = __atomic_load_n(static_cast<uint64_t*>(prod), __ATOMIC_ACQUIRE);
  ::munmap(cons, static_cast<size_t>(page));
  ::munmap(prod, static_cast<size_t>(page));
  j["consumer_pos"] = c;
  j["producer_pos"] = p;
  j["pending_bytes"] = p >= c ? p - c : 0;
  return j;
}

int mapList(Context& ctx, const std::vector<std::string>& args) {
  if (!args.empty()) return ctx.fail("bpf map list takes no arguments");
  std::string dir = ctx.pinDir() + "/" WEFT_PIN_MAPS, err;
  auto names = listDir(dir, &err);
  if (!err.empty()) return ctx.fail("pin dir: " + err);
  json out = json::array();
  for (const std::string& n : names) {
    std::string path = dir + "/" + n;
    auto fd = openPin(path);
    if (!fd) return ctx.fail(fd.status());
    auto info = mapInfo(fd->get(), path);
    if (!info) return ctx.fail(info.status());
    json j = {{"name", n}, {"pin", path}, {"id", info->id},
              {"type", str(libbpf_bpf_map_type_str(static_cast<bpf_map_type>(info->type)))},
              {"key_size", info->key_size}, {"value_size", info->value_size},
              {"max_entries", info->max_entries}, {"entries", nullptr}};
    if (enumerable(info->type)) {
      auto keys = keysOf(fd->get(), info.value(), path);
      if (!keys) return ctx.fail(keys.status());
      j["entries"] = keys->size();
    }
    if (info->type == BPF_MAP_TYPE_RINGBUF) j["ring"] = ringStats(fd->get(), info.value());
    out.push_back(j);
  }
  if (ctx.json()) {
    ctx.printJson(out);
    return 0;
  }
  Table t({"MAP", "ID", "TYPE", "KEY", "VALUE", "MAX", "ENTRIES"});
  for (const json& m : out) {
    std::string entries = cellOf(m, "entries");
    if (m.contains("ring"))
      entries = fmt::format("{} bytes pending", cellOf(m["ring"], "pending_bytes"));
    else if (m["entries"].is_null())
      entries = "(on sockets)";
    t.add({cellOf(m, "name"), cellOf(m, "id"), cellOf(m, "type"), cellOf(m, "key_size"),
           cellOf(m, "value_size"), cellOf(m, "max_entries"), entries});
  }
  ctx.out() << "pins: " << dir << "\n" << t.render();
  return 0;
}

int mapDump(Context& ctx, const std::vector<std::string>& args) {
  if (args.size() != 1) return ctx.fail("usage: weftctl bpf map dump NAME");
  std::string dir = ctx.pinDir() + "/" WEFT_PIN_MAPS, err;
  auto names = listDir(dir, &err);
  if (!err.empty()) return ctx.fail("pin dir: " + err);
  std::string want = args[0];
  if (std::find(names.begin(), names.end(), want) == names.end() &&
      std::find(names.begin(), names.end(), "weft_" + want) != names.end())
    want = "weft_" + want;
  auto m = matchPrefix(want, names, "map");
  if (!m) return ctx.fail(m.status());
  std::string name = m.value(), path = dir + "/" + name;
  auto fd = openPin(path);
  if (!fd) return ctx.fail(fd.status());
  auto info = mapInfo(fd->get(), path);
  if (!info) return ctx.fail(info.status());
  PodNames pods = podNames(ctx);
  json doc = {{"map", name}, {"pin", path},
              {"type", str(libbpf_bpf_map_type_str(static_cast<bpf_map_type>(info->type)))}};
  json entries = json::array();
  auto check = [&](size_t k, size_t v) {
    return info->key_size == k && info->value_size == v;
  };
  if (info->type == BPF_MAP_TYPE_RINGBUF) {
    doc["ring"] = ringStats(fd->get(), info.value());
    // The consumer is the ztunnel; its counts say what it read and fanned out.
    if (auto zd = ctx.ztunnelGet("/config_dump"); zd && zd->contains("events"))
      doc["ztunnel_consumer"] = (*zd)["events"];
  } else if (info->type == BPF_MAP_TYPE_SK_STORAGE) {
    doc["note"] = "socket-local storage: entries live on the sockets and cannot be listed";
  } else {
    auto keys = keysOf(fd->get(), info.value(), path);
    if (!keys) return ctx.fail(keys.status());
    // Per-CPU maps answer a lookup with one (8-byte aligned) value per possible CPU.
    bool percpu = info->type == BPF_MAP_TYPE_PERCPU_ARRAY ||
                  info->type == BPF_MAP_TYPE_PERCPU_HASH ||
                  info->type == BPF_MAP_TYPE_LRU_PERCPU_HASH;
    int ncpu = percpu ? libbpf_num_possible_cpus() : 1;
    if (ncpu <= 0) return ctx.fail(std::string("cannot count the possible CPUs"));
    size_t slot = percpu ? (info->value_size + 7) / 8 * 8 : info->value_size;
    std::vector<uint8_t> value(slot * static_cast<size_t>(ncpu));
    for (const auto& k : keys.value()) {
      if (bpf_map_lookup_elem(fd->get(), k.data(), value.data()) != 0) continue;  // gone
      json e;
      if (name == WEFT_MAP_ENROLLED && check(8, sizeof(weft_enrollment))) {
        uint64_t cookie;
        weft_enrollment v;
        memcpy(&cookie, k.data(), 8);
        memcpy(&v, value.data(), sizeof(v));
        e = decodeEnrolled(cookie, v, pods);
      } else if (name == WEFT_MAP_ORIG_DST &&
                 check(sizeof(weft_orig_dst_key), sizeof(weft_sockaddr))) {
        weft_orig_dst_key key;
        weft_sockaddr v;
        memcpy(&key, k.data(), sizeof(key));
        memcpy(&v, value.data(), sizeof(v));
        e = decodeOrigDst(key, v, pods);
      } else if (name == WEFT_MAP_DNS_DST && check(sizeof(weft_dns_key), sizeof(weft_sockaddr))) {
        weft_dns_key key;
        weft_sockaddr v;
        memcpy(&key, k.data(), sizeof(key));
        memcpy(&v, value.data(), sizeof(v));
        e = decodeDnsDst(key, v, pods);
      } else if (name == WEFT_MAP_INBOUND_LISTENERS && check(sizeof(weft_ip), 8)) {
        weft_ip key;
        uint64_t cookie;
        memcpy(&key, k.data(), sizeof(key));
        memcpy(&cookie, value.data(), 8);
        e = decodeInboundListener(key, cookie, pods);
      } else if (name == WEFT_MAP_FAST_STATS && percpu && info->value_size == 8) {
        e = perCpuCounter(k, value, ncpu, slot, kWeftFastStatNames);
      } else if (name == WEFT_MAP_HOP_STATS && percpu && info->value_size == 8) {
        e = perCpuCounter(k, value, ncpu, slot, kWeftHopStatNames);
      } else if (name == WEFT_MAP_HOP_SOCKS && check(sizeof(weft_hop_key), 8)) {
        // A hop socket by its own view of the connection; the value is its socket cookie.
        weft_hop_key key;
        uint64_t cookie;
        memcpy(&key, k.data(), sizeof(key));
        memcpy(&cookie, value.data(), 8);
        auto it = pods.by_cookie.find(key.netns_cookie);
        e = {{"pod", it == pods.by_cookie.end() ? json() : json(it->second)},
             {"netns_cookie", key.netns_cookie},
             {"local", SocketAddress::fromAbi(key.local).toString()},
             {"remote", SocketAddress::fromAbi(key.remote).toString()},
             {"socket_cookie", cookie}};
      } else if (name == WEFT_MAP_FAST_VERDICT &&
                 check(sizeof(weft_fast_key), sizeof(weft_fast_verdict))) {
        weft_fast_key key;
        weft_fast_verdict v;
        memcpy(&key, k.data(), sizeof(key));
        memcpy(&v, value.data(), sizeof(v));
        auto pod = [&](uint64_t cookie) -> json {
          auto it = pods.by_cookie.find(cookie);
          return it == pods.by_cookie.end() ? json() : json(it->second);
        };
        e = {{"pod", pod(key.src_netns_cookie)},
             {"netns_cookie", key.src_netns_cookie},
             {"original_destination", SocketAddress::fromAbi(key.dst).toString()},
             {"destination_pod", pod(v.dst_netns_cookie)}};
      } else if (name == WEFT_MAP_FAST_CONN && check(sizeof(weft_fast_conn_key), 8)) {
        weft_fast_conn_key key;
        uint64_t cookie;
        memcpy(&key, k.data(), sizeof(key));
        memcpy(&cookie, value.data(), 8);
        auto it = pods.by_cookie.find(cookie);
        e = {{"pod", it == pods.by_cookie.end() ? json() : json(it->second)},
             {"netns_cookie", cookie},
             {"client", SocketAddress::fromAbi(key.src).toString()},
             {"original_destination", SocketAddress::fromAbi(key.dst).toString()}};
      } else if (name == WEFT_MAP_INBOUND_BYPASS && info->key_size == sizeof(weft_ip)) {
        weft_ip key;
        memcpy(&key, k.data(), sizeof(key));
        e = decodeBypass(key);
      } else {
        std::string kh, vh;
        for (uint8_t b : k) kh += fmt::format("{:02x}", b);
        for (uint8_t b : value) vh += fmt::format("{:02x}", b);
        e = {{"key", kh}, {"value", vh}};
      }
      entries.push_back(e);
    }
    doc["entries"] = entries;
  }
  if (ctx.json()) {
    ctx.printJson(doc);
    return 0;
  }
  ctx.out() << fmt::format("map {} ({}), pin {}\n", name, doc["type"].get<std::string>(), path);
  if (doc.contains("note")) ctx.out() << doc["note"].get<std::string>() << "\n";
  if (doc.contains("ring")) ctx.out() << "ring: " << cell(doc["ring"]) << "\n";
  if (doc.contains("ztunnel_consumer"))
    ctx.out() << "consumer (ztunnel): " << cell(doc["ztunnel_consumer"]) << "\n";
  if (!entries.empty()) {
    // Columns in a reading order: who (pod), then the key, then what it maps to.
    std::vector<std::string> header;
    for (const char* k : {"pod", "pod_ip", "netns_cookie", "socket_cookie", "local", "remote",
                          "client",
                          "original_destination", "destination_pod", "resolver",
                          "listener_socket_cookie", "counter", "source_ip", "flags",
                          "workload_id", "key", "value"})
      if (entries[0].contains(k)) header.push_back(k);
    std::vector<std::string> upper = header;
    for (auto& h : upper)
      for (char& c : h) c = static_cast<char>(toupper(static_cast<unsigned char>(c)));
    Table t(upper);
    for (const json& e : entries) {
      std::vector<std::string> row;
      for (const auto& h : header) row.push_back(cellOf(e, h.c_str()));
      t.add(row);
    }
    ctx.out() << t.render();
  } else if (doc.contains("entries")) {
    ctx.out() << "(no entries)\n";
  }
  return 0;
}

}  // namespace

Command bpfCommand() {
  Command prog{"prog", "prog { show }", "Weft's pinned BPF programs", nullptr, {}, "show"};
  prog.children.push_back({"show", "show", "id, type, tag, maps, run count of each program",
                           progShow, {}, ""});
  Command link{"link", "link { show }", "Weft's pinned links (cgroup hooks, per-pod sk_lookup)",
               nullptr, {}, "show"};
  link.children.push_back({"show", "show", "link id, type, attach point, program, target",
                           linkShow, {}, ""});
  Command map{"map", "map { list | dump NAME }", "Weft's pinned maps", nullptr, {}, "list"};
  map.children.push_back({"list", "list", "type, sizes, entries (ring: bytes pending)", mapList,
                          {}, ""});
  map.children.push_back({"dump", "dump NAME", "entries decoded: pods, destinations, listeners",
                          mapDump, {}, ""});
  Command c{"bpf", "bpf { prog | link | map } ...",
            "BPF objects pinned under the agent's pin dir (--pin-dir)", nullptr, {}, ""};
  c.children = {prog, link, map};
  return c;
}

}  // namespace weft::cli
