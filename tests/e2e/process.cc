// Child processes with pipes and time limits for the end-to-end tests.
#include "tests/e2e/process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <thread>

namespace weft::e2e {
namespace {

using Clock = std::chrono::steady_clock;

int msLeft(Clock::time_point deadline) {
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return ms.count() < 0 ? 0 : static_cast<int>(ms.count());
}

// fork + exec with the child's stdin/stdout/stderr on the given fds (-1: /dev/null).
pid_t spawn(const std::vector<std::string>& argv, int inFd, int outFd, int errFd,
            const std::map<std::string, std::string>& env) {
  std::vector<char*> args;
  for (auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = ::fork();
  if (pid != 0) return pid;
  ::setpgid(0, 0);
  int devnull = ::open("/dev/null", O_RDWR);
  ::dup2(inFd >= 0 ? inFd : devnull, 0);
  ::dup2(outFd >= 0 ? outFd : devnull, 1);
  ::dup2(errFd >= 0 ? errFd : devnull, 2);
  for (int fd = 3; fd < 1024; ++fd) ::close(fd);
  for (auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
  ::signal(SIGPIPE, SIG_DFL);
  ::execvp(args[0], args.data());
  std::fprintf(stderr, "exec %s: %s\n", args[0], std::strerror(errno));
  ::_exit(127);
}

int exitCodeOf(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return -1;
}

}  // namespace

std::string RunResult::describe() const {
  std::string s = timedOut ? "timed out" : "exit " + std::to_string(exitCode);
  auto tail = [](const std::string& t) { return t.size() > 4000 ? t.substr(t.size() - 4000) : t; };
  if (!out.empty()) s += "; stdout: " + tail(out);
  if (!err.empty()) s += "; stderr: " + tail(err);
  return s;
}

RunResult run(const std::vector<std::string>& argv, const RunOptions& options) {
  RunResult r;
  int inPipe[2], outPipe[2], errPipe[2];
  if (::pipe2(inPipe, O_CLOEXEC) != 0 || ::pipe2(outPipe, O_CLOEXEC) != 0 ||
      ::pipe2(errPipe, O_CLOEXEC) != 0) {
    r.err = std::string("pipe: ") + std::strerror(errno);
    return r;
  }
  pid_t pid = spawn(argv, inPipe[0], outPipe[1], errPipe[1], options.env);
  ::close(inPipe[0]);
  ::close(outPipe[1]);
  ::close(errPipe[1]);
  if (pid < 0) {
    r.err = std::string("fork: ") + std::strerror(errno);
    ::close(inPipe[1]);
    ::close(outPipe[0]);
    ::close(errPipe[0]);
    return r;
  }
  ::fcntl(inPipe[1], F_SETFL, O_NONBLOCK);
  size_t inDone = 0;
  int inFd = inPipe[1];
  if (options.stdinText.empty()) {
    ::close(inFd);
    inFd = -1;
  }
  auto deadline = Clock::now() + options.timeout;
  int fds[2] = {outPipe[0], errPipe[0]};
  std::string* sinks[2] = {&r.out, &r.err};
  while (fds[0] >= 0 || fds[1] >= 0 || inFd >= 0) {
    int ms = msLeft(deadline);
    if (ms == 0) {
      r.timedOut = true;
      break;
    }
    pollfd p[3];
    int n = 0;
    for (int i = 0; i < 2; ++i) p[n++] = {fds[i], POLLIN, 0};
    p[n++] = {inFd, POLLOUT, 0};
    int k = ::poll(p, n, ms);
    if (k < 0 && errno == EINTR) continue;
    if (k < 0) break;
    for (int i = 0; i < 2; ++i) {
      if (fds[i] < 0 || !(p[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char buf[65536];
      ssize_t got = ::read(fds[i], buf, sizeof(buf));
      if (got <= 0) {
        ::close(fds[i]);
        fds[i] = -1;
      } else if (sinks[i]->size() < options.maxOutput) {
        sinks[i]->append(buf, static_cast<size_t>(got));
      }
    }
    if (inFd >= 0 && (p[2].revents & (POLLOUT | POLLERR | POLLHUP))) {
      ssize_t w = ::write(inFd, options.stdinText.data() + inDone,
                          options.stdinText.size() - inDone);
      if (w > 0) inDone += static_cast<size_t>(w);
      if (w < 0 && errno != EAGAIN && errno != EINTR) inDone = options.stdinText.size();
      if (inDone >= options.stdinText.size()) {
        ::close(inFd);
        inFd = -1;
      }
    }
  }
  for (int fd : fds) {
    if (fd >= 0) ::close(fd);
  }
  if (inFd >= 0) ::close(inFd);
  if (r.timedOut) ::kill(-pid, SIGKILL);
  int status = 0;
  // The pipes closed, so the child is exiting; bound the wait anyway (a grandchild may hold
  // them open after the child is gone, or the child may close them and keep running).
  for (;;) {
    pid_t w = ::waitpid(pid, &status, r.timedOut ? 0 : WNOHANG);
    if (w == pid) break;
    if (w < 0 && errno != EINTR) break;
    if (msLeft(deadline) == 0) {
      r.timedOut = true;
      ::kill(-pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  r.exitCode = r.timedOut ? -1 : exitCodeOf(status);
  return r;
}

Child::~Child() { kill(); }

bool Child::start(const std::vector<std::string>& argv, const std::string& outputFile) {
  int inPipe[2], outPipe[2];
  if (::pipe2(inPipe, O_CLOEXEC) != 0) return false;
  if (::pipe2(outPipe, O_CLOEXEC) != 0) {
    ::close(inPipe[0]);
    ::close(inPipe[1]);
    return false;
  }
  int sink = outPipe[1];
  int file = -1;
  if (!outputFile.empty()) {
    file = ::open(outputFile.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (file >= 0) sink = file;
  }
  pid_ = spawn(argv, inPipe[0], sink, sink, {});
  if (file >= 0) ::close(file);
  ::close(inPipe[0]);
  ::close(outPipe[1]);
  in_ = inPipe[1];
  out_ = outPipe[0];
  if (pid_ < 0) {
    kill();
    return false;
  }
  return true;
}

bool Child::send(const std::string& text) {
  if (in_ < 0) return false;
  size_t done = 0;
  while (done < text.size()) {
    ssize_t w = ::write(in_, text.data() + done, text.size() - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    done += static_cast<size_t>(w);
  }
  return true;
}

void Child::closeStdin() {
  if (in_ >= 0) ::close(in_);
  in_ = -1;
}

std::optional<std::string> Child::readUntil(const std::string& needle,
                                            std::chrono::milliseconds wait) {
  auto deadline = Clock::now() + wait;
  while (buffered_.find(needle) == std::string::npos) {
    int ms = msLeft(deadline);
    if (ms == 0 || out_ < 0) return std::nullopt;
    pollfd p{out_, POLLIN, 0};
    int k = ::poll(&p, 1, ms);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) continue;
    char buf[4096];
    ssize_t got = ::read(out_, buf, sizeof(buf));
    if (got <= 0) {
      ::close(out_);
      out_ = -1;
      continue;
    }
    buffered_.append(buf, static_cast<size_t>(got));
  }
  return buffered_;
}

std::optional<int> Child::wait(std::chrono::milliseconds limit, std::string* out) {
  auto deadline = Clock::now() + limit;
  closeStdin();
  while (out_ >= 0 && msLeft(deadline) > 0) {
    pollfd p{out_, POLLIN, 0};
    int k = ::poll(&p, 1, msLeft(deadline));
    if (k <= 0) continue;
    char buf[65536];
    ssize_t got = ::read(out_, buf, sizeof(buf));
    if (got <= 0) {
      ::close(out_);
      out_ = -1;
    } else {
      buffered_.append(buf, static_cast<size_t>(got));
    }
  }
  if (out) *out = buffered_;
  while (pid_ > 0) {
    int status = 0;
    pid_t w = ::waitpid(pid_, &status, WNOHANG);
    if (w == pid_) {
      pid_ = -1;
      return exitCodeOf(status);
    }
    if (msLeft(deadline) == 0) return std::nullopt;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return std::nullopt;
}

void Child::kill() {
  closeStdin();
  if (out_ >= 0) ::close(out_);
  out_ = -1;
  if (pid_ > 0) {
    ::kill(-pid_, SIGKILL);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
  }
}

}  // namespace weft::e2e
