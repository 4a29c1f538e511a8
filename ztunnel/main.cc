// weft-ztunnel: command line, logging, signals (SIGTERM/SIGINT drain, SIGHUP reopens the access
// log), and the event loop.
#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>
#include <uv.h>

#include <malloc.h>
#include <sys/resource.h>

#include <cerrno>
#include <csignal>
#include <cstring>

#include "common/log.h"
#include "common/uv_handle.h"
#include "weft/version.h"
#include "ztunnel/ztunnel.h"

namespace {

std::optional<weft::SocketAddress> parseAddr(const std::string& flag, const std::string& text) {
  if (text.empty() || text == "off") return std::nullopt;
  auto a = weft::SocketAddress::parse(text);
  if (!a) {
    fprintf(stderr, "%s: '%s' is not IP:port or [IPv6]:port\n", flag.c_str(), text.c_str());
    exit(2);
  }
  return a;
}

}  // namespace

// Memory behaviour of the process (ARCHITECTURE "ztunnel memory"): fixed malloc thresholds, so
// the per-connection buffers neither go through mmap/munmap nor make free() shrink the heap
// only for the next connection to grow it again (brk + page faults were ~8% of a ztunnel's CPU
// under a connection-per-request load); what stays free goes back to the kernel through the
// Ztunnel's idle trim (ztunnel/memory_trim.h). The thread pool serves only the access log's one
// write in flight.
void tuneMemory() {
  mallopt(M_ARENA_MAX, 1);                  // per loop thread; main() sets it from --loops
  mallopt(M_MMAP_THRESHOLD, 1 << 20);       // relay/TLS/DNS buffers come from the heap
  mallopt(M_TRIM_THRESHOLD, 4 << 20);       // free() never trims under load; the timer does
  setenv("UV_THREADPOOL_SIZE", "1", 0);     // each pool thread's stack is resident
}

