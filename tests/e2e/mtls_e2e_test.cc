// End-to-end tests of identity, mTLS and HBONE on a 2-node sim whose certificates live 4 s:
// what the wire carries, other HTTP/2 CONNECT clients against the real ztunnel, pooling,
// rotation under a live connection, holding a connection until a certificate exists, STRICT.
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/e2e/sim_cluster.h"
#include "tests/e2e/sim_suite.h"

namespace weft::e2e {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Json = nlohmann::json;

// The cluster: node1 holds the clients, node2 the servers; namespace mesh is enrolled.
constexpr const char* kMeshClient = "mesh/client";
constexpr const char* kPlainClient = "plain/client";
constexpr const char* kMeshClientIp = "10.244.1.10";
constexpr const char* kPlainClientIp = "10.244.1.20";
constexpr const char* kMeshServerIp = "10.244.2.10";
constexpr const char* kPlainServerIp = "10.244.2.20";
constexpr int kHashPort = 8080;
constexpr int kStreamPort = 9090;
constexpr int kHbonePort = 15008;
constexpr int kCertTtlSeconds = 4;  // the ztunnel renews at half life: a new serial every ~2 s
constexpr const char* kMeshIdentity = "spiffe://cluster.local/ns/mesh/sa/default";
constexpr const char* kPlainIdentity = "spiffe://cluster.local/ns/plain/sa/default";
constexpr const char* kMeshInboundSource = "127.0.0.6";  // ARCHITECTURE.md "Inbound to the app"
constexpr const char* kOpened = "istio_tcp_connections_opened_total";
constexpr const char* kClientHandshakes = "weft_ztunnel_hbone_client_handshakes_total";
constexpr const char* kServerHandshakes = "weft_ztunnel_hbone_server_handshakes_total";
constexpr const char* kTlsRefused = "weft_ztunnel_tls_refused_total";
constexpr const char* kCertWaits = "weft_ztunnel_cert_waits_total";
constexpr const char* kCertWaitTimeouts = "weft_ztunnel_cert_wait_timeouts_total";
constexpr const char* kPlaintextRefused = "weft_ztunnel_plaintext_refused_total";
constexpr const char* kPolicyVerdicts = "weft_ztunnel_policy_verdicts_total";

std::string readWhole(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  std::istringstream in(s);
  while (std::getline(in, cur, sep)) out.push_back(cur);
  if (!s.empty() && s.back() == sep) out.push_back("");
  return out;
}

// "accept peer=IP:PORT local=IP:PORT mode=M" lines of weft-echo-server's peer log.
struct Accepted {
  std::string peer, local;
};
std::vector<Accepted> acceptedSince(const std::string& log, size_t mark) {
  std::vector<Accepted> out;
  std::ifstream in(log);
  std::string line;
  for (size_t i = 0; std::getline(in, line); ++i) {
    if (i < mark || line.rfind("accept ", 0) != 0) continue;
    Accepted a;
    std::istringstream words(line);
    std::string w;
    while (words >> w) {
      if (w.rfind("peer=", 0) == 0) a.peer = w.substr(5);
      if (w.rfind("local=", 0) == 0) a.local = w.substr(6);
    }
    out.push_back(a);
  }
  return out;
}
size_t lineCount(const std::string& log) {
  std::ifstream in(log);
  size_t n = 0;
  std::string line;
  while (std::getline(in, line)) ++n;
  return n;
}

// A SIGSTOPped agent that is always continued: on resume(), on scope exit and on a signal.
class StoppedAgent {
 public:
  explicit StoppedAgent(pid_t pid) : pid_(pid) {}
  ~StoppedAgent() { resume(); }
  bool stop() {
    setStoppedPidForSignal(pid_);
    return ::kill(pid_, SIGSTOP) == 0;
  }
  void resume() {
    if (pid_ > 0) ::kill(pid_, SIGCONT);
    setStoppedPidForSignal(0);
  }

