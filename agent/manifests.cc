// Manifest parsing, validation and the per-file last-good merge of a manifest directory.
#include "agent/manifests.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <set>

#include "agent/authorization_policy.h"
#include "common/fd.h"
#include "common/log.h"

namespace weft::agent {

namespace {

// Validation failure inside one object; turned into the file-level message by the caller.
struct FieldError {
  std::string field;
  std::string what;
};

using Check = std::optional<FieldError>;

bool isDns1123Label(const std::string& s) {
  if (s.empty() || s.size() > 63) return false;
  for (char c : s)
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-')) return false;
  return s.front() != '-' && s.back() != '-';
}

bool isDns1123Subdomain(const std::string& s) {
  if (s.empty() || s.size() > 253) return false;
  size_t start = 0;
  while (start <= s.size()) {
    size_t dot = s.find('.', start);
    std::string part = s.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    if (!isDns1123Label(part)) return false;
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  return true;
}

// Kubernetes IANA_SVC_NAME: 1-15 of [a-z0-9-], at least one letter, no '-' at either end or
// twice in a row. What a named targetPort / containerPort name must be.
bool isPortName(const std::string& s) {
  if (s.empty() || s.size() > 15 || s.front() == '-' || s.back() == '-') return false;
  bool letter = false;
  for (size_t i = 0; i < s.size(); i++) {
    char c = s[i];
    if (c >= 'a' && c <= 'z') letter = true;
    else if (!((c >= '0' && c <= '9') || c == '-')) return false;
    if (c == '-' && i > 0 && s[i - 1] == '-') return false;
  }
  return letter;
}

// A scalar as a string; nullopt for maps, sequences and null.
std::optional<std::string> scalar(const YAML::Node& n) {
  if (!n.IsDefined() || !n.IsScalar()) return std::nullopt;
  return n.Scalar();
}

std::optional<int64_t> integer(const YAML::Node& n) {
  auto s = scalar(n);
  if (!s || s->empty() || n.Tag() == "!") return std::nullopt;  // "!" = quoted: a string
  int64_t v = 0;
  auto [p, ec] = std::from_chars(s->data(), s->data() + s->size(), v);
  if (ec != std::errc() || p != s->data() + s->size()) return std::nullopt;
  return v;
}

Check optionalString(const YAML::Node& parent, const char* key, const std::string& path,
                     std::string* out) {
  YAML::Node n = parent[key];
  if (!n.IsDefined() || n.IsNull()) return std::nullopt;
  auto s = scalar(n);
  if (!s) return FieldError{path, "must be a string"};
  *out = *s;
  return std::nullopt;
}

Check stringMap(const YAML::Node& parent, const char* key, const std::string& path, Labels* out) {
  YAML::Node n = parent[key];
  if (!n.IsDefined() || n.IsNull()) return std::nullopt;
  if (!n.IsMap()) return FieldError{path, "must be a mapping of strings"};
  for (auto it = n.begin(); it != n.end(); ++it) {
    auto k = scalar(it->first);
    if (!k || k->empty()) return FieldError{path, "keys must be non-empty strings"};
    auto v = it->second.IsNull() ? std::optional<std::string>("") : scalar(it->second);
    if (!v) return FieldError{path + "." + *k, "must be a string"};
    (*out)[*k] = *v;
  }
  return std::nullopt;
}

Check parseIp(const YAML::Node& n, const std::string& path, IpAddr* out) {
  auto s = scalar(n);
  if (!s) return FieldError{path, "required, an IP address"};
  auto ip = IpAddr::parse(*s);
  if (!ip) return FieldError{path, "\"" + *s + "\" is not a valid IP address"};
  *out = *ip;
  return std::nullopt;
}

// metadata: name (required), namespace (default "default" if namespaced), labels, annotations,
// uid (derived if absent).
Check parseMeta(const YAML::Node& doc, const std::string& kind, bool namespaced,
                ObjectMeta* meta) {
  YAML::Node m = doc["metadata"];
  if (!m.IsDefined() || !m.IsMap()) return FieldError{"metadata", "required, a mapping"};
  auto name = scalar(m["name"]);
  if (!name || name->empty()) return FieldError{"metadata.name", "required"};
  meta->name = *name;
  if (namespaced) {
    meta->namespace_ = "default";
    if (auto e = optionalString(m, "namespace", "metadata.namespace", &meta->namespace_)) return e;
    if (!isDns1123Label(meta->namespace_))
      return FieldError{"metadata.namespace", "\"" + meta->namespace_ +
                                                  "\" is not a valid namespace name"};
    if (!isDns1123Subdomain(meta->name))
      return FieldError{"metadata.name", "\"" + meta->name +
                                             "\" is not a lowercase DNS-1123 name"};
  } else {
    if (!isDns1123Label(meta->name))
      return FieldError{"metadata.name",
                        "\"" + meta->name + "\" is not a lowercase DNS-1123 label"};
  }
  if (auto e = stringMap(m, "labels", "metadata.labels", &meta->labels)) return e;
  if (auto e = stringMap(m, "annotations", "metadata.annotations", &meta->annotations)) return e;
  if (auto e = optionalString(m, "uid", "metadata.uid", &meta->uid)) return e;
  if (meta->uid.empty()) meta->uid = deriveUid(kind, meta->namespace_, meta->name);
  return std::nullopt;
}

// spec.containers[].ports[]: the named ones, which a Service's named targetPort resolves to.
Check parseContainerPorts(const YAML::Node& spec, Pod* pod) {
  YAML::Node containers = spec["containers"];
  if (!containers.IsDefined() || containers.IsNull()) return std::nullopt;
  if (!containers.IsSequence()) return FieldError{"spec.containers", "must be a list"};
  for (size_t c = 0; c < containers.size(); c++) {
    const std::string cpath = "spec.containers[" + std::to_string(c) + "]";
    if (!containers[c].IsMap()) return FieldError{cpath, "must be a mapping"};
    YAML::Node ports = containers[c]["ports"];
    if (!ports.IsDefined() || ports.IsNull()) continue;
    if (!ports.IsSequence()) return FieldError{cpath + ".ports", "must be a list"};
    for (size_t i = 0; i < ports.size(); i++) {
      const std::string path = cpath + ".ports[" + std::to_string(i) + "]";
      if (!ports[i].IsMap()) return FieldError{path, "must be a mapping"};
      auto n = integer(ports[i]["containerPort"]);
      if (!n || *n < 1 || *n > 65535)
        return FieldError{path + ".containerPort", "required, an integer 1-65535"};
      ContainerPort cp;
      cp.port = static_cast<uint16_t>(*n);
      if (auto e = optionalString(ports[i], "protocol", path + ".protocol", &cp.protocol))
        return e;
      if (cp.protocol.empty()) cp.protocol = "TCP";
      std::string name;
      if (auto e = optionalString(ports[i], "name", path + ".name", &name)) return e;
      if (name.empty()) continue;
      if (!isPortName(name))
        return FieldError{path + ".name", "\"" + name + "\" is not a port name (IANA_SVC_NAME)"};
      pod->named_ports.emplace(name, cp);  // Kubernetes' FindPort takes the first
    }
  }
  return std::nullopt;
}

Check parsePod(const YAML::Node& doc, Pod* pod, bool require_ips) {
  YAML::Node spec = doc["spec"];
  if (!spec.IsDefined() || !spec.IsMap()) return FieldError{"spec", "required, a mapping"};
  auto node = scalar(spec["nodeName"]);
  if (!node || node->empty()) return FieldError{"spec.nodeName", "required"};
  pod->node_name = *node;
  if (auto e = optionalString(spec, "serviceAccountName", "spec.serviceAccountName",
                              &pod->service_account))
    return e;
  if (pod->service_account.empty()) pod->service_account = "default";
  if (!isDns1123Subdomain(pod->service_account))
    return FieldError{"spec.serviceAccountName",
                      "\"" + pod->service_account + "\" is not a valid service account name"};
  if (auto e = parseContainerPorts(spec, pod)) return e;
  YAML::Node status = doc["status"];
  if (!require_ips && (!status.IsDefined() || !status.IsMap() || !status["podIPs"].IsDefined()))
    return std::nullopt;
  if (!status.IsDefined() || !status.IsMap())
    return FieldError{"status.podIPs", "required, at least one IP"};
  YAML::Node ips = status["podIPs"];
  if (!ips.IsDefined() || !ips.IsSequence() || ips.size() == 0)
    return FieldError{"status.podIPs", "required, a list of at least one {ip: ...}"};
  for (size_t i = 0; i < ips.size(); i++) {
    std::string path = "status.podIPs[" + std::to_string(i) + "].ip";
    if (!ips[i].IsMap()) return FieldError{"status.podIPs[" + std::to_string(i) + "]",
                                           "must be a mapping with ip"};
    IpAddr ip;
    if (auto e = parseIp(ips[i]["ip"], path, &ip)) return e;
    for (const IpAddr& seen : pod->ips) {
      if (seen == ip) return FieldError{path, "duplicate IP " + ip.toString()};
      if (seen.family() == ip.family())
        return FieldError{path, "more than one IP of the same family"};
    }
    pod->ips.push_back(ip);
  }
  return std::nullopt;
}

Check parsePort(const YAML::Node& n, const std::string& path, ServicePort* port) {
  if (!n.IsMap()) return FieldError{path, "must be a mapping"};
  auto p = integer(n["port"]);
  if (!n["port"].IsDefined()) return FieldError{path + ".port", "required"};
  if (!p || *p < 1 || *p > 65535)
    return FieldError{path + ".port", "must be an integer 1-65535"};
  port->port = static_cast<uint16_t>(*p);
  port->target_port = port->port;
  YAML::Node tp = n["targetPort"];
  if (tp.IsDefined() && !tp.IsNull()) {
    auto t = integer(tp);
    auto s = scalar(tp);
    if (t) {
      if (*t < 1 || *t > 65535) return FieldError{path + ".targetPort", "must be 1-65535"};
      port->target_port = static_cast<uint16_t>(*t);
    } else if (s && isPortName(*s)) {
      // A named port: resolved per endpoint (its container ports, or its EndpointSlice).
      port->target_port = 0;
      port->target_port_name = *s;
    } else {
      return FieldError{path + ".targetPort",
                        s ? "\"" + *s + "\" is neither a port number nor a port name (a name "
                                       "has 1-15 of a-z, 0-9, '-' and at least one letter)"
                          : std::string("must be an integer 1-65535 or a port name")};
    }
  }
  if (auto e = optionalString(n, "protocol", path + ".protocol", &port->protocol)) return e;
  if (port->protocol.empty()) port->protocol = "TCP";
  if (port->protocol != "TCP" && port->protocol != "UDP")
    return FieldError{path + ".protocol", "\"" + port->protocol + "\" is not TCP or UDP"};
  if (auto e = optionalString(n, "name", path + ".name", &port->name)) return e;
  return std::nullopt;
}

Check parseService(const YAML::Node& doc, Service* svc) {
  YAML::Node spec = doc["spec"];
  if (!spec.IsDefined() || !spec.IsMap()) return FieldError{"spec", "required, a mapping"};
  if (auto e = stringMap(spec, "selector", "spec.selector", &svc->selector)) return e;
  YAML::Node ports = spec["ports"];
  if (ports.IsDefined() && !ports.IsNull()) {
    if (!ports.IsSequence()) return FieldError{"spec.ports", "must be a list"};
    for (size_t i = 0; i < ports.size(); i++) {
      ServicePort port;
      std::string path = "spec.ports[" + std::to_string(i) + "]";
      if (auto e = parsePort(ports[i], path, &port)) return e;
      for (const ServicePort& seen : svc->ports) {
        if (seen.port == port.port && seen.protocol == port.protocol)
          return FieldError{path + ".port", "duplicate " + port.protocol + " port " +
                                                std::to_string(port.port)};
        if (!port.name.empty() && seen.name == port.name)
          return FieldError{path + ".name", "duplicate port name \"" + port.name + "\""};
      }
      svc->ports.push_back(port);
    }
  }
  std::string cluster_ip;
  if (auto e = optionalString(spec, "clusterIP", "spec.clusterIP", &cluster_ip)) return e;
  std::vector<std::string> ips;
  YAML::Node list = spec["clusterIPs"];
  if (list.IsDefined() && !list.IsNull()) {
    if (!list.IsSequence()) return FieldError{"spec.clusterIPs", "must be a list"};
    for (size_t i = 0; i < list.size(); i++) {
      auto s = scalar(list[i]);
      if (!s) return FieldError{"spec.clusterIPs[" + std::to_string(i) + "]", "must be a string"};
      ips.push_back(*s);
    }
    if (!cluster_ip.empty() && !ips.empty() && ips[0] != cluster_ip)
      return FieldError{"spec.clusterIPs[0]", "must equal spec.clusterIP"};
  } else if (!cluster_ip.empty()) {
    ips.push_back(cluster_ip);
  }
  for (size_t i = 0; i < ips.size(); i++) {
    std::string path = list.IsDefined() ? "spec.clusterIPs[" + std::to_string(i) + "]"
                                        : std::string("spec.clusterIP");
    if (ips[i] == "None") {
      if (ips.size() != 1) return FieldError{path, "\"None\" must be the only cluster IP"};
      svc->headless = true;
      continue;
    }
    auto ip = IpAddr::parse(ips[i]);
    if (!ip) return FieldError{path, "\"" + ips[i] + "\" is not a valid IP address or \"None\""};
    for (const IpAddr& seen : svc->cluster_ips)
      if (seen.family() == ip->family())
        return FieldError{path, "more than one IP of the same family"};
    svc->cluster_ips.push_back(*ip);
  }
  std::string lb_error;
  if (!serviceLoadBalancer(*svc, &lb_error))
    return FieldError{std::string("metadata.annotations.") + kLoadBalancerAnnotation, lb_error};
  return std::nullopt;
}

// A PeerAuthentication applies to its whole namespace; the parts of Istio's shape that would
// narrow it are refused, not ignored, so nobody believes a policy is narrower than it is.
constexpr const char* kNoSelectors =
    "not supported: a PeerAuthentication applies to its whole namespace (mesh-wide in "
    "weft-system); workload selectors are not implemented";

Check parseMtlsMode(const YAML::Node& mtls, MtlsMode* out) {
  *out = MtlsMode::kUnset;
  if (!mtls.IsDefined() || mtls.IsNull()) return std::nullopt;
  if (!mtls.IsMap()) return FieldError{"spec.mtls", "must be a mapping with mode"};
  for (auto it = mtls.begin(); it != mtls.end(); ++it) {
    auto k = scalar(it->first);
    if (!k || *k != "mode")
      return FieldError{"spec.mtls" + (k ? "." + *k : std::string()),
                        "unknown field (known: mode)"};
  }
  YAML::Node n = mtls["mode"];
  if (!n.IsDefined() || n.IsNull()) return std::nullopt;
  auto mode = scalar(n);
  if (!mode) return FieldError{"spec.mtls.mode", "must be a string: PERMISSIVE, STRICT or UNSET"};
  if (*mode == "UNSET") *out = MtlsMode::kUnset;
  else if (*mode == "PERMISSIVE") *out = MtlsMode::kPermissive;
  else if (*mode == "STRICT") *out = MtlsMode::kStrict;
  else if (*mode == "DISABLE")
    return FieldError{"spec.mtls.mode",
                      "DISABLE is not supported (mesh pods always accept mTLS); use PERMISSIVE"};
  else
    return FieldError{"spec.mtls.mode",
                      "\"" + *mode + "\" is not a mode: PERMISSIVE, STRICT or UNSET"};
  return std::nullopt;
}

Check parsePeerAuthentication(const YAML::Node& doc, PeerAuthentication* pa) {
  // Namespace-wide by definition, so the namespace is never defaulted.
  auto ns = scalar(doc["metadata"]["namespace"]);
  if (!ns || ns->empty()) {
    pa->meta.namespace_.clear();
    return FieldError{"metadata.namespace",
                      "required (the namespace it applies to; weft-system = mesh-wide)"};
  }
  if (doc["selector"].IsDefined()) return FieldError{"selector", kNoSelectors};
  YAML::Node spec = doc["spec"];
  if (!spec.IsDefined() || spec.IsNull()) return std::nullopt;  // no mode: UNSET, inherits
  if (!spec.IsMap()) return FieldError{"spec", "must be a mapping"};
  for (auto it = spec.begin(); it != spec.end(); ++it) {
    auto k = scalar(it->first);
    if (k && *k == "selector") return FieldError{"spec.selector", kNoSelectors};
    if (k && *k == "portLevelMtls")
      return FieldError{"spec.portLevelMtls",
                        "not supported: the mode applies to every port of the namespace's pods"};
    if (!k || *k != "mtls")
      return FieldError{"spec" + (k ? "." + *k : std::string()), "unknown field (known: mtls)"};
  }
  return parseMtlsMode(spec["mtls"], &pa->mode);
}

// Checks apiVersion for PeerAuthentication: absent or security.weft.dev/v1.
Check securityApiVersion(const YAML::Node& doc) {
  YAML::Node v = doc["apiVersion"];
  if (!v.IsDefined() || v.IsNull()) return std::nullopt;
  auto s = scalar(v);
  if (!s || *s != "security.weft.dev/v1")
    return FieldError{"apiVersion", "must be security.weft.dev/v1"};
  return std::nullopt;
}

std::string describe(const std::string& kind, const ObjectMeta& meta) {
  if (meta.name.empty()) return kind;
  return meta.namespace_.empty() ? kind + " " + meta.name
                                 : kind + " " + meta.namespace_ + "/" + meta.name;
}

// Checks apiVersion for a core kind: absent or "v1".
Check coreApiVersion(const YAML::Node& doc) {
  YAML::Node v = doc["apiVersion"];
  if (!v.IsDefined() || v.IsNull()) return std::nullopt;
  auto s = scalar(v);
  if (!s || *s != "v1") return FieldError{"apiVersion", "must be v1"};
  return std::nullopt;
}

// One object of a core kind: metadata, apiVersion, then the kind's own fields.
Check parseNamespaceFields(const YAML::Node& doc, Namespace* ns) {
  Check err = parseMeta(doc, "Namespace", false, &ns->meta);
  if (!err) err = coreApiVersion(doc);
  return err;
}

Check parsePodFields(const YAML::Node& doc, Pod* pod) {
  Check err = parseMeta(doc, "Pod", true, &pod->meta);
  if (!err) err = coreApiVersion(doc);
  if (!err) err = parsePod(doc, pod, true);
  return err;
}

Check parsePendingPodFields(const YAML::Node& doc, Pod* pod) {
  Check err = parseMeta(doc, "Pod", true, &pod->meta);
  if (!err) err = coreApiVersion(doc);
  if (!err) err = parsePod(doc, pod, false);
  return err;
}

Check parsePeerAuthenticationFields(const YAML::Node& doc, PeerAuthentication* pa) {
  Check err = parseMeta(doc, "PeerAuthentication", true, &pa->meta);
  if (!err) err = securityApiVersion(doc);
  if (!err) err = parsePeerAuthentication(doc, pa);
  return err;
}

Check parseAuthorizationPolicyFields(const YAML::Node& doc, AuthorizationPolicy* ap) {
  Check err = parseMeta(doc, "AuthorizationPolicy", true, &ap->meta);
  if (!err) err = securityApiVersion(doc);
  if (!err) {
    if (auto e = parseAuthorizationPolicy(doc, ap)) err = FieldError{e->field, e->what};
  }
  return err;
}

Check parseServiceFields(const YAML::Node& doc, Service* svc) {
  Check err = parseMeta(doc, "Service", true, &svc->meta);
  if (!err) err = coreApiVersion(doc);
  if (!err) err = parseService(doc, svc);
  return err;
}

Status parseDocuments(const std::string& file, const std::vector<YAML::Node>& docs,
                      ManifestObjects* out) {
  std::set<std::string> seen;  // "Kind ns/name" within this file
  for (size_t i = 0; i < docs.size(); i++) {
    const YAML::Node& doc = docs[i];
    if (!doc.IsDefined() || doc.IsNull()) continue;  // empty document ("---" at the end)
    const std::string where = file + ": document " + std::to_string(i + 1);
    if (!doc.IsMap()) return Status::error(where + ": not a mapping");
    auto kind = scalar(doc["kind"]);
    if (!kind || kind->empty()) return Status::error(where + ": kind: required");
    ObjectMeta meta;
    Check err;
    if (*kind == "Namespace") {
      Namespace ns;
      err = parseNamespaceFields(doc, &ns);
      meta = ns.meta;
      if (!err) out->namespaces.push_back(std::move(ns));
    } else if (*kind == "Pod") {
      Pod pod;
      err = parsePodFields(doc, &pod);
      meta = pod.meta;
      if (!err) out->pods.push_back(std::move(pod));
    } else if (*kind == "Service") {
      Service svc;
      err = parseServiceFields(doc, &svc);
      meta = svc.meta;
      if (!err) out->services.push_back(std::move(svc));
    } else if (*kind == "PeerAuthentication") {
      PeerAuthentication pa;
      err = parsePeerAuthenticationFields(doc, &pa);
      if (!err) {
        for (const PeerAuthentication& other : out->peer_authentications)
          if (other.meta.namespace_ == pa.meta.namespace_ && other.meta.name != pa.meta.name)
            err = FieldError{"metadata.namespace",
                             "namespace " + pa.meta.namespace_ +
                                 " already has PeerAuthentication " +
                                 objectKey(other.meta.namespace_, other.meta.name) +
                                 " in this file; only one per namespace"};
      }
      meta = pa.meta;
      if (!err) out->peer_authentications.push_back(std::move(pa));
    } else if (*kind == "AuthorizationPolicy") {
      AuthorizationPolicy ap;
      err = parseAuthorizationPolicyFields(doc, &ap);
      meta = ap.meta;
      if (!err) out->authorization_policies.push_back(std::move(ap));
    } else {
      // Name the object as well as it can be named, so the user finds it in the file.
      (void)parseMeta(doc, *kind, true, &meta);
      const std::string who = meta.name.empty() ? where : file + ": " + describe(*kind, meta);
      return Status::error(who + ": kind: unknown kind \"" + *kind +
                           "\" (known: Namespace, Pod, Service, PeerAuthentication, "
                           "AuthorizationPolicy)");
    }
    const std::string object = describe(*kind, meta);
    if (err) {
      const std::string who = meta.name.empty() ? object + " (document " +
                                                      std::to_string(i + 1) + ")"
                                                : object;
      return Status::error(file + ": " + who + ": " + err->field + ": " + err->what);
    }
    if (!seen.insert(object).second)
      return Status::error(file + ": " + object + ": metadata.name: defined twice in this file");
  }
  return Status::ok();
}

int64_t mtimeNs(const struct stat& st) {
  return static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
}

bool isManifestName(const std::string& name) {
  if (name.empty() || name[0] == '.') return false;  // hidden, editor temp, ConfigMap ..data
  auto ends = [&](const std::string& suffix) {
    return name.size() > suffix.size() &&
           name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  return ends(".yaml") || ends(".yml");
}

Result<std::string> readBounded(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::errorf("{}: {}", path, errnoText(errno));
  UniqueFd owner(fd);
  std::string text;
  char buf[65536];
  while (true) {
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::errorf("{}: read: {}", path, errnoText(errno));
    }
    if (n == 0) break;
    if (text.size() + static_cast<size_t>(n) > kMaxManifestFileBytes)
      return Status::errorf("{}: larger than {} bytes", path, kMaxManifestFileBytes);
    text.append(buf, static_cast<size_t>(n));
  }
  return text;
}

}  // namespace

Result<ManifestObjects> parseManifest(const std::string& file, const std::string& text) {
  std::vector<YAML::Node> docs;
  try {
    docs = YAML::LoadAll(text);
  } catch (const YAML::ParserException& e) {
    return Status::errorf("{}: line {}, column {}: {}", file, e.mark.line + 1, e.mark.column + 1,
                          e.msg);
  } catch (const YAML::Exception& e) {
    return Status::errorf("{}: {}", file, e.what());
  }
  ManifestObjects out;
  try {
    Status s = parseDocuments(file, docs, &out);
    if (!s) return s;
  } catch (const YAML::Exception& e) {
    // Only reached on a yaml-cpp surprise (the checks above test types before converting).
    return Status::errorf("{}: {}", file, e.what());
  }
  return out;
}

namespace {

// parseXxxObject: the kind check, the fields, and the "<Kind> ns/name: field: what" message.
template <typename T>
Result<T> parseObject(const YAML::Node& doc, const char* kind, Check (*fields)(const YAML::Node&,
                                                                               T*)) {
  T out;
  try {
    if (!doc.IsDefined() || !doc.IsMap()) return Status::errorf("{}: not a mapping", kind);
    YAML::Node k = doc["kind"];
    if (k.IsDefined() && !k.IsNull()) {
      auto s = scalar(k);
      if (!s || *s != kind)
        return Status::errorf("{}: kind: \"{}\" where {} was expected", kind, s ? *s : "?", kind);
    }
    if (Check err = fields(doc, &out))
      return Status::error(describe(kind, out.meta) + ": " + err->field + ": " + err->what);
  } catch (const YAML::Exception& e) {
    return Status::errorf("{}: {}", describe(kind, out.meta), e.what());
  }
  return out;
}

}  // namespace

Result<Namespace> parseNamespaceObject(const YAML::Node& doc) {
  return parseObject<Namespace>(doc, "Namespace", parseNamespaceFields);
}

Result<Pod> parsePodObject(const YAML::Node& doc) {
  return parseObject<Pod>(doc, "Pod", parsePodFields);
}

Result<Service> parseServiceObject(const YAML::Node& doc) {
  return parseObject<Service>(doc, "Service", parseServiceFields);
}

Result<Pod> parsePendingPodObject(const YAML::Node& doc) {
  return parseObject<Pod>(doc, "Pod", parsePendingPodFields);
}

Result<PeerAuthentication> parsePeerAuthenticationObject(const YAML::Node& doc) {
  return parseObject<PeerAuthentication>(doc, "PeerAuthentication",
                                         parsePeerAuthenticationFields);
}

Result<AuthorizationPolicy> parseAuthorizationPolicyObject(const YAML::Node& doc) {
  return parseObject<AuthorizationPolicy>(doc, "AuthorizationPolicy",
                                          parseAuthorizationPolicyFields);
}

ManifestSource::ManifestSource(std::string dir) : dir_(std::move(dir)) {}

std::vector<std::string> ManifestSource::errors() const {
  std::vector<std::string> out;
  if (!dir_error_.empty()) out.push_back(dir_error_);
  for (const auto& [file, st] : files_)
    if (!st.error.empty()) out.push_back(st.error);
  return out;
}

std::string ManifestSource::findDuplicate(const std::string& file,
                                          const ManifestObjects& objects) const {
  for (const auto& [other, st] : files_) {
    if (other == file || !st.has_good) continue;
    for (const Namespace& a : objects.namespaces)
      for (const Namespace& b : st.good.namespaces)
        if (a.meta.name == b.meta.name)
          return file + ": Namespace " + a.meta.name + ": also defined in " + other;
    for (const Pod& a : objects.pods)
      for (const Pod& b : st.good.pods)
        if (a.meta.name == b.meta.name && a.meta.namespace_ == b.meta.namespace_)
          return file + ": Pod " + objectKey(a.meta.namespace_, a.meta.name) +
                 ": also defined in " + other;
    for (const Service& a : objects.services)
      for (const Service& b : st.good.services)
        if (a.meta.name == b.meta.name && a.meta.namespace_ == b.meta.namespace_)
          return file + ": Service " + objectKey(a.meta.namespace_, a.meta.name) +
                 ": also defined in " + other;
    for (const AuthorizationPolicy& a : objects.authorization_policies)
      for (const AuthorizationPolicy& b : st.good.authorization_policies)
        if (a.meta.name == b.meta.name && a.meta.namespace_ == b.meta.namespace_)
          return file + ": AuthorizationPolicy " + objectKey(a.meta.namespace_, a.meta.name) +
                 ": also defined in " + other;
    for (const PeerAuthentication& a : objects.peer_authentications)
      for (const PeerAuthentication& b : st.good.peer_authentications) {
        if (a.meta.namespace_ != b.meta.namespace_) continue;
        const std::string what =
            file + ": PeerAuthentication " + objectKey(a.meta.namespace_, a.meta.name) + ": ";
        if (a.meta.name == b.meta.name) return what + "also defined in " + other;
        return what + "metadata.namespace: namespace " + a.meta.namespace_ +
               " already has PeerAuthentication " + objectKey(b.meta.namespace_, b.meta.name) +
               " in " + other + "; only one per namespace";
      }
  }
  return {};
}

bool ManifestSource::apply(const std::string& file, FileState& st) {
  auto parsed = parseManifest(file, st.text);
  std::string error;
  if (!parsed) {
    error = parsed.status().message();
  } else {
    error = findDuplicate(file, parsed.value());
  }
  if (!error.empty()) {
    if (error != st.error) {
      rejections_++;
      spdlog::warn("manifest rejected ({}): {}",
                   st.has_good ? "its last good objects stay in force" : "nothing applied", error);
    }
    st.error = error;
    return false;
  }
  if (!st.error.empty()) spdlog::info("manifest {} accepted again", file);
  st.error.clear();
  st.has_good = true;
  st.good = std::move(parsed.value());
  for (const AuthorizationPolicy& ap : st.good.authorization_policies)
    for (const std::string& w : ap.warnings)
      spdlog::warn("{}: AuthorizationPolicy {}: {}", file,
                   objectKey(ap.meta.namespace_, ap.meta.name), w);
  return true;
}

bool ManifestSource::rescan() {
  std::map<std::string, struct stat> present;
  DIR* d = ::opendir(dir_.c_str());
  if (d == nullptr) {
    std::string err = "manifest directory " + dir_ + ": " + errnoText(errno);
    if (err != dir_error_) spdlog::warn("{} (last good state stays in force)", err);
    dir_error_ = err;
    return false;
  }
  dir_error_.clear();
  while (dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (!isManifestName(name)) continue;
    std::string path = dir_ + "/" + name;
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
    if (present.size() >= kMaxManifestFiles) {
      dir_error_ = "manifest directory " + dir_ + ": more than " +
                   std::to_string(kMaxManifestFiles) + " files; the rest are ignored";
      break;
    }
    present[path] = st;
  }
  ::closedir(d);

  bool changed = false;
  for (auto it = files_.begin(); it != files_.end();) {
    if (present.count(it->first) == 0) {
      spdlog::info("manifest {} removed", it->first);
      changed = changed || it->second.has_good;
      it = files_.erase(it);
    } else {
      ++it;
    }
  }
  for (const auto& [path, st] : present) {
    FileState& fs = files_[path];
    if (fs.mtime_ns == mtimeNs(st) && fs.size == st.st_size && fs.ino == st.st_ino) continue;
    auto text = readBounded(path);
    fs.mtime_ns = mtimeNs(st);
    fs.size = st.st_size;
    fs.ino = st.st_ino;
    if (!text) {
      std::string error = text.status().message();
      if (error != fs.error) {
        rejections_++;
        spdlog::warn("manifest rejected: {}", error);
      }
      fs.error = error;
      fs.hash = 0;
      fs.text.clear();
      continue;
    }
    size_t hash = std::hash<std::string>{}(text.value());
    if (hash == fs.hash && fs.text == text.value()) continue;
    fs.hash = hash;
    fs.text = std::move(text.value());
    changed = apply(path, fs) || changed;
  }
  // A file rejected as a duplicate may be fine now that another file changed: retry those.
  if (changed) {
    for (auto& [path, fs] : files_)
      if (!fs.error.empty() && !fs.text.empty()) changed = apply(path, fs) || changed;
  }
  if (changed) {
    ClusterModel before = std::move(model_);
    rebuildModel();
    return !(before == model_);
  }
  return false;
}

void ManifestSource::rebuildModel() {
  model_ = ClusterModel{};
  for (const auto& [path, fs] : files_) {
    if (!fs.has_good) continue;
    for (const Namespace& ns : fs.good.namespaces) model_.namespaces[ns.meta.name] = ns;
    for (const Pod& p : fs.good.pods) model_.pods[objectKey(p.meta.namespace_, p.meta.name)] = p;
    for (const Service& s : fs.good.services)
      model_.services[objectKey(s.meta.namespace_, s.meta.name)] = s;
    for (const PeerAuthentication& pa : fs.good.peer_authentications)
      model_.peer_authentications[pa.meta.namespace_] = pa;
    for (const AuthorizationPolicy& ap : fs.good.authorization_policies)
      model_.authorization_policies[objectKey(ap.meta.namespace_, ap.meta.name)] = ap;
  }
}

ManifestWatcher::ManifestWatcher(uv_loop_t* loop, ManifestSource* source,
                                 std::function<void()> on_change, uint64_t rescan_interval_ms)
    : loop_(loop), source_(source), on_change_(std::move(on_change)),
      interval_ms_(rescan_interval_ms) {}

Status ManifestWatcher::start() {
  int rc = rescan_timer_.init(uv_timer_init(loop_, rescan_timer_.get()));
  if (rc != 0) return Status::errorf("uv_timer_init: {}", uv_strerror(rc));
  rc = debounce_timer_.init(uv_timer_init(loop_, debounce_timer_.get()));
  if (rc != 0) return Status::errorf("uv_timer_init: {}", uv_strerror(rc));
  rescan_timer_.get()->data = this;
  debounce_timer_.get()->data = this;
  rc = uv_timer_start(
      rescan_timer_.get(),
      [](uv_timer_t* t) { static_cast<ManifestWatcher*>(t->data)->rescanNow(); }, interval_ms_,
      interval_ms_);
  if (rc != 0) return Status::errorf("uv_timer_start: {}", uv_strerror(rc));
  rc = event_.init(uv_fs_event_init(loop_, event_.get()));
  if (rc != 0) return Status::errorf("uv_fs_event_init: {}", uv_strerror(rc));
  event_.get()->data = this;
  rc = uv_fs_event_start(
      event_.get(),
      [](uv_fs_event_t* h, const char*, int, int status) {
        auto* self = static_cast<ManifestWatcher*>(h->data);
        if (status != 0) spdlog::warn("manifest watch: {}", uv_strerror(status));
        self->scheduleDebounced();
      },
      source_->dir().c_str(), 0);
  if (rc != 0) {
    // The rescan timer still notices changes, only later.
    spdlog::warn("watching {}: {}; relying on the {} ms rescan", source_->dir(), uv_strerror(rc),
                 interval_ms_);
  }
  return Status::ok();
}

void ManifestWatcher::scheduleDebounced() {
  // Editors and kubectl write in several steps; wait for the burst to settle.
  int rc = uv_timer_start(
      debounce_timer_.get(),
      [](uv_timer_t* t) { static_cast<ManifestWatcher*>(t->data)->rescanNow(); }, 50, 0);
  if (rc != 0) {
    spdlog::warn("manifest debounce timer: {}", uv_strerror(rc));
    rescanNow();
  }
}

void ManifestWatcher::rescanNow() {
  if (source_->rescan() && on_change_) on_change_();
}

}  // namespace weft::agent
