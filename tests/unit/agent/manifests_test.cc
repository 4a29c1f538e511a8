// Manifest parsing and validation: every error names the file, the object and the field; a
// rejected file keeps its last good objects; duplicates across files name both files.
#include "agent/manifests.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <thread>

#include "test_util.h"

namespace weft::agent {
namespace {

using ::testing::HasSubstr;
using testing::TempDir;

constexpr const char* kGood = R"(apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    weft.dev/dataplane-mode: ambient
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  labels: {app: web}
spec:
  nodeName: node1
  serviceAccountName: web
status:
  podIPs:
  - ip: 10.244.1.10
  - ip: fd00:10:244:1::10
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  selector: {app: web}
  clusterIP: 10.96.0.10
  ports:
  - name: http
    port: 80
    targetPort: 8080
  - port: 53
    protocol: UDP
---
)";

TEST(ManifestParse, GoodFile) {
  auto r = parseManifest("f.yaml", kGood);
  ASSERT_TRUE(r) << r.status().message();
  ASSERT_EQ(r->namespaces.size(), 1u);
  ASSERT_EQ(r->pods.size(), 1u);
  ASSERT_EQ(r->services.size(), 1u);
  const Pod& p = r->pods[0];
  EXPECT_EQ(p.meta.namespace_, "shop");
  EXPECT_EQ(p.node_name, "node1");
  EXPECT_EQ(p.service_account, "web");
  ASSERT_EQ(p.ips.size(), 2u);
  EXPECT_EQ(p.ips[1].toString(), "fd00:10:244:1::10");
  EXPECT_EQ(p.meta.uid, deriveUid("Pod", "shop", "web-1"));
  EXPECT_EQ(p.meta.uid.size(), 36u);
  const Service& s = r->services[0];
  ASSERT_EQ(s.ports.size(), 2u);
  EXPECT_EQ(s.ports[0].target_port, 8080);
  EXPECT_EQ(s.ports[0].protocol, "TCP");
  EXPECT_EQ(s.ports[1].target_port, 53);  // defaults to port
  EXPECT_EQ(s.ports[1].protocol, "UDP");
  ASSERT_EQ(s.cluster_ips.size(), 1u);
  EXPECT_EQ(s.cluster_ips[0].toString(), "10.96.0.10");
}

TEST(ManifestParse, Defaults) {
  auto r = parseManifest("d.yaml", R"(kind: Pod
metadata: {name: a, uid: given-uid}
spec: {nodeName: n}
status: {podIPs: [{ip: 10.0.0.1}]}
---
kind: Service
metadata: {name: s}
spec:
  clusterIP: None
)");
  ASSERT_TRUE(r) << r.status().message();
  EXPECT_EQ(r->pods[0].meta.namespace_, "default");
  EXPECT_EQ(r->pods[0].service_account, "default");
  EXPECT_EQ(r->pods[0].meta.uid, "given-uid");
  EXPECT_TRUE(r->services[0].headless);
  EXPECT_TRUE(r->services[0].cluster_ips.empty());
}

std::string podWith(const std::string& spec, const std::string& status) {
  return "kind: Pod\nmetadata:\n  name: p\n  namespace: ns\n" + spec + status;
}

struct BadCase {
  const char* name;
  std::string text;
  std::string expected;  // the whole message after "bad.yaml: "
};

class ManifestValidation : public ::testing::TestWithParam<BadCase> {};

TEST_P(ManifestValidation, RejectsWithFileObjectField) {
  auto r = parseManifest("bad.yaml", GetParam().text);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.status().message(), "bad.yaml: " + GetParam().expected);
}

const std::string kIps = "status:\n  podIPs:\n  - ip: 10.0.0.1\n";
const std::string kSpec = "spec:\n  nodeName: n1\n";

