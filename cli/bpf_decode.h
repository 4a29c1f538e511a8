// Decoding Weft's map entries (bpf/abi/maps.h) into mesh terms for `weftctl bpf map dump`:
// netns cookies and IPs become pods, addresses become ip:port.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "bpf/abi/maps.h"

namespace weft::cli {

// Pods by netns cookie (the agent's /workloads, local pods) and by IP (every pod).
struct PodNames {
  std::map<uint64_t, std::string> by_cookie;
  std::map<std::string, std::string> by_ip;

  static PodNames fromWorkloads(const nlohmann::json& workloads);
  std::string cookie(uint64_t c) const;     // "ns/name" or ""
  std::string ip(const std::string& a) const;
};

nlohmann::json decodeEnrolled(uint64_t cookie, const weft_enrollment& v, const PodNames& pods);
nlohmann::json decodeOrigDst(const weft_orig_dst_key& k, const weft_sockaddr& v,
                             const PodNames& pods);
nlohmann::json decodeDnsDst(const weft_dns_key& k, const weft_sockaddr& v, const PodNames& pods);
nlohmann::json decodeInboundListener(const weft_ip& k, uint64_t socket_cookie,
                                     const PodNames& pods);
nlohmann::json decodeBypass(const weft_ip& k);

}  // namespace weft::cli
