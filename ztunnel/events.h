// The ztunnel's event stream (GET /events, for `weftctl monitor`): redirect events consumed from
// the BPF ring buffer weft_events, merged with the proxy's policy verdicts, fanned out to clients.
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "bpf/abi/maps.h"
#include "common/http_admin.h"
#include "common/status.h"
#include "common/uv_handle.h"
#include "ztunnel/verdicts.h"

struct ring_buffer;

namespace weft::ztunnel {

// Server-side filters of one /events client (query: pod=, namespace=, verdict=, kind=).
struct EventFilter {
  std::string pod;         // "ns/name" or "name"; matches either end of a verdict
  std::string namespace_;  // matches the pod's namespace (either end of a verdict)
  std::string verdict;     // "" | allow | deny | audit (verdict events only)
  std::string kind;        // "" | redirect | verdict

  static Result<EventFilter> parse(const std::string& query);
  bool matches(const nlohmann::json& event) const;
  nlohmann::json toJson() const;
};

// Who a BPF event is about: the local pod of a netns cookie, or the pod with an IP.
struct EventPodResolver {
  std::function<std::string(uint64_t netns_cookie)> by_cookie;  // "ns/name" or ""
  std::function<std::string(const IpAddr& ip)> by_ip;           // "ns/name" or ""
};

// The BPF ring's only consumer (a ring buffer has one consumer position), on the loop.
class EventHub {
 public:
  static constexpr size_t kMaxClients = 64;
  static constexpr size_t kClientQueueBytes = 256 * 1024;

  EventHub(uv_loop_t* loop, EventPodResolver resolver);
  ~EventHub();
  EventHub(const EventHub&) = delete;
  EventHub& operator=(const EventHub&) = delete;

  // Opens <pin_dir>/maps/weft_events and consumes it from the loop; empty = stop consuming.
  // Failure leaves the stream with verdicts only (and is retried on the next subscribe).
  Status setPinDir(const std::string& pin_dir);
  bool consumingBpf() const { return rb_ != nullptr; }

  // Where the same-node fast path's FAST_OPEN/FAST_CLOSE records go (they are also published).
  void onFastEvent(std::function<void(const weft_fast_event&)> cb) { on_fast_ = std::move(cb); }

  // Producers.
  void publishVerdict(const VerdictEvent& e);
  void publishBpf(const weft_event& e);

  // GET /events?pod=&namespace=&verdict=&kind=: a chunked stream of JSON lines; the first line
  // is {"kind":"start",...}. A client that reads too slowly loses events, and the next line it
  // gets is {"kind":"dropped","count":N}.
  HttpResponse subscribe(const HttpRequest& req);
  size_t clients() const;  // open streams
  nlohmann::json statsJson() const;

  // The JSON line of a BPF event (public for tests).
  nlohmann::json bpfEventJson(const weft_event& e) const;

 private:
  struct Client {
    HttpStreamWriterPtr writer;
    EventFilter filter;
    uint64_t dropped = 0;
  };
  void fanOut(const nlohmann::json& event);
  void stopBpf();
  static int onRingRecord(void* ctx, void* data, size_t size);

  uv_loop_t* loop_;
  EventPodResolver resolver_;
  std::function<void(const weft_fast_event&)> on_fast_;
  std::string pin_dir_;
  ring_buffer* rb_ = nullptr;
  std::unique_ptr<UvHandle<uv_poll_t>> poll_;  // on the ring's epoll fd while consuming
  std::list<Client> clients_;
  uint64_t bpf_events_ = 0;
  uint64_t verdict_events_ = 0;
  uint64_t dropped_ = 0;
  uint64_t malformed_ = 0;
};

}  // namespace weft::ztunnel