INSTANTIATE_TEST_SUITE_P(
    AllFields, ManifestValidation,
    ::testing::Values(
        BadCase{"NoNodeName", podWith("spec: {}\n", kIps), "Pod ns/p: spec.nodeName: required"},
        BadCase{"NoSpec", podWith("", kIps), "Pod ns/p: spec: required, a mapping"},
        BadCase{"NoPodIPs", podWith(kSpec, ""),
                "Pod ns/p: status.podIPs: required, at least one IP"},
        BadCase{"EmptyPodIPs", podWith(kSpec, "status:\n  podIPs: []\n"),
                "Pod ns/p: status.podIPs: required, a list of at least one {ip: ...}"},
        BadCase{"BadIp", podWith(kSpec, "status:\n  podIPs:\n  - ip: 10.0.0.300\n"),
                "Pod ns/p: status.podIPs[0].ip: \"10.0.0.300\" is not a valid IP address"},
        BadCase{"MissingIp", podWith(kSpec, "status:\n  podIPs:\n  - {}\n"),
                "Pod ns/p: status.podIPs[0].ip: required, an IP address"},
        BadCase{"SameFamilyTwice",
                podWith(kSpec, "status:\n  podIPs:\n  - ip: 10.0.0.1\n  - ip: 10.0.0.2\n"),
                "Pod ns/p: status.podIPs[1].ip: more than one IP of the same family"},
        BadCase{"NoName", "kind: Pod\nmetadata:\n  namespace: ns\n" + kSpec + kIps,
                "Pod (document 1): metadata.name: required"},
        BadCase{"NoMetadata", "kind: Namespace\n", "Namespace (document 1): metadata: required, "
                                                   "a mapping"},
        BadCase{"BadNamespaceName", "kind: Namespace\nmetadata: {name: Shop_1}\n",
                "Namespace Shop_1: metadata.name: \"Shop_1\" is not a lowercase DNS-1123 label"},
        BadCase{"BadLabels", "kind: Namespace\nmetadata:\n  name: a\n  labels: [x]\n",
                "Namespace a: metadata.labels: must be a mapping of strings"},
        BadCase{"NestedLabel", "kind: Namespace\nmetadata:\n  name: a\n  labels: {x: {y: z}}\n",
                "Namespace a: metadata.labels.x: must be a string"},
        BadCase{"ApiVersion", "apiVersion: v2\nkind: Namespace\nmetadata: {name: a}\n",
                "Namespace a: apiVersion: must be v1"},
        BadCase{"ServiceNoPort",
                "kind: Service\nmetadata: {name: s, namespace: ns}\nspec:\n  ports:\n  - name: x\n",
                "Service ns/s: spec.ports[0].port: required"},
        BadCase{"ServicePortRange",
                "kind: Service\nmetadata: {name: s, namespace: ns}\nspec:\n  ports:\n"
                "  - port: 70000\n",
                "Service ns/s: spec.ports[0].port: must be an integer 1-65535"},
        BadCase{"ServicePortZero",
                "kind: Service\nmetadata: {name: s, namespace: ns}\nspec:\n  ports:\n  - port: 0\n",
                "Service ns/s: spec.ports[0].port: must be an integer 1-65535"},
        BadCase{"ServiceTargetPortBadName",
                "kind: Service\nmetadata: {name: s, namespace: ns}\nspec:\n  ports:\n"
                "  - port: 80\n    targetPort: Http_Port\n",
                "Service ns/s: spec.ports[0].targetPort: \"Http_Port\" is neither a port number "
                "nor a port name (a name has 1-15 of a-z, 0-9, '-' and at least one letter)"},
        BadCase{"ServiceTargetPortQuotedNumber",
                "kind: Service\nmetadata: {name: s, namespace: ns}\nspec:\n  ports:\n"
                "  - port: 80\n    targetPort: \"8080\"\n",
                "Service ns/s: spec.ports[0].targetPort: \"8080\" is neither a port number "
                "nor a port name (a name has 1-15 of a-z, 0-9, '-' and at least one letter)"},
        BadCase{"PodContainerPortName",
                "kind: Pod\nmetadata: {name: p, namespace: ns}\nspec:\n  nodeName: n1\n"
                "  containers:\n  - name: app\n    ports:\n    - {name: Web, containerPort: 80}\n"
                "status: {podIPs: [{ip: 10.244.1.9}]}\n",
                "Pod ns/p: spec.containers[0].ports[0].name: \"Web\" is not a port name "
                "(IANA_SVC_NAME)"},
        BadCase{"PodContainerPortNumber",
                "kind: Pod\nmetadata: {name: p, namespace: ns}\nspec:\n  nodeName: n1\n"
                "  containers:\n  - name: app\n    ports:\n    - {name: web, containerPort: 0}\n"
                "status: {podIPs: [{ip: 10.244.1.9}]}\n",
                "Pod ns/p: spec.containers[0].ports[0].containerPort: required, an integer "
                "1-65535"},
        BadCase{"ServiceProtocol",
                "kind: Service\nmetadata: {name: s, namespace: ns}\nspec:\n  ports:\n"
                "  - port: 80\n    protocol: SCTP\n",
                "Service ns/s: spec.ports[0].protocol: \"SCTP\" is not TCP or UDP"},
        BadCase{"ServiceClusterIP",
                "kind: Service\nmetadata: {name: s, namespace: ns}\nspec:\n  clusterIP: 10.96.1\n",
                "Service ns/s: spec.clusterIP: \"10.96.1\" is not a valid IP address or \"None\""},
        BadCase{"ServiceClusterIPs",
                "kind: Service\nmetadata: {name: s, namespace: ns}\nspec:\n"
                "  clusterIPs: [10.96.0.1, nope]\n",
                "Service ns/s: spec.clusterIPs[1]: \"nope\" is not a valid IP address or \"None\""},
        BadCase{"ServiceClusterIPMismatch",
                "kind: Service\nmetadata: {name: s, namespace: ns}\nspec:\n  clusterIP: 10.96.0.1\n"
                "  clusterIPs: [10.96.0.2]\n",
                "Service ns/s: spec.clusterIPs[0]: must equal spec.clusterIP"},
        BadCase{"UnknownKind", "kind: Deployment\nmetadata: {name: d, namespace: ns}\n",
                "Deployment ns/d: kind: unknown kind \"Deployment\" (known: Namespace, Pod, "
                "Service, PeerAuthentication, AuthorizationPolicy)"},
        BadCase{"UnknownKindNoName", "kind: Deployment\n",
                "document 1: kind: unknown kind \"Deployment\" (known: Namespace, Pod, Service, "
                "PeerAuthentication, AuthorizationPolicy)"},
        BadCase{"NoKind", "metadata: {name: d}\n", "document 1: kind: required"},
        BadCase{"NotMapping", "- a\n- b\n", "document 1: not a mapping"},
        BadCase{"TwiceInFile",
                "kind: Namespace\nmetadata: {name: a}\n---\nkind: Namespace\nmetadata: {name: a}\n",
                "Namespace a: metadata.name: defined twice in this file"}),
    [](const ::testing::TestParamInfo<BadCase>& info) { return info.param.name; });

