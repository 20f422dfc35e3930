// Bearer-token authentication of gRPC calls (--auth_token_file). Every call except
// grpc.health.v1.Health must carry `authorization: Bearer <token>` with a token of the file;
// the check runs in gRPC's auth metadata processor, before any handler, interceptor or
// reflection sees the call, on plaintext and TLS ports alike.
#ifndef SIMSERVE_SERVER_AUTH_H_
#define SIMSERVE_SERVER_AUTH_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "grpcpp/security/server_credentials.h"
#include "server/config.h"
#include "server/mutex.h"
#include "server/periodic_thread.h"
#include "server/reject_reason.h"

namespace simserve {

class ServerMetrics;

// The tokens of a token file: one per line; `#` starts a comment, blank lines are skipped,
// surrounding whitespace is trimmed. A token is 1-4096 characters of RFC 6750's b64token
// alphabet (A-Z a-z 0-9 - . _ ~ + / and trailing =). INVALID_ARGUMENT names the line of a
// bad token (never the token) or says the file holds none.
absl::StatusOr<std::vector<std::string>> ParseTokenFile(absl::string_view contents);

// Auth-context property naming the token a call presented ("token:N"), for per-client
// accounting (ComputePool's per-peer share).
inline constexpr char kTokenIdentityProperty[] = "simserve.token";

// Decides calls against the tokens of one file, re-read when it changes. Thread-safe.
class CallAuthenticator {
 public:
  // Reads `config.token_file` (which must be set) and starts watching it every
  // config.refresh_seconds. INVALID_ARGUMENT if it cannot be read or holds no valid token.
  // `metrics` (may be null) must outlive the authenticator.
  static absl::StatusOr<std::unique_ptr<CallAuthenticator>> Create(const AuthConfig& config,
                                                                   ServerMetrics* metrics);
  // Stops the watcher.
  ~CallAuthenticator();
  CallAuthenticator(const CallAuthenticator&) = delete;
  CallAuthenticator& operator=(const CallAuthenticator&) = delete;

  // The decision for a call to `method` ("/pkg.Service/Method") whose `authorization`
  // metadata is `authorization` (nullopt when absent). OK for health; otherwise
  // UNAUTHENTICATED with what is wrong (missing, not "Bearer <token>", unknown token), counted
  // in the metrics. Tokens are compared in constant time and never logged. On success with a
  // token, *identity (if non-null) names it by its line ("token:3"), never by its value.
  absl::Status Check(absl::string_view method, std::optional<absl::string_view> authorization,
                     std::string* identity = nullptr) ABSL_LOCKS_EXCLUDED(mu_);

  // Re-reads the file now if it changed since it was last read (the watcher calls this).
  // A file that cannot be read or holds no valid token leaves NO token valid (fail closed)
  // until it is fixed; each such change is logged once.
  void ReloadIfChanged() ABSL_LOCKS_EXCLUDED(mu_, reload_mu_);

  // Plaintext server credentials that run Check on every call before gRPC dispatches it.
  // `this` must outlive them.
  std::shared_ptr<grpc::ServerCredentials> PlaintextCredentials();
  // Makes TLS credentials (grpc::experimental::TlsServerCredentials) run Check on every call.
  // `this` must outlive them.
  void InstallOn(grpc::ServerCredentials& tls_credentials);

  // Number of tokens currently accepted.
  int token_count() const ABSL_LOCKS_EXCLUDED(mu_);
  const std::string& path() const { return config_.token_file; }

 private:
  // The file as last read: re-read when any of these change.
  struct FileState {
    int64_t mtime_ns = -1;
    int64_t size = -1;
    int64_t inode = -1;
    bool operator==(const FileState&) const = default;
  };
  CallAuthenticator(const AuthConfig& config, ServerMetrics* metrics);
  // Reads and parses the file; the state it was read in goes to *state.
  absl::StatusOr<std::vector<std::string>> Read(FileState* state) const;
  // The 1-based position of `token` in the file, or 0 when it is not accepted.
  int Find(absl::string_view token) const ABSL_LOCKS_EXCLUDED(mu_);

  const AuthConfig config_;
  ServerMetrics* const metrics_;
  mutable Mutex mu_;
  std::shared_ptr<const std::vector<std::string>> tokens_ ABSL_GUARDED_BY(mu_);
  Mutex reload_mu_;  // one reload at a time
  FileState state_ ABSL_GUARDED_BY(reload_mu_);
  std::unique_ptr<PeriodicThread> watcher_;  // last: stopped first
};

}  // namespace simserve

#endif  // SIMSERVE_SERVER_AUTH_H_
