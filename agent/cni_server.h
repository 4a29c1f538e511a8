// The agent's CNI socket (ARCHITECTURE "Agent <-> CNI plugin"): unix SOCK_STREAM, one JSON
// request per connection (read to EOF, bounded), one JSON reply, then close.
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/address.h"
#include "common/status.h"
#include "common/uv_handle.h"

namespace weft::agent {

constexpr size_t kMaxCniRequestBytes = 64 * 1024;

// CNI error codes used in replies (CNI spec numbers; 100+ are Weft's own).
constexpr int kCniErrIo = 5;             // the pod's netns cannot be opened
constexpr int kCniErrDecode = 6;         // not JSON / not an object
constexpr int kCniErrInvalidRequest = 7; // a field is missing or invalid
constexpr int kCniErrTryAgain = 11;      // timed out waiting for enrollment
constexpr int kCniErrEnroll = 100;       // enrollment failed (ztunnel rejected, BPF error)
constexpr int kCniErrWrongNode = 101;    // the pod is scheduled on another node
constexpr int kCniErrUnknownPod = 102;   // the pod is not in the cluster state
constexpr int kCniErrNotEnrolled = 103;  // CHECK: the pod should be enrolled and is not

struct CniRequest {
  std::string command;  // ADD, DEL, CHECK
  std::string container_id;
  std::string netns;
  std::string ifname;
  std::string pod_name;
  std::string pod_namespace;
  std::string pod_uid;
  // ADD: the pod's addresses from the runtime's prevResult (at most one per family). Used when
  // the cluster state has none yet (a real API server sets status.podIPs after ADD returns).
  std::vector<IpAddr> pod_ips;
};

struct CniResponse {
  bool ok = true;
  int code = 0;
  std::string msg;
  std::string details;
  static CniResponse success() { return {}; }
  static CniResponse error(int code, std::string msg, std::string details = {}) {
    return {false, code, std::move(msg), std::move(details)};
  }
};

// Parses and validates a request. ADD and CHECK need netns; all need pod_name/pod_namespace.
Result<CniRequest> parseCniRequest(const std::string& text);
std::string cniResponseJson(const CniResponse& response);

using CniReply = std::function<void(const CniResponse&)>;
// Handles one request; calls `reply` exactly once, now or later (on the loop).
using CniHandler = std::function<void(const CniRequest&, CniReply)>;

class CniServer {
 public:
  // Listens on `path` (stale file replaced, parent created, mode 0600).
  static Result<std::unique_ptr<CniServer>> listen(uv_loop_t* loop, const std::string& path,
                                                   CniHandler handler,
                                                   uint64_t read_timeout_ms = 10000);
  ~CniServer();
  CniServer(const CniServer&) = delete;
  CniServer& operator=(const CniServer&) = delete;

  uint64_t requests() const { return requests_; }
  uint64_t badRequests() const { return bad_requests_; }

 private:
  struct Connection;
  CniServer(uv_loop_t* loop, CniHandler handler, uint64_t read_timeout_ms);
  Status start(const std::string& path);
  void onConnection();
  void onRequestComplete(const std::shared_ptr<Connection>& conn);
  void finish(const std::shared_ptr<Connection>& conn, const CniResponse& response);
  void drop(Connection* conn);

  uv_loop_t* loop_;
  CniHandler handler_;
  uint64_t read_timeout_ms_;
  UvHandle<uv_pipe_t> listener_;
  std::map<Connection*, std::shared_ptr<Connection>> connections_;
  uint64_t requests_ = 0;
  uint64_t bad_requests_ = 0;
};

using CniServerPtr = std::unique_ptr<CniServer>;

}  // namespace weft::agent