 private:
  pid_t pid_;
};

// One line through a long-lived connection (socat) and back.
::testing::AssertionResult roundTrip(Child& c, const std::string& line) {
  if (!c.send(line + "\n")) return ::testing::AssertionFailure() << "write to socat failed";
  auto got = c.readUntil(line + "\n", 10s);
  if (!got) return ::testing::AssertionFailure() << "no echo of '" << line << "'";
  return ::testing::AssertionSuccess();
}

// One frame of the capture, as tshark printed its fields.
struct Frame {
  std::string number, src, dst, proto, stream;
  int srcPort = 0, dstPort = 0, tcpLen = 0;
  bool syn = false, ack = false;
  std::vector<std::string> contentTypes;  // plaintext record headers (hello, CCS, alert)
  std::vector<std::string> opaqueTypes;   // TLS 1.3 encrypted records' outer type
  std::vector<std::string> handshakeTypes, supportedVersions;
  std::string reassembledIn;
  bool retransmission = false;
  uint64_t seq = 0;        // relative
  std::string payloadHex;  // the TCP payload
  std::string raw;         // the fields above but the payload, for messages
};

std::vector<std::string> nonEmpty(const std::string& field) {
  std::vector<std::string> out;
  for (auto& v : split(field, ',')) {
    if (!v.empty()) out.push_back(v);
  }
  return out;
}

class MtlsE2E : public SimSuite<MtlsE2E> {
 protected:
  static void SetUpTestSuite() {
    setupError_.clear();
    if (::geteuid() != 0) return;  // each test skips with the reason
    if (!makeLogDir("mtls")) return;
    meshServerLog_ = logDir_ + "/mesh-server.log";
    std::string name = fmt::format("mtls{}", ::getpid() % 10000000);
    auto t0 = std::chrono::steady_clock::now();
    if (!bringUp(name, 2, manifests(),
                 {"--agent-arg=--cert-ttl", fmt::format("--agent-arg={}", kCertTtlSeconds)})) {
      return;
    }
    std::printf("sim %s up in %lld ms\n", name.c_str(),
                static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                           std::chrono::steady_clock::now() - t0)
                                           .count()));
    if (!eventually([] { return lineCount(meshServerLog_) > 0; }, 20s)) {
      setupError_ = "echo server did not start: no 'listening' line in " + meshServerLog_;
      return;
    }
    std::string err;
    auto st = cluster_->status(&err);
    if (!st || !st->contains("state_dir") || !st->contains("fabric_netns")) {
      setupError_ = "scripts/sim status --json without state_dir/fabric_netns: " + err;
      return;
    }
    simCa_ = (*st)["state_dir"].get<std::string>() + "/ca/ca-cert.pem";
    fabricNetns_ = (*st)["fabric_netns"].get<std::string>();
    for (auto& n : (*st)["nodes"]) {
      if (n.value("name", "") == "node2") node2Netns_ = n.value("netns", "");
    }
    for (auto& p : (*st)["pods"]) {
      if (p.value("namespace", "") == "plain" && p.value("name", "") == "client") {
        plainClientNetns_ = p.value("netns", "");
      }
    }
    if (node2Netns_.empty() || plainClientNetns_.empty()) {
      setupError_ = "scripts/sim status --json names no netns for node2 or plain/client";
      return;
    }
    if (!makeCertificates(&err)) setupError_ = err;
  }

  static std::vector<ManifestFile> manifests() {
    std::string server = fmt::format("{} --port {} --stream-port {} --log-peers ",
                                     echoServerPath(), kHashPort, kStreamPort);
    auto pod = [](std::string ns, std::string name, std::string node, std::string ip,
                  std::string cmd) {
      PodSpec p;
      p.ns = ns, p.name = name, p.node = node, p.ip4 = ip, p.command = cmd;
      if (cmd.find("--stream-port") != std::string::npos) p.readyPort = kStreamPort;
      return podYaml(p);
    };
    return {
        {"ns-mesh.yaml", namespaceYaml("mesh", true)},
        {"ns-plain.yaml", namespaceYaml("plain", false)},
        {"pods-mesh.yaml", pod("mesh", "client", "node1", kMeshClientIp, "sleep infinity") +
                               "---\n" +
                               pod("mesh", "server", "node2", kMeshServerIp,
                                   server + meshServerLog_)},
        {"pods-plain.yaml", pod("plain", "client", "node1", kPlainClientIp, "sleep infinity") +
                                "---\n" +
                                pod("plain", "server", "node2", kPlainServerIp,
                                    server + logDir_ + "/plain-server.log")},
    };
  }

  static bool sh(const std::string& cmd, std::string* err) {
    auto r = run({"/bin/sh", "-c", cmd}, withTimeout(30s));
    if (r.exitCode != 0) {
      *err = cmd + ": " + r.describe();
      return false;
    }
    return true;
  }

  // With the openssl CLI: a client certificate of the sim's CA for plain's identity (as an
  // agent would issue: P-256, critical URI SAN), and a CA of our own with the same kind of leaf.
  static bool makeCertificates(std::string* err) {
    std::string d = logDir_ + "/certs";
    std::string ext = d + "/leaf.ext";
    std::string caKey = simCa_.substr(0, simCa_.rfind('/')) + "/ca-key.pem";
    return sh("mkdir -p " + d, err) &&
           sh(fmt::format("printf 'basicConstraints=critical,CA:FALSE\\n"
                          "keyUsage=critical,digitalSignature,keyAgreement\\n"
                          "extendedKeyUsage=serverAuth,clientAuth\\n"
                          "subjectAltName=critical,URI:{}\\n' > {}",
                          kPlainIdentity, ext),
              err) &&
           sh(fmt::format("openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
                          "-keyout {0}/client.key -out {0}/client.csr -subj /CN=e2e-client",
                          d),
              err) &&
           sh(fmt::format("openssl x509 -req -in {0}/client.csr -CA {1} -CAkey {2} "
                          "-set_serial 0x$(openssl rand -hex 16) -days 1 -extfile {3} "
                          "-out {0}/client.crt",
                          d, simCa_, caKey, ext),
              err) &&
           sh(fmt::format("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 "
                          "-nodes -keyout {0}/other-ca.key -out {0}/other-ca.crt -days 2 "
                          "-subj /CN=not-the-sim-ca",
                          d),
              err) &&
           sh(fmt::format("openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
                          "-keyout {0}/other.key -out {0}/other.csr -subj /CN=e2e-other",
                          d),
              err) &&
           sh(fmt::format("openssl x509 -req -in {0}/other.csr -CA {0}/other-ca.crt "
                          "-CAkey {0}/other-ca.key -set_serial 0x$(openssl rand -hex 16) "
                          "-days 1 -extfile {1} -out {0}/other.crt",
                          d, ext),
              err) &&
           sh("chmod -R a+rX " + d, err);
  }
  static std::string cert(const std::string& f) { return logDir_ + "/certs/" + f; }

  // `identity`'s entry in `node`'s /config_dump certificates, or an empty object.
  static Json certificateOf(const std::string& node, const std::string& identity) {
    auto d = ztunnelAdmin(node, "/config_dump");
    if (!d || !d->contains("certificates")) return Json::object();
    for (auto& c : (*d)["certificates"]) {
      if (c.value("identity", "") == identity) return c;
    }
    return Json::object();
  }

  // Waits until `node`'s certificate for `identity` has a serial other than the one it has now,
  // so what follows starts at the beginning of a certificate's life; the new serial, or "".
  static std::string waitForNextSerial(const std::string& node, const std::string& identity) {
    std::string first = certificateOf(node, identity).value("serial", "");
    std::string next;
    bool changed = !first.empty() && eventually(
                                         [&] {
                                           next = certificateOf(node, identity)
                                                      .value("serial", "");
                                           return !next.empty() && next != first;
                                         },
                                         std::chrono::seconds(3 * kCertTtlSeconds), 100ms);
    return changed ? next : "";
  }

  static Json echo(const std::string& pod, const std::string& target, int count,
                   uint64_t maxBytes, int concurrency, int seed,
                   std::chrono::milliseconds limit = 120s) {
    auto r = cluster_->exec(pod,
                            {echoClientPath(), "--target", target, "--count",
                             std::to_string(count), "--max-bytes", std::to_string(maxBytes),
                             "--concurrency", std::to_string(concurrency), "--seed",
                             std::to_string(seed), "--timeout-s", "20"},
                            limit);
    auto j = Json::parse(r.out, nullptr, false);
    if (j.is_discarded() || !j.is_object()) {
      return Json{{"error", "echo client in " + pod + ": " + r.describe()}, {"ok", -1}};
    }
    j["exit_code"] = r.exitCode;
    return j;
  }

  // socat in `pod` to ip:port, `text` on its stdin; what came back.
  static RunResult socatOnce(const std::string& pod, const std::string& ip, int port,
                             const std::string& text) {
    RunOptions o;
    o.timeout = 30s;
    o.stdinText = text;
    return run(cluster_->execArgv(pod, {"socat", "-T", "10", "-",
                                        fmt::format("TCP:{}:{}", ip, port)}),
               o);
  }

  // In one host shell, so the three steps take milliseconds, not the seconds of three `sim`
  // calls (the serial changes every ~2 s): node2's config_dump, openssl s_client from
  // plain/client's netns to the mesh server's 15008 with our sim-CA certificate, config_dump
  // again. The serials of kMeshIdentity before and after, and the one the server presented.
  struct ServedProbe {
    std::string before, served, after, error;
  };
  static ServedProbe probeServedCertificate() {
    ServedProbe p;
    std::string d = logDir_ + "/probe";
    std::string dump = fmt::format(
        "ip netns exec {} curl -sS --max-time 5 http://127.0.0.1:15000/config_dump", node2Netns_);
    auto r = run({"/bin/sh", "-c",
                  fmt::format("set -e; mkdir -p {0}; {1} > {0}/before.json; "
                              "ip netns exec {2} timeout 20 openssl s_client -connect {3}:{4} "
                              "-CAfile {5} -cert {6} -key {7} -alpn h2 -tls1_3 </dev/null "
                              "2>/dev/null | openssl x509 -noout -serial > {0}/served.txt; "
                              "{1} > {0}/after.json",
                              d, dump, plainClientNetns_, kMeshServerIp, kHbonePort, simCa_,
                              cert("client.crt"), cert("client.key"))},
                 withTimeout(60s));
    if (r.exitCode != 0) {
      p.error = r.describe();
      return p;
    }
    auto serialIn = [](const std::string& file) -> std::string {
      auto j = Json::parse(readWhole(file), nullptr, false);
      if (j.is_discarded() || !j.contains("certificates")) return "";
      for (auto& c : j["certificates"]) {
        if (c.value("identity", "") == kMeshIdentity) return c.value("serial", "");
      }
      return "";
    };
    p.before = serialIn(d + "/before.json");
    p.after = serialIn(d + "/after.json");
    std::string served = readWhole(d + "/served.txt");
    while (!served.empty() && (served.back() == '\n' || served.back() == '\r')) {
      served.pop_back();
    }
    if (served.rfind("serial=", 0) == 0) p.served = served.substr(7);
    if (p.served.empty()) p.error = "s_client printed no server certificate: " + served;
    return p;
  }

  static inline std::string meshServerLog_;
  static inline std::string simCa_;
  static inline std::string fabricNetns_;
  static inline std::string node2Netns_;
  static inline std::string plainClientNetns_;
};

