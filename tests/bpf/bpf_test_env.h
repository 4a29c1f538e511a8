// Kernel test environment for Weft's BPF programs: a throwaway cgroup, two throwaway network
// namespaces joined by a veth (a "pod" and a "peer"), a per-run pin dir, and child processes that
// run client/server code inside them, reporting key=value lines back over a pipe.
#pragma once

#include <gtest/gtest.h>
#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "agent/bpf/dataplane.h"
#include "common/fd.h"
#include "common/status.h"

namespace weft::bpftest {

// Addresses inside the test's own namespaces (never routed anywhere else).
inline constexpr const char* kPodV4 = "10.250.0.2";
inline constexpr const char* kPeerV4 = "10.250.0.1";
inline constexpr const char* kPodV6 = "fd00:250::2";
inline constexpr const char* kPeerV6 = "fd00:250::1";

// SO_ORIGINAL_DST (at SOL_IP and SOL_IPV6), answered by the cgroup/getsockopt program.
inline constexpr int kSoOriginalDst = 80;

// Milliseconds of the monotonic clock.
int64_t nowMs();

// SHA-256 of `data` as 64 lowercase hex digits.
std::string sha256Hex(const std::string& data);

// The cgroup v2 mount point, from /proc/mounts ("" if none).
std::string cgroup2Mount();

// Number of programs loaded in the kernel whose name starts with "weft_", read until two reads
// agree (program release after an unpin is deferred by the kernel).
int countWeftPrograms();

// Program ids attached to `cgroup_dir` for `type` (via BPF_PROG_QUERY).
std::vector<uint32_t> cgroupProgIds(const std::string& cgroup_dir, int attach_type);

// A child's report: exit status and the key=value lines it wrote.
struct ChildResult {
  int exit_code = -1;  // -1: killed or timed out
  std::map<std::string, std::string> values;
  std::string raw;
  std::string get(const std::string& key) const {
    auto it = values.find(key);
    return it == values.end() ? "<missing " + key + ">" : it->second;
  }
};

// Child-side helpers. They return -errno on failure.
namespace child {
void report(int out, const std::string& key, const std::string& value);
// socket + (SO_MARK) + SO_REUSEADDR + bind + listen on "ip:port" / "[ip]:port".
int listenOn(const std::string& addr, bool ztunnel_mark, bool v6only = true);
// Blocking-with-timeout connect to `addr`, optionally from `source` ("ip:0"), optionally marked.
// `family` forces the socket family (AF_INET6 for v4-mapped connects).
int connectTo(const std::string& addr, bool ztunnel_mark, const std::string& source = "",
              int family = 0);
int acceptWithTimeout(int listen_fd, int timeout_ms);
// Reads until EOF or timeout; returns what arrived.
std::string readAll(int fd, int timeout_ms);
void writeAll(int fd, const std::string& data);
std::string errText(int neg_errno);

// A server: listens on every address in `addrs` (marked as the ztunnel's if asked), runs
// `on_ready` with the listeners (e.g. to register them), reports ready=1, then accepts up to
// `count` connections (each within accept_ms), reporting local<i>=, peer<i>= and answering each
// with `tag`. Reports accepted=<n>. Returns 0, or 1 if a listener could not be set up.
int serve(int out, const std::vector<std::string>& addrs, bool ztunnel_mark, const std::string& tag,
          int count, int accept_ms,
          const std::function<bool(int out, const std::vector<int>& listeners)>& on_ready = {});
// A client: connects (see connectTo), reports reply=<what the server sent> or connect_err=.
int fetch(int out, const std::string& addr, bool ztunnel_mark = false,
          const std::string& source = "", int family = 0);
}  // namespace child

class BpfKernelTest : public ::testing::Test {
 protected:
  void SetUp() override;
  void TearDown() override;

  // Opens the dataplane on this test's pin dir and cgroup.
  Result<agent::DataplanePtr> openDataplane();
  agent::DataplaneOptions options() const;

  // Forks a child that joins the test cgroup (if in_cgroup), enters `netns_fd`, runs fn with the
  // write end of its report pipe, and exits with fn's return value.
  pid_t spawn(int netns_fd, bool in_cgroup, std::function<int(int out)> fn);
  // Same, and waits until the child reported key "ready" (servers) or failed.
  pid_t spawnServer(int netns_fd, bool in_cgroup, std::function<int(int out)> fn);
  // Waits (bounded) for a child to exit and collects its report.
  ChildResult wait(pid_t pid, int timeout_ms = 8000);
  // spawn + wait.
  ChildResult run(int netns_fd, bool in_cgroup, std::function<int(int out)> fn);
  // The ztunnel's inbound listeners in the pod (0.0.0.0:15006 and [::]:15006, marked),
  // registered for kPodV4 and kPodV6 in the pin dir's listener map like the ztunnel does, then
  // serving `count` connections (see child::serve).
  pid_t startZtunnelInbound(int count, int accept_ms);

  // Runs a shell command (ip ...); fails the test if it fails.
  void sh(const std::string& cmd);

  std::string tag_;         // unique per test: wbt<pid>x<seq>
  std::string cgroup_dir_;  // <cgroup2>/weft-bpftest-<tag>
  std::string pin_dir_;     // /sys/fs/bpf/weft-bpftest-<tag>
  std::string pod_ns_;      // netns names
  std::string peer_ns_;
  UniqueFd pod_fd_;
  UniqueFd peer_fd_;
  uint64_t pod_cookie_ = 0;
  agent::DataplanePtr dp_;

 private:
  struct Proc {
    pid_t pid;
    UniqueFd out;
    std::string buffered;
  };
  std::map<pid_t, Proc> children_;
  bool made_cgroup_ = false;
  std::vector<std::string> made_netns_;
};

// The workload id the pod netns is enrolled as by DataplaneTest::enrollPod().
inline constexpr uint64_t kPodWorkloadId = 9;

// A BpfKernelTest whose SetUp also opens the dataplane into dp_ (TearDown destroys it, as for
// any dp_). Fixtures that enroll more in their SetUp call this one first and return if it
// failed or skipped.
class DataplaneTest : public BpfKernelTest {
 protected:
  void SetUp() override;
  // Enrolls the pod netns (pod_cookie_) as kPodWorkloadId; a fatal failure if it cannot.
  void enrollPod();
};

}  // namespace weft::bpftest
