// Weft's own metric families on 15020 beyond the counter list in stats.h: certificate expiry
// and state per identity, DNS queries by outcome, build info.
#pragma once

#include <string>
#include <vector>

#include "ztunnel/identity.h"
#include "ztunnel/stats.h"

namespace weft::ztunnel {

// weft_ztunnel_certificate_expiry_seconds{identity} (not_after - now; negative once expired;
// identities still pending have none) and weft_ztunnel_certificates{state} (identities per
// state: pending, valid, renewing, expired).
std::string renderCertificateMetrics(const std::vector<IdentityView>& views, tls::TimePoint now);

// weft_ztunnel_dns_query_outcomes_total{outcome}: local (answered from the cluster state),
// forwarded (the upstream's answer relayed), failed (forwarding failed: SERVFAIL or dropped),
// malformed. A query read ends in at most one of them (none while in flight, or when its TCP
// client went away first).
std::string renderDnsOutcomes(const ZtunnelStats& s);

// istio_build{component="ztunnel",tag} (what Istio's dashboards read) and
// weft_build_info{component="ztunnel",version}, both 1.
std::string renderBuildInfo(const std::string& version);

// What the idle memory trim did (ztunnel/memory_trim.h) and what the loops' HBONE buffer pools
// hold now (summed over loops).
struct MemoryMetrics {
  uint64_t trims = 0;               // malloc_trim calls
  uint64_t trim_microseconds = 0;   // time spent in them
  uint64_t pool_releases = 0;       // a loop freed its idle pools
  uint64_t released_bytes = 0;      // bytes those releases freed
  uint64_t pooled_cipher_bytes = 0;
  uint64_t pooled_chunk_bytes = 0;
};
// weft_ztunnel_memory_trims_total, weft_ztunnel_memory_trim_seconds_total,
// weft_ztunnel_memory_pool_releases_total, weft_ztunnel_memory_pool_released_bytes_total and
// weft_ztunnel_memory_pooled_bytes{pool="ciphertext"|"chunk"}.
std::string renderMemoryMetrics(const MemoryMetrics& m);

}  // namespace weft::ztunnel
