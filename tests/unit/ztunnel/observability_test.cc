// Prometheus rendering (escaping, HELP/TYPE, no duplicate series, the ztunnel's whole /metrics
// checked line by line), the access-log formatter (text and JSON, every field) and its writer
// (file, a failing sink, a stuck sink, log rotation: rename, delete, copytruncate, a directory
// gone, SIGHUP).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include <chrono>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "ztunnel/access_log.h"
#include "ztunnel/bpf_map_fill.h"
#include "ztunnel/prometheus_text.h"
#include "ztunnel/stats.h"
#include "ztunnel/weft_metrics.h"
#include "ztunnel/ztunnel.h"

namespace weft::ztunnel {
namespace {

// One parsed sample line: name, labels (unescaped values), value text.
struct Sample {
  std::string name;
  std::vector<std::pair<std::string, std::string>> labels;
  std::string value;
};

// Parses `name{k="v",...} value` strictly (the 0.0.4 text format's escapes: \\ \" \n).
bool parseSample(const std::string& line, Sample* out, std::string* err) {
  size_t i = 0;
  while (i < line.size() && (isalnum(static_cast<unsigned char>(line[i])) || line[i] == '_' ||
                             line[i] == ':'))
    i++;
  out->name = line.substr(0, i);
  if (out->name.empty()) return *err = "no metric name", false;
  out->labels.clear();
  if (i < line.size() && line[i] == '{') {
    i++;
    while (i < line.size() && line[i] != '}') {
      size_t eq = line.find('=', i);
      if (eq == std::string::npos || eq + 1 >= line.size() || line[eq + 1] != '"')
        return *err = "bad label at " + std::to_string(i), false;
      std::string key = line.substr(i, eq - i);
      std::string val;
      size_t j = eq + 2;
      for (; j < line.size() && line[j] != '"'; ++j) {
        if (line[j] == '\\') {
          if (j + 1 >= line.size()) return *err = "dangling escape", false;
          char e = line[++j];
          if (e == 'n') val += '\n';
          else if (e == '\\' || e == '"') val += e;
          else return *err = std::string("bad escape \\") + e, false;
        } else if (line[j] == '\n') {
          return *err = "raw newline in a label value", false;
        } else {
          val += line[j];
        }
      }
      if (j >= line.size()) return *err = "unterminated label value", false;
      out->labels.emplace_back(key, val);
      i = j + 1;
      if (i < line.size() && line[i] == ',') i++;
    }
    if (i >= line.size()) return *err = "unterminated label set", false;
    i++;
  }
  if (i >= line.size() || line[i] != ' ') return *err = "no value", false;
  out->value = line.substr(i + 1);
  char* end = nullptr;
  std::strtod(out->value.c_str(), &end);
  if (out->value.empty() || *end != '\0') return *err = "value is not a number", false;
  return true;
}

// What `promtool check metrics` would object to, plus our own rules: every family has HELP and
// TYPE (once, before its samples, samples contiguous), counters end in _total, no duplicate
// series, label values parse.
std::vector<std::string> lint(const std::string& text) {
  std::vector<std::string> problems;
  std::map<std::string, std::string> type_of;
  std::set<std::string> help_seen, closed_families, series;
  std::string current;
  std::istringstream in(text);
  int n = 0;
  for (std::string line; std::getline(in, line);) {
    n++;
    auto where = [&](const std::string& what) {
      problems.push_back("line " + std::to_string(n) + ": " + what + ": " + line);
    };
    if (line.rfind("# HELP ", 0) == 0) {
      std::string name = line.substr(7, line.find(' ', 7) - 7);
      if (!help_seen.insert(name).second) where("second HELP for " + name);
      continue;
    }
    if (line.rfind("# TYPE ", 0) == 0) {
      std::istringstream t(line.substr(7));
      std::string name, type;
      t >> name >> type;
      if (type_of.count(name)) where("second TYPE for " + name);
      if (!help_seen.count(name)) where("TYPE without HELP before it");
      if (type == "counter" && name.size() < 6) where("short counter name");
      if (type == "counter" && name.substr(name.size() - 6) != "_total")
        where("counter not ending in _total");
      if (type != "counter" && type != "gauge") where("unexpected type " + type);
      type_of[name] = type;
      if (!current.empty()) closed_families.insert(current);
      current = name;
      continue;
    }
    if (line.empty() || line[0] == '#') {
      where("unexpected line");
      continue;
    }
    Sample s;
    std::string err;
    if (!parseSample(line, &s, &err)) {
      where(err);
      continue;
    }
    if (!type_of.count(s.name)) where("sample of a family without TYPE");
    if (s.name != current) where("sample outside its family's block");
    if (closed_families.count(s.name)) where("family continued after another began");
    std::set<std::string> keys;
    std::string key = s.name + "{";
    for (auto& [k, v] : s.labels) {
      if (!keys.insert(k).second) where("label " + k + " twice");
      key += k + "=" + v + "\x1f";
    }
    if (!series.insert(key).second) where("duplicate series");
  }
  if (!text.empty() && text.back() != '\n') problems.push_back("no final newline");
  return problems;
}

TEST(PromText, EscapesLabelValuesAndHelp) {
  EXPECT_EQ(escapePromLabelValue("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
  EXPECT_EQ(escapePromHelp("x\\y\nz \"q\""), "x\\\\y\\nz \"q\"");
  PromText p;
  p.family("weft_test_total", "counter", "Help with a \\ and a\nnewline");
  p.sample("weft_test_total", {{"name", "we\"ird\\\nvalue"}}, uint64_t{3});
  EXPECT_EQ(p.text(),
            "# HELP weft_test_total Help with a \\\\ and a\\nnewline\n"
            "# TYPE weft_test_total counter\n"
            "weft_test_total{name=\"we\\\"ird\\\\\\nvalue\"} 3\n");
  Sample s;
  std::string err;
  ASSERT_TRUE(parseSample("weft_test_total{name=\"we\\\"ird\\\\\\nvalue\"} 3", &s, &err)) << err;
  EXPECT_EQ(s.labels[0].second, "we\"ird\\\nvalue");
}

TEST(PromText, SkipsDuplicateSeries) {
  PromText p;
  p.family("weft_g", "gauge", "g");
  p.sample("weft_g", {{"a", "1"}}, int64_t{1});
  p.sample("weft_g", {{"a", "1"}}, int64_t{2});
  p.sample("weft_g", {{"a", "2"}}, int64_t{3});
  EXPECT_EQ(p.duplicatesSkipped(), 1u);
  EXPECT_EQ(p.text().find("weft_g{a=\"1\"} 2"), std::string::npos);
  EXPECT_TRUE(lint(p.text()).empty());
}

TEST(PromText, LintCatchesWhatItMust) {
  // The checker itself must fail on broken text, or the tests below prove nothing.
  EXPECT_FALSE(lint("weft_x_total 1\n").empty());  // no HELP/TYPE
  EXPECT_FALSE(lint("# HELP weft_x x\n# TYPE weft_x counter\nweft_x 1\n").empty());  // _total
  EXPECT_FALSE(lint("# HELP a a\n# TYPE a gauge\na{l=\"1\"} 1\na{l=\"1\"} 2\n").empty());
  EXPECT_FALSE(lint("# HELP a a\n# TYPE a gauge\na{l=\"x\"y\"} 1\n").empty());
  EXPECT_FALSE(lint("# HELP a a\n# TYPE a gauge\n# HELP b b\n# TYPE b gauge\na 1\n").empty());
}

TEST(TcpMetricsRender, IstioFamiliesLabelsAndFailures) {
  TcpMetrics m;
  TcpLabels l;
  l.reporter = "source";
  l.source_workload = "cli\"ent";
  l.source_workload_namespace = "ns\\1";
  l.destination_workload = "server\n1";
  m.opened(l);
  m.closed(l, 100, 7);
  TcpLabels f = l;
  f.response_flags = "DENY";
  m.failed(f);
  m.failed(f);
  std::string text = TcpMetrics::renderPrometheus(m.series(), m.failures());
  auto problems = lint(text);
  EXPECT_TRUE(problems.empty()) << problems.front() << "\n" << text;
  for (const char* fam :
       {"istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total",
        "istio_tcp_sent_bytes_total", "istio_tcp_received_bytes_total",
        "istio_tcp_connections_failed_total"}) {
    EXPECT_NE(text.find(std::string("# TYPE ") + fam + " counter\n"), std::string::npos) << fam;
  }
  EXPECT_NE(text.find("source_workload=\"cli\\\"ent\""), std::string::npos) << text;
  EXPECT_NE(text.find("source_workload_namespace=\"ns\\\\1\""), std::string::npos);
  EXPECT_NE(text.find("destination_workload=\"server\\n1\""), std::string::npos);
  EXPECT_NE(text.find("response_flags=\"DENY\",connection_security_policy=\"none\"} 2\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("istio_tcp_sent_bytes_total{reporter=\"source\""), std::string::npos);
  EXPECT_NE(text.find("source_principal=\"unknown\""), std::string::npos);
  // Istio's whole label set, in order.
  std::string first = text.substr(text.find("istio_tcp_connections_opened_total{"));
  first = first.substr(0, first.find('\n'));
  Sample s;
  std::string err;
  ASSERT_TRUE(parseSample(first, &s, &err)) << err;
  std::vector<std::string> names;
  for (auto& [k, v] : s.labels) names.push_back(k);
  EXPECT_EQ(names, (std::vector<std::string>{
                       "reporter", "source_workload", "source_canonical_service",
                       "source_canonical_revision", "source_workload_namespace",
                       "source_principal", "source_app", "source_version", "source_cluster",
                       "destination_service", "destination_service_namespace",
                       "destination_service_name", "destination_workload",
                       "destination_canonical_service", "destination_canonical_revision",
                       "destination_workload_namespace", "destination_principal",
                       "destination_app", "destination_version", "destination_cluster",
                       "request_protocol", "response_flags", "connection_security_policy"}));
}

TEST(WeftMetricsRender, CertificatesDnsBuildAndMaps) {
  auto now = std::chrono::system_clock::now();
  std::vector<IdentityView> v(3);
  v[0].identity = "spiffe://cluster.local/ns/a/sa/x";
  v[0].state = CertState::kValid;
  v[0].not_after = now + std::chrono::seconds(3600);
  v[1].identity = "spiffe://cluster.local/ns/b/sa/y";
  v[1].state = CertState::kExpired;
  v[1].not_after = now - std::chrono::seconds(10);
  v[2].identity = "spiffe://cluster.local/ns/c/sa/z";  // pending: no expiry series
  std::string certs = renderCertificateMetrics(v, now);
  EXPECT_NE(certs.find("weft_ztunnel_certificate_expiry_seconds{identity=\"spiffe://cluster."
                       "local/ns/a/sa/x\"} 3600\n"),
            std::string::npos)
      << certs;
  EXPECT_NE(certs.find("{identity=\"spiffe://cluster.local/ns/b/sa/y\"} -10\n"),
            std::string::npos);
  EXPECT_EQ(certs.find("ns/c/sa/z"), std::string::npos);
  EXPECT_NE(certs.find("weft_ztunnel_certificates{state=\"pending\"} 1\n"), std::string::npos);
  ZtunnelStats st;
  st.dns_answered_locally_total = 4;
  st.dns_upstream_answers_total = 3;
  st.dns_forward_failures_total = 2;
  st.dns_malformed_total = 1;
  std::string dns = renderDnsOutcomes(st);
  EXPECT_NE(dns.find("weft_ztunnel_dns_query_outcomes_total{outcome=\"local\"} 4\n"),
            std::string::npos);
  EXPECT_NE(dns.find("{outcome=\"forwarded\"} 3\n"), std::string::npos);
  EXPECT_NE(dns.find("{outcome=\"failed\"} 2\n"), std::string::npos);
  std::string build = renderBuildInfo("1.2.3");
  EXPECT_NE(build.find("istio_build{component=\"ztunnel\",tag=\"1.2.3\"} 1\n"),
            std::string::npos);
  std::vector<BpfMapFill> maps = {{"weft_enrolled", "hash", 4096, 3},
                                  {"weft_events", "ringbuf", 262144, std::nullopt}};
  std::string fill = renderBpfMapFill(maps, 0);
  EXPECT_NE(fill.find("weft_bpf_map_entries{map=\"weft_enrolled\",type=\"hash\"} 3\n"),
            std::string::npos);
  EXPECT_NE(fill.find("weft_bpf_map_max_entries{map=\"weft_events\",type=\"ringbuf\"} 262144\n"),
            std::string::npos);
  EXPECT_EQ(fill.find("weft_bpf_map_entries{map=\"weft_events\""), std::string::npos);
  for (const std::string& t : {certs, dns, build, fill}) {
    auto problems = lint(t);
    EXPECT_TRUE(problems.empty()) << problems.front() << "\n" << t;
  }
}

// The ztunnel's whole /metrics (every family, also those only filled in at scrape time) passes
// the checks, with a live-looking state: TCP series, a verdict, certificates, DNS.
TEST(ZtunnelMetrics, WholeScrapeHasNoDuplicatesAndEveryFamilyIsTyped) {
  uv_loop_t loop;
  ASSERT_EQ(uv_loop_init(&loop), 0);
  {
    ZtunnelOptions o;
    o.agent_socket = "/nonexistent/weft-test.sock";
    Ztunnel zt(&loop, o);
    TcpLabels l;
    l.reporter = "destination";
    l.destination_workload = "a\"b";
    zt.proxy().tcpMetrics().opened(l);
    zt.proxy().tcpMetrics().closed(l, 1, 2);
    l.response_flags = "DENY";
    zt.proxy().tcpMetrics().failed(l);
    zt.proxy().stats().dns_queries_total = 5;
    HttpResponse r = zt.handleMetrics({"GET", "/metrics", "", ""});
    EXPECT_EQ(r.status, 200);
    auto problems = lint(r.body);
    for (const auto& p : problems) ADD_FAILURE() << p;
    for (const char* fam :
         {"istio_tcp_connections_opened_total", "istio_tcp_connections_failed_total",
          "weft_ztunnel_enrolled_pods", "weft_ztunnel_hbone_client_handshakes_total",
          "weft_ztunnel_hbone_pool_connections", "weft_ztunnel_policy_verdicts_total",
          "weft_ztunnel_dns_query_outcomes_total", "weft_ztunnel_certificate_expiry_seconds",
          "weft_bpf_map_entries", "weft_bpf_map_max_entries", "istio_build",
          "weft_ztunnel_access_log_dropped_total", "weft_ztunnel_access_log_reopens_total",
          "weft_ztunnel_access_log_reopen_errors_total"}) {
      EXPECT_NE(r.body.find(std::string("# TYPE ") + fam + " "), std::string::npos) << fam;
    }
    zt.shutdown();
    uv_run(&loop, UV_RUN_DEFAULT);
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  EXPECT_EQ(uv_loop_close(&loop), 0);
}

AccessLogRecord fullRecord() {
  AccessLogRecord r;
  r.time_ms = 1764151827123;  // 2025-11-26T10:10:27.123Z
  r.connection_id = 42;
  r.direction = "outbound";
  r.path = "hbone";
  r.src_addr = *SocketAddress::parse("10.244.1.2:40000");
  r.src_workload = "client-1";
  r.src_namespace = "shop";
  r.src_identity = "spiffe://cluster.local/ns/shop/sa/client";
  r.dst_addr = *SocketAddress::parse("10.244.2.3:15008");
  r.dst_hbone_addr = *SocketAddress::parse("10.244.2.3:8080");
  r.dst_service = "web.shop.svc.cluster.local";
  r.dst_workload = "web-1";
  r.dst_namespace = "shop";
  r.dst_identity = "spiffe://cluster.local/ns/shop/sa/web";
  r.bytes_sent = 100;
  r.bytes_recv = 132;
  r.duration_ms = 7;
  return r;
}

TEST(AccessLogFormat, TextHasEveryField) {
  std::string line = formatAccessLog(fullRecord(), AccessLogFormat::kText);
  EXPECT_EQ(line,
            "2025-11-26T10:10:27.123Z\tinfo\taccess\tconnection complete\tconn_id=42 "
            "src.addr=10.244.1.2:40000 src.workload=\"client-1\" src.namespace=\"shop\" "
            "src.identity=\"spiffe://cluster.local/ns/shop/sa/client\" "
            "dst.addr=10.244.2.3:15008 dst.hbone_addr=10.244.2.3:8080 "
            "dst.service=\"web.shop.svc.cluster.local\" dst.workload=\"web-1\" "
            "dst.namespace=\"shop\" dst.identity=\"spiffe://cluster.local/ns/shop/sa/web\" "
            "direction=\"outbound\" path=\"hbone\" bytes_sent=100 bytes_recv=132 "
            "duration=\"7ms\"\n");
}

TEST(AccessLogFormat, TextFailureAndEscapes) {
  AccessLogRecord r = fullRecord();
  r.src_workload = "we\"ird\nname\\";
  r.src_identity.clear();  // absent fields are left out, as Istio does
  r.error = "denied by authorization policy: deny_matched app/deny";
  r.response_flags = "DENY";
  std::string line = formatAccessLog(r, AccessLogFormat::kText);
  EXPECT_EQ(std::count(line.begin(), line.end(), '\n'), 1) << "one line: " << line;
  EXPECT_NE(line.find("\terror\taccess\t"), std::string::npos) << line;
  EXPECT_NE(line.find("src.workload=\"we\\\"ird\\nname\\\\\""), std::string::npos) << line;
  EXPECT_EQ(line.find("src.identity="), std::string::npos) << line;
  EXPECT_NE(line.find(" response_flags=\"DENY\" error=\"denied by authorization policy: "
                      "deny_matched app/deny\"\n"),
            std::string::npos)
      << line;
}

TEST(AccessLogFormat, JsonHasEveryField) {
  AccessLogRecord r = fullRecord();
  std::string line = formatAccessLog(r, AccessLogFormat::kJson);
  ASSERT_EQ(line.back(), '\n');
  auto j = nlohmann::json::parse(line);
  EXPECT_EQ(j["time"], "2025-11-26T10:10:27.123Z");
  EXPECT_EQ(j["level"], "info");
  EXPECT_EQ(j["scope"], "access");
  EXPECT_EQ(j["message"], "connection complete");
  EXPECT_EQ(j["conn_id"], 42);
  EXPECT_EQ(j["src.addr"], "10.244.1.2:40000");
  EXPECT_EQ(j["src.workload"], "client-1");
  EXPECT_EQ(j["src.namespace"], "shop");
  EXPECT_EQ(j["src.identity"], "spiffe://cluster.local/ns/shop/sa/client");
  EXPECT_EQ(j["dst.addr"], "10.244.2.3:15008");
  EXPECT_EQ(j["dst.hbone_addr"], "10.244.2.3:8080");
  EXPECT_EQ(j["dst.service"], "web.shop.svc.cluster.local");
  EXPECT_EQ(j["dst.workload"], "web-1");
  EXPECT_EQ(j["dst.namespace"], "shop");
  EXPECT_EQ(j["dst.identity"], "spiffe://cluster.local/ns/shop/sa/web");
  EXPECT_EQ(j["direction"], "outbound");
  EXPECT_EQ(j["path"], "hbone");
  EXPECT_EQ(j["bytes_sent"], 100);
  EXPECT_EQ(j["bytes_recv"], 132);
  EXPECT_EQ(j["duration"], "7ms");
  EXPECT_EQ(j["response_flags"], "-");
  EXPECT_TRUE(j["error"].is_null());
  EXPECT_EQ(j.size(), 22u) << j.dump();
  r.error = "tunnel \"reset\"\n";
  r.src_identity.clear();
  r.src_workload = std::string("bad\xff utf8");
  auto e = nlohmann::json::parse(formatAccessLog(r, AccessLogFormat::kJson));
  EXPECT_EQ(e["level"], "error");
  EXPECT_EQ(e["error"], "tunnel \"reset\"\n");
  EXPECT_TRUE(e["src.identity"].is_null());
  EXPECT_EQ(e.size(), 22u);
}

class AccessLogWriterTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_EQ(uv_loop_init(&loop_), 0); }
  void TearDown() override {
    uv_run(&loop_, UV_RUN_DEFAULT);
    EXPECT_EQ(uv_loop_close(&loop_), 0);
  }
  uv_loop_t loop_;
};

TEST_F(AccessLogWriterTest, WritesEveryLineToAFile) {
  char tmpl[] = "/tmp/weft-alog-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  std::string path = std::string(tmpl) + "/a.log";
  {
    auto log = AccessLog::open(&loop_, {path, AccessLogFormat::kText, 1 << 20});
    ASSERT_TRUE(log) << log.status().message();
    for (int i = 0; i < 500; ++i) {
      AccessLogRecord r = fullRecord();
      r.connection_id = i;
      (*log)->write(r);
    }
    uv_run(&loop_, UV_RUN_DEFAULT);  // the writes complete
    EXPECT_EQ((*log)->stats().lines, 500u);
    EXPECT_EQ((*log)->stats().dropped, 0u);
    (*log)->setFormat(AccessLogFormat::kJson);
    (*log)->write(fullRecord());  // in flight when the log goes: finished on the loop
  }
  uv_run(&loop_, UV_RUN_DEFAULT);
  std::ifstream f(path);
  int n = 0, json_lines = 0;
  for (std::string line; std::getline(f, line); ++n) {
    if (line[0] == '{') json_lines++;
    else EXPECT_NE(line.find("conn_id=" + std::to_string(n) + " "), std::string::npos) << line;
  }
  EXPECT_EQ(n, 501);
  EXPECT_EQ(json_lines, 1);
  std::filesystem::remove_all(tmpl);
}

// Lines are gathered for flush_delay_ms and go out in one write; flush_bytes waiting (or a
// zero delay) sends them at once.
TEST_F(AccessLogWriterTest, GathersLinesForTheDelay) {
  char tmpl[] = "/tmp/weft-alog-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  std::string path = std::string(tmpl) + "/a.log";
  std::string line = formatAccessLog(fullRecord(), AccessLogFormat::kText);
  {
    AccessLogOptions o{path, AccessLogFormat::kText, 1 << 20};
    o.flush_delay_ms = 1000;  // long enough that a busy machine cannot outlast it below
    o.flush_bytes = 64 << 10;
    auto log = AccessLog::open(&loop_, o);
    ASSERT_TRUE(log) << log.status().message();
    uv_update_time(&loop_);
    for (int i = 0; i < 3; ++i) (*log)->write(fullRecord());
    uv_run(&loop_, UV_RUN_NOWAIT);
    EXPECT_EQ(std::filesystem::file_size(path), 0u) << "written before the delay";
    EXPECT_EQ((*log)->stats().lines, 0u);
    uv_run(&loop_, UV_RUN_DEFAULT);  // the timer, then the write
    EXPECT_EQ((*log)->stats().lines, 3u);
    EXPECT_EQ(std::filesystem::file_size(path), 3 * line.size());
    // flush_bytes reached: out without waiting for the timer.
    size_t n = (64 << 10) / line.size() + 1;
    for (size_t i = 0; i < n; ++i) (*log)->write(fullRecord());
    EXPECT_EQ((*log)->stats().lines, 3u);  // in flight on the thread pool, not yet counted
    uv_run(&loop_, UV_RUN_DEFAULT);
    EXPECT_EQ((*log)->stats().lines, 3u + n);
    // A line still gathering when the log goes is written on the way out.
    (*log)->write(fullRecord());
  }
  uv_run(&loop_, UV_RUN_DEFAULT);
  EXPECT_EQ(std::filesystem::file_size(path), (4 + (64 << 10) / line.size() + 1) * line.size());
  {
    AccessLogOptions o{path, AccessLogFormat::kText, 1 << 20};
    o.flush_delay_ms = 0;  // no gathering: the write starts at once
    auto log = AccessLog::open(&loop_, o);
    ASSERT_TRUE(log);
    (*log)->write(fullRecord());
    uv_run(&loop_, UV_RUN_NOWAIT);
    uv_run(&loop_, UV_RUN_DEFAULT);
    EXPECT_EQ((*log)->stats().lines, 1u);
  }
  uv_run(&loop_, UV_RUN_DEFAULT);
  std::filesystem::remove_all(tmpl);
}

TEST_F(AccessLogWriterTest, WriteErrorsAreCounted) {
  auto log = AccessLog::open(&loop_, {"/dev/full", AccessLogFormat::kText, 1 << 20});
  ASSERT_TRUE(log) << log.status().message();
  (*log)->write(fullRecord());
  uv_run(&loop_, UV_RUN_DEFAULT);
  EXPECT_EQ((*log)->stats().write_errors, 1u);
  EXPECT_EQ((*log)->stats().dropped, 1u);
  EXPECT_EQ((*log)->stats().lines, 0u);
  auto bad = AccessLog::open(&loop_, {"/nonexistent-dir/a.log", AccessLogFormat::kText, 1024});
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.status().message().find("/nonexistent-dir/a.log"), std::string::npos);
  auto off = AccessLog::open(&loop_, {"off", AccessLogFormat::kText, 1024});
  ASSERT_TRUE(off);
  EXPECT_EQ(off->get(), nullptr);
}

// A sink nobody drains (a full pipe): the loop keeps going, lines beyond the buffer are dropped
// and counted; once the reader drains the pipe, what was buffered arrives.
TEST_F(AccessLogWriterTest, StuckSinkDropsInsteadOfBlocking) {
  int p[2];
  ASSERT_EQ(pipe2(p, O_CLOEXEC), 0);
  std::string path = "/proc/self/fd/" + std::to_string(p[1]);
  auto log = AccessLog::open(&loop_, {path, AccessLogFormat::kText, 16 << 10});
  ASSERT_TRUE(log) << log.status().message();
  std::string line = formatAccessLog(fullRecord(), AccessLogFormat::kText);
  // Enough to fill the pipe (64 KiB) and then the 16 KiB buffer several times over.
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 2000; ++i) {
    (*log)->write(fullRecord());
    uv_run(&loop_, UV_RUN_NOWAIT);
  }
  auto spent = std::chrono::steady_clock::now() - t0;
  AccessLogStats s = (*log)->stats();
  EXPECT_GT(s.dropped, 0u) << "nothing dropped although the sink was stuck";
  EXPECT_LT(s.lines, 2000u);
  // Not a speed assertion: a loop blocked on the pipe would never get here at all.
  EXPECT_LT(spent, std::chrono::seconds(60));
  // Drain the pipe so the write in flight returns, then let the log go.
  ASSERT_EQ(fcntl(p[0], F_SETFL, O_NONBLOCK), 0);
  std::thread reader([fd = p[0]] {
    char buf[65536];
    for (int idle = 0; idle < 200;) {
      ssize_t n = read(fd, buf, sizeof(buf));
      if (n > 0) idle = 0;
      else {
        idle++;
        usleep(5000);
      }
    }
  });
  log->reset();
  uv_run(&loop_, UV_RUN_DEFAULT);
  reader.join();
  close(p[0]);
  close(p[1]);
}

// A burst of lines (10000 connections ending at once) grows the buffers far beyond what
// steady traffic needs; once written, that capacity is given back, and steady batches then
// keep the buffers they have.
TEST_F(AccessLogWriterTest, BurstCapacityIsGivenBackOnceWritten) {
  char tmpl[] = "/tmp/weft-alog-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  std::string path = std::string(tmpl) + "/a.log";
  {
    AccessLogOptions o{path, AccessLogFormat::kText, 8 << 20};
    auto log = AccessLog::open(&loop_, o);
    ASSERT_TRUE(log) << log.status().message();
    // The first flush_bytes go out at once; the rest gathers while that write is in flight.
    for (int i = 0; i < 10000; ++i) (*log)->write(fullRecord());
    EXPECT_GT((*log)->bufferCapacity(), size_t{2} << 20) << "the burst is buffered";
    uv_run(&loop_, UV_RUN_DEFAULT);
    EXPECT_EQ((*log)->stats().lines, 10000u);
    EXPECT_EQ((*log)->stats().dropped, 0u);
    EXPECT_LE((*log)->bufferCapacity(), size_t{256} << 10) << "the burst's capacity is kept";
    size_t steady = 0;
    for (int round = 0; round < 5; ++round) {
      for (int i = 0; i < 100; ++i) (*log)->write(fullRecord());
      uv_run(&loop_, UV_RUN_DEFAULT);  // the gathering delay, then the write
      if (round == 1) steady = (*log)->bufferCapacity();
    }
    EXPECT_EQ((*log)->stats().lines, 10500u);
    EXPECT_GT(steady, 0u);
    EXPECT_EQ((*log)->bufferCapacity(), steady) << "steady batches reallocate their buffers";
  }
  uv_run(&loop_, UV_RUN_DEFAULT);
  std::string line = formatAccessLog(fullRecord(), AccessLogFormat::kText);
  EXPECT_EQ(std::filesystem::file_size(path), 10500 * line.size());
  std::filesystem::remove_all(tmpl);
}

// --- Log rotation. The writer checks the path every reopen_check_ms (1 ms here, so the tests do
// not wait for the default second) before a batch; lines are counted by connection id.

// The connection ids of the text lines in `text`, in order; *bad counts lines that are not a
// whole access-log line (no conn_id, or no final '\n').
std::vector<uint64_t> idsIn(const std::string& text, int* bad) {
  std::vector<uint64_t> ids;
  size_t at = 0;
  while (at < text.size()) {
    size_t nl = text.find('\n', at);
    std::string line = text.substr(at, nl == std::string::npos ? std::string::npos : nl - at);
    size_t k = line.find("\tconn_id=");
    size_t end = k == std::string::npos ? k : line.find(' ', k);
    if (nl == std::string::npos || k == std::string::npos || end == std::string::npos ||
        line.rfind("\tinfo\taccess\tconnection complete", k) == std::string::npos) {
      ++*bad;
    } else {
      ids.push_back(std::stoull(line.substr(k + 9, end - k - 9)));
    }
    if (nl == std::string::npos) break;
    at = nl + 1;
  }
  return ids;
}

std::string fileText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Everything in an open file (one kept open to follow an inode that was renamed or deleted).
std::string fdText(int fd) {
  std::string out;
  char buf[65536];
  for (off_t off = 0;;) {
    ssize_t n = pread(fd, buf, sizeof(buf), off);
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
    off += n;
  }
  return out;
}

class AccessLogRotationTest : public AccessLogWriterTest {
 protected:
  void SetUp() override {
    AccessLogWriterTest::SetUp();
    char tmpl[] = "/tmp/weft-alog-rot-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/a.log";
  }
  void TearDown() override {
    log_.reset();
    AccessLogWriterTest::TearDown();
    std::filesystem::remove_all(dir_);
  }
  void openLog(uint64_t check_ms) {
    AccessLogOptions o{path_, AccessLogFormat::kText, 1 << 20};
    o.flush_delay_ms = 0;
    o.reopen_check_ms = check_ms;
    auto log = AccessLog::open(&loop_, o);
    ASSERT_TRUE(log) << log.status().message();
    log_ = std::move(*log);
  }
  // Lines next_id_..next_id_+n-1, written out before returning.
  void writeLines(int n) {
    for (int i = 0; i < n; ++i) {
      AccessLogRecord r = fullRecord();
      r.connection_id = next_id_++;
      log_->write(r);
    }
    uv_run(&loop_, UV_RUN_DEFAULT);
  }
  // One line per pass, 2 ms apart so that the check comes due, until done() holds (bounded:
  // false after 10 s of passes).
  bool writeUntil(const std::function<bool()>& done) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
      writeLines(1);
      if (done()) return true;
    }
    return false;
  }
  // Every id 0..next_id_-1 exactly once over `parts` (in order, each part ascending: nothing
  // lost, duplicated or reordered across the rotation), and every line whole.
  void expectAllOnce(const std::vector<std::string>& parts) {
    std::vector<uint64_t> all;
    for (size_t p = 0; p < parts.size(); ++p) {
      int bad = 0;
      auto ids = idsIn(parts[p], &bad);
      EXPECT_EQ(bad, 0) << "part " << p << " has a partial or foreign line";
      all.insert(all.end(), ids.begin(), ids.end());
    }
    ASSERT_EQ(all.size(), next_id_) << "lines lost or duplicated";
    for (uint64_t i = 0; i < all.size(); ++i) ASSERT_EQ(all[i], i) << "at line " << i;
  }