bool sameSerial(std::string a, std::string b) {
  for (auto* s : {&a, &b}) {
    for (auto& ch : *s) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
    while (s->size() > 1 && s->front() == '0') s->erase(0, 1);
  }
  return !a.empty() && a == b;
}

// dumpcap on the fabric bridge while a meshed pair and a plain pair exchange a marker: between
// the meshed pods only TLS 1.3 to 15008 with nothing but encrypted records after the hellos;
// the plain pair's marker is on the wire, the meshed pair's is not.
TEST_F(MtlsE2E, FabricCarriesOnlyTls13BetweenMeshedPods) {
  std::string pcap = logDir_ + "/fabric.pcapng";
  // Bounded by dumpcap itself too (-a duration), in case we die before stopping it.
  Child capture;
  ASSERT_TRUE(capture.start({"ip", "netns", "exec", fabricNetns_, "dumpcap", "-i", "br0", "-w",
                             pcap, "-a", "duration:120", "-q"}));
  struct StopCapture {
    Child& c;
    bool stopped = false;
    std::string out;
    void stop() {
      if (stopped) return;
      stopped = true;
      if (c.pid() > 0) ::kill(c.pid(), SIGINT);  // dumpcap flushes and closes the file
      if (!c.wait(10s, &out)) c.kill();
    }
    ~StopCapture() { stop(); }
  } stopCapture{capture, false, {}};
  ASSERT_TRUE(capture.readUntil("File:", 10s)) << "dumpcap did not start capturing on br0 in "
                                               << fabricNetns_;

  // A certificate newer than any pooled HBONE connection: ours makes a fresh one (the pool is
  // keyed by the credentials' serial), so its handshake is in the capture.
  ASSERT_FALSE(waitForNextSerial("node1", kMeshIdentity).empty())
      << "node1's client certificate for " << kMeshIdentity << " did not renew";
  double hs0 = metric("node1", kClientHandshakes);
  double mtls0 = metric("node1", kOpened,
                        {{"reporter", "source"}, {"connection_security_policy", "mutual_tls"}});
  std::string tag =
      fmt::format("{:x}", std::chrono::steady_clock::now().time_since_epoch().count());
  std::string meshMarker = "WEFT-MESHED-PLAINTEXT-MARKER-" + tag;
  std::string plainMarker = "WEFT-UNMESHED-PLAINTEXT-MARKER-" + tag;
  auto meshed = socatOnce(kMeshClient, kMeshServerIp, kStreamPort, meshMarker + "\n");
  EXPECT_EQ(meshed.exitCode, 0) << meshed.describe();
  EXPECT_EQ(meshed.out, meshMarker + "\n") << meshed.describe();
  auto plain = socatOnce(kPlainClient, kPlainServerIp, kStreamPort, plainMarker + "\n");
  EXPECT_EQ(plain.exitCode, 0) << plain.describe();
  EXPECT_EQ(plain.out, plainMarker + "\n") << plain.describe();
  std::this_thread::sleep_for(500ms);  // the last ACKs and FINs
  stopCapture.stop();
  ASSERT_TRUE(fs::exists(pcap)) << "no capture file; dumpcap said: " << stopCapture.out;
  std::printf("dumpcap: %s\n", stopCapture.out.c_str());
  // For a look with Wireshark: WEFT_E2E_KEEP_CAPTURE=DIR keeps a copy (ours goes with logDir_).
  if (const char* keep = std::getenv("WEFT_E2E_KEEP_CAPTURE")) {
    std::error_code ec;
    fs::copy_file(pcap, fs::path(keep) / fmt::format("mtls-fabric-{}.pcapng", ::getpid()),
                  fs::copy_options::overwrite_existing, ec);
  }

  EXPECT_EQ(metric("node1", kOpened,
                   {{"reporter", "source"}, {"connection_security_policy", "mutual_tls"}}),
            mtls0 + 1)
      << "the meshed exchange must be one mutual_tls connection";
  EXPECT_GE(metric("node1", kClientHandshakes), hs0 + 1) << "no new HBONE handshake";

  std::string bytes = readWhole(pcap);
  EXPECT_EQ(bytes.find(meshMarker), std::string::npos)
      << "the meshed pair's plaintext marker is on the fabric";
  EXPECT_NE(bytes.find(plainMarker), std::string::npos)
      << "the plain pair's marker is not in the capture: the capture does not see the traffic";

  // Every frame between the meshed pods, decoded as TLS on 15008 (two passes, so a record
  // split over segments is attributed to its last one and the others say so).
  auto r = run({"tshark", "-r", pcap, "-2", "-d", fmt::format("tcp.port=={},tls", kHbonePort),
                "-Y", fmt::format("ip.addr=={} && ip.addr=={}", kMeshClientIp, kMeshServerIp),
                "-T", "fields", "-E", "separator=/t", "-E", "occurrence=a", "-e",
                "frame.number", "-e", "ip.src", "-e", "ip.dst", "-e", "ip.proto", "-e",
                "tcp.stream", "-e", "tcp.srcport", "-e", "tcp.dstport", "-e", "tcp.len", "-e",
                "tcp.flags.syn", "-e", "tcp.flags.ack", "-e", "tls.record.content_type", "-e",
                "tls.record.opaque_type", "-e", "tls.handshake.type", "-e",
                "tls.handshake.extensions.supported_version", "-e", "tcp.reassembled_in", "-e",
                "tcp.analysis.retransmission", "-e", "tcp.seq", "-e", "tcp.payload"},
               withTimeout(60s));
  ASSERT_EQ(r.exitCode, 0) << r.describe();
  std::vector<Frame> frames;
  for (auto& line : split(r.out, '\n')) {
    if (line.empty()) continue;
    auto f = split(line, '\t');
    if (f.size() < 18) f.resize(18);
    Frame fr;
    fr.raw = fmt::format("{}", fmt::join(f.begin(), f.begin() + 17, "\t"));
    fr.number = f[0], fr.src = f[1], fr.dst = f[2], fr.proto = f[3], fr.stream = f[4];
    fr.srcPort = std::atoi(f[5].c_str()), fr.dstPort = std::atoi(f[6].c_str());
    fr.tcpLen = std::atoi(f[7].c_str());
    fr.syn = f[8] == "1" || f[8] == "True", fr.ack = f[9] == "1" || f[9] == "True";
    fr.contentTypes = nonEmpty(f[10]), fr.opaqueTypes = nonEmpty(f[11]);
    fr.handshakeTypes = nonEmpty(f[12]), fr.supportedVersions = nonEmpty(f[13]);
    fr.reassembledIn = f[14];
    fr.retransmission = !f[15].empty();
    fr.seq = std::strtoull(f[16].c_str(), nullptr, 10);
    fr.payloadHex = f[17];
    frames.push_back(fr);
  }
  ASSERT_FALSE(frames.empty()) << "no frames between " << kMeshClientIp << " and "
                               << kMeshServerIp << " in the capture";

  struct Direction {
    std::vector<std::string> plaintext;  // content types of the unencrypted records, in order
    size_t encrypted = 0;
    bool sawEncrypted = false;
    std::string bytesHex;  // the byte stream by relative sequence number ('?' = not seen)
  };
  struct Stream {
    bool synSeen = false;
    Direction up, down;  // client -> server, server -> client
    std::vector<std::string> serverHelloVersions;
  };
  std::map<std::string, Stream> streams;
  for (auto& fr : frames) {
    SCOPED_TRACE("frame: " + fr.raw);
    ASSERT_EQ(fr.proto, "6") << "not TCP between the meshed pods";
    bool up = fr.src == kMeshClientIp;
    if (up) {
      EXPECT_EQ(fr.dstPort, kHbonePort) << "client to server not to 15008";
    } else {
      EXPECT_EQ(fr.src, kMeshServerIp);
      EXPECT_EQ(fr.srcPort, kHbonePort) << "server to client not from 15008";
    }
    Stream& s = streams[fr.stream];
    if (up && fr.syn && !fr.ack) s.synSeen = true;
    Direction& d = up ? s.up : s.down;
    if (fr.tcpLen > 0) {
      ASSERT_EQ(fr.payloadHex.size(), 2u * fr.tcpLen) << "tshark printed no whole payload";
      size_t at = 2 * fr.seq;
      if (fr.retransmission) {
        // tshark does not dissect a retransmission again: it must repeat bytes already seen.
        EXPECT_EQ(d.bytesHex.substr(std::min(at, d.bytesHex.size()), fr.payloadHex.size()),
                  fr.payloadHex)
            << "a retransmission carrying bytes that were not sent before";
      } else {
        EXPECT_TRUE(!fr.contentTypes.empty() || !fr.opaqueTypes.empty() ||
                    !fr.reassembledIn.empty())
            << "payload that is not (part of) a TLS record";
        if (d.bytesHex.size() < at + fr.payloadHex.size()) {
          d.bytesHex.resize(at + fr.payloadHex.size(), '?');
        }
        d.bytesHex.replace(at, fr.payloadHex.size(), fr.payloadHex);
      }
    }
    if (!fr.contentTypes.empty()) {
      // Unencrypted records exist only before the first encrypted one (a frame can carry the
      // last hello record and the first encrypted ones: the hellos are listed first).
      EXPECT_FALSE(d.sawEncrypted) << "an unencrypted TLS record after encrypted ones";
      d.plaintext.insert(d.plaintext.end(), fr.contentTypes.begin(), fr.contentTypes.end());
    }
    for (auto& t : fr.opaqueTypes) {
      EXPECT_EQ(t, "23") << "an encrypted record that is not application data";
      ++d.encrypted;
    }
    if (!fr.opaqueTypes.empty()) d.sawEncrypted = true;
    if (!up && std::find(fr.handshakeTypes.begin(), fr.handshakeTypes.end(), "2") !=
                   fr.handshakeTypes.end()) {
      s.serverHelloVersions = fr.supportedVersions;
    }
  }
  int handshakesSeen = 0;
  for (auto& [id, s] : streams) {
    SCOPED_TRACE("tcp.stream " + id);
    // The only unencrypted records: ClientHello / ServerHello (22), each optionally followed
    // by TLS 1.3's middlebox-compatibility ChangeCipherSpec (20). Alerts (21) or TLS 1.2
    // application data (23) in the clear fail here.
    auto helloOnly = [](const std::vector<std::string>& v) {
      return (v.size() == 1 && v[0] == "22") || (v.size() == 2 && v[0] == "22" && v[1] == "20");
    };
    if (s.synSeen) {
      ++handshakesSeen;
      EXPECT_TRUE(helloOnly(s.up.plaintext))
          << "client records in the clear: " << fmt::format("{}", fmt::join(s.up.plaintext, ","));
      EXPECT_TRUE(helloOnly(s.down.plaintext))
          << "server records in the clear: "
          << fmt::format("{}", fmt::join(s.down.plaintext, ","));
      EXPECT_EQ(s.serverHelloVersions, std::vector<std::string>{"0x0304"})
          << "ServerHello supported_version: TLS 1.3 must be negotiated";
      EXPECT_GT(s.up.encrypted, 0u);
      EXPECT_GT(s.down.encrypted, 0u);
    } else {
      EXPECT_TRUE(s.up.plaintext.empty() && s.down.plaintext.empty())
          << "unencrypted records on a connection opened before the capture";
    }
  }
  EXPECT_GE(handshakesSeen, 1) << "no HBONE connection was opened during the capture";
  size_t retransmissions = std::count_if(frames.begin(), frames.end(),
                                         [](const Frame& f) { return f.retransmission; });
  std::printf("capture: %zu frames between the meshed pods in %zu TCP connection(s), %d with "
              "their TLS 1.3 handshake, %zu retransmission(s)\n",
              frames.size(), streams.size(), handshakesSeen, retransmissions);
}

