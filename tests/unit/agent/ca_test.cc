// CertificateAuthority and authorizeIdentity: signing rules, TTL, embedded root persistence,
// file-backed CA with hot reload; issued chains are checked with the openssl CLI.
#include "agent/ca.h"

#include <gtest/gtest.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include "test_util.h"

namespace weft::agent {
namespace {

using testing::TempDir;
using namespace std::chrono_literals;

tls::Identity ident(const std::string& ns, const std::string& sa,
                    const std::string& td = "cluster.local") {
  return tls::Identity{td, ns, sa};
}

std::string csrFor(EVP_PKEY* key, const tls::Identity& id) {
  auto csr = tls::makeCsr(key, id);
  EXPECT_TRUE(csr.isOk()) << csr.status().message();
  auto pem = tls::csrToPem(csr->get());
  EXPECT_TRUE(pem.isOk());
  return pem.value();
}

void writeFile(const std::string& path, const std::string& data) {
  std::ofstream(path, std::ios::trunc) << data;
}

int run(const std::string& cmd) {
  int rc = std::system((cmd + " >/dev/null 2>&1").c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

std::unique_ptr<CertificateAuthority> embedded(const TempDir& dir, std::chrono::seconds ttl = 24h) {
  CaOptions o;
  o.ca_dir = dir.file("ca");
  o.default_ttl = ttl;
  auto ca = CertificateAuthority::create(o);
  EXPECT_TRUE(ca.isOk()) << ca.status().message();
  return ca.isOk() ? std::move(ca.value()) : nullptr;
}

TEST(CertificateAuthority, SignsAndOpensslVerifies) {
  TempDir dir;
  auto ca = embedded(dir);
  ASSERT_TRUE(ca);
  auto key = tls::generateP256Key();
  ASSERT_TRUE(key.isOk());
  auto id = ident("shop", "cart");
  auto issued = ca->sign(csrFor(key->get(), id), id);
  ASSERT_TRUE(issued.isOk()) << issued.status().message();
  EXPECT_TRUE(issued->chain_pem.empty());
  auto leaf = tls::certFromPem(issued->leaf_pem);
  ASSERT_TRUE(leaf.isOk());
  EXPECT_EQ(tls::uriSans(leaf->get()), std::vector<std::string>{id.toString()});
  EXPECT_EQ(X509_check_private_key(leaf->get(), key->get()), 1);
  EXPECT_EQ(tls::serialHex(leaf->get()), issued->serial);
  EXPECT_GE(issued->serial.size(), 31u);  // 128 random bits
  EXPECT_FALSE(X509_check_ca(leaf->get()));
  EXPECT_TRUE(X509_get_key_usage(leaf->get()) & KU_DIGITAL_SIGNATURE);
  EXPECT_TRUE(X509_get_extended_key_usage(leaf->get()) & XKU_SSL_SERVER);
  EXPECT_TRUE(X509_get_extended_key_usage(leaf->get()) & XKU_SSL_CLIENT);
  EXPECT_NE(X509_get0_subject_key_id(leaf->get()), nullptr);
  EXPECT_NE(X509_get0_authority_key_id(leaf->get()), nullptr);
  // Two signings never share a serial.
  auto again = ca->sign(csrFor(key->get(), id), id);
  ASSERT_TRUE(again.isOk());
  EXPECT_NE(again->serial, issued->serial);

  writeFile(dir.file("leaf.pem"), issued->leaf_pem);
  writeFile(dir.file("roots.pem"), issued->roots_pem);
  EXPECT_EQ(run("openssl verify -CAfile " + dir.file("roots.pem") + " -purpose sslclient " +
                dir.file("leaf.pem")), 0);
  EXPECT_EQ(run("openssl verify -CAfile " + dir.file("roots.pem") + " -purpose sslserver " +
                dir.file("leaf.pem")), 0);
  // And a foreign root does not verify it (the check can fail).
  TempDir other;
  auto ca2 = embedded(other);
  ASSERT_TRUE(ca2);
  writeFile(dir.file("other.pem"), ca2->rootsPem());
  EXPECT_NE(run("openssl verify -CAfile " + dir.file("other.pem") + " " + dir.file("leaf.pem")), 0);
  EXPECT_EQ(ca->stats().issued, 2u);
}

TEST(CertificateAuthority, RefusesNonP256Keys) {
  TempDir dir;
  auto ca = embedded(dir);
  ASSERT_TRUE(ca);
  auto id = ident("shop", "cart");
  tls::PkeyPtr rsa(EVP_RSA_gen(2048));
  ASSERT_TRUE(rsa);
  auto r = ca->sign(csrFor(rsa.get(), id), id);
  ASSERT_FALSE(r.isOk());
  EXPECT_NE(r.status().message().find("not ECDSA P-256"), std::string::npos)
      << r.status().message();
  tls::PkeyPtr p384(EVP_EC_gen("P-384"));
  ASSERT_TRUE(p384);
  EXPECT_FALSE(ca->sign(csrFor(p384.get(), id), id).isOk());
  EXPECT_FALSE(ca->sign("-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n", id).isOk());
  EXPECT_EQ(ca->stats().sign_errors, 3u);
  EXPECT_EQ(ca->stats().issued, 0u);
}

TEST(CertificateAuthority, RefusesCsrForAnotherIdentityOrTrustDomain) {
  TempDir dir;
  auto ca = embedded(dir);
  ASSERT_TRUE(ca);
  auto key = tls::generateP256Key();
  ASSERT_TRUE(key.isOk());
  auto r = ca->sign(csrFor(key->get(), ident("shop", "admin")), ident("shop", "cart"));
  ASSERT_FALSE(r.isOk());
  EXPECT_NE(r.status().message().find("spiffe://cluster.local/ns/shop/sa/admin"),
            std::string::npos) << r.status().message();
  auto other_td = ident("shop", "cart", "evil.example");
  EXPECT_FALSE(ca->sign(csrFor(key->get(), other_td), other_td).isOk());
}

TEST(CertificateAuthority, TtlHonoured) {
  TempDir dir;
  auto ca = embedded(dir, 5s);
  ASSERT_TRUE(ca);
  auto key = tls::generateP256Key();
  ASSERT_TRUE(key.isOk());
  auto id = ident("a", "b");
  auto now = std::chrono::system_clock::now();
  auto issued = ca->sign(csrFor(key->get(), id), id);
  ASSERT_TRUE(issued.isOk());
  auto leaf = tls::certFromPem(issued->leaf_pem);
  auto na = tls::notAfter(leaf->get());
  auto nb = tls::notBefore(leaf->get());
  ASSERT_TRUE(na.isOk() && nb.isOk());
  EXPECT_NEAR(std::chrono::duration<double>(na.value() - now).count(), 5.0, 1.5);
  EXPECT_NEAR(std::chrono::duration<double>(now - nb.value()).count(), 60.0, 1.5);
  auto longer = ca->sign(csrFor(key->get(), id), id, 3600s);
  ASSERT_TRUE(longer.isOk());
  EXPECT_NEAR(std::chrono::duration<double>(longer->not_after - now).count(), 3600.0, 1.5);
  // Expired after the TTL: openssl verify says so.
  writeFile(dir.file("leaf.pem"), issued->leaf_pem);
  writeFile(dir.file("roots.pem"), issued->roots_pem);
  std::string verify = "openssl verify -CAfile " + dir.file("roots.pem") + " " + dir.file("leaf.pem");
  EXPECT_EQ(run(verify), 0);
  std::this_thread::sleep_for(6500ms);
  EXPECT_NE(run(verify), 0);
}

TEST(CertificateAuthority, RestartReloadsSameRootAndKeyIsPrivate) {
  TempDir dir;
  std::string roots;
  {
    auto ca = embedded(dir);
    ASSERT_TRUE(ca);
    roots = ca->rootsPem();
  }
  struct stat st {};
  ASSERT_EQ(::stat(dir.file("ca/ca-key.pem").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  ASSERT_EQ(::stat(dir.file("ca/ca-cert.pem").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0644u);
  ASSERT_EQ(::stat(dir.file("ca").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  auto ca = embedded(dir);
  ASSERT_TRUE(ca);
  EXPECT_EQ(ca->rootsPem(), roots);
  auto root = tls::certFromPem(roots);
  ASSERT_TRUE(root.isOk());
  EXPECT_EQ(X509_check_ca(root->get()), 1);
  auto na = tls::notAfter(root->get());
  EXPECT_GT(na.value() - std::chrono::system_clock::now(), std::chrono::hours(24 * 365 * 9));
  // Half a CA (key without cert) is an error, not a silent regeneration.
  std::filesystem::remove(dir.file("ca/ca-cert.pem"));
  CaOptions o;
  o.ca_dir = dir.file("ca");
  EXPECT_FALSE(CertificateAuthority::create(o).isOk());
}

// A root and an intermediate made with the openssl CLI; returns false if it failed.
bool makeFileCa(const TempDir& dir, const std::string& tag) {
  std::string d = dir.path() + "/";
  std::string ext = d + "ext.cnf";
  writeFile(ext, "[v3_ca]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,"
                 "cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid:always\n");
  return run("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 "
             "-subj /CN=root-" + tag + " -keyout " + d + "root-key.pem -out " + d +
             "root.pem -addext basicConstraints=critical,CA:TRUE "
             "-addext keyUsage=critical,keyCertSign,cRLSign") == 0 &&
         run("openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=int-" +
             tag + " -keyout " + d + "int-key.pem -out " + d + "int.csr") == 0 &&
         run("openssl x509 -req -in " + d + "int.csr -CA " + d + "root.pem -CAkey " + d +
             "root-key.pem -CAcreateserial -days 20 -extfile " + ext + " -extensions v3_ca -out " +
             d + "int.pem") == 0;
}

TEST(CertificateAuthority, FileBackedIntermediateAndHotReload) {
  TempDir gen1, gen2, live;
  ASSERT_TRUE(makeFileCa(gen1, "one"));
  ASSERT_TRUE(makeFileCa(gen2, "two"));
  auto install = [&](const TempDir& g) {
    // Replace by rename, as a secret volume update does.
    for (auto [from, to] : {std::pair{"int.pem", "ca.pem"}, {"int-key.pem", "ca-key.pem"},
                            {"root.pem", "chain.pem"}}) {
      std::filesystem::copy_file(g.file(from), live.file(std::string(to) + ".new"),
                                 std::filesystem::copy_options::overwrite_existing);
      std::filesystem::rename(live.file(std::string(to) + ".new"), live.file(to));
    }
  };
  install(gen1);
  CaOptions o;
  o.ca_cert_file = live.file("ca.pem");
  o.ca_key_file = live.file("ca-key.pem");
  o.ca_chain_file = live.file("chain.pem");
  auto created = CertificateAuthority::create(o);
  ASSERT_TRUE(created.isOk()) << created.status().message();
  auto& ca = created.value();
  auto key = tls::generateP256Key();
  auto id = ident("shop", "cart");
  auto issued = ca->sign(csrFor(key->get(), id), id);
  ASSERT_TRUE(issued.isOk()) << issued.status().message();
  EXPECT_FALSE(issued->chain_pem.empty());
  writeFile(live.file("leaf.pem"), issued->leaf_pem);
  writeFile(live.file("untrusted.pem"), issued->chain_pem);
  writeFile(live.file("roots.pem"), issued->roots_pem);
  std::string verify = "openssl verify -CAfile " + live.file("roots.pem") + " -untrusted " +
                       live.file("untrusted.pem") + " " + live.file("leaf.pem");
  EXPECT_EQ(run(verify), 0);
  EXPECT_NE(run("openssl verify -CAfile " + gen2.file("root.pem") + " -untrusted " +
                live.file("untrusted.pem") + " " + live.file("leaf.pem")), 0);

  // Unchanged files: nothing happens.
  EXPECT_TRUE(ca->reloadIfChanged().isOk());
  EXPECT_EQ(ca->stats().reloads, 0u);

  // A new CA is picked up.
  install(gen2);
  ASSERT_TRUE(ca->reloadIfChanged().isOk());
  EXPECT_EQ(ca->stats().reloads, 1u);
  auto root2 = tls::readFile(gen2.file("root.pem"));
  EXPECT_EQ(ca->rootsPem(), root2.value());
  auto issued2 = ca->sign(csrFor(key->get(), id), id);
  ASSERT_TRUE(issued2.isOk());
  writeFile(live.file("leaf.pem"), issued2->leaf_pem);
  writeFile(live.file("untrusted.pem"), issued2->chain_pem);
  writeFile(live.file("roots.pem"), issued2->roots_pem);
  EXPECT_EQ(run(verify), 0);

  // A bad cert file is rejected with a clear error; the old CA stays and still signs.
  writeFile(live.file("ca.pem"), "-----BEGIN CERTIFICATE-----\nnot base64!\n"
                                 "-----END CERTIFICATE-----\n");
  Status bad = ca->reloadIfChanged();
  ASSERT_FALSE(bad.isOk());
  EXPECT_NE(bad.message().find(live.file("ca.pem")), std::string::npos) << bad.message();
  EXPECT_EQ(ca->stats().reload_errors, 1u);
  EXPECT_EQ(ca->rootsPem(), root2.value());
  EXPECT_TRUE(ca->sign(csrFor(key->get(), id), id).isOk());

  // A key that does not match the certificate is rejected too.
  std::filesystem::copy_file(gen2.file("int.pem"), live.file("ca.pem"),
                             std::filesystem::copy_options::overwrite_existing);
  std::filesystem::copy_file(gen1.file("int-key.pem"), live.file("ca-key.pem"),
                             std::filesystem::copy_options::overwrite_existing);
  bad = ca->reloadIfChanged();
  ASSERT_FALSE(bad.isOk());
  EXPECT_NE(bad.message().find("does not match"), std::string::npos) << bad.message();
  EXPECT_EQ(ca->rootsPem(), root2.value());

  // Without the chain the intermediate cannot be anchored: refused at start.
  CaOptions no_chain = o;
  no_chain.ca_cert_file = gen1.file("int.pem");
  no_chain.ca_key_file = gen1.file("int-key.pem");
  no_chain.ca_chain_file.clear();
  EXPECT_FALSE(CertificateAuthority::create(no_chain).isOk());
}

TEST(AuthorizeIdentity, OnlyLocalEnrolledPods) {
  ClusterModel model;
  Pod here;
  here.meta.name = "cart-1";
  here.meta.namespace_ = "shop";
  here.node_name = "n1";
  here.service_account = "cart";
  model.pods["shop/cart-1"] = here;
  Pod there = here;
  there.meta.name = "admin-1";
  there.node_name = "n2";
  there.service_account = "admin";
  model.pods["shop/admin-1"] = there;
  Pod idle = here;
  idle.meta.name = "idle-1";
  idle.service_account = "idle";
  model.pods["shop/idle-1"] = idle;

  std::vector<LocalPodView> local(2);
  local[0].key = "shop/cart-1";
  local[0].wanted = local[0].enrolled = true;
  local[1].key = "shop/idle-1";  // on this node but not in the mesh
  EXPECT_TRUE(authorizeIdentity(model, local, "cluster.local", ident("shop", "cart")).isOk());
  Status s = authorizeIdentity(model, local, "cluster.local", ident("shop", "admin"));
  ASSERT_FALSE(s.isOk());
  EXPECT_EQ(s.message(),
            "identity spiffe://cluster.local/ns/shop/sa/admin has no workload on this node");
  EXPECT_FALSE(authorizeIdentity(model, local, "cluster.local", ident("shop", "idle")).isOk());
  EXPECT_FALSE(authorizeIdentity(model, local, "cluster.local", ident("other", "cart")).isOk());
  EXPECT_FALSE(authorizeIdentity(model, local, "other.td", ident("shop", "cart")).isOk());
}

TEST(Identity, ParseIsStrict) {
  auto ok = tls::Identity::parse("spiffe://cluster.local/ns/shop/sa/cart");
  ASSERT_TRUE(ok.isOk());
  EXPECT_EQ(ok->trust_domain, "cluster.local");
  EXPECT_EQ(ok->ns, "shop");
  EXPECT_EQ(ok->sa, "cart");
  EXPECT_EQ(ok->toString(), "spiffe://cluster.local/ns/shop/sa/cart");
  for (const char* bad :
       {"", "spiffe://", "http://cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/a/sa/b/",
        "spiffe://cluster.local/ns/a/sa/", "spiffe://cluster.local/ns//sa/b",
        "spiffe://Cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/../sa/b",
        "spiffe://cluster.local/sa/a/ns/b", "spiffe://cluster.local/ns/a/sa/b?x",
        "spiffe://cluster.local/ns/a b/sa/b", "spiffe:///ns/a/sa/b"}) {
    EXPECT_FALSE(tls::Identity::parse(bad).isOk()) << bad;
  }
}

}  // namespace
}  // namespace weft::agent
