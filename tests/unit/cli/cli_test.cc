// weftctl without servers: global options and environment, prefix matching and dispatch (help,
// ambiguity, JSON errors), tables, renderers, map decoding; and its HTTP client against a live
// HttpAdminServer on a unix socket (plain and chunked streaming replies).
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <map>
#include <sstream>
#include <thread>

#include "cli/admin_client.h"
#include "cli/bpf_decode.h"
#include "cli/command.h"
#include "cli/objects.h"
#include "cli/table.h"
#include "common/address.h"
#include "common/http_admin.h"

namespace weft::cli {
namespace {

using nlohmann::json;

std::function<const char*(const char*)> envOf(std::map<std::string, std::string> m) {
  return [m = std::move(m)](const char* n) -> const char* {
    static thread_local std::string v;
    auto it = m.find(n);
    if (it == m.end()) return nullptr;
    v = it->second;
    return v.c_str();
  };
}

TEST(GlobalOptions, AnywhereAndWithValues) {
  std::vector<std::string> args = {"wo", "-j", "li", "--agent-socket", "/a.sock",
                                   "--ztunnel=127.0.0.1:1", "--pin-dir", "/p"};
  auto o = parseGlobalOptions(&args, envOf({}));
  ASSERT_TRUE(o) << o.status().message();
  EXPECT_TRUE(o->json);
  EXPECT_FALSE(o->pretty);
  EXPECT_EQ(o->agent_socket, "/a.sock");
  EXPECT_EQ(o->ztunnel, "127.0.0.1:1");
  EXPECT_EQ(o->pin_dir, "/p");
  EXPECT_EQ(args, (std::vector<std::string>{"wo", "li"}));
}

TEST(GlobalOptions, EnvironmentThenDefaults) {
  std::vector<std::string> args = {"status"};
  auto o = parseGlobalOptions(&args, envOf({{"WEFT_AGENT_SOCKET", "/env.sock"},
                                            {"WEFT_ZTUNNEL_ADMIN", "127.0.0.1:9"},
                                            {"WEFT_BPF_PIN_DIR", "/pins"}}));
  ASSERT_TRUE(o);
  EXPECT_EQ(o->agent_socket, "/env.sock");
  EXPECT_EQ(o->ztunnel, "127.0.0.1:9");
  EXPECT_EQ(o->pin_dir, "/pins");
  args = {"-p", "status", "--agent-socket=/flag.sock"};
  o = parseGlobalOptions(&args, envOf({{"WEFT_AGENT_SOCKET", "/env.sock"}}));
  ASSERT_TRUE(o);
  EXPECT_EQ(o->agent_socket, "/flag.sock") << "a flag beats the environment";
  EXPECT_EQ(o->ztunnel, kDefaultZtunnelAdmin);
  EXPECT_TRUE(o->pretty);
  args = {"--agent-socket"};
  EXPECT_FALSE(parseGlobalOptions(&args, envOf({})));
  // After "--" nothing is an option.
  args = {"trace", "--", "-j"};
  o = parseGlobalOptions(&args, envOf({}));
  ASSERT_TRUE(o);
  EXPECT_FALSE(o->json);
}

TEST(PrefixMatch, UniqueExactAmbiguousUnknown) {
  std::vector<std::string> names = {"status", "service", "workload", "log"};
  EXPECT_EQ(matchPrefix("wo", names, "object").value(), "workload");
  EXPECT_EQ(matchPrefix("st", names, "object").value(), "status");
  EXPECT_EQ(matchPrefix("log", names, "object").value(), "log");
  auto amb = matchPrefix("s", names, "object");
  ASSERT_FALSE(amb);
  EXPECT_EQ(amb.status().message(), "ambiguous object 's': status, service");
  auto unk = matchPrefix("x", names, "object");
  ASSERT_FALSE(unk);
  EXPECT_NE(unk.status().message().find("unknown object 'x'"), std::string::npos);
  // An exact name wins over a longer one it prefixes.
  EXPECT_EQ(matchPrefix("map", {"map", "maps"}, "x").value(), "map");
}

// Runs weftctl's dispatch on a test tree whose verbs record what ran.
struct Runner {
  std::ostringstream out, err;
  std::vector<std::string> ran;
  Command tree;
  Runner() {
    auto rec = [this](const std::string& name) {
      return [this, name](Context&, const std::vector<std::string>& a) {
        std::string s = name;
        for (const auto& x : a) s += " " + x;
        ran.push_back(s);
        return 0;
      };
    };
    Command wl{"workload", "workload { list | show NAME }", "pods", nullptr, {}, "list"};
    wl.children = {{"list", "list", "all", rec("workload list"), {}, ""},
                   {"show", "show NAME", "one", rec("workload show"), {}, ""}};
    Command map{"map", "map { list | dump NAME }", "maps", nullptr, {}, "list"};
    map.children = {{"list", "list", "", rec("bpf map list"), {}, ""},
                    {"dump", "dump NAME", "", rec("bpf map dump"), {}, ""}};
    Command bpf{"bpf", "bpf { map }", "bpf", nullptr, {map}, ""};
    tree = Command{"", "weftctl OBJECT", "test", nullptr,
                   {wl, bpf, {"status", "status", "", rec("status"), {}, ""},
                    {"service", "service", "", rec("service"), {}, ""}},
                   ""};
  }
  int run(std::vector<std::string> args) {
    auto o = parseGlobalOptions(&args, envOf({}));
    EXPECT_TRUE(o);
    Context ctx(o.value(), out, err);
    return dispatch(ctx, tree, args);
  }
};

TEST(Dispatch, PrefixesDefaultsAndArguments) {
  Runner r;
  EXPECT_EQ(r.run({"wo", "li"}), 0);
  EXPECT_EQ(r.run({"w", "sh", "app/web"}), 0);
  EXPECT_EQ(r.run({"workload"}), 0);  // default verb
  EXPECT_EQ(r.run({"b", "m", "d", "weft_enrolled"}), 0);
  EXPECT_EQ(r.run({"bpf", "map"}), 0);
  EXPECT_EQ(r.run({"st"}), 0);
  EXPECT_EQ(r.ran, (std::vector<std::string>{"workload list", "workload show app/web",
                                             "workload list", "bpf map dump weft_enrolled",
                                             "bpf map list", "status"}));
}

TEST(Dispatch, AmbiguousIsAnErrorNamingCandidatesAlsoInJson) {
  Runner r;
  EXPECT_EQ(r.run({"s"}), 1);
  EXPECT_EQ(r.err.str(), "Error: ambiguous object 's': status, service\n");
  EXPECT_TRUE(r.out.str().empty());
  Runner j;
  EXPECT_EQ(j.run({"-j", "s"}), 1);
  auto doc = json::parse(j.out.str());
  EXPECT_EQ(doc["error"], "ambiguous object 's': status, service");
  EXPECT_TRUE(j.err.str().empty());
  Runner v;
  EXPECT_EQ(v.run({"workload", "frob"}), 1);
  EXPECT_NE(v.err.str().find("unknown workload verb 'frob' (one of: list, show, help)"),
            std::string::npos)
      << v.err.str();
  Runner m;
  EXPECT_EQ(m.run({"bpf"}), 1);  // bpf has no default verb
  EXPECT_NE(m.err.str().find("missing verb"), std::string::npos) << m.err.str();
}

TEST(Dispatch, HelpAtEveryLevel) {
  Runner r;
  EXPECT_EQ(r.run({"help"}), 0);
  EXPECT_NE(r.out.str().find("weftctl workload { list | show NAME }"), std::string::npos)
      << r.out.str();
  Runner w;
  EXPECT_EQ(w.run({"wo", "help"}), 0);
  EXPECT_NE(w.out.str().find("Usage: weftctl workload { list | show NAME }"), std::string::npos)
      << w.out.str();
  EXPECT_NE(w.out.str().find("weftctl workload show NAME"), std::string::npos) << w.out.str();
  Runner b;
  EXPECT_EQ(b.run({"bpf", "map", "help"}), 0);
  EXPECT_NE(b.out.str().find("weftctl bpf map dump NAME"), std::string::npos) << b.out.str();
  Runner j;
  EXPECT_EQ(j.run({"-j", "wo", "show", "help"}), 0);
  EXPECT_NE(json::parse(j.out.str())["usage"].get<std::string>().find("show NAME"),
            std::string::npos);
  EXPECT_TRUE(r.ran.empty() && w.ran.empty() && b.ran.empty() && j.ran.empty());
  // The real tree has help on every object.
  Command real = commandTree();
  for (const Command& c : real.children) {
    std::ostringstream out, err;
    std::vector<std::string> args = {c.name, "help"};
    auto o = parseGlobalOptions(&args, envOf({}));
    Context ctx(o.value(), out, err);
    EXPECT_EQ(dispatch(ctx, real, args), 0) << c.name;
    EXPECT_NE(out.str().find("Usage: weftctl " + c.usage), std::string::npos) << out.str();
  }
}

TEST(VerbOptions, PrefixesValuesAndErrors) {
  auto o = parseVerbOptions({"--po", "app/web", "--namespace=app", "x"},
                            {"pod", "namespace", "identity"});
  ASSERT_TRUE(o) << o.status().message();
  EXPECT_EQ(o->values["pod"], "app/web");
  EXPECT_EQ(o->values["namespace"], "app");
  EXPECT_EQ(o->positional, std::vector<std::string>{"x"});
  EXPECT_FALSE(parseVerbOptions({"--pod"}, {"pod"}));
  EXPECT_FALSE(parseVerbOptions({"--bogus", "1"}, {"pod"}));
  EXPECT_FALSE(parseVerbOptions({"--pod", "a", "--pod", "b"}, {"pod"}));
}

TEST(Table, AlignsColumnsWithoutTrailingSpaces) {
  Table t({"NAME", "IP", "NOTE"});
  t.add({"a", "10.0.0.1", ""});
  t.add({"longer-name", "1.2.3.4", "x"});
  EXPECT_EQ(t.render(),
            "NAME         IP        NOTE\n"
            "a            10.0.0.1\n"
            "longer-name  1.2.3.4   x\n");
  EXPECT_EQ(cell(json(nullptr)), "-");
  EXPECT_EQ(cell(json::array({"a", "b"})), "a,b");
  EXPECT_EQ(cell(json(true)), "yes");
  EXPECT_EQ(humanBytes(512), "512 B");
  EXPECT_EQ(humanBytes(1536), "1.5 KiB");
  EXPECT_EQ(humanDuration(61000), "1m1s");
}

TEST(Renderers, WorkloadsAndConnections) {
  json w = json::parse(R"([{"namespace":"app","name":"web","node":"node2","ips":["10.244.2.11"],
    "service_account":"default","mesh":true,"enrolled":true,"peer_authentication":"PERMISSIVE",
    "netns_cookie":4097}])");
  std::string t = renderWorkloads(w);
  EXPECT_NE(t.find("WORKLOAD"), std::string::npos);
  EXPECT_NE(t.find("app/web   node2  10.244.2.11  default          yes   yes       PERMISSIVE  4097"),
            std::string::npos)
      << t;
  json c = json::parse(R"([
    {"direction":"outbound","src":"10.244.1.10:4000","dst":"10.244.2.11:8080","path":"hbone",
     "peer_identity":"spiffe://cluster.local/ns/app/sa/default","source_workload":"front/client",
     "destination_workload":"app/web","bytes_received":100,"bytes_sent":2048,"age_ms":1500},
    {"direction":"outbound","src":"10.244.1.20:4000","dst":"10.244.9.9:80","path":"plain",
     "peer_identity":"","source_workload":"plain/client","destination_workload":"",
     "bytes_received":1,"bytes_sent":1,"age_ms":1}])");
  EXPECT_EQ(filterConnections(c, "web", "", "").size(), 1u);
  EXPECT_EQ(filterConnections(c, "front/client", "", "").size(), 1u);
  EXPECT_EQ(filterConnections(c, "", "plain", "").size(), 1u);
  EXPECT_EQ(filterConnections(c, "", "", "ns/app/sa/default").size(), 1u);
  EXPECT_EQ(filterConnections(c, "", "", "").size(), 2u);
  EXPECT_EQ(filterConnections(c, "nope", "", "").size(), 0u);
  json w2 = json::parse(R"([{"namespace":"front","name":"client","service_account":"fc"}])");
  json ids = addIdentities(c, w2, "td.example");
  EXPECT_EQ(ids[0]["source_identity"], "spiffe://td.example/ns/front/sa/fc");
  EXPECT_EQ(ids[0]["destination_identity"], "spiffe://cluster.local/ns/app/sa/default");
  EXPECT_TRUE(ids[1]["source_identity"].is_null()) << "plaintext has no identities";
  std::string ct = renderConnections(filterConnections(ids, "web", "", ""));
  EXPECT_NE(ct.find("front/client 10.244.1.10:4000"), std::string::npos) << ct;
  EXPECT_NE(ct.find("2.0 KiB"), std::string::npos) << ct;
}

