// List+watch reflectors for the Kubernetes API source, and the hand-off of complete models to
// the agent's loop.
#include "agent/kube/kube_source.h"

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <random>
#include <set>

#include "agent/kube/https_client.h"
#include "common/log.h"

namespace weft::agent::kube {

using Json = nlohmann::json;

struct KubeSource::Resource {
  std::string name;
  ResourceKind kind = ResourceKind::kPod;
  std::string path;            // e.g. /api/v1/pods
  std::string list_kind;       // e.g. PodList
  std::string field_selector;  // unencoded, e.g. spec.nodeName=node1
  std::string label_selector;  // unencoded, e.g. kubernetes.io/service-name
  // A custom resource whose CRD may not be installed: 404 on list counts as an empty,
  // synced list (the agent starts) and is retried with backoff.
  bool optional = false;
  bool pending_pods = false;  // keep pods without an address (this node's: CNI enrolls them)
  // Guarded by mu_.
  std::map<std::string, ModelObject> store;
  KubeResourceStats stats;
  // The reflector thread's own.
  std::string rv;
  bool need_list = true;
};

namespace {

std::string urlEncode(const std::string& s) {
  static const char* hex = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : s) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
        c == '_' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

const char* eventName(WatchEventType t) {
  switch (t) {
    case WatchEventType::kAdded:
      return "ADDED";
    case WatchEventType::kModified:
      return "MODIFIED";
    case WatchEventType::kDeleted:
      return "DELETED";
    case WatchEventType::kBookmark:
      return "BOOKMARK";
    case WatchEventType::kError:
      return "ERROR";
  }
  return "?";
}

// How an accepted object is enforced differently from what it says (AuthorizationPolicy L7
// fields without a waypoint), as the manifest source reports it.
void logWarnings(const std::string& resource, const ModelObject& obj) {
  if (auto* ap = std::get_if<AuthorizationPolicy>(&obj))
    for (const std::string& w : ap->warnings)
      spdlog::warn("kubernetes {}: AuthorizationPolicy {}: {}", resource,
                   objectKey(ap->meta.namespace_, ap->meta.name), w);
}

// The reason of an error response, from its Status body if it has one.
std::string describeErrorResponse(HttpsConnection& conn, const ResponseHead& head) {
  std::string what = fmt::format("HTTP {} {}", head.status, head.reason);
  auto body = conn.readBody(64 * 1024, std::chrono::seconds(5));
  if (body) {
    auto j = parseJson(body.value());
    if (j) {
      ApiStatus st = apiStatusOf(j.value());
      if (!st.message.empty()) what += ": " + st.message;
    }
  }
  return what;
}

}  // namespace

Result<KubeSourcePtr> KubeSource::create(uv_loop_t* loop, KubeSourceOptions options) {
  KubeSourcePtr src(new KubeSource(loop, std::move(options)));
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0)
    return Status::errorf("pipe: {}", errnoText(errno));
  src->stop_read_.reset(fds[0]);
  src->stop_write_.reset(fds[1]);
  int rc = src->async_.init(uv_async_init(loop, src->async_.get(), [](uv_async_t* a) {
    auto* self = static_cast<KubeSource*>(a->data);
    if (self->refresh() && self->on_change_) self->on_change_();
  }));
  if (rc != 0) return Status::errorf("uv_async_init: {}", uv_strerror(rc));
  src->async_.get()->data = src.get();
  return src;
}

