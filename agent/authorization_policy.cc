// AuthorizationPolicy validation: Istio's fields and value forms, refused when unknown or
// unsupported, L7-only fields accepted with a warning saying how they are enforced.
#include "agent/authorization_policy.h"

#include <charconv>
#include <set>

namespace weft::agent {

namespace pb = weft::node::v1;

namespace {

using Check = std::optional<PolicyFieldError>;

std::optional<std::string> scalar(const YAML::Node& n) {
  if (!n.IsDefined() || !n.IsScalar()) return std::nullopt;
  return n.Scalar();
}

bool present(const YAML::Node& n) { return n.IsDefined() && !n.IsNull(); }

// A mapping's keys must all be in `known`.
Check onlyKeys(const YAML::Node& map, const std::string& path,
               std::initializer_list<const char*> known) {
  for (auto it = map.begin(); it != map.end(); ++it) {
    auto k = scalar(it->first);
    bool ok = false;
    for (const char* name : known) ok = ok || (k && *k == name);
    if (!ok) {
      std::string names;
      for (const char* name : known) names += std::string(names.empty() ? "" : ", ") + name;
      return PolicyFieldError{path + (k ? (path.empty() ? "" : ".") + *k : std::string()),
                              "unknown field (known: " + names + ")"};
    }
  }
  return std::nullopt;
}

// A list of non-empty strings; absent = empty. `out` may be null (L7 fields: only checked).
Check stringList(const YAML::Node& parent, const char* key, const std::string& path,
                 std::vector<std::string>* out, bool* seen = nullptr) {
  YAML::Node n = parent[key];
  if (!present(n)) return std::nullopt;
  const std::string p = path + "." + key;
  if (!n.IsSequence()) return PolicyFieldError{p, "must be a list of strings"};
  for (size_t i = 0; i < n.size(); i++) {
    auto s = scalar(n[i]);
    if (!s || s->empty())
      return PolicyFieldError{p + "[" + std::to_string(i) + "]", "must be a non-empty string"};
    if (out) out->push_back(*s);
  }
  if (seen && n.size() > 0) *seen = true;
  return std::nullopt;
}

// Istio's string match forms: "*" alone, or one '*' at the start or the end.
Check matchForms(const std::vector<std::string>& values, const std::string& path) {
  for (size_t i = 0; i < values.size(); i++) {
    const std::string& v = values[i];
    size_t star = v.find('*');
    if (star == std::string::npos || v == "*") continue;
    bool edge = (star == 0 || star == v.size() - 1) && v.find('*', star + 1) == std::string::npos;
    if (!edge)
      return PolicyFieldError{path + "[" + std::to_string(i) + "]",
                              "\"" + v + "\": '*' may only be the whole value, its first or "
                              "its last character"};
  }
  return std::nullopt;
}

// "spiffe://td/ns/N/sa/S" is accepted and kept as Istio's "td/ns/N/sa/S".
void stripSpiffe(std::vector<std::string>* values) {
  for (std::string& v : *values)
    if (v.rfind("spiffe://", 0) == 0) v = v.substr(9);
}

bool validCidr(const std::string& s) {
  std::string addr = s;
  int max = 0, len = -1;
  size_t slash = s.find('/');
  if (slash != std::string::npos) {
    addr = s.substr(0, slash);
    std::string l = s.substr(slash + 1);
    auto [p, ec] = std::from_chars(l.data(), l.data() + l.size(), len);
    if (l.empty() || ec != std::errc() || p != l.data() + l.size() || len < 0) return false;
  }
  auto ip = IpAddr::parse(addr);
  if (!ip) return false;
  max = ip->isV4() ? 32 : 128;
  return len <= max;
}

Check cidrs(const std::vector<std::string>& values, const std::string& path) {
  for (size_t i = 0; i < values.size(); i++)
    if (!validCidr(values[i]))
      return PolicyFieldError{path + "[" + std::to_string(i) + "]",
                              "\"" + values[i] + "\" is not an IP address or CIDR block"};
  return std::nullopt;
}

std::optional<uint32_t> port(const std::string& s) {
  uint32_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || p != s.data() + s.size() || v < 1 || v > 65535)
    return std::nullopt;
  return v;
}

// Ports: integers or numeric strings (Istio writes them as strings).
Check portList(const YAML::Node& parent, const char* key, const std::string& path,
               google::protobuf::RepeatedField<uint32_t>* out) {
  YAML::Node n = parent[key];
  if (!present(n)) return std::nullopt;
  const std::string p = path + "." + key;
  if (!n.IsSequence()) return PolicyFieldError{p, "must be a list of ports"};
  for (size_t i = 0; i < n.size(); i++) {
    auto s = scalar(n[i]);
    auto v = s ? port(*s) : std::nullopt;
    if (!v)
      return PolicyFieldError{p + "[" + std::to_string(i) + "]",
                              "must be a port number 1-65535 (ranges are not supported)"};
    out->Add(*v);
  }
  return std::nullopt;
}

template <typename Repeated>
void addAll(const std::vector<std::string>& in, Repeated* out) {
  for (const std::string& s : in) *out->Add() = s;
}

Check parseSource(const YAML::Node& src, const std::string& path,
                  pb::AuthorizationPolicySource* out,
                  std::vector<std::string>* l7) {
  if (!src.IsMap() || src.size() == 0)
    return PolicyFieldError{path, "must be a non-empty mapping (principals, namespaces, ...)"};
  if (auto e = onlyKeys(src, path,
                        {"principals", "notPrincipals", "namespaces", "notNamespaces", "ipBlocks",
                         "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks",
                         "requestPrincipals", "notRequestPrincipals"}))
    return e;
  struct StringField {
    const char* key;
    google::protobuf::RepeatedPtrField<std::string>* out;
    bool principal;
  };
  const StringField strings[] = {
      {"principals", out->mutable_principals(), true},
      {"notPrincipals", out->mutable_not_principals(), true},
      {"namespaces", out->mutable_namespaces(), false},
      {"notNamespaces", out->mutable_not_namespaces(), false},
  };
  bool any = false;
  for (const StringField& f : strings) {
    std::vector<std::string> v;
    if (auto e = stringList(src, f.key, path, &v, &any)) return e;
    if (auto e = matchForms(v, path + "." + f.key)) return e;
    if (f.principal) stripSpiffe(&v);
    addAll(v, f.out);
  }
  const StringField blocks[] = {
      {"ipBlocks", out->mutable_ip_blocks(), false},
      {"notIpBlocks", out->mutable_not_ip_blocks(), false},
      {"remoteIpBlocks", out->mutable_remote_ip_blocks(), false},
      {"notRemoteIpBlocks", out->mutable_not_remote_ip_blocks(), false},
  };
  for (const StringField& f : blocks) {
    std::vector<std::string> v;
    if (auto e = stringList(src, f.key, path, &v, &any)) return e;
    if (auto e = cidrs(v, path + "." + f.key)) return e;
    addAll(v, f.out);
  }
  for (const char* key : {"requestPrincipals", "notRequestPrincipals"}) {
    bool seen = false;
    if (auto e = stringList(src, key, path, nullptr, &seen)) return e;
    if (seen) l7->push_back(path + "." + key);
    any = any || seen;
  }
  if (!any) return PolicyFieldError{path, "must set at least one field"};
  return std::nullopt;
}

Check parseOperation(const YAML::Node& op, const std::string& path,
                     pb::AuthorizationPolicyOperation* out, std::vector<std::string>* l7) {
  if (!op.IsMap() || op.size() == 0)
    return PolicyFieldError{path, "must be a non-empty mapping (ports, notPorts, ...)"};
  if (auto e = onlyKeys(op, path,
                        {"ports", "notPorts", "hosts", "notHosts", "methods", "notMethods",
                         "paths", "notPaths"}))
    return e;
  if (auto e = portList(op, "ports", path, out->mutable_ports())) return e;
  if (auto e = portList(op, "notPorts", path, out->mutable_not_ports())) return e;
  bool any = out->ports_size() > 0 || out->not_ports_size() > 0;
  for (const char* key : {"hosts", "notHosts", "methods", "notMethods", "paths", "notPaths"}) {
    bool seen = false;
    if (auto e = stringList(op, key, path, nullptr, &seen)) return e;
    if (seen) l7->push_back(path + "." + key);
    any = any || seen;
  }
  if (!any) return PolicyFieldError{path, "must set at least one field"};
  return std::nullopt;
}

// Keys the ztunnel evaluates; the rest of Istio's keys need an L7 proxy.
bool isL4Key(const std::string& k) {
  static const std::set<std::string> kKeys = {"source.ip", "remote.ip", "source.namespace",
                                              "source.principal", "destination.ip",
                                              "destination.port"};
  return kKeys.count(k) > 0;
}

bool isL7Key(const std::string& k) {
  return k.rfind("request.", 0) == 0 || k.rfind("experimental.envoy.filters.", 0) == 0 ||
         k == "connection.sni";
}

Check parseCondition(const YAML::Node& w, const std::string& path,
                     pb::AuthorizationPolicyCondition* out, std::vector<std::string>* l7) {
  if (!w.IsMap()) return PolicyFieldError{path, "must be a mapping with key and values"};
  if (auto e = onlyKeys(w, path, {"key", "values", "notValues"})) return e;
  auto key = scalar(w["key"]);
  if (!key || key->empty()) return PolicyFieldError{path + ".key", "required"};
  out->set_key(*key);
  std::vector<std::string> values, not_values;
  if (auto e = stringList(w, "values", path, &values)) return e;
  if (auto e = stringList(w, "notValues", path, &not_values)) return e;
  if (values.empty() && not_values.empty())
    return PolicyFieldError{path, "values or notValues must be set"};
  if (isL7Key(*key)) {
    out->set_l7(true);
    l7->push_back(path + " (key " + *key + ")");
  } else if (!isL4Key(*key)) {
    return PolicyFieldError{path + ".key",
                            "unknown key \"" + *key +
                                "\" (L4 keys: source.ip, remote.ip, source.namespace, "
                                "source.principal, destination.ip, destination.port)"};
  } else if (*key == "destination.port") {
    for (const auto* list : {&values, &not_values})
      for (size_t i = 0; i < list->size(); i++)
        if (!port((*list)[i]))
          return PolicyFieldError{path + (list == &values ? ".values[" : ".notValues[") +
                                      std::to_string(i) + "]",
                                  "\"" + (*list)[i] + "\" is not a port number 1-65535"};
  } else if (key->find(".ip") != std::string::npos) {
    if (auto e = cidrs(values, path + ".values")) return e;
    if (auto e = cidrs(not_values, path + ".notValues")) return e;
  } else {
    if (auto e = matchForms(values, path + ".values")) return e;
    if (auto e = matchForms(not_values, path + ".notValues")) return e;
    if (*key == "source.principal") {
      stripSpiffe(&values);
      stripSpiffe(&not_values);
    }
  }
  addAll(values, out->mutable_values());
  addAll(not_values, out->mutable_not_values());
  return std::nullopt;
}

// A non-empty list when present (Istio refuses `from: []`, which reads as "no source").
Check nonEmptyList(const YAML::Node& n, const std::string& path) {
  if (!n.IsSequence() || n.size() == 0)
    return PolicyFieldError{path, "must be a non-empty list (omit it to match any)"};
  return std::nullopt;
}

Check parseRule(const YAML::Node& r, const std::string& path, pb::AuthorizationPolicyRule* out) {
  if (r.IsNull()) return std::nullopt;  // "- {}" written as "-": matches everything
  if (!r.IsMap()) return PolicyFieldError{path, "must be a mapping (from, to, when)"};
  if (auto e = onlyKeys(r, path, {"from", "to", "when"})) return e;
  std::vector<std::string> l7;
  if (present(r["from"])) {
    if (auto e = nonEmptyList(r["from"], path + ".from")) return e;
    for (size_t i = 0; i < r["from"].size(); i++) {
      const std::string p = path + ".from[" + std::to_string(i) + "]";
      const YAML::Node& f = r["from"][i];
      if (!f.IsMap()) return PolicyFieldError{p, "must be a mapping with source"};
      if (auto e = onlyKeys(f, p, {"source"})) return e;
      if (!present(f["source"])) return PolicyFieldError{p + ".source", "required"};
      if (auto e = parseSource(f["source"], p + ".source", out->add_from(), &l7)) return e;
    }
  }
  if (present(r["to"])) {
    if (auto e = nonEmptyList(r["to"], path + ".to")) return e;
    for (size_t i = 0; i < r["to"].size(); i++) {
      const std::string p = path + ".to[" + std::to_string(i) + "]";
      const YAML::Node& t = r["to"][i];
      if (!t.IsMap()) return PolicyFieldError{p, "must be a mapping with operation"};
      if (auto e = onlyKeys(t, p, {"operation"})) return e;
      if (!present(t["operation"])) return PolicyFieldError{p + ".operation", "required"};
      if (auto e = parseOperation(t["operation"], p + ".operation", out->add_to(), &l7)) return e;
    }
  }
  if (present(r["when"])) {
    if (auto e = nonEmptyList(r["when"], path + ".when")) return e;
    for (size_t i = 0; i < r["when"].size(); i++) {
      const std::string p = path + ".when[" + std::to_string(i) + "]";
      if (auto e = parseCondition(r["when"][i], p, out->add_when(), &l7)) return e;
    }
  }
  for (const std::string& f : l7) out->add_l7_fields(f);
  return std::nullopt;
}

}  // namespace