TEST(Renderers, CertificateHealth) {
  time_t now = *parseIsoTime("2026-11-26T10:00:00Z");
  json certs = json::parse(R"([
    {"state":"valid","not_after":"2026-11-27T10:00:00Z","renew_at":"2026-11-26T22:00:00Z"},
    {"state":"valid","not_after":"2026-11-26T11:00:00Z","renew_at":"2026-11-26T09:00:00Z"},
    {"state":"renewing","not_after":"2026-11-26T11:00:00Z","renew_at":"2026-11-26T09:00:00Z"},
    {"state":"valid","not_after":"2026-11-26T09:00:00Z","renew_at":"2026-11-26T08:00:00Z"},
    {"state":"pending","not_after":null}])");
  json h = certificateHealth(certs, now);
  EXPECT_EQ(h["valid"], 1);
  EXPECT_EQ(h["expiring"], 2);
  EXPECT_EQ(h["expired"], 1);
  EXPECT_EQ(h["pending"], 1);
  EXPECT_EQ(h["total"], 5);
}

TEST(Renderers, TraceAndEvents) {
  json t = json::parse(R"({"source":{"workload":"ops/admin","node":"node1","ip":"10.244.1.11",
    "enrolled":true,"identity":"spiffe://cluster.local/ns/ops/sa/default"},
    "destination":{"input":"app/server:8081","address":"10.244.2.10:8081"},
    "redirected":true,"redirect_reason":"enrolled",
    "route":{"kind":"direct-to-workload","reason":"workload app/server","service":null,
      "candidates":[],"next_hop":"10.244.2.10:8081","endpoint_workload":"app/server",
      "waypoint":null,"protocol":"hbone"},
    "expected_identity":"spiffe://cluster.local/ns/app/sa/default",
    "inbound":{"enforced":true,"path":"hbone","node":"node2","peer_authentication":"PERMISSIVE"},
    "verdict":{"result":"deny","reason":"deny_matched","policy":"app/ns-deny","rule":0,
      "decided_by":"app/ns-deny rule 0","audit":[],"dry_run":null},
    "outcome":"denied"})");
  std::string s = renderTrace(t);
  EXPECT_NE(s.find("verdict:     DENY by app/ns-deny rule 0 (deny_matched)"), std::string::npos)
      << s;
  EXPECT_NE(s.find("waypoint:  none"), std::string::npos) << s;
  EXPECT_NE(s.find("protocol:  hbone"), std::string::npos) << s;
  json e = json::parse(R"({"kind":"verdict","time_ms":1764151200123,"path":"plaintext",
    "source":{"ip":"10.244.1.21","port":4000,"workload":"plain/bot"},
    "destination":{"workload":"app/web","ip":"10.244.2.11","port":8080},
    "result":"deny","reason":"deny_matched","policy":"weft-system/mesh-deny-bot","rule":0,
    "audit":[],"dry_run":null})");
  std::string line = renderEvent(e);
  EXPECT_NE(line.find("verdict DENY"), std::string::npos) << line;
  EXPECT_NE(line.find("plain/bot 10.244.1.21:4000 -> app/web 10.244.2.11:8080"),
            std::string::npos)
      << line;
  EXPECT_NE(line.find("weft-system/mesh-deny-bot rule 0"), std::string::npos) << line;
  json r = json::parse(R"({"kind":"redirect","type":"redirect","time_ms":1764151200123,
    "pod":"front/client","src":null,"dst":"10.96.0.10:80"})");
  EXPECT_NE(renderEvent(r).find("redirect        front/client"), std::string::npos)
      << renderEvent(r);
}

