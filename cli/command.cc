// Global options, prefix matching, dispatch down the command tree, and the Context helpers
// (admin requests, JSON and error output).
#include "cli/command.h"

#include <fmt/format.h>
#include <unistd.h>

#include <ostream>

namespace weft::cli {

Result<GlobalOptions> parseGlobalOptions(
    std::vector<std::string>* args, const std::function<const char*(const char*)>& getenv) {
  GlobalOptions o;
  std::vector<std::string> rest;
  bool literal = false;
  auto value = [&](size_t* i, const std::string& a, const std::string& name,
                   std::string* out) -> Status {
    if (a.size() > name.size() && a[name.size()] == '=') {
      *out = a.substr(name.size() + 1);
    } else if (*i + 1 < args->size()) {
      *out = (*args)[++*i];
    } else {
      return Status::errorf("{} needs a value", name);
    }
    if (out->empty()) return Status::errorf("{}: empty value", name);
    return Status::ok();
  };
  auto is = [](const std::string& a, const std::string& name) {
    return a == name || a.rfind(name + "=", 0) == 0;
  };
  for (size_t i = 0; i < args->size(); i++) {
    const std::string& a = (*args)[i];
    if (literal) {
      rest.push_back(a);
      continue;
    }
    Status st;
    if (a == "--") {
      literal = true;
      rest.push_back(a);
    } else if (a == "-j" || a == "--json") {
      o.json = true;
    } else if (a == "-p" || a == "--pretty") {
      o.pretty = true;
    } else if (a == "-jp" || a == "-pj") {
      o.json = o.pretty = true;
    } else if (a == "-h" || a == "--help") {
      o.help = true;
    } else if (a == "-V" || a == "--version") {
      o.version = true;
    } else if (is(a, "--agent-socket")) {
      st = value(&i, a, "--agent-socket", &o.agent_socket);
    } else if (is(a, "--ztunnel")) {
      st = value(&i, a, "--ztunnel", &o.ztunnel);
    } else if (is(a, "--pin-dir")) {
      st = value(&i, a, "--pin-dir", &o.pin_dir);
    } else {
      rest.push_back(a);
    }
    if (!st) return st;
  }
  auto env = [&](const char* name) -> std::string {
    const char* v = getenv(name);
    return v ? v : "";
  };
  if (o.agent_socket.empty()) o.agent_socket = env("WEFT_AGENT_SOCKET");
  if (o.agent_socket.empty()) o.agent_socket = env("WEFT_ADMIN_SOCKET");
  if (o.agent_socket.empty()) o.agent_socket = kDefaultAgentSocket;
  if (o.ztunnel.empty()) o.ztunnel = env("WEFT_ZTUNNEL_ADMIN");
  if (o.ztunnel.empty()) o.ztunnel = kDefaultZtunnelAdmin;
  if (o.pin_dir.empty()) o.pin_dir = env("WEFT_BPF_PIN_DIR");
  *args = std::move(rest);
  return o;
}

Result<nlohmann::json> Context::getJson(const AdminEndpoint& ep, const std::string& method,
                                        const std::string& path, int* http_status) {
  auto r = httpRequest(ep, method, path);
  if (!r) return r.status();
  if (http_status) *http_status = r->status;
  auto j = nlohmann::json::parse(r->body, nullptr, false);
  if (r->status < 200 || r->status > 299) {
    std::string why = j.is_object() && j.contains("error") && j["error"].is_string()
                          ? j["error"].get<std::string>()
                          : r->body.substr(0, 200);
    while (!why.empty() && why.back() == '\n') why.pop_back();
    return Status::errorf("{}: {} {}: {}", ep.what, method, path, why);
  }
  if (j.is_discarded()) return Status::errorf("{}: {}: reply is not JSON", ep.what, path);
  return j;
}

Result<nlohmann::json> Context::agentGet(const std::string& path) {
  return getJson(agent(), "GET", path);
}

Result<nlohmann::json> Context::ztunnelGet(const std::string& path) {
  auto ep = ztunnel();
  if (!ep) return ep.status();
  return getJson(ep.value(), "GET", path);
}

std::string Context::pinDir() {
  if (!opts_.pin_dir.empty()) return opts_.pin_dir;
  if (auto st = agentGet("/status")) {
    if (st->contains("bpf_pin_dir") && (*st)["bpf_pin_dir"].is_string() &&
        !(*st)["bpf_pin_dir"].get<std::string>().empty())
      return opts_.pin_dir = (*st)["bpf_pin_dir"].get<std::string>();
  }
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  return opts_.pin_dir = std::string("/sys/fs/bpf/weft/") + host;
}

void Context::printJson(const nlohmann::json& j) {
  out_ << (opts_.pretty ? j.dump(2) : j.dump()) << "\n";
  out_.flush();
}

int Context::fail(const std::string& message) {
  std::string m = message;
  for (char& c : m)
    if (c == '\n') c = ' ';
  if (json()) {
    printJson(nlohmann::json{{"error", m}});
  } else {
    err_ << "Error: " << m << "\n";
    err_.flush();
  }
  return 1;
}

Result<std::string> matchPrefix(const std::string& word, const std::vector<std::string>& names,
                                const std::string& what) {
  std::vector<std::string> hits;
  for (const std::string& n : names) {
    if (n == word) return n;
    if (!word.empty() && n.rfind(word, 0) == 0) hits.push_back(n);
  }
  auto join = [](const std::vector<std::string>& v) {
    std::string s;
    for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
    return s;
  };
  if (hits.size() == 1) return hits[0];
  if (hits.empty())
    return Status::errorf("unknown {} '{}' (one of: {})", what, word, join(names));
  return Status::errorf("ambiguous {} '{}': {}", what, word, join(hits));
}

std::string usageOf(const Command& c, const std::string& parent_prefix) {
  std::string prefix = parent_prefix + (c.name.empty() ? "weftctl" : c.name) + " ";
  std::string out = "Usage: " + parent_prefix + c.usage + "\n";
  if (!c.help.empty()) out += "  " + c.help + "\n";
  if (!c.children.empty()) out += "Commands:\n";
  for (const Command& ch : c.children)
    out += fmt::format("  {:<48} {}\n", prefix + ch.usage, ch.help);
  return out;
}

int dispatch(Context& ctx, const Command& root, const std::vector<std::string>& args) {
  const Command* node = &root;
  std::string parent_prefix;  // "weftctl bpf " for the node "map"
  size_t i = 0;
  auto help = [&](const Command& c) {
    std::string text = usageOf(c, parent_prefix);
    if (ctx.json()) {
      ctx.printJson({{"usage", text}});
    } else {
      ctx.out() << text;
    }
    return 0;
  };
  auto descend = [&](const Command* next) {
    parent_prefix += (node->name.empty() ? "weftctl" : node->name) + " ";
    node = next;
  };
  while (!node->children.empty()) {
    bool have_word = i < args.size() && !(args[i].size() > 1 && args[i][0] == '-');
    if (!have_word) {
      if (ctx.options().help) return help(*node);
      if (node->run) break;
      const Command* def = nullptr;
      for (const Command& ch : node->children)
        if (ch.name == node->default_child) def = &ch;
      if (def != nullptr) {
        descend(def);
        continue;
      }
      if (node == &root) {
        ctx.err() << usageOf(root, "");
        return 1;
      }
      return ctx.fail(fmt::format("{}: missing verb; try 'weftctl {} help'", node->name,
                                  node->name));
    }
    std::vector<std::string> names;
    for (const Command& ch : node->children) names.push_back(ch.name);
    names.push_back("help");
    auto m = matchPrefix(args[i], names, node == &root ? "object" : node->name + " verb");
    if (!m) return ctx.fail(m.status());
    if (m.value() == "help") return help(*node);
    for (const Command& ch : node->children)
      if (ch.name == m.value()) {
        descend(&ch);
        break;
      }
    i++;
  }
  std::vector<std::string> rest(args.begin() + static_cast<std::ptrdiff_t>(i), args.end());
  if (ctx.options().help || (rest.size() == 1 && rest[0] == "help")) return help(*node);
  return node->run(ctx, rest);
}

Result<VerbOptions> parseVerbOptions(const std::vector<std::string>& args,
                                     const std::vector<std::string>& allowed) {
  VerbOptions o;
  for (size_t i = 0; i < args.size(); i++) {
    const std::string& a = args[i];
    if (a == "--") {
      for (size_t k = i + 1; k < args.size(); k++) o.positional.push_back(args[k]);
      break;
    }
    if (a.rfind("--", 0) != 0 || a.size() == 2) {
      o.positional.push_back(a);
      continue;
    }
    std::string name = a.substr(2), v;
    size_t eq = name.find('=');
    bool inline_value = eq != std::string::npos;
    if (inline_value) {
      v = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    std::vector<std::string> names;
    for (const auto& n : allowed) names.push_back(n);
    auto m = matchPrefix(name, names, "option");
    if (!m) return Status::errorf("--{}: {}", name, m.status().message());
    if (!inline_value) {
      if (i + 1 >= args.size()) return Status::errorf("--{} needs a value", m.value());
      v = args[++i];
    }
    if (!o.values.emplace(m.value(), v).second)
      return Status::errorf("--{} given twice", m.value());
  }
  return o;
}

}  // namespace weft::cli
