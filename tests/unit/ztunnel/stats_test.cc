// Prometheus rendering: Istio metric names and labels, ztunnel counters from the one list.
#include "ztunnel/stats.h"

#include <gtest/gtest.h>

namespace weft::ztunnel {
namespace {

TEST(Stats, TcpMetricsCarryIstioLabels) {
  TcpMetrics m;
  TcpLabels l;
  l.reporter = "source";
  l.source_workload = "client";
  l.source_workload_namespace = "default";
  l.destination_workload = "server-1";
  l.destination_workload_namespace = "default";
  l.destination_service = "server.default.svc.cluster.local";
  m.opened(l);
  m.closed(l, 100, 7);
  m.opened(l);
  std::string text = TcpMetrics::renderPrometheus(m.series());
  std::string labels =
      R"({reporter="source",source_workload="client",source_canonical_service="unknown",)"
      R"(source_canonical_revision="unknown",source_workload_namespace="default",)"
      R"(source_principal="unknown",source_app="unknown",source_version="unknown",)"
      R"(source_cluster="unknown",destination_service="server.default.svc.cluster.local",)"
      R"(destination_service_namespace="unknown",destination_service_name="unknown",)"
      R"(destination_workload="server-1",destination_canonical_service="unknown",)"
      R"(destination_canonical_revision="unknown",destination_workload_namespace="default",)"
      R"(destination_principal="unknown",destination_app="unknown",)"
      R"(destination_version="unknown",destination_cluster="unknown",)"
      R"(request_protocol="tcp",response_flags="-",connection_security_policy="none"})";
  EXPECT_NE(text.find("istio_tcp_connections_opened_total" + labels + " 2\n"), std::string::npos)
      << text;
  EXPECT_NE(text.find("istio_tcp_connections_closed_total" + labels + " 1\n"), std::string::npos);
  EXPECT_NE(text.find("istio_tcp_sent_bytes_total" + labels + " 100\n"), std::string::npos);
  EXPECT_NE(text.find("istio_tcp_received_bytes_total" + labels + " 7\n"), std::string::npos);
  EXPECT_NE(text.find("# TYPE istio_tcp_sent_bytes_total counter"), std::string::npos);
}

TEST(Stats, EmptyLabelsAreUnknownAndValuesEscaped) {
  TcpMetrics m;
  TcpLabels l;
  l.reporter = "destination";
  l.destination_workload = "we\"ird\\";
  m.opened(l);
  std::string text = TcpMetrics::renderPrometheus(m.series());
  EXPECT_NE(text.find(R"(source_workload="unknown")"), std::string::npos) << text;
  EXPECT_NE(text.find(R"(destination_workload="we\"ird\\")"), std::string::npos) << text;
}

TEST(Stats, CountersRenderAndJson) {
  ZtunnelStats s;
  s.no_endpoint_total = 3;
  s.workloads = 2;
  std::string text = s.renderPrometheus();
  EXPECT_NE(text.find("weft_ztunnel_no_endpoint_total 3\n"), std::string::npos);
  EXPECT_NE(text.find("# TYPE weft_ztunnel_workloads gauge\nweft_ztunnel_workloads 2\n"),
            std::string::npos);
  EXPECT_NE(text.find("weft_ztunnel_outbound_original_dst_failures_total 0\n"),
            std::string::npos);
  auto j = s.toJson();
  EXPECT_EQ(j["no_endpoint_total"], 3);
  EXPECT_EQ(j["upstream_connect_failures_total"], 0);
}

}  // namespace
}  // namespace weft::ztunnel
