// The top of weftctl's command tree: every object, in the order `help` lists them.
#include "cli/command.h"

namespace weft::cli {

Command commandTree() {
  Command root{"",
               "weftctl [-j|--json] [-p|--pretty] [--agent-socket PATH] [--ztunnel HOST:PORT] "
               "[--pin-dir DIR] OBJECT { VERB | help }",
               "Weft's troubleshooting CLI. Objects and verbs may be abbreviated (weftctl wo li). "
               "Environment: WEFT_AGENT_SOCKET, WEFT_ZTUNNEL_ADMIN, WEFT_BPF_PIN_DIR.",
               nullptr, {}, ""};
  root.children = {statusCommand(),  workloadCommand(),   serviceCommand(), policyCommand(),
                   certCommand(),    connectionCommand(), bpfCommand(),     monitorCommand(),
                   traceCommand(),   logCommand()};
  return root;
}

}  // namespace weft::cli
