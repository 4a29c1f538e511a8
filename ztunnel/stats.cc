// Prometheus and JSON rendering of the ztunnel's counters and TCP metrics.
#include "ztunnel/stats.h"

#include <fmt/format.h>

#include "ztunnel/prometheus_text.h"

namespace weft::ztunnel {

std::string ZtunnelStats::renderPrometheus() const {
  std::string out;
#define WEFT_RENDER_COUNTER(name, help)                                                   \
  out += fmt::format("# HELP weft_ztunnel_{0} {1}\n# TYPE weft_ztunnel_{0} counter\n"     \
                     "weft_ztunnel_{0} {2}\n",                                           \
                     #name, help, name);
#define WEFT_RENDER_GAUGE(name, help)                                                     \
  out += fmt::format("# HELP weft_ztunnel_{0} {1}\n# TYPE weft_ztunnel_{0} gauge\n"       \
                     "weft_ztunnel_{0} {2}\n",                                           \
                     #name, help, name);
  WEFT_ZTUNNEL_COUNTERS(WEFT_RENDER_COUNTER)
  WEFT_ZTUNNEL_GAUGES(WEFT_RENDER_GAUGE)
#undef WEFT_RENDER_COUNTER
#undef WEFT_RENDER_GAUGE
  return out;
}

nlohmann::json ZtunnelStats::toJson() const {
  nlohmann::json j = nlohmann::json::object();
#define WEFT_JSON_STAT(name, help) j[#name] = name;
  WEFT_ZTUNNEL_COUNTERS(WEFT_JSON_STAT)
  WEFT_ZTUNNEL_GAUGES(WEFT_JSON_STAT)
#undef WEFT_JSON_STAT
  return j;
}

std::vector<std::pair<std::string, std::string>> TcpLabels::pairs() const {
  auto v = [](const std::string& s) { return s.empty() ? std::string("unknown") : s; };
  return {{"reporter", v(reporter)},
          {"source_workload", v(source_workload)},
          {"source_canonical_service", v(source_canonical_service)},
          {"source_canonical_revision", v(source_canonical_revision)},
          {"source_workload_namespace", v(source_workload_namespace)},
          {"source_principal", v(source_principal)},
          {"source_app", v(source_app)},
          {"source_version", v(source_version)},
          {"source_cluster", v(source_cluster)},
          {"destination_service", v(destination_service)},
          {"destination_service_namespace", v(destination_service_namespace)},
          {"destination_service_name", v(destination_service_name)},
          {"destination_workload", v(destination_workload)},
          {"destination_canonical_service", v(destination_canonical_service)},
          {"destination_canonical_revision", v(destination_canonical_revision)},
          {"destination_workload_namespace", v(destination_workload_namespace)},
          {"destination_principal", v(destination_principal)},
          {"destination_app", v(destination_app)},
          {"destination_version", v(destination_version)},
          {"destination_cluster", v(destination_cluster)},
          {"request_protocol", v(request_protocol)},
          {"response_flags", v(response_flags)},
          {"connection_security_policy", v(connection_security_policy)}};
}

std::string TcpMetrics::renderPrometheus(const std::map<TcpLabels, TcpCounters>& series,
                                         const std::map<TcpLabels, uint64_t>& failures) {
  struct Family {
    const char* name;
    const char* help;
    uint64_t TcpCounters::*field;
  };
  static const Family kFamilies[] = {
      {"istio_tcp_connections_opened_total", "The total number of TCP connections opened",
       &TcpCounters::opened},
      {"istio_tcp_connections_closed_total", "The total number of TCP connections closed",
       &TcpCounters::closed},
      {"istio_tcp_sent_bytes_total",
       "The size of total bytes sent during response in case of a TCP connection",
       &TcpCounters::sent_bytes},
      {"istio_tcp_received_bytes_total",
       "The size of total bytes received during request in case of a TCP connection",
       &TcpCounters::received_bytes},
  };
  PromText out;
  for (const Family& f : kFamilies) {
    out.family(f.name, "counter", f.help);
    for (const auto& [labels, c] : series) out.sample(f.name, labels.pairs(), c.*(f.field));
  }
  out.family("istio_tcp_connections_failed_total", "counter",
             "The total number of TCP connections that failed to establish");
  for (const auto& [labels, n] : failures)
    out.sample("istio_tcp_connections_failed_total", labels.pairs(), n);
  return out.take();
}

}  // namespace weft::ztunnel