  std::string dir_, path_;
  AccessLogPtr log_;
  uint64_t next_id_ = 0;
};

// logrotate's default (create): a.log renamed to a.log.1. The next check reopens a.log; what was
// written before went to a.log.1, everything after to the new a.log.
TEST_F(AccessLogRotationTest, RenamedFileIsReopenedAtThePath) {
  openLog(1);
  writeLines(100);
  ASSERT_EQ(rename(path_.c_str(), (path_ + ".1").c_str()), 0);
  ASSERT_TRUE(writeUntil([&] { return log_->stats().reopens == 1; }))
      << "never reopened after the rename";
  writeLines(100);
  EXPECT_EQ(log_->stats().reopens, 1u);
  EXPECT_EQ(log_->stats().reopen_errors, 0u);
  EXPECT_EQ(log_->stats().lines, next_id_);
  log_.reset();
  uv_run(&loop_, UV_RUN_DEFAULT);
  std::string old_text = fileText(path_ + ".1"), new_text = fileText(path_);
  int bad = 0;
  EXPECT_GE(idsIn(old_text, &bad).size(), 100u);
  EXPECT_GE(idsIn(new_text, &bad).size(), 100u);
  expectAllOnce({old_text, new_text});
  struct stat st {};
  ASSERT_EQ(stat(path_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0640u) << "the new file is created 0640 like the first";
}

// The file deleted (rm): recreated at the path; the lines written to the deleted inode before
// the check noticed are still in it (read through a descriptor kept open), none twice.
TEST_F(AccessLogRotationTest, DeletedFileIsRecreated) {
  openLog(1);
  writeLines(50);
  int old_fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(old_fd, 0);
  ASSERT_EQ(unlink(path_.c_str()), 0);
  ASSERT_TRUE(writeUntil([&] { return log_->stats().reopens == 1; }));
  writeLines(50);
  EXPECT_TRUE(std::filesystem::exists(path_));
  EXPECT_EQ(log_->stats().reopen_errors, 0u);
  log_.reset();
  uv_run(&loop_, UV_RUN_DEFAULT);
  expectAllOnce({fdText(old_fd), fileText(path_)});
  close(old_fd);
}

// copytruncate: a.log copied to a.log.1 and truncated in place. Same inode, so no reopen; with
// O_APPEND the next lines start at offset 0 of the truncated file (no hole of NULs).
TEST_F(AccessLogRotationTest, CopytruncateWritesFromTheStart) {
  openLog(1);
  writeLines(50);
  std::filesystem::copy_file(path_, path_ + ".1");
  ASSERT_EQ(truncate(path_.c_str(), 0), 0);
  // Several passes, so the rotation check runs (and must find the same file).
  ASSERT_TRUE(writeUntil([&] { return next_id_ >= 60; }));
  log_.reset();
  uv_run(&loop_, UV_RUN_DEFAULT);
  std::string copy = fileText(path_ + ".1"), now = fileText(path_);
  EXPECT_EQ(now.find('\0'), std::string::npos) << "a hole before the new lines";
  int bad = 0;
  auto ids = idsIn(now, &bad);
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids.front(), 50u) << "the truncated file starts with the first line after it";
  EXPECT_EQ(now.rfind("2025-11-26T", 0), 0u) << now.substr(0, 40);  // a line at offset 0
  expectAllOnce({copy, now});
}