// Clients we did not write (python3-h2, Node's http2) and openssl s_client against a meshed
// pod's 15008 on the real ztunnel: CONNECT reaches the app; a certificate of another CA is
// refused and counted as untrusted.
TEST_F(MtlsE2E, ForeignHttp2ClientsInteropAndOtherCaIsRefused) {
  std::string fixtures = repoRoot() + "/tests/fixtures/hbone";
  std::string authority = fmt::format("{}:{}", kMeshServerIp, kStreamPort);
  size_t mark = lineCount(meshServerLog_);
  double hs0 = metric("node2", kServerHandshakes);

  std::string pyPayload = "interop-python3-h2";
  auto py = cluster_->exec(kPlainClient,
                           {"timeout", "30", "/usr/bin/python3", fixtures + "/h2_connect_client.py",
                            kMeshServerIp, std::to_string(kHbonePort), cert("client.crt"),
                            cert("client.key"), simCa_, authority, pyPayload},
                           40s);
  ASSERT_EQ(py.exitCode, 0) << py.describe();
  auto pj = Json::parse(py.out, nullptr, false);
  ASSERT_FALSE(pj.is_discarded()) << py.describe();
  EXPECT_EQ(pj.value("status", 0), 200) << py.out;
  EXPECT_EQ(pj.value("received", ""), pyPayload) << py.out;

  constexpr int kStreams = 3;
  std::string jsPayload = "interop-node-http2";
  auto js = cluster_->exec(kPlainClient,
                           {"timeout", "30", "/usr/bin/node", fixtures + "/h2_connect_client.js",
                            kMeshServerIp, std::to_string(kHbonePort), cert("client.crt"),
                            cert("client.key"), simCa_, kMeshIdentity, authority, jsPayload,
                            std::to_string(kStreams)},
                           40s);
  ASSERT_EQ(js.exitCode, 0) << js.describe();
  auto jj = Json::parse(js.out, nullptr, false);
  ASSERT_FALSE(jj.is_discarded()) << js.describe();
  EXPECT_EQ(jj.value("alpn", ""), "h2") << js.out;
  EXPECT_EQ(jj.value("protocol", ""), "TLSv1.3") << js.out;
  EXPECT_EQ(jj.value("peer", ""), std::string("URI:") + kMeshIdentity) << js.out;
  ASSERT_TRUE(jj.contains("streams") && jj["streams"].size() == kStreams) << js.out;
  for (int i = 0; i < kStreams; ++i) {
    EXPECT_EQ(jj["streams"][i].value("status", 0), 200) << js.out;
    EXPECT_EQ(jj["streams"][i].value("received", ""), fmt::format("{}-{}", jsPayload, i))
        << js.out;
  }

  // The app saw 1 + kStreams connections on its stream port, from the mesh's inbound source.
  auto seen = acceptedSince(meshServerLog_, mark);
  ASSERT_EQ(seen.size(), 1u + kStreams);
  for (auto& a : seen) {
    EXPECT_EQ(a.peer.substr(0, a.peer.rfind(':')), kMeshInboundSource);
    EXPECT_EQ(a.local, authority);
  }
  EXPECT_EQ(metric("node2", kServerHandshakes), hs0 + 2)
      << "one TLS handshake per interop client on node2";

  // A client certificate of another CA: the server's alert reaches s_client (it reads for a
  // second), and node2 counts exactly one untrusted refusal.
  std::map<std::string, std::string> untrusted = {{"side", "server"}, {"reason", "untrusted"}};
  double refused0 = metric("node2", kTlsRefused, untrusted);
  double allRefused0 = metric("node2", kTlsRefused);
  auto sc = cluster_->exec(
      kPlainClient,
      {"sh", "-c",
       fmt::format("sleep 1 | timeout 20 openssl s_client -connect {}:{} -CAfile {} -cert {} "
                   "-key {} -alpn h2 -tls1_3 -brief 2>&1",
                   kMeshServerIp, kHbonePort, simCa_, cert("other.crt"), cert("other.key"))},
      40s);
  EXPECT_NE(sc.exitCode, 0) << sc.describe();
  EXPECT_NE(sc.out.find("alert unknown ca"), std::string::npos)
      << "s_client must see the server's unknown_ca alert: " << sc.describe();
  double refused = -1;
  eventually([&] { return (refused = metric("node2", kTlsRefused, untrusted)) > refused0; }, 3s);
  EXPECT_EQ(refused, refused0 + 1) << "node2 tls_refused_total{side=server,reason=untrusted}";
  EXPECT_EQ(metric("node2", kTlsRefused), allRefused0 + 1) << "counted once, under one reason";
}

