// weftctl: Weft's troubleshooting CLI (bpftool-style OBJECT VERB, prefix matching, -j/-p JSON).
#include <csignal>
#include <cstdlib>
#include <iostream>

#include "cli/command.h"
#include "weft/version.h"

int main(int argc, char** argv) {
  // A reader that goes away (weftctl monitor | head) must not kill us mid-write.
  std::signal(SIGPIPE, SIG_IGN);
  std::vector<std::string> args(argv + 1, argv + argc);
  auto opts = weft::cli::parseGlobalOptions(&args, [](const char* n) { return std::getenv(n); });
  if (!opts) {
    bool json = false;
    for (const auto& a : args) json = json || a == "-j" || a == "--json" || a == "-p";
    weft::cli::Context ctx(weft::cli::GlobalOptions{json, false}, std::cout, std::cerr);
    return ctx.fail(opts.status());
  }
  weft::cli::Context ctx(opts.value(), std::cout, std::cerr);
  if (opts->version) {
    if (ctx.json()) ctx.printJson({{"version", WEFT_VERSION}});
    else std::cout << "weftctl " << WEFT_VERSION << "\n";
    return 0;
  }
  return weft::cli::dispatch(ctx, weft::cli::commandTree(), args);
}
