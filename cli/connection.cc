// weftctl connection list: the ztunnel's live connections (/connections) with filters by pod,
// namespace and identity: source, destination, identities, bytes each way, age, path.
#include <fmt/format.h>

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

std::string renderConnections(const json& conns) {
  Table t({"DIRECTION", "SOURCE", "DESTINATION", "PATH", "PEER IDENTITY", "SRC->DST", "DST->SRC",
           "AGE", "STATE"});
  for (const json& c : conns) {
    std::string src = c.value("source_workload", "");
    std::string dst = c.value("destination_workload", "");
    std::string svc = c.value("destination_service", "");
    t.add({cellOf(c, "direction"),
           (src.empty() ? "" : src + " ") + c.value("src", ""),
           (dst.empty() ? (svc.empty() ? "" : svc + " ") : dst + " ") + c.value("dst", ""),
           cellOf(c, "path"), cellOf(c, "peer_identity"),
           humanBytes(c.value("bytes_received", uint64_t{0})),
           humanBytes(c.value("bytes_sent", uint64_t{0})),
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