TEST(ManifestParse, YamlSyntaxErrorHasLineAndColumn) {
  auto r = parseManifest("syntax.yaml", "kind: Namespace\nmetadata:\n  name: [a\n  labels: x\n");
  ASSERT_FALSE(r);
  EXPECT_THAT(r.status().message(), HasSubstr("syntax.yaml: line "));
  EXPECT_THAT(r.status().message(), HasSubstr(", column "));
  auto r2 = parseManifest("tab.yaml", "kind: Namespace\nmetadata:\n\tname: a\n");
  ASSERT_FALSE(r2);
  EXPECT_THAT(r2.status().message(), HasSubstr("tab.yaml: line 3, column"));
}

TEST(ManifestSource, LoadsDirectoryIgnoringOtherFiles) {
  TempDir dir;
  dir.write("a.yaml", kGood);
  dir.write("notes.txt", "kind: Garbage\n");
  dir.write(".hidden.yaml", "kind: Garbage\n");
  ManifestSource src(dir.path());
  EXPECT_TRUE(src.rescan());
  EXPECT_TRUE(src.errors().empty());
  EXPECT_EQ(src.model().pods.size(), 1u);
  EXPECT_EQ(src.model().services.size(), 1u);
  EXPECT_FALSE(src.rescan());  // nothing changed
}