// 1000 sequential meshed connections to one destination share pooled HBONE connections.
TEST_F(MtlsE2E, ThousandConnectionsSharePooledHboneConnections) {
  constexpr int kConns = 1000;
  double hs0 = metric("node1", kClientHandshakes);
  double src0 = metric("node1", kOpened, {{"reporter", "source"}});
  double mtls0 = metric("node1", kOpened,
                        {{"reporter", "source"}, {"connection_security_policy", "mutual_tls"}});
  int issued0 = certificateOf("node1", kMeshIdentity).value("issued", -1);
  // Start at the beginning of a certificate's life (every renewal keys a new pool entry), so
  // the run meets as few renewals as it can.
  ASSERT_FALSE(waitForNextSerial("node1", kMeshIdentity).empty());
  auto t0 = std::chrono::steady_clock::now();
  auto j = echo(kMeshClient, fmt::format("{}:{}", kMeshServerIp, kHashPort), kConns, 256, 1, 3,
                300s);
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                std::chrono::steady_clock::now() - t0)
                .count();
  int issued1 = certificateOf("node1", kMeshIdentity).value("issued", -1);
  EXPECT_EQ(j.value("ok", -1), kConns) << j.dump();
  EXPECT_EQ(j.value("failures", -1), 0) << j.dump();
  EXPECT_EQ(j.value("mismatches", -1), 0) << j.dump();
  double src = -1;
  eventually([&] { return (src = metric("node1", kOpened, {{"reporter", "source"}})) >=
                          src0 + kConns; },
             5s, 250ms);
  EXPECT_EQ(src, src0 + kConns) << "reporter=source opened connections";
  EXPECT_EQ(metric("node1", kOpened,
                   {{"reporter", "source"}, {"connection_security_policy", "mutual_tls"}}),
            mtls0 + kConns)
      << "all of them over mTLS";
  double hs = metric("node1", kClientHandshakes) - hs0;
  std::printf("pooling: %d connections in %lld ms, %.0f HBONE handshakes, %d certificates "
              "issued for the client identity (from just before the run to its end)\n",
              kConns, static_cast<long long>(ms), hs, issued1 - issued0);
  // Each event loop of the multi-loop ztunnel has its own pool (weft_ztunnel_loops of them).
  double loops = std::max(1.0, metric("node1", "weft_ztunnel_loops"));
  EXPECT_LE(hs, 5 * loops) << "HBONE handshakes (a handful per loop) for " << kConns
                           << " sequential connections";
  EXPECT_GE(hs, 1);
  // Each certificate version used (the one we waited for, and any renewal during the run) may
  // start one pooled connection per loop (the pool is keyed by it), nothing more.
  EXPECT_LE(hs, loops * (issued1 - issued0))
      << "more handshakes than certificate versions used times " << loops << " loops";
}

