// Per-loop load balancing of service endpoints (ARCHITECTURE "Load balancing"): round robin, or
// power of two choices over peak-EWMA latency × open connections; endpoints that refuse
// connects are ejected for a while, Envoy outlier-detection style.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/address.h"
#include "ztunnel/cluster_state.h"

namespace weft::ztunnel {

struct BalancerOptions {
  // Peak-EWMA: how fast the latency estimate forgets (time constant of the decay).
  std::chrono::nanoseconds decay = std::chrono::seconds(10);
  // The estimate of a service's endpoints when none has been measured yet (Linkerd's default).
  std::chrono::nanoseconds default_latency = std::chrono::milliseconds(30);
  // Ejection: this many connect failures in a row take an endpoint out ...
  uint32_t eject_after_failures = 5;
  // ... for `base_ejection`, doubled for each ejection in a row, at most `max_ejection`.
  std::chrono::nanoseconds base_ejection = std::chrono::seconds(10);
  std::chrono::nanoseconds max_ejection = std::chrono::seconds(300);
  // Endpoint records without connections and unused this long are forgotten.
  std::chrono::nanoseconds forget_after = std::chrono::minutes(10);
  // Seed of the power-of-two-choices RNG; 0 = from std::random_device.
  uint64_t seed = 0;
};

// Monotonic time in nanoseconds. Injected so tests can move it.
using BalancerClock = std::function<int64_t()>;
// CLOCK_MONOTONIC, the production clock.
int64_t monotonicNowNs();

// What the balancer knows about one endpoint address (ip:port). Shared by every service that
// lists it and by the leases of the connections open to it.
struct EndpointLoad {
  // Peak-EWMA latency estimate (ns) as of `sampled_at`; meaningful once `sampled`.
  double latency_ns = 0;
  bool sampled = false;
  int64_t sampled_at = 0;
  uint32_t outstanding = 0;           // connections open (or opening) to it
  uint32_t consecutive_failures = 0;  // since the last success or ejection
  uint32_t ejections_in_row = 0;      // how many times it was ejected without recovering
  int64_t ejected_until = 0;
  int64_t last_ejection_ns = 0;       // length of the last ejection
  int64_t last_used = 0;
  uint64_t picked = 0, successes = 0, failures = 0, ejections = 0;
};

// One connection's hold on an endpoint: counts as outstanding from creation to destruction,
// and reports how the connect went (at most once).
class EndpointLease {
 public:
  struct Shared {
    Shared(BalancerOptions o, BalancerClock c, bool l = false)
        : options(o), clock(std::move(c)), locking(l) {}
    BalancerOptions options;
    BalancerClock clock;
    // A multi-loop ztunnel shares one Balancer between its loops: every call into it and into
    // its leases then holds `mu` (recursive: pick() asks cost()). Never held across I/O.
    bool locking = false;
    mutable std::recursive_mutex mu;
  };
  EndpointLease(std::shared_ptr<const Shared> shared, std::shared_ptr<EndpointLoad> load);
  ~EndpointLease();
  EndpointLease(const EndpointLease&) = delete;
  EndpointLease& operator=(const EndpointLease&) = delete;

  // The connect (plain TCP) or CONNECT (HBONE) starts now: latency is measured from here.
  void begin();
  // It succeeded now: one latency sample, the failure streak ends.
  void succeeded();
  // It failed (connect error, HBONE 503 or no answer). True if this ejected the endpoint.
  bool failed();

 private:
  std::shared_ptr<const Shared> shared_;
  std::shared_ptr<EndpointLoad> load_;
  int64_t started_ = -1;
  bool reported_ = false;
};
using EndpointLeasePtr = std::unique_ptr<EndpointLease>;

class Balancer {
 public:
  explicit Balancer(BalancerOptions options = {}, BalancerClock clock = monotonicNowNs);

  struct Pick {
    size_t index = 0;          // into the endpoints given
    bool all_ejected = false;  // every endpoint was ejected, so ejection was ignored
  };
  // Chooses one of `endpoints` (not empty) for a new connection to `service_key`. Ejected
  // endpoints are skipped while any other is left; when all are ejected all are candidates.
  Pick pick(const std::string& service_key, LoadBalancing algorithm,
            const std::vector<SocketAddress>& endpoints);
  // A hold on `endpoint` for a connection about to go there.
  EndpointLeasePtr lease(const SocketAddress& endpoint);

  // Peak-EWMA cost of an endpoint now (the estimate decayed to now × (outstanding + 1));
  // `neutral_ns` stands in for an endpoint never measured.
  double cost(const SocketAddress& endpoint, double neutral_ns) const;
  // The decayed latency estimate now, or nullopt if never measured.
  std::optional<double> latencyNs(const SocketAddress& endpoint) const;
  bool ejected(const SocketAddress& endpoint) const;
  const EndpointLoad* load(const SocketAddress& endpoint) const;
  size_t trackedEndpoints() const { return loads_.size(); }
  int64_t now() const { return shared_->clock(); }
  const BalancerOptions& options() const { return shared_->options; }

  // Per endpoint: latency estimate, outstanding, failures, ejection state (/config_dump).
  nlohmann::json toJson() const;
  // From now on calls may come from several threads (the loops of a multi-loop ztunnel): they
  // serialise on a mutex. Call before any lease exists.
  void shareBetweenThreads();
  // A copy that shares nothing with this one: what-if decisions (GET /trace) pick from it
  // without moving this balancer's cursors or counters.
  Balancer detachedCopy() const;

 private:
  std::shared_ptr<EndpointLoad>& loadFor(const SocketAddress& endpoint);
  double decayedLatency(const EndpointLoad& l, int64_t now) const;
  void forgetIdle(int64_t now);

  std::shared_ptr<const EndpointLease::Shared> shared_;
  std::mt19937_64 rng_;
  std::map<std::string, uint64_t> cursors_;  // round robin, per service
  struct AddressLess {
    bool operator()(const SocketAddress& a, const SocketAddress& b) const {
      if (a.ip() == b.ip()) return a.port() < b.port();
      return a.ip() < b.ip();
    }
  };
  std::map<SocketAddress, std::shared_ptr<EndpointLoad>, AddressLess> loads_;
  uint64_t picks_ = 0;
};

}  // namespace weft::ztunnel