TEST(ManifestSource, RejectedFileKeepsLastGoodAndOthersApply) {
  TempDir dir;
  dir.write("a.yaml", kGood);
  dir.write("b.yaml", "kind: Namespace\nmetadata: {name: other}\n");
  ManifestSource src(dir.path());
  ASSERT_TRUE(src.rescan());
  ASSERT_EQ(src.model().namespaces.size(), 2u);

  // a.yaml breaks: a half-applied file would drop web-1 or add web-2.
  std::this_thread::sleep_for(std::chrono::milliseconds(10));
  dir.write("a.yaml", std::string(kGood) +
                          "kind: Pod\nmetadata: {name: web-2, namespace: shop}\nspec: {}\n");
  dir.write("c.yaml", "kind: Namespace\nmetadata: {name: third}\n");
  EXPECT_TRUE(src.rescan());
  EXPECT_EQ(src.model().namespaces.size(), 3u);  // c.yaml applied
  EXPECT_EQ(src.model().pods.size(), 1u);        // a.yaml's last good state
  EXPECT_NE(src.model().findPod("shop", "web-1"), nullptr);
  ASSERT_EQ(src.errors().size(), 1u);
  EXPECT_EQ(src.errors()[0], dir.file("a.yaml") + ": Pod shop/web-2: spec.nodeName: required");
  EXPECT_EQ(src.rejections(), 1u);
  EXPECT_FALSE(src.rescan());  // same bad content: not counted again
  EXPECT_EQ(src.rejections(), 1u);

  // Fixed: the error goes away.
  dir.write("a.yaml", kGood);
  src.rescan();
  EXPECT_TRUE(src.errors().empty());

  // Removed: its objects go away.
  std::filesystem::remove(dir.file("a.yaml"));
  EXPECT_TRUE(src.rescan());
  EXPECT_TRUE(src.model().pods.empty());
}

TEST(ManifestSource, FirstVersionBadAppliesNothing) {
  TempDir dir;
  dir.write("a.yaml", "kind: Namespace\nmetadata: {name: ok}\n---\nkind: Nope\n");
  ManifestSource src(dir.path());
  EXPECT_FALSE(src.rescan());
  EXPECT_TRUE(src.model().namespaces.empty());
  ASSERT_EQ(src.errors().size(), 1u);
  EXPECT_THAT(src.errors()[0], HasSubstr("a.yaml: document 2: kind: unknown kind \"Nope\""));
}

TEST(ManifestSource, DuplicateAcrossFilesNamesBoth) {
  TempDir dir;
  dir.write("a.yaml", kGood);
  dir.write("b.yaml", "kind: Pod\nmetadata: {name: web-1, namespace: shop}\n"
                      "spec: {nodeName: node2}\nstatus: {podIPs: [{ip: 10.244.2.10}]}\n");
  ManifestSource src(dir.path());
  src.rescan();
  ASSERT_EQ(src.errors().size(), 1u);
  EXPECT_EQ(src.errors()[0],
            dir.file("b.yaml") + ": Pod shop/web-1: also defined in " + dir.file("a.yaml"));
  EXPECT_EQ(src.model().findPod("shop", "web-1")->node_name, "node1");

  // Once a.yaml drops it, b.yaml (unchanged) is retried and applies.
  std::this_thread::sleep_for(std::chrono::milliseconds(10));
  dir.write("a.yaml", "kind: Namespace\nmetadata: {name: shop}\n");
  EXPECT_TRUE(src.rescan());
  EXPECT_TRUE(src.errors().empty());
  EXPECT_EQ(src.model().findPod("shop", "web-1")->node_name, "node2");
}

TEST(ManifestSource, MissingDirectoryIsAnError) {
  ManifestSource src("/nonexistent/weft-test-dir");
  EXPECT_FALSE(src.rescan());
  ASSERT_EQ(src.errors().size(), 1u);
  EXPECT_THAT(src.errors()[0], HasSubstr("/nonexistent/weft-test-dir"));
}

TEST(ManifestWatcher, NoticesChangesOnTheLoop) {
  TempDir dir;
  ManifestSource src(dir.path());
  src.rescan();
  uv_loop_t loop;
  ASSERT_EQ(uv_loop_init(&loop), 0);
  int changes = 0;
  {
    ManifestWatcher watcher(&loop, &src, [&] { changes++; }, 2000);
    ASSERT_TRUE(watcher.start());
    dir.write("a.yaml", kGood);
    // inotify + 50 ms debounce: well before the 2 s rescan.
    EXPECT_TRUE(testing::runUntil(&loop, [&] { return changes > 0; }, 1500));
    EXPECT_EQ(src.model().pods.size(), 1u);
  }
  uv_run(&loop, UV_RUN_NOWAIT);
  EXPECT_EQ(uv_loop_close(&loop), 0);
}

TEST(ManifestExamples, DemoManifestsParse) {
  const std::string dir = std::string(WEFT_SOURCE_DIR) + "/examples/demo";
  if (!std::filesystem::exists(dir)) GTEST_SKIP() << dir << " not present";
  ManifestSource src(dir);
  src.rescan();
  EXPECT_TRUE(src.errors().empty()) << src.errors()[0];
  EXPECT_FALSE(src.model().pods.empty());
}

}  // namespace
}  // namespace weft::agent
