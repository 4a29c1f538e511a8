// The ztunnel's HTTP endpoints: admin (config_dump, connections, stats, logging), Prometheus
// metrics, and readiness.
#include <spdlog/spdlog.h>

#include <cstdlib>
#include <ctime>

#include "common/log.h"
#include "ztunnel/trace.h"
#include "ztunnel/ztunnel.h"

namespace weft::ztunnel {

namespace {

HttpResponse json(int status, const nlohmann::json& j) {
  return HttpResponse{status, "application/json", j.dump(2) + "\n"};
}

HttpResponse error(int status, const std::string& msg) {
  return json(status, nlohmann::json{{"error", msg}});
}

nlohmann::json workloadJson(const WorkloadInfo& w) {
  nlohmann::json ips = nlohmann::json::array();
  for (const IpAddr& ip : w.ips) ips.push_back(ip.toString());
  return {{"uid", w.uid},         {"name", w.name}, {"namespace", w.namespace_},
          {"service_account", w.service_account}, {"ips", ips},     {"node", w.node},
          {"enrolled", w.enrolled}};
}

std::vector<std::string> splitQuery(const std::string& q) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start < q.size()) {
    size_t amp = q.find('&', start);
    if (amp == std::string::npos) amp = q.size();
    if (amp > start) out.push_back(q.substr(start, amp - start));
    start = amp + 1;
  }
  return out;
}

nlohmann::json policyJson(const AuthorizationPolicy& p) {
  nlohmann::json rules = nlohmann::json::array();
  for (const PolicyRule& r : p.rules)
    rules.push_back({{"from", r.from.size()}, {"to", r.to.size()}, {"when", r.when.size()},
                     {"l7_fields", r.l7_fields}});
  return {{"namespace", p.namespace_}, {"name", p.name}, {"action", policyActionName(p.action)},
          {"selector", p.has_selector ? nlohmann::json(p.match_labels) : nlohmann::json(nullptr)},
          {"dry_run", p.dry_run}, {"rules", rules}};
}

nlohmann::json serviceJson(const ServiceInfo& s) {
  nlohmann::json vips = nlohmann::json::array(), ports = nlohmann::json::array(),
                 eps = nlohmann::json::array();
  for (const IpAddr& v : s.vips) vips.push_back(v.toString());
  for (const ServicePortInfo& p : s.ports)
    ports.push_back({{"port", p.port}, {"target_port", p.target_port},
                     {"protocol", p.tcp ? "TCP" : "UDP"}, {"name", p.name},
                     {"target_port_name", p.target_port_name}});
  for (const ServiceEndpointInfo& e : s.endpoints) {
    nlohmann::json tps = nlohmann::json::object();
    for (const auto& [sp, tp] : e.target_ports) tps[std::to_string(sp)] = tp;
    eps.push_back({{"workload_uid", e.workload_uid}, {"ip", e.ip.toString()},
                   {"target_ports", tps}});
  }
  return {{"name", s.name}, {"namespace", s.namespace_}, {"vips", vips}, {"ports", ports},
          {"endpoints", eps}, {"load_balancer", loadBalancingName(s.load_balancing)}};
}

}  // namespace