TEST(BpfDecode, EntriesInMeshTerms) {
  PodNames pods = PodNames::fromWorkloads(json::parse(
      R"([{"namespace":"app","name":"web","ips":["10.244.2.11"],"netns_cookie":77}])"));
  weft_enrollment en{WEFT_ENROLL_REDIRECT_OUTBOUND | WEFT_ENROLL_REDIRECT_DNS, 0, 0xabcdefu};
  json e = decodeEnrolled(77, en, pods);
  EXPECT_EQ(e["pod"], "app/web");
  EXPECT_EQ(e["flags"], json::array({"redirect_outbound", "redirect_dns"}));
  EXPECT_EQ(e["workload_id"], "0000000000abcdef");
  EXPECT_TRUE(decodeEnrolled(78, en, pods)["pod"].is_null());

  weft_orig_dst_key k{};
  k.netns_cookie = 77;
  k.client = SocketAddress::parse("127.0.0.1:40000")->toAbi();
  weft_sockaddr dst = SocketAddress::parse("10.96.0.1:80")->toAbi();
  json o = decodeOrigDst(k, dst, pods);
  EXPECT_EQ(o["client"], "127.0.0.1:40000");
  EXPECT_EQ(o["original_destination"], "10.96.0.1:80");
  EXPECT_EQ(o["pod"], "app/web");

  weft_ip ip = IpAddr::parse("10.244.2.11")->toAbi();
  json l = decodeInboundListener(ip, 5, pods);
  EXPECT_EQ(l["pod_ip"], "10.244.2.11");
  EXPECT_EQ(l["pod"], "app/web");
  weft_dns_key dk{9, 77};
  json d = decodeDnsDst(dk, SocketAddress::parse("[fd00::53]:53")->toAbi(), pods);
  EXPECT_EQ(d["resolver"], "[fd00::53]:53");
  EXPECT_EQ(decodeBypass(IpAddr::parse("10.244.1.1")->toAbi())["source_ip"], "10.244.1.1");
}

