// Helpers shared by weftctl's object files, and the pure renderers the unit tests check.
#pragma once

#include <cstdint>
#include <ctime>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

namespace weft::cli {

// "2026-11-26T10:00:00Z" (optionally with .mmm) -> seconds since the epoch.
std::optional<time_t> parseIsoTime(const std::string& s);

// Certificate health from the ztunnel's config_dump "certificates": counts of valid,
// expiring (past renew_at: within the renew window), expired, pending.
nlohmann::json certificateHealth(const nlohmann::json& certificates, time_t now);

// "ns/name" of a JSON object with "namespace" and "name".
std::string keyOf(const nlohmann::json& j);
// True if `ref` names the object: "ns/name" exactly, or "name" when it is unique (the caller
// checks uniqueness).
bool refMatches(const std::string& ref, const nlohmann::json& obj);

// Renderers (table text) of documents as the servers return them.
std::string renderStatus(const nlohmann::json& status);
std::string renderWorkloads(const nlohmann::json& workloads);
std::string renderConnections(const nlohmann::json& connections);
std::string renderTrace(const nlohmann::json& trace);
std::string renderEvent(const nlohmann::json& event);

// Adds source_identity and destination_identity to each connection (HBONE only; plaintext
// has none): the verified peer identity for the far end, the local pod's SPIFFE id (service
// account from the agent's /workloads) for ours.
nlohmann::json addIdentities(nlohmann::json connections, const nlohmann::json& workloads,
                             const std::string& trust_domain);

// The connections (ztunnel /connections) that match every filter given (empty = any): pod
// ("ns/name" or "name", either end), namespace (either end), identity (peer identity, or the
// SPIFFE id of either end's workload).
nlohmann::json filterConnections(const nlohmann::json& connections, const std::string& pod,
                                 const std::string& ns, const std::string& identity);

}  // namespace weft::cli

namespace weft::cli {
// "key: value" lines of a document (workload/service/policy/cert show).
std::string renderObjectFields(const nlohmann::json& j);
}  // namespace weft::cli
