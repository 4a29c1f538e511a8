// weftctl trace SRC_POD DEST[:PORT]: the ztunnel's GET /trace (its own route decision and
// policy evaluation, no traffic sent), explained step by step.
#include <fmt/format.h>

#include <ostream>

#include "cli/command.h"
#include "cli/objects.h"
#include "cli/table.h"

namespace weft::cli {

using nlohmann::json;

std::string renderTrace(const json& t) {
  std::string out;
  const json& s = t.value("source", json::object());
  out += fmt::format("source:      {} (node {}, {}) {}\n", cellOf(s, "workload"), cellOf(s, "node"),
                     cellOf(s, "ip"),
                     s.value("enrolled", false) ? "enrolled, identity " + cellOf(s, "identity")
                                                : "NOT enrolled");
  const json& d = t.value("destination", json::object());
  out += fmt::format("destination: {} = {}\n", cellOf(d, "input"), cellOf(d, "address"));
  out += fmt::format("redirected:  {} ({})\n", t.value("redirected", false) ? "yes" : "no",
                     cellOf(t, "redirect_reason"));
  const json& r = t.value("route", json::object());
  out += fmt::format("route:       {}: {}\n", cellOf(r, "kind"), cellOf(r, "reason"));
  if (r.contains("service") && !r["service"].is_null()) {
    std::string cands;
    for (const json& c : r.value("candidates", json::array()))
      cands += (cands.empty() ? "" : ", ") + cellOf(c, "ip") + " (" + cellOf(c, "workload") + ")";
    out += fmt::format("  service:   {} -> endpoint {}; candidates: {}\n", cell(r["service"]),
                       cellOf(r, "next_hop"), cands.empty() ? "none" : cands);
  }
  out += fmt::format("  next hop:  {} ({})\n", cellOf(r, "next_hop"),
                     cellOf(r, "endpoint_workload"));
  out += fmt::format("  waypoint:  {}\n", r.contains("waypoint") && !r["waypoint"].is_null()
                                              ? cell(r["waypoint"])
                                              : "none");
  out += fmt::format("  protocol:  {}\n", cellOf(r, "protocol"));
  out += fmt::format("expected identity: {}\n", cellOf(t, "expected_identity"));
  const json& in = t.contains("inbound") ? t["inbound"] : json();
  if (in.is_object()) {
    if (in.value("enforced", false)) {
      out += fmt::format("inbound:     node {}'s ztunnel, {} path, peer authentication {}\n",
                         cellOf(in, "node"), cellOf(in, "path"), cellOf(in, "peer_authentication"));
    } else {
      out += fmt::format("inbound:     no ztunnel enforces policy: {}\n", cellOf(in, "reason"));
    }
  }
  const json& v = t.contains("verdict") ? t["verdict"] : json();
  if (v.is_object()) {
    std::string result = v.value("result", "?");
    for (char& c : result) c = static_cast<char>(toupper(static_cast<unsigned char>(c)));
    out += fmt::format("verdict:     {} by {} ({})", result, cellOf(v, "decided_by"),
                       cellOf(v, "reason"));
    if (v.contains("audit") && !v["audit"].empty()) out += "; audit " + cell(v["audit"]);
    if (v.contains("dry_run") && v["dry_run"].is_object())
      out += fmt::format("; dry-run would {} ({})", v["dry_run"].value("result", "?"),
                         cellOf(v["dry_run"], "decided_by"));
    out += "\n";
  }
  out += fmt::format("outcome:     {}\n", cellOf(t, "outcome"));
  return out;
}

namespace {

int run(Context& ctx, const std::vector<std::string>& args) {
  if (args.size() != 2)
    return ctx.fail("usage: weftctl trace [NS/]POD { IP[:PORT] | NS/POD:PORT | SVC.NS[:PORT] }");
  auto t = ctx.ztunnelGet("/trace?src=" + urlEncode(args[0]) + "&dst=" + urlEncode(args[1]));
  if (!t) return ctx.fail(t.status());
  if (ctx.json()) ctx.printJson(t.value());
  else ctx.out() << renderTrace(t.value());
  return 0;
}

}  // namespace

Command traceCommand() {
  return Command{"trace", "trace SRC_POD DEST[:PORT]",
                 "what would happen to a connection: redirect, route, identity, policy verdict",
                 run, {}, ""};
}

}  // namespace weft::cli
