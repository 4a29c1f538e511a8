// Kernel test environment: throwaway cgroup, namespaces, pin dir and child processes.
#include "tests/bpf/bpf_test_env.h"

#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <openssl/sha.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "bpf/abi/ports.h"
#include "bpf/abi/progs.h"
#include "common/address.h"
#include "common/inbound_listener_map.h"
#include "common/netns.h"

namespace weft::bpftest {

int64_t nowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::string sha256Hex(const std::string& data) {
  unsigned char md[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(data.data()), data.size(), md);
  static const char kHex[] = "0123456789abcdef";
  std::string hex;
  for (unsigned char b : md) {
    hex += kHex[b >> 4];
    hex += kHex[b & 15];
  }
  return hex;
}

namespace {

// Detaches pinned links and removes a pin tree (cleanup after a failed test).
void removePinTree(const std::string& path, int depth = 0) {
  if (depth > 6) return;
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) return;
  if (!S_ISDIR(st.st_mode)) {
    int fd = bpf_obj_get(path.c_str());
    if (fd >= 0) {
      bpf_link_info info{};
      uint32_t len = sizeof(info);
      // Only links can be detached; for maps and programs this fails harmlessly.
      if (bpf_obj_get_info_by_fd(fd, &info, &len) == 0 && info.id != 0) bpf_link_detach(fd);
      close(fd);
    }
    unlink(path.c_str());
    return;
  }
  if (DIR* dir = opendir(path.c_str())) {
    std::vector<std::string> names;
    while (struct dirent* de = readdir(dir))
      if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0)
        names.emplace_back(de->d_name);
    closedir(dir);
    for (const auto& n : names) removePinTree(path + "/" + n, depth + 1);
  }
  rmdir(path.c_str());
}

int sequence = 0;

// "wbt<pid>x<seq>..." of a run whose process is gone: left by a crashed run.
bool staleTag(const std::string& name, const std::string& prefix) {
  if (name.rfind(prefix + "wbt", 0) != 0) return false;
  size_t start = prefix.size() + 3;
  size_t end = name.find('x', start);
  if (end == std::string::npos || end == start) return false;
  pid_t pid = 0;
  for (size_t i = start; i < end; ++i) {
    if (name[i] < '0' || name[i] > '9') return false;
    pid = pid * 10 + (name[i] - '0');
  }
  return pid != getpid() && kill(pid, 0) != 0 && errno == ESRCH;
}

std::vector<std::string> entries(const std::string& dir) {
  std::vector<std::string> names;
  if (DIR* d = opendir(dir.c_str())) {
    while (struct dirent* de = readdir(d)) names.emplace_back(de->d_name);
    closedir(d);
  }
  return names;
}

// Removes what a crashed earlier run of this binary left behind (pins, cgroups, namespaces),
// once per process. Cgroups that still hold processes are left alone.
void cleanupStaleRuns(const std::string& cg2) {
  static bool done = false;
  if (done) return;
  done = true;
  for (const auto& n : entries("/sys/fs/bpf"))
    if (staleTag(n, "weft-bpftest-")) removePinTree("/sys/fs/bpf/" + n);
  for (const auto& n : entries(cg2))
    if (staleTag(n, "weft-bpftest-")) rmdir((cg2 + "/" + n).c_str());
  for (const auto& n : entries("/run/netns"))
    if (staleTag(n, "")) {
      if (system(("ip netns del " + n + " >/dev/null 2>&1").c_str()) != 0) continue;
    }
}

}  // namespace

std::string cgroup2Mount() {
  std::ifstream mounts("/proc/mounts");
  std::string line;
  while (std::getline(mounts, line)) {
    std::istringstream in(line);
    std::string dev, dir, type;
    in >> dev >> dir >> type;
    if (type == "cgroup2") return dir;
  }
  return "";
}

