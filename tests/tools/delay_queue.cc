// weft-delay-queue: holds every packet of an NFQUEUE queue for a fixed delay, then accepts it
// (netem's `delay` for kernels without sch_netem), speaking nfnetlink_queue over raw netlink.
//
//   weft-delay-queue --queue N --delay-ms D [--duration-s S]
//
// Pair it with a rule in the same netns, e.g.
//   iptables-legacy -t mangle -A POSTROUTING -o eth0 -j NFQUEUE --queue-num N --queue-bypass
// Prints "ready" once bound. Exits after --duration-s (default 300), or on SIGTERM/SIGINT.
#include <arpa/inet.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_queue.h>
#include <linux/netlink.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <string>
#include <vector>

namespace {

volatile sig_atomic_t g_stop = 0;
void onSignal(int) { g_stop = 1; }

int64_t nowMs() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

// One nfnetlink request: nlmsghdr + nfgenmsg + attributes, 4-byte aligned.
class Request {
 public:
  Request(uint16_t type, uint16_t queue, uint16_t flags) {
    buf_.resize(NLMSG_HDRLEN + NLMSG_ALIGN(sizeof(nfgenmsg)));
    auto* nh = reinterpret_cast<nlmsghdr*>(buf_.data());
    nh->nlmsg_type = static_cast<uint16_t>((NFNL_SUBSYS_QUEUE << 8) | type);
    nh->nlmsg_flags = static_cast<uint16_t>(NLM_F_REQUEST | flags);
    auto* g = reinterpret_cast<nfgenmsg*>(buf_.data() + NLMSG_HDRLEN);
    g->nfgen_family = AF_UNSPEC;
    g->version = NFNETLINK_V0;
    g->res_id = htons(queue);
  }
  void attr(uint16_t type, const void* data, size_t len) {
    size_t off = buf_.size();
    buf_.resize(off + NLA_ALIGN(NLA_HDRLEN + len));
    auto* a = reinterpret_cast<nlattr*>(buf_.data() + off);
    a->nla_type = type;
    a->nla_len = static_cast<uint16_t>(NLA_HDRLEN + len);
    std::memcpy(buf_.data() + off + NLA_HDRLEN, data, len);
  }
  bool send(int fd) {
    auto* nh = reinterpret_cast<nlmsghdr*>(buf_.data());
    nh->nlmsg_len = static_cast<uint32_t>(buf_.size());
    sockaddr_nl to{};
    to.nl_family = AF_NETLINK;
    return ::sendto(fd, buf_.data(), buf_.size(), 0, reinterpret_cast<sockaddr*>(&to),
                    sizeof(to)) == static_cast<ssize_t>(buf_.size());
  }

 private:
  std::vector<char> buf_;
};

// Waits for the kernel's ack of a config request; false (with errno text) on an error.
bool waitAck(int fd, const char* what) {
  char buf[8192];
  for (int i = 0; i < 16; i++) {
    ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      std::fprintf(stderr, "%s: recv: %s\n", what, std::strerror(errno));
      return false;
    }
    for (auto* nh = reinterpret_cast<nlmsghdr*>(buf); NLMSG_OK(nh, static_cast<unsigned>(n));
         nh = NLMSG_NEXT(nh, n)) {
      if (nh->nlmsg_type != NLMSG_ERROR) continue;
      auto* e = static_cast<nlmsgerr*>(NLMSG_DATA(nh));
      if (e->error == 0) return true;
      std::fprintf(stderr, "%s: %s\n", what, std::strerror(-e->error));
      return false;
    }
  }
  std::fprintf(stderr, "%s: no ack\n", what);
  return false;
}

bool verdict(int fd, uint16_t queue, uint32_t id_be) {
  Request r(NFQNL_MSG_VERDICT, queue, 0);
  nfqnl_msg_verdict_hdr v{};
  v.verdict = htonl(NF_ACCEPT);
  v.id = id_be;
  r.attr(NFQA_VERDICT_HDR, &v, sizeof(v));
  return r.send(fd);
}

}  // namespace