// The directory removed: the reopen fails, is counted (every check) and the lines keep going to
// the old file; once the directory is back, the next check reopens there.
TEST_F(AccessLogRotationTest, ReopenFailureKeepsTheOldFileAndRetries) {
  std::string sub = dir_ + "/logs";
  ASSERT_EQ(mkdir(sub.c_str(), 0755), 0);
  path_ = sub + "/a.log";
  openLog(1);
  writeLines(20);
  int old_fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(old_fd, 0);
  ASSERT_EQ(unlink(path_.c_str()), 0);
  ASSERT_EQ(rmdir(sub.c_str()), 0);
  ASSERT_TRUE(writeUntil([&] { return log_->stats().reopen_errors >= 2; }))
      << "the failed reopen was not counted and retried";
  EXPECT_EQ(log_->stats().reopens, 0u);
  EXPECT_EQ(log_->stats().write_errors, 0u);
  EXPECT_EQ(log_->stats().dropped, 0u);
  EXPECT_EQ(log_->stats().lines, next_id_) << "lines still written (to the old file)";
  ASSERT_EQ(mkdir(sub.c_str(), 0755), 0);
  ASSERT_TRUE(writeUntil([&] { return log_->stats().reopens == 1; }))
      << "not reopened once the directory was back";
  uint64_t errors = log_->stats().reopen_errors;
  writeLines(20);
  EXPECT_EQ(log_->stats().reopen_errors, errors);
  log_.reset();
  uv_run(&loop_, UV_RUN_DEFAULT);
  expectAllOnce({fdText(old_fd), fileText(path_)});
  close(old_fd);
}