int countWeftPrograms() {
  auto once = [] {
    int count = 0;
    uint32_t id = 0;
    for (int i = 0; i < 100000 && bpf_prog_get_next_id(id, &id) == 0; ++i) {
      int fd = bpf_prog_get_fd_by_id(id);
      if (fd < 0) continue;  // gone meanwhile
      bpf_prog_info info{};
      uint32_t len = sizeof(info);
      if (bpf_obj_get_info_by_fd(fd, &info, &len) == 0 &&
          strncmp(info.name, WEFT_PROG_PREFIX, strlen(WEFT_PROG_PREFIX)) == 0)
        ++count;
      close(fd);
    }
    return count;
  };
  int last = once();
  for (int i = 0; i < 30; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(150));
    int now = once();
    if (now == last) return now;
    last = now;
  }
  return last;
}

std::vector<uint32_t> cgroupProgIds(const std::string& cgroup_dir, int attach_type) {
  std::vector<uint32_t> out;
  int fd = open(cgroup_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return out;
  uint32_t ids[16];
  uint32_t cnt = 16;
  uint32_t flags = 0;
  if (bpf_prog_query(fd, static_cast<bpf_attach_type>(attach_type), 0, &flags, ids, &cnt) == 0)
    out.assign(ids, ids + cnt);
  close(fd);
  return out;
}

namespace child {

void report(int out, const std::string& key, const std::string& value) {
  writeAll(out, key + "=" + value + "\n");
}

std::string errText(int neg_errno) {
  return strerror(-neg_errno);
}

int listenOn(const std::string& addr, bool ztunnel_mark, bool v6only) {
  auto sa = SocketAddress::parse(addr);
  if (!sa) return -EINVAL;
  int fd = socket(sa->family(), SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  int one = 1;
  uint32_t mark = WEFT_ZTUNNEL_MARK;
  if (ztunnel_mark && setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) != 0) goto fail;
  if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0) goto fail;
  if (sa->family() == AF_INET6) {
    int v = v6only ? 1 : 0;
    if (setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v, sizeof(v)) != 0) goto fail;
  }
  {
    sockaddr_storage ss;
    socklen_t len = sa->toSockaddr(&ss);
    if (bind(fd, reinterpret_cast<sockaddr*>(&ss), len) != 0) goto fail;
  }
  if (listen(fd, 16) != 0) goto fail;
  return fd;
fail:
  int err = errno;
  close(fd);
  return -err;
}

int connectTo(const std::string& addr, bool ztunnel_mark, const std::string& source, int family) {
  auto sa = SocketAddress::parse(addr);
  if (!sa) return -EINVAL;
  int domain = family ? family : sa->family();
  sockaddr_storage ss{};
  socklen_t len = 0;
  if (domain == AF_INET6 && sa->ip().isV4()) {
    auto* in6 = reinterpret_cast<sockaddr_in6*>(&ss);
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons(sa->port());
    in6->sin6_addr.s6_addr[10] = 0xff;
    in6->sin6_addr.s6_addr[11] = 0xff;
    memcpy(&in6->sin6_addr.s6_addr[12], &sa->ip().v4addr(), 4);
    len = sizeof(*in6);
  } else {
    len = sa->toSockaddr(&ss);
  }
  int fd = socket(domain, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  uint32_t mark = WEFT_ZTUNNEL_MARK;
  int flags = 0;
  int rc = 0;
  if (ztunnel_mark && setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) != 0) goto fail;
  if (!source.empty()) {
    auto src = SocketAddress::parse(source);
    if (!src) {
      close(fd);
      return -EINVAL;
    }
    sockaddr_storage sss;
    socklen_t sl = src->toSockaddr(&sss);
    if (bind(fd, reinterpret_cast<sockaddr*>(&sss), sl) != 0) goto fail;
  }
  flags = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, flags | O_NONBLOCK);
  rc = connect(fd, reinterpret_cast<sockaddr*>(&ss), len);
  if (rc != 0 && errno != EINPROGRESS) goto fail;
  if (rc != 0) {
    pollfd p{fd, POLLOUT, 0};
    if (poll(&p, 1, 3000) != 1) {
      close(fd);
      return -ETIMEDOUT;
    }
    int soerr = 0;
    socklen_t sl = sizeof(soerr);
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
    if (soerr != 0) {
      close(fd);
      return -soerr;
    }
  }
  fcntl(fd, F_SETFL, flags);
  return fd;
