// Enrollment decisions and the controller that applies them in order.
#include "agent/enrollment.h"

#include "agent/cluster_sync.h"
#include "common/log.h"
#include "common/netns.h"

namespace weft::agent {

std::set<std::string> decideEnrolled(const ClusterModel& model, const std::string& node_name,
                                     const std::set<std::string>& pods_with_netns) {
  std::set<std::string> out;
  for (const std::string& key : pods_with_netns) {
    auto it = model.pods.find(key);
    if (it == model.pods.end()) continue;
    const Pod& pod = it->second;
    if (pod.node_name == node_name && meshEnrolledByLabels(model, pod)) out.insert(key);
  }
  return out;
}

Result<OpenedNetns> openPodNetns(const std::string& path) {
  auto fd = openNetns(path);
  if (!fd) return fd.status();
  auto cookie = netnsCookie(fd->get());
  if (!cookie) return cookie.status().context("netns " + path);
  OpenedNetns out;
  out.fd = std::move(fd.value());
  out.cookie = cookie.value();
  return out;
}

EnrollmentController::EnrollmentController(uv_loop_t* loop, EnrollmentOptions options,
                                           Dataplane* dataplane, PodStore* store)
    : loop_(loop), options_(std::move(options)), dataplane_(dataplane), store_(store) {}

EnrollmentController::~EnrollmentController() { shutdown(); }

void EnrollmentController::shutdown() {
  auto waiters = std::move(waiters_);
  waiters_.clear();
  for (auto& [id, w] : waiters)
    w->reply(CniResponse::error(kCniErrTryAgain, "agent is shutting down"));
}

EnrollmentController::LocalPod* EnrollmentController::findLocal(const std::string& key) {
  auto it = local_.find(key);
  return it == local_.end() ? nullptr : it->second.get();
}

std::unique_ptr<EnrollmentController::LocalPod> EnrollmentController::makeLocal(
    const PodRecord& record) {
  auto lp = std::make_unique<LocalPod>();
  lp->instance = next_instance_++;
  lp->key = objectKey(record.namespace_, record.name);
  lp->record = record;
  auto opened = options_.open_netns(record.netns);
  if (opened) {
    lp->netns = std::move(opened->fd);
    lp->cookie = opened->cookie;
  } else {
    lp->netns_error = opened.status().message();
  }
  return lp;
}

std::string EnrollmentController::uidOf(const LocalPod& lp) const {
  if (const Pod* pod = model_.findPod(lp.record.namespace_, lp.record.name)) return pod->meta.uid;
  if (!lp.record.uid.empty()) return lp.record.uid;
  return deriveUid("Pod", lp.record.namespace_, lp.record.name);
}

Status EnrollmentController::start(const ClusterModel& model) {
  source_model_ = model;
  model_ = model;
  bool dropped = false;
  for (const auto& [key, record] : store_->pods()) {
    auto lp = makeLocal(record);
    if (!lp->netns.valid()) {
      // The pod's sandbox is gone (deleted while the agent was down); forget it.
      spdlog::warn("pod {}: {}; forgetting it", key, lp->netns_error);
      dropped = true;
      continue;
    }
    local_[key] = std::move(lp);
  }
  for (auto it = store_->pods().begin(); it != store_->pods().end();) {
    std::string key = it->first;
    ++it;
    if (local_.count(key) == 0) store_->erase(key);
  }
  if (dropped) persist();

  std::set<uint64_t> keep;
  std::set<std::string> with_netns;
  for (auto& [key, lp] : local_) with_netns.insert(key);
  std::set<std::string> desired = decideEnrolled(model_, options_.node_name, with_netns);
  std::set<uint64_t> pinned;
  for (uint64_t c : dataplane_->enrolled()) pinned.insert(c);
  for (auto& [key, lp] : local_) {
    lp->wanted = lp->desired = desired.count(key) > 0;
    if (lp->desired && pinned.count(lp->cookie)) {
      lp->bpf_enrolled = true;  // adopted: the pinned link keeps redirecting, nothing re-attached
      keep.insert(lp->cookie);
    }
  }
  size_t removed = 0;
  for (uint64_t cookie : pinned) {
    if (keep.count(cookie)) continue;
    Status s = dataplane_->unenroll(cookie);
    if (!s) spdlog::error("unenrolling stale netns cookie {}: {}", cookie, s.message());
    else removed++;
  }
  spdlog::info("enrollment: {} local pods known, {} enrolled pins adopted, {} stale removed",
               local_.size(), keep.size(), removed);
  for (auto& [key, lp] : local_) reconcile(*lp);
  return Status::ok();
}

void EnrollmentController::setModel(const ClusterModel& model) {
  source_model_ = model;
  applyModel(withCniIps(source_model_));
}

ClusterModel EnrollmentController::withCniIps(const ClusterModel& source) const {
  ClusterModel out = source;
  for (const auto& [key, lp] : local_) {
    if (lp->cni_ips.empty()) continue;
    auto it = out.pods.find(key);
    if (it == out.pods.end() || !it->second.ips.empty() ||
        it->second.node_name != options_.node_name)
      continue;
    it->second.ips = lp->cni_ips;
  }
  return out;
}

void EnrollmentController::applyModel(ClusterModel model) {
  nodepb::ClusterUpdate delta = clusterDelta(model_, model);
  model_ = std::move(model);
  if (!isEmptyUpdate(delta) && node_server_ && node_server_->active())
    node_server_->sendClusterUpdate(std::move(delta));
  for (auto& [key, lp] : local_) reconcile(*lp);
  checkWaiters();
}

void EnrollmentController::reconcile(LocalPod& lp) {
  const Pod* pod = model_.findPod(lp.record.namespace_, lp.record.name);
  lp.wanted = pod != nullptr && pod->node_name == options_.node_name &&
              meshEnrolledByLabels(model_, *pod);
  // No address yet (neither status.podIPs nor a CNI prevResult): the ztunnel could not steer
  // its inbound traffic, so it waits.
  lp.desired = lp.wanted && lp.netns.valid() && !pod->ips.empty();
  if (!lp.desired) {
    leave(lp);
    return;
  }
  const std::string uid = uidOf(lp);
  if (lp.ztunnel_has && lp.sent_uid != uid) leave(lp);  // the pod's uid changed: a new pod
  if (!lp.ztunnel_has && lp.error.empty() && node_server_ && node_server_->active()) sendAdd(lp);
}

void EnrollmentController::leave(LocalPod& lp) {
  if (lp.bpf_enrolled) {
    Status s = dataplane_->unenroll(lp.cookie);
    if (!s) {
      spdlog::error("pod {}: unenroll: {}", lp.key, s.message());
      lp.error = "unenroll: " + s.message();
    } else {
      spdlog::info("pod {}: left the mesh (netns cookie {})", lp.key, lp.cookie);
      lp.bpf_enrolled = false;
    }
  }
  if (lp.ztunnel_has) {
    if (node_server_) node_server_->delWorkload(lp.sent_uid);
    lp.ztunnel_has = false;
  }
  if (!lp.bpf_enrolled) lp.error.clear();
}

void EnrollmentController::sendAdd(LocalPod& lp) {
  const Pod* pod = model_.findPod(lp.record.namespace_, lp.record.name);
  if (pod == nullptr) return;
  nodepb::Workload w = workloadProto(model_, *pod);
  lp.ztunnel_has = true;
  lp.sent_uid = w.uid();
  std::string key = lp.key;
  uint64_t instance = lp.instance;
  std::string uid = w.uid();
  spdlog::info("pod {}: AddWorkload to the ztunnel", lp.key);
  node_server_->addWorkload(w, lp.netns.get(), [this, key, instance, uid](const AckResult& r) {
    onAddAck(key, instance, uid, r);
  });
}

void EnrollmentController::onAddAck(const std::string& key, uint64_t instance,
                                    const std::string& uid, const AckResult& r) {
  LocalPod* lp = findLocal(key);
  if (lp == nullptr || lp->instance != instance || lp->sent_uid != uid) return;  // superseded
  switch (r.kind) {
    case AckResult::kDisconnected:
      // The next ztunnel's snapshot carries the pod again.
      lp->ztunnel_has = false;
      return;
    case AckResult::kRejected:
      lp->ztunnel_has = false;
      lp->error = "ztunnel rejected the workload: " + r.error;
      spdlog::error("pod {}: {}", key, lp->error);
      if (lp->bpf_enrolled) {
        // Redirecting to a ztunnel that has no listener for the pod would break its traffic.
        Status s = dataplane_->unenroll(lp->cookie);
        if (s) lp->bpf_enrolled = false;
        else spdlog::error("pod {}: unenroll: {}", key, s.message());
      }
      break;
    case AckResult::kApplied:
      if (!lp->desired || !lp->ztunnel_has) return;  // left meanwhile; a DelWorkload follows
      if (!lp->bpf_enrolled) {
        Status s = dataplane_->enroll(lp->cookie, lp->netns.get(), workloadId(uid));
        if (!s) {
          lp->error = "BPF enroll: " + s.message();
          spdlog::error("pod {}: {}", key, lp->error);
          break;
        }
        lp->bpf_enrolled = true;
        spdlog::info("pod {}: enrolled (netns cookie {})", key, lp->cookie);
      }
      lp->error.clear();
      break;
  }
  checkWaiters();
}

nodepb::NodeConfig EnrollmentController::nodeConfig() {
  nodepb::NodeConfig c;
  c.set_node_name(options_.node_name);
  c.set_bpf_pin_dir(options_.bpf_pin_dir);
  c.set_trust_domain(options_.trust_domain);
  c.set_cluster_domain(options_.cluster_domain);
  return c;
}

nodepb::ClusterUpdate EnrollmentController::fullClusterUpdate() {
  return weft::agent::fullClusterUpdate(model_);
}

std::vector<SnapshotWorkload> EnrollmentController::snapshotWorkloads() {
  std::vector<SnapshotWorkload> out;
  for (auto& [key, lp] : local_) {
    if (!lp->desired) continue;
    const Pod* pod = model_.findPod(lp->record.namespace_, lp->record.name);
    if (pod == nullptr) continue;
    SnapshotWorkload sw;
    sw.workload = workloadProto(model_, *pod);
    sw.netns_fd = lp->netns.get();
    lp->ztunnel_has = true;
    lp->sent_uid = sw.workload.uid();
    lp->error.clear();  // a new ztunnel gets a new chance
    std::string k = key;
    uint64_t instance = lp->instance;
    std::string uid = sw.workload.uid();
    sw.on_ack = [this, k, instance, uid](const AckResult& r) { onAddAck(k, instance, uid, r); };
    out.push_back(std::move(sw));
  }
  return out;
}

void EnrollmentController::onZtunnelDisconnected() {
  spdlog::warn("ztunnel disconnected; pinned redirects stay, waiting for it to come back");
  for (auto& [key, lp] : local_) lp->ztunnel_has = false;
}

std::optional<CniResponse> EnrollmentController::resolution(const std::string& key) const {
  auto it = local_.find(key);
  if (it == local_.end()) return CniResponse::error(kCniErrIo, "pod " + key + " was deleted");
  const LocalPod& lp = *it->second;
  const Pod* pod = model_.findPod(lp.record.namespace_, lp.record.name);
  if (pod == nullptr) return std::nullopt;  // waiting for the cluster state to know it
  if (pod->node_name != options_.node_name)
    return CniResponse::error(kCniErrWrongNode,
                              "pod " + key + " is scheduled on node " + pod->node_name +
                                  ", this is node " + options_.node_name);
  if (!lp.wanted) return CniResponse::success();  // known not to be enrolled
  if (!lp.netns_error.empty())
    return CniResponse::error(kCniErrIo, "cannot open the pod's netns", lp.netns_error);
  if (!lp.error.empty())
    return CniResponse::error(kCniErrEnroll, "enrolling pod " + key + " failed", lp.error);
  if (lp.bpf_enrolled) return CniResponse::success();
  return std::nullopt;
}

void EnrollmentController::addWaiter(const std::string& key, CniReply reply) {
  auto w = std::make_unique<Waiter>();
  w->id = next_waiter_++;
  w->key = key;
  w->reply = std::move(reply);
  w->owner = this;
  int rc = w->timer.init(uv_timer_init(loop_, w->timer.get()));
  if (rc == 0) {
    w->timer.get()->data = w.get();
    rc = uv_timer_start(
        w->timer.get(),
        [](uv_timer_t* t) { static_cast<Waiter*>(t->data)->owner->onWaiterTimeout(
                                static_cast<Waiter*>(t->data)->id); },
        options_.cni_add_timeout_ms, 0);
  }
  if (rc != 0) {
    spdlog::error("CNI waiter timer: {}", uv_strerror(rc));
    w->reply(CniResponse::error(kCniErrTryAgain, "agent internal error", uv_strerror(rc)));
    return;
  }
  waiters_[w->id] = std::move(w);
}

void EnrollmentController::onWaiterTimeout(uint64_t id) {
  auto it = waiters_.find(id);
  if (it == waiters_.end()) return;
  std::unique_ptr<Waiter> w = std::move(it->second);
  waiters_.erase(it);
  const LocalPod* lp = findLocal(w->key);
  const bool in_model =
      lp != nullptr && model_.findPod(lp->record.namespace_, lp->record.name) != nullptr;
  const Pod* pod = lp != nullptr ? model_.findPod(lp->record.namespace_, lp->record.name) : nullptr;
  std::string why = lp == nullptr ? "the pod was deleted"
                    : !in_model   ? "the pod is not in the cluster state (manifests)"
                    : pod != nullptr && pod->ips.empty()
                        ? "the pod has no IP address (none in the cluster state, none in the CNI "
                          "request's prevResult)"
                    : node_server_ && node_server_->active()
                        ? "the ztunnel has not acknowledged the workload"
                        : "no ztunnel is connected";
  spdlog::warn("CNI ADD {}: timed out: {}", w->key, why);
  w->reply(CniResponse::error(lp != nullptr && !in_model ? kCniErrUnknownPod : kCniErrTryAgain,
                              "timed out waiting for pod " + w->key + " to be enrolled", why));
}

void EnrollmentController::checkWaiters() {
  std::vector<std::unique_ptr<Waiter>> done;
  std::vector<CniResponse> responses;
  for (auto it = waiters_.begin(); it != waiters_.end();) {
    auto r = resolution(it->second->key);
    if (r) {
      responses.push_back(*r);
      done.push_back(std::move(it->second));
      it = waiters_.erase(it);
    } else {
      ++it;
    }
  }
  // Replies run after the map is consistent: a reply may re-enter the controller.
  for (size_t i = 0; i < done.size(); i++) done[i]->reply(responses[i]);
}

void EnrollmentController::persist() {
  Status s = store_->save();
  if (!s) spdlog::error("persisting pod netns records: {}", s.message());
}

void EnrollmentController::handleCni(const CniRequest& request, CniReply reply) {
  if (request.command == "ADD") cniAdd(request, std::move(reply));
  else if (request.command == "DEL") cniDel(request, std::move(reply));
  else cniCheck(request, std::move(reply));
}

void EnrollmentController::cniAdd(const CniRequest& req, CniReply reply) {
  const std::string key = objectKey(req.pod_namespace, req.pod_name);
  PodRecord record{req.pod_namespace, req.pod_name, req.pod_uid, req.netns, req.container_id};
  LocalPod* lp = findLocal(key);
  if (lp != nullptr && lp->record.netns != req.netns) {
    // A new sandbox for the same pod: the old netns leaves, the new one joins.
    spdlog::info("pod {}: netns changed from {} to {}", key, lp->record.netns, req.netns);
    leave(*lp);
    local_.erase(key);
    lp = nullptr;
  }
  if (lp == nullptr) {
    auto fresh = makeLocal(record);
    if (!fresh->netns.valid()) {
      reply(CniResponse::error(kCniErrIo, "cannot open the pod's netns", fresh->netns_error));
      return;
    }
    lp = fresh.get();
    local_[key] = std::move(fresh);
  } else {
    lp->record = record;
    lp->error.clear();  // a retried ADD tries again
  }
  if (!req.pod_ips.empty()) lp->cni_ips = req.pod_ips;
  store_->put(record);
  persist();
  if (model_.findPod(req.pod_namespace, req.pod_name) == nullptr && rescan_) rescan_();
  if (const Pod* pod = model_.findPod(req.pod_namespace, req.pod_name);
      pod != nullptr && pod->ips.empty() && !req.pod_ips.empty()) {
    // The API server has no address for the pod yet (it learns it from this ADD's result):
    // enroll with the runtime's, which the pod will have.
    spdlog::info("pod {}: no status.podIPs yet; using the CNI prevResult's addresses", key);
    applyModel(withCniIps(source_model_));
  }
  if (const Pod* pod = model_.findPod(req.pod_namespace, req.pod_name);
      pod != nullptr && !req.pod_uid.empty() && pod->meta.uid != req.pod_uid) {
    spdlog::warn("pod {}: CNI says uid {}, the cluster state says {}", key, req.pod_uid,
                 pod->meta.uid);
  }
  lp = findLocal(key);  // the rescan may have replaced nothing, but look again to be safe
  if (lp == nullptr) {
    reply(CniResponse::error(kCniErrIo, "pod " + key + " was deleted"));
    return;
  }
  reconcile(*lp);
  if (auto r = resolution(key)) {
    reply(*r);
    return;
  }
  addWaiter(key, std::move(reply));
}

void EnrollmentController::cniDel(const CniRequest& req, CniReply reply) {
  const std::string key = objectKey(req.pod_namespace, req.pod_name);
  LocalPod* lp = findLocal(key);
  if (lp != nullptr) {
    leave(*lp);
    if (lp->bpf_enrolled) {
      reply(CniResponse::error(kCniErrEnroll, "removing pod " + key + " from the mesh failed",
                               lp->error));
      return;
    }
    const bool had_cni_ips = !lp->cni_ips.empty();
    local_.erase(key);
    if (had_cni_ips) applyModel(withCniIps(source_model_));
  }
  if (store_->erase(key)) persist();
  checkWaiters();  // an ADD still waiting for this pod learns it is gone
  reply(CniResponse::success());
}

void EnrollmentController::cniCheck(const CniRequest& req, CniReply reply) {
  const std::string key = objectKey(req.pod_namespace, req.pod_name);
  LocalPod* lp = findLocal(key);
  if (lp == nullptr) {
    reply(CniResponse::error(kCniErrUnknownPod, "pod " + key + " is not known to the agent"));
    return;
  }
  if (lp->record.netns != req.netns) {
    reply(CniResponse::error(kCniErrInvalidRequest, "netns mismatch",
                             "agent has " + lp->record.netns + ", request says " + req.netns));
    return;
  }
  auto r = resolution(key);
  if (!r) {
    reply(CniResponse::error(kCniErrNotEnrolled, "pod " + key + " is not enrolled yet"));
    return;
  }
  reply(*r);
}

std::vector<LocalPodView> EnrollmentController::localPods() const {
  std::vector<LocalPodView> out;
  for (const auto& [key, lp] : local_) {
    LocalPodView v;
    v.key = key;
    v.uid = uidOf(*lp);
    v.netns = lp->record.netns;
    v.container_id = lp->record.container_id;
    v.cookie = lp->cookie;
    v.wanted = lp->wanted;
    v.enrolled = lp->bpf_enrolled;
    v.ztunnel_has = lp->ztunnel_has;
    v.error = !lp->netns_error.empty() ? lp->netns_error : lp->error;
    out.push_back(std::move(v));
  }
  return out;
}

size_t EnrollmentController::enrolledCount() const {
  size_t n = 0;
  for (const auto& [key, lp] : local_) n += lp->bpf_enrolled ? 1 : 0;
  return n;
}

}  // namespace weft::agent
