// End-to-end DNS proxy on a 2-node sim: inside an enrolled pod, getent (glibc) and dig resolve a
// service's VIP and its search-path short forms from the ztunnel's 15053 (never reaching the
// upstream), other names are forwarded to the resolver the pod asked (a tiny DNS server of ours,
// tests/fixtures/dns/upstream_dns.py, running as a pod) with truncation and TCP fallback, and a
// fuzz run of malformed packets leaves the proxy answering.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "tests/e2e/sim_cluster.h"
#include "tests/e2e/sim_suite.h"

namespace weft::e2e {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

constexpr const char* kClient = "mesh/client";        // enrolled, node1
constexpr const char* kPlainClient = "plain/client";  // not enrolled, node1
constexpr const char* kClientIp = "10.244.1.10";
constexpr const char* kUpstreamIp = "10.244.2.53";  // dns/upstream, not enrolled, node2
constexpr const char* kUpstreamIp6 = "fd00:10:244:2::53";
constexpr const char* kVip = "10.96.0.20";
constexpr const char* kVip6 = "fd00:10:96::20";
constexpr const char* kFqdn = "web.mesh.svc.cluster.local";

std::string readFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::vector<std::string> lines(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  std::string l;
  while (std::getline(in, l))
    if (!l.empty()) out.push_back(l);
  return out;
}

class DnsE2E : public SimSuite<DnsE2E> {
 protected:
  static void SetUpTestSuite() {
    setupError_.clear();
    if (::geteuid() != 0) return;
    if (!makeLogDir("dns")) return;
    upstreamLog_ = logDir_ + "/upstream.log";
    // The pod's resolv.conf, as kubelet writes it for ClusterFirst pods; the nameserver is the
    // upstream pod (the proxy sees whatever the pod asked).
    std::ofstream(logDir_ + "/resolv.conf")
        << "nameserver " << kUpstreamIp << "\n"
        << "search mesh.svc.cluster.local svc.cluster.local cluster.local\n"
        << "options ndots:5 timeout:2 attempts:2\n";
    if (!bringUp(fmt::format("dns{}", ::getpid() % 1000000), 2, manifests())) return;
    if (!eventually([] { return readFile(upstreamLog_).find("listening") != std::string::npos; },
                    20s))
      setupError_ = "upstream DNS pod did not start: " + readFile(upstreamLog_);
  }

  std::vector<std::pair<std::string, std::string>> extraLogs() const override {
    return {{"upstream", upstreamLog_}};
  }

  static std::vector<ManifestFile> manifests() {
    auto pod = [](std::string ns, std::string name, std::string node, std::string ip4,
                  std::string ip6, std::string cmd, int readyPort = 0) {
      PodSpec p;
      p.ns = ns, p.name = name, p.node = node, p.ip4 = ip4, p.ip6 = ip6, p.command = cmd;
      p.readyPort = readyPort;
      return podYaml(p);
    };
    std::string upstream = fmt::format(
        "/usr/bin/python3 {}/tests/fixtures/dns/upstream_dns.py --bind {} --bind {} --log {}",
        repoRoot(), kUpstreamIp, kUpstreamIp6, upstreamLog_);
    return {
        {"ns.yaml", namespaceYaml("mesh", true) + "---\n" + namespaceYaml("dns", false) + "---\n" +
                        namespaceYaml("plain", false)},
        {"pods.yaml",
         pod("mesh", "client", "node1", kClientIp, "fd00:10:244:1::10", "sleep infinity") +
             "---\n" +
             pod("plain", "client", "node1", "10.244.1.20", "fd00:10:244:1::20", "sleep infinity") +
             "---\n" + pod("dns", "upstream", "node2", kUpstreamIp, kUpstreamIp6, upstream, 53)},
        {"svc.yaml", fmt::format("apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n"
                                 "  namespace: mesh\nspec:\n  clusterIP: {0}\n  clusterIPs: [{0}, "
                                 "\"{1}\"]\n  selector:\n    app: web\n  ports:\n  - port: 80\n",
                                 kVip, kVip6)},
    };
  }

  // Runs cmd in a pod with the test's resolv.conf bind-mounted over /etc/resolv.conf in a
  // private mount namespace (the sim's pods share the machine's files).
  static RunResult inPod(const std::string& pod, const std::vector<std::string>& cmd,
                         std::chrono::milliseconds timeout = 30s) {
    std::vector<std::string> argv = {"unshare",
                                     "-m",
                                     "--propagation",
                                     "private",
                                     "sh",
                                     "-c",
                                     "mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"",
                                     logDir_ + "/resolv.conf"};
    argv.insert(argv.end(), cmd.begin(), cmd.end());
    return cluster_->exec(pod, argv, timeout);
  }

