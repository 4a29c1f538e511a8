// Endpoint choice for services: round robin, power of two choices over peak-EWMA, ejection.
#include "ztunnel/balancer.h"

#include <time.h>

#include <algorithm>
#include <cmath>

namespace weft::ztunnel {

namespace {
// Holds the balancer's mutex when it is shared between loops (see Shared::locking).
std::unique_lock<std::recursive_mutex> guard(const EndpointLease::Shared& s) {
  return s.locking ? std::unique_lock<std::recursive_mutex>(s.mu)
                   : std::unique_lock<std::recursive_mutex>();
}
}  // namespace

int64_t monotonicNowNs() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

EndpointLease::EndpointLease(std::shared_ptr<const Shared> shared,
                             std::shared_ptr<EndpointLoad> load)
    : shared_(std::move(shared)), load_(std::move(load)) {
  load_->outstanding++;
  load_->last_used = shared_->clock();
}

EndpointLease::~EndpointLease() {
  auto lk = guard(*shared_);
  if (load_->outstanding > 0) load_->outstanding--;
}

void EndpointLease::begin() {
  auto lk = guard(*shared_);
  started_ = shared_->clock();
}

void EndpointLease::succeeded() {
  auto lk = guard(*shared_);
  if (reported_) return;
  reported_ = true;
  int64_t now = shared_->clock();
  EndpointLoad& l = *load_;
  l.successes++;
  l.consecutive_failures = 0;
  // Healthy for as long as it was last out: the next ejection starts from the base again.
  if (l.ejections_in_row > 0 && now >= l.ejected_until + l.last_ejection_ns)
    l.ejections_in_row = 0;
  if (started_ < 0) return;  // no start time: nothing to measure
  double sample = static_cast<double>(std::max<int64_t>(0, now - started_));
  if (!l.sampled || sample >= l.latency_ns) {
    // Peak sensitivity: worse news counts at once (and a first sample replaces the default).
    l.latency_ns = sample;
  } else {
    // Better news is blended in by how long the old estimate has stood.
    double decay_ns = static_cast<double>(shared_->options.decay.count());
    double w = std::exp(-static_cast<double>(now - l.sampled_at) / decay_ns);
    l.latency_ns = l.latency_ns * w + sample * (1.0 - w);
  }
  l.sampled = true;
  l.sampled_at = now;
}

bool EndpointLease::failed() {
  auto lk = guard(*shared_);
  if (reported_) return false;
  reported_ = true;
  int64_t now = shared_->clock();
  EndpointLoad& l = *load_;
  l.failures++;
  if (l.ejected_until > now) return false;  // already out (chosen because all were out)
  if (++l.consecutive_failures < shared_->options.eject_after_failures) return false;
  l.consecutive_failures = 0;
  l.ejections_in_row++;
  const BalancerOptions& o = shared_->options;
  int64_t d = o.base_ejection.count();
  for (uint32_t i = 1; i < l.ejections_in_row && d < o.max_ejection.count(); i++) d *= 2;
  d = std::min<int64_t>(d, o.max_ejection.count());
  l.ejected_until = now + d;
  l.last_ejection_ns = d;
  l.ejections++;
  return true;
}

Balancer::Balancer(BalancerOptions options, BalancerClock clock)
    : shared_(std::make_shared<const EndpointLease::Shared>(options, std::move(clock))),
      rng_(options.seed != 0 ? options.seed : std::random_device{}()) {}

std::shared_ptr<EndpointLoad>& Balancer::loadFor(const SocketAddress& endpoint) {
  auto& slot = loads_[endpoint];
  if (!slot) {
    slot = std::make_shared<EndpointLoad>();
    slot->last_used = now();
  }
  return slot;
}

double Balancer::decayedLatency(const EndpointLoad& l, int64_t now) const {
  // Unused, the estimate relaxes towards zero, so a slow endpoint that stopped being chosen
  // is tried again after a while (200 ms reaches 0.1 ms after ~76 s at a 10 s decay).
  double elapsed = static_cast<double>(std::max<int64_t>(0, now - l.sampled_at));
  return l.latency_ns * std::exp(-elapsed / static_cast<double>(options().decay.count()));
}

Balancer::Pick Balancer::pick(const std::string& service_key, LoadBalancing algorithm,
                              const std::vector<SocketAddress>& endpoints) {
  auto lk = guard(*shared_);
  Pick p;
  if (endpoints.empty()) return p;  // callers refuse before asking; keep index 0 harmless
  int64_t t = now();
  if (++picks_ % 1024 == 0) forgetIdle(t);

  std::vector<EndpointLoad*> loads;
  std::vector<size_t> usable;
  loads.reserve(endpoints.size());
  usable.reserve(endpoints.size());
  for (size_t i = 0; i < endpoints.size(); i++) {
    loads.push_back(loadFor(endpoints[i]).get());
    if (loads.back()->ejected_until <= t) usable.push_back(i);
  }
  if (usable.empty()) {
    // Everything is out: refusing would keep the service down for the ejection time after it
    // recovered, so ignore ejection (Envoy's panic mode does the same).
    p.all_ejected = true;
    for (size_t i = 0; i < endpoints.size(); i++) usable.push_back(i);
  }

  if (algorithm == LoadBalancing::kRoundRobin || usable.size() == 1) {
    p.index = usable[cursors_[service_key]++ % usable.size()];
  } else {
    // An endpoint never measured costs the (lower) median of its measured peers, or the
    // default when none is: neither favoured nor starved, and as its own open connections
    // count, a connect in flight keeps it from taking a burst before its first sample.
    std::vector<double> measured;
    for (size_t i : usable)
      if (loads[i]->sampled) measured.push_back(decayedLatency(*loads[i], t));
    double neutral = static_cast<double>(options().default_latency.count());
    if (!measured.empty()) {
      auto mid = measured.begin() + static_cast<std::ptrdiff_t>((measured.size() - 1) / 2);
      std::nth_element(measured.begin(), mid, measured.end());
      neutral = *mid;
    }
    auto costOf = [&](const EndpointLoad& l) {
      double latency = l.sampled ? decayedLatency(l, t) : neutral;
      return latency * (static_cast<double>(l.outstanding) + 1.0);
    };
    // Two distinct candidates at random; the cheaper one wins (ties: the first drawn).
    size_t n = usable.size();
    size_t a = static_cast<size_t>(rng_() % n);
    size_t b = static_cast<size_t>(rng_() % (n - 1));
    if (b >= a) b++;
    p.index = costOf(*loads[usable[b]]) < costOf(*loads[usable[a]]) ? usable[b] : usable[a];
  }
  loads[p.index]->picked++;
  loads[p.index]->last_used = t;
  return p;
}

Balancer Balancer::detachedCopy() const {
  auto lk = guard(*shared_);
  Balancer b(*this);
  for (auto& [addr, load] : b.loads_) load = std::make_shared<EndpointLoad>(*load);
  return b;
}

EndpointLeasePtr Balancer::lease(const SocketAddress& endpoint) {
  auto lk = guard(*shared_);
  return std::make_unique<EndpointLease>(shared_, loadFor(endpoint));
}

const EndpointLoad* Balancer::load(const SocketAddress& endpoint) const {
  auto lk = guard(*shared_);
  auto it = loads_.find(endpoint);
  return it == loads_.end() ? nullptr : it->second.get();
}

std::optional<double> Balancer::latencyNs(const SocketAddress& endpoint) const {
  auto lk = guard(*shared_);
  const EndpointLoad* l = load(endpoint);
  if (l == nullptr || !l->sampled) return std::nullopt;
  return decayedLatency(*l, now());
}

double Balancer::cost(const SocketAddress& endpoint, double neutral_ns) const {
  auto lk = guard(*shared_);
  const EndpointLoad* l = load(endpoint);
  if (l == nullptr) return neutral_ns;
  double latency = l->sampled ? decayedLatency(*l, now()) : neutral_ns;
  return latency * (static_cast<double>(l->outstanding) + 1.0);
}

bool Balancer::ejected(const SocketAddress& endpoint) const {
  auto lk = guard(*shared_);
  const EndpointLoad* l = load(endpoint);
  return l != nullptr && l->ejected_until > now();
}

void Balancer::forgetIdle(int64_t t) {
  int64_t idle = options().forget_after.count();
  for (auto it = loads_.begin(); it != loads_.end();) {
    const auto& l = it->second;
    bool unused = l.use_count() == 1 && l->outstanding == 0 && l->ejected_until <= t &&
                  t - l->last_used > idle;
    it = unused ? loads_.erase(it) : std::next(it);
  }
}

nlohmann::json Balancer::toJson() const {
  auto lk = guard(*shared_);
  int64_t t = now();
  nlohmann::json out = nlohmann::json::array();
  for (const auto& [addr, l] : loads_) {
    nlohmann::json e = {
        {"endpoint", addr.toString()},
        {"outstanding", l->outstanding},
        {"picked", l->picked},
        {"successes", l->successes},
        {"failures", l->failures},
        {"consecutive_failures", l->consecutive_failures},
        {"ejections", l->ejections},
        {"ejected_ms", l->ejected_until > t ? (l->ejected_until - t) / 1000000 : 0},
    };
    e["latency_ms"] = l->sampled ? nlohmann::json(decayedLatency(*l, t) / 1e6) : nullptr;
    out.push_back(std::move(e));
  }
  return out;
}

void Balancer::shareBetweenThreads() {
  if (shared_->locking) return;
  shared_ = std::make_shared<const EndpointLease::Shared>(shared_->options, shared_->clock, true);
}

}  // namespace weft::ztunnel