TEST(Chunked, DecodesInPiecesAndRejectsGarbage) {
  std::string wire = "5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
  ChunkedDecoder d;
  std::string out;
  for (char c : wire) ASSERT_TRUE(d.feed(&c, 1, &out)) << d.error();
  EXPECT_EQ(out, "hello, world");
  EXPECT_TRUE(d.done());
  ChunkedDecoder bad;
  std::string junk;
  EXPECT_FALSE(bad.feed("zz\r\n", 4, &junk));
  ChunkedDecoder longer;
  EXPECT_FALSE(longer.feed("2\r\nabc\r\n", 8, &junk));
}

TEST(AdminEndpoint, ZtunnelForms) {
  EXPECT_EQ(AdminEndpoint::ztunnel("127.0.0.1:15000")->host_port, "127.0.0.1:15000");
  EXPECT_EQ(AdminEndpoint::ztunnel("http://127.0.0.1:15000/")->host_port, "127.0.0.1:15000");
  EXPECT_EQ(AdminEndpoint::ztunnel("15000")->host_port, "127.0.0.1:15000");
  EXPECT_EQ(AdminEndpoint::ztunnel("[::1]:15000")->host_port, "[::1]:15000");
  EXPECT_FALSE(AdminEndpoint::ztunnel("localhost"));
}