KubeSource::KubeSource(uv_loop_t* loop, KubeSourceOptions options)
    : loop_(loop), options_(std::move(options)) {
  auto add = [&](std::string name, ResourceKind kind, std::string path, std::string list_kind,
                 std::string selector) -> Resource& {
    auto r = std::make_unique<Resource>();
    r->name = std::move(name);
    r->kind = kind;
    r->path = std::move(path);
    r->list_kind = std::move(list_kind);
    r->field_selector = std::move(selector);
    r->stats.name = r->name;
    resources_.push_back(std::move(r));
    return *resources_.back();
  };
  add("namespaces", ResourceKind::kNamespace, "/api/v1/namespaces", "NamespaceList", "");
  add("services", ResourceKind::kService, "/api/v1/services", "ServiceList", "");
  add("pods (node " + options_.node_name + ")", ResourceKind::kPod, "/api/v1/pods", "PodList",
      "spec.nodeName=" + options_.node_name)
      .pending_pods = true;
  if (options_.remote_pods)
    add("pods (other nodes)", ResourceKind::kPod, "/api/v1/pods", "PodList",
        "spec.nodeName!=" + options_.node_name);
  // Only slices that belong to a Service (the label the EndpointSlice controller sets).
  add("endpointslices", ResourceKind::kEndpointSlice, "/apis/discovery.k8s.io/v1/endpointslices",
      "EndpointSliceList", "")
      .label_selector = kServiceNameLabel;
  add("peerauthentications", ResourceKind::kPeerAuthentication,
      "/apis/security.weft.dev/v1/peerauthentications", "PeerAuthenticationList", "")
      .optional = true;
  add("authorizationpolicies", ResourceKind::kAuthorizationPolicy,
      "/apis/security.weft.dev/v1/authorizationpolicies", "AuthorizationPolicyList", "")
      .optional = true;
}

KubeSource::~KubeSource() {
  stop();
}

void KubeSource::start() {
  if (!threads_.empty()) return;
  for (auto& r : resources_) {
    Resource* res = r.get();
    threads_.emplace_back([this, res] { run(*res); });
  }
}

void KubeSource::stop() {
  if (!stopping_.exchange(true) && stop_write_.get() >= 0) {
    char b = 1;
    if (::write(stop_write_.get(), &b, 1) != 1) spdlog::debug("kubernetes: stop pipe write failed");
  }
  synced_cv_.notify_all();
  for (auto& t : threads_)
    if (t.joinable()) t.join();
  threads_.clear();
}

bool KubeSource::synced() const {
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& r : resources_)
    if (!r->stats.synced) return false;
  return true;
}

bool KubeSource::waitForSync(std::chrono::milliseconds timeout) {
  bool ok;
  {
    std::unique_lock<std::mutex> lock(mu_);
    ok = synced_cv_.wait_for(lock, timeout, [&] {
      if (stopping_) return true;
      for (const auto& r : resources_)
        if (!r->stats.synced) return false;
      return true;
    });
    for (const auto& r : resources_) ok = ok && r->stats.synced;
  }
  refresh();
  return ok;
}

std::vector<KubeResourceStats> KubeSource::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<KubeResourceStats> out;
  for (const auto& r : resources_) out.push_back(r->stats);
  return out;
}

bool KubeSource::refresh() {
  ClusterModel m;
  m.endpoints_from_slices = true;  // a real cluster's endpoints: what its controller computed
  std::set<std::string> conflicts;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& r : resources_) {
      for (const auto& [key, obj] : r->store) {
        if (auto* ns = std::get_if<Namespace>(&obj)) {
          m.namespaces[key] = *ns;
        } else if (auto* pod = std::get_if<Pod>(&obj)) {
          m.pods[key] = *pod;
        } else if (auto* svc = std::get_if<Service>(&obj)) {
          m.services[key] = *svc;
        } else if (auto* slice = std::get_if<EndpointSlice>(&obj)) {
          m.endpoint_slices[key] = *slice;
        } else if (auto* ap = std::get_if<AuthorizationPolicy>(&obj)) {
          m.authorization_policies[key] = *ap;
        } else if (auto* pa = std::get_if<PeerAuthentication>(&obj)) {
          // One per namespace, as in the manifests; the API cannot refuse a second, so the
          // first by name stays in force and the others are reported.
          auto [it, fresh] = m.peer_authentications.emplace(pa->meta.namespace_, *pa);
          if (!fresh)
            conflicts.insert("PeerAuthentication " + key + ": metadata.namespace: namespace " +
                             pa->meta.namespace_ + " already has PeerAuthentication " +
                             objectKey(it->second.meta.namespace_, it->second.meta.name) +
                             "; only one per namespace, this one is not in force");
        }
      }
    }
  }
  for (const std::string& c : conflicts)
    if (!reported_conflicts_.count(c)) spdlog::warn("kubernetes: {}", c);
  reported_conflicts_ = std::move(conflicts);
  if (m == model_) return false;
  model_ = std::move(m);
  return true;
}

