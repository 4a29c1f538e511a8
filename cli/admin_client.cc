// The admin HTTP clients: connect (unix or TCP), send one request, read the reply with poll()
// timeouts, de-chunk streaming bodies.
#include "cli/admin_client.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstring>

#include "common/address.h"
#include "common/fd.h"

namespace weft::cli {

namespace {

using Clock = std::chrono::steady_clock;

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(tolower(static_cast<unsigned char>(c)));
  return s;
}

int remainingMs(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return left.count() < 0 ? 0 : static_cast<int>(std::min<int64_t>(left.count(), 1 << 30));
}

// Non-blocking connect bounded by the deadline; the socket stays non-blocking.
Result<UniqueFd> connectTo(const AdminEndpoint& ep, Clock::time_point deadline) {
  sockaddr_storage ss{};
  socklen_t len = 0;
  int family = AF_UNIX;
  if (!ep.unix_path.empty()) {
    auto* sun = reinterpret_cast<sockaddr_un*>(&ss);
    sun->sun_family = AF_UNIX;
    if (ep.unix_path.size() >= sizeof(sun->sun_path))
      return Status::errorf("{}: path too long", ep.what);
    memcpy(sun->sun_path, ep.unix_path.c_str(), ep.unix_path.size() + 1);
    len = sizeof(sockaddr_un);
  } else {
    auto addr = SocketAddress::parse(ep.host_port);
    if (!addr) return Status::errorf("{}: not IP:PORT", ep.what);
    len = addr->toSockaddr(&ss);
    family = addr->family();
  }
  UniqueFd fd(::socket(family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd.valid()) return Status::errorf("{}: socket: {}", ep.what, errnoText(errno));
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&ss), len) != 0) {
    if (errno != EINPROGRESS && errno != EAGAIN)
      return Status::errorf("{}: connect: {}", ep.what, errnoText(errno));
    pollfd p{fd.get(), POLLOUT, 0};
    int n = ::poll(&p, 1, remainingMs(deadline));
    if (n == 0) return Status::errorf("{}: connect: timed out", ep.what);
    if (n < 0) return Status::errorf("{}: poll: {}", ep.what, errnoText(errno));
    int err = 0;
    socklen_t el = sizeof(err);
    ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &el);
    if (err != 0) return Status::errorf("{}: connect: {}", ep.what, errnoText(err));
  }
  return fd;
}

Status sendAll(int fd, const std::string& data, const AdminEndpoint& ep,
               Clock::time_point deadline) {
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::send(fd, data.data() + off, data.size() - off, MSG_NOSIGNAL);
    if (n > 0) {
      off += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno != EAGAIN && errno != EINTR)
      return Status::errorf("{}: send: {}", ep.what, errnoText(errno));
    pollfd p{fd, POLLOUT, 0};
    if (::poll(&p, 1, remainingMs(deadline)) <= 0)
      return Status::errorf("{}: send: timed out", ep.what);
  }
  return Status::ok();
}

// Reads what is there, waiting until the deadline. 0 = EOF; -1 = error (status set); -2 =
// deadline passed.
ssize_t readSome(int fd, char* buf, size_t n, Clock::time_point deadline, Status* st,
                 const AdminEndpoint& ep) {
  for (;;) {
    ssize_t r = ::recv(fd, buf, n, 0);
    if (r >= 0) return r;
    if (errno == EINTR) continue;
    if (errno != EAGAIN) {
      *st = Status::errorf("{}: read: {}", ep.what, errnoText(errno));
      return -1;
    }
    pollfd p{fd, POLLIN, 0};
    int ms = remainingMs(deadline);
    if (ms == 0) return -2;
    int pr = ::poll(&p, 1, ms);
    if (pr == 0) return -2;
    if (pr < 0 && errno != EINTR) {
      *st = Status::errorf("{}: poll: {}", ep.what, errnoText(errno));
      return -1;
    }
  }
}

struct Head {
  int status = 0;
  std::map<std::string, std::string> headers;
};

