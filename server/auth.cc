// Bearer-token authentication. The check is gRPC's auth metadata processor: core runs it on
// every call's initial metadata before the call reaches any service (reflection included),
// and a refusal ends the call there with our status. Plaintext credentials do not offer the
// C++ processor hook, so for them a thin ServerCredentials installs the same check through
// gRPC's public C API (grpc_server_credentials_set_auth_metadata_processor).
#include "server/auth.h"

#include <grpc/grpc_security.h>
#include <sys/stat.h>

#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "grpcpp/security/auth_metadata_processor.h"
#include "server/log.h"
#include "server/metrics.h"
#include "server/status.h"

namespace simserve {
namespace {

constexpr size_t kMaxTokenLength = 4096;
constexpr absl::string_view kOpenPrefix = "/grpc.health.v1.Health/";
constexpr absl::string_view kPathKey = ":path";
constexpr absl::string_view kAuthorizationKey = "authorization";

// RFC 6750 b64token: 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"=".
bool IsB64Token(absl::string_view token) {
  size_t end = token.size();
  while (end > 0 && token[end - 1] == '=') --end;
  if (end == 0) return false;
  for (size_t i = 0; i < end; ++i) {
    const char c = token[i];
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '.' && c != '_' &&
        c != '~' && c != '+' && c != '/') {
      return false;
    }
  }
  return true;
}

// Equality whose time depends only on the longer length, not on where the inputs differ.
bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  const size_t n = std::max(a.size(), b.size());
  unsigned diff = a.size() == b.size() ? 0U : 1U;
  for (size_t i = 0; i < n; ++i) {
    const auto x = static_cast<unsigned char>(i < a.size() ? a[i] : 0);
    const auto y = static_cast<unsigned char>(i < b.size() ? b[i] : 0);
    diff |= static_cast<unsigned>(x ^ y);
  }
  return diff == 0;
}

absl::string_view View(const grpc_slice& slice) {
  return {reinterpret_cast<const char*>(GRPC_SLICE_START_PTR(slice)), GRPC_SLICE_LENGTH(slice)};
}

// The check as the C++ processor interface (TLS credentials support it directly). Runs on
// the gRPC thread that received the metadata (IsBlocking is false: the check never waits).
class TokenProcessor final : public grpc::AuthMetadataProcessor {
 public:
  explicit TokenProcessor(CallAuthenticator* authenticator) : authenticator_(authenticator) {}
  bool IsBlocking() const override { return false; }
  grpc::Status Process(const InputMetadata& metadata, grpc::AuthContext* context,
                       OutputMetadata* consumed, OutputMetadata* /*response*/) override {
    absl::string_view method;
    std::optional<absl::string_view> authorization;
    for (const auto& [key, value] : metadata) {
      const absl::string_view k(key.data(), key.size());
      if (k == kPathKey) method = absl::string_view(value.data(), value.size());
      if (k == kAuthorizationKey) {
        authorization = absl::string_view(value.data(), value.size());
        // Consumed: handlers and logs never see the token.
        consumed->emplace(std::string(key.data(), key.size()),
                          std::string(value.data(), value.size()));
      }
    }
    std::string identity;
    const absl::Status status = authenticator_->Check(method, authorization, &identity);
    if (!identity.empty()) context->AddProperty(kTokenIdentityProperty, identity);
    return ToGrpcStatus(status);
  }

 private:
  CallAuthenticator* const authenticator_;
};

// The same check for plaintext ports, through the C API's processor hook.
class PlaintextWithTokens final : public grpc::ServerCredentials {
 public:
  explicit PlaintextWithTokens(CallAuthenticator* authenticator) : authenticator_(authenticator) {}
  void SetAuthMetadataProcessor(
      const std::shared_ptr<grpc::AuthMetadataProcessor>& /*processor*/) override {}

 private:
  int AddPortToServer(const std::string& addr, grpc_server* server) override {
    grpc_server_credentials* creds = grpc_insecure_server_credentials_create();
    grpc_server_credentials_set_auth_metadata_processor(
        creds, grpc_auth_metadata_processor{&Process, nullptr, authenticator_});
    const int port = grpc_server_add_http2_port(server, addr.c_str(), creds);
    grpc_server_credentials_release(creds);
    return port;
  }

  static void Process(void* state, grpc_auth_context* context, const grpc_metadata* md,
                      size_t count, grpc_process_auth_metadata_done_cb done, void* user_data) {
    absl::string_view method;
    std::optional<absl::string_view> authorization;
    const grpc_metadata* consumed = nullptr;
    for (size_t i = 0; i < count; ++i) {
      const absl::string_view key = View(md[i].key);
      if (key == kPathKey) method = View(md[i].value);
      if (key == kAuthorizationKey) {
        authorization = View(md[i].value);
        consumed = &md[i];
      }
    }
    std::string identity;
    const grpc::Status status = ToGrpcStatus(
        static_cast<CallAuthenticator*>(state)->Check(method, authorization, &identity));
    if (!identity.empty() && context != nullptr) {
      grpc_auth_context_add_cstring_property(context, kTokenIdentityProperty, identity.c_str());
    }
    done(user_data, consumed, consumed != nullptr ? 1 : 0, nullptr, 0,
         static_cast<grpc_status_code>(status.error_code()),
         status.ok() ? nullptr : status.error_message().c_str());
  }

  CallAuthenticator* const authenticator_;
};

}  // namespace