void KubeSource::notifyLoop() {
  int rc = uv_async_send(async_.get());
  if (rc != 0) spdlog::warn("kubernetes: uv_async_send: {}", uv_strerror(rc));
}

std::string KubeSource::target(const Resource& r, bool watch, const std::string& rv,
                               const std::string& cont) const {
  std::string t = r.path + "?";
  if (!r.field_selector.empty()) t += "fieldSelector=" + urlEncode(r.field_selector) + "&";
  if (!r.label_selector.empty()) t += "labelSelector=" + urlEncode(r.label_selector) + "&";
  if (watch) {
    t += "watch=1&resourceVersion=" + urlEncode(rv) +
         "&allowWatchBookmarks=true&timeoutSeconds=" + std::to_string(options_.watch_timeout_s);
  } else {
    t += "limit=" + std::to_string(options_.list_page_size);
    if (!cont.empty()) t += "&continue=" + urlEncode(cont);
  }
  return t;
}

void KubeSource::fail(Resource& r, const std::string& what) {
  if (stopping_) return;  // a wait cut short by stop() is not a failure
  std::string msg = "kubernetes " + r.name + ": " + what;
  bool repeated;
  {
    std::lock_guard<std::mutex> lock(mu_);
    r.stats.errors++;
    repeated = r.stats.last_error == msg;
    r.stats.last_error = msg;
  }
  // The same failure every backoff step is logged once at warn.
  if (repeated)
    spdlog::debug("{}", msg);
  else
    spdlog::warn("{}", msg);
}

void KubeSource::sleepBackoff(Resource& r, std::chrono::milliseconds& backoff) {
  thread_local std::minstd_rand rng(std::random_device{}());
  // Full jitter in [backoff/2, backoff]: agents of many nodes do not reconnect in step.
  auto ms = backoff.count() / 2 + static_cast<int64_t>(rng() % (backoff.count() / 2 + 1));
  spdlog::debug("kubernetes {}: retrying in {} ms", r.name, ms);
  pollfd p{stop_read_.get(), POLLIN, 0};
  ::poll(&p, 1, static_cast<int>(ms));
  backoff = std::min(backoff * 2, options_.backoff_max);
}

void KubeSource::run(Resource& r) {
  auto backoff = options_.backoff_initial;
  while (!stopping_) {
    auto token = readToken(options_.config.token_file);
    if (!token) {
      fail(r, token.status().message());
      sleepBackoff(r, backoff);
      continue;
    }
    if (r.need_list) {
      if (!list(r, token.value())) {
        if (!stopping_) sleepBackoff(r, backoff);
        continue;
      }
      backoff = options_.backoff_initial;
    }
    auto began = std::chrono::steady_clock::now();
    bool ok = watch(r, token.value());
    if (stopping_) break;
    if (!ok ||
        (!r.need_list && std::chrono::steady_clock::now() - began < std::chrono::seconds(1))) {
      // A failed watch, or one the server ended at once: wait before the next.
      sleepBackoff(r, backoff);
    } else {
      backoff = options_.backoff_initial;
    }
  }
}