int main(int argc, char** argv) {
  tuneMemory();
  CLI::App app{"weft-ztunnel: the node's shared mesh proxy"};
  app.footer("Signals: SIGTERM/SIGINT drain open connections (--drain-timeout) and exit; SIGHUP "
             "reopens the --access-log file (after log rotation; a renamed or deleted file is "
             "also noticed within a second when the next lines are written).");
  std::string agent_socket, admin = "127.0.0.1:15000", metrics = "0.0.0.0:15020",
                            readiness = "0.0.0.0:15021", log_level = "info";
  bool log_json = false;
  std::string access_log = "off", access_log_format = "text";
  double drain_timeout = 5.0;
  double cert_wait = 5.0;
  app.add_option("--agent-socket", agent_socket, "the agent's node-protocol socket")->required();
  app.add_option("--admin-addr", admin, "admin HTTP (config_dump, connections, stats); off")
      ->capture_default_str();
  app.add_option("--metrics-addr", metrics, "Prometheus /metrics; off")->capture_default_str();
  app.add_option("--readiness-addr", readiness, "GET /healthz/ready; off")->capture_default_str();
  app.add_option("--drain-timeout", drain_timeout, "seconds open connections get on SIGTERM")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 3600.0));
  app.add_option("--cert-wait", cert_wait,
                 "seconds a new connection waits for its workload's first certificate")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 300.0));
  app.add_option("--log-level", log_level, "trace|debug|info|warn|error")->capture_default_str();
  app.add_flag("--log-json", log_json, "log JSON lines");
  app.add_option("--access-log", access_log,
                 "one line per connection when it ends: off, stderr or a file (appended; "
                 "reopened when rotated away and on SIGHUP)")
      ->capture_default_str();
  app.add_option("--access-log-format", access_log_format, "text|json")
      ->capture_default_str()
      ->check(CLI::IsMember({"text", "json"}));
  std::string fast_path = "on";
  app.add_option("--fast-path", fast_path,
                 "same-node connections app to app in the kernel once policy allowed them: on|off")
      ->capture_default_str()
      ->check(CLI::IsMember({"on", "off"}));
  unsigned loops = weft::ztunnel::defaultLoopCount();
  app.add_option("--loops", loops,
                 "event loops serving connections, each a thread with its own listeners "
                 "(default: the CPUs this process may run on)")
      ->capture_default_str()
      ->check(CLI::Range(1u, weft::ztunnel::kMaxLoops));
  double buffer_idle = 10.0;
  app.add_option("--buffer-idle", buffer_idle,
                 "seconds a loop's HBONE buffer pools may go unused before they are freed and "
                 "free heap is given back to the kernel (0: pools are never freed)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 3600.0));
  app.set_version_flag("--version", WEFT_VERSION);
  CLI11_PARSE(app, argc, argv);

  weft::initLogging("ztunnel", log_level, log_json);
  // One malloc arena per loop thread: a shared one would be a lock every connection takes.
  mallopt(M_ARENA_MAX, static_cast<int>(loops));
  // Writes to a reset peer must come back as EPIPE errors, not kill the process.
  signal(SIGPIPE, SIG_IGN);
  // Every proxied connection holds two descriptors (more with DNS and HBONE): the usual soft
  // limit of 1024 would cap the node at ~500 connections. Raise it to the hard limit.
  struct rlimit nofile {};
  if (getrlimit(RLIMIT_NOFILE, &nofile) != 0) {
    spdlog::warn("getrlimit(RLIMIT_NOFILE): {}", strerror(errno));
  } else if (nofile.rlim_cur < nofile.rlim_max) {
    rlim_t before = nofile.rlim_cur;
    nofile.rlim_cur = nofile.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &nofile) != 0)
      spdlog::warn("setrlimit(RLIMIT_NOFILE, {}): {}", nofile.rlim_max, strerror(errno));
    else
      spdlog::info("open-file limit raised from {} to {}", before, nofile.rlim_max);
  }

  weft::ztunnel::ZtunnelOptions opts;
  opts.agent_socket = agent_socket;
  opts.admin_addr = parseAddr("--admin-addr", admin);
  opts.metrics_addr = parseAddr("--metrics-addr", metrics);
  opts.readiness_addr = parseAddr("--readiness-addr", readiness);
  opts.drain_timeout_ms = static_cast<uint64_t>(drain_timeout * 1000);
  opts.cert_wait_ms = static_cast<uint64_t>(cert_wait * 1000);
  opts.access_log.sink = access_log;
  opts.fast_path = fast_path == "on";
  opts.loops = loops;
  opts.memory_trim.pool_idle = std::chrono::milliseconds(static_cast<int64_t>(buffer_idle * 1000));
  opts.access_log.format = *weft::ztunnel::parseAccessLogFormat(access_log_format);

  uv_loop_t* loop = uv_default_loop();
  int exit_code = 0;
  {
    weft::ztunnel::Ztunnel zt(loop, opts);
    weft::Status st = zt.start();
    if (!st) {
      spdlog::error("{}", st.message());
      zt.shutdown();
      uv_run(loop, UV_RUN_DEFAULT);
      return 1;
    }
    spdlog::info("weft-ztunnel {} started; agent socket {}", WEFT_VERSION, agent_socket);

    struct Signals {
      weft::UvHandle<uv_signal_t> term, intr, hup;
      weft::ztunnel::Ztunnel* zt;
    } sig;
    sig.zt = &zt;
    auto on_signal = [](uv_signal_t* h, int signum) {
      auto* s = static_cast<Signals*>(h->data);
      spdlog::info("signal {}: draining", signum);
      s->zt->drain([s] {
        s->term.close();
        s->intr.close();
        s->hup.close();
        // libuv restored SIGHUP's default (terminate): a late one (logrotate racing the
        // shutdown) must not kill the process before the access log's last lines are out.
        signal(SIGHUP, SIG_IGN);
        s->zt->shutdown();  // the loop ends once every handle closed
      });
    };
    // SIGHUP: reopen the access log at once (logrotate's postrotate, like nginx's reopen).
    auto on_hup = [](uv_signal_t* h, int) {
      auto* s = static_cast<Signals*>(h->data);
      weft::ztunnel::AccessLog* log = s->zt->accessLog();
      spdlog::info("SIGHUP: reopening the access log {}", log ? log->sink() : "(off)");
      if (log) log->reopen();
    };
    for (auto* h : {&sig.term, &sig.intr, &sig.hup}) {
      if (h->init(uv_signal_init(loop, h->get())) != 0) return 1;
      h->get()->data = &sig;
    }
    if (uv_signal_start(sig.term.get(), on_signal, SIGTERM) != 0 ||
        uv_signal_start(sig.intr.get(), on_signal, SIGINT) != 0 ||
        uv_signal_start(sig.hup.get(), on_hup, SIGHUP) != 0) {
      spdlog::error("cannot install signal handlers");
      return 1;
    }
    uv_run(loop, UV_RUN_DEFAULT);
    // Close callbacks of whatever the drain cut.
    uv_run(loop, UV_RUN_DEFAULT);
  }
  uv_run(loop, UV_RUN_DEFAULT);
  int rc = uv_loop_close(loop);
  if (rc != 0) spdlog::warn("loop close: {}", uv_strerror(rc));
  spdlog::info("exiting");
  return exit_code;
}
