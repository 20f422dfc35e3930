// The sequencing rules of a ComputeUpload stream (upload_assembler.h).
#include "server/upload_assembler.h"

#include <algorithm>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace simserve {

UploadAssembler::UploadAssembler(const ServiceEnv& env, TilePipeline* pipeline, ProblemSpec* spec,
                                 std::string peer)
    : env_(env), pipeline_(pipeline), spec_(spec), peer_(std::move(peer)) {}

bool UploadAssembler::ReserveInput() {
  const int64_t wanted = received_ + env_.config.compute.upload_read_ahead_bytes;
  if (wanted <= input_reserved_ || input_unreserved_ == 0) return true;
  const int64_t more = std::min(
      input_unreserved_, std::max(wanted - input_reserved_, UploadReservationStep(env_.config)));
  if (absl::Status grown = input_reservation_.Grow(more); !grown.ok()) {
    pipeline_->Fail(absl::Status(
        grown.code(), absl::StrCat(grown.message(), " (while receiving the upload: ", received_,
                                   " of ", spec_->a_bytes + spec_->b_bytes, " input bytes in)")));
    return false;
  }
  input_unreserved_ -= more;
  input_reserved_ += more;
  return true;
}

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
      received_ += static_cast<int64_t>(decoded->data.size);
      if (!ReserveInput()) return false;
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
  auto admitted = ValidateAndAdmit(env_, request, RequestKind::kUpload, nullptr, peer_);
  if (!admitted.ok()) {
    pipeline_->Fail(admitted.status());
    return false;
  }
  *spec_ = admitted->converted.spec;
  input_unreserved_ = admitted->deferred_input_bytes;
  input_reserved_ = spec_->a_bytes + spec_->b_bytes - input_unreserved_;
  auto growth = env_.pool->Admit(0, peer_);  // an empty reservation of this client, to grow
  if (!growth.ok()) {
    pipeline_->Fail(growth.status());
    return false;
  }
  input_reservation_ = *std::move(growth);
  pipeline_->Start(*spec_, std::move(admitted->admission), {}, /*input_complete=*/false,
                   std::move(admitted->gallery));
  return true;
}

}  // namespace simserve