bool KubeSource::list(Resource& r, const std::string& token) {
  std::map<std::string, ModelObject> fresh;
  std::map<std::string, ModelObject> previous;
  {
    std::lock_guard<std::mutex> lock(mu_);
    previous = r.store;
  }
  std::string cont, rv;
  uint64_t malformed = 0;
  int restarts = 0;
  for (int page = 0; page < 100000; page++) {
    auto conn =
        HttpsConnection::connect(options_.config, stop_read_.get(), options_.connect_timeout);
    if (!conn) {
      fail(r, "list: " + conn.status().message());
      return false;
    }
    auto head = conn.value()->get(target(r, false, "", cont), token, options_.list_timeout);
    if (!head) {
      fail(r, "list: " + head.status().message());
      return false;
    }
    if (head->status == 410 && !cont.empty() && restarts++ < 3) {
      // The continue token expired between pages: start the list over.
      spdlog::info("kubernetes {}: list continue token expired (410); listing again", r.name);
      cont.clear();
      fresh.clear();
      malformed = 0;
      page = -1;
      continue;
    }
    if (head->status == 404 && r.optional) {
      // The CRD is not installed (yet): no such objects. Synced, so the agent starts; listed
      // again with backoff until it appears. Logged once (fail() repeats at debug).
      fail(r, "list: " + describeErrorResponse(*conn.value(), head.value()) +
                  " (is the CRD installed? retrying with backoff; no such objects meanwhile)");
      {
        std::lock_guard<std::mutex> lock(mu_);
        r.stats.missing = true;
        if (!r.stats.synced) {
          r.stats.synced = true;
          r.stats.objects = r.store.size();
        }
      }
      synced_cv_.notify_all();
      notifyLoop();
      return false;
    }
    if (head->status != 200) {
      fail(r, "list: " + describeErrorResponse(*conn.value(), head.value()));
      return false;
    }
    auto body = conn.value()->readBody(options_.max_list_page_bytes, options_.list_timeout);
    if (!body) {
      fail(r, "list: body: " + body.status().message());
      return false;
    }
    auto parsed = parseListPage(body.value(), r.list_kind);
    if (!parsed) {
      fail(r, "list: " + parsed.status().message());
      return false;
    }
    for (const Json& item : parsed->items) {
      auto key = objectStoreKey(r.kind, item);
      if (!key) {
        malformed++;
        spdlog::warn("kubernetes {}: list item skipped: {}", r.name, key.status().message());
        continue;
      }
      auto obj = toModelObject(r.kind, item, r.pending_pods);
      if (!obj) {
        malformed++;
        auto old = previous.find(key.value());
        spdlog::warn("kubernetes {}: list item rejected ({}): {}", r.name,
                     old != previous.end() ? "its last good version stays in force" : "not applied",
                     obj.status().message());
        if (old != previous.end()) fresh[key.value()] = old->second;
        continue;
      }
      if (obj.value()) {
        logWarnings(r.name, *obj.value());
        fresh[key.value()] = std::move(*obj.value());
      }
    }
    rv = parsed->resource_version;
    cont = parsed->continue_token;
    if (cont.empty()) break;
  }
  if (!cont.empty()) {
    fail(r, "list: too many pages");
    return false;
  }
  const size_t fresh_count = fresh.size();
  {
    std::lock_guard<std::mutex> lock(mu_);
    r.store = std::move(fresh);
    r.stats.lists++;
    r.stats.missing = false;
    r.stats.malformed += malformed;
    r.stats.synced = true;
    r.stats.resource_version = rv;
    r.stats.objects = r.store.size();
  }
  synced_cv_.notify_all();
  spdlog::info("kubernetes {}: listed {} objects at resourceVersion {}", r.name, fresh_count, rv);
  r.rv = rv;
  r.need_list = false;
  notifyLoop();
  return true;
}

