// How the agent reaches the Kubernetes API: the in-cluster configuration (service-account token,
// CA bundle, KUBERNETES_SERVICE_HOST/PORT), each part overridable by a flag.
#pragma once

#include <cstdint>
#include <string>

#include "common/status.h"

namespace weft::agent::kube {

constexpr const char* kServiceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount";
constexpr const char* kDefaultTokenFile = "/var/run/secrets/kubernetes.io/serviceaccount/token";
constexpr const char* kDefaultCaFile = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

// Limits on what is read from the service-account files.
constexpr size_t kMaxTokenBytes = 64 * 1024;
constexpr size_t kMaxCaBytes = 1024 * 1024;

struct KubeConfig {
  std::string host;  // an IP address (the usual in-cluster case) or a DNS name
  uint16_t port = 443;
  std::string token_file = kDefaultTokenFile;  // re-read on every connect (tokens rotate)
  std::string ca_file = kDefaultCaFile;        // the only roots the server is verified against
};

// Overrides from flags; empty = in-cluster default.
struct KubeConfigFlags {
  std::string server;  // "https://HOST:PORT", "https://[v6]:PORT" or "HOST:PORT"
  std::string token_file;
  std::string ca_file;
};

// The in-cluster configuration with the flag overrides applied. Without --kube-api-server,
// KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must both be set (as kubelet sets them).
Result<KubeConfig> loadKubeConfig(const KubeConfigFlags& flags);

// Parses "https://HOST[:PORT]" or "HOST:PORT" (IPv6 in brackets). Plain http is refused.
Status parseServer(const std::string& server, KubeConfig* out);

// The bearer token: the file's content without surrounding whitespace; bounded, non-empty,
// printable ASCII (it goes into a header).
Result<std::string> readToken(const std::string& path);

}  // namespace weft::agent::kube
