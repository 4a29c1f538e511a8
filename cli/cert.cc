// weftctl cert list|show: workload certificates held by the ztunnel (identity, serial,
// validity, state). Only these public fields are ever copied out: never key material.
#include <fmt/format.h>

#include <ostream>

#include "cli/command.h"
#include "cli/objects.h"
#include "cli/table.h"

namespace weft::cli {

using nlohmann::json;

namespace {

// The public fields of one certificate entry, whatever else a server might add.
json publicFields(const json& c) {
  json out = json::object();
  for (const char* k : {"identity", "state", "serial", "not_before", "not_after", "renew_at",
                        "workloads", "issued", "failures", "last_error"})
    out[k] = c.contains(k) ? c[k] : json(nullptr);
  return out;
}

Result<json> certificates(Context& ctx) {
  auto zd = ctx.ztunnelGet("/config_dump");
  if (!zd) return zd.status();
  json out = json::array();
  for (const json& c : zd->value("certificates", json::array())) out.push_back(publicFields(c));
  return out;
}

int list(Context& ctx, const std::vector<std::string>& args) {
  if (!args.empty()) return ctx.fail("cert list takes no arguments");
  auto certs = certificates(ctx);
  if (!certs) return ctx.fail(certs.status());
  if (ctx.json()) {
    ctx.printJson(certs.value());
    return 0;
  }
  Table t({"IDENTITY", "STATE", "SERIAL", "NOT BEFORE", "NOT AFTER", "RENEW AT", "WORKLOADS"});
  for (const json& c : certs.value())
    t.add({cellOf(c, "identity"), cellOf(c, "state"), cellOf(c, "serial"),
           cellOf(c, "not_before"), cellOf(c, "not_after"), cellOf(c, "renew_at"),
           cellOf(c, "workloads")});
  ctx.out() << t.render();
  return 0;
}

// ID: the SPIFFE identity, NS/SA, or the serial (or a prefix of it of 6+ hex digits).
bool idMatches(const std::string& id, const json& c) {
  std::string ident = c.value("identity", ""), serial = c.value("serial", "");
  if (id == ident) return true;
  if (id.size() >= 6 && !serial.empty() && serial.rfind(id, 0) == 0) return true;
  size_t slash = id.find('/');
  if (slash != std::string::npos && id.find('/', slash + 1) == std::string::npos) {
    std::string tail = "/ns/" + id.substr(0, slash) + "/sa/" + id.substr(slash + 1);
    return ident.size() >= tail.size() &&
           ident.compare(ident.size() - tail.size(), tail.size(), tail) == 0;
  }
  return false;
}

int show(Context& ctx, const std::vector<std::string>& args) {
  if (args.size() != 1)
    return ctx.fail("usage: weftctl cert show { spiffe://TD/ns/NS/sa/SA | NS/SA | SERIAL }");
  auto certs = certificates(ctx);
  if (!certs) return ctx.fail(certs.status());
  std::vector<json> hits;
  for (const json& c : certs.value())
    if (idMatches(args[0], c)) hits.push_back(c);
  if (hits.empty()) return ctx.fail("no certificate " + args[0]);
  if (hits.size() > 1) return ctx.fail("certificate '" + args[0] + "' is ambiguous");
  if (ctx.json()) ctx.printJson(hits[0]);
  else ctx.out() << renderObjectFields(hits[0]);
  return 0;
}

}  // namespace

Command certCommand() {
  Command c{"cert", "cert { list | show ID }",
            "workload certificates held by the ztunnel (never keys)", nullptr, {}, "list"};
  c.children.push_back({"list", "list", "identity, state, serial, validity of each certificate",
                        list, {}, ""});
  c.children.push_back({"show", "show ID", "one certificate, by identity, NS/SA or serial", show,
                        {}, ""});
  return c;
}

}  // namespace weft::cli