nlohmann::json Ztunnel::configDump() {
  nlohmann::json workloads = nlohmann::json::array(), services = nlohmann::json::array(),
                 policies = nlohmann::json::array();
  if (const ClusterStatePtr& st = proxy_.state()) {
    for (const auto& [uid, w] : st->workloads()) workloads.push_back(workloadJson(*w));
    for (const auto& [key, s] : st->services()) services.push_back(serviceJson(*s));
    for (const auto& p : st->authorizationPolicies()) policies.push_back(policyJson(*p));
  }
  nlohmann::json node = nullptr;
  if (have_node_config_) {
    node = {{"node_name", node_config_.node_name()},
            {"bpf_pin_dir", node_config_.bpf_pin_dir()},
            {"trust_domain", node_config_.trust_domain()},
            {"cluster_domain", node_config_.cluster_domain()}};
  }
  // Certificates: public facts only, never key material.
  nlohmann::json certificates = nlohmann::json::array();
  if (identities_) {
    auto iso = [](tls::TimePoint t) -> nlohmann::json {
      if (t == tls::TimePoint{}) return nullptr;
      time_t secs = std::chrono::system_clock::to_time_t(t);
      struct tm tm {};
      gmtime_r(&secs, &tm);
      char buf[32];
      std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
      return std::string(buf);
    };
    for (const IdentityView& v : identities_->view()) {
      certificates.push_back({{"identity", v.identity},
                              {"state", certStateName(v.state)},
                              {"serial", v.serial},
                              {"not_before", iso(v.not_before)},
                              {"not_after", iso(v.not_after)},
                              {"renew_at", iso(v.renew_at)},
                              {"workloads", v.workloads},
                              {"issued", v.issued},
                              {"failures", v.failures},
                              {"last_error", v.last_error}});
    }
  }
  // Per loop: what it served and holds (loop 0 = the main loop, also the DNS proxies').
  nlohmann::json loops = nlohmann::json::array();
  loops.push_back({{"loop", 0},
                   {"active_connections", proxy_.activeConnections()},
                   {"pooled_buffer_bytes", LoopMemory::pooledBytes()},
                   {"verdicts", {{"capacity", proxy_.verdicts().capacity()},
                                 {"kept", proxy_.verdicts().size()}}},
                   {"stats", proxy_.stats().toJson()}});
  for (LoopSnapshot& w : workerSnapshots()) {
    loops.push_back({{"loop", w.loop},
                     {"active_connections", w.active_connections},
                     {"connections_waiting_for_certificate", w.certificate_waits},
                     {"hbone_pool_connections", w.mtls.pool_connections},
                     {"hbone_client_handshakes", w.mtls.client_handshakes},
                     {"hbone_server_handshakes", w.mtls.server.handshakes},
                     {"pooled_buffer_bytes", w.pooled_cipher_bytes + w.pooled_chunk_bytes},
                     {"verdicts", {{"capacity", w.verdict_capacity}, {"kept", w.verdicts_kept}}},
                     {"stats", w.stats.toJson()}});
  }
  return {{"node_config", node},
          {"loops", loops},
          {"access_log", accessLogJson()},
          {"certificates", certificates},
          {"mtls", mesh_tls_ ? mesh_tls_->toJson() : nlohmann::json(nullptr)},
          {"ready", ready_},
          {"draining", draining_},
          {"agent_connected", agent_ && agent_->connected()},
          {"local_workloads", workloads_.toJson()},
          {"workloads", workloads},
          {"services", services},
          {"endpoint_load", proxy_.balancer().toJson()},
          {"authorization_policies", policies},
          {"events", events_ ? events_->statsJson() : nlohmann::json(nullptr)},
          {"fast_path", fast_path_->statusJson()},
          {"memory", memoryJson()}};
}

