// weft-echo-client: opens N connections to weft-echo-server, each sending random bytes then
// half-closing, and verifies the returned SHA-256 and echo; prints a JSON summary.
#include <signal.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "tests/tools/echo_io.h"

namespace {

using weft::SocketAddress;
using weft::Status;
using namespace weft::echo;

constexpr size_t kMaxErrorsKept = 8;

struct Options {
  SocketAddress target;
  uint64_t count = 1;
  uint64_t minBytes = 0;
  uint64_t maxBytes = 1024;
  unsigned concurrency = 1;
  uint64_t seed = 1;
  unsigned intervalMs = 0;
  unsigned durationS = 0;
  unsigned timeoutS = 30;
};

struct Summary {
  std::mutex mu;
  uint64_t connections = 0, ok = 0, mismatches = 0, failures = 0;
  uint64_t bytesSent = 0, bytesReceived = 0;
  std::vector<std::string> errors;

  void record(uint64_t index, bool mismatch, const Status& st, uint64_t sent, uint64_t received) {
    std::lock_guard<std::mutex> lock(mu);
    ++connections;
    bytesSent += sent;
    bytesReceived += received;
    if (st) {
      ++ok;
      return;
    }
    (mismatch ? mismatches : failures) += 1;
    if (errors.size() < kMaxErrorsKept) {
      errors.push_back(fmt::format("connection {}: {}", index, st.message()));
    }
  }
};

// One connection: send `size` seeded random bytes, half-close, read the answer, verify it.
void runOne(const Options& o, uint64_t index, Summary* summary) {
  std::mt19937_64 rng(o.seed * 1000003u + index);
  std::uniform_int_distribution<uint64_t> sizeDist(o.minBytes, o.maxBytes);
  size_t size = sizeDist(rng);
  std::vector<uint8_t> payload(size);
  for (size_t i = 0; i < size; i += 8) {
    uint64_t v = rng();
    std::memcpy(payload.data() + i, &v, std::min<size_t>(8, size - i));
  }
  auto deadline = Clock::now() + std::chrono::seconds(o.timeoutS);
  uint64_t sent = 0;
  std::vector<uint8_t> answer;
  auto fail = [&](const Status& st, bool mismatch) {
    summary->record(index, mismatch, st, sent, answer.size());
  };
  auto fd = connectTo(o.target, deadline);
  if (!fd) return fail(fd.status(), false);
  if (auto st = writeAll(fd->get(), payload.data(), payload.size(), deadline); !st) {
    return fail(st, false);
  }
  sent = size;
  if (::shutdown(fd->get(), SHUT_WR) != 0) {
    return fail(Status::errorf("shutdown(SHUT_WR): {}", weft::errnoText(errno)), false);
  }
  if (auto st = readToEof(fd->get(), &answer, kDigestSize + size, deadline); !st) {
    // More bytes than sent + digest is a wrong answer, not a transport failure.
    bool tooMuch = st.message().find("more than") != std::string::npos;
    return fail(st, tooMuch);
  }
  auto digest = sha256(payload.data(), payload.size());
  if (!digest) return fail(digest.status(), false);
  if (answer.size() != kDigestSize + size) {
    return fail(Status::errorf("answer has {} bytes, expected {} (sent {})", answer.size(),
                               kDigestSize + size, size), true);
  }
  if (!std::equal(digest->begin(), digest->end(), answer.begin())) {
    return fail(Status::errorf("server's SHA-256 differs from the {} bytes sent", size), true);
  }
  if (!std::equal(payload.begin(), payload.end(), answer.begin() + kDigestSize)) {
    return fail(Status::errorf("echoed bytes differ from the {} bytes sent", size), true);
  }
  summary->record(index, false, Status::ok(), sent, answer.size());
}

// Count mode: `concurrency` workers share the N connections.
void runCount(const Options& o, Summary* summary) {
  std::atomic<uint64_t> next{0};
  std::vector<std::thread> workers;
  for (unsigned w = 0; w < std::max(1u, o.concurrency); ++w) {
    workers.emplace_back([&] {
      for (uint64_t i = next++; i < o.count; i = next++) runOne(o, i, summary);
    });
  }
  for (auto& t : workers) t.join();
}

// Interval mode: a new connection every intervalMs for durationS, each on its own thread so a
// slow one does not delay the schedule; at most `concurrency` in flight.
void runInterval(const Options& o, Summary* summary) {
  std::mutex mu;
  std::condition_variable cv;
  unsigned inFlight = 0;
  std::vector<std::thread> threads;
  auto start = Clock::now();
  auto end = start + std::chrono::seconds(o.durationS);
  for (uint64_t i = 0;; ++i) {
    auto at = start + std::chrono::milliseconds(uint64_t{o.intervalMs} * i);
    if (at >= end) break;
    std::this_thread::sleep_until(at);
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return inFlight < std::max(1u, o.concurrency); });
      ++inFlight;
    }
    threads.emplace_back([&, i] {
      runOne(o, i, summary);
      std::lock_guard<std::mutex> lock(mu);
      --inFlight;
      cv.notify_all();
    });
  }
  for (auto& t : threads) t.join();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Echo client for Weft tests: verifies SHA-256 + echo of random payloads"};
  Options o;
  std::string target;
  app.add_option("--target", target, "HOST:PORT or [V6]:PORT")->required();
  app.add_option("--count", o.count, "connections (count mode)");
  app.add_option("--min-bytes", o.minBytes, "smallest payload");
  app.add_option("--max-bytes", o.maxBytes, "largest payload (at most 8 MiB - the server cap)")
      ->check(CLI::Range(uint64_t{0}, uint64_t{8u << 20}));
  app.add_option("--concurrency", o.concurrency, "connections in flight")
      ->check(CLI::Range(1u, 256u));
  app.add_option("--seed", o.seed, "seed for payload sizes and bytes");
  app.add_option("--interval-ms", o.intervalMs, "interval mode: a new connection every X ms")
      ->check(CLI::Range(1u, 60000u));
  app.add_option("--duration-s", o.durationS, "interval mode: for D seconds")
      ->check(CLI::Range(1u, 3600u));
  app.add_option("--timeout-s", o.timeoutS, "per-connection time limit")
      ->check(CLI::Range(1u, 600u));
  CLI11_PARSE(app, argc, argv);
  auto parsed = SocketAddress::parse(target);
  if (!parsed || parsed->port() == 0) {
    std::fprintf(stderr, "--target %s: expected HOST:PORT with a numeric IP\n", target.c_str());
    return 2;
  }
  o.target = *parsed;
  if (o.minBytes > o.maxBytes) {
    std::fprintf(stderr, "--min-bytes is larger than --max-bytes\n");
    return 2;
  }
  bool interval = o.intervalMs > 0 || o.durationS > 0;
  if (interval && (o.intervalMs == 0 || o.durationS == 0)) {
    std::fprintf(stderr, "--interval-ms and --duration-s go together\n");
    return 2;
  }
  if (!interval && o.count > 1000000) {
    std::fprintf(stderr, "--count is limited to 1000000\n");
    return 2;
  }
  ::signal(SIGPIPE, SIG_IGN);
  Summary summary;
  auto started = Clock::now();
  if (interval) {
    runInterval(o, &summary);
  } else {
    runCount(o, &summary);
  }
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - started);
  nlohmann::json out = {
      {"target", o.target.toString()},    {"connections", summary.connections},
      {"ok", summary.ok},                 {"mismatches", summary.mismatches},
      {"failures", summary.failures},     {"bytes_sent", summary.bytesSent},
      {"bytes_received", summary.bytesReceived}, {"duration_ms", ms.count()},
      {"errors", summary.errors}};
  std::printf("%s\n", out.dump().c_str());
  bool allOk = summary.ok == summary.connections && summary.connections > 0;
  return allOk ? 0 : 1;
}
