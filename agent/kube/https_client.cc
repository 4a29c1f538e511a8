// Blocking HTTPS/1.1 GET over a non-blocking socket: poll() on the socket and a wake fd, OpenSSL
// for TLS, chunked / Content-Length / until-close bodies.
#include "agent/kube/https_client.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>

#include "common/tls/tls.h"
#include "weft/version.h"

namespace weft::agent::kube {

namespace {

using Clock = HttpsConnection::Clock;

bool isIpLiteral(const std::string& host) {
  in6_addr a6;
  in_addr a4;
  return inet_pton(AF_INET, host.c_str(), &a4) == 1 || inet_pton(AF_INET6, host.c_str(), &a6) == 1;
}

int remainingMs(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return static_cast<int>(std::clamp<int64_t>(left.count(), 0, 1 << 30));
}

std::string lower(std::string s) {
  for (char& c : s)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return s;
}

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t");
  if (b == std::string::npos) return {};
  size_t e = s.find_last_not_of(" \t");
  return s.substr(b, e - b + 1);
}

// Waits for `events` on fd or readability of wake_fd, until the deadline.
Status pollFd(int fd, short events, int wake_fd, Clock::time_point deadline) {
  for (;;) {
    pollfd p[2] = {{fd, events, 0}, {wake_fd, POLLIN, 0}};
    int n = ::poll(p, wake_fd >= 0 ? 2 : 1, remainingMs(deadline));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::errorf("poll: {}", errnoText(errno));
    }
    if (wake_fd >= 0 && (p[1].revents & POLLIN)) return Status::error("stopping");
    if (n == 0) return Status::error("timed out");
    return Status::ok();
  }
}

Result<UniqueFd> tcpConnect(const KubeConfig& cfg, int wake_fd, Clock::time_point deadline) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  std::string port = std::to_string(cfg.port);
  // getaddrinfo blocks, but only this source's own thread.
  int rc = ::getaddrinfo(cfg.host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) return Status::errorf("resolve {}: {}", cfg.host, gai_strerror(rc));
  std::unique_ptr<addrinfo, decltype(&freeaddrinfo)> owner(res, freeaddrinfo);
  std::string last = "no address";
  for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
    int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      last = "socket: " + errnoText(errno);
      continue;
    }
    UniqueFd sock(fd);
    if (::connect(fd, ai->ai_addr, ai->ai_addrlen) != 0 && errno != EINPROGRESS) {
      last = "connect: " + errnoText(errno);
      continue;
    }
    if (Status s = pollFd(fd, POLLOUT, wake_fd, deadline); !s) {
      last = "connect: " + s.message();
      if (s.message() == "stopping") return s;
      continue;
    }
    int err = 0;
    socklen_t len = sizeof(err);
    if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
    if (err != 0) {
      last = "connect: " + errnoText(err);
      continue;
    }
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));  // best effort
    return sock;
  }
  return Status::errorf("{}:{}: {}", cfg.host, cfg.port, last);
}

}  // namespace