// The client against the real admin server, on a loop thread.
class ClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/weftctl-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/agent.sock";
    ASSERT_EQ(uv_loop_init(&loop_), 0);
    auto s = HttpAdminServer::listenUnix(&loop_, path_, [](const HttpRequest& r) {
      if (r.path == "/status") return HttpResponse{200, "application/json", "{\"node\":\"n1\"}\n"};
      if (r.path == "/stream") {
        HttpResponse resp;
        resp.stream = [](HttpStreamWriterPtr w) {
          w->write("{\"kind\":\"start\"}\n{\"n\":");
          w->write("1}\n{\"n\":2}\n");
          w->finish();
        };
        return resp;
      }
      return HttpResponse{404, "application/json", "{\"error\":\"not found\"}\n"};
    });
    ASSERT_TRUE(s) << s.status().message();
    server_ = std::move(s.value());
    ASSERT_EQ(uv_async_init(&loop_, &stop_, [](uv_async_t* a) { uv_stop(a->loop); }), 0);
    thread_ = std::thread([this] { uv_run(&loop_, UV_RUN_DEFAULT); });
  }
  void TearDown() override {
    uv_async_send(&stop_);
    thread_.join();
    server_.reset();
    uv_close(reinterpret_cast<uv_handle_t*>(&stop_), nullptr);
    uv_run(&loop_, UV_RUN_DEFAULT);
    uv_loop_close(&loop_);
    ::unlink(path_.c_str());
    ::rmdir(dir_.c_str());
  }
  std::string dir_, path_;
  uv_loop_t loop_;
  uv_async_t stop_;
  HttpAdminServerPtr server_;
  std::thread thread_;
};