// A meshed connection keeps exchanging data while node2's server certificate rotates 3 times;
// a new TLS connection to 15008 is then served with the serial node2 reports as current.
TEST_F(MtlsE2E, LongLivedConnectionSurvivesRotationsAndNewOnesGetCurrentCertificate) {
  double mtls0 = metric("node1", kOpened,
                        {{"reporter", "source"}, {"connection_security_policy", "mutual_tls"}});
  Child socat;
  ASSERT_TRUE(socat.start(cluster_->execArgv(
      kMeshClient,
      {"socat", "-T", "120", "-", fmt::format("TCP:{}:{}", kMeshServerIp, kStreamPort)})));
  ASSERT_TRUE(roundTrip(socat, "line-0"));
  EXPECT_EQ(metric("node1", kOpened,
                   {{"reporter", "source"}, {"connection_security_policy", "mutual_tls"}}),
            mtls0 + 1)
      << "the long-lived connection must be meshed";
  auto conns = ztunnelAdmin("node1", "/connections");
  ASSERT_TRUE(conns);
  bool hbone = false;
  for (auto& c : *conns) {
    if (c.value("dst", "") == fmt::format("{}:{}", kMeshServerIp, kStreamPort) &&
        c.value("path", "") == "hbone") {
      hbone = true;
    }
  }
  EXPECT_TRUE(hbone) << "node1 /connections has no hbone connection to the stream port: "
                     << conns->dump();

  std::vector<std::string> serials;
  std::string s0 = certificateOf("node2", kMeshIdentity).value("serial", "");
  ASSERT_FALSE(s0.empty()) << "node2 has no certificate for " << kMeshIdentity;
  serials.push_back(s0);
  int line = 1;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(8 * kCertTtlSeconds);
  while (serials.size() < 4 && std::chrono::steady_clock::now() < deadline) {
    ASSERT_TRUE(roundTrip(socat, fmt::format("line-{}", line++)))
        << "after " << serials.size() - 1 << " rotation(s)";
    std::string s = certificateOf("node2", kMeshIdentity).value("serial", "");
    if (!s.empty() && s != serials.back()) serials.push_back(s);
    std::this_thread::sleep_for(500ms);
  }
  ASSERT_GE(serials.size(), 4u) << "node2's certificate rotated only " << serials.size() - 1
                                << " time(s) in " << 8 * kCertTtlSeconds << " s";
  std::printf("rotation: %d lines exchanged while node2's serial went %s\n", line,
              fmt::format("{}", fmt::join(serials, " -> ")).c_str());
  EXPECT_TRUE(roundTrip(socat, "after-rotations"));
  std::string out;
  socat.closeStdin();
  auto code = socat.wait(15s, &out);
  EXPECT_TRUE(code && *code == 0) << "socat did not end cleanly: " << out;

  // The serial moves every ~2 s: start right after a renewal, and retry while it changed
  // between our two looks.
  bool matched = false;
  std::string last;
  for (int i = 0; i < 5 && !matched; ++i) {
    ASSERT_FALSE(waitForNextSerial("node2", kMeshIdentity).empty())
        << "node2's certificate did not renew";
    ServedProbe p = probeServedCertificate();
    ASSERT_TRUE(p.error.empty()) << p.error;
    last = fmt::format("attempt {}: served {} while node2 reported {} before and {} after",
                       i + 1, p.served, p.before, p.after);
    if (p.before != p.after) continue;
    EXPECT_TRUE(sameSerial(p.served, p.before)) << last;
    matched = true;
  }
  EXPECT_TRUE(matched) << "node2's serial changed during every attempt: " << last;
  std::printf("new TLS connection: %s\n", last.c_str());
}

