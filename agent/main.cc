// weft-agent: one per node. Loads (or adopts) the BPF dataplane, watches the cluster state,
// enrolls local pods, and serves the ztunnel, the CNI plugin and the admin API on one loop.
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>

#include <CLI/CLI.hpp>
#include <fmt/ranges.h>

#include <cerrno>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "agent/admin.h"
#include "agent/bpf/kernel_features.h"
#include "agent/ca.h"
#include "agent/bpf/dataplane.h"
#include "agent/cni_server.h"
#include "agent/enrollment.h"
#include "agent/kube/kube_source.h"
#include "agent/manifests.h"
#include "agent/node_server.h"
#include "agent/pod_store.h"
#include "common/http_admin.h"
#include "common/log.h"
#include "common/uv_handle.h"
#include "weft/version.h"

namespace {

using namespace weft;
using namespace weft::agent;

constexpr const char* kFallbackCgroupRoot = "/run/weft/cgroupv2";

// The host's cgroup v2 mount from /proc/mounts; if there is none, mount one of our own.
Result<std::string> defaultCgroupRoot() {
  std::ifstream mounts("/proc/mounts");
  std::string line;
  while (std::getline(mounts, line)) {
    std::istringstream fields(line);
    std::string dev, dir, type;
    fields >> dev >> dir >> type;
    if (type == "cgroup2") return dir;
  }
  std::error_code ec;
  std::filesystem::create_directories(kFallbackCgroupRoot, ec);
  if (ec) return Status::errorf("mkdir {}: {}", kFallbackCgroupRoot, ec.message());
  if (::mount("none", kFallbackCgroupRoot, "cgroup2", 0, nullptr) != 0)
    return Status::errorf("no cgroup2 mount found and mounting one at {} failed: {}",
                          kFallbackCgroupRoot, errnoText(errno));
  spdlog::info("mounted cgroup2 at {}", kFallbackCgroupRoot);
  return std::string(kFallbackCgroupRoot);
}

struct Flags {
  std::string node;
  std::string source = "manifests";  // or "kubernetes"
  std::string manifests;
  std::string kube_api_server;  // default https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT
  std::string kube_token_file;
  std::string kube_ca_file;
  bool kube_remote_pods = true;
  uint64_t kube_sync_timeout_s = 120;
  std::string cgroup_root;
  std::string bpf_pin_dir;
  std::string ztunnel_socket = "/var/run/weft/ztunnel.sock";
  std::string cni_socket = "/var/run/weft/cni.sock";
  std::string admin_socket = "/var/run/weft/agent.sock";
  std::string state_dir = "/var/run/weft/state";
  std::vector<std::string> probe_sources;
  std::string log_level = "info";
  bool log_json = false;
  bool cleanup = false;
  uint64_t cni_add_timeout_s = 30;
  std::string ca_dir;  // default <state-dir>/ca
  std::string ca_cert;
  std::string ca_key;
  std::string ca_chain;
  uint64_t cert_ttl_s = 24 * 3600;
  uint64_t ca_reload_interval_ms = 2000;
  // Local-hop acceleration (sk_msg redirect of the app <-> ztunnel hops in each pod); off by
  // default: measured no faster and it removes the hop's backpressure (docs/ARCHITECTURE.md).
  std::string local_hop_accel = "off";
};

// Answers a ztunnel's CertificateRequest: parse the identity, allow only identities of enrolled
// pods on this node, then sign.
nodepb::CertificateResponse answerCertificateRequest(CertificateAuthority& ca,
                                                     const EnrollmentController& enrollment,
                                                     const nodepb::CertificateRequest& req) {
  nodepb::CertificateResponse resp;
  auto id = tls::Identity::parse(req.identity());
  if (!id) {
    resp.set_error(id.status().message());
    return resp;
  }
  Status allowed = authorizeIdentity(enrollment.model(), enrollment.localPods(), ca.trustDomain(),
                                     id.value());
  if (!allowed) {
    ca.countRefused();
    resp.set_error(allowed.message());
    return resp;
  }
  auto issued = ca.sign(req.csr_pem(), id.value());
  if (!issued) {
    resp.set_error(issued.status().message());
    return resp;
  }
  spdlog::info("issued certificate {} for {} (until {})", issued->serial, id->toString(),
               std::chrono::system_clock::to_time_t(issued->not_after));
  resp.set_cert_chain_pem(issued->leaf_pem + issued->chain_pem);
  resp.set_roots_pem(issued->roots_pem);
  return resp;
}

int run(const Flags& flags) {
  auto cgroup_root = flags.cgroup_root.empty() ? defaultCgroupRoot()
                                               : Result<std::string>(flags.cgroup_root);
  if (!cgroup_root) {
    spdlog::error("cgroup root: {}", cgroup_root.status().message());
    return 1;
  }
  const std::string pin_dir =
      flags.bpf_pin_dir.empty() ? "/sys/fs/bpf/weft/" + flags.node : flags.bpf_pin_dir;

  std::vector<IpAddr> probe_sources;
  for (const std::string& s : flags.probe_sources) {
    auto ip = IpAddr::parse(s);
    if (!ip) {
      spdlog::error("--probe-source: \"{}\" is not an IP address", s);
      return 2;
    }
    probe_sources.push_back(*ip);
  }

  DataplaneOptions dp_opts;
  dp_opts.pin_dir = pin_dir;
  dp_opts.cgroup_root = cgroup_root.value();
  dp_opts.local_hop_accel = flags.local_hop_accel == "on";
  auto dataplane = Dataplane::open(dp_opts);
  if (!dataplane) {
    spdlog::error("dataplane: {}", dataplane.status().message());
    return 1;
  }
  if (flags.cleanup) {
    Status s = dataplane.value()->destroy();
    if (!s) {
      spdlog::error("cleanup: {}", s.message());
      return 1;
    }
    spdlog::info("cleanup: detached and unpinned everything under {}", pin_dir);
    return 0;
  }
  spdlog::info("dataplane {} (pins {}, cgroup root {})",
               dataplane.value()->info().adopted ? "adopted from pins" : "loaded", pin_dir,
               cgroup_root.value());
  // What the kernel offers, once, for /status (after the load: a failing probe explains a
  // failing load only when the load got that far, which the error above already names).
  const KernelFeatures kernel_features = probeKernelFeatures(cgroup_root.value(), pin_dir);
  if (auto missing = kernel_features.missing(); !missing.empty())
    spdlog::warn("kernel {}: missing {}", kernel_features.kernel_release, fmt::join(missing, ", "));
  if (Status s = dataplane.value()->setInboundBypass(probe_sources); !s) {
    spdlog::error("inbound bypass sources: {}", s.message());
    return 1;
  }

  uv_loop_t loop;
  if (int rc = uv_loop_init(&loop); rc != 0) {
    spdlog::error("uv_loop_init: {}", uv_strerror(rc));
    return 1;
  }
  int exit_code = 0;
  {
    // The cluster source: a manifest directory, or the Kubernetes API (its reflector threads
    // hand complete models to this loop; see agent/kube/kube_source.h).
    std::unique_ptr<ManifestSource> manifests;
    kube::KubeSourcePtr kube_source;
    if (flags.source == "kubernetes") {
      kube::KubeConfigFlags kf{flags.kube_api_server, flags.kube_token_file, flags.kube_ca_file};
      auto cfg = kube::loadKubeConfig(kf);
      if (!cfg) {
        spdlog::error("kubernetes source: {}", cfg.status().message());
        uv_loop_close(&loop);
        return 1;
      }
      kube::KubeSourceOptions ko;
      ko.config = cfg.value();
      ko.node_name = flags.node;
      ko.remote_pods = flags.kube_remote_pods;
      auto created = kube::KubeSource::create(&loop, ko);
      if (!created) {
        spdlog::error("kubernetes source: {}", created.status().message());
        uv_loop_close(&loop);
        return 1;
      }
      kube_source = std::move(created.value());
      kube_source->start();
      spdlog::info("kubernetes source: https://{}:{}, waiting for the first list of every "
                   "resource (at most {} s)", ko.config.host, ko.config.port,
                   flags.kube_sync_timeout_s);
      if (!kube_source->waitForSync(std::chrono::seconds(flags.kube_sync_timeout_s))) {
        spdlog::error("kubernetes source: not synced after {} s; exiting (enrollment must not "
                      "start from a partial cluster state)", flags.kube_sync_timeout_s);
        kube_source.reset();
        for (int i = 0; i < 100 && uv_run(&loop, UV_RUN_NOWAIT) != 0; i++) {
        }
        uv_loop_close(&loop);
        return 1;
      }
    } else {
      manifests = std::make_unique<ManifestSource>(flags.manifests);
      manifests->rescan();
      for (const auto& e : manifests->errors()) spdlog::warn("config error: {}", e);
    }
    auto currentModel = [&]() -> const ClusterModel& {
      return kube_source ? kube_source->model() : manifests->model();
    };

    PodStore store(flags.state_dir);
    if (Status s = store.load(); !s)
      spdlog::error("{} (starting without pod records; CNI ADDs rebuild them)", s.message());

    EnrollmentOptions en_opts;
    en_opts.node_name = flags.node;
    en_opts.bpf_pin_dir = pin_dir;
    en_opts.cni_add_timeout_ms = flags.cni_add_timeout_s * 1000;
    EnrollmentController enrollment(&loop, en_opts, dataplane.value().get(), &store);
    std::unique_ptr<ManifestWatcher> watcher;
    if (kube_source) {
      kube_source->setOnChange([&] { enrollment.setModel(kube_source->model()); });
      // A CNI ADD for a pod not seen yet simply waits: the watch delivers it.
    } else {
      watcher = std::make_unique<ManifestWatcher>(
          &loop, manifests.get(), [&] { enrollment.setModel(manifests->model()); });
      enrollment.setRescanHook([&] { watcher->rescanNow(); });
    }
    enrollment.start(currentModel());

    std::unique_ptr<CertificateAuthority> ca;
    NodeServerPtr node_server;
    CniServerPtr cni_server;
    HttpAdminServerPtr admin_server;
    UvHandle<uv_signal_t> sigterm, sigint;
    auto fail = [&](const Status& s) {
      spdlog::error("{}", s.message());
      exit_code = 1;
    };
    do {
      CaOptions ca_opts;
      ca_opts.trust_domain = en_opts.trust_domain;
      ca_opts.ca_dir = flags.ca_dir.empty() ? flags.state_dir + "/ca" : flags.ca_dir;
      ca_opts.ca_cert_file = flags.ca_cert;
      ca_opts.ca_key_file = flags.ca_key;
      ca_opts.ca_chain_file = flags.ca_chain;
      ca_opts.default_ttl = std::chrono::seconds(flags.cert_ttl_s);
      auto created = CertificateAuthority::create(ca_opts);
      if (!created) { fail(created.status().context("certificate authority")); break; }
      ca = std::move(created.value());
      if (Status s = ca->startWatching(&loop,
                                       std::chrono::milliseconds(flags.ca_reload_interval_ms));
          !s) {
        fail(s);
        break;
      }

      auto ns = NodeServer::listen(&loop, flags.ztunnel_socket, &enrollment);
      if (!ns) { fail(ns.status()); break; }
      node_server = std::move(ns.value());
      enrollment.setNodeServer(node_server.get());
      node_server->setCertificateSigner([&](const nodepb::CertificateRequest& req) {
        return answerCertificateRequest(*ca, enrollment, req);
      });

      auto cni = CniServer::listen(&loop, flags.cni_socket,
                                   [&](const CniRequest& r, CniReply reply) {
                                     enrollment.handleCni(r, std::move(reply));
                                   });
      if (!cni) { fail(cni.status()); break; }
      cni_server = std::move(cni.value());

      AdminSources sources;
      sources.node_name = flags.node;
      sources.enrollment = &enrollment;
      sources.manifests = manifests.get();  // null with the Kubernetes source
      sources.node_stats = [&] { return node_server->stats(); };
      bool adopted = dataplane.value()->info().adopted;
      sources.dataplane_adopted = [adopted] { return adopted; };
      Dataplane* dp = dataplane.value().get();
      sources.local_hop = [dp] { return dp->localHop(); };
      sources.cni_requests = [&] { return cni_server->requests(); };
      sources.bpf_pin_dir = pin_dir;
      sources.kernel_features = &kernel_features;
      sources.ca_stats = [&] { return ca->stats(); };
      auto admin = HttpAdminServer::listenUnix(
          &loop, flags.admin_socket,
          [sources](const HttpRequest& r) { return handleAdminRequest(sources, r); });
      if (!admin) { fail(admin.status().context("admin socket " + flags.admin_socket)); break; }
      admin_server = std::move(admin.value());

      if (watcher) {
        if (Status s = watcher->start(); !s) { fail(s); break; }
      }

      for (auto* sig : {&sigterm, &sigint}) {
        if (int rc = sig->init(uv_signal_init(&loop, sig->get())); rc != 0) {
          fail(Status::errorf("uv_signal_init: {}", uv_strerror(rc)));
          break;
        }
        sig->get()->data = &loop;
        uv_signal_start(
            sig->get(),
            [](uv_signal_t* h, int signum) {
              spdlog::info("signal {}: stopping (BPF pins and enrollment stay)", signum);
              uv_stop(static_cast<uv_loop_t*>(h->data));
            },
            sig == &sigterm ? SIGTERM : SIGINT);
      }
      if (exit_code != 0) break;
      spdlog::info("weft-agent {} on node {} ready", WEFT_VERSION, flags.node);
      uv_run(&loop, UV_RUN_DEFAULT);
    } while (false);

    // Orderly stop: answer waiting CNI requests, close servers; pins stay (they are meant to
    // outlive the agent, so pods keep their redirect while it is away).
    enrollment.shutdown();
    enrollment.setNodeServer(nullptr);
    admin_server.reset();
    cni_server.reset();
    node_server.reset();
    ca.reset();
    if (kube_source) kube_source->stop();
  }
  // Let close callbacks run; bounded so a stuck handle cannot hang the exit.
  for (int i = 0; i < 100 && uv_run(&loop, UV_RUN_NOWAIT) != 0; i++) {
  }
  if (uv_loop_close(&loop) != 0) spdlog::debug("loop still had handles at exit");
  spdlog::info("weft-agent stopped");
  return exit_code;
}

}  // namespace

