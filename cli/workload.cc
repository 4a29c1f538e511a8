// weftctl workload list|show: the agent's /workloads (every pod of the cluster, with this node's
// enrollment facts), plus the ztunnel's listeners and certificate for `show`.
#include <fmt/format.h>

#include <ostream>

#include "cli/command.h"
#include "cli/lookup.h"
#include "cli/objects.h"
#include "cli/table.h"

namespace weft::cli {

using nlohmann::json;

std::string renderWorkloads(const json& workloads) {
  Table t({"WORKLOAD", "NODE", "IPS", "SERVICE ACCOUNT", "MESH", "ENROLLED", "MTLS",
           "NETNS COOKIE"});
  for (const json& w : workloads) {
    t.add({keyOf(w), cellOf(w, "node"), cellOf(w, "ips"), cellOf(w, "service_account"),
           cellOf(w, "mesh"), cellOf(w, "enrolled"), cellOf(w, "peer_authentication"),
           cellOf(w, "netns_cookie")});
  }
  return t.render();
}

namespace {

// Key: value lines for one object, nested objects flattened one level.
std::string renderFields(const json& j, const std::string& indent = "") {
  std::string out;
  for (const auto& [k, v] : j.items()) {
    if (v.is_object() && !v.empty()) {
      out += indent + k + ":\n" + renderFields(v, indent + "  ");
    } else if (v.is_array() && !v.empty() && v[0].is_object()) {
      out += indent + k + ":\n";
      for (const json& e : v) out += indent + "  - " + cell(e) + "\n";
    } else {
      out += fmt::format("{}{}: {}\n", indent, k, cell(v));
    }
  }
  return out;
}

int list(Context& ctx, const std::vector<std::string>& args) {
  if (!args.empty()) return ctx.fail("workload list takes no arguments");
  auto w = ctx.agentGet("/workloads");
  if (!w) return ctx.fail(w.status());
  if (ctx.json()) ctx.printJson(w.value());
  else ctx.out() << renderWorkloads(w.value());
  return 0;
}

int show(Context& ctx, const std::vector<std::string>& args) {
  if (args.size() != 1) return ctx.fail("usage: weftctl workload show [NAMESPACE/]NAME");
  auto all = ctx.agentGet("/workloads");
  if (!all) return ctx.fail(all.status());
  auto w = findByRef(all.value(), args[0], "workload");
  if (!w) return ctx.fail(w.status());
  json out = w.value();
  // What this node's ztunnel holds for it (only local pods have listeners and certificates).
  if (auto zd = ctx.ztunnelGet("/config_dump")) {
    std::string uid = out.value("uid", "");
    out["ztunnel_listeners"] = nullptr;
    for (const json& l : zd->value("local_workloads", json::array()))
      if (l.value("uid", "") == uid) out["ztunnel_listeners"] = l;
    std::string id = fmt::format("/ns/{}/sa/{}", out.value("namespace", ""),
                                 out.value("service_account", "default"));
    out["certificate"] = nullptr;
    for (const json& c : zd->value("certificates", json::array())) {
      std::string ident = c.value("identity", "");
      if (ident.size() >= id.size() && ident.compare(ident.size() - id.size(), id.size(), id) == 0)
        out["certificate"] = {{"identity", ident}, {"state", c.value("state", "")},
                              {"serial", c.value("serial", "")},
                              {"not_after", c.value("not_after", json())}};
    }
  } else {
    out["ztunnel"] = "unreachable: " + zd.status().message();
  }
  if (ctx.json()) ctx.printJson(out);
  else ctx.out() << renderFields(out);
  return 0;
}

}  // namespace

std::string renderObjectFields(const json& j) { return renderFields(j); }

Command workloadCommand() {
  Command c{"workload", "workload { list | show NAME }", "pods of the cluster as the agent sees them",
            nullptr, {}, "list"};
  c.children.push_back({"list", "list", "every pod: node, IPs, mesh, enrollment, mTLS mode", list,
                        {}, ""});
  c.children.push_back({"show", "show [NS/]NAME",
                        "one pod, with the ztunnel's listeners and certificate", show, {}, ""});
  return c;
}

}  // namespace weft::cli