fail:
  int err = errno;
  close(fd);
  return -err;
}

int acceptWithTimeout(int listen_fd, int timeout_ms) {
  pollfd p{listen_fd, POLLIN, 0};
  int n = poll(&p, 1, timeout_ms);
  if (n == 0) return -ETIMEDOUT;
  if (n < 0) return -errno;
  int fd = accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
  return fd < 0 ? -errno : fd;
}

std::string readAll(int fd, int timeout_ms) {
  std::string out;
  int64_t deadline = nowMs() + timeout_ms;
  while (out.size() < 65536) {
    int left = static_cast<int>(deadline - nowMs());
    if (left <= 0) break;
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, left) != 1) break;
    char buf[4096];
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n <= 0) break;
    out.append(buf, n);
  }
  return out;
}

void writeAll(int fd, const std::string& data) {
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = write(fd, data.data() + off, data.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    off += n;
  }
}

int serve(int out, const std::vector<std::string>& addrs, bool ztunnel_mark, const std::string& tag,
          int count, int accept_ms,
          const std::function<bool(int out, const std::vector<int>& listeners)>& on_ready) {
  std::vector<int> listeners;
  for (const auto& a : addrs) {
    int fd = listenOn(a, ztunnel_mark);
    if (fd < 0) {
      report(out, "listen_err", a + ": " + errText(fd));
      return 1;
    }
    listeners.push_back(fd);
  }
  if (on_ready && !on_ready(out, listeners)) return 1;
  report(out, "ready", "1");
  int accepted = 0;
  for (int i = 0; i < count; ++i) {
    std::vector<pollfd> pfds;
    for (int fd : listeners) pfds.push_back(pollfd{fd, POLLIN, 0});
    if (poll(pfds.data(), pfds.size(), accept_ms) <= 0) break;
    for (const auto& p : pfds) {
      if (!(p.revents & POLLIN)) continue;
      int c = accept4(p.fd, nullptr, nullptr, SOCK_CLOEXEC);
      if (c < 0) continue;
      auto local = localAddress(c);
      auto peer = peerAddress(c);
      report(out, "local" + std::to_string(accepted), local ? local->toString() : "?");
      report(out, "peer" + std::to_string(accepted), peer ? peer->toString() : "?");
      ++accepted;
      writeAll(c, tag);
      close(c);
      break;
    }
  }
  report(out, "accepted", std::to_string(accepted));
  return 0;
}

int fetch(int out, const std::string& addr, bool ztunnel_mark, const std::string& source,
          int family) {
  int fd = connectTo(addr, ztunnel_mark, source, family);
  if (fd < 0) {
    report(out, "connect_err", errText(fd));
    return 0;
  }
  auto local = localAddress(fd);
  auto peer = peerAddress(fd);
  report(out, "local", local ? local->toString() : "?");
  report(out, "peer", peer ? peer->toString() : "?");
  report(out, "reply", readAll(fd, 3000));
  close(fd);
  return 0;
}

}  // namespace child