Result<std::unique_ptr<HttpsConnection>> HttpsConnection::connect(
    const KubeConfig& cfg, int wake_fd, std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  auto sock = tcpConnect(cfg, wake_fd, deadline);
  if (!sock) return sock.status();

  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  if (ctx == nullptr) return tls::opensslError("SSL_CTX_new");
  if (SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1) {
    SSL_CTX_free(ctx);
    return tls::opensslError("SSL_CTX_set_min_proto_version");
  }
  // Only the cluster CA: never the system roots.
  if (SSL_CTX_load_verify_locations(ctx, cfg.ca_file.c_str(), nullptr) != 1) {
    SSL_CTX_free(ctx);
    return tls::opensslError("kubernetes CA file " + cfg.ca_file);
  }
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nullptr);
  // A peer that closes without close_notify ends the stream; a truncated chunked body is still
  // caught by the chunk framing.
  SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
  SSL* ssl = SSL_new(ctx);
  if (ssl == nullptr) {
    SSL_CTX_free(ctx);
    return tls::opensslError("SSL_new");
  }
  std::string host_header = cfg.host.find(':') != std::string::npos
                                ? "[" + cfg.host + "]:" + std::to_string(cfg.port)
                                : cfg.host + ":" + std::to_string(cfg.port);
  std::unique_ptr<HttpsConnection> conn(
      new HttpsConnection(std::move(sock.value()), ctx, ssl, wake_fd, std::move(host_header)));
  X509_VERIFY_PARAM* param = SSL_get0_param(ssl);
  if (isIpLiteral(cfg.host)) {
    if (X509_VERIFY_PARAM_set1_ip_asc(param, cfg.host.c_str()) != 1)
      return tls::opensslError("verify IP " + cfg.host);
  } else {
    X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    if (SSL_set1_host(ssl, cfg.host.c_str()) != 1)
      return tls::opensslError("verify host " + cfg.host);
    if (SSL_set_tlsext_host_name(ssl, cfg.host.c_str()) != 1)
      return tls::opensslError("SNI " + cfg.host);
  }
  if (SSL_set_fd(ssl, conn->fd_.get()) != 1) return tls::opensslError("SSL_set_fd");
  if (Status s = conn->handshake(deadline); !s)
    return s.context(fmt::format("TLS to {}:{}", cfg.host, cfg.port));
  return conn;
}

HttpsConnection::HttpsConnection(UniqueFd fd, SSL_CTX* ctx, SSL* ssl, int wake_fd,
                                 std::string host_header)
    : fd_(std::move(fd)),
      ctx_(ctx),
      ssl_(ssl),
      wake_fd_(wake_fd),
      host_header_(std::move(host_header)) {}

HttpsConnection::~HttpsConnection() {
  SSL_free(ssl_);
  SSL_CTX_free(ctx_);
}

Status HttpsConnection::waitFor(short events, Clock::time_point deadline) {
  return pollFd(fd_.get(), events, wake_fd_, deadline);
}

Status HttpsConnection::handshake(Clock::time_point deadline) {
  for (;;) {
    ERR_clear_error();
    int rc = SSL_connect(ssl_);
    if (rc == 1) return Status::ok();
    int err = SSL_get_error(ssl_, rc);
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
      if (Status s = waitFor(err == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline); !s) return s;
      continue;
    }
    long verify = SSL_get_verify_result(ssl_);
    if (verify != X509_V_OK)
      return Status::errorf("server certificate not accepted: {}",
                            X509_verify_cert_error_string(verify));
    if (err == SSL_ERROR_SYSCALL && errno != 0)
      return Status::errorf("handshake: {}", errnoText(errno));
    return tls::opensslError("handshake");
  }
}

Status HttpsConnection::writeAll(const std::string& data, Clock::time_point deadline) {
  size_t off = 0;
  while (off < data.size()) {
    ERR_clear_error();
    size_t written = 0;
    int rc = SSL_write_ex(ssl_, data.data() + off, data.size() - off, &written);
    if (rc == 1) {
      off += written;
      continue;
    }
    int err = SSL_get_error(ssl_, rc);
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
      if (Status s = waitFor(err == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline); !s)
        return s.context("write");
      continue;
    }
    if (err == SSL_ERROR_SYSCALL && errno != 0)
      return Status::errorf("write: {}", errnoText(errno));
    return tls::opensslError("write");
  }
  return Status::ok();
}

Result<bool> HttpsConnection::fillRaw(Clock::time_point deadline) {
  if (raw_pos_ > 0 && raw_pos_ == raw_.size()) {
    raw_.clear();
    raw_pos_ = 0;
  }
  char buf[16384];
  for (;;) {
    ERR_clear_error();
    size_t got = 0;
    int rc = SSL_read_ex(ssl_, buf, sizeof(buf), &got);
    if (rc == 1) {
      raw_.append(buf, got);
      return true;
    }
    int err = SSL_get_error(ssl_, rc);
    if (err == SSL_ERROR_ZERO_RETURN) return false;
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
      if (Status s = waitFor(err == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline); !s)
        return s.context("read");
      continue;
    }
    if (err == SSL_ERROR_SYSCALL) {
      if (errno == 0) return false;  // EOF without close_notify
      return Status::errorf("read: {}", errnoText(errno));
    }
    return tls::opensslError("read");
  }
}

