// Watch events, list pages and objects from the Kubernetes API, converted through the manifest
// parser so both sources validate and fill the model identically.
#include "agent/kube/kube_objects.h"

#include <sys/socket.h>

#include "agent/manifests.h"

namespace weft::agent::kube {

using Json = nlohmann::json;

const char* kindName(ResourceKind kind) {
  switch (kind) {
    case ResourceKind::kNamespace:
      return "Namespace";
    case ResourceKind::kPod:
      return "Pod";
    case ResourceKind::kService:
      return "Service";
    case ResourceKind::kEndpointSlice:
      return "EndpointSlice";
    case ResourceKind::kPeerAuthentication:
      return "PeerAuthentication";
    case ResourceKind::kAuthorizationPolicy:
      return "AuthorizationPolicy";
  }
  return "?";
}

Result<nlohmann::json> parseJson(std::string_view text, int max_depth) {
  // nlohmann's parser and destructor recurse; bound the depth before handing it the text.
  int depth = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped)
        escaped = false;
      else if (c == '\\')
        escaped = true;
      else if (c == '"')
        in_string = false;
      continue;
    }
    if (c == '"')
      in_string = true;
    else if (c == '{' || c == '[') {
      if (++depth > max_depth) return Status::errorf("JSON nested deeper than {}", max_depth);
    } else if (c == '}' || c == ']') {
      depth--;
    }
  }
  Json j = Json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Status::error("not valid JSON");
  return j;
}

Result<YAML::Node> jsonToYaml(const Json& j, int max_depth) {
  if (max_depth <= 0) return Status::error("JSON nested too deeply");
  switch (j.type()) {
    case Json::value_t::null:
      return YAML::Node(YAML::NodeType::Null);
    case Json::value_t::string: {
      YAML::Node n(j.get<std::string>());
      n.SetTag("!");
      return n;
    }
    case Json::value_t::boolean:
      return YAML::Node(j.get<bool>() ? "true" : "false");
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned:
    case Json::value_t::number_float:
      return YAML::Node(j.dump());
    case Json::value_t::array: {
      YAML::Node n(YAML::NodeType::Sequence);
      for (const Json& e : j) {
        auto c = jsonToYaml(e, max_depth - 1);
        if (!c) return c;
        n.push_back(c.value());
      }
      return n;
    }
    case Json::value_t::object: {
      YAML::Node n(YAML::NodeType::Map);
      for (auto it = j.begin(); it != j.end(); ++it) {
        auto c = jsonToYaml(it.value(), max_depth - 1);
        if (!c) return c;
        n[it.key()] = c.value();
      }
      return n;
    }
    default:
      return Status::error("unsupported JSON value");
  }
}

Result<std::string> objectStoreKey(ResourceKind kind, const Json& object) {
  if (!object.is_object()) return Status::error("object: not a JSON object");
  auto meta = object.find("metadata");
  if (meta == object.end() || !meta->is_object())
    return Status::errorf("{}: metadata: required, an object", kindName(kind));
  auto name = meta->find("name");
  if (name == meta->end() || !name->is_string() || name->get<std::string>().empty())
    return Status::errorf("{}: metadata.name: required", kindName(kind));
  if (kind == ResourceKind::kNamespace) return name->get<std::string>();
  auto ns = meta->find("namespace");
  if (ns == meta->end() || !ns->is_string() || ns->get<std::string>().empty())
    return Status::errorf("{} {}: metadata.namespace: required", kindName(kind),
                          name->get<std::string>());
  return objectKey(ns->get<std::string>(), name->get<std::string>());
}

std::string resourceVersionOf(const Json& object) {
  if (!object.is_object()) return {};
  auto meta = object.find("metadata");
  if (meta == object.end() || !meta->is_object()) return {};
  auto rv = meta->find("resourceVersion");
  return rv != meta->end() && rv->is_string() ? rv->get<std::string>() : std::string();
}