void BpfKernelTest::SetUp() {
  if (geteuid() != 0) GTEST_SKIP() << "needs root (BPF programs, namespaces, cgroups)";
  std::string cg2 = cgroup2Mount();
  if (cg2.empty()) GTEST_SKIP() << "no cgroup v2 mount in /proc/mounts";
  cleanupStaleRuns(cg2);

  tag_ = "wbt" + std::to_string(getpid()) + "x" + std::to_string(sequence++);
  cgroup_dir_ = cg2 + "/weft-bpftest-" + tag_;
  pin_dir_ = "/sys/fs/bpf/weft-bpftest-" + tag_;
  ASSERT_EQ(mkdir(cgroup_dir_.c_str(), 0755), 0) << cgroup_dir_ << ": " << strerror(errno);
  made_cgroup_ = true;

  pod_ns_ = tag_ + "p";
  peer_ns_ = tag_ + "c";
  for (const auto& ns : {pod_ns_, peer_ns_}) {
    sh("ip netns add " + ns);
    if (HasFailure()) return;
    made_netns_.push_back(ns);
    sh("ip -n " + ns + " link set lo up");
  }
  sh("ip -n " + pod_ns_ + " link add eth0 type veth peer name eth0 netns " + peer_ns_);
  sh("ip -n " + pod_ns_ + " addr add " + kPodV4 + "/24 dev eth0");
  sh("ip -n " + pod_ns_ + " addr add " + kPodV6 + "/64 dev eth0 nodad");
  sh("ip -n " + peer_ns_ + " addr add " + kPeerV4 + "/24 dev eth0");
  sh("ip -n " + peer_ns_ + " addr add " + kPeerV6 + "/64 dev eth0 nodad");
  sh("ip -n " + pod_ns_ + " link set eth0 up");
  sh("ip -n " + peer_ns_ + " link set eth0 up");
  if (HasFailure()) return;

  auto pod = openNetns("/run/netns/" + pod_ns_);
  ASSERT_TRUE(pod.isOk()) << pod.status().message();
  pod_fd_ = std::move(pod.value());
  auto peer = openNetns("/run/netns/" + peer_ns_);
  ASSERT_TRUE(peer.isOk()) << peer.status().message();
  peer_fd_ = std::move(peer.value());
  auto cookie = netnsCookie(pod_fd_.get());
  ASSERT_TRUE(cookie.isOk()) << cookie.status().message();
  pod_cookie_ = *cookie;
}

void BpfKernelTest::TearDown() {
  for (auto& [pid, proc] : children_) {
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
  }
  children_.clear();
  if (dp_) {
    Status st = dp_->destroy();
    EXPECT_TRUE(st.isOk()) << st.message();
    dp_.reset();
  }
  if (!pin_dir_.empty()) removePinTree(pin_dir_);
  for (const auto& ns : made_netns_)
    if (system(("ip netns del " + ns + " >/dev/null 2>&1").c_str()) != 0)
      ADD_FAILURE() << "could not remove netns " << ns;
  made_netns_.clear();
  if (made_cgroup_ && rmdir(cgroup_dir_.c_str()) != 0)
    ADD_FAILURE() << "rmdir " << cgroup_dir_ << ": " << strerror(errno);
  made_cgroup_ = false;
}

agent::DataplaneOptions BpfKernelTest::options() const {
  agent::DataplaneOptions o;
  o.pin_dir = pin_dir_;
  o.cgroup_root = cgroup_dir_;
  return o;
}

void DataplaneTest::SetUp() {
  BpfKernelTest::SetUp();
  if (IsSkipped() || HasFailure()) return;
  auto dp = openDataplane();
  ASSERT_TRUE(dp.isOk()) << dp.status().message();
  dp_ = std::move(dp.value());
}

void DataplaneTest::enrollPod() {
  Status st = dp_->enroll(pod_cookie_, pod_fd_.get(), kPodWorkloadId);
  ASSERT_TRUE(st.isOk()) << st.message();
}

Result<agent::DataplanePtr> BpfKernelTest::openDataplane() {
  return agent::Dataplane::open(options());
}

void BpfKernelTest::sh(const std::string& cmd) {
  int rc = system((cmd + " 2>&1").c_str());
  if (rc != 0) ADD_FAILURE() << "command failed (" << rc << "): " << cmd;
}

