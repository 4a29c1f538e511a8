// Rendering of Weft's own metric families (certificates, DNS outcomes, build info).
#include "ztunnel/weft_metrics.h"

#include <chrono>
#include <map>

#include "ztunnel/prometheus_text.h"

namespace weft::ztunnel {

std::string renderCertificateMetrics(const std::vector<IdentityView>& views,
                                     tls::TimePoint now) {
  PromText p;
  p.family("weft_ztunnel_certificate_expiry_seconds", "gauge",
           "Seconds until the current certificate of each workload identity expires (not_after "
           "minus now; negative once expired)");
  std::map<std::string, uint64_t> states = {
      {"pending", 0}, {"valid", 0}, {"renewing", 0}, {"expired", 0}};
  for (const IdentityView& v : views) {
    states[certStateName(v.state)]++;
    if (v.state == CertState::kPending || v.not_after == tls::TimePoint{}) continue;
    int64_t secs =
        std::chrono::duration_cast<std::chrono::seconds>(v.not_after - now).count();
    p.sample("weft_ztunnel_certificate_expiry_seconds", {{"identity", v.identity}}, secs);
  }
  p.family("weft_ztunnel_certificates", "gauge",
           "Workload identities of this node by the state of their certificate");
  for (const auto& [state, n] : states)
    p.sample("weft_ztunnel_certificates", {{"state", state}}, n);
  return p.take();
}

std::string renderDnsOutcomes(const ZtunnelStats& s) {
  PromText p;
  p.family("weft_ztunnel_dns_query_outcomes_total", "counter",
           "DNS queries received by the pods' DNS proxies, by how they ended");
  const char* name = "weft_ztunnel_dns_query_outcomes_total";
  p.sample(name, {{"outcome", "local"}}, s.dns_answered_locally_total);
  p.sample(name, {{"outcome", "forwarded"}}, s.dns_upstream_answers_total);
  p.sample(name, {{"outcome", "failed"}}, s.dns_forward_failures_total);
  p.sample(name, {{"outcome", "malformed"}}, s.dns_malformed_total);
  return p.take();
}

std::string renderBuildInfo(const std::string& version) {
  PromText p;
  p.family("istio_build", "gauge", "Istio component build info");
  p.sample("istio_build", {{"component", "ztunnel"}, {"tag", version}}, int64_t{1});
  p.family("weft_build_info", "gauge", "Weft build info");
  p.sample("weft_build_info", {{"component", "ztunnel"}, {"version", version}}, int64_t{1});
  return p.take();
}

std::string renderMemoryMetrics(const MemoryMetrics& m) {
  PromText p;
  p.family("weft_ztunnel_memory_trims_total", "counter",
           "Times free heap was returned to the kernel (malloc_trim) after idle buffer pools "
           "were freed or connections ended");
  p.sample("weft_ztunnel_memory_trims_total", {}, m.trims);
  p.family("weft_ztunnel_memory_trim_seconds_total", "counter",
           "Time spent in those heap trims");
  p.sample("weft_ztunnel_memory_trim_seconds_total", {},
           static_cast<double>(m.trim_microseconds) / 1e6);
  p.family("weft_ztunnel_memory_pool_releases_total", "counter",
           "Times a loop freed its HBONE buffer pools after they went unused");
  p.sample("weft_ztunnel_memory_pool_releases_total", {}, m.pool_releases);
  p.family("weft_ztunnel_memory_pool_released_bytes_total", "counter",
           "Bytes of pooled HBONE buffers freed by those releases");
  p.sample("weft_ztunnel_memory_pool_released_bytes_total", {}, m.released_bytes);
  p.family("weft_ztunnel_memory_pooled_bytes", "gauge",
           "Bytes of free HBONE buffers kept in the loops' pools now (summed over loops)");
  p.sample("weft_ztunnel_memory_pooled_bytes", {{"pool", "ciphertext"}}, m.pooled_cipher_bytes);
  p.sample("weft_ztunnel_memory_pooled_bytes", {{"pool", "chunk"}}, m.pooled_chunk_bytes);
  return p.take();
}

}  // namespace weft::ztunnel
