// Blocking HTTP/1.1 clients for the admin APIs weftctl talks to: the agent over its unix socket,
// the ztunnel over TCP. Every wait is bounded; errors name the socket or address.
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <string>

#include "common/status.h"

namespace weft::cli {

// Where an admin API listens: a unix socket path or host:port. `what` names it in errors
// ("agent admin socket /run/weft/agent.sock").
struct AdminEndpoint {
  std::string unix_path;  // set: unix socket
  std::string host_port;  // else: "127.0.0.1:15000" / "[::1]:15000"
  std::string what;

  static AdminEndpoint agent(const std::string& path);
  // Accepts "host:port", "http://host:port[/]" and a bare port.
  static Result<AdminEndpoint> ztunnel(const std::string& text);
};

struct HttpReply {
  int status = 0;
  std::map<std::string, std::string> headers;  // names lower-cased
  std::string body;                            // de-chunked
};

constexpr std::chrono::milliseconds kDefaultTimeout{5000};
constexpr size_t kMaxReplyBytes = 64u << 20;

// One request, read to the end. A failure to connect or a malformed reply is an error
// "<what>: <why>"; any HTTP status is a reply.
Result<HttpReply> httpRequest(const AdminEndpoint& ep, const std::string& method,
                              const std::string& path,
                              std::chrono::milliseconds timeout = kDefaultTimeout);

// A streaming GET: `on_line` gets each complete line of the (chunked) body without its newline,
// and returns false to stop. Ends at the end of the stream, when `on_line` says so, or after
// `limit` (zero: no limit). Returns the status (200 when the stream ran), or an error; a
// non-200 answer's body is put in `*error_body`.
Result<int> httpStream(const AdminEndpoint& ep, const std::string& path,
                       const std::function<bool(const std::string&)>& on_line,
                       std::chrono::milliseconds limit, std::string* error_body);

// Decodes a chunked body (RFC 9112 §7.1) incrementally: feed bytes, get body bytes out.
class ChunkedDecoder {
 public:
  // Appends decoded bytes to `out`; false on malformed input (`error()` says why).
  bool feed(const char* data, size_t n, std::string* out);
  bool done() const { return state_ == State::kDone; }
  const std::string& error() const { return error_; }

 private:
  enum class State { kSize, kData, kDataEnd, kTrailer, kDone, kBad };
  State state_ = State::kSize;
  std::string line_;
  size_t left_ = 0;
  std::string error_;
};

// "a/b c" -> "a%2Fb%20c" for query values.
std::string urlEncode(const std::string& s);

}  // namespace weft::cli