std::optional<PolicyFieldError> parseAuthorizationPolicy(const YAML::Node& doc,
                                                         AuthorizationPolicy* policy) {
  pb::AuthorizationPolicy& spec = policy->spec;
  spec.set_name(policy->meta.name);
  spec.set_namespace_(policy->meta.namespace_);
  spec.set_uid(policy->meta.uid);
  auto dry = policy->meta.annotations.find(kDryRunAnnotation);
  if (dry != policy->meta.annotations.end()) {
    if (dry->second != "true" && dry->second != "false")
      return PolicyFieldError{std::string("metadata.annotations.") + kDryRunAnnotation,
                              "must be \"true\" or \"false\""};
    spec.set_dry_run(dry->second == "true");
  }
  YAML::Node s = doc["spec"];
  // No spec: ALLOW with no rules, Istio's "allow nothing" (deny all in scope).
  if (!present(s)) return std::nullopt;
  if (!s.IsMap()) return PolicyFieldError{"spec", "must be a mapping"};
  for (auto it = s.begin(); it != s.end(); ++it) {
    auto k = scalar(it->first);
    if (k && (*k == "targetRef" || *k == "targetRefs"))
      return PolicyFieldError{"spec." + *k,
                              "not supported: attaching a policy to a Service or Gateway needs a "
                              "waypoint, which Weft does not have yet; use spec.selector"};
    if (k && *k == "provider")
      return PolicyFieldError{"spec.provider", "not supported (the CUSTOM action is not)"};
  }
  if (auto e = onlyKeys(s, "spec", {"selector", "action", "rules"})) return e;

  if (present(s["selector"])) {
    YAML::Node sel = s["selector"];
    if (!sel.IsMap())
      return PolicyFieldError{"spec.selector", "must be a mapping with matchLabels"};
    if (auto e = onlyKeys(sel, "spec.selector", {"matchLabels"})) return e;
    YAML::Node ml = sel["matchLabels"];
    if (present(ml)) {
      if (!ml.IsMap()) return PolicyFieldError{"spec.selector.matchLabels", "must be a mapping"};
      for (auto it = ml.begin(); it != ml.end(); ++it) {
        auto k = scalar(it->first);
        auto v = it->second.IsNull() ? std::optional<std::string>("") : scalar(it->second);
        if (!k || k->empty())
          return PolicyFieldError{"spec.selector.matchLabels", "keys must be non-empty strings"};
        if (!v) return PolicyFieldError{"spec.selector.matchLabels." + *k, "must be a string"};
        (*spec.mutable_match_labels())[*k] = *v;
      }
    }
    // An empty selector selects every workload in scope, like no selector.
    spec.set_has_selector(spec.match_labels_size() > 0);
  }

  std::string action = "ALLOW";
  if (present(s["action"])) {
    auto a = scalar(s["action"]);
    if (!a) return PolicyFieldError{"spec.action", "must be ALLOW, DENY or AUDIT"};
    action = *a;
  }
  if (action == "ALLOW") spec.set_action(pb::AuthorizationPolicy::ALLOW);
  else if (action == "DENY") spec.set_action(pb::AuthorizationPolicy::DENY);
  else if (action == "AUDIT") spec.set_action(pb::AuthorizationPolicy::AUDIT);
  else if (action == "CUSTOM")
    return PolicyFieldError{"spec.action", "CUSTOM is not supported (no external authorizer)"};
  else
    return PolicyFieldError{"spec.action", "\"" + action + "\" is not ALLOW, DENY or AUDIT"};

  if (present(s["rules"])) {
    YAML::Node rules = s["rules"];
    if (!rules.IsSequence()) return PolicyFieldError{"spec.rules", "must be a list"};
    for (size_t i = 0; i < rules.size(); i++) {
      const std::string p = "spec.rules[" + std::to_string(i) + "]";
      if (auto e = parseRule(rules[i], p, spec.add_rules())) return e;
    }
  }

  for (const auto& r : spec.rules()) {
    for (const std::string& f : r.l7_fields()) {
      std::string how =
          action == "ALLOW"
              ? "this ALLOW rule matches nothing (more restrictive than written)"
              : "this " + action +
                    " rule is enforced without its L7 conditions (more restrictive than written)";
      policy->warnings.push_back(f + ": L7 (HTTP) attribute and no waypoint serves the "
                                 "workload, so the ztunnel cannot check it: " + how);
    }
  }
  return std::nullopt;
}

}  // namespace weft::agent
