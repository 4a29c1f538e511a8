// The ztunnel's counters, declared once, and Istio's TCP metrics with their labels; rendered as
// Prometheus text for /metrics and JSON for /stats.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <tuple>

#include <nlohmann/json.hpp>

namespace weft::ztunnel {

// Every ztunnel counter (weft_ztunnel_<name>), with its help text. One list, one place.
#define WEFT_ZTUNNEL_COUNTERS(X)                                                               \
  X(outbound_accepted_total, "Connections accepted on outbound listeners (15001)")            \
  X(inbound_accepted_total, "Connections accepted on inbound plaintext listeners (15006)")    \
  X(accept_failures_total, "Accepts that failed")                                            \
  X(outbound_original_dst_failures_total, "Outbound connections without an original destination") \
  X(no_endpoint_total, "Outbound connections to a service with no usable endpoint")          \
  X(lb_ejections_total, "Service endpoints ejected after consecutive connect failures")      \
  X(lb_all_ejected_total, "Service connections sent to an ejected endpoint: all were ejected") \
  X(route_refused_total, "Outbound connections refused by routing (other than no endpoint)") \
  X(inbound_wrong_destination_total, "Inbound connections to an IP that is not the pod's")   \
  X(upstream_socket_failures_total, "Upstream sockets that could not be created or marked")  \
  X(upstream_connect_failures_total, "Upstream connects that failed")                        \
  X(relay_errors_total, "Relayed connections that ended in an error or reset")               \
  X(drain_aborted_connections_total, "Connections cut when the drain timeout ran out")       \
  X(agent_connects_total, "Connections made to the agent")                                   \
  X(agent_disconnects_total, "Agent connections lost or closed")                             \
  X(agent_messages_total, "Messages received from the agent")                                \
  X(agent_protocol_errors_total, "Agent datagrams that did not parse or were unexpected")    \
  X(agent_message_failures_total, "Agent messages acked with an error")                      \
  X(workload_listener_failures_total, "Workloads whose listeners could not be set up")        \
  X(hbone_outbound_streams_total, "Outbound connections sent into an HBONE CONNECT stream")  \
  X(hbone_inbound_streams_total, "HBONE CONNECT streams accepted for a local pod")           \
  X(hbone_connect_refused_total, "Outbound HBONE CONNECTs answered with a status other than 200") \
  X(hbone_client_handshakes_total, "TLS handshakes completed by the HBONE client")           \
  X(hbone_client_handshake_failures_total, "TLS handshakes the HBONE client failed or refused") \
  X(hbone_server_handshakes_total, "TLS handshakes completed on the pods' HBONE listeners")   \
  X(hbone_server_handshake_failures_total, "TLS handshakes refused on the pods' HBONE listeners") \
  X(cert_waits_total, "New connections that waited for their workload's first certificate")  \
  X(cert_wait_timeouts_total, "Connections dropped because no certificate came within the wait") \
  X(plaintext_refused_total, "Plaintext inbound connections reset under STRICT peer authentication") \
  X(dns_queries_total, "DNS messages received by the pods' DNS proxies (15053, UDP and TCP)")  \
  X(dns_answered_locally_total, "DNS queries answered from the cluster state")              \
  X(dns_forwarded_total, "DNS queries forwarded to the resolver the pod asked")              \
  X(dns_malformed_total, "DNS messages dropped as malformed")                                 \
  X(dns_forward_failures_total, "DNS queries to forward that got no upstream answer")        \
  X(dns_truncated_total, "DNS answers sent over UDP with TC set because they did not fit")   \
  X(dns_tcp_connections_total, "TCP connections accepted by the pods' DNS proxies")

// Gauges (weft_ztunnel_<name>), filled in when rendered.
#define WEFT_ZTUNNEL_GAUGES(X)                                             \
  X(workloads, "Local workloads with listeners")                           \
  X(active_connections, "Connections open now (connecting or relaying)")  \
  X(agent_connected, "1 while connected to the agent")                     \
  X(ready, "1 once a snapshot from the agent was applied")                 \
  X(draining, "1 while draining for shutdown")                             \
  X(hbone_pool_connections, "Pooled outbound HBONE connections")

struct ZtunnelStats {
#define WEFT_DECLARE_STAT(name, help) uint64_t name = 0;
  WEFT_ZTUNNEL_COUNTERS(WEFT_DECLARE_STAT)
  WEFT_ZTUNNEL_GAUGES(WEFT_DECLARE_STAT)
#undef WEFT_DECLARE_STAT

  std::string renderPrometheus() const;
  nlohmann::json toJson() const;
};

// Istio's labels for TCP metrics (connection_security_policy is "none" until mTLS).
struct TcpLabels {
  std::string reporter;  // "source" (outbound) or "destination" (inbound)
  std::string source_workload;
  std::string source_workload_namespace;
  std::string destination_workload;
  std::string destination_workload_namespace;
  std::string destination_service;
  std::string connection_security_policy = "none";

  auto tie() const {
    return std::tie(reporter, source_workload, source_workload_namespace, destination_workload,
                    destination_workload_namespace, destination_service,
                    connection_security_policy);
  }
  bool operator<(const TcpLabels& o) const { return tie() < o.tie(); }
};

struct TcpCounters {
  uint64_t opened = 0;
  uint64_t closed = 0;
  uint64_t sent_bytes = 0;      // destination -> source (the response direction)
  uint64_t received_bytes = 0;  // source -> destination (the request direction)
};

class TcpMetrics {
 public:
  void opened(const TcpLabels& l) { series_[l].opened++; }
  void closed(const TcpLabels& l, uint64_t sent, uint64_t received) {
    TcpCounters& c = series_[l];
    c.closed++;
    c.sent_bytes += sent;
    c.received_bytes += received;
  }
  const std::map<TcpLabels, TcpCounters>& series() const { return series_; }

  // Prometheus text of `series` (the closed totals plus what live connections moved so far).
  static std::string renderPrometheus(const std::map<TcpLabels, TcpCounters>& series);

 private:
  std::map<TcpLabels, TcpCounters> series_;
};

}  // namespace weft::ztunnel
