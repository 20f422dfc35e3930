// UploadAssembler driven as UploadCall drives it, without gRPC (upload_call_driver.h):
// messages are fed while reading is allowed, then the stream half-closes. Checks the
// sequencing rules and their statuses.
#include "server/upload_assembler.h"

#include <atomic>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"
#include "server/upload_call_driver.h"

namespace simserve {
namespace {

using ::testing::HasSubstr;

std::string Serialized(const v1::UploadRequest& request) { return request.SerializeAsString(); }

std::string Header(int64_t batch, int64_t n, int64_t m, int64_t d) {
  v1::UploadRequest request;
  v1::ComputeRequest* r = request.mutable_header()->mutable_request();
  for (int64_t dim : {batch, n, d}) r->mutable_a()->add_shape(dim);
  for (int64_t dim : {batch, m, d}) r->mutable_b()->add_shape(dim);
  r->set_max_chunk_bytes(static_cast<uint32_t>(m * 4));  // one row per tile
  return Serialized(request);
}

std::string Data(bool a, int64_t floats, float value = 1.0F) {
  std::string bytes(static_cast<size_t>(floats) * 4, '\0');
  for (int64_t i = 0; i < floats; ++i) std::memcpy(&bytes[static_cast<size_t>(i) * 4], &value, 4);
  v1::UploadRequest request;
  if (a) {
    request.set_a_data(bytes);
  } else {
    request.set_b_data(bytes);
  }
  return Serialized(request);
}

class UploadAssemblerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto engine = kernels::SimilarityEngine::Create({.threads_per_call = 1});
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = *std::move(engine);
  }

  // One upload: feeds `messages` as UploadCall would, then half-closes. Returns the status
  // the call finished with.
  absl::Status Run(const std::vector<std::string>& messages) {
    const ServiceEnv env{config_, engine_.get(),  &pool_,      &metrics_,
                         &stats_, buffers_.get(), &galleries_, &draining_};
    std::vector<std::shared_ptr<codec::ReceivedMessage>> received;
    for (const std::string& m : messages) {
      received.push_back(std::make_shared<codec::ReceivedMessage>(std::vector<std::string>{m}));
    }
    DrivenUpload upload = DriveUpload(env, received);
    rows_ = 0;
    for (const auto& tile : upload.tiles) rows_ += tile->rows;
    return upload.status;
  }

  ServerConfig config_;
  prometheus::Registry registry_;
  ServerMetrics metrics_{registry_, {"test", "", ""}, {}};
  ServiceStats stats_;
  std::shared_ptr<BufferPool> buffers_ = BufferPool::Create(int64_t{16} << 20);
  ComputePool pool_{ComputePool::Options{.workers = 2}, nullptr};
  GalleryStore galleries_{int64_t{1} << 20, nullptr};
  std::atomic<bool> draining_{false};
  std::unique_ptr<kernels::SimilarityEngine> engine_;
  int64_t rows_ = 0;
};

TEST_F(UploadAssemblerTest, HeaderThenPiecesInAnyOrderStreamsEveryRow) {
  // b and a interleaved, in pieces that split elements.
  EXPECT_TRUE(
      Run({Header(2, 3, 4, 5), Data(false, 20), Data(true, 15), Data(false, 20), Data(true, 15)})
          .ok());
  EXPECT_EQ(rows_, 6);
  EXPECT_EQ(pool_.inflight_bytes(), 0);
}

TEST_F(UploadAssemblerTest, ReadingPausesAndResumesWhenPiecesExceedTheReadAhead) {
  config_.compute.upload_read_ahead_bytes = 8;
  std::vector<std::string> messages = {Header(1, 4, 4, 2)};
  for (int i = 0; i < 4; ++i) messages.push_back(Data(false, 2));
  for (int i = 0; i < 4; ++i) messages.push_back(Data(true, 2));
  EXPECT_TRUE(Run(messages).ok());
  EXPECT_EQ(rows_, 4);
}

TEST_F(UploadAssemblerTest, SequencingErrorsAreInvalidArgument) {
  struct Case {
    std::vector<std::string> messages;
    const char* message;
  };
  const std::vector<Case> cases = {
      {{Data(true, 2)}, "a_data before the upload header"},
      {{Data(false, 2)}, "b_data before the upload header"},
      {{Header(1, 1, 1, 2), Header(1, 1, 1, 2)}, "second upload header in one stream"},
      {{Header(1, 1, 1, 2), Serialized(v1::UploadRequest())}, "empty UploadRequest"},
      {{}, "upload stream ended before its header"},
      {{std::string("\x0a\x05\x01", 3)}, "malformed"},
      {{Header(1, 1, 1, 2), Data(false, 2)}, "upload stream ended early"},  // a is missing
      {{Header(1, 1, 1, 2), Data(false, 3)}, "too much data for tensor b"},
  };
  for (const Case& c : cases) {
    const absl::Status status = Run(c.messages);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.message << ": " << status;
    EXPECT_THAT(status.message(), HasSubstr(c.message));
  }
  EXPECT_EQ(pool_.inflight_bytes(), 0);
}

TEST_F(UploadAssemblerTest, HeaderIsValidatedAndAdmittedLikeEveryComputeCall) {
  v1::UploadRequest with_data;
  v1::ComputeRequest* r = with_data.mutable_header()->mutable_request();
  r->mutable_a()->add_shape(1);
  r->mutable_a()->add_shape(2);
  r->mutable_a()->set_raw("12345678");
  *r->mutable_b() = r->a();
  r->mutable_b()->clear_raw();
  EXPECT_THAT(Run({Serialized(with_data)}).message(), HasSubstr("carries data"));

  config_.limits.max_input_elements = 3;
  EXPECT_EQ(Run({Header(1, 2, 2, 2)}).code(), absl::StatusCode::kResourceExhausted);

  config_.limits = LimitsConfig();
  draining_ = true;
  EXPECT_EQ(Run({Header(1, 1, 1, 2)}).code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace simserve
