// Enrollment: which local pods are in the mesh (a pure decision) and the controller that moves
// pods in and out in the ARCHITECTURE order (ztunnel AddWorkload acked -> BPF; BPF off ->
// DelWorkload), answers CNI requests and reconciles pins after an agent restart.
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "agent/bpf/dataplane.h"
#include "agent/cni_server.h"
#include "agent/model.h"
#include "agent/node_server.h"
#include "agent/pod_store.h"
#include "common/fd.h"
#include "common/status.h"
#include "common/uv_handle.h"

namespace weft::agent {

// The pods ("namespace/name") this node enrolls: scheduled here, netns known (CNI ADD), and
// opted in by their namespace label without a pod opt-out.
std::set<std::string> decideEnrolled(const ClusterModel& model, const std::string& node_name,
                                     const std::set<std::string>& pods_with_netns);

struct OpenedNetns {
  UniqueFd fd;
  uint64_t cookie = 0;
};
using NetnsOpener = std::function<Result<OpenedNetns>(const std::string& path)>;
// openNetns + netnsCookie (needs CAP_SYS_ADMIN for setns).
Result<OpenedNetns> openPodNetns(const std::string& path);

struct EnrollmentOptions {
  std::string node_name;
  std::string bpf_pin_dir;
  std::string trust_domain = "cluster.local";
  std::string cluster_domain = "cluster.local";
  uint64_t cni_add_timeout_ms = 30000;
  NetnsOpener open_netns = openPodNetns;  // replaced in tests (no root there)
};

// What the admin API shows of a local pod.
struct LocalPodView {
  std::string key;  // namespace/name
  std::string uid;
  std::string netns;
  std::string container_id;
  uint64_t cookie = 0;
  bool wanted = false;        // labels say mesh, and it runs here
  bool enrolled = false;      // BPF redirect on
  bool ztunnel_has = false;   // AddWorkload sent to the current ztunnel
  std::string error;
};

class EnrollmentController : public NodeServerDelegate {
 public:
  EnrollmentController(uv_loop_t* loop, EnrollmentOptions options, Dataplane* dataplane,
                       PodStore* store);
  ~EnrollmentController() override;

  void setNodeServer(NodeServer* server) { node_server_ = server; }
  // Called for a CNI ADD of a pod the model does not know: rescan the cluster source now
  // (which calls setModel if something changed).
  void setRescanHook(std::function<void()> hook) { rescan_ = std::move(hook); }

  // Adopts the state left by an earlier agent: pods.json netns, pinned enrollment. Cookies
  // in the map that should not be enrolled are unenrolled; the rest stay as they are.
  Status start(const ClusterModel& model);
  void setModel(const ClusterModel& model);
  // Answers every waiting CNI request (agent shutting down).
  void shutdown();

  void handleCni(const CniRequest& request, CniReply reply);

  // The model in force: the source's, with CNI prevResult IPs filled in for local pods that
  // have no status.podIPs yet.
  const ClusterModel& model() const { return model_; }
  std::vector<LocalPodView> localPods() const;
  size_t enrolledCount() const;
  size_t waitingCniRequests() const { return waiters_.size(); }

  // NodeServerDelegate.
  nodepb::NodeConfig nodeConfig() override;
  nodepb::ClusterUpdate fullClusterUpdate() override;
  std::vector<SnapshotWorkload> snapshotWorkloads() override;
  void onZtunnelDisconnected() override;

 private:
  struct LocalPod {
    uint64_t instance = 0;  // distinguishes a re-added pod from its earlier self in callbacks
    std::string key;
    PodRecord record;
    UniqueFd netns;
    uint64_t cookie = 0;
    std::string netns_error;
    bool wanted = false;
    bool desired = false;      // wanted and netns open
    bool bpf_enrolled = false;
    bool ztunnel_has = false;
    std::string sent_uid;      // uid the ztunnel holds it under
    std::string error;         // last enrollment failure; cleared by a new attempt
    // The IPs of the CNI ADD's prevResult: the pod's addresses while the cluster state has
    // none (a real API server sets status.podIPs only after ADD returned).
    std::vector<IpAddr> cni_ips;
  };
  struct Waiter {
    EnrollmentController* owner = nullptr;
    uint64_t id = 0;
    std::string key;
    CniReply reply;
    UvHandle<uv_timer_t> timer;
  };

  LocalPod* findLocal(const std::string& key);
  // source_model_ plus the CNI IPs of local pods the source has no address for.
  ClusterModel withCniIps(const ClusterModel& source) const;
  // Makes `model` the one in force: delta to the ztunnel, reconcile, answer CNI waiters.
  void applyModel(ClusterModel model);
  std::unique_ptr<LocalPod> makeLocal(const PodRecord& record);
  std::string uidOf(const LocalPod& lp) const;
  void reconcile(LocalPod& lp);
  void leave(LocalPod& lp);
  void sendAdd(LocalPod& lp);
  void onAddAck(const std::string& key, uint64_t instance, const std::string& uid,
                const AckResult& result);
  std::optional<CniResponse> resolution(const std::string& key) const;
  void addWaiter(const std::string& key, CniReply reply);
  void onWaiterTimeout(uint64_t id);
  void checkWaiters();
  void persist();
  void cniAdd(const CniRequest& request, CniReply reply);
  void cniDel(const CniRequest& request, CniReply reply);
  void cniCheck(const CniRequest& request, CniReply reply);

  uv_loop_t* loop_;
  EnrollmentOptions options_;
  Dataplane* dataplane_;
  PodStore* store_;
  NodeServer* node_server_ = nullptr;
  std::function<void()> rescan_;
  ClusterModel source_model_;  // as the cluster source gave it
  ClusterModel model_;         // in force (withCniIps(source_model_))
  std::map<std::string, std::unique_ptr<LocalPod>> local_;  // by namespace/name
  std::map<uint64_t, std::unique_ptr<Waiter>> waiters_;
  uint64_t next_instance_ = 1;
  uint64_t next_waiter_ = 1;
};

}  // namespace weft::agent
