// Kubernetes API JSON to the agent's model: watch-event lines, list pages, and the conversion of
// one object into the same Namespace/Pod/Service values the manifest parser makes (it runs that
// parser: the JSON becomes a YAML node first).
#pragma once

#include <yaml-cpp/yaml.h>

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "agent/model.h"
#include "common/status.h"

namespace weft::agent::kube {

// Deeper JSON than this is refused before parsing (real objects stay well under 32 levels).
constexpr int kMaxJsonDepth = 64;

enum class ResourceKind {
  kNamespace,
  kPod,
  kService,
  kEndpointSlice,        // discovery.k8s.io/v1
  kPeerAuthentication,   // security.weft.dev/v1
  kAuthorizationPolicy,  // security.weft.dev/v1
};
const char* kindName(ResourceKind kind);  // "Namespace", "Pod", "Service", "EndpointSlice", ...

using ModelObject = std::variant<Namespace, Pod, Service, EndpointSlice, PeerAuthentication,
                                 AuthorizationPolicy>;

// Bounds on one EndpointSlice (the API server's own: 1000 endpoints, 100 addresses, 100 ports).
constexpr size_t kMaxSliceEndpoints = 1000;
constexpr size_t kMaxSliceAddresses = 100;
constexpr size_t kMaxSlicePorts = 100;

// An EndpointSlice as the model keeps it; nullopt when it names no Service (no
// kubernetes.io/service-name label). Errors read "EndpointSlice ns/name: field: what".
Result<std::optional<EndpointSlice>> parseEndpointSlice(const nlohmann::json& object);

// JSON to YAML for the shared parser. Strings are tagged "!" like quoted YAML scalars, so a
// string where a number belongs (targetPort: "http") stays a string. Depth-bounded.
Result<YAML::Node> jsonToYaml(const nlohmann::json& j, int max_depth = kMaxJsonDepth);

// Parses JSON text strictly, refusing nesting deeper than max_depth.
Result<nlohmann::json> parseJson(std::string_view text, int max_depth = kMaxJsonDepth);

// metadata.namespace + "/" + metadata.name (or the name alone for a cluster-scoped kind); the
// store key. Error if the name is missing.
Result<std::string> objectStoreKey(ResourceKind kind, const nlohmann::json& object);
// metadata.resourceVersion, empty if absent.
std::string resourceVersionOf(const nlohmann::json& object);

// One API object as the model sees it: nullopt when the object exists but does not belong in
// the model (a pod with no IP yet, a finished or host-network pod); an error when it does not
// validate ("Pod ns/name: field: what"). `pending_pods`: a running pod without an address yet
// is kept (no IPs) instead of left out — this node's pods, which CNI ADD enrolls before the API
// server knows their IPs.
Result<std::optional<ModelObject>> toModelObject(ResourceKind kind, const nlohmann::json& object,
                                                 bool pending_pods = false);

enum class WatchEventType { kAdded, kModified, kDeleted, kBookmark, kError };

struct WatchEvent {
  WatchEventType type = WatchEventType::kAdded;
  nlohmann::json object;  // always an object
};

// {"type": "...", "object": {...}}; anything else is malformed (error says what).
Result<WatchEvent> parseWatchEvent(std::string_view line);

// A Status object (kind Status) as carried by an ERROR event or an error response: its code and
// message (code 0 if absent).
struct ApiStatus {
  int code = 0;
  std::string reason;
  std::string message;
};
ApiStatus apiStatusOf(const nlohmann::json& object);

// A list page: items, metadata.resourceVersion and metadata.continue.
struct ListPage {
  std::vector<nlohmann::json> items;
  std::string resource_version;
  std::string continue_token;
};
Result<ListPage> parseListPage(std::string_view body, const std::string& list_kind);

}  // namespace weft::agent::kube
