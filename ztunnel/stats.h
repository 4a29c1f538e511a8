// The ztunnel's counters, declared once, and Istio's TCP metrics with their labels; rendered as
// Prometheus text for /metrics and JSON for /stats.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

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
  X(hbone_client_stream_retries_total,                                                       \
    "Outbound CONNECTs sent again after the server refused them unanswered (REFUSED_STREAM)") \
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
  X(dns_tcp_connections_total, "TCP connections accepted by the pods' DNS proxies")        \
  X(dns_upstream_answers_total, "Forwarded DNS queries whose upstream answer was relayed")   \
  X(access_log_lines_total, "Access-log lines written to the sink")                         \
  X(access_log_dropped_total, "Access-log lines dropped: the sink was stuck or failing")    \
  X(access_log_write_errors_total, "Access-log writes that failed")                          \
  X(access_log_reopens_total, "Access-log file reopened (rotated away, or SIGHUP)")         \
  X(access_log_reopen_errors_total, "Access-log reopen attempts that failed (old file kept)") \
  X(loop_reports_dropped_total, "Worker-loop reports (access-log lines, verdicts, fast-path " \
                                 "candidates) dropped: the main loop's mailbox was full")     \
  X(fast_path_verdicts_cached_total, "Allowed same-node verdicts written for the fast path")  \
  X(fast_path_cache_failures_total, "Fast-path verdicts the kernel map refused")              \
  X(fast_path_invalidations_total, "Times every cached fast-path verdict was cleared")        \
  X(fast_path_connections_total, "Same-node connections that went app to app in the kernel") \
  X(fast_path_connect_failures_total, "Fast-path connects that never got established")

// Gauges (weft_ztunnel_<name>), filled in when rendered.
#define WEFT_ZTUNNEL_GAUGES(X)                                             \
  X(workloads, "Local workloads with listeners")                           \
  X(active_connections, "Connections open now (connecting or relaying)")  \
  X(agent_connected, "1 while connected to the agent")                     \
  X(ready, "1 once a snapshot from the agent was applied")                 \
  X(draining, "1 while draining for shutdown")                             \
  X(hbone_pool_connections, "Pooled outbound HBONE connections")         \
  X(enrolled_pods, "Enrolled pods on this node the ztunnel serves (workloads with listeners)") \
  X(fast_path_enabled, "1 while same-node verdicts are cached for the in-kernel fast path")   \
  X(fast_path_active_connections, "Fast-path connections open now")                        \
  X(loops, "Event loops serving connections (the main loop and its workers)")

struct ZtunnelStats {
#define WEFT_DECLARE_STAT(name, help) uint64_t name = 0;
  WEFT_ZTUNNEL_COUNTERS(WEFT_DECLARE_STAT)
  WEFT_ZTUNNEL_GAUGES(WEFT_DECLARE_STAT)
#undef WEFT_DECLARE_STAT

  std::string renderPrometheus() const;
  nlohmann::json toJson() const;
};

// Istio's labels for TCP metrics, in the order and with the names of Istio's ztunnel
// (src/proxy/metrics.rs CommonTrafficLabels). Empty values render as "unknown".
struct TcpLabels {
  std::string reporter;  // "source" (outbound) or "destination" (inbound)
  std::string source_workload;
  std::string source_canonical_service;
  std::string source_canonical_revision;
  std::string source_workload_namespace;
  std::string source_principal;  // the verified (mTLS) SPIFFE ID of the source
  std::string source_app;
  std::string source_version;
  std::string source_cluster;
  std::string destination_service;  // name.ns.svc.<cluster domain>
  std::string destination_service_namespace;
  std::string destination_service_name;
  std::string destination_workload;
  std::string destination_canonical_service;
  std::string destination_canonical_revision;
  std::string destination_workload_namespace;
  std::string destination_principal;
  std::string destination_app;
  std::string destination_version;
  std::string destination_cluster;
  std::string request_protocol = "tcp";
  std::string response_flags = "-";  // "-", or why it failed: DENY, CONNECT, IDENTITY_ERROR
  std::string connection_security_policy = "none";  // "mutual_tls" over HBONE

  auto tie() const {
    return std::tie(reporter, source_workload, source_canonical_service,
                    source_canonical_revision, source_workload_namespace, source_principal,
                    source_app, source_version, source_cluster, destination_service,
                    destination_service_namespace, destination_service_name,
                    destination_workload, destination_canonical_service,
                    destination_canonical_revision, destination_workload_namespace,
                    destination_principal, destination_app, destination_version,
                    destination_cluster, request_protocol, response_flags,
                    connection_security_policy);
  }
  bool operator<(const TcpLabels& o) const { return tie() < o.tie(); }
  // (name, value) pairs in Istio's order, empty values as "unknown".
  std::vector<std::pair<std::string, std::string>> pairs() const;
};

// The cluster every workload is in: Weft knows one cluster, and this is the name Istio gives a
// single cluster by default (so source_cluster/destination_cluster match Istio's dashboards).
inline constexpr const char* kDefaultClusterName = "Kubernetes";

struct TcpCounters {
  uint64_t opened = 0;
  uint64_t closed = 0;
  uint64_t sent_bytes = 0;      // destination -> source (the response direction)
  uint64_t received_bytes = 0;  // source -> destination (the request direction)
};

// opened/closed/bytes count connections that were established (the upstream connect or the
// HBONE CONNECT succeeded); `failed` counts the ones that never were, keyed by labels whose
// response_flags says why (Istio's istio_tcp_connections_failed_total).
class TcpMetrics {
 public:
  void opened(const TcpLabels& l) { series_[l].opened++; }
  void closed(const TcpLabels& l, uint64_t sent, uint64_t received) {
    TcpCounters& c = series_[l];
    c.closed++;
    c.sent_bytes += sent;
    c.received_bytes += received;
  }
  void failed(const TcpLabels& l) { failures_[l]++; }
  const std::map<TcpLabels, TcpCounters>& series() const { return series_; }
  const std::map<TcpLabels, uint64_t>& failures() const { return failures_; }

  // Prometheus text of `series` (the closed totals plus what live connections moved so far)
  // and of `failures`.
  static std::string renderPrometheus(const std::map<TcpLabels, TcpCounters>& series,
                                      const std::map<TcpLabels, uint64_t>& failures = {});

 private:
  std::map<TcpLabels, TcpCounters> series_;
  std::map<TcpLabels, uint64_t> failures_;
};

}  // namespace weft::ztunnel
