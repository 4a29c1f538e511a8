// A small HTTP/1.1 server for admin, readiness and metrics endpoints, on a libuv loop, over TCP
// or a unix socket. One request per connection (Connection: close); requests are bounded.
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/address.h"
#include "common/status.h"

namespace weft {

struct HttpRequest {
  std::string method;  // GET, POST, PUT
  std::string path;    // without the query
  std::string query;   // after '?', undecoded
  std::string body;
};

struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
};

using HttpHandler = std::function<HttpResponse(const HttpRequest&)>;

// Limits for untrusted requests: head + body bytes, and the time a client has to send its whole
// request (a slow or silent client is closed).
constexpr size_t kMaxAdminRequestBytes = 64 * 1024;
constexpr uint64_t kAdminRequestTimeoutMs = 10000;

class HttpAdminServer {
 public:
  virtual ~HttpAdminServer() = default;
  // Binds and listens; the server lives on `loop` until destroyed.
  static Result<std::unique_ptr<HttpAdminServer>> listenTcp(uv_loop_t* loop,
                                                            const SocketAddress& addr,
                                                            HttpHandler handler,
                                                            uint64_t timeout_ms =
                                                                kAdminRequestTimeoutMs);
  // Creates the socket file (replacing a stale one), mode 0600.
  static Result<std::unique_ptr<HttpAdminServer>> listenUnix(uv_loop_t* loop,
                                                             const std::string& path,
                                                             HttpHandler handler,
                                                             uint64_t timeout_ms =
                                                                 kAdminRequestTimeoutMs);
  // The bound address (for port 0 in tests).
  virtual SocketAddress boundAddress() const = 0;
};

using HttpAdminServerPtr = std::unique_ptr<HttpAdminServer>;

}  // namespace weft