TEST_F(ClientTest, JsonRepliesErrorsAndStreams) {
  std::ostringstream out, err;
  GlobalOptions o;
  o.agent_socket = path_;
  o.ztunnel = "127.0.0.1:1";
  o.json = true;
  Context ctx(o, out, err);
  auto st = ctx.agentGet("/status");
  ASSERT_TRUE(st) << st.status().message();
  EXPECT_EQ((*st)["node"], "n1");
  auto missing = ctx.agentGet("/nope");
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.status().message(),
            "agent admin socket " + path_ + ": GET /nope: not found");
  std::vector<std::string> lines;
  std::string body;
  auto s = httpStream(ctx.agent(), "/stream",
                      [&](const std::string& l) {
                        lines.push_back(l);
                        return true;
                      },
                      std::chrono::seconds(5), &body);
  ASSERT_TRUE(s) << s.status().message();
  EXPECT_EQ(s.value(), 200);
  EXPECT_EQ(lines, (std::vector<std::string>{"{\"kind\":\"start\"}", "{\"n\":1}", "{\"n\":2}"}));
  // Down: one line naming the socket, JSON with -j.
  GlobalOptions down = o;
  down.agent_socket = dir_ + "/absent.sock";
  std::ostringstream dout, derr;
  Context dctx(down, dout, derr);
  std::vector<std::string> args = {"status"};
  EXPECT_EQ(dispatch(dctx, commandTree(), args), 1);
  auto j = json::parse(dout.str());
  EXPECT_EQ(j["error"], "agent admin socket " + dir_ +
                            "/absent.sock: connect: No such file or directory");
  std::string printed = dout.str();
  EXPECT_EQ(std::count(printed.begin(), printed.end(), '\n'), 1);
}

}  // namespace
}  // namespace weft::cli