bool KubeSource::applyEvent(Resource& r, WatchEventType type, const Json& object) {
  auto key = objectStoreKey(r.kind, object);
  if (!key) {
    spdlog::warn("kubernetes {}: {} event skipped: {}", r.name, eventName(type),
                 key.status().message());
    return false;
  }
  if (auto k = object.find("kind");
      k != object.end() && (!k->is_string() || *k != kindName(r.kind))) {
    spdlog::warn("kubernetes {}: {} event skipped: {}: kind is not {}", r.name, eventName(type),
                 key.value(), kindName(r.kind));
    return false;
  }
  const std::string rv = resourceVersionOf(object);
  // The stream has moved past this version whether or not the object is usable.
  if (!rv.empty()) r.rv = rv;
  std::optional<ModelObject> obj;
  if (type != WatchEventType::kDeleted) {
    auto conv = toModelObject(r.kind, object, r.pending_pods);
    if (!conv) {
      spdlog::warn("kubernetes {}: {} event rejected (the last good state stays in force): {}",
                   r.name, eventName(type), conv.status().message());
      std::lock_guard<std::mutex> lock(mu_);
      r.stats.resource_version = r.rv;
      return false;
    }
    obj = std::move(conv.value());
    if (obj) logWarnings(r.name, *obj);
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (obj)
      r.store[key.value()] = std::move(*obj);
    else
      r.store.erase(key.value());
    r.stats.events++;
    r.stats.resource_version = r.rv;
    r.stats.objects = r.store.size();
  }
  spdlog::debug("kubernetes {}: {} {} (resourceVersion {})", r.name, eventName(type), key.value(),
                rv);
  notifyLoop();
  return true;
}

bool KubeSource::watch(Resource& r, const std::string& token) {
  auto conn = HttpsConnection::connect(options_.config, stop_read_.get(), options_.connect_timeout);
  if (!conn) {
    fail(r, "watch: " + conn.status().message());
    return false;
  }
  auto head = conn.value()->get(target(r, true, r.rv, ""), token, options_.list_timeout);
  if (!head) {
    fail(r, "watch: " + head.status().message());
    return false;
  }
  auto gone = [&](const std::string& how) {
    spdlog::info("kubernetes {}: resourceVersion {} is gone ({}); listing again", r.name, r.rv,
                 how);
    std::lock_guard<std::mutex> lock(mu_);
    r.stats.gone++;
    r.need_list = true;
    return true;
  };
  if (head->status == 410) return gone("HTTP 410");
  if (head->status == 404 && r.optional) r.need_list = true;  // CRD removed: list (404) until back
  if (head->status != 200) {
    fail(r, "watch: " + describeErrorResponse(*conn.value(), head.value()));
    return false;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    r.stats.watches++;
  }
  const auto idle = std::chrono::seconds(options_.watch_timeout_s + 30);
  for (;;) {
    auto line = conn.value()->readLine(options_.max_event_bytes, idle);
    if (!line) {
      if (stopping_) return true;
      fail(r, "watch stream: " + line.status().message());
      return false;
    }
    if (line->kind == BodyLine::kEnd) return true;
    auto malformed = [&](const std::string& why) {
      spdlog::warn("kubernetes {}: malformed watch event skipped: {}", r.name, why);
      std::lock_guard<std::mutex> lock(mu_);
      r.stats.malformed++;
    };
    if (line->kind == BodyLine::kTooLong) {
      malformed(fmt::format("longer than {} bytes", options_.max_event_bytes));
      continue;
    }
    if (line->text.empty()) continue;
    auto ev = parseWatchEvent(line->text);
    if (!ev) {
      malformed(ev.status().message());
      continue;
    }
    switch (ev->type) {
      case WatchEventType::kBookmark: {
        std::string rv = resourceVersionOf(ev->object);
        if (rv.empty()) {
          malformed("BOOKMARK without metadata.resourceVersion");
          continue;
        }
        r.rv = rv;
        std::lock_guard<std::mutex> lock(mu_);
        r.stats.bookmarks++;
        r.stats.resource_version = rv;
        continue;
      }
      case WatchEventType::kError: {
        ApiStatus st = apiStatusOf(ev->object);
        if (st.code == 410) return gone("ERROR event 410 " + st.reason);
        fail(r, fmt::format("watch ERROR event: code {} {}: {}", st.code, st.reason, st.message));
        return false;
      }
      default:
        if (!applyEvent(r, ev->type, ev->object)) {
          std::lock_guard<std::mutex> lock(mu_);
          r.stats.malformed++;
        }
    }
  }
}

}  // namespace weft::agent::kube
