// Tables for people: a header row, rows of cells, columns padded to the widest cell.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace weft::cli {

class Table {
 public:
  explicit Table(std::vector<std::string> header) : header_(std::move(header)) {}
  void add(std::vector<std::string> row) { rows_.push_back(std::move(row)); }
  size_t rows() const { return rows_.size(); }
  // Columns separated by two spaces, the last one not padded; no trailing spaces.
  std::string render() const;

 private:
  std::vector<std::string> header_;
  std::vector<std::vector<std::string>> rows_;
};

// A JSON value as a table cell: strings bare, null "-", arrays joined with ",".
std::string cell(const nlohmann::json& v);
// j[key] as a cell ("-" when absent).
std::string cellOf(const nlohmann::json& j, const char* key);
// Bytes for people: 1234 -> "1.2 KiB".
std::string humanBytes(uint64_t n);
// Milliseconds for people: 61000 -> "1m1s".
std::string humanDuration(uint64_t ms);

}  // namespace weft::cli