// With node1's agent stopped until the client's certificate expired, a new meshed connection is
// held (not refused) and completes once the agent answers.
TEST_F(MtlsE2E, ConnectionWaitsForCertificateWhileAgentIsStopped) {
  auto pid = cluster_->agentPid("node1");
  ASSERT_TRUE(pid) << "no nodes[node1].agent.pid in scripts/sim status --json";
  double waits0 = metric("node1", kCertWaits);
  double timeouts0 = metric("node1", kCertWaitTimeouts);
  StoppedAgent agent(*pid);
  ASSERT_TRUE(agent.stop()) << "SIGSTOP " << *pid << ": " << strerror(errno);
  auto stoppedAt = std::chrono::steady_clock::now();
  Json cert;
  ASSERT_TRUE(eventually(
      [&] {
        cert = certificateOf("node1", kMeshIdentity);
        return cert.value("state", "") == "expired";
      },
      std::chrono::seconds(2 * kCertTtlSeconds), 100ms))
      << "node1's certificate for " << kMeshIdentity << " not expired: " << cert.dump();

  Child client;
  ASSERT_TRUE(client.start(cluster_->execArgv(
      kMeshClient, {echoClientPath(), "--target", fmt::format("{}:{}", kMeshServerIp, kHashPort),
                    "--count", "1", "--max-bytes", "4096", "--seed", "5", "--timeout-s", "30"})));
  std::this_thread::sleep_for(1s);
  std::string out;
  EXPECT_FALSE(client.wait(1ms, &out).has_value())
      << "the connection ended while no certificate existed: " << out;
  auto conns = ztunnelAdmin("node1", "/connections");
  bool held = false;
  if (conns) {
    for (auto& c : *conns) {
      if (c.value("dst", "") == fmt::format("{}:{}", kMeshServerIp, kHashPort)) held = true;
    }
  }
  EXPECT_TRUE(held) << "node1's ztunnel does not hold the connection: "
                    << (conns ? conns->dump() : "?");
  agent.resume();
  auto stoppedFor = std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::steady_clock::now() - stoppedAt);
  auto code = client.wait(30s, &out);
  ASSERT_TRUE(code.has_value()) << "the held connection did not finish: " << out;
  auto j = Json::parse(out.substr(std::min(out.find('{'), out.size())), nullptr, false);
  EXPECT_EQ(*code, 0) << out;
  ASSERT_FALSE(j.is_discarded()) << out;
  EXPECT_EQ(j.value("ok", -1), 1) << out;
  EXPECT_EQ(j.value("failures", -1), 0) << out;
  EXPECT_GE(metric("node1", kCertWaits), waits0 + 1);
  EXPECT_EQ(metric("node1", kCertWaitTimeouts), timeouts0);
  std::printf("agent stopped for %lld ms; held connection: %s; certificate now: %s\n",
              static_cast<long long>(stoppedFor.count()), j.dump().c_str(),
              certificateOf("node1", kMeshIdentity).dump().c_str());
}

