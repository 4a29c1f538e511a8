// In-cluster configuration: environment, service-account files, flag overrides.
#include "agent/kube/kube_config.h"

#include <charconv>
#include <cstdlib>

#include "common/tls/tls.h"

namespace weft::agent::kube {

namespace {

Result<uint16_t> parsePort(const std::string& s, const std::string& what) {
  unsigned v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || p != s.data() + s.size() || v < 1 || v > 65535)
    return Status::errorf("{}: \"{}\" is not a port 1-65535", what, s);
  return static_cast<uint16_t>(v);
}

}  // namespace

Status parseServer(const std::string& server, KubeConfig* out) {
  std::string rest = server;
  if (rest.rfind("http://", 0) == 0)
    return Status::errorf("--kube-api-server {}: plain http is not allowed; use https://", server);
  if (rest.rfind("https://", 0) == 0) rest = rest.substr(8);
  while (!rest.empty() && rest.back() == '/') rest.pop_back();
  if (rest.empty() || rest.find('/') != std::string::npos)
    return Status::errorf("--kube-api-server {}: expected https://HOST[:PORT]", server);
  std::string host, port;
  if (rest.front() == '[') {
    size_t close = rest.find(']');
    if (close == std::string::npos)
      return Status::errorf("--kube-api-server {}: unclosed '['", server);
    host = rest.substr(1, close - 1);
    if (close + 1 < rest.size()) {
      if (rest[close + 1] != ':')
        return Status::errorf("--kube-api-server {}: expected ':' after ']'", server);
      port = rest.substr(close + 2);
    }
  } else {
    size_t colon = rest.rfind(':');
    if (colon != std::string::npos && rest.find(':') != colon)
      return Status::errorf("--kube-api-server {}: put an IPv6 address in [brackets]", server);
    host = rest.substr(0, colon);
    if (colon != std::string::npos) port = rest.substr(colon + 1);
  }
  if (host.empty()) return Status::errorf("--kube-api-server {}: no host", server);
  out->host = host;
  out->port = 443;
  if (!port.empty()) {
    auto p = parsePort(port, "--kube-api-server " + server);
    if (!p) return p.status();
    out->port = p.value();
  }
  return Status::ok();
}

Result<KubeConfig> loadKubeConfig(const KubeConfigFlags& flags) {
  KubeConfig cfg;
  if (!flags.server.empty()) {
    if (Status s = parseServer(flags.server, &cfg); !s) return s;
  } else {
    const char* host = std::getenv("KUBERNETES_SERVICE_HOST");
    const char* port = std::getenv("KUBERNETES_SERVICE_PORT");
    if (host == nullptr || *host == '\0' || port == nullptr || *port == '\0')
      return Status::error(
          "not in a cluster: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be set "
          "(or give --kube-api-server)");
    cfg.host = host;
    auto p = parsePort(port, "KUBERNETES_SERVICE_PORT");
    if (!p) return p.status();
    cfg.port = p.value();
  }
  if (!flags.token_file.empty()) cfg.token_file = flags.token_file;
  if (!flags.ca_file.empty()) cfg.ca_file = flags.ca_file;
  // Fail early on unreadable files; they are read again on every connect.
  if (auto t = readToken(cfg.token_file); !t) return t.status();
  if (auto ca = tls::readFile(cfg.ca_file, kMaxCaBytes); !ca)
    return ca.status().context("kubernetes CA file");
  return cfg;
}

Result<std::string> readToken(const std::string& path) {
  auto text = tls::readFile(path, kMaxTokenBytes);
  if (!text) return text.status().context("kubernetes token file");
  std::string t = text.value();
  auto space = [](char c) { return c == ' ' || c == '\n' || c == '\r' || c == '\t'; };
  while (!t.empty() && space(t.back())) t.pop_back();
  size_t start = 0;
  while (start < t.size() && space(t[start])) start++;
  t = t.substr(start);
  if (t.empty()) return Status::errorf("kubernetes token file {}: empty", path);
  for (char c : t)
    if (c < 0x21 || c > 0x7e)
      return Status::errorf("kubernetes token file {}: not a printable token", path);
  return t;
}

}  // namespace weft::agent::kube
