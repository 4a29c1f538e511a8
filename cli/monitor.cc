// weftctl monitor: the ztunnel's GET /events stream (BPF redirect events and policy verdicts),
// filtered server-side, printed as lines for people or JSON lines (-j).
#include <fmt/format.h>

#include <chrono>
#include <ctime>
#include <ostream>

#include "cli/command.h"
#include "cli/objects.h"
#include "cli/table.h"

namespace weft::cli {

using nlohmann::json;

namespace {

std::string clock(const json& e) {
  int64_t ms = e.value("time_ms", int64_t{0});
  time_t secs = static_cast<time_t>(ms / 1000);
  struct tm tm {};
  gmtime_r(&secs, &tm);
  char buf[16];
  std::strftime(buf, sizeof(buf), "%H:%M:%S", &tm);
  return fmt::format("{}.{:03d}", buf, static_cast<int>(ms % 1000));
}

std::string orDash(const std::string& s) { return s.empty() ? "-" : s; }

}  // namespace

std::string renderEvent(const json& e) {
  std::string kind = e.value("kind", "");
  if (kind == "dropped")
    return fmt::format("{:<12} dropped {} events (this client read too slowly)", "",
                       e.value("count", 0));
  if (kind == "redirect") {
    return fmt::format("{:<12} {:<15} {:<24} src {} dst {}", clock(e), e.value("type", "?"),
                       cellOf(e, "pod"), cellOf(e, "src"), cellOf(e, "dst"));
  }
  if (kind == "verdict") {
    const json& s = e.value("source", json::object());
    const json& d = e.value("destination", json::object());
    std::string by = e.contains("policy") && e["policy"].is_string()
                         ? fmt::format("{} rule {}", e["policy"].get<std::string>(), cell(e["rule"]))
                         : e.value("decided_by", std::string("default"));
    std::string extra;
    if (e.contains("audit") && !e["audit"].empty()) extra += " audit " + cell(e["audit"]);
    if (e.contains("dry_run") && e["dry_run"].is_object())
      extra += " dry-run " + e["dry_run"].value("result", "?");
    std::string result = e.value("result", "?");
    for (char& c : result) c = static_cast<char>(toupper(static_cast<unsigned char>(c)));
    return fmt::format("{:<12} verdict {:<7} {:<9} {} {}:{} -> {} {}:{} ({}; {}){}", clock(e),
                       result, e.value("path", "?"), orDash(s.value("workload", "")),
                       cellOf(s, "ip"), cellOf(s, "port"), orDash(d.value("workload", "")),
                       cellOf(d, "ip"), cellOf(d, "port"), by, e.value("reason", "?"), extra);
  }
  return e.dump();
}

namespace {

int run(Context& ctx, const std::vector<std::string>& args) {
  auto o = parseVerbOptions(args, {"pod", "namespace", "verdict", "count", "timeout"});
  if (!o) return ctx.fail(o.status());
  if (!o->positional.empty()) return ctx.fail("unexpected argument " + o->positional[0]);
  auto& v = o->values;
  if (v.count("verdict") && v["verdict"] != "allow" && v["verdict"] != "deny" &&
      v["verdict"] != "audit")
    return ctx.fail("--verdict: allow, deny or audit");
  uint64_t count = 0;
  double timeout_s = 0;
  try {
    if (v.count("count")) count = std::stoull(v["count"]);
    if (v.count("timeout")) timeout_s = std::stod(v["timeout"]);
  } catch (...) {
    return ctx.fail("--count wants a number, --timeout seconds");
  }
  if (timeout_s < 0 || timeout_s > 86400) return ctx.fail("--timeout: 0..86400 seconds");
  std::string path = "/events";
  std::string sep = "?";
  for (const char* k : {"pod", "namespace", "verdict"}) {
    if (!v.count(k)) continue;
    path += sep + k + "=" + urlEncode(v[k]);
    sep = "&";
  }
  auto ep = ctx.ztunnel();
  if (!ep) return ctx.fail(ep.status());
  uint64_t seen = 0;
  std::string bad;
  std::string error_body;
  auto st = httpStream(
      ep.value(), path,
      [&](const std::string& line) {
        auto e = json::parse(line, nullptr, false);
        if (e.is_discarded()) {
          bad = "not JSON: " + line.substr(0, 100);
          return false;
        }
        std::string kind = e.value("kind", "");
        if (ctx.json()) {
          ctx.printJson(e);
        } else if (kind == "start") {
          ctx.err() << fmt::format("monitoring {} (BPF events: {}); Ctrl-C to stop\n",
                                   ep->what, e.value("bpf_events", false) ? "yes" : "no");
          ctx.err().flush();
          ctx.out() << fmt::format("{:<12} {}\n", "TIME (UTC)", "EVENT");
          ctx.out().flush();
        } else {
          ctx.out() << renderEvent(e) << "\n";
          ctx.out().flush();
        }
        if (kind == "redirect" || kind == "verdict") seen++;
        return count == 0 || seen < count;
      },
      std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)), &error_body);
  if (!st) return ctx.fail(st.status());
  if (!bad.empty()) return ctx.fail(ep->what + ": /events: " + bad);
  if (st.value() != 200) {
    auto j = json::parse(error_body, nullptr, false);
    return ctx.fail(fmt::format("{}: /events: {} {}", ep->what, st.value(),
                                j.is_object() ? j.value("error", "") : error_body));
  }
  return 0;
}

}  // namespace

Command monitorCommand() {
  return Command{"monitor",
                 "monitor [--pod P] [--namespace N] [--verdict allow|deny|audit] [--count N] "
                 "[--timeout S]",
                 "live redirect and policy-verdict events from the ztunnel", run, {}, ""};
}

}  // namespace weft::cli