namespace {

// The fields the parser reads; managedFields and the rest of a real object stay behind.
Json relevantFields(const Json& object) {
  Json out = Json::object();
  for (const char* key : {"apiVersion", "kind", "spec", "status"}) {
    auto it = object.find(key);
    if (it != object.end()) out[key] = *it;
  }
  auto meta = object.find("metadata");
  if (meta != object.end() && meta->is_object()) {
    Json m = Json::object();
    for (const char* key : {"name", "namespace", "uid", "labels", "annotations"}) {
      auto it = meta->find(key);
      if (it != meta->end()) m[key] = *it;
    }
    out["metadata"] = std::move(m);
  } else if (meta != object.end()) {
    out["metadata"] = *meta;  // let the parser name the problem
  }
  return out;
}

const Json* path(const Json& j, std::initializer_list<const char*> keys) {
  const Json* cur = &j;
  for (const char* k : keys) {
    if (!cur->is_object()) return nullptr;
    auto it = cur->find(k);
    if (it == cur->end()) return nullptr;
    cur = &*it;
  }
  return cur;
}

}  // namespace

Result<std::optional<EndpointSlice>> parseEndpointSlice(const Json& object) {
  if (!object.is_object()) return Status::error("EndpointSlice: not a JSON object");
  EndpointSlice slice;
  const Json* meta = path(object, {"metadata"});
  if (!meta || !meta->is_object()) return Status::error("EndpointSlice: metadata: required");
  const Json* name = path(*meta, {"name"});
  const Json* ns = path(*meta, {"namespace"});
  if (!name || !name->is_string() || name->get<std::string>().empty())
    return Status::error("EndpointSlice: metadata.name: required");
  slice.meta.name = name->get<std::string>();
  if (!ns || !ns->is_string() || ns->get<std::string>().empty())
    return Status::errorf("EndpointSlice {}: metadata.namespace: required", slice.meta.name);
  slice.meta.namespace_ = ns->get<std::string>();
  const std::string who = "EndpointSlice " + objectKey(slice.meta.namespace_, slice.meta.name);
  auto bad = [&](const std::string& field, const std::string& what) {
    return Status::error(who + ": " + field + ": " + what);
  };
  if (const Json* uid = path(*meta, {"uid"}); uid && uid->is_string())
    slice.meta.uid = uid->get<std::string>();
  if (const Json* v = path(object, {"apiVersion"});
      v && (!v->is_string() || *v != "discovery.k8s.io/v1"))
    return bad("apiVersion", "must be discovery.k8s.io/v1");
  const Json* svc = path(*meta, {"labels", kServiceNameLabel});
  if (svc && !svc->is_string())
    return bad(std::string("metadata.labels.") + kServiceNameLabel, "must be a string");
  if (!svc || svc->get<std::string>().empty())
    return std::optional<EndpointSlice>();  // no Service's endpoints: nothing for the model
  slice.service_name = svc->get<std::string>();
  slice.meta.labels[kServiceNameLabel] = slice.service_name;
  const Json* at = path(object, {"addressType"});
  if (!at || !at->is_string() || (*at != "IPv4" && *at != "IPv6" && *at != "FQDN"))
    return bad("addressType", "required: IPv4, IPv6 or FQDN");
  slice.address_type = at->get<std::string>();
  const int family = slice.address_type == "IPv4" ? AF_INET : AF_INET6;
  const Json* eps = path(object, {"endpoints"});
  if (eps && !eps->is_null()) {
    if (!eps->is_array()) return bad("endpoints", "must be a list");
    if (eps->size() > kMaxSliceEndpoints)
      return bad("endpoints", fmt::format("more than {} endpoints", kMaxSliceEndpoints));
    for (size_t i = 0; i < eps->size(); i++) {
      const Json& e = (*eps)[i];
      const std::string p = fmt::format("endpoints[{}]", i);
      if (!e.is_object()) return bad(p, "must be an object");
      EndpointSliceEndpoint out;
      const Json* addrs = path(e, {"addresses"});
      if (!addrs || !addrs->is_array() || addrs->empty())
        return bad(p + ".addresses", "required, a list of at least one address");
      if (addrs->size() > kMaxSliceAddresses)
        return bad(p + ".addresses", fmt::format("more than {}", kMaxSliceAddresses));
      for (size_t j = 0; j < addrs->size(); j++) {
        const std::string ap = fmt::format("{}.addresses[{}]", p, j);
        if (!(*addrs)[j].is_string()) return bad(ap, "must be a string");
        if (slice.address_type == "FQDN") continue;  // names: nothing the ztunnel can dial
        auto ip = IpAddr::parse((*addrs)[j].get<std::string>());
        if (!ip || ip->family() != family)
          return bad(ap, "\"" + (*addrs)[j].get<std::string>().substr(0, 64) +
                             "\" is not an " + slice.address_type + " address");
        out.addresses.push_back(*ip);
      }
      if (const Json* ready = path(e, {"conditions", "ready"}); ready && !ready->is_null()) {
        if (!ready->is_boolean()) return bad(p + ".conditions.ready", "must be a boolean");
        out.ready = ready->get<bool>();
      }
      if (const Json* ref = path(e, {"targetRef"}); ref && ref->is_object()) {
        const Json* kind = path(*ref, {"kind"});
        const Json* rname = path(*ref, {"name"});
        const Json* rns = path(*ref, {"namespace"});
        const Json* ruid = path(*ref, {"uid"});
        if (kind && kind->is_string() && *kind == "Pod" && rname && rname->is_string()) {
          std::string pns =
              rns && rns->is_string() ? rns->get<std::string>() : slice.meta.namespace_;
          out.target_pod = objectKey(pns, rname->get<std::string>());
          if (ruid && ruid->is_string()) out.target_uid = ruid->get<std::string>();
        }
      }
      slice.endpoints.push_back(std::move(out));
    }
  }
  const Json* ports = path(object, {"ports"});
  if (ports && !ports->is_null()) {
    if (!ports->is_array()) return bad("ports", "must be a list");
    if (ports->size() > kMaxSlicePorts)
      return bad("ports", fmt::format("more than {} ports", kMaxSlicePorts));
    for (size_t i = 0; i < ports->size(); i++) {
      const Json& pj = (*ports)[i];
      const std::string p = fmt::format("ports[{}]", i);
      if (!pj.is_object()) return bad(p, "must be an object");
      EndpointSlicePort out;
      if (const Json* n = path(pj, {"name"}); n && !n->is_null()) {
        if (!n->is_string()) return bad(p + ".name", "must be a string");
        out.name = n->get<std::string>();
      }
      if (const Json* pr = path(pj, {"protocol"}); pr && !pr->is_null()) {
        if (!pr->is_string()) return bad(p + ".protocol", "must be a string");
        out.protocol = pr->get<std::string>();
      }
      const Json* num = path(pj, {"port"});
      if (!num || num->is_null()) continue;  // "all ports": nothing to map a service port to
      if (!num->is_number_integer() || num->get<int64_t>() < 1 || num->get<int64_t>() > 65535)
        return bad(p + ".port", "must be an integer 1-65535");
      out.port = static_cast<uint16_t>(num->get<int64_t>());
      slice.ports.push_back(std::move(out));
    }
  }
  return std::optional<EndpointSlice>(std::move(slice));
}

