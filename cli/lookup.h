// Finding one object by NAME or NS/NAME in a list a server returned, with errors that say
// what was looked for and what exists.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "cli/objects.h"
#include "common/status.h"

namespace weft::cli {

// The one element of `list` that `ref` names; "no workload x" / "ambiguous: a/x, b/x".
inline Result<nlohmann::json> findByRef(const nlohmann::json& list, const std::string& ref,
                                        const std::string& what) {
  std::vector<nlohmann::json> hits;
  for (const auto& o : list)
    if (refMatches(ref, o)) hits.push_back(o);
  if (hits.size() == 1) return hits[0];
  if (hits.empty()) return Status::errorf("no {} {}", what, ref);
  std::string names;
  for (const auto& h : hits) names += (names.empty() ? "" : ", ") + keyOf(h);
  return Status::errorf("{} '{}' is ambiguous: {} (give NAMESPACE/NAME)", what, ref, names);
}

}  // namespace weft::cli