pid_t BpfKernelTest::spawn(int netns_fd, bool in_cgroup, std::function<int(int out)> fn) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) {
    ADD_FAILURE() << "pipe: " << strerror(errno);
    return -1;
  }
  std::string procs = cgroup_dir_ + "/cgroup.procs";
  fflush(nullptr);
  pid_t pid = fork();
  if (pid < 0) {
    ADD_FAILURE() << "fork: " << strerror(errno);
    close(fds[0]);
    close(fds[1]);
    return -1;
  }
  if (pid == 0) {
    close(fds[0]);
    alarm(20);  // a child never outlives a hung test for long
    if (in_cgroup) {
      int fd = open(procs.c_str(), O_WRONLY | O_CLOEXEC);
      if (fd < 0 || write(fd, "0", 1) != 1) {
        child::report(fds[1], "error", "join cgroup: " + std::string(strerror(errno)));
        _exit(90);
      }
      close(fd);
    }
    if (netns_fd >= 0 && setns(netns_fd, CLONE_NEWNET) != 0) {
      child::report(fds[1], "error", "setns: " + std::string(strerror(errno)));
      _exit(91);
    }
    int rc = fn(fds[1]);
    close(fds[1]);
    _exit(rc);
  }
  close(fds[1]);
  children_.emplace(pid, Proc{pid, UniqueFd(fds[0]), ""});
  return pid;
}

pid_t BpfKernelTest::startZtunnelInbound(int count, int accept_ms) {
  std::string pin = pin_dir_;
  return spawnServer(pod_fd_.get(), true, [pin, count, accept_ms](int out) {
    return child::serve(out, {"0.0.0.0:15006", "[::]:15006"}, true, "ztunnel-in", count,
                        accept_ms, [pin](int out, const std::vector<int>& fds) {
                          auto map = InboundListenerMap::open(pin);
                          if (!map) {
                            child::report(out, "map_err", map.status().message());
                            return false;
                          }
                          Status a = map->add(*IpAddr::parse(kPodV4), fds[0]);
                          Status b = map->add(*IpAddr::parse(kPodV6), fds[1]);
                          if (!a || !b) {
                            child::report(out, "map_err", a.message() + " / " + b.message());
                            return false;
                          }
                          return true;
                        });
  });
}

pid_t BpfKernelTest::spawnServer(int netns_fd, bool in_cgroup, std::function<int(int out)> fn) {
  pid_t pid = spawn(netns_fd, in_cgroup, std::move(fn));
  if (pid < 0) return pid;
  Proc& proc = children_.at(pid);
  int64_t deadline = nowMs() + 5000;
  while (proc.buffered.find("ready=") == std::string::npos) {
    int left = static_cast<int>(deadline - nowMs());
    pollfd p{proc.out.get(), POLLIN, 0};
    if (left <= 0 || poll(&p, 1, left) != 1) {
      ADD_FAILURE() << "server child " << pid << " not ready: " << proc.buffered;
      break;
    }
    char buf[1024];
    ssize_t n = read(proc.out.get(), buf, sizeof(buf));
    if (n <= 0) {
      ADD_FAILURE() << "server child " << pid << " exited before ready: " << proc.buffered;
      break;
    }
    proc.buffered.append(buf, n);
  }
  return pid;
}

ChildResult BpfKernelTest::wait(pid_t pid, int timeout_ms) {
  ChildResult result;
  auto it = children_.find(pid);
  if (it == children_.end()) return result;
  Proc& proc = it->second;
  int64_t deadline = nowMs() + timeout_ms;
  result.raw = proc.buffered + child::readAll(proc.out.get(), timeout_ms);
  int status = 0;
  bool exited = false;
  while (nowMs() < deadline + 1000) {
    pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid) {
      exited = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (!exited) {
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
  } else if (WIFEXITED(status)) {
    result.exit_code = WEXITSTATUS(status);
  }
  children_.erase(it);
  std::istringstream lines(result.raw);
  std::string line;
  while (std::getline(lines, line)) {
    auto eq = line.find('=');
    if (eq != std::string::npos) result.values[line.substr(0, eq)] = line.substr(eq + 1);
  }
  return result;
}

ChildResult BpfKernelTest::run(int netns_fd, bool in_cgroup, std::function<int(int out)> fn) {
  return wait(spawn(netns_fd, in_cgroup, std::move(fn)));
}

}  // namespace weft::bpftest
