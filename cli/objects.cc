// Lookups shared by the object files: "ns/name" keys and NAME references.
#include "cli/objects.h"

namespace weft::cli {

std::string keyOf(const nlohmann::json& j) {
  return j.value("namespace", "") + "/" + j.value("name", "");
}

bool refMatches(const std::string& ref, const nlohmann::json& obj) {
  if (ref.find('/') != std::string::npos) return ref == keyOf(obj);
  return ref == obj.value("name", "");
}

}  // namespace weft::cli
