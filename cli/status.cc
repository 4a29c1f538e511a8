// weftctl status: agent and ztunnel up, versions, kernel features, enrolled pods, certificate
// health — from the agent's /status and the ztunnel's /config_dump.
#include <fmt/format.h>

#include <ostream>

#include "cli/command.h"
#include "cli/objects.h"
#include "cli/table.h"

namespace weft::cli {

using nlohmann::json;

std::optional<time_t> parseIsoTime(const std::string& s) {
  struct tm tm {};
  const char* end = strptime(s.c_str(), "%Y-%m-%dT%H:%M:%S", &tm);
  if (end == nullptr) return std::nullopt;
  return timegm(&tm);
}

json certificateHealth(const json& certs, time_t now) {
  int valid = 0, expiring = 0, expired = 0, pending = 0;
  for (const json& c : certs) {
    std::string state = c.value("state", "");
    auto t = [&](const char* k) -> std::optional<time_t> {
      return c.contains(k) && c[k].is_string() ? parseIsoTime(c[k].get<std::string>())
                                               : std::nullopt;
    };
    auto not_after = t("not_after"), renew_at = t("renew_at");
    if (state == "pending" || !not_after) {
      pending++;
    } else if (state == "expired" || now >= *not_after) {
      expired++;
    } else if (state == "renewing" || (renew_at && now >= *renew_at)) {
      expiring++;
    } else {
      valid++;
    }
  }
  return {{"total", certs.size()}, {"valid", valid}, {"expiring", expiring},
          {"expired", expired},    {"pending", pending}};
}

std::string renderStatus(const json& s) {
  Table t({"COMPONENT", "STATE", "DETAILS"});
  const json& a = s["agent"];
  t.add({"agent", "up",
         fmt::format("node {}, version {}, socket {}, dataplane {}", cellOf(a, "node"),
                     cellOf(a, "version"), cellOf(a, "socket"),
                     a.value("dataplane_adopted", false) ? "adopted from pins" : "loaded")});
  const json& z = s["ztunnel"];
  t.add({"ztunnel", z.value("ready", false) ? "ready" : "not ready",
         fmt::format("version {}, admin {}, agent connection {}", cellOf(z, "version"),
                     cellOf(z, "admin"), z.value("agent_connected", false) ? "up" : "DOWN")});
  const json& k = s["kernel"];
  std::string feats = "-";
  if (k.is_object() && k.contains("features")) {
    feats.clear();
    // [{name, available, used_for, detail}] as the agent probed them.
    for (const json& f : k["features"]) {
      if (!f.is_object()) continue;
      feats += (feats.empty() ? "" : " ") + f.value("name", std::string("?")) +
               (f.value("available", false) ? "" : "(MISSING)");
    }
  }
  t.add({"kernel", k.is_object() && k.contains("missing") && k["missing"].empty() ? "ok" : "check",
         fmt::format("{}: {}", cellOf(k, "release"), feats)});
  const json& p = s["pods"];
  t.add({"pods", "-",
         fmt::format("{} enrolled of {} local ({} with a netns); {} pods in the cluster",
                     cellOf(p, "enrolled"), cellOf(p, "local"), cellOf(p, "with_netns"),
                     cellOf(p, "cluster"))});
  const json& c = s["certificates"];
  t.add({"certificates",
         c.value("expired", 0) > 0 ? "EXPIRED" : c.value("expiring", 0) > 0 ? "renewing" : "ok",
         fmt::format("{} valid, {} expiring (in the renew window), {} expired, {} pending",
                     cellOf(c, "valid"), cellOf(c, "expiring"), cellOf(c, "expired"),
                     cellOf(c, "pending"))});
  if (s.contains("fast_path") && s["fast_path"].is_object()) {
    // Same-node connections app to app in the kernel; fallbacks = the kernel refused and the
    // connection took the ztunnel path.
    const json& f = s["fast_path"];
    std::string state = f.value("state", std::string("?"));
    std::string reason = f.value("reason", std::string());
    const json& kernel = f.value("kernel", json::object());
    t.add({"fast path", state == "on" && f.value("fallbacks", 0) > 0 ? "fallbacks" : state,
           fmt::format("{}{} cached verdicts, {} open, {} connections, {} connect failures, {} "
                       "fallbacks to the ztunnel path (no socket storage {}, no 4-tuple entry {}, "
                       "verdict cache refused {}), {} events lost",
                       reason.empty() ? "" : reason + "; ", cellOf(f, "cached_verdicts"),
                       cellOf(f, "active_connections"), cellOf(f, "connections"),
                       cellOf(f, "connect_failures"), cellOf(f, "fallbacks"),
                       cellOf(kernel, "no_storage"), cellOf(kernel, "no_conn_entry"),
                       cellOf(f, "cache_failures"), cellOf(kernel, "events_lost"))});
  }
  if (s.contains("local_hop") && s["local_hop"].is_object()) {
    // App <-> ztunnel hops inside pods, sk_msg-redirected instead of loopback TCP.
    const json& h = s["local_hop"];
    const json& c = h.value("counters", json::object());
    std::string state = h.contains("error")     ? "error"
                        : h.value("enabled", false) ? "on"
                                                    : "off";
    t.add({"local hop", state,
           h.contains("error")
               ? h.value("error", std::string())
               : fmt::format("{} sockets accelerated, {} messages / {} bytes redirected, {} sent "
                             "over TCP (peer not in the map or full; {} moved for a full peer), "
                             "{} map refusals, {} no storage",
                             cellOf(c, "sockets"), cellOf(c, "redirected_msgs"),
                             cellOf(c, "redirected_bytes"), cellOf(c, "tcp_msgs"),
                             cellOf(c, "peer_full"), cellOf(c, "add_failed"),
                             cellOf(c, "no_storage"))});
  }
  t.add({"config", s.value("config_errors", 0) > 0 ? "errors" : "ok",
         fmt::format("{} manifest errors", cellOf(s, "config_errors"))});
  return t.render();
}

namespace {

int runStatus(Context& ctx, const std::vector<std::string>& args) {
  if (!args.empty()) return ctx.fail("status takes no arguments");
  auto a = ctx.agentGet("/status");
  if (!a) return ctx.fail(a.status());
  auto z = ctx.ztunnelGet("/config_dump");
  if (!z) return ctx.fail(z.status());
  const json& as = a.value();
  const json& zd = z.value();
  json zt = as.value("ztunnel", json::object());
  json counts = as.value("counts", json::object());
  json out = {
      {"agent",
       {{"up", true}, {"socket", ctx.options().agent_socket}, {"node", as.value("node", "")},
        {"version", as.value("version", "")},
        {"dataplane_adopted", as.value("dataplane_adopted", false)},
        {"bpf_pin_dir", as.value("bpf_pin_dir", "")},
        {"ztunnel_connected", zt.value("connected", false)}}},
      {"ztunnel",
       {{"up", true}, {"admin", ctx.options().ztunnel}, {"version", zt.value("version", "")},
        {"ready", zd.value("ready", false)}, {"draining", zd.value("draining", false)},
        {"agent_connected", zd.value("agent_connected", false)}}},
      {"kernel", as.contains("kernel") ? as["kernel"] : json(nullptr)},
      {"pods",
       {{"enrolled", counts.value("enrolled", 0)}, {"local", counts.value("local_pods", 0)},
        {"with_netns", counts.value("pods_with_netns", 0)},
        {"cluster", counts.value("pods", 0)}}},
      {"certificates",
       certificateHealth(zd.value("certificates", json::array()), ::time(nullptr))},
      {"config_errors", as.value("config_errors", 0)},
      {"fast_path", zd.contains("fast_path") ? zd["fast_path"] : json(nullptr)},
      {"local_hop", as.contains("local_hop") ? as["local_hop"] : json(nullptr)},
  };
  if (ctx.json()) {
    ctx.printJson(out);
  } else {
    ctx.out() << renderStatus(out);
  }
  return 0;
}

}  // namespace

Command statusCommand() {
  return Command{"status", "status",
                 "agent and ztunnel up, versions, kernel features, enrolled pods, certificates",
                 runStatus, {}, ""};
}

}  // namespace weft::cli
