// weftctl connection list: the ztunnel's live connections (/connections) with filters by pod,
// namespace and identity: source, destination, identities, bytes each way, age, path.
#include <fmt/format.h>

#include <map>
#include <ostream>

#include "cli/command.h"
#include "cli/objects.h"
#include "cli/table.h"

namespace weft::cli {

using nlohmann::json;

namespace {

bool podIs(const std::string& want, const std::string& pod) {
  if (pod.empty()) return false;
  if (want.find('/') != std::string::npos) return want == pod;
  return pod.substr(pod.find('/') + 1) == want;
}

std::string nsOf(const std::string& pod) {
  size_t s = pod.find('/');
  return s == std::string::npos ? "" : pod.substr(0, s);
}

}  // namespace

json filterConnections(const json& conns, const std::string& pod, const std::string& ns,
                       const std::string& identity) {
  json out = json::array();
  for (const json& c : conns) {
    std::string src = c.value("source_workload", ""), dst = c.value("destination_workload", "");
    if (!pod.empty() && !podIs(pod, src) && !podIs(pod, dst)) continue;
    if (!ns.empty() && nsOf(src) != ns && nsOf(dst) != ns) continue;
    if (!identity.empty()) {
      std::string peer = c.value("peer_identity", "");
      if (peer.empty() || (peer != identity && peer.find(identity) == std::string::npos))
        continue;
    }
    out.push_back(c);
  }
  return out;
}

json addIdentities(json conns, const json& workloads, const std::string& trust_domain) {
  std::map<std::string, std::string> sa;
  for (const json& w : workloads)
    sa[keyOf(w)] = w.value("service_account", "default");
  auto identityOf = [&](const std::string& pod) -> json {
    auto it = sa.find(pod);
    if (it == sa.end()) return nullptr;
    return "spiffe://" + trust_domain + "/ns/" + nsOf(pod) + "/sa/" +
           (it->second.empty() ? "default" : it->second);
  };
  for (json& c : conns) {
    // Only HBONE carries identities: the peer's is verified, ours is our pod's certificate.
    bool hbone = c.value("path", "") == "hbone";
    std::string peer = c.value("peer_identity", "");
    bool outbound = c.value("direction", "") == "outbound";
    json src = nullptr, dst = nullptr;
    if (hbone) {
      src = outbound ? identityOf(c.value("source_workload", "")) : json(peer);
      dst = outbound ? json(peer) : identityOf(c.value("destination_workload", ""));
    } else if (c.value("path", "") == "fast") {
      // Same node, app to app in the kernel: the kernel attests both pods (netns cookies).
      src = identityOf(c.value("source_workload", ""));
      dst = identityOf(c.value("destination_workload", ""));
    }
    c["source_identity"] = src;
    c["destination_identity"] = dst;
  }
  return conns;
}

namespace {
std::string bytesCell(const json& c, const char* key) {
  auto it = c.find(key);
  if (it == c.end() || !it->is_number_unsigned()) return "-";
  return humanBytes(it->get<uint64_t>());
}
}  // namespace

std::string renderConnections(const json& conns) {
  Table t({"DIRECTION", "SOURCE", "DESTINATION", "PATH", "SOURCE IDENTITY",
           "DESTINATION IDENTITY", "SRC->DST", "DST->SRC", "AGE", "STATE"});
  for (const json& c : conns) {
    std::string src = c.value("source_workload", "");
    std::string dst = c.value("destination_workload", "");
    std::string svc = c.value("destination_service", "");
    t.add({cellOf(c, "direction"),
           (src.empty() ? "" : src + " ") + c.value("src", ""),
           (dst.empty() ? (svc.empty() ? "" : svc + " ") : dst + " ") + c.value("dst", ""),
           cellOf(c, "path"), cellOf(c, "source_identity"), cellOf(c, "destination_identity"),
           // null: a fast-path connection, whose bytes the kernel reports when it closes
           bytesCell(c, "bytes_received"), bytesCell(c, "bytes_sent"),
           humanDuration(c.value("age_ms", uint64_t{0})), cellOf(c, "state")});
  }
  return t.render();
}

namespace {

int list(Context& ctx, const std::vector<std::string>& args) {
  auto o = parseVerbOptions(args, {"pod", "namespace", "identity"});
  if (!o) return ctx.fail(o.status());
  if (!o->positional.empty()) return ctx.fail("unexpected argument " + o->positional[0]);
  auto conns = ctx.ztunnelGet("/connections");
  if (!conns) return ctx.fail(conns.status());
  json out = filterConnections(conns.value(), o->values["pod"], o->values["namespace"],
                               o->values["identity"]);
  // Both ends' identities: the agent knows each pod's service account, the ztunnel the trust
  // domain. Best effort: without the agent only the peer's (verified) identity is shown.
  std::string td = "cluster.local";
  if (auto zd = ctx.ztunnelGet("/config_dump"); zd && (*zd)["node_config"].is_object())
    td = (*zd)["node_config"].value("trust_domain", td);
  if (td.empty()) td = "cluster.local";
  auto wl = ctx.agentGet("/workloads");
  out = addIdentities(out, wl ? wl.value() : json::array(), td);
  if (ctx.json()) ctx.printJson(out);
  else ctx.out() << renderConnections(out);
  return 0;
}

}  // namespace

Command connectionCommand() {
  Command c{"connection", "connection { list [--pod P] [--namespace N] [--identity I] }",
            "live connections through this node's ztunnel", nullptr, {}, "list"};
  c.children.push_back({"list", "list [--pod P] [--namespace N] [--identity I]",
                        "source, destination, identities, bytes each way, age, path", list, {},
                        ""});
  return c;
}

}  // namespace weft::cli
