// Per-loop proxy state: live connections, /connections, and the TCP metrics view.
#include "ztunnel/proxy.h"

#include <vector>

#include "ztunnel/connection.h"
#include "ztunnel/inbound.h"
#include "ztunnel/mesh_tls.h"
#include "ztunnel/outbound.h"

namespace weft::ztunnel {

Proxy::Proxy(uv_loop_t* loop, RelayOptions relay_options, BalancerOptions balancer_options)
    : loop_(loop),
      relay_options_(relay_options),
      state_(std::make_shared<ClusterState>()),
      balancer_(balancer_options) {}

Proxy::~Proxy() = default;

void Proxy::acceptOutbound(uv_stream_t* listener, const LocalPodPtr& pod) {
  handleOutbound(*this, listener, pod);
}

void Proxy::acceptInbound(uv_stream_t* listener, const LocalPodPtr& pod) {
  handleInbound(*this, listener, pod);
}

void Proxy::acceptHbone(uv_stream_t* listener, const LocalPodPtr& pod) {
  if (mesh_tls_ != nullptr) {
    mesh_tls_->acceptInbound(listener, pod);
    return;
  }
  // No mTLS side: take the connection off the backlog and drop it.
  uv_tcp_t* tmp = new uv_tcp_t{};
  if (uv_tcp_init(loop_, tmp) != 0) {
    delete tmp;
    return;
  }
  if (uv_accept(listener, reinterpret_cast<uv_stream_t*>(tmp)) != 0)
    stats_.accept_failures_total++;
  uv_close(reinterpret_cast<uv_handle_t*>(tmp),
           [](uv_handle_t* h) { delete reinterpret_cast<uv_tcp_t*>(h); });
}

void Proxy::untrack(ProxyConnection* c) {
  if (connections_.erase(c) != 0) connections_ended_++;
  // Erasing never shrinks the bucket array a burst grew (~16k buckets, 128 KiB, after 10000
  // connections): rehash down once the set is an eighth of it. Each shrink divides the array
  // by 8 or more, so the rehashes cost O(1) per connection overall.
  if (connections_.bucket_count() > kKeptConnectionBuckets &&
      connections_.size() * 8 < connections_.bucket_count())
    connections_.rehash(0);
  if (connections_.empty() && on_idle_) {
    auto cb = std::move(on_idle_);
    on_idle_ = nullptr;
    cb();
  }
}

void Proxy::abortAll(const std::string& why) {
  // abort() may close synchronously; iterate over a copy.
  std::vector<ProxyConnection*> all(connections_.begin(), connections_.end());
  for (ProxyConnection* c : all) {
    stats_.drain_aborted_connections_total++;
    c->abort(why);
  }
}

nlohmann::json Proxy::connectionsJson() const {
  nlohmann::json out = nlohmann::json::array();
  uint64_t now = uv_now(loop_);
  for (const ProxyConnection* c : connections_) {
    out.push_back({
        {"id", c->id},
        {"direction", directionName(c->direction())},
        {"state", c->stateName()},
        {"src", c->source.toString()},
        {"dst", c->destination.toString()},
        {"upstream", c->upstream.family() ? c->upstream.toString() : ""},
        {"route", c->route},
        {"path", c->path},
        {"peer_identity", c->peer_identity},
        {"source_identity", c->sourceIdentity()},
        {"destination_identity", c->destinationIdentity()},
        {"source_workload", c->labels.source_workload_namespace.empty()
                                ? ""
                                : c->labels.source_workload_namespace + "/" +
                                      c->labels.source_workload},
        {"destination_workload", c->labels.destination_workload_namespace.empty()
                                     ? ""
                                     : c->labels.destination_workload_namespace + "/" +
                                           c->labels.destination_workload},
        {"destination_service", c->labels.destination_service},
        {"bytes_received", c->bytesReceived()},
        {"bytes_sent", c->bytesSent()},
        {"age_ms", now - c->startedMs()},
        {"loop", loop_index_},
    });
  }
  return out;
}

std::map<TcpLabels, TcpCounters> Proxy::tcpSeries() const {
  std::map<TcpLabels, TcpCounters> series = tcp_metrics_.series();
  for (const ProxyConnection* c : connections_) {
    if (!c->counted()) continue;
    TcpCounters& s = series[c->labels];
    s.sent_bytes += c->bytesSent();
    s.received_bytes += c->bytesReceived();
  }
  return series;
}

std::string Proxy::renderTcpMetrics() const {
  return TcpMetrics::renderPrometheus(tcpSeries(), tcp_metrics_.failures());
}

void Proxy::connectionEnded(const ProxyConnection& c) {
  bool failed = !c.counted();
  if (failed) {
    TcpLabels l = c.labels;
    l.response_flags = c.failure_flag.empty() ? "CONNECT" : c.failure_flag;
    tcp_metrics_.failed(l);
  }
  if (access_log_ == nullptr && !access_log_forwarder_) return;
  AccessLogRecord r = c.accessLogRecord();
  if (failed && r.error.empty()) r.error = "connection not established";
  if (failed) r.response_flags = c.failure_flag.empty() ? "CONNECT" : c.failure_flag;
  if (access_log_ != nullptr) access_log_->write(r);
  else access_log_forwarder_(std::move(r));
}

void Proxy::inboundStreamRefused(const TcpLabels& labels, AccessLogRecord record) {
  tcp_metrics_.failed(labels);
  if (access_log_ == nullptr && !access_log_forwarder_) return;
  record.connection_id = nextConnectionId();
  record.response_flags = labels.response_flags;
  if (access_log_ != nullptr) access_log_->write(record);
  else access_log_forwarder_(std::move(record));
}

}  // namespace weft::ztunnel
