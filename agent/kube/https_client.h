// A small blocking HTTPS/1.1 client for the Kubernetes source's threads: TLS verified against the
// cluster CA, a bearer token, one GET per connection, bodies read whole (bounded) or line by
// line (a watch stream). Every wait also watches a wake fd, so stopping never hangs.
#pragma once

#include <openssl/ssl.h>

#include <chrono>
#include <map>
#include <memory>
#include <string>

#include "agent/kube/kube_config.h"
#include "common/fd.h"
#include "common/status.h"

namespace weft::agent::kube {

constexpr size_t kMaxResponseHeadBytes = 64 * 1024;

struct ResponseHead {
  int status = 0;
  std::string reason;
  std::map<std::string, std::string> headers;  // names lowercased
  bool chunked = false;
  int64_t content_length = -1;  // -1: not given (chunked or until close)
};

// What readLine() found.
struct BodyLine {
  enum Kind { kLine, kEnd, kTooLong } kind = kEnd;
  std::string text;  // kLine: the line without "\r\n"; kTooLong: empty (the line was dropped)
};

class HttpsConnection {
 public:
  using Clock = std::chrono::steady_clock;

  // Connects (TCP + TLS handshake, server verified against cfg.ca_file for cfg.host) within
  // `timeout`. `wake_fd` becoming readable aborts any wait with "stopping".
  static Result<std::unique_ptr<HttpsConnection>> connect(const KubeConfig& cfg, int wake_fd,
                                                          std::chrono::milliseconds timeout);
  ~HttpsConnection();
  HttpsConnection(const HttpsConnection&) = delete;
  HttpsConnection& operator=(const HttpsConnection&) = delete;

  // Sends "GET target" with the bearer token, then reads the response head.
  Result<ResponseHead> get(const std::string& target, const std::string& token,
                           std::chrono::milliseconds timeout);
  // The whole body, at most max_bytes, within timeout.
  Result<std::string> readBody(size_t max_bytes, std::chrono::milliseconds timeout);
  // The next "\n"-terminated line of the body. A line longer than max_bytes is skipped up to
  // its end and reported as kTooLong. `idle` bounds the wait for each line.
  Result<BodyLine> readLine(size_t max_bytes, std::chrono::milliseconds idle);

 private:
  HttpsConnection(UniqueFd fd, SSL_CTX* ctx, SSL* ssl, int wake_fd, std::string host_header);
  Status waitFor(short events, Clock::time_point deadline);
  Status handshake(Clock::time_point deadline);
  Status writeAll(const std::string& data, Clock::time_point deadline);
  // Appends what TLS has to raw_; false at a clean end of stream.
  Result<bool> fillRaw(Clock::time_point deadline);
  Result<std::string> rawLine(size_t max, Clock::time_point deadline);
  // Appends decoded body bytes to body_; false once the body has ended.
  Result<bool> fillBody(Clock::time_point deadline);

  UniqueFd fd_;
  SSL_CTX* ctx_;
  SSL* ssl_;
  int wake_fd_;
  std::string host_header_;
  std::string raw_;  // received, not yet decoded
  size_t raw_pos_ = 0;
  std::string body_;  // decoded body, not yet consumed
  ResponseHead head_;
  bool body_done_ = false;
  int64_t chunk_left_ = 0;   // bytes left in the current chunk
  bool chunk_crlf_ = false;  // a chunk's data ended; its CRLF is still to read
  int64_t length_left_ = 0;  // Content-Length bodies
  bool discarding_ = false;  // inside a too-long line
};

}  // namespace weft::agent::kube