HttpResponse Ztunnel::handleAdmin(const HttpRequest& req) {
  if (req.path == "/access_log") {
    // GET: sink, format and counts; POST ?format=text|json switches the format at run time.
    if (req.method == "GET") return json(200, accessLogJson());
    if (req.method != "POST" && req.method != "PUT")
      return error(405, "GET /access_log or POST /access_log?format=text|json");
    std::string prefix = "format=";
    auto f = req.query.rfind(prefix, 0) == 0
                 ? parseAccessLogFormat(req.query.substr(prefix.size()))
                 : std::nullopt;
    if (!f) return error(400, "want format=text|json");
    if (!access_log_) return error(409, "the access log is off (--access-log)");
    access_log_->setFormat(*f);
    spdlog::info("access log format: {}", accessLogFormatName(*f));
    return json(200, accessLogJson());
  }
  if (req.path == "/fast_path") {
    // GET: state and counters; POST ?enabled=on|off switches caching verdicts at run time.
    if (req.method == "GET") return json(200, fast_path_->statusJson());
    if (req.method != "POST" && req.method != "PUT")
      return error(405, "GET /fast_path or POST /fast_path?enabled=on|off");
    if (req.query != "enabled=on" && req.query != "enabled=off")
      return error(400, "want enabled=on|off");
    fast_path_->setEnabled(req.query == "enabled=on");
    return json(200, fast_path_->statusJson());
  }
  if (req.path == "/logging") {
    if (req.method == "GET") {
      auto level = spdlog::level::to_string_view(spdlog::get_level());
      return json(200, {{"level", std::string(level.data(), level.size())}});
    }
    if (req.method != "POST" && req.method != "PUT") return error(405, "POST /logging?level=L");
    std::string prefix = "level=";
    if (req.query.rfind(prefix, 0) != 0 || !setLogLevel(req.query.substr(prefix.size())))
      return error(400, "want level=trace|debug|info|warn|error");
    return json(200, {{"level", req.query.substr(prefix.size())}});
  }
  if (req.method != "GET") return error(405, "GET only");
  if (req.path == "/events") {
    if (!events_) return error(503, "shutting down");
    return events_->subscribe(req);
  }
  if (req.path == "/trace") {
    auto q = parseTraceQuery(req.query);
    if (!q) return error(400, q.status().message());
    TraceContext ctx;
    ctx.state = proxy_.state().get();
    ctx.balancer = &proxy_.balancer();
    if (have_node_config_ && !node_config_.trust_domain().empty())
      ctx.trust_domain = node_config_.trust_domain();
    ctx.cluster_domain = proxy_.clusterDomain();
    auto t = traceConnection(ctx, q.value());
    if (!t) return error(ctx.state ? 404 : 503, t.status().message());
    return json(200, t.value());
  }
  if (req.path == "/config_dump") return json(200, configDump());
  if (req.path == "/connections") {
    nlohmann::json all = proxy_.connectionsJson();
    for (LoopSnapshot& w : workerSnapshots())
      for (auto& c : w.connections) all.push_back(std::move(c));
    for (auto& c : fast_path_->connectionsJson()) all.push_back(std::move(c));
    return json(200, all);
  }
  if (req.path == "/stats") return json(200, mergedStats(workerSnapshots()).toJson());
  if (req.path == "/verdicts") {
    // ?since=SEQ (events after it) &limit=N (the newest N of those)
    uint64_t since = 0;
    size_t limit = VerdictLog::kDefaultCapacity;
    for (const std::string& kv : splitQuery(req.query)) {
      auto eq = kv.find('=');
      std::string k = kv.substr(0, eq), v = eq == std::string::npos ? "" : kv.substr(eq + 1);
      char* end = nullptr;
      unsigned long long n = std::strtoull(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0') return error(400, "want since=SEQ and/or limit=N");
      if (k == "since") since = n;
      else if (k == "limit") limit = static_cast<size_t>(n);
      else return error(400, "unknown parameter " + k + " (since, limit)");
    }
    return json(200, proxy_.verdicts().toJson(since, limit));
  }
  if (req.path == "/" || req.path == "/help") {
    return json(200, {{"endpoints",
                       {"GET /config_dump", "GET /connections", "GET /stats",
                        "GET /verdicts?since=SEQ&limit=N", "POST /logging?level=L",
                        "GET /fast_path", "POST /fast_path?enabled=on|off",
                        "GET /events?pod=&namespace=&verdict=&kind=",
                        "GET /trace?src=NS/POD&dst=ADDR[:PORT]", "GET /logging",
                        "GET /access_log", "POST /access_log?format=text|json"}}});
  }
  return error(404, "no such endpoint: " + req.path);
}

HttpResponse Ztunnel::handleMetrics(const HttpRequest& req) {
  if (req.method != "GET") return error(405, "GET only");
  if (req.path != "/metrics" && req.path != "/stats/prometheus")
    return error(404, "metrics are at /metrics");
  // Every loop's counters summed (the workers' copied out on their own threads).
  std::vector<LoopSnapshot> workers = workerSnapshots();
  std::map<TcpLabels, TcpCounters> tcp = proxy_.tcpSeries();
  std::map<TcpLabels, uint64_t> failures = proxy_.tcpMetrics().failures();
  MeshTlsCounters mtls = mesh_tls_ ? mesh_tls_->counters() : MeshTlsCounters{};
  for (const LoopSnapshot& w : workers) {
    for (const auto& [l, c] : w.tcp) {
      TcpCounters& t = tcp[l];
      t.opened += c.opened;
      t.closed += c.closed;
      t.sent_bytes += c.sent_bytes;
      t.received_bytes += c.received_bytes;
    }
    for (const auto& [l, n] : w.tcp_failures) failures[l] += n;
    mtls += w.mtls;
  }
  return HttpResponse{200, "text/plain; version=0.0.4",
                      TcpMetrics::renderPrometheus(tcp, failures) +
                          mergedStats(workers).renderPrometheus() +
                          proxy_.verdicts().renderPrometheus() +
                          (mesh_tls_ ? MeshTls::renderRefusals(mtls) : std::string()) +
                          renderWeftMetrics() + renderMemoryMetrics(workers)};
}

HttpResponse Ztunnel::handleReadiness(const HttpRequest& req) {
  if (req.path != "/healthz/ready") return error(404, "readiness is at /healthz/ready");
  // Ready once a snapshot from the agent was applied; it stays so while the agent is away
  // (we keep serving what we hold) and ends with the drain.
  if (ready_ && !draining_) return HttpResponse{200, "text/plain", "ready\n"};
  return HttpResponse{503, "text/plain", draining_ ? "draining\n" : "not ready\n"};
}

}  // namespace weft::ztunnel
