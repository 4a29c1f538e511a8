// weftctl policy list|show: AuthorizationPolicies and PeerAuthentications from the agent, and
// for `show` the rules as the ztunnel holds them.
#include <fmt/format.h>

#include <ostream>

#include "cli/command.h"
#include "cli/lookup.h"
#include "cli/objects.h"
#include "cli/table.h"

namespace weft::cli {

using nlohmann::json;

namespace {

// Both kinds in one list, each tagged with its kind.
Result<json> allPolicies(Context& ctx) {
  auto aps = ctx.agentGet("/authorization-policies");
  if (!aps) return aps.status();
  auto pas = ctx.agentGet("/peer-authentications");
  if (!pas) return pas.status();
  json out = json::array();
  for (json p : aps.value()) {
    p["kind"] = "AuthorizationPolicy";
    out.push_back(std::move(p));
  }
  for (json p : pas.value()) {
    p["kind"] = "PeerAuthentication";
    out.push_back(std::move(p));
  }
  return out;
}

int list(Context& ctx, const std::vector<std::string>& args) {
  if (!args.empty()) return ctx.fail("policy list takes no arguments");
  auto all = allPolicies(ctx);
  if (!all) return ctx.fail(all.status());
  if (ctx.json()) {
    ctx.printJson(all.value());
    return 0;
  }
  Table t({"KIND", "POLICY", "ACTION/MODE", "SCOPE", "SELECTOR", "RULES", "DRY-RUN", "WARNINGS"});
  for (const json& p : all.value()) {
    bool ap = p["kind"] == "AuthorizationPolicy";
    t.add({p["kind"].get<std::string>(), keyOf(p), ap ? cellOf(p, "action") : cellOf(p, "mode"),
           cellOf(p, "scope"), ap ? cellOf(p, "selector") : "-", ap ? cellOf(p, "rules") : "-",
           ap ? cellOf(p, "dry_run") : "-",
           ap && p.contains("status") ? std::to_string(p["status"].value("warnings", json::array())
                                                           .size())
                                      : "-"});
  }
  ctx.out() << t.render();
  return 0;
}

int show(Context& ctx, const std::vector<std::string>& args) {
  if (args.size() != 1) return ctx.fail("usage: weftctl policy show [NAMESPACE/]NAME");
  auto all = allPolicies(ctx);
  if (!all) return ctx.fail(all.status());
  auto p = findByRef(all.value(), args[0], "policy");
  if (!p) return ctx.fail(p.status());
  json out = p.value();
  if (out["kind"] == "AuthorizationPolicy") {
    // The ztunnel's parsed form: per rule, how many from/to/when and which L7 fields.
    if (auto zd = ctx.ztunnelGet("/config_dump")) {
      out["ztunnel"] = nullptr;
      for (const json& z : zd->value("authorization_policies", json::array()))
        if (keyOf(z) == keyOf(out)) out["ztunnel"] = z;
    } else {
      out["ztunnel"] = "unreachable: " + zd.status().message();
    }
  }
  if (ctx.json()) ctx.printJson(out);
  else ctx.out() << renderObjectFields(out);
  return 0;
}

}  // namespace

Command policyCommand() {
  Command c{"policy", "policy { list | show NAME }",
            "authorization policies and peer authentications", nullptr, {}, "list"};
  c.children.push_back({"list", "list", "every AuthorizationPolicy and PeerAuthentication", list,
                        {}, ""});
  c.children.push_back({"show", "show [NS/]NAME", "one policy, with the ztunnel's view of its rules",
                        show, {}, ""});
  return c;
}

}  // namespace weft::cli