Result<std::string> HttpsConnection::rawLine(size_t max, Clock::time_point deadline) {
  for (;;) {
    size_t crlf = raw_.find("\r\n", raw_pos_);
    if (crlf != std::string::npos) {
      if (crlf - raw_pos_ > max) return Status::errorf("line longer than {} bytes", max);
      std::string line = raw_.substr(raw_pos_, crlf - raw_pos_);
      raw_pos_ = crlf + 2;
      return line;
    }
    if (raw_.size() - raw_pos_ > max) return Status::errorf("line longer than {} bytes", max);
    auto more = fillRaw(deadline);
    if (!more) return more.status();
    if (!more.value()) return Status::error("connection closed in the middle of a line");
  }
}

Result<ResponseHead> HttpsConnection::get(const std::string& target, const std::string& token,
                                          std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  std::string req = "GET " + target + " HTTP/1.1\r\nHost: " + host_header_ +
                    "\r\nAuthorization: Bearer " + token +
                    "\r\nAccept: application/json\r\nUser-Agent: weft-agent/" WEFT_VERSION
                    "\r\nConnection: close\r\n\r\n";
  if (Status s = writeAll(req, deadline); !s) return s;
  head_ = ResponseHead{};
  size_t total = 0;
  auto status_line = rawLine(kMaxResponseHeadBytes, deadline);
  if (!status_line) return status_line.status().context("response status line");
  // "HTTP/1.1 200 OK"
  const std::string& sl = status_line.value();
  if (sl.rfind("HTTP/1.", 0) != 0 || sl.size() < 12 || sl[8] != ' ')
    return Status::errorf("not an HTTP/1.x response: \"{}\"", sl.substr(0, 80));
  int code = 0;
  auto [p, ec] = std::from_chars(sl.data() + 9, sl.data() + 12, code);
  if (ec != std::errc() || p != sl.data() + 12 || code < 100 || code > 599)
    return Status::errorf("bad status line \"{}\"", sl.substr(0, 80));
  head_.status = code;
  head_.reason = sl.size() > 13 ? sl.substr(13) : "";
  for (int i = 0;; i++) {
    auto line = rawLine(kMaxResponseHeadBytes, deadline);
    if (!line) return line.status().context("response headers");
    if (line->empty()) break;
    total += line->size();
    if (total > kMaxResponseHeadBytes || i > 200)
      return Status::errorf("response headers larger than {} bytes", kMaxResponseHeadBytes);
    size_t colon = line->find(':');
    if (colon == std::string::npos || colon == 0)
      return Status::errorf("malformed header line \"{}\"", line->substr(0, 80));
    head_.headers[lower(line->substr(0, colon))] = trim(line->substr(colon + 1));
  }
  auto te = head_.headers.find("transfer-encoding");
  if (te != head_.headers.end()) {
    if (lower(te->second) != "chunked")
      return Status::errorf("unsupported Transfer-Encoding \"{}\"", te->second);
    head_.chunked = true;
  } else if (auto cl = head_.headers.find("content-length"); cl != head_.headers.end()) {
    int64_t n = -1;
    auto [q, e2] = std::from_chars(cl->second.data(), cl->second.data() + cl->second.size(), n);
    if (e2 != std::errc() || q != cl->second.data() + cl->second.size() || n < 0)
      return Status::errorf("bad Content-Length \"{}\"", cl->second);
    head_.content_length = n;
    length_left_ = n;
  }
  body_.clear();
  body_done_ = false;
  chunk_left_ = 0;
  chunk_crlf_ = false;
  discarding_ = false;
  return head_;
}