// SIGHUP (a real signal to this process, handled on the loop as weft-ztunnel does) reopens at
// once, even with no line waiting; without automatic checks the renamed file kept the lines.
TEST_F(AccessLogRotationTest, ReopenOnSighup) {
  openLog(0);  // no automatic check: only reopen()
  writeLines(10);
  ASSERT_EQ(rename(path_.c_str(), (path_ + ".1").c_str()), 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  writeLines(10);
  EXPECT_FALSE(std::filesystem::exists(path_)) << "reopened without a check or a signal";
  uv_signal_t hup;
  ASSERT_EQ(uv_signal_init(&loop_, &hup), 0);
  hup.data = log_.get();
  ASSERT_EQ(uv_signal_start(
                &hup, [](uv_signal_t* h, int) { static_cast<AccessLog*>(h->data)->reopen(); },
                SIGHUP),
            0);
  ASSERT_EQ(kill(getpid(), SIGHUP), 0);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (log_->stats().reopens == 0 && std::chrono::steady_clock::now() < deadline) {
    uv_run(&loop_, UV_RUN_NOWAIT);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  uv_close(reinterpret_cast<uv_handle_t*>(&hup), nullptr);
  uv_run(&loop_, UV_RUN_DEFAULT);
  ASSERT_EQ(log_->stats().reopens, 1u);
  EXPECT_TRUE(std::filesystem::exists(path_)) << "reopen with no lines waiting creates the file";
  EXPECT_EQ(std::filesystem::file_size(path_), 0u);
  writeLines(10);
  log_->reopen();  // again, with nothing renamed: a new descriptor on the same file
  writeLines(10);
  EXPECT_EQ(log_->stats().reopens, 2u);
  log_.reset();
  uv_run(&loop_, UV_RUN_DEFAULT);
  expectAllOnce({fileText(path_ + ".1"), fileText(path_)});
}

}  // namespace
}  // namespace weft::ztunnel
