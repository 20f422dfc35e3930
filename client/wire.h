// Zero-copy wire encoding for all of the client's calls: requests whose tensor bytes are
// referenced (not copied) by the outgoing grpc::ByteBuffer, and a decoder of the result
// messages (ComputeChunk and ComputeResponse) that copies their payloads straight from the
// received slices into their final place. The encodings are plain protobuf wire format of
// the messages in similarity.proto; field numbers come from the generated code
// (k...FieldNumber), so a renumbering in the proto cannot silently break them.
#ifndef SIMSERVE_CLIENT_WIRE_H_
#define SIMSERVE_CLIENT_WIRE_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/slice.h"
#include "simserve/v1/similarity.pb.h"

namespace simserve::wire {

// A serialized ComputeRequest with `a_data` / `b_data` as the tensors' raw bytes.
// `request` carries everything else (shapes, dtypes, options) and must have no tensor data.
// A request without `b` (a gallery plays B) encodes no `b` at all and ignores `b_data`.
// The data is referenced, not copied: it must outlive the call that sends the buffer.
grpc::ByteBuffer EncodeComputeRequest(const v1::ComputeRequest& request,
                                      std::span<const std::byte> a_data,
                                      std::span<const std::byte> b_data);

// A serialized piece of a client stream: an UploadRequest whose `a_data` or `b_data`, or a
// RegisterGalleryRequest whose `data` holds `piece`, referenced, not copied (same lifetime
// rule as above).
enum class UploadField {
  kAData = v1::UploadRequest::kADataFieldNumber,
  kBData = v1::UploadRequest::kBDataFieldNumber,
  kGalleryData = v1::RegisterGalleryRequest::kDataFieldNumber,
};
grpc::ByteBuffer EncodeUploadPiece(UploadField field, std::span<const std::byte> piece);

// Serializes any message into a buffer (copying; for small messages such as headers).
grpc::ByteBuffer EncodeMessage(const google::protobuf::MessageLite& message);

// Parses a received buffer into `message` (copying; for small messages such as GalleryInfo).
// INTERNAL if the bytes are not a valid `message`.
absl::Status DecodeMessage(const grpc::ByteBuffer& buffer, google::protobuf::MessageLite* message);

// A position inside a received message, for copying a bytes field out of it later.
struct SlicePosition {
  size_t slice = 0;
  size_t offset = 0;
};

// One result message as decoded from the wire, its payloads still in the received slices.
// A ComputeChunk fills every field; a ComputeResponse (the whole result) has no
// batch_index / row_offset / row_count, which stay 0.
struct ResultView {
  std::vector<int64_t> shape;
  int dtype = 0;
  int64_t batch_index = 0;
  int64_t row_offset = 0;
  int64_t row_count = 0;
  size_t values_size = 0;
  size_t indices_size = 0;
  SlicePosition values_at;
  SlicePosition indices_at;
};

// Decodes ComputeChunk / ComputeResponse messages. Keeps the buffer's slices so that
// CopyValues/CopyIndices can copy the payloads afterwards. Not thread-safe; reusable for
// the next message.
class ResultDecoder {
 public:
  // Parses `buffer` (taking its slices) as a ComputeChunk / ComputeResponse. Unknown fields
  // are skipped. INTERNAL for malformed protobuf wire data.
  absl::Status DecodeChunk(grpc::ByteBuffer& buffer, ResultView* view);
  absl::Status DecodeResponse(grpc::ByteBuffer& buffer, ResultView* view);
  // Copies the values_raw / indices_raw payload of the last decoded message to `dst`,
  // which must have room for view.values_size / view.indices_size bytes.
  void CopyValues(const ResultView& view, std::byte* dst) const;
  void CopyIndices(const ResultView& view, std::byte* dst) const;

 private:
  struct Fields;  // the field numbers of one message type
  absl::Status Decode(grpc::ByteBuffer& buffer, const Fields& fields, ResultView* view);
  void Copy(SlicePosition at, size_t size, std::byte* dst) const;
  std::vector<grpc::Slice> slices_;
};

}  // namespace simserve::wire

#endif  // SIMSERVE_CLIENT_WIRE_H_