Result<std::optional<ModelObject>> toModelObject(ResourceKind kind, const Json& object,
                                                 bool pending_pods) {
  if (!object.is_object()) return Status::errorf("{}: not a JSON object", kindName(kind));
  if (kind == ResourceKind::kEndpointSlice) {
    auto r = parseEndpointSlice(object);
    if (!r) return r.status();
    if (!r.value()) return std::optional<ModelObject>();
    return std::optional<ModelObject>(std::move(*r.value()));
  }
  Json fields = relevantFields(object);
  if (kind == ResourceKind::kPod) {
    // Objects a real cluster has that the model has no place for: not an error, not in force.
    const Json* phase = path(object, {"status", "phase"});
    if (phase && phase->is_string() && (*phase == "Succeeded" || *phase == "Failed"))
      return std::optional<ModelObject>();  // finished: its IPs may already be someone else's
    const Json* host_net = path(object, {"spec", "hostNetwork"});
    if (host_net && host_net->is_boolean() && host_net->get<bool>())
      return std::optional<ModelObject>();  // the node's own address: never a mesh workload
    const Json* ips = path(object, {"status", "podIPs"});
    const Json* ip = path(object, {"status", "podIP"});
    bool has_ips = ips && ips->is_array() && !ips->empty();
    if (!has_ips && ip && ip->is_string() && !ip->get<std::string>().empty()) {
      fields["status"]["podIPs"] = Json::array({Json{{"ip", *ip}}});  // older servers
      has_ips = true;
    }
    if (!has_ips && !pending_pods)
      return std::optional<ModelObject>();  // not running yet: no address
    if (!has_ips) {
      auto yaml = jsonToYaml(fields);
      if (!yaml) return yaml.status().context(kindName(kind));
      auto r = parsePendingPodObject(yaml.value());
      if (!r) return r.status();
      return std::optional<ModelObject>(std::move(r.value()));
    }
  }
  auto yaml = jsonToYaml(fields);
  if (!yaml) return yaml.status().context(kindName(kind));
  switch (kind) {
    case ResourceKind::kNamespace: {
      auto r = parseNamespaceObject(yaml.value());
      if (!r) return r.status();
      return std::optional<ModelObject>(std::move(r.value()));
    }
    case ResourceKind::kPod: {
      auto r = parsePodObject(yaml.value());
      if (!r) return r.status();
      return std::optional<ModelObject>(std::move(r.value()));
    }
    case ResourceKind::kService: {
      auto r = parseServiceObject(yaml.value());
      if (!r) return r.status();
      return std::optional<ModelObject>(std::move(r.value()));
    }
    case ResourceKind::kPeerAuthentication: {
      auto r = parsePeerAuthenticationObject(yaml.value());
      if (!r) return r.status();
      return std::optional<ModelObject>(std::move(r.value()));
    }
    case ResourceKind::kAuthorizationPolicy: {
      auto r = parseAuthorizationPolicyObject(yaml.value());
      if (!r) return r.status();
      return std::optional<ModelObject>(std::move(r.value()));
    }
    case ResourceKind::kEndpointSlice:
      break;  // handled above
  }
  return Status::error("unknown kind");
}