int main(int argc, char** argv) {
  Flags flags;
  CLI::App app{"weft-agent: enrolls this node's pods into the Weft mesh"};
  app.add_option("--node", flags.node, "this node's name (matches Pod spec.nodeName)")
      ->required();
  app.add_option("--source", flags.source,
                 "where the cluster state comes from: manifests (--manifests DIR) or kubernetes "
                 "(the API server, in-cluster credentials)")
      ->check(CLI::IsMember({"manifests", "kubernetes"}))
      ->capture_default_str();
  app.add_option("--manifests", flags.manifests,
                 "directory of Namespace/Pod/Service YAML manifests (the cluster state)");
  app.add_option("--kube-api-server", flags.kube_api_server,
                 "https://HOST:PORT of the API server (default: https://"
                 "$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT)");
  app.add_option("--kube-token-file", flags.kube_token_file,
                 std::string("bearer token file, re-read on every connect (default ") +
                     kube::kDefaultTokenFile + ")");
  app.add_option("--kube-ca-file", flags.kube_ca_file,
                 std::string("CA bundle the API server is verified against (default ") +
                     kube::kDefaultCaFile + ")");
  app.add_option("--kube-remote-pods", flags.kube_remote_pods,
                 "also watch other nodes' pods (spec.nodeName!=<node>): the ztunnel needs them "
                 "to reach remote mesh workloads over HBONE")
      ->capture_default_str();
  app.add_option("--kube-sync-timeout", flags.kube_sync_timeout_s,
                 "seconds to wait at start for the first list of every resource")
      ->capture_default_str()
      ->check(CLI::Range(1, 3600));
  app.add_option("--cgroup-root", flags.cgroup_root,
                 "cgroup v2 directory the cgroup programs attach to (default: the host's "
                 "cgroup2 mount, or one mounted at /run/weft/cgroupv2)");
  app.add_option("--bpf-pin-dir", flags.bpf_pin_dir, "bpffs pin directory (default "
                                                     "/sys/fs/bpf/weft/<node>)");
  app.add_option("--ztunnel-socket", flags.ztunnel_socket, "node protocol socket")
      ->capture_default_str();
  app.add_option("--cni-socket", flags.cni_socket, "CNI plugin socket")->capture_default_str();
  app.add_option("--admin-socket", flags.admin_socket, "admin API (HTTP over unix)")
      ->capture_default_str();
  app.add_option("--state-dir", flags.state_dir, "where pods.json lives")->capture_default_str();
  app.add_option("--probe-source", flags.probe_sources,
                 "source IP never steered inbound (kubelet probes); repeatable");
  app.add_option("--cni-add-timeout", flags.cni_add_timeout_s,
                 "seconds a CNI ADD waits for enrollment")
      ->capture_default_str()
      ->check(CLI::Range(1, 600));
  app.add_option("--ca-dir", flags.ca_dir,
                 "embedded CA: where the generated root (ca-key.pem 0600, ca-cert.pem) is kept "
                 "(default <state-dir>/ca; give every node the same directory or files)");
  app.add_option("--ca-cert", flags.ca_cert,
                 "CA certificate file (root or intermediate) instead of the embedded root; "
                 "hot-reloaded when it changes");
  app.add_option("--ca-key", flags.ca_key, "private key of --ca-cert");
  app.add_option("--ca-chain", flags.ca_chain,
                 "certificates above --ca-cert up to the root (for an intermediate)");
  app.add_option("--cert-ttl", flags.cert_ttl_s, "workload certificate lifetime, seconds")
      ->capture_default_str()
      ->check(CLI::Range(uint64_t{2}, uint64_t{366} * 24 * 3600));
  app.add_option("--ca-reload-interval", flags.ca_reload_interval_ms,
                 "how often --ca-cert/--ca-key/--ca-chain are checked for changes, ms")
      ->capture_default_str()
      ->check(CLI::Range(uint64_t{100}, uint64_t{3600000}));
  app.add_option("--log-level", flags.log_level, "trace|debug|info|warn|error")
      ->capture_default_str();
  app.add_flag("--log-json", flags.log_json, "JSON log lines");
  app.add_option("--local-hop-accel", flags.local_hop_accel,
                 "on|off: app <-> ztunnel hops inside pods skip loopback TCP (sk_msg redirect)")
      ->capture_default_str()
      ->check(CLI::IsMember({"on", "off"}));
  app.add_flag("--cleanup", flags.cleanup,
               "detach and unpin everything of this instance, then exit");
  CLI11_PARSE(app, argc, argv);
  if (!flags.cleanup && flags.source == "manifests" && flags.manifests.empty()) {
    std::fprintf(stderr,
                 "--manifests is required (except with --cleanup or --source kubernetes)\n");
    return 2;
  }
  initLogging("agent", flags.log_level, flags.log_json);
  ::signal(SIGPIPE, SIG_IGN);
  return run(flags);
}