// STRICT for the server's namespace: plaintext inbound is reset and counted, meshed callers
// still get through; removing the policy lets plaintext in again.
TEST_F(MtlsE2E, StrictPeerAuthenticationRefusesPlaintextOnly) {
  const std::string file = "peer-authentication-mesh.yaml";
  struct Remove {
    std::string f;
    ~Remove() {
      if (cluster_) cluster_->removeLiveManifest(f);
    }
  } remove{file};
  std::string target = fmt::format("{}:{}", kMeshServerIp, kHashPort);
  auto plain0 = echo(kPlainClient, target, 1, 1024, 1, 20);
  ASSERT_EQ(plain0.value("ok", -1), 1) << "plaintext before STRICT: " << plain0.dump();

  double refused0 = metric("node2", kPlaintextRefused);
  const std::map<std::string, std::string> kStrictDenied = {
      {"result", "deny"}, {"action_policy", "PeerAuthentication"}};
  double strictVerdicts0 = metric("node2", kPolicyVerdicts, kStrictDenied);
  auto seq0 = ztunnelAdmin("node2", "/verdicts?limit=1");
  ASSERT_TRUE(seq0) << "node2 /verdicts";
  uint64_t since = seq0->value("last_seq", uint64_t{0});
  std::string err;
  ASSERT_TRUE(cluster_->writeLiveManifest(
      file,
      "apiVersion: security.weft.dev/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n"
      "  namespace: mesh\nspec:\n  mtls:\n    mode: STRICT\n",
      &err))
      << err;
  auto t0 = std::chrono::steady_clock::now();
  int seed = 21;
  Json last;
  bool refused = eventually(
      [&] {
        last = echo(kPlainClient, target, 1, 1024, 1, seed++);
        return last.value("failures", -1) == 1;
      },
      5s, 100ms);
  ASSERT_TRUE(refused) << "plaintext still accepted 5 s after STRICT: " << last.dump();
  auto took = std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::steady_clock::now() - t0);
  EXPECT_NE(last.dump().find("reset"), std::string::npos) << "not a reset: " << last.dump();
  // Two more: every one is refused, and counted.
  for (int i = 0; i < 2; ++i) {
    auto j = echo(kPlainClient, target, 1, 1024, 1, 40 + i);
    EXPECT_EQ(j.value("failures", -1), 1) << j.dump();
    EXPECT_EQ(j.value("ok", -1), 0) << j.dump();
  }
  // Exactly the three refused attempts (the loop stopped at its first refusal).
  double refusedNow = metric("node2", kPlaintextRefused);
  EXPECT_EQ(refusedNow, refused0 + 3) << "plaintext_refused_total";
  // Each refusal is a verdict like a policy's: in /verdicts (and so in weftctl monitor) with
  // the reason, and counted under action_policy="PeerAuthentication".
  EXPECT_EQ(metric("node2", kPolicyVerdicts, kStrictDenied), strictVerdicts0 + 3);
  auto events = ztunnelAdmin("node2", fmt::format("/verdicts?since={}", since));
  ASSERT_TRUE(events) << "node2 /verdicts";
  int strictEvents = 0;
  for (const Json& e : events->value("verdicts", Json::array())) {
    if (e.value("reason", "") != "strict_mtls") continue;
    ++strictEvents;
    EXPECT_EQ(e.value("result", ""), "deny") << e.dump();
    EXPECT_EQ(e.value("path", ""), "plaintext") << e.dump();
    EXPECT_EQ(e.value("decided_by", ""), "PeerAuthentication STRICT") << e.dump();
    EXPECT_TRUE(e["policy"].is_null()) << e.dump();
    EXPECT_EQ(e["destination"].value("ip", ""), kMeshServerIp) << e.dump();
    EXPECT_EQ(e["destination"].value("port", 0), kHashPort) << e.dump();
    EXPECT_TRUE(e["source"]["principal"].is_null()) << e.dump();
  }
  EXPECT_EQ(strictEvents, 3) << events->dump();

  double mtls0 = metric("node1", kOpened,
                        {{"reporter", "source"}, {"connection_security_policy", "mutual_tls"}});
  auto meshed = echo(kMeshClient, target, 3, 4096, 1, 50);
  EXPECT_EQ(meshed.value("ok", -1), 3) << "meshed under STRICT: " << meshed.dump();
  EXPECT_EQ(metric("node1", kOpened,
                   {{"reporter", "source"}, {"connection_security_policy", "mutual_tls"}}),
            mtls0 + 3);
  EXPECT_EQ(metric("node2", kPlaintextRefused), refusedNow) << "a meshed connection was refused";

  ASSERT_TRUE(cluster_->removeLiveManifest(file));
  bool open = eventually(
      [&] {
        last = echo(kPlainClient, target, 1, 1024, 1, seed++);
        return last.value("ok", -1) == 1;
      },
      5s, 100ms);
  EXPECT_TRUE(open) << "plaintext still refused 5 s after removing STRICT: " << last.dump();
  auto after = echo(kPlainClient, target, 3, 4096, 1, 60);
  EXPECT_EQ(after.value("ok", -1), 3) << after.dump();
  std::printf("STRICT took effect after %lld ms; plaintext_refused_total %+.0f\n",
              static_cast<long long>(took.count()), refusedNow - refused0);
}

}  // namespace
}  // namespace weft::e2e
