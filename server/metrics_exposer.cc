// The metrics endpoint (metrics_exposer.h). TLS is civetweb's, set up through its init_ssl
// callback (the certificate and key are separate PEM files, as cert-manager writes them;
// civetweb itself wants both in one file), after loading the OpenSSL 3 compatibility
// libraries (openssl3_compat/) that Debian's civetweb needs for HTTPS at all.
#include "server/metrics_exposer.h"

#include <CivetServer.h>
#include <dlfcn.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "server/auth.h"

namespace simserve {
namespace {

// The TLS files of the endpoint being started. civetweb calls init_ssl synchronously from
// the Exposer's constructor, on the constructing thread, without a user pointer of ours:
// this thread-local carries the files for exactly that call (set and cleared around it).
thread_local const MetricsSecurityConfig* tls_being_started = nullptr;

absl::StatusOr<std::string> ReadFile(const std::string& flag, const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  std::stringstream contents;
  contents << file.rdbuf();
  if (!file) return absl::InvalidArgumentError(absl::StrCat(flag, " ", path, " cannot be read"));
  return contents.str();
}

// Per handshake: the current files, so a renewed certificate is served without a restart. If
// they cannot be loaded (e.g. mid-replacement) the context's certificate stays in use.
int UseCurrentCertificate(SSL* ssl, void* arg) {
  const auto* tls = static_cast<const MetricsSecurityConfig*>(arg);
  if (SSL_use_certificate_chain_file(ssl, tls->tls_cert_file.c_str()) == 1 &&
      SSL_use_PrivateKey_file(ssl, tls->tls_key_file.c_str(), SSL_FILETYPE_PEM) == 1 &&
      SSL_check_private_key(ssl) == 1) {
    return 1;
  }
  ERR_clear_error();
  SSL_set_SSL_CTX(ssl, SSL_get_SSL_CTX(ssl));  // back to the certificate loaded at start
  return 1;
}

int InitSsl(void* ssl_ctx, void* /*user_data*/) {
  const MetricsSecurityConfig* tls = tls_being_started;
  auto* ctx = static_cast<SSL_CTX*>(ssl_ctx);
  if (tls == nullptr || SSL_CTX_use_certificate_chain_file(ctx, tls->tls_cert_file.c_str()) != 1 ||
      SSL_CTX_use_PrivateKey_file(ctx, tls->tls_key_file.c_str(), SSL_FILETYPE_PEM) != 1 ||
      SSL_CTX_check_private_key(ctx) != 1) {
    return -1;
  }
  SSL_CTX_set_cert_cb(ctx, &UseCurrentCertificate, const_cast<MetricsSecurityConfig*>(tls));
  return 1;  // civetweb must not load a certificate itself
}

// Loads openssl3_compat's libraries from beside the executable (build tree) or from
// ../lib/simserve (installed), before civetweb's dlopen looks for them.
absl::Status LoadOpenSslCompat() {
  std::string exe(4096, '\0');
  const ssize_t length = readlink("/proc/self/exe", exe.data(), exe.size() - 1);
  exe.resize(length > 0 ? static_cast<size_t>(length) : 0);
  const std::string dir = exe.substr(0, exe.rfind('/') + 1);
  for (const char* name : {"libsimserve_libcrypto_compat.so", "libsimserve_libssl_compat.so"}) {
    bool loaded = false;
    std::string tried;
    for (const std::string& candidate :
         {absl::StrCat(dir, name), absl::StrCat(dir, "../lib/simserve/", name)}) {
      if (dlopen(candidate.c_str(), RTLD_NOW | RTLD_GLOBAL) != nullptr) {
        loaded = true;
        break;
      }
      absl::StrAppend(&tried, tried.empty() ? "" : ", ", candidate);
    }
    if (!loaded) {
      return absl::UnavailableError(
          absl::StrCat("metrics TLS needs ", name, " (built with simserve); not found at ", tried));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<std::pair<std::string, std::string>>> ParseBasicAuthFile(
    absl::string_view contents) {
  std::vector<std::pair<std::string, std::string>> users;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(contents, '\n')) {
    ++line_number;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line.front() == '#') continue;
    const size_t colon = line.find(':');
    if (colon == 0 || colon == absl::string_view::npos || colon + 1 == line.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("line ", line_number, ": expected user:password"));
    }
    users.emplace_back(std::string(line.substr(0, colon)), std::string(line.substr(colon + 1)));
  }
  if (users.empty()) return absl::InvalidArgumentError("holds no user:password line");
  return users;
}

MetricsEndpoint::~MetricsEndpoint() { exposer_.reset(); }

absl::StatusOr<std::unique_ptr<MetricsEndpoint>> MetricsEndpoint::Start(
    const std::string& listen, const MetricsSecurityConfig& security,
    const std::shared_ptr<prometheus::Registry>& registry) {
  std::unique_ptr<MetricsEndpoint> endpoint(new MetricsEndpoint());
  endpoint->security_ = security;
  const bool tls = security.tls_enabled();
  if (tls) {
    if (security.tls_cert_file.empty() || security.tls_key_file.empty()) {
      return absl::InvalidArgumentError(
          "metrics TLS needs both --metrics_tls_cert_file and --metrics_tls_key_file");
    }
    for (const auto& [flag, path] : {std::pair{"--metrics_tls_cert_file", security.tls_cert_file},
                                     std::pair{"--metrics_tls_key_file", security.tls_key_file}}) {
      if (auto read = ReadFile(flag, path); !read.ok()) return read.status();
    }
    if (absl::Status compat = LoadOpenSslCompat(); !compat.ok()) return compat;
  }
  if (!security.basic_auth_file.empty()) {
    auto users = ReadFile("--metrics_basic_auth_file", security.basic_auth_file);
    if (!users.ok()) return users.status();
    if (auto parsed = ParseBasicAuthFile(*users); !parsed.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--metrics_basic_auth_file ", security.basic_auth_file, ": ", parsed.status().message()));
    }
  }
  CivetCallbacks callbacks;
  callbacks.init_ssl = &InitSsl;
  try {
    tls_being_started = &endpoint->security_;
    endpoint->exposer_ = std::make_unique<prometheus::Exposer>(
        std::vector<std::string>{"listening_ports", tls ? listen + "s" : listen, "num_threads",
                                 "2"},
        &callbacks);
    tls_being_started = nullptr;
  } catch (const std::exception& e) {
    tls_being_started = nullptr;
    return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", listen, ": ", e.what()));
  }
  endpoint->exposer_->RegisterCollectable(registry);
  if (!security.basic_auth_file.empty()) {
    // Re-read per scrape (a scrape is every few seconds at most): changed passwords apply
    // at once. An unreadable file refuses every scrape.
    const std::string path = security.basic_auth_file;
    endpoint->exposer_->RegisterAuth(
        [path](const std::string& user, const std::string& password) {
          std::ifstream file(path, std::ios::binary);
          std::stringstream contents;
          contents << file.rdbuf();
          auto users = ParseBasicAuthFile(contents.str());
          bool accepted = false;
          if (!users.ok()) return false;
          for (const auto& [u, p] : *users) {  // no early exit
            accepted |= ConstantTimeEquals(u, user) & ConstantTimeEquals(p, password);
          }
          return accepted;
        },
        "simserve metrics");
  }
  const std::vector<int> ports = endpoint->exposer_->GetListeningPorts();
  endpoint->port_ = ports.empty() ? 0 : ports.front();
  endpoint->description_ =
      absl::StrCat(tls ? absl::StrCat("HTTPS (certificate ", security.tls_cert_file,
                                      ", re-read on every handshake)")
                       : std::string("plaintext HTTP"),
                   security.basic_auth_file.empty()
                       ? ", no authentication"
                       : absl::StrCat(", basic auth (", security.basic_auth_file, ")"));
  return endpoint;
}

}  // namespace simserve