Result<bool> HttpsConnection::fillBody(Clock::time_point deadline) {
  if (body_done_) return false;
  auto takeRaw = [&](int64_t want) -> Result<int64_t> {
    if (raw_pos_ == raw_.size()) {
      auto more = fillRaw(deadline);
      if (!more) return more.status();
      if (!more.value()) return int64_t{0};
    }
    int64_t n = std::min<int64_t>(want, static_cast<int64_t>(raw_.size() - raw_pos_));
    body_.append(raw_, raw_pos_, static_cast<size_t>(n));
    raw_pos_ += static_cast<size_t>(n);
    return n;
  };
  if (head_.chunked) {
    if (chunk_left_ == 0) {
      if (chunk_crlf_) {
        auto crlf = rawLine(2, deadline);
        if (!crlf) return crlf.status().context("chunk end");
        if (!crlf->empty()) return Status::error("chunk data longer than its size");
        chunk_crlf_ = false;
      }
      auto size_line = rawLine(1024, deadline);
      if (!size_line) return size_line.status().context("chunk size");
      std::string hex = size_line->substr(0, size_line->find(';'));
      hex = trim(hex);
      int64_t size = -1;
      auto [p, ec] = std::from_chars(hex.data(), hex.data() + hex.size(), size, 16);
      if (hex.empty() || ec != std::errc() || p != hex.data() + hex.size() || size < 0)
        return Status::errorf("bad chunk size \"{}\"", size_line->substr(0, 40));
      if (size == 0) {
        for (int i = 0; i < 100; i++) {  // trailers, then the empty line
          auto t = rawLine(8192, deadline);
          if (!t) return t.status().context("chunk trailer");
          if (t->empty()) break;
        }
        body_done_ = true;
        return false;
      }
      chunk_left_ = size;
      chunk_crlf_ = true;
    }
    auto n = takeRaw(chunk_left_);
    if (!n) return n.status();
    if (n.value() == 0) return Status::error("connection closed in the middle of a chunk");
    chunk_left_ -= n.value();
    return true;
  }
  if (head_.content_length >= 0) {
    if (length_left_ == 0) {
      body_done_ = true;
      return false;
    }
    auto n = takeRaw(length_left_);
    if (!n) return n.status();
    if (n.value() == 0) return Status::error("connection closed before Content-Length bytes");
    length_left_ -= n.value();
    return true;
  }
  auto n = takeRaw(1 << 20);  // until the server closes
  if (!n) return n.status();
  if (n.value() == 0) {
    body_done_ = true;
    return false;
  }
  return true;
}

Result<std::string> HttpsConnection::readBody(size_t max_bytes, std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    if (body_.size() > max_bytes) return Status::errorf("body larger than {} bytes", max_bytes);
    auto more = fillBody(deadline);
    if (!more) return more.status();
    if (!more.value()) break;
  }
  return std::move(body_);
}

Result<BodyLine> HttpsConnection::readLine(size_t max_bytes, std::chrono::milliseconds idle) {
  const auto deadline = Clock::now() + idle;
  size_t scanned = 0;
  for (;;) {
    size_t nl = body_.find('\n', scanned);
    if (nl != std::string::npos) {
      BodyLine out;
      if (discarding_ || nl > max_bytes) {
        discarding_ = false;
        out.kind = BodyLine::kTooLong;
      } else {
        out.kind = BodyLine::kLine;
        out.text = body_.substr(0, nl);
        if (!out.text.empty() && out.text.back() == '\r') out.text.pop_back();
      }
      body_.erase(0, nl + 1);
      return out;
    }
    if (body_.size() > max_bytes) {
      discarding_ = true;  // keep reading to the end of this line, holding none of it
      body_.clear();
    }
    scanned = body_.size();
    auto more = fillBody(deadline);
    if (!more) return more.status();
    if (!more.value()) {
      BodyLine out;
      if (discarding_) {
        out.kind = BodyLine::kTooLong;
      } else if (!body_.empty()) {
        out.kind = BodyLine::kLine;  // the last line without its newline
        out.text = std::move(body_);
      }
      discarding_ = false;
      body_.clear();
      return out;
    }
  }
}

}  // namespace weft::agent::kube
