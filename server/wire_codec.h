// The server's zero-copy wire codec for the bulk messages. Requests are decoded from the
// received slices without copying tensor payloads: everything but the `raw` / `a_data` /
// `b_data` bytes is parsed by protobuf itself, the payloads stay where gRPC received them
// as byte ranges. Results are encoded as a small serialized header plus the tile buffers
// themselves as slices, so a computed tile reaches the transport without a copy. The
// encodings are exactly protobuf's (canonical field order), as wire_codec_test checks.
#ifndef SIMSERVE_SERVER_WIRE_CODEC_H_
#define SIMSERVE_SERVER_WIRE_CODEC_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/slice.h"
#include "inference/grpc_service.pb.h"
#include "server/aligned_buffer.h"
#include "simserve/v1/similarity.pb.h"

namespace simserve::codec {

// A byte range inside a received message.
struct Range {
  int64_t offset = 0;
  int64_t size = 0;
};

// The slices of one received message, shared (not copied) with gRPC. Immutable.
class ReceivedMessage {
 public:
  // Takes references to the slices of `buffer`; no bytes are copied.
  explicit ReceivedMessage(const grpc::ByteBuffer& buffer);
  // For tests: a message made of the given pieces (copied into slices).
  explicit ReceivedMessage(const std::vector<std::string>& pieces);

  int64_t size() const { return size_; }
  // The bytes of `range` as spans into the slices (range must lie inside the message).
  std::vector<std::span<const std::byte>> Spans(Range range) const;
  // All slices as spans, in order.
  std::vector<std::span<const std::byte>> AllSpans() const { return Spans({0, size_}); }

 private:
  std::vector<grpc::Slice> slices_;
  std::vector<int64_t> starts_;  // offset of each slice in the message
  int64_t size_ = 0;
};

// A ComputeRequest whose tensors' `raw` payloads were left in place.
struct DecodedComputeRequest {
  // Everything but the raw payloads; a tensor sent as raw has `raw` set to "".
  v1::ComputeRequest request;
  // Where a.raw / b.raw are in the message (nullopt: not sent as raw).
  std::optional<Range> a_raw;
  std::optional<Range> b_raw;
};

// Decodes a serialized ComputeRequest. INVALID_ARGUMENT for malformed wire data.
absl::StatusOr<DecodedComputeRequest> DecodeComputeRequest(const ReceivedMessage& message);

// One UploadRequest: the header, or a piece of a or b left in place.
struct DecodedUploadRequest {
  v1::UploadRequest::PartCase part = v1::UploadRequest::PART_NOT_SET;
  v1::UploadHeader header;  // when part == kHeader
  Range data;               // when part == kAData or kBData
};

// Decodes a serialized UploadRequest (the last part set wins, as in protobuf).
// INVALID_ARGUMENT for malformed wire data.
absl::StatusOr<DecodedUploadRequest> DecodeUploadRequest(const ReceivedMessage& message);

// One RegisterGalleryRequest: the header, or a piece of the gallery's bytes left in place.
struct DecodedRegisterGalleryRequest {
  v1::RegisterGalleryRequest::PartCase part = v1::RegisterGalleryRequest::PART_NOT_SET;
  v1::GalleryHeader header;  // when part == kHeader
  Range data;                // when part == kData
};

// Decodes a serialized RegisterGalleryRequest (the last part set wins, as in protobuf).
// INVALID_ARGUMENT for malformed wire data.
absl::StatusOr<DecodedRegisterGalleryRequest> DecodeRegisterGalleryRequest(
    const ReceivedMessage& message);

// A bytes field whose content is an owned buffer, handed to gRPC without a copy.
struct PayloadField {
  int field_number = 0;
  AlignedBuffer data;
  int64_t size = 0;  // bytes of `data` that are the field's content
  // Write the field even when empty (an element of a repeated bytes field keeps its place).
  bool keep_empty = false;
};

// A ModelInferRequest (Open Inference Protocol) whose raw_input_contents were left in place.
struct DecodedModelInferRequest {
  inference::ModelInferRequest request;  // without raw_input_contents
  std::vector<Range> raw_inputs;         // raw_input_contents, in order
};

// Decodes a serialized ModelInferRequest. INVALID_ARGUMENT for malformed wire data.
absl::StatusOr<DecodedModelInferRequest> DecodeModelInferRequest(const ReceivedMessage& message);

// `inner` (a serialized message) as the length-delimited field `field_number` of an outer
// message, without copying it: e.g. a ModelInferResponse as
// ModelStreamInferResponse.infer_response.
grpc::ByteBuffer WrapAsField(int field_number, const grpc::ByteBuffer& inner);

// Serializes `head` followed by `payloads` as bytes fields, the buffers becoming slices of
// the result (freed when gRPC is done with them). The payload field numbers must be larger
// than every field set in `head` and ascending (equal for a repeated field), so the bytes
// equal protobuf's own serialization of the combined message. Empty payloads are omitted,
// as protobuf does, unless keep_empty.
grpc::ByteBuffer EncodeWithPayloads(const google::protobuf::MessageLite& head,
                                    std::vector<PayloadField> payloads);

}  // namespace simserve::codec

#endif  // SIMSERVE_SERVER_WIRE_CODEC_H_