// Parses "HTTP/1.1 200 OK\r\nName: v\r\n..." (without the blank line).
Result<Head> parseHead(const std::string& head, const AdminEndpoint& ep) {
  Head h;
  size_t eol = head.find("\r\n");
  std::string line = head.substr(0, eol);
  if (line.rfind("HTTP/1.", 0) != 0 || line.size() < 12)
    return Status::errorf("{}: not an HTTP reply: {}", ep.what, line.substr(0, 80));
  auto [p, ec] = std::from_chars(line.data() + 9, line.data() + 12, h.status);
  if (ec != std::errc()) return Status::errorf("{}: bad status line: {}", ep.what, line);
  size_t pos = eol == std::string::npos ? head.size() : eol + 2;
  while (pos < head.size()) {
    size_t e = head.find("\r\n", pos);
    if (e == std::string::npos) e = head.size();
    std::string l = head.substr(pos, e - pos);
    pos = e + 2;
    size_t colon = l.find(':');
    if (colon == std::string::npos) continue;
    std::string v = l.substr(colon + 1);
    while (!v.empty() && (v.front() == ' ' || v.front() == '\t')) v.erase(0, 1);
    while (!v.empty() && (v.back() == ' ' || v.back() == '\t')) v.pop_back();
    h.headers[lower(l.substr(0, colon))] = v;
  }
  return h;
}

std::string requestText(const std::string& method, const std::string& path) {
  return method + " " + path +
         " HTTP/1.1\r\nHost: weftctl\r\nUser-Agent: weftctl\r\nContent-Length: 0\r\n"
         "Connection: close\r\n\r\n";
}

}  // namespace

AdminEndpoint AdminEndpoint::agent(const std::string& path) {
  AdminEndpoint e;
  e.unix_path = path;
  e.what = "agent admin socket " + path;
  return e;
}

Result<AdminEndpoint> AdminEndpoint::ztunnel(const std::string& text) {
  std::string t = text;
  if (t.rfind("http://", 0) == 0) t = t.substr(7);
  while (!t.empty() && t.back() == '/') t.pop_back();
  if (!t.empty() && t.find_first_not_of("0123456789") == std::string::npos)
    t = "127.0.0.1:" + t;
  if (!SocketAddress::parse(t))
    return Status::errorf("--ztunnel {}: want HOST:PORT (an IP address and port)", text);
  AdminEndpoint e;
  e.host_port = t;
  e.what = "ztunnel admin " + t;
  return e;
}

bool ChunkedDecoder::feed(const char* data, size_t n, std::string* out) {
  size_t i = 0;
  while (i < n && state_ != State::kDone && state_ != State::kBad) {
    switch (state_) {
      case State::kSize:
      case State::kTrailer:
      case State::kDataEnd: {
        char c = data[i++];
        line_.push_back(c);
        if (line_.size() > 1024) {
          error_ = "chunk line too long";
          state_ = State::kBad;
          break;
        }
        if (c != '\n') break;
        std::string l = line_;
        line_.clear();
        if (l.size() < 2 || l[l.size() - 2] != '\r') {
          error_ = "chunk line without CRLF";
          state_ = State::kBad;
          break;
        }
        l.resize(l.size() - 2);
        if (state_ == State::kDataEnd) {
          if (!l.empty()) {
            error_ = "chunk data longer than its size";
            state_ = State::kBad;
          } else {
            state_ = State::kSize;
          }
        } else if (state_ == State::kTrailer) {
          if (l.empty()) state_ = State::kDone;
        } else {
          size_t semi = l.find(';');
          std::string hex = l.substr(0, semi);
          size_t v = 0;
          auto [p, ec] = std::from_chars(hex.data(), hex.data() + hex.size(), v, 16);
          if (hex.empty() || ec != std::errc() || p != hex.data() + hex.size()) {
            error_ = "bad chunk size '" + hex + "'";
            state_ = State::kBad;
          } else if (v == 0) {
            state_ = State::kTrailer;
          } else {
            left_ = v;
            state_ = State::kData;
          }
        }
        break;
      }
      case State::kData: {
        size_t take = std::min(left_, n - i);
        out->append(data + i, take);
        i += take;
        left_ -= take;
        if (left_ == 0) state_ = State::kDataEnd;
        break;
      }
      default: break;
    }
  }
  return state_ != State::kBad;
}

