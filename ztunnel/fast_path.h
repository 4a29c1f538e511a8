// The same-node fast path, the ztunnel's half: allowed verdicts of its own policy engine cached
// in the BPF map weft_fast_verdict (so the next connect() of that pod pair goes app -> app in the
// kernel), cleared whenever the cluster state changes, and the kernel's FAST_OPEN/FAST_CLOSE
// events turned into live connections, Istio metrics and access-log lines.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <tuple>

#include <nlohmann/json.hpp>

#include "bpf/abi/maps.h"
#include "common/fd.h"
#include "common/status.h"
#include "ztunnel/proxy.h"

namespace weft::ztunnel {

class FastPath {
 public:
  FastPath(Proxy& proxy, bool enabled) : proxy_(proxy), enabled_(enabled) {}

  // Opens <pin_dir>/maps/weft_fast_verdict (read-write) and weft_fast_stats, and clears verdicts
  // a previous ztunnel left. Empty = no kernel side (tests, agent-less runs): unavailable.
  // Failure leaves the fast path unavailable with the reason; connections take the ztunnel path.
  Status setPinDir(const std::string& pin_dir);
  bool available() const { return verdicts_.valid(); }
  bool enabled() const { return enabled_; }
  // Run-time switch (POST /fast_path?enabled=); off clears every cached verdict.
  void setEnabled(bool on);

  // Local pods by netns cookie (identity in the kernel is the netns cookie).
  void addPod(const std::string& uid, uint64_t netns_cookie);
  void removePod(const std::string& uid);
  // The local pod whose netns has this cookie ("" if none): the one cookie index of the ztunnel.
  std::string uidByCookie(uint64_t netns_cookie) const {
    auto it = uid_by_cookie_.find(netns_cookie);
    return it == uid_by_cookie_.end() ? std::string() : it->second;
  }

  // The cluster state changed (workloads, services, policies): a cached verdict may be stale,
  // so all of them go; the next connection of each pair takes the ztunnel path and decides again.
  void invalidate(const char* why);

  // Outbound: the ztunnel routed a connection of local pod `src` to `destination`. When it goes
  // to an enrolled pod on this node and the destination's policy allows it (as the HBONE path
  // would decide it, with `src`'s identity), later connections of that pair go fast.
  void consider(const WorkloadInfo& src, const Route& route, const SocketAddress& destination);
  // A worker loop's FastPath only forwards consider() to the main loop's (ztunnel/loops.h):
  // the verdict cache, its map and the kernel's events stay on one loop.
  using ConsiderForwarder =
      std::function<void(const WorkloadInfo&, const Route&, const SocketAddress&)>;
  void setForwarder(ConsiderForwarder f) { forwarder_ = std::move(f); }

  // A FAST_OPEN / FAST_CLOSE record from the ring.
  void onEvent(const weft_fast_event& e);

  nlohmann::json statusJson() const;       // GET /fast_path, weftctl status
  nlohmann::json connectionsJson() const;  // live fast connections, as /connections lists them
  size_t activeConnections() const { return live_.size(); }
  size_t cachedVerdicts() const { return cached_.size(); }
  // The kernel's counters (weft_fast_stats), summed over CPUs; empty when unavailable.
  std::map<std::string, uint64_t> kernelStats() const;

 private:
  struct Live {
    uint64_t id = 0;
    uint64_t start_ms = 0;  // loop time
    SocketAddress src, dst;
    std::string src_uid, dst_uid;
  };
  using CacheKey = std::tuple<uint64_t, std::string>;  // src cookie, dst addr:port
  using LiveKey = std::tuple<uint64_t, std::string>;   // src cookie, client addr:port
  // Deletes every cached verdict. Unless `force`, only when one was written since the last
  // clear: a cluster update then costs no system call when nothing went fast.
  void clearMap(bool force = false);
  // Labels of a fast connection (reporter "source"); false when the source pod is unknown.
  bool labelsOf(const Live& c, TcpLabels* out) const;
  void logLine(const Live& c, const TcpLabels& l, const char* direction, uint64_t bytes_up,
               uint64_t bytes_down, uint64_t duration_ms, const std::string& error) const;

  Proxy& proxy_;
  bool enabled_;
  std::string pin_dir_;
  std::string unavailable_reason_ = "no BPF pin dir from the agent yet";
  UniqueFd verdicts_;
  UniqueFd stats_;
  std::map<uint64_t, std::string> uid_by_cookie_;
  std::map<std::string, uint64_t> cookie_by_uid_;
  std::set<CacheKey> cached_;
  std::map<LiveKey, Live> live_;
  uint64_t cache_failures_logged_ = 0;
  bool map_dirty_ = false;  // a verdict was written since the last clear
  ConsiderForwarder forwarder_;
};

}  // namespace weft::ztunnel
