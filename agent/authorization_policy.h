// AuthorizationPolicy manifests (security.weft.dev/v1, Istio's shape): validation of one
// document into the node-protocol message the ztunnel evaluates, plus the warnings (L7-only
// fields) the agent reports per policy.
#pragma once

#include <yaml-cpp/yaml.h>

#include <optional>
#include <string>

#include "agent/model.h"

namespace weft::agent {

// The annotation that makes a policy report-only (Istio's istio.io/dry-run, our group).
constexpr const char* kDryRunAnnotation = "security.weft.dev/dry-run";

struct PolicyFieldError {
  std::string field;  // e.g. spec.rules[0].from[1].source.ipBlocks[0]
  std::string what;
};

// Parses `doc` (metadata already parsed into policy->meta) into policy->spec and
// policy->warnings; the first problem is returned.
std::optional<PolicyFieldError> parseAuthorizationPolicy(const YAML::Node& doc,
                                                         AuthorizationPolicy* policy);

}  // namespace weft::agent