Result<WatchEvent> parseWatchEvent(std::string_view line) {
  auto j = parseJson(line);
  if (!j) return j.status();
  if (!j->is_object()) return Status::error("watch event: not a JSON object");
  auto type = j->find("type");
  if (type == j->end() || !type->is_string()) return Status::error("watch event: type: required");
  WatchEvent ev;
  const std::string t = type->get<std::string>();
  if (t == "ADDED")
    ev.type = WatchEventType::kAdded;
  else if (t == "MODIFIED")
    ev.type = WatchEventType::kModified;
  else if (t == "DELETED")
    ev.type = WatchEventType::kDeleted;
  else if (t == "BOOKMARK")
    ev.type = WatchEventType::kBookmark;
  else if (t == "ERROR")
    ev.type = WatchEventType::kError;
  else
    return Status::errorf("watch event: type: unknown \"{}\"", t.substr(0, 40));
  auto obj = j->find("object");
  if (obj == j->end() || !obj->is_object())
    return Status::error("watch event: object: required, a JSON object");
  ev.object = std::move(*obj);
  return ev;
}

ApiStatus apiStatusOf(const Json& object) {
  ApiStatus s;
  if (!object.is_object()) return s;
  if (auto c = object.find("code"); c != object.end() && c->is_number_integer())
    s.code = c->get<int>();
  if (auto r = object.find("reason"); r != object.end() && r->is_string())
    s.reason = r->get<std::string>();
  if (auto m = object.find("message"); m != object.end() && m->is_string())
    s.message = m->get<std::string>().substr(0, 500);
  return s;
}

Result<ListPage> parseListPage(std::string_view body, const std::string& list_kind) {
  auto j = parseJson(body);
  if (!j) return j.status().context(list_kind);
  if (!j->is_object()) return Status::errorf("{}: not a JSON object", list_kind);
  if (auto k = j->find("kind"); k != j->end() && (!k->is_string() || *k != list_kind))
    return Status::errorf("{}: kind: \"{}\" where {} was expected", list_kind,
                          k->is_string() ? k->get<std::string>() : std::string("?"), list_kind);
  ListPage page;
  const Json* meta = path(*j, {"metadata"});
  if (meta) {
    if (const Json* rv = path(*meta, {"resourceVersion"}); rv && rv->is_string())
      page.resource_version = rv->get<std::string>();
    if (const Json* c = path(*meta, {"continue"}); c && c->is_string())
      page.continue_token = c->get<std::string>();
  }
  if (page.resource_version.empty())
    return Status::errorf("{}: metadata.resourceVersion: required", list_kind);
  auto items = j->find("items");
  if (items != j->end() && !items->is_null()) {
    if (!items->is_array()) return Status::errorf("{}: items: must be a list", list_kind);
    page.items.reserve(items->size());
    for (Json& item : *items) page.items.push_back(std::move(item));
  }
  return page;
}

}  // namespace weft::agent::kube
