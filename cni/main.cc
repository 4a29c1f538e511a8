// weft-cni: the chained CNI plugin that tells weft-agent about pod ADD/DEL/CHECK and blocks ADD
// until the pod is enrolled. Everything but process I/O lives in cni/plugin.cc.
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

#include "cni/agent_client.h"
#include "cni/plugin.h"

extern char** environ;

namespace {

// Reads stdin up to one byte past the bound, so an oversized config is seen as such.
bool readStdin(std::string* out) {
  char buf[16384];
  while (out->size() <= weft::cni::kMaxConfigBytes) {
    ssize_t n = ::read(STDIN_FILENO, buf, sizeof(buf));
    if (n == 0) return true;
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno == EBADF;  // no stdin at all is an empty config
    }
    out->append(buf, static_cast<size_t>(n));
  }
  return true;
}

}  // namespace

int main() {
  weft::cni::Env env;
  for (char** e = environ; e && *e; ++e) {
    std::string kv(*e);
    if (kv.rfind("CNI_", 0) != 0) continue;
    size_t eq = kv.find('=');
    if (eq != std::string::npos) env[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  std::string input;
  if (!readStdin(&input)) {
    weft::cni::CniError err{weft::cni::kErrIoFailure, "reading the network config from stdin",
                            std::strerror(errno)};
    std::string out = weft::cni::errorJson("", err).dump() + "\n";
    std::fwrite(out.data(), 1, out.size(), stdout);
    return 1;
  }
  auto exists = [](const std::string& path) {
    struct stat st {};
    return ::stat(path.c_str(), &st) == 0;
  };
  weft::cni::Outcome outcome = weft::cni::run(env, input, weft::cni::callAgent, exists);
  if (!outcome.stdoutText.empty()) {
    std::fwrite(outcome.stdoutText.data(), 1, outcome.stdoutText.size(), stdout);
  }
  if (std::fflush(stdout) != 0 && outcome.exitCode == 0) return 1;
  return outcome.exitCode;
}
