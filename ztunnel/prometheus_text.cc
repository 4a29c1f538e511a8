// Prometheus text exposition helpers: escaping and duplicate-free families.
#include "ztunnel/prometheus_text.h"

#include <fmt/format.h>

namespace weft::ztunnel {

std::string escapePromLabelValue(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

std::string escapePromHelp(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

void PromText::family(std::string_view name, std::string_view type, std::string_view help) {
  out_ += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, escapePromHelp(help), name, type);
}

bool PromText::seen(std::string_view name, const std::string& labels) {
  std::string key = std::string(name) + labels;
  if (!series_.insert(key).second) {
    duplicates_++;
    return true;
  }
  return false;
}

namespace {

std::string labelText(const PromLabels& labels) {
  if (labels.empty()) return "";
  std::string s = "{";
  for (size_t i = 0; i < labels.size(); ++i) {
    if (i) s += ',';
    s += labels[i].first;
    s += "=\"";
    s += escapePromLabelValue(labels[i].second);
    s += '"';
  }
  s += '}';
  return s;
}

}  // namespace

void PromText::sample(std::string_view name, const PromLabels& labels, int64_t value) {
  std::string l = labelText(labels);
  if (seen(name, l)) return;
  out_ += fmt::format("{}{} {}\n", name, l, value);
}

void PromText::sample(std::string_view name, const PromLabels& labels, uint64_t value) {
  std::string l = labelText(labels);
  if (seen(name, l)) return;
  out_ += fmt::format("{}{} {}\n", name, l, value);
}

void PromText::sample(std::string_view name, const PromLabels& labels, double value) {
  std::string l = labelText(labels);
  if (seen(name, l)) return;
  out_ += fmt::format("{}{} {}\n", name, l, value);  // shortest form that reads back exactly
}

}  // namespace weft::ztunnel