Result<HttpReply> httpRequest(const AdminEndpoint& ep, const std::string& method,
                              const std::string& path, std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  auto fd = connectTo(ep, deadline);
  if (!fd) return fd.status();
  Status st = sendAll(fd->get(), requestText(method, path), ep, deadline);
  if (!st) return st;
  std::string raw;
  char buf[16384];
  for (;;) {
    ssize_t n = readSome(fd->get(), buf, sizeof(buf), deadline, &st, ep);
    if (n == -1) return st;
    if (n == -2) return Status::errorf("{}: no complete reply within {} ms", ep.what,
                                       timeout.count());
    if (n == 0) break;
    raw.append(buf, static_cast<size_t>(n));
    if (raw.size() > kMaxReplyBytes) return Status::errorf("{}: reply too large", ep.what);
  }
  size_t he = raw.find("\r\n\r\n");
  if (he == std::string::npos)
    return Status::errorf("{}: connection closed before a reply", ep.what);
  auto head = parseHead(raw.substr(0, he), ep);
  if (!head) return head.status();
  HttpReply r;
  r.status = head->status;
  r.headers = head->headers;
  std::string body = raw.substr(he + 4);
  if (lower(r.headers["transfer-encoding"]) == "chunked") {
    ChunkedDecoder d;
    if (!d.feed(body.data(), body.size(), &r.body))
      return Status::errorf("{}: {}", ep.what, d.error());
  } else {
    r.body = std::move(body);
  }
  return r;
}

Result<int> httpStream(const AdminEndpoint& ep, const std::string& path,
                       const std::function<bool(const std::string&)>& on_line,
                       std::chrono::milliseconds limit, std::string* error_body) {
  auto connect_deadline = Clock::now() + kDefaultTimeout;
  auto fd = connectTo(ep, connect_deadline);
  if (!fd) return fd.status();
  Status st = sendAll(fd->get(), requestText("GET", path), ep, connect_deadline);
  if (!st) return st;
  // The head must come quickly; the stream then runs until `limit`.
  auto end = limit.count() > 0 ? Clock::now() + limit : Clock::time_point::max();
  std::string raw, body, pending;
  Head head;
  bool have_head = false, chunked = false;
  ChunkedDecoder dec;
  char buf[16384];
  for (;;) {
    auto deadline = have_head ? end : std::min(end, connect_deadline);
    ssize_t n = readSome(fd->get(), buf, sizeof(buf), deadline, &st, ep);
    if (n == -1) return st;
    if (n == -2) {
      if (!have_head) return Status::errorf("{}: no reply within {} ms", ep.what,
                                            kDefaultTimeout.count());
      return head.status;  // the time limit: a normal end
    }
    if (n == 0) {
      if (!have_head) return Status::errorf("{}: connection closed before a reply", ep.what);
      if (head.status != 200 && error_body) *error_body = body + pending;
      return head.status;
    }
    if (!have_head) {
      raw.append(buf, static_cast<size_t>(n));
      size_t he = raw.find("\r\n\r\n");
      if (he == std::string::npos) {
        if (raw.size() > 65536) return Status::errorf("{}: reply head too large", ep.what);
        continue;
      }
      auto h = parseHead(raw.substr(0, he), ep);
      if (!h) return h.status();
      head = h.value();
      have_head = true;
      chunked = lower(head.headers["transfer-encoding"]) == "chunked";
      std::string rest = raw.substr(he + 4);
      raw.clear();
      if (chunked) {
        if (!dec.feed(rest.data(), rest.size(), &pending))
          return Status::errorf("{}: {}", ep.what, dec.error());
      } else {
        pending += rest;
      }
    } else if (chunked) {
      if (!dec.feed(buf, static_cast<size_t>(n), &pending))
        return Status::errorf("{}: {}", ep.what, dec.error());
    } else {
      pending.append(buf, static_cast<size_t>(n));
    }
    if (head.status != 200) {
      if (pending.size() > (1u << 20)) return Status::errorf("{}: error body too large", ep.what);
      continue;  // collected for *error_body at EOF
    }
    size_t nl;
    while ((nl = pending.find('\n')) != std::string::npos) {
      std::string line = pending.substr(0, nl);
      pending.erase(0, nl + 1);
      if (!on_line(line)) return head.status;
    }
    if (pending.size() > (1u << 20)) return Status::errorf("{}: line too long", ep.what);
    if (chunked && dec.done()) return head.status;
  }
}

std::string urlEncode(const std::string& s) {
  static const char* hex = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : s) {
    if (isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~' || c == ':') {
      out.push_back(static_cast<char>(c));
    } else {
      out.push_back('%');
      out.push_back(hex[c >> 4]);
      out.push_back(hex[c & 15]);
    }
  }
  return out;
}

}  // namespace weft::cli