absl::StatusOr<std::vector<std::string>> ParseTokenFile(absl::string_view contents) {
  std::vector<std::string> tokens;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(contents, '\n')) {
    ++line_number;
    if (const size_t hash = line.find('#'); hash != absl::string_view::npos) {
      line = line.substr(0, hash);
    }
    line = absl::StripAsciiWhitespace(line);
    if (line.empty()) continue;
    if (line.size() > kMaxTokenLength || !IsB64Token(line)) {
      return absl::InvalidArgumentError(
          absl::StrCat("line ", line_number,
                       ": not a token (1-4096 characters of A-Z a-z 0-9 - . _ ~ + / and "
                       "trailing =; one token per line, # starts a comment)"));
    }
    tokens.emplace_back(line);
  }
  if (tokens.empty()) return absl::InvalidArgumentError("holds no token");
  return tokens;
}

CallAuthenticator::CallAuthenticator(const AuthConfig& config, ServerMetrics* metrics)
    : config_(config), metrics_(metrics) {}

CallAuthenticator::~CallAuthenticator() { watcher_.reset(); }

absl::StatusOr<std::unique_ptr<CallAuthenticator>> CallAuthenticator::Create(
    const AuthConfig& config, ServerMetrics* metrics) {
  if (config.refresh_seconds <= 0) {
    return absl::InvalidArgumentError("--auth_refresh_seconds must be > 0");
  }
  std::unique_ptr<CallAuthenticator> authenticator(new CallAuthenticator(config, metrics));
  FileState state;
  auto tokens = authenticator->Read(&state);
  if (!tokens.ok()) return tokens.status();
  {
    MutexLock lock(&authenticator->reload_mu_);
    authenticator->state_ = state;
  }
  {
    MutexLock lock(&authenticator->mu_);
    authenticator->tokens_ = std::make_shared<const std::vector<std::string>>(std::move(*tokens));
  }
  CallAuthenticator* self = authenticator.get();
  authenticator->watcher_ = std::make_unique<PeriodicThread>(absl::Seconds(config.refresh_seconds),
                                                             [self] { self->ReloadIfChanged(); });
  return authenticator;
}

absl::StatusOr<std::vector<std::string>> CallAuthenticator::Read(FileState* state) const {
  const std::string& path = config_.token_file;
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("--auth_token_file ", path, " cannot be read"));
  }
  *state = FileState{
      .mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec,
      .size = static_cast<int64_t>(st.st_size),
      .inode = static_cast<int64_t>(st.st_ino)};
  std::ifstream file(path, std::ios::binary);
  std::stringstream contents;
  contents << file.rdbuf();
  if (!file) {
    return absl::InvalidArgumentError(absl::StrCat("--auth_token_file ", path, " cannot be read"));
  }
  auto tokens = ParseTokenFile(contents.str());
  if (!tokens.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--auth_token_file ", path, ": ", tokens.status().message()));
  }
  return tokens;
}

void CallAuthenticator::ReloadIfChanged() {
  MutexLock reload(&reload_mu_);
  FileState state;
  auto tokens = Read(&state);
  if (state == state_) return;  // unchanged (or still missing)
  state_ = state;
  auto accepted = std::make_shared<const std::vector<std::string>>(
      tokens.ok() ? std::move(*tokens) : std::vector<std::string>{});
  {
    MutexLock lock(&mu_);
    tokens_ = accepted;
  }
  if (tokens.ok()) {
    LogInfo(absl::StrCat("--auth_token_file ", config_.token_file, " changed: ", accepted->size(),
                         " tokens accepted"));
  } else {
    LogError(absl::StrCat(tokens.status().message(),
                          "; every authenticated call is refused until "
                          "it is fixed"));
  }
}

int CallAuthenticator::token_count() const {
  MutexLock lock(&mu_);
  return static_cast<int>(tokens_->size());
}

int CallAuthenticator::Find(absl::string_view token) const {
  std::shared_ptr<const std::vector<std::string>> tokens;
  {
    MutexLock lock(&mu_);
    tokens = tokens_;
  }
  int found = 0;
  for (size_t i = 0; i < tokens->size(); ++i) {  // no early exit
    if (ConstantTimeEquals((*tokens)[i], token)) found = static_cast<int>(i) + 1;
  }
  return found;
}

absl::Status CallAuthenticator::Check(absl::string_view method,
                                      std::optional<absl::string_view> authorization,
                                      std::string* identity) {
  if (absl::StartsWith(method, kOpenPrefix)) return absl::OkStatus();
  auto refuse = [&](AuthFailure reason, absl::string_view why) {
    if (metrics_ != nullptr) metrics_->AuthFailed(reason);
    return absl::UnauthenticatedError(why);
  };
  if (!authorization.has_value()) {
    return refuse(AuthFailure::kMissing,
                  "this server requires a token: send metadata 'authorization: Bearer <token>'");
  }
  constexpr absl::string_view kScheme = "Bearer ";
  if (authorization->size() <= kScheme.size() ||
      !absl::EqualsIgnoreCase(authorization->substr(0, kScheme.size()), kScheme)) {
    return refuse(AuthFailure::kMalformed, "the 'authorization' metadata must be 'Bearer <token>'");
  }
  const int position = Find(absl::StripAsciiWhitespace(authorization->substr(kScheme.size())));
  if (position == 0) {
    return refuse(AuthFailure::kInvalid, "the bearer token is not valid (unknown or revoked)");
  }
  if (identity != nullptr) *identity = absl::StrCat("token:", position);
  return absl::OkStatus();
}

std::shared_ptr<grpc::ServerCredentials> CallAuthenticator::PlaintextCredentials() {
  return std::make_shared<PlaintextWithTokens>(this);
}

void CallAuthenticator::InstallOn(grpc::ServerCredentials& tls_credentials) {
  tls_credentials.SetAuthMetadataProcessor(std::make_shared<TokenProcessor>(this));
}

}  // namespace simserve
