// A small HTTP/1.1 server for admin, readiness and metrics endpoints, on a libuv loop, over TCP
// or a unix socket. One request per connection (Connection: close); requests are bounded.
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>

#include "common/address.h"
#include "common/status.h"

namespace weft {

struct HttpRequest {
  std::string method;  // GET, POST, PUT
  std::string path;    // without the query
  std::string query;   // after '?', undecoded
  std::string body;
};

class HttpStreamWriter;
using HttpStreamWriterPtr = std::shared_ptr<HttpStreamWriter>;

struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
  // Set: a streaming response. The head goes out with Transfer-Encoding: chunked (no body),
  // the request timeout stops, and `stream` gets the writer for the chunks that follow.
  std::function<void(HttpStreamWriterPtr)> stream;
  // Bytes a streaming client may have queued and unsent before write() refuses more.
  size_t stream_max_queued = 256 * 1024;
};

// The body of a streaming response, one chunk per write(). Owned jointly by the connection and
// the producer; once the client is gone (or after finish()) writes are refused.
class HttpStreamWriter {
 public:
  virtual ~HttpStreamWriter() = default;
  // Queues `data` as one chunk. False, and nothing queued, when the client is gone or already
  // has stream_max_queued bytes waiting (a slow reader): the producer counts it as dropped.
  virtual bool write(std::string_view data) = 0;
  // Sends the last chunk and closes the connection once it is written.
  virtual void finish() = 0;
  virtual bool closed() const = 0;
  virtual size_t queuedBytes() const = 0;
  // Runs once when the connection ends (client gone, error, finish() done, server destroyed).
  virtual void onClose(std::function<void()> cb) = 0;
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

// A request query "a=1&b=x%2Fy" as a map, percent- and '+'-decoded. A malformed escape or a
// repeated key is an error naming it.
Result<std::map<std::string, std::string>> parseQuery(const std::string& query);

}  // namespace weft
