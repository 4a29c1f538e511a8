// Prometheus and JSON rendering of the ztunnel's counters and TCP metrics.
#include "ztunnel/stats.h"

#include <fmt/format.h>

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

namespace {

// Prometheus label values escape backslash, double quote and newline.
std::string escapeLabel(const std::string& v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

std::string labelText(const TcpLabels& l) {
  auto unknown = [](const std::string& s) { return s.empty() ? std::string("unknown") : s; };
  return fmt::format(
      "reporter=\"{}\",source_workload=\"{}\",source_workload_namespace=\"{}\","
      "destination_workload=\"{}\",destination_workload_namespace=\"{}\","
      "destination_service=\"{}\",connection_security_policy=\"{}\"",
      escapeLabel(l.reporter), escapeLabel(unknown(l.source_workload)),
      escapeLabel(unknown(l.source_workload_namespace)),
      escapeLabel(unknown(l.destination_workload)),
      escapeLabel(unknown(l.destination_workload_namespace)),
      escapeLabel(unknown(l.destination_service)), escapeLabel(l.connection_security_policy));
}

}  // namespace

std::string TcpMetrics::renderPrometheus(const std::map<TcpLabels, TcpCounters>& series) {
  struct Family {
    const char* name;
    const char* help;
    uint64_t TcpCounters::*field;
  };
  static const Family kFamilies[] = {
      {"istio_tcp_connections_opened_total", "TCP connections opened",
       &TcpCounters::opened},
      {"istio_tcp_connections_closed_total", "TCP connections closed", &TcpCounters::closed},
      {"istio_tcp_sent_bytes_total", "Bytes sent to the source (response direction)",
       &TcpCounters::sent_bytes},
      {"istio_tcp_received_bytes_total", "Bytes received from the source (request direction)",
       &TcpCounters::received_bytes},
  };
  std::string out;
  for (const Family& f : kFamilies) {
    out += fmt::format("# HELP {0} {1}\n# TYPE {0} counter\n", f.name, f.help);
    for (const auto& [labels, c] : series)
      out += fmt::format("{}{{{}}} {}\n", f.name, labelText(labels), c.*(f.field));
  }
  return out;
}

}  // namespace weft::ztunnel
