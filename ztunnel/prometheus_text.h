// Prometheus text exposition (format 0.0.4) for the ztunnel's metric families: one HELP and
// TYPE per family, label values escaped, and no series written twice.
#pragma once

#include <cstdint>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace weft::ztunnel {

// Label values: backslash, double quote and newline are escaped (the format's only escapes).
std::string escapePromLabelValue(std::string_view v);
// HELP text: backslash and newline are escaped.
std::string escapePromHelp(std::string_view v);

using PromLabels = std::vector<std::pair<std::string, std::string>>;

// Appends families and samples. A family's header is written by family(); samples of a family
// must follow it. A (name, labels) pair given twice is skipped (and counted), so a bug that
// would produce a duplicate series cannot make the scrape invalid.
class PromText {
 public:
  void family(std::string_view name, std::string_view type, std::string_view help);
  void sample(std::string_view name, const PromLabels& labels, int64_t value);
  void sample(std::string_view name, const PromLabels& labels, uint64_t value);
  void sample(std::string_view name, const PromLabels& labels, double value);
  void sample(std::string_view name, int64_t value) { sample(name, PromLabels{}, value); }

  const std::string& text() const { return out_; }
  std::string take() { return std::move(out_); }
  size_t duplicatesSkipped() const { return duplicates_; }

 private:
  bool seen(std::string_view name, const std::string& labels);

  std::string out_;
  std::set<std::string> series_;
  size_t duplicates_ = 0;
};

}  // namespace weft::ztunnel
