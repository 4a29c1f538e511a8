// weftctl service list|show: the agent's /services (VIPs, ports, selector, endpoints, balancer).
#include <fmt/format.h>

#include <ostream>

#include "cli/command.h"
#include "cli/lookup.h"
#include "cli/objects.h"
#include "cli/table.h"

namespace weft::cli {

using nlohmann::json;

namespace {

std::string ports(const json& s) {
  std::string out;
  for (const json& p : s.value("ports", json::array())) {
    std::string one = fmt::format("{}/{}", p.value("port", 0), p.value("protocol", "TCP"));
    if (p.value("target_port", 0) != 0 && p.value("target_port", 0) != p.value("port", 0))
      one += fmt::format("->{}", p.value("target_port", 0));
    out += (out.empty() ? "" : ",") + one;
  }
  return out.empty() ? "-" : out;
}

int list(Context& ctx, const std::vector<std::string>& args) {
  if (!args.empty()) return ctx.fail("service list takes no arguments");
  auto s = ctx.agentGet("/services");
  if (!s) return ctx.fail(s.status());
  if (ctx.json()) {
    ctx.printJson(s.value());
    return 0;
  }
  Table t({"SERVICE", "VIPS", "PORTS", "ENDPOINTS", "LOAD BALANCER"});
  for (const json& v : s.value())
    t.add({keyOf(v), v.value("headless", false) ? "None (headless)" : cellOf(v, "vips"), ports(v),
           std::to_string(v.value("endpoints", json::array()).size()),
           cellOf(v, "load_balancer")});
  ctx.out() << t.render();
  return 0;
}

int show(Context& ctx, const std::vector<std::string>& args) {
  if (args.size() != 1) return ctx.fail("usage: weftctl service show [NAMESPACE/]NAME");
  auto all = ctx.agentGet("/services");
  if (!all) return ctx.fail(all.status());
  auto s = findByRef(all.value(), args[0], "service");
  if (!s) return ctx.fail(s.status());
  if (ctx.json()) {
    ctx.printJson(s.value());
    return 0;
  }
  const json& v = s.value();
  ctx.out() << fmt::format("service: {}\nvips: {}\nports: {}\nselector: {}\nload_balancer: {}\n",
                           keyOf(v), cellOf(v, "vips"), ports(v), cellOf(v, "selector"),
                           cellOf(v, "load_balancer"));
  Table t({"ENDPOINT", "WORKLOAD"});
  for (const json& e : v.value("endpoints", json::array()))
    t.add({cellOf(e, "ip"), cellOf(e, "workload")});
  ctx.out() << "endpoints:\n" << t.render();
  return 0;
}

}  // namespace

Command serviceCommand() {
  Command c{"service", "service { list | show NAME }", "services, their VIPs and endpoints",
            nullptr, {}, "list"};
  c.children.push_back({"list", "list", "every service: VIPs, ports, endpoint count", list, {}, ""});
  c.children.push_back({"show", "show [NS/]NAME", "one service with its endpoints", show, {}, ""});
  return c;
}

}  // namespace weft::cli
