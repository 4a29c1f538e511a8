// The AuthorizationPolicy matrix shared by the end-to-end tests (policy_e2e_test.cc checks each
// row's outcome and verdict; weftctl_e2e_test.cc checks that `weftctl trace` agrees with it).
#pragma once

#include <map>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "tests/e2e/sim_cluster.h"

namespace weft::e2e {

// node1: the callers. Meshed (HBONE): front/client, ops/admin. Outside the mesh (plaintext):
// plain/client, plain/bot. node2: app/server (app=server; 8080, 8081, 8082) and app/web
// (app=web; 8080), both enrolled.
constexpr const char* kFront = "front/client";
constexpr const char* kOps = "ops/admin";
constexpr const char* kPlain = "plain/client";
constexpr const char* kBot = "plain/bot";
constexpr const char* kServerIp = "10.244.2.10";
constexpr const char* kWebIp = "10.244.2.11";

// The policies under test. Comments say which rows each one decides.
inline std::string policiesYaml(bool webDryRun) {
  return fmt::format(R"(# Mesh-wide (root namespace): ipBlocks.
apiVersion: security.weft.dev/v1
kind: AuthorizationPolicy
metadata: {{name: mesh-deny-bot, namespace: weft-system}}
spec:
  action: DENY
  rules:
  - from: [{{source: {{ipBlocks: ["10.244.1.21/32"]}}}}]
---
# Namespace-wide (no selector): notNamespaces + principals "*", ports.
apiVersion: security.weft.dev/v1
kind: AuthorizationPolicy
metadata: {{name: ns-deny, namespace: app}}
spec:
  action: DENY
  rules:
  - from: [{{source: {{notNamespaces: ["front"], principals: ["*"]}}}}]
    to: [{{operation: {{ports: ["8081"]}}}}]
---
# Selector app=server, the allow-list.
apiVersion: security.weft.dev/v1
kind: AuthorizationPolicy
metadata: {{name: server-allow, namespace: app}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: ["cluster.local/ns/front/sa/default"]}}}}]
    to: [{{operation: {{ports: ["8080", "8081"]}}}}]
  - from: [{{source: {{namespaces: ["ops"]}}}}]
    to: [{{operation: {{notPorts: ["8081"]}}}}]
  - from: [{{source: {{notPrincipals: ["*"], remoteIpBlocks: ["10.244.1.20/32"]}}}}]
    to: [{{operation: {{ports: ["8080"]}}}}]
  - when:
    - {{key: source.ip, values: ["10.244.1.0/24"]}}
    - {{key: destination.port, values: ["8082"]}}
    - {{key: source.namespace, notValues: ["ops"]}}
    - {{key: destination.ip, values: ["10.244.2.10"]}}
    - {{key: source.principal, notValues: ["*/sa/nobody"]}}