int main(int argc, char** argv) {
  int queue = -1;
  long delay_ms = -1;
  long duration_s = 300;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i];
    long v = std::strtol(argv[i + 1], nullptr, 10);
    if (k == "--queue") queue = static_cast<int>(v);
    else if (k == "--delay-ms") delay_ms = v;
    else if (k == "--duration-s") duration_s = v;
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  if (queue < 0 || queue > 65535 || delay_ms < 0 || delay_ms > 60000 || duration_s <= 0 ||
      duration_s > 3600) {
    std::fprintf(stderr,
                 "usage: weft-delay-queue --queue 0-65535 --delay-ms 0-60000 "
                 "[--duration-s 1-3600]\n");
    return 2;
  }
  ::signal(SIGTERM, onSignal);
  ::signal(SIGINT, onSignal);

  int fd = ::socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_NETFILTER);
  if (fd < 0) {
    std::fprintf(stderr, "socket(NETLINK_NETFILTER): %s\n", std::strerror(errno));
    return 1;
  }
  sockaddr_nl local{};
  local.nl_family = AF_NETLINK;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&local), sizeof(local)) != 0) {
    std::fprintf(stderr, "bind: %s\n", std::strerror(errno));
    return 1;
  }
  int rcvbuf = 8 << 20;
  ::setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(rcvbuf));  // best effort
  int one = 1;
  ::setsockopt(fd, SOL_NETLINK, NETLINK_NO_ENOBUFS, &one, sizeof(one));

  uint16_t q = static_cast<uint16_t>(queue);
  {
    Request r(NFQNL_MSG_CONFIG, q, NLM_F_ACK);
    nfqnl_msg_config_cmd cmd{};
    cmd.command = NFQNL_CFG_CMD_BIND;
    cmd.pf = htons(AF_INET);
    r.attr(NFQA_CFG_CMD, &cmd, sizeof(cmd));
    if (!r.send(fd) || !waitAck(fd, "bind queue")) return 1;
  }
  {
    Request r(NFQNL_MSG_CONFIG, q, NLM_F_ACK);
    nfqnl_msg_config_params p{};
    p.copy_range = htonl(0);
    p.copy_mode = NFQNL_COPY_META;  // the packet id is all we need
    r.attr(NFQA_CFG_PARAMS, &p, sizeof(p));
    uint32_t maxlen = htonl(16384);
    r.attr(NFQA_CFG_QUEUE_MAXLEN, &maxlen, sizeof(maxlen));
    if (!r.send(fd) || !waitAck(fd, "queue params")) return 1;
  }
  std::printf("ready\n");
  std::fflush(stdout);

  struct Held {
    uint32_t id_be;
    int64_t due;
  };
  std::deque<Held> held;  // in arrival order, so also in due order
  int64_t end = nowMs() + duration_s * 1000;
  uint64_t passed = 0;
  std::vector<char> buf(1 << 16);
  while (!g_stop && nowMs() < end) {
    int64_t now = nowMs();
    while (!held.empty() && held.front().due <= now) {
      if (!verdict(fd, q, held.front().id_be)) {
        std::fprintf(stderr, "verdict: %s\n", std::strerror(errno));
      }
      held.pop_front();
      passed++;
    }
    int timeout = 100;
    if (!held.empty()) timeout = static_cast<int>(std::max<int64_t>(0, held.front().due - now));
    pollfd pfd{fd, POLLIN, 0};
    int pr = ::poll(&pfd, 1, timeout);
    if (pr < 0 && errno != EINTR) {
      std::fprintf(stderr, "poll: %s\n", std::strerror(errno));
      break;
    }
    if (pr <= 0) continue;
    for (int round = 0; round < 256; round++) {
      ssize_t n = ::recv(fd, buf.data(), buf.size(), MSG_DONTWAIT);
      if (n < 0) break;  // EAGAIN: drained (ENOBUFS is switched off)
      int64_t due = nowMs() + delay_ms;
      for (auto* nh = reinterpret_cast<nlmsghdr*>(buf.data());
           NLMSG_OK(nh, static_cast<unsigned>(n)); nh = NLMSG_NEXT(nh, n)) {
        if ((nh->nlmsg_type & 0xff) != NFQNL_MSG_PACKET ||
            (nh->nlmsg_type >> 8) != NFNL_SUBSYS_QUEUE)
          continue;
        size_t off = NLMSG_ALIGN(sizeof(nfgenmsg));
        auto* base = static_cast<char*>(NLMSG_DATA(nh));
        size_t len = nh->nlmsg_len - NLMSG_HDRLEN;
        while (off + NLA_HDRLEN <= len) {
          auto* a = reinterpret_cast<nlattr*>(base + off);
          if (a->nla_len < NLA_HDRLEN || off + a->nla_len > len) break;
          if ((a->nla_type & NLA_TYPE_MASK) == NFQA_PACKET_HDR &&
              a->nla_len >= NLA_HDRLEN + sizeof(nfqnl_msg_packet_hdr)) {
            nfqnl_msg_packet_hdr ph;
            std::memcpy(&ph, base + off + NLA_HDRLEN, sizeof(ph));
            held.push_back(Held{ph.packet_id, due});
          }
          off += NLA_ALIGN(a->nla_len);
        }
      }
    }
  }
  // Let what is still held go rather than drop it.
  for (const Held& h : held) verdict(fd, q, h.id_be);
  std::fprintf(stderr, "weft-delay-queue: %llu packets delayed\n",
               static_cast<unsigned long long>(passed + held.size()));
  ::close(fd);
  return 0;
}
