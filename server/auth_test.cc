// Unit tests of token authentication: the token file's grammar, every decision of
// CallAuthenticator::Check (with its metric), and rotation by rewriting the file. The wire
// path (plaintext and TLS ports, reflection, health) is tested against the real server in
// tests/python/test_auth.py.
#include "server/auth.h"

#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"
#include "prometheus/text_serializer.h"
#include "server/metrics.h"

namespace simserve {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr char kCompute[] = "/simserve.v1.Similarity/Compute";

class TokenFile {
 public:
  explicit TokenFile(const std::string& name = "tokens")
      : path_(testing::TempDir() + "/" + name + "_" + std::to_string(getpid())) {}
  ~TokenFile() { std::remove(path_.c_str()); }
  // Replaces the file the way Kubernetes updates a Secret: a new inode under the same name.
  void Write(const std::string& contents) const {
    const std::string next = path_ + ".next";
    std::ofstream(next) << contents;
    std::rename(next.c_str(), path_.c_str());
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

double AuthFailures(prometheus::Registry& registry, const std::string& reason) {
  const std::string text = prometheus::TextSerializer().Serialize(registry.Collect());
  const std::string key = "simserve_auth_failures_total{reason=\"" + reason + "\"} ";
  const size_t at = text.find(key);
  EXPECT_NE(at, std::string::npos) << text;
  return at == std::string::npos ? -1 : std::stod(text.substr(at + key.size()));
}

TEST(ParseTokenFile, SkipsCommentsBlankLinesAndWhitespace) {
  auto tokens = ParseTokenFile("# team tokens\n\n  alpha-1  \nbeta.2/x+y== # ci\r\n\t#gone\n");
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  EXPECT_THAT(*tokens, ElementsAre("alpha-1", "beta.2/x+y=="));
}

TEST(ParseTokenFile, RejectsBadTokensByLineWithoutEchoingThem) {
  auto spaced = ParseTokenFile("good\nsecret with space\n");
  EXPECT_EQ(spaced.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(spaced.status().message(), HasSubstr("line 2"));
  EXPECT_THAT(spaced.status().message(), ::testing::Not(HasSubstr("secret")));
  EXPECT_FALSE(ParseTokenFile("==\n").ok());                  // padding only
  EXPECT_FALSE(ParseTokenFile(std::string(4097, 'a')).ok());  // too long
  EXPECT_TRUE(ParseTokenFile(std::string(4096, 'a')).ok());
  EXPECT_FALSE(ParseTokenFile("tok\xc3\xa9n\n").ok());  // not ASCII
}

TEST(ParseTokenFile, EmptyFileIsAnError) {
  EXPECT_THAT(ParseTokenFile("# nothing\n\n").status().message(), HasSubstr("no token"));
}

class AuthenticatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    file_.Write("alpha\nbeta\n");
    auto created = CallAuthenticator::Create(
        AuthConfig{.token_file = file_.path(), .refresh_seconds = 3600}, &metrics_);
    ASSERT_TRUE(created.ok()) << created.status();
    auth_ = std::move(*created);
  }

  TokenFile file_;
  prometheus::Registry registry_;
  ServerMetrics metrics_{registry_, BuildInfo{"test", "", ""}, {}};
  std::unique_ptr<CallAuthenticator> auth_;
};

TEST_F(AuthenticatorTest, AcceptsEveryTokenOfTheFile) {
  EXPECT_EQ(auth_->token_count(), 2);
  EXPECT_TRUE(auth_->Check(kCompute, "Bearer alpha").ok());
  EXPECT_TRUE(auth_->Check(kCompute, "Bearer beta").ok());
  EXPECT_TRUE(auth_->Check(kCompute, "bearer beta").ok());  // the scheme is case-insensitive
}

TEST_F(AuthenticatorTest, HealthNeedsNoToken) {
  EXPECT_TRUE(auth_->Check("/grpc.health.v1.Health/Check", std::nullopt).ok());
  EXPECT_TRUE(auth_->Check("/grpc.health.v1.Health/Watch", "Bearer wrong").ok());
}

TEST_F(AuthenticatorTest, EverythingElseNeedsOne) {
  for (const char* method : {kCompute, "/simserve.v1.Similarity/GetInfo",
                             "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                             "/grpc.health.v1.HealthX/Check", ""}) {
    EXPECT_EQ(auth_->Check(method, std::nullopt).code(), absl::StatusCode::kUnauthenticated)
        << method;
  }
}

TEST_F(AuthenticatorTest, EachRefusalSaysWhatIsWrongAndIsCounted) {
  absl::Status missing = auth_->Check(kCompute, std::nullopt);
  EXPECT_EQ(missing.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(missing.message(), HasSubstr("authorization: Bearer <token>"));

  for (const char* malformed : {"alpha", "Basic YWxwaGE=", "Bearer ", ""}) {
    absl::Status status = auth_->Check(kCompute, malformed);
    EXPECT_EQ(status.code(), absl::StatusCode::kUnauthenticated) << malformed;
    EXPECT_THAT(status.message(), HasSubstr("must be 'Bearer <token>'")) << malformed;
  }
  for (const char* invalid : {"Bearer alph", "Bearer alphaa", "Bearer ALPHA", "Bearer gamma"}) {
    absl::Status status = auth_->Check(kCompute, invalid);
    EXPECT_EQ(status.code(), absl::StatusCode::kUnauthenticated) << invalid;
    EXPECT_THAT(status.message(), HasSubstr("not valid")) << invalid;
    EXPECT_THAT(status.message(), ::testing::Not(HasSubstr("alph"))) << invalid;
  }
  EXPECT_EQ(AuthFailures(registry_, "missing"), 1);
  EXPECT_EQ(AuthFailures(registry_, "malformed"), 4);
  EXPECT_EQ(AuthFailures(registry_, "invalid"), 4);
}

TEST_F(AuthenticatorTest, RewritingTheFileRevokesAndAddsTokens) {
  file_.Write("beta\ngamma\n");
  auth_->ReloadIfChanged();
  EXPECT_EQ(auth_->Check(kCompute, "Bearer alpha").code(), absl::StatusCode::kUnauthenticated);
  EXPECT_TRUE(auth_->Check(kCompute, "Bearer beta").ok());
  EXPECT_TRUE(auth_->Check(kCompute, "Bearer gamma").ok());
}

TEST_F(AuthenticatorTest, ABrokenOrMissingFileFailsClosedUntilFixed) {
  file_.Write("not a token\n");
  auth_->ReloadIfChanged();
  EXPECT_EQ(auth_->token_count(), 0);
  EXPECT_EQ(auth_->Check(kCompute, "Bearer alpha").code(), absl::StatusCode::kUnauthenticated);

  std::remove(file_.path().c_str());
  auth_->ReloadIfChanged();
  EXPECT_EQ(auth_->Check(kCompute, "Bearer beta").code(), absl::StatusCode::kUnauthenticated);

  file_.Write("alpha\n");
  auth_->ReloadIfChanged();
  EXPECT_TRUE(auth_->Check(kCompute, "Bearer alpha").ok());
}

TEST_F(AuthenticatorTest, TheWatcherPicksUpChanges) {
  auto watched = CallAuthenticator::Create(
      AuthConfig{.token_file = file_.path(), .refresh_seconds = 1}, nullptr);
  ASSERT_TRUE(watched.ok());
  file_.Write("delta\n");
  bool seen = false;
  for (int i = 0; i < 50 && !seen; ++i) {  // up to 5 s for a 1 s period
    usleep(100'000);
    seen = (*watched)->Check(kCompute, "Bearer delta").ok();
  }
  EXPECT_TRUE(seen);
}

TEST(CallAuthenticator, StartFailsOnAMissingOrEmptyFile) {
  auto missing =
      CallAuthenticator::Create(AuthConfig{.token_file = "/nonexistent/tokens"}, nullptr);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(missing.status().message(), HasSubstr("cannot be read"));
  TokenFile empty("empty_tokens");
  empty.Write("# none yet\n");
  auto none = CallAuthenticator::Create(AuthConfig{.token_file = empty.path()}, nullptr);
  EXPECT_THAT(none.status().message(), HasSubstr("no token"));
}

}  // namespace
}  // namespace simserve
