// Local manifest source: a directory of Kubernetes-shaped YAML files (Namespace, Pod, Service,
// PeerAuthentication, AuthorizationPolicy), parsed and validated file by file, merged into the cluster model and
// watched for changes.
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "agent/model.h"
#include "common/status.h"
#include "common/uv_handle.h"

namespace YAML {
class Node;
}

namespace weft::agent {

// Limits on untrusted manifest input.
constexpr size_t kMaxManifestFileBytes = 8 * 1024 * 1024;
constexpr size_t kMaxManifestFiles = 10000;

// Everything one file defines.
struct ManifestObjects {
  std::vector<Namespace> namespaces;
  std::vector<Pod> pods;
  std::vector<Service> services;
  std::vector<PeerAuthentication> peer_authentications;
  std::vector<AuthorizationPolicy> authorization_policies;
};

// Parses and validates one file's text (`file` names it in errors). All or nothing: the first
// problem rejects the whole file with "<file>: <Kind> <namespace>/<name>: <field>: <what>", or
// "<file>: line L, column C: <yaml error>" for syntax errors.
Result<ManifestObjects> parseManifest(const std::string& file, const std::string& text);

// One object of a core kind, validated exactly as a manifest document of that kind (shared by
// the manifest and the Kubernetes API sources). The kind is the caller's (API list items carry
// none); `doc.kind`, if present, must match. Errors read "<Kind> <ns>/<name>: <field>: <what>".
Result<Namespace> parseNamespaceObject(const YAML::Node& doc);
Result<Pod> parsePodObject(const YAML::Node& doc);
Result<Service> parseServiceObject(const YAML::Node& doc);
// A Pod that may have no status.podIPs yet (the Kubernetes source, this node's pods).
Result<Pod> parsePendingPodObject(const YAML::Node& doc);
// The security.weft.dev/v1 kinds, with the same checks as in a manifest file (the
// one-per-namespace rule for PeerAuthentication is the caller's: it spans objects).
Result<PeerAuthentication> parsePeerAuthenticationObject(const YAML::Node& doc);
Result<AuthorizationPolicy> parseAuthorizationPolicyObject(const YAML::Node& doc);

// The merged state of a manifest directory, with per-file last-good objects.
class ManifestSource {
 public:
  explicit ManifestSource(std::string dir);

  // Reads the directory and applies files that were added, changed or removed. A file that is
  // rejected keeps its last good objects in force. Returns true if the model changed.
  bool rescan();

  const std::string& dir() const { return dir_; }
  const ClusterModel& model() const { return model_; }
  // Current problems, one message per rejected file (plus a directory-level one).
  std::vector<std::string> errors() const;
  // How many times file contents were rejected since start.
  uint64_t rejections() const { return rejections_; }

 private:
  struct FileState {
    int64_t mtime_ns = -1;
    int64_t size = -1;
    uint64_t ino = 0;
    size_t hash = 0;
    std::string text;       // the last content read (retried when other files change)
    bool has_good = false;  // good_ holds objects in force
    ManifestObjects good;
    std::string error;      // why the current content is rejected; empty = accepted
  };

  // Validates `text` of `file` (parse + duplicates against other files) and updates state.
  // Returns true if the file's objects in force changed.
  bool apply(const std::string& file, FileState& state);
  std::string findDuplicate(const std::string& file, const ManifestObjects& objects) const;
  void rebuildModel();

  std::string dir_;
  std::map<std::string, FileState> files_;  // by full path
  std::string dir_error_;
  ClusterModel model_;
  uint64_t rejections_ = 0;
};

// Watches a ManifestSource's directory on a libuv loop: inotify (uv_fs_event) plus a rescan
// timer as a safety net; calls `on_change` after the model changed.
class ManifestWatcher {
 public:
  ManifestWatcher(uv_loop_t* loop, ManifestSource* source, std::function<void()> on_change,
                  uint64_t rescan_interval_ms = 2000);
  // Starts watching; the directory must exist for inotify (the timer works regardless).
  Status start();
  // Rescans now (e.g. a CNI ADD for a pod the model does not know yet).
  void rescanNow();

 private:
  void scheduleDebounced();

  uv_loop_t* loop_;
  ManifestSource* source_;
  std::function<void()> on_change_;
  uint64_t interval_ms_;
  UvHandle<uv_fs_event_t> event_;
  UvHandle<uv_timer_t> rescan_timer_;
  UvHandle<uv_timer_t> debounce_timer_;
};

}  // namespace weft::agent
