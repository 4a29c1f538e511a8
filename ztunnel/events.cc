// The /events stream: the BPF ring buffer consumed on the loop (ring_buffer's epoll fd on a
// uv_poll), verdicts from the VerdictLog observer, filters and bounded per-client queues.
#include "ztunnel/events.h"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <spdlog/spdlog.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <chrono>

#include "bpf/abi/progs.h"
#include "common/fd.h"

namespace weft::ztunnel {

namespace {

const char* bpfEventType(uint32_t t) {
  switch (t) {
    case WEFT_EVENT_REDIRECT: return "redirect";
    case WEFT_EVENT_INBOUND_STEER: return "inbound_steer";
    case WEFT_EVENT_BIND_DENIED: return "bind_denied";
    case WEFT_EVENT_DNS_REDIRECT: return "dns_redirect";
    case WEFT_EVENT_FAST_OPEN: return "fast_open";
    case WEFT_EVENT_FAST_CLOSE: return "fast_close";
  }
  return "unknown";
}

// A weft_sockaddr as "ip:port", or null when unset (family 0).
nlohmann::json sockaddrJson(const weft_sockaddr& a) {
  if (a.family != WEFT_AF_INET && a.family != WEFT_AF_INET6) return nullptr;
  return SocketAddress::fromAbi(a).toString();
}

std::string nsOf(const std::string& pod) {
  size_t slash = pod.find('/');
  return slash == std::string::npos ? "" : pod.substr(0, slash);
}

bool podMatches(const std::string& want, const std::string& pod) {
  if (pod.empty()) return false;
  if (want.find('/') != std::string::npos) return want == pod;
  return pod.substr(pod.find('/') + 1) == want;
}

std::string str(const nlohmann::json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
}

int64_t wallMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace

Result<EventFilter> EventFilter::parse(const std::string& query) {
  auto q = parseQuery(query);
  if (!q) return q.status();
  EventFilter f;
  for (const auto& [k, v] : q.value()) {
    if (k == "pod") f.pod = v;
    else if (k == "namespace") f.namespace_ = v;
    else if (k == "verdict") f.verdict = v;
    else if (k == "kind") f.kind = v;
    else return Status::errorf("unknown parameter {} (pod, namespace, verdict, kind)", k);
  }
  if (!f.verdict.empty() && f.verdict != "allow" && f.verdict != "deny" && f.verdict != "audit")
    return Status::errorf("verdict={}: want allow, deny or audit", f.verdict);
  if (!f.kind.empty() && f.kind != "redirect" && f.kind != "verdict")
    return Status::errorf("kind={}: want redirect or verdict", f.kind);
  return f;
}

nlohmann::json EventFilter::toJson() const {
  auto opt = [](const std::string& s) { return s.empty() ? nlohmann::json() : nlohmann::json(s); };
  return {{"pod", opt(pod)}, {"namespace", opt(namespace_)}, {"verdict", opt(verdict)},
          {"kind", opt(kind)}};
}

bool EventFilter::matches(const nlohmann::json& e) const {
  std::string k = str(e, "kind");
  bool is_verdict = k == "verdict";
  if (!kind.empty() && kind != k) return false;
  if (!verdict.empty()) {
    if (!is_verdict) return false;
    if (verdict == "audit") {
      if (!e.contains("audit") || e["audit"].empty()) return false;
    } else if (str(e, "result") != verdict) {
      return false;
    }
  }
  // The pods an event is about: a redirect's pod; both ends of a verdict.
  std::string a, b;
  if (is_verdict) {
    a = e.contains("source") ? str(e["source"], "workload") : "";
    b = e.contains("destination") ? str(e["destination"], "workload") : "";
  } else {
    a = str(e, "pod");
  }
  if (!pod.empty() && !podMatches(pod, a) && !podMatches(pod, b)) return false;
  if (!namespace_.empty()) {
    std::string src_ns = is_verdict && e.contains("source") ? str(e["source"], "namespace") : "";
    if (nsOf(a) != namespace_ && nsOf(b) != namespace_ && src_ns != namespace_) return false;
  }
  return true;
}

EventHub::EventHub(uv_loop_t* loop, EventPodResolver resolver)
    : loop_(loop), resolver_(std::move(resolver)) {}

EventHub::~EventHub() {
  stopBpf();
  for (Client& c : clients_) {
    c.writer->onClose(nullptr);
    c.writer->finish();
  }
  clients_.clear();
}

void EventHub::stopBpf() {
  poll_.reset();  // stops polling the epoll fd at once; the handle is freed on close
  if (rb_ != nullptr) ring_buffer__free(rb_);
  rb_ = nullptr;
}

Status EventHub::setPinDir(const std::string& pin_dir) {
  if (pin_dir == pin_dir_ && rb_ != nullptr) return Status::ok();
  stopBpf();
  pin_dir_ = pin_dir;
  if (pin_dir.empty()) return Status::ok();
  std::string path = pin_dir + "/" WEFT_PIN_MAPS "/" WEFT_MAP_EVENTS;
  UniqueFd map(bpf_obj_get(path.c_str()));
  if (!map.valid()) return Status::errorf("open pinned map {}: {}", path, errnoText(errno));
  // The ring keeps its own reference to the map; our fd can go.
  ring_buffer* rb = ring_buffer__new(map.get(), &EventHub::onRingRecord, this, nullptr);
  if (rb == nullptr) return Status::errorf("ring_buffer__new {}: {}", path, errnoText(errno));
  int epfd = ring_buffer__epoll_fd(rb);
  poll_ = std::make_unique<UvHandle<uv_poll_t>>();
  int rc = poll_->init(uv_poll_init(loop_, poll_->get(), epfd));
  if (rc != 0) {
    poll_.reset();
    ring_buffer__free(rb);
    return Status::errorf("uv_poll_init on {}'s epoll fd: {}", path, uv_strerror(rc));
  }
  poll_->get()->data = this;
  rc = uv_poll_start(poll_->get(), UV_READABLE, [](uv_poll_t* p, int status, int) {
    auto* self = static_cast<EventHub*>(p->data);
    if (status < 0) {
      spdlog::warn("events ring: poll: {}", uv_strerror(status));
      return;
    }
    int n = ring_buffer__consume(self->rb_);
    if (n < 0) spdlog::warn("events ring: consume: {}", errnoText(-n));
  });
  if (rc != 0) {
    poll_.reset();
    ring_buffer__free(rb);
    return Status::errorf("uv_poll_start on {}: {}", path, uv_strerror(rc));
  }
  rb_ = rb;
  spdlog::info("consuming BPF events from {}", path);
  return Status::ok();
}

int EventHub::onRingRecord(void* ctx, void* data, size_t size) {
  auto* self = static_cast<EventHub*>(ctx);
  if (size < sizeof(weft_event)) {
    self->malformed_++;
    return 0;
  }
  weft_event e;
  memcpy(&e, data, sizeof(e));
  if (e.type == WEFT_EVENT_FAST_OPEN || e.type == WEFT_EVENT_FAST_CLOSE) {
    if (size < sizeof(weft_fast_event)) {
      self->malformed_++;
      return 0;
    }
    weft_fast_event f;
    memcpy(&f, data, sizeof(f));
    if (self->on_fast_) self->on_fast_(f);
  }
  self->publishBpf(e);
  return 0;
}

nlohmann::json EventHub::bpfEventJson(const weft_event& e) const {
  // bpf_ktime_get_ns is CLOCK_MONOTONIC: place the event on the wall clock by its age.
  timespec now{};
  clock_gettime(CLOCK_MONOTONIC, &now);
  int64_t mono_ns = static_cast<int64_t>(now.tv_sec) * 1000000000 + now.tv_nsec;
  int64_t age_ms = (mono_ns - static_cast<int64_t>(e.timestamp_ns)) / 1000000;
  if (age_ms < 0) age_ms = 0;
  std::string pod;
  if (e.netns_cookie != 0 && resolver_.by_cookie) pod = resolver_.by_cookie(e.netns_cookie);
  if (pod.empty() && e.type == WEFT_EVENT_INBOUND_STEER && resolver_.by_ip) {
    if (e.dst.family == WEFT_AF_INET || e.dst.family == WEFT_AF_INET6)
      pod = resolver_.by_ip(SocketAddress::fromAbi(e.dst).ip());
  }
  return {{"kind", "redirect"},
          {"type", bpfEventType(e.type)},
          {"time_ms", wallMs() - age_ms},
          {"netns_cookie", e.netns_cookie},
          {"pod", pod.empty() ? nlohmann::json() : nlohmann::json(pod)},
          {"src", sockaddrJson(e.src)},
          {"dst", sockaddrJson(e.dst)}};
}

void EventHub::publishBpf(const weft_event& e) {
  bpf_events_++;
  if (clients_.empty()) return;
  fanOut(bpfEventJson(e));
}

void EventHub::publishVerdict(const VerdictEvent& e) {
  verdict_events_++;
  if (clients_.empty()) return;
  nlohmann::json j = VerdictLog::eventJson(e);
  j["kind"] = "verdict";
  j["time_ms"] = e.time_ms;
  fanOut(j);
}

void EventHub::fanOut(const nlohmann::json& event) {
  std::string line;
  for (auto it = clients_.begin(); it != clients_.end();) {
    Client& c = *it;
    if (c.writer->closed()) {
      it = clients_.erase(it);
      continue;
    }
    if (c.filter.matches(event)) {
      if (c.dropped != 0) {
        std::string note =
            nlohmann::json{{"kind", "dropped"}, {"count", c.dropped}}.dump() + "\n";
        if (c.writer->write(note)) c.dropped = 0;
      }
      if (line.empty()) line = event.dump() + "\n";
      if (c.dropped != 0 || !c.writer->write(line)) {
        c.dropped++;
        dropped_++;
      }
    }
    ++it;
  }
}

HttpResponse EventHub::subscribe(const HttpRequest& req) {
  auto filter = EventFilter::parse(req.query);
  if (!filter) {
    return HttpResponse{400, "application/json",
                        nlohmann::json{{"error", filter.status().message()}}.dump() + "\n"};
  }
  if (clients_.size() >= kMaxClients) {
    return HttpResponse{503, "application/json",
                        nlohmann::json{{"error", "too many /events clients"}}.dump() + "\n"};
  }
  if (rb_ == nullptr && !pin_dir_.empty()) {
    Status st = setPinDir(pin_dir_);
    if (!st) spdlog::warn("events: {}", st.message());
  }
  HttpResponse r;
  r.content_type = "application/x-ndjson";
  r.stream_max_queued = kClientQueueBytes;
  EventFilter f = filter.value();
  r.stream = [this, f](HttpStreamWriterPtr w) {
    nlohmann::json start = {{"kind", "start"},
                            {"time_ms", wallMs()},
                            {"bpf_events", rb_ != nullptr},
                            {"filter", f.toJson()}};
    if (!w->write(start.dump() + "\n")) return;
    clients_.push_back(Client{w, f, 0});
  };
  return r;
}

size_t EventHub::clients() const {
  size_t n = 0;
  for (const Client& c : clients_) n += c.writer->closed() ? 0 : 1;
  return n;
}

nlohmann::json EventHub::statsJson() const {
  return {{"consuming_bpf", rb_ != nullptr}, {"clients", clients()},
          {"bpf_events", bpf_events_},       {"verdict_events", verdict_events_},
          {"dropped", dropped_},             {"malformed", malformed_}};
}

}  // namespace weft::ztunnel
