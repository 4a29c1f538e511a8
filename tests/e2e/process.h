// Child processes for the end-to-end tests: run a command to completion with a time limit, or
// keep one running with pipes to its stdin and stdout.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace weft::e2e {

struct RunResult {
  int exitCode = -1;  // -1: did not exit by itself (timed out, killed by a signal)
  bool timedOut = false;
  std::string out;
  std::string err;
  std::string describe() const;  // "exit 1; stderr: ..." for assertion messages
};

struct RunOptions {
  std::chrono::milliseconds timeout{std::chrono::seconds(60)};
  std::string stdinText;
  std::map<std::string, std::string> env;  // added to (or replacing in) the inherited environment
  size_t maxOutput = 16u << 20;            // per stream; the rest is dropped
};

inline RunOptions withTimeout(std::chrono::milliseconds timeout) {
  RunOptions o;
  o.timeout = timeout;
  return o;
}

// Runs argv[0] (PATH lookup) in its own process group; on timeout the whole group gets SIGKILL.
RunResult run(const std::vector<std::string>& argv, const RunOptions& options = {});

// A long-running child in its own process group. The destructor kills the group and reaps it.
class Child {
 public:
  Child() = default;
  ~Child();
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  // stdout and stderr go to a pipe read by readUntil/wait, or, when outputFile is given, are
  // appended to that file; stdin is a pipe for send().
  bool start(const std::vector<std::string>& argv, const std::string& outputFile = "");
  bool send(const std::string& text);
  void closeStdin();
  // Reads stdout until `needle` appears or the time is up; returns everything read so far.
  std::optional<std::string> readUntil(const std::string& needle, std::chrono::milliseconds wait);
  // Waits for the child to exit by itself; its output (all of it) lands in `out`.
  std::optional<int> wait(std::chrono::milliseconds limit, std::string* out);
  void kill();
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
  int in_ = -1;
  int out_ = -1;
  std::string buffered_;
};

}  // namespace weft::e2e
