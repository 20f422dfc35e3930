// The sequencing rules of a ComputeUpload stream (upload_assembler.h).
#include "server/upload_assembler.h"

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace simserve {

UploadAssembler::UploadAssembler(const ServiceEnv& env, TilePipeline* pipeline, ProblemSpec* spec)
    : env_(env), pipeline_(pipeline), spec_(spec) {}

bool UploadAssembler::OnMessage(std::shared_ptr<const codec::ReceivedMessage> message) {
  auto decoded = codec::DecodeUploadRequest(*message);
  if (!decoded.ok()) {
    pipeline_->Fail(decoded.status());
    return false;
  }
  switch (decoded->part) {
    case v1::UploadRequest::kHeader:
      return AcceptHeader(decoded->header.request());
    case v1::UploadRequest::kAData:
    case v1::UploadRequest::kBData: {
      const bool is_a = decoded->part == v1::UploadRequest::kAData;
      if (!have_header_) {
        pipeline_->Fail(absl::InvalidArgumentError(
            absl::StrCat(is_a ? "a_data" : "b_data", " before the upload header")));
        return false;
      }
      env_.metrics->AddBytesReceived(static_cast<uint64_t>(decoded->data.size));
      std::vector<std::span<const std::byte>> spans = message->Spans(decoded->data);
      return pipeline_->AddInput({.tensor = is_a ? InputPiece::Tensor::kA : InputPiece::Tensor::kB,
                                  .spans = std::move(spans),
                                  .keep_alive = std::move(message)});
    }
    case v1::UploadRequest::PART_NOT_SET:
      break;
  }
  pipeline_->Fail(absl::InvalidArgumentError("empty UploadRequest: set header, b_data or a_data"));
  return false;
}

void UploadAssembler::OnEndOfStream() {
  if (!have_header_) {
    pipeline_->Fail(absl::InvalidArgumentError("upload stream ended before its header"));
  } else {
    pipeline_->CloseInput();
  }
}

bool UploadAssembler::AcceptHeader(const v1::ComputeRequest& request) {
  if (have_header_) {
    pipeline_->Fail(absl::InvalidArgumentError("second upload header in one stream"));
    return false;
  }
  have_header_ = true;
  auto admitted = ValidateAndAdmit(env_, request, RequestKind::kUpload, nullptr);
  if (!admitted.ok()) {
    pipeline_->Fail(admitted.status());
    return false;
  }
  *spec_ = admitted->converted.spec;
  pipeline_->Start(*spec_, std::move(admitted->admission), {}, /*input_complete=*/false,
                   std::move(admitted->gallery));
  return true;
}

}  // namespace simserve