  static double counter(const std::string& name) {
    std::string err;
    auto m = cluster_->metrics("node1", &err);
    if (!m) {
      ADD_FAILURE() << err;
      return -1;
    }
    return sumSamples(*m, "weft_ztunnel_" + name, {});
  }

  // Upstream log lines for `name` (any proto), e.g. "udp 10.244.1.10:40000 www.example.test 1".
  static std::vector<std::string> upstreamSaw(const std::string& name) {
    std::vector<std::string> out;
    for (const auto& l : lines(readFile(upstreamLog_)))
      if (l.find(" " + name + " ") != std::string::npos) out.push_back(l);
    return out;
  }

  static inline std::string upstreamLog_;
};

TEST_F(DnsE2E, GetentAndDigGetTheServiceVipFromTheProxy) {
  double local_before = counter("dns_answered_locally_total");
  auto g = inPod(kClient, {"getent", "ahosts", kFqdn});
  ASSERT_EQ(g.exitCode, 0) << g.describe();
  EXPECT_NE(g.out.find(kVip), std::string::npos) << g.out;
  EXPECT_NE(g.out.find(kVip6), std::string::npos) << g.out;
  auto h = inPod(kClient, {"getent", "hosts", kFqdn});
  ASSERT_EQ(h.exitCode, 0) << h.describe();
  EXPECT_TRUE(h.out.rfind(kVip, 0) == 0 || h.out.rfind(kVip6, 0) == 0) << h.out;

  auto a = inPod(kClient, {"dig", "+short", "+tries=1", "+time=3", kFqdn, "A"});
  EXPECT_EQ(a.out, std::string(kVip) + "\n") << a.describe();
  auto aaaa = inPod(kClient, {"dig", "+short", "+tries=1", "+time=3", kFqdn, "AAAA"});
  EXPECT_EQ(aaaa.out, std::string(kVip6) + "\n") << aaaa.describe();
  // Over TCP (dig +tcp connects to port 53: the connect hook sends it to the proxy's 15053).
  auto tcp = inPod(kClient, {"dig", "+short", "+tcp", "+tries=1", "+time=3", kFqdn, "A"});
  EXPECT_EQ(tcp.out, std::string(kVip) + "\n") << tcp.describe();
  // The answer is the proxy's, seemingly from the resolver dig asked.
  auto full = inPod(kClient, {"dig", "+tries=1", "+time=3", kFqdn});
  EXPECT_NE(full.out.find("status: NOERROR"), std::string::npos) << full.out;
  EXPECT_NE(full.out.find(std::string("SERVER: ") + kUpstreamIp + "#53"), std::string::npos)
      << full.out;
  EXPECT_NE(full.out.find(" aa "), std::string::npos) << full.out;

  EXPECT_TRUE(upstreamSaw(kFqdn).empty()) << "the upstream was asked for a cluster name";
  EXPECT_GE(counter("dns_answered_locally_total") - local_before, 6);
}

TEST_F(DnsE2E, ShortNamesThroughTheSearchPath) {
  for (const char* name : {"web", "web.mesh", "web.mesh.svc"}) {
    auto g = inPod(kClient, {"getent", "ahosts", name});
    ASSERT_EQ(g.exitCode, 0) << name << ": " << g.describe();
    EXPECT_NE(g.out.find(kVip), std::string::npos) << name << ": " << g.out;
  }
  auto dig = inPod(kClient, {"dig", "+short", "+search", "+tries=1", "+time=3", "web", "A"});
  EXPECT_EQ(dig.out, std::string(kVip) + "\n") << dig.describe();
  // A name in the service zone that is no service: NXDOMAIN from the proxy itself.
  auto nx = inPod(kClient, {"dig", "+tries=1", "+time=3", "nope.mesh.svc.cluster.local"});
  EXPECT_NE(nx.out.find("status: NXDOMAIN"), std::string::npos) << nx.out;
  EXPECT_TRUE(upstreamSaw("nope.mesh.svc.cluster.local").empty());
  auto none = inPod(kClient, {"getent", "hosts", "nope"});
  EXPECT_NE(none.exitCode, 0) << none.out;
}

TEST_F(DnsE2E, OtherNamesAreForwardedToTheResolverThePodAsked) {
  double fwd_before = counter("dns_forwarded_total");
  auto g = inPod(kClient, {"getent", "ahosts", "www.example.test"});
  ASSERT_EQ(g.exitCode, 0) << g.describe();
  EXPECT_NE(g.out.find("192.0.2.10"), std::string::npos) << g.out;
  auto d = inPod(kClient, {"dig", "+short", "+tries=1", "+time=3", "www.example.test", "AAAA"});
  EXPECT_EQ(d.out, "2001:db8::10\n") << d.describe();
  auto nx = inPod(kClient, {"dig", "+tries=1", "+time=3", "missing.example.test"});
  EXPECT_NE(nx.out.find("status: NXDOMAIN"), std::string::npos) << nx.out;
  // To the pod's IPv6 resolver address: captured by sendmsg6/connect6, forwarded over IPv6.
  auto v6 = inPod(kClient, {"dig", "+short", "+tries=1", "+time=3", std::string("@") + kUpstreamIp6,
                            "www.example.test", "A"});
  EXPECT_EQ(v6.out, "192.0.2.10\n") << v6.describe();

  // The upstream got them from the client pod's own address (the proxy forwards from the
  // pod's netns), over both families.
  auto seen = upstreamSaw("www.example.test");
  ASSERT_FALSE(seen.empty());
  bool from_pod4 = false, from_pod6 = false;
  for (const auto& l : seen) {
    from_pod4 = from_pod4 || l.find(std::string("udp ") + kClientIp + ":") == 0;
    from_pod6 = from_pod6 || l.find("udp [fd00:10:244:1::10]:") == 0;
  }
  EXPECT_TRUE(from_pod4) << readFile(upstreamLog_);
  EXPECT_TRUE(from_pod6) << readFile(upstreamLog_);
  EXPECT_GE(counter("dns_forwarded_total") - fwd_before, 4);

  // A pod outside the mesh asks the upstream directly.
  auto plain = cluster_->exec(kPlainClient, {"dig", "+short", "+tries=1", "+time=3",
                                             std::string("@") + kUpstreamIp, kFqdn});
  EXPECT_EQ(plain.out, "") << "a pod outside the mesh resolved a cluster name: " << plain.out;
  EXPECT_FALSE(upstreamSaw(kFqdn).empty());
}

TEST_F(DnsE2E, TruncationAndTcpFallback) {
  double trunc_before = counter("dns_truncated_total");
  // Without EDNS the 1.8 KB answer does not fit 512 bytes: the proxy truncates it.
  auto t = inPod(kClient,
                 {"dig", "+noedns", "+ignore", "+tries=1", "+time=3", "big.example.test", "TXT"});
  EXPECT_NE(t.out.find(" tc "), std::string::npos) << t.out;
  EXPECT_NE(t.out.find("ANSWER: 0"), std::string::npos) << t.out;
  EXPECT_GE(counter("dns_truncated_total") - trunc_before, 1);
  // dig's own fallback retries over TCP and gets all of it.
  auto full = inPod(kClient, {"dig", "+noedns", "+tries=1", "+time=3", "big.example.test", "TXT"});
  EXPECT_NE(full.out.find("ANSWER: 9"), std::string::npos) << full.out;
  bool tcp_seen = false;
  for (const auto& l : upstreamSaw("big.example.test"))
    tcp_seen = tcp_seen || l.rfind(std::string("tcp ") + kClientIp + ":", 0) == 0;
  EXPECT_TRUE(tcp_seen) << readFile(upstreamLog_);
  // getent (glibc: EDNS off by default, so also truncated, then TCP) still resolves names.
  auto g = inPod(kClient, {"getent", "ahosts", "www.example.test"});
  EXPECT_EQ(g.exitCode, 0) << g.describe();
}

TEST_F(DnsE2E, FuzzLeavesTheProxyAnswering) {
  double queries_before = counter("dns_queries_total");
  double malformed_before = counter("dns_malformed_total");
  auto f = inPod(kClient,
                 {"/usr/bin/python3", repoRoot() + "/tests/fixtures/dns/dns_fuzz.py", "--server",
                  kUpstreamIp, "--count", "3000", "--tcp", "40", "--seed", "7"},
                 90s);
  ASSERT_EQ(f.exitCode, 0) << f.describe();
  auto sum = nlohmann::json::parse(f.out, nullptr, false);
  ASSERT_TRUE(sum.is_object()) << f.out;
  EXPECT_EQ(sum.value("udp_sent", 0), 3000) << f.out;
  // (Almost) everything sent was read by the proxy (loopback may drop a few datagrams when its
  // socket buffer is full on a busy machine) and most of it was refused as malformed.
  EXPECT_TRUE(
      eventually([&] { return counter("dns_queries_total") - queries_before >= 2850; }, 10s))
      << counter("dns_queries_total") - queries_before;
  EXPECT_GE(counter("dns_malformed_total") - malformed_before, 1000);

  auto a = inPod(kClient, {"dig", "+short", "+tries=1", "+time=3", kFqdn});
  EXPECT_EQ(a.out, std::string(kVip) + "\n") << a.describe();
  auto b = inPod(kClient, {"dig", "+short", "+tcp", "+tries=1", "+time=3", "www.example.test"});
  EXPECT_EQ(b.out, "192.0.2.10\n") << b.describe();
  auto g = inPod(kClient, {"getent", "hosts", "web"});
  EXPECT_EQ(g.exitCode, 0) << g.describe();
}

}  // namespace
}  // namespace weft::e2e
