// The local workloads the agent handed over: per pod, its netns and its listeners (15001, 15006,
// 15008, IPv4 and IPv6) inside that netns, registered for inbound steering, and its DNS proxy
// (15053, UDP and TCP).
#pragma once

#include <uv.h>

#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/inbound_listener_map.h"
#include "common/uv_handle.h"
#include "ztunnel/dns.h"
#include "ztunnel/proxy.h"

namespace weft::ztunnel {

struct ListenerPorts {
  uint16_t outbound = 15001;
  uint16_t inbound = 15006;
  uint16_t hbone = 15008;
  uint16_t dns = 15053;  // 0: no DNS proxy
};

// One pod's listeners, all on the proxy's loop. Closing them leaves open connections alone.
class PodListeners {
 public:
  // Creates the listeners in `pod`'s netns. IPv6 ones are required only when the pod has an
  // IPv6 address (a netns without IPv6 still gets its IPv4 listeners).
  static Result<std::unique_ptr<PodListeners>> create(Proxy& proxy, LocalPodPtr pod,
                                                      ListenerPorts ports,
                                                      DnsResolverLookup dns_lookup = {});
  // The inbound listener's fd for pod IPs of `family`, or -1.
  int inboundFd(int family) const;
  std::vector<std::string> describe() const;

 private:
  enum class Kind { kOutbound, kInbound, kHbone };
  struct Listener {
    UvHandle<uv_tcp_t> handle;
    Proxy* proxy = nullptr;
    LocalPodPtr pod;
    Kind kind = Kind::kOutbound;
    SocketAddress addr;
    int fd = -1;
  };
  Status add(Proxy& proxy, const LocalPodPtr& pod, const SocketAddress& addr, Kind kind);

  std::vector<std::unique_ptr<Listener>> listeners_;
  std::unique_ptr<PodDnsServer> dns_;
};

class LocalWorkloads {
 public:
  explicit LocalWorkloads(Proxy& proxy, ListenerPorts ports = {}) : proxy_(proxy), ports_(ports) {}

  // Where inbound listeners get registered. An empty pin dir means no steering (no agent BPF,
  // as in tests); otherwise the map must open, now or at the next add().
  Status setPinDir(const std::string& pin_dir);

  // Adopts a pod: creates its listeners, registers them, and only then returns ok. A uid
  // already held is kept as it is (the new netns fd is dropped).
  Status add(const WorkloadInfo& info, UniqueFd netns);
  // Unregisters and closes a pod's listeners; its open connections go on. Unknown uid: ok.
  Status remove(const std::string& uid);
  // Removes every pod whose uid is not in `keep` (after a snapshot).
  void retainOnly(const std::set<std::string>& keep);
  // Test seam: where forwarded DNS queries go, instead of the BPF maps under the pin dir.
  void setDnsLookupForTest(DnsResolverLookup lookup) { dns_lookup_for_test_ = std::move(lookup); }
  // Closes every listener without unregistering anything (drain before exit).
  void closeAllListeners();

  bool contains(const std::string& uid) const { return pods_.count(uid) != 0; }
  // The held pod with this uid, or null.
  LocalPodPtr pod(const std::string& uid) const {
    auto it = pods_.find(uid);
    return it == pods_.end() ? nullptr : it->second.pod;
  }
  // The local pod that has `ip`, or null. An index lookup: the HBONE server asks this for
  // every CONNECT stream, so it must not walk the pods.
  LocalPodPtr podByIp(const IpAddr& ip) const;
  size_t size() const { return pods_.size(); }
  nlohmann::json toJson() const;

 private:
  struct Entry {
    LocalPodPtr pod;
    std::unique_ptr<PodListeners> listeners;
    std::vector<IpAddr> registered;
  };
  Status openMap();
  void unregister(Entry& e);
  // The resolver lookup for DNS proxies: the pinned maps, opened on first use (and retried
  // while they cannot be), or the test seam.
  DnsResolverLookup dnsLookup();

  Proxy& proxy_;
  ListenerPorts ports_;
  std::string pin_dir_;
  std::optional<InboundListenerMap> map_;
  DnsResolverLookup dns_lookup_for_test_;
  std::map<std::string, Entry> pods_;
  // Every IP of every held pod -> that pod (kept with pods_; the first pod added with an IP
  // keeps it, as the old scan in uid order did not guarantee either).
  std::map<IpAddr, LocalPodPtr> pod_by_ip_;
};

}  // namespace weft::ztunnel
