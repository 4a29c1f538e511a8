// weftctl log level [LEVEL]: the log level of the ztunnel (GET/POST /logging) and of the agent
// when it has that endpoint (an agent without it answers 404/405: reported, not an error).
#include <fmt/format.h>

#include <ostream>

#include "cli/command.h"
#include "cli/table.h"

namespace weft::cli {

using nlohmann::json;

namespace {

int level(Context& ctx, const std::vector<std::string>& args) {
  if (args.size() > 1) return ctx.fail("usage: weftctl log level [trace|debug|info|warn|error]");
  std::string method = args.empty() ? "GET" : "POST";
  std::string path = args.empty() ? "/logging" : "/logging?level=" + urlEncode(args[0]);
  if (!args.empty()) {
    static const std::vector<std::string> kLevels = {"trace", "debug", "info", "warn", "error"};
    if (std::find(kLevels.begin(), kLevels.end(), args[0]) == kLevels.end())
      return ctx.fail("level " + args[0] + ": want trace, debug, info, warn or error");
  }
  auto ep = ctx.ztunnel();
  if (!ep) return ctx.fail(ep.status());
  auto z = ctx.getJson(ep.value(), method, path);
  if (!z) return ctx.fail(z.status());
  json out = {{"ztunnel", {{"level", z->value("level", "")}}}};
  int status = 0;
  auto a = ctx.getJson(ctx.agent(), method, path, &status);
  if (a) {
    out["agent"] = {{"level", a->value("level", "")}};
  } else if (status == 404 || status == 405) {
    out["agent"] = {{"level", nullptr}, {"supported", false},
                    {"error", fmt::format("the agent has no {} /logging (HTTP {})", method,
                                          status)}};
  } else {
    out["agent"] = {{"level", nullptr}, {"error", a.status().message()}};
  }
  if (ctx.json()) {
    ctx.printJson(out);
    return 0;
  }
  Table t({"COMPONENT", "LEVEL", "NOTE"});
  t.add({"ztunnel", out["ztunnel"]["level"].get<std::string>(), args.empty() ? "-" : "set"});
  t.add({"agent", cell(out["agent"]["level"]),
         out["agent"].contains("error") ? out["agent"]["error"].get<std::string>()
                                        : (args.empty() ? "-" : "set")});
  ctx.out() << t.render();
  return 0;
}

}  // namespace

Command logCommand() {
  Command c{"log", "log { level [LEVEL] }", "log levels of the ztunnel and the agent", nullptr,
            {}, "level"};
  c.children.push_back({"level", "level [trace|debug|info|warn|error]",
                        "show the levels, or set both to LEVEL", level, {}, ""});
  return c;
}

}  // namespace weft::cli