---
# Selector app=server: DENY beats the ALLOW above; namespaces + notIpBlocks + when, and
# notRemoteIpBlocks.
apiVersion: security.weft.dev/v1
kind: AuthorizationPolicy
metadata: {{name: server-deny, namespace: app}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: DENY
  rules:
  - from: [{{source: {{namespaces: ["ops"], notIpBlocks: ["10.244.9.0/24"]}}}}]
    when: [{{key: destination.port, values: ["8082"]}}]
  - from: [{{source: {{notRemoteIpBlocks: ["10.244.1.10/32", "10.244.1.11/32"]}}}}]
    to: [{{operation: {{ports: ["8081"]}}}}]
---
apiVersion: security.weft.dev/v1
kind: AuthorizationPolicy
metadata: {{name: server-audit, namespace: app}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: AUDIT
  rules:
  - to: [{{operation: {{ports: ["8080"]}}}}]
---
# Dry-run DENY on app=web for namespace front.
apiVersion: security.weft.dev/v1
kind: AuthorizationPolicy
metadata:
  name: web-dry
  namespace: app
  annotations: {{security.weft.dev/dry-run: "{}"}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: DENY
  rules:
  - from: [{{source: {{namespaces: ["front"]}}}}]
---
# L7 in a DENY without a waypoint: enforced on its L4 part (ops), the method check dropped.
apiVersion: security.weft.dev/v1
kind: AuthorizationPolicy
metadata: {{name: web-l7, namespace: app}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: DENY
  rules:
  - from: [{{source: {{namespaces: ["ops"]}}}}]
    to: [{{operation: {{methods: ["POST"]}}}}]
)",
                     webDryRun ? "true" : "false");
}

struct Row {
  const char* source;  // pod
  const char* dest;    // "server" or "web"
  int port;
  bool allowed;
  const char* policy;  // deciding policy ("" = none decided)
  int rule;            // its rule, -1 if none
  const char* path;    // "hbone" or "plaintext"
};

// The expected outcome of every (source, destination, port).
inline const Row kTable[] = {
    {kFront, "server", 8080, true, "app/server-allow", 0, "hbone"},
    {kFront, "server", 8081, true, "app/server-allow", 0, "hbone"},
    {kFront, "server", 8082, true, "app/server-allow", 3, "hbone"},
    {kFront, "web", 8080, true, "", -1, "hbone"},
    {kOps, "server", 8080, true, "app/server-allow", 1, "hbone"},
    {kOps, "server", 8081, false, "app/ns-deny", 0, "hbone"},
    {kOps, "server", 8082, false, "app/server-deny", 0, "hbone"},
    {kOps, "web", 8080, false, "app/web-l7", 0, "hbone"},
    {kPlain, "server", 8080, true, "app/server-allow", 2, "plaintext"},
    {kPlain, "server", 8081, false, "app/server-deny", 1, "plaintext"},
    {kPlain, "server", 8082, true, "app/server-allow", 3, "plaintext"},
    {kPlain, "web", 8080, true, "", -1, "plaintext"},
    {kBot, "server", 8080, false, "weft-system/mesh-deny-bot", 0, "plaintext"},
    {kBot, "web", 8080, false, "weft-system/mesh-deny-bot", 0, "plaintext"},
};

// The cluster the matrix runs on (2 nodes): namespaces, callers on node1, servers on node2, and
// the policies with web-dry as dry-run.
inline std::vector<ManifestFile> policyMatrixManifests() {
  auto pod = [](const char* ns, const char* name, const char* node, const char* ip4,
                const char* ip6, std::string cmd, int ready,
                std::map<std::string, std::string> labels) {
    PodSpec p;
    p.ns = ns, p.name = name, p.node = node, p.ip4 = ip4, p.ip6 = ip6, p.command = cmd;
    p.readyPort = ready;
    p.labels = std::move(labels);
    return podYaml(p);
  };
  std::string echo = echoServerPath();
  return {
      {"namespaces.yaml", namespaceYaml("front", true) + "---\n" + namespaceYaml("ops", true) +
                              "---\n" + namespaceYaml("app", true) + "---\n" +
                              namespaceYaml("plain", false) + "---\n" +
                              namespaceYaml("weft-system", false)},
      {"callers.yaml",
       pod("front", "client", "node1", "10.244.1.10", "fd00:10:244:1::10", "sleep infinity", 0,
           {}) +
           "---\n" +
           pod("ops", "admin", "node1", "10.244.1.11", "fd00:10:244:1::11", "sleep infinity",
               0, {}) +
           "---\n" +
           pod("plain", "client", "node1", "10.244.1.20", "fd00:10:244:1::20",
               "sleep infinity", 0, {}) +
           "---\n" +
           pod("plain", "bot", "node1", "10.244.1.21", "fd00:10:244:1::21", "sleep infinity",
               0, {})},
      {"servers.yaml",
       pod("app", "server", "node2", kServerIp, "fd00:10:244:2::10",
           echo + " --port 8080 --port 8081 --port 8082", 8080, {{"app", "server"}}) +
           "---\n" +
           pod("app", "web", "node2", kWebIp, "fd00:10:244:2::11", echo + " --port 8080", 8080,
               {{"app", "web"}})},
      {"policies.yaml", policiesYaml(true)},
  };
}

}  // namespace weft::e2e
