// weftctl's command model, bpftool-style: OBJECT { VERB | help } with unambiguous prefixes,
// global options anywhere, and the Context every verb gets (endpoints, output mode).
#pragma once

#include <functional>
#include <iosfwd>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/admin_client.h"
#include "common/status.h"

namespace weft::cli {

// Defaults: the agent's own (agent/main.cc) and the ztunnel's --admin-addr.
constexpr const char* kDefaultAgentSocket = "/var/run/weft/agent.sock";
constexpr const char* kDefaultZtunnelAdmin = "127.0.0.1:15000";

struct GlobalOptions {
  bool json = false;
  bool pretty = false;  // implies json
  bool help = false;
  bool version = false;
  std::string agent_socket;  // flag > $WEFT_AGENT_SOCKET > $WEFT_ADMIN_SOCKET > default
  std::string ztunnel;       // flag > $WEFT_ZTUNNEL_ADMIN > default
  std::string pin_dir;       // flag > $WEFT_BPF_PIN_DIR > the agent's /status > default
};

// Takes the global options out of `args` (anywhere before a "--"), leaving OBJECT VERB ARGS.
// `getenv` is injected for tests.
Result<GlobalOptions> parseGlobalOptions(std::vector<std::string>* args,
                                         const std::function<const char*(const char*)>& getenv);

// Everything a verb needs. Output goes to `out` (stdout) and `err` (stderr).
class Context {
 public:
  Context(GlobalOptions opts, std::ostream& out, std::ostream& err)
      : opts_(std::move(opts)), out_(out), err_(err) {}

  bool json() const { return opts_.json || opts_.pretty; }
  const GlobalOptions& options() const { return opts_; }
  std::ostream& out() { return out_; }
  std::ostream& err() { return err_; }

  AdminEndpoint agent() const { return AdminEndpoint::agent(opts_.agent_socket); }
  Result<AdminEndpoint> ztunnel() const { return AdminEndpoint::ztunnel(opts_.ztunnel); }

  // GET (or POST) a JSON document; a non-2xx answer is an error carrying its "error" text.
  Result<nlohmann::json> agentGet(const std::string& path);
  Result<nlohmann::json> ztunnelGet(const std::string& path);
  Result<nlohmann::json> getJson(const AdminEndpoint& ep, const std::string& method,
                                 const std::string& path, int* http_status = nullptr);
  // The pin dir: the option, else the agent's, else /sys/fs/bpf/weft/<hostname>.
  std::string pinDir();

  // Prints a document: JSON (-j compact, -p indented) on stdout.
  void printJson(const nlohmann::json& j);
  // A failure, on one line: {"error": "..."} on stdout with -j, "Error: ..." on stderr
  // otherwise. Returns the exit code (1).
  int fail(const std::string& message);
  int fail(const Status& st) { return fail(st.message()); }

 private:
  GlobalOptions opts_;
  std::ostream& out_;
  std::ostream& err_;
};

// A node of the command tree: an object, a verb, or (bpf) an object of an object.
struct Command {
  std::string name;
  std::string usage;  // "workload { list | show NAME }"
  std::string help;   // one line
  std::function<int(Context&, const std::vector<std::string>&)> run;  // leaf (or default)
  std::vector<Command> children;
  std::string default_child;  // run when no verb is given ("list", "show")
};

// The unique candidate `word` is a prefix of (an exact name wins); errors name the candidates
// for an ambiguous prefix and list them all for an unknown word.
Result<std::string> matchPrefix(const std::string& word, const std::vector<std::string>& names,
                                const std::string& what);

// Walks `args` down from `root` (prefix matching, "help" at every level) and runs the verb.
int dispatch(Context& ctx, const Command& root, const std::vector<std::string>& args);

// The usage text of a node and its children.
std::string usageOf(const Command& c, const std::string& prefix);

// The whole tree (main.cc).
Command commandTree();

// Objects (one file each).
Command statusCommand();
Command workloadCommand();
Command serviceCommand();
Command policyCommand();
Command certCommand();
Command connectionCommand();
Command bpfCommand();
Command monitorCommand();
Command traceCommand();
Command logCommand();

// Verb options: "--name VALUE" / "--name=VALUE" taken out of args; unknown "--x" is an error.
struct VerbOptions {
  std::map<std::string, std::string> values;
  std::vector<std::string> positional;
};
Result<VerbOptions> parseVerbOptions(const std::vector<std::string>& args,
                                     const std::vector<std::string>& allowed);

}  // namespace weft::cli
