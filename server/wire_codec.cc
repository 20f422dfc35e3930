// Decoding walks the messages with protobuf's CodedInputStream over the received slices;
// the payload fields are skipped (recording their range) and every other field is copied
// into a small "skeleton" message that protobuf then parses with its full semantics.
#include "server/wire_codec.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"

namespace simserve::codec {
namespace {

using google::protobuf::io::CodedInputStream;
using google::protobuf::io::CodedOutputStream;
using google::protobuf::io::StringOutputStream;

constexpr uint32_t kVarint = 0;
constexpr uint32_t kFixed64 = 1;
constexpr uint32_t kLengthDelimited = 2;
constexpr uint32_t kFixed32 = 5;

constexpr uint32_t Tag(int field, uint32_t wire_type) {
  return (static_cast<uint32_t>(field) << 3) | wire_type;
}

// ZeroCopyInputStream over spans (the received slices), as protobuf expects.
class SpanInputStream final : public google::protobuf::io::ZeroCopyInputStream {
 public:
  explicit SpanInputStream(std::vector<std::span<const std::byte>> spans)
      : spans_(std::move(spans)) {}

  bool Next(const void** data, int* size) override {
    while (index_ < spans_.size() && offset_ == spans_[index_].size()) {
      ++index_;
      offset_ = 0;
    }
    if (index_ == spans_.size()) return false;
    const size_t n = std::min<size_t>(spans_[index_].size() - offset_, INT_MAX);
    *data = spans_[index_].data() + offset_;
    *size = static_cast<int>(n);
    offset_ += n;
    position_ += static_cast<int64_t>(n);
    return true;
  }
  void BackUp(int count) override {  // only within the span returned last, as documented
    offset_ -= static_cast<size_t>(count);
    position_ -= count;
  }
  bool Skip(int count) override {
    const void* data = nullptr;
    int size = 0;
    while (count > 0) {
      if (!Next(&data, &size)) return false;
      if (size > count) {
        BackUp(size - count);
        return true;
      }
      count -= size;
    }
    return true;
  }
  int64_t ByteCount() const override { return position_; }

 private:
  std::vector<std::span<const std::byte>> spans_;
  size_t index_ = 0;
  size_t offset_ = 0;
  int64_t position_ = 0;
};

// Tags and lengths are read as protobuf's own parser reads them (parse_context.h): a tag in
// at most 5 bytes, a length in at most 5 bytes and below 2 GiB. CodedInputStream alone
// takes up to 10 bytes and drops the high bits, so it accepts what protobuf refuses.
constexpr int kMaxTagOrLengthBytes = 5;
constexpr uint32_t kInvalidTag = 7;  // wire type 7: refused by every decoding loop

uint32_t ReadTag(CodedInputStream* in) {
  const int start = in->CurrentPosition();
  const uint32_t tag = in->ReadTag();
  return in->CurrentPosition() - start > kMaxTagOrLengthBytes ? kInvalidTag : tag;
}

bool ReadLength(CodedInputStream* in, uint32_t* length) {
  const int start = in->CurrentPosition();
  uint64_t value = 0;
  if (!in->ReadVarint64(&value) || in->CurrentPosition() - start > kMaxTagOrLengthBytes ||
      value > static_cast<uint64_t>(INT_MAX - 16)) {
    return false;
  }
  *length = static_cast<uint32_t>(value);
  return true;
}

absl::Status Malformed(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("malformed ", what, " (protobuf wire format)"));
}

// Reads the value of a field whose tag was just read and writes tag + value to `out`.
bool CopyField(uint32_t tag, CodedInputStream* in, CodedOutputStream* out) {
  switch (tag & 7U) {
    case kVarint: {
      uint64_t v = 0;
      if (!in->ReadVarint64(&v)) return false;
      out->WriteTag(tag);
      out->WriteVarint64(v);
      return true;
    }
    case kFixed64: {
      uint64_t v = 0;
      if (!in->ReadLittleEndian64(&v)) return false;
      out->WriteTag(tag);
      out->WriteLittleEndian64(v);
      return true;
    }
    case kFixed32: {
      uint32_t v = 0;
      if (!in->ReadLittleEndian32(&v)) return false;
      out->WriteTag(tag);
      out->WriteLittleEndian32(v);
      return true;
    }
    case kLengthDelimited: {
      uint32_t n = 0;
      std::string bytes;
      if (!ReadLength(in, &n) || !in->ReadString(&bytes, static_cast<int>(n))) return false;
      out->WriteTag(tag);
      out->WriteVarint32(n);
      out->WriteString(bytes);
      return true;
    }
    default:
      return false;  // groups (deprecated) and invalid wire types
  }
}

// Length-delimited field content: records its range and skips it.
bool SkipPayload(CodedInputStream* in, Range* range) {
  uint32_t n = 0;
  if (!ReadLength(in, &n)) return false;
  range->offset = in->CurrentPosition();
  range->size = n;
  return in->Skip(static_cast<int>(n));
}

// A Tensor message (just read: its length is next) re-encoded without its raw payload.
bool DecodeTensor(CodedInputStream* in, std::string* skeleton, std::optional<Range>* raw) {
  uint32_t length = 0;
  if (!ReadLength(in, &length)) return false;
  const CodedInputStream::Limit limit = in->PushLimit(static_cast<int>(length));
  {
    StringOutputStream stream(skeleton);
    CodedOutputStream out(&stream);
    for (uint32_t tag = ReadTag(in); tag != 0; tag = ReadTag(in)) {
      if (tag == Tag(v1::Tensor::kRawFieldNumber, kLengthDelimited)) {
        Range range;
        if (!SkipPayload(in, &range)) return false;
        *raw = range;
        out.WriteTag(tag);
        out.WriteVarint32(0);
      } else if (!CopyField(tag, in, &out)) {
        return false;
      }
    }
  }
  // CodedInputStream takes the end of the data for a legitimate end of the tensor even when
  // its declared length runs past it: the limit must have been reached.
  if (!in->ConsumedEntireMessage() || in->BytesUntilLimit() != 0) return false;
  in->PopLimit(limit);
  return true;
}

}  // namespace

ReceivedMessage::ReceivedMessage(const grpc::ByteBuffer& buffer) {
  (void)buffer.Dump(&slices_);  // fails only for an empty buffer (no slices: size 0)
  starts_.reserve(slices_.size());
  for (const grpc::Slice& slice : slices_) {
    starts_.push_back(size_);
    size_ += static_cast<int64_t>(slice.size());
  }
}

ReceivedMessage::ReceivedMessage(const std::vector<std::string>& pieces) {
  for (const std::string& piece : pieces) {
    starts_.push_back(size_);
    slices_.emplace_back(piece);
    size_ += static_cast<int64_t>(piece.size());
  }
}

std::vector<std::span<const std::byte>> ReceivedMessage::Spans(Range range) const {
  std::vector<std::span<const std::byte>> spans;
  int64_t at = range.offset;
  const int64_t end = range.offset + range.size;
  // The slice holding `at`: the last one starting at or before it.
  size_t i =
      static_cast<size_t>(std::upper_bound(starts_.begin(), starts_.end(), at) - starts_.begin());
  i = i == 0 ? 0 : i - 1;
  for (; i < slices_.size() && at < end; ++i) {
    const int64_t slice_end = starts_[i] + static_cast<int64_t>(slices_[i].size());
    if (slice_end <= at) continue;
    const int64_t take = std::min(end, slice_end) - at;
    spans.emplace_back(reinterpret_cast<const std::byte*>(slices_[i].begin()) + (at - starts_[i]),
                       static_cast<size_t>(take));
    at += take;
  }
  return spans;
}

absl::StatusOr<DecodedComputeRequest> DecodeComputeRequest(const ReceivedMessage& message) {
  SpanInputStream stream(message.AllSpans());
  CodedInputStream in(&stream);
  in.SetTotalBytesLimit(INT_MAX);
  DecodedComputeRequest decoded;
  std::string skeleton;
  for (uint32_t tag = ReadTag(&in); tag != 0; tag = ReadTag(&in)) {
    const bool tensor_a = tag == Tag(v1::ComputeRequest::kAFieldNumber, kLengthDelimited);
    const bool tensor_b = tag == Tag(v1::ComputeRequest::kBFieldNumber, kLengthDelimited);
    if (tensor_a || tensor_b) {
      std::string tensor;
      if (!DecodeTensor(&in, &tensor, tensor_a ? &decoded.a_raw : &decoded.b_raw)) {
        return Malformed("ComputeRequest tensor");
      }
      StringOutputStream out_stream(&skeleton);
      CodedOutputStream out(&out_stream);
      out.WriteTag(tag);
      out.WriteVarint32(static_cast<uint32_t>(tensor.size()));
      out.WriteString(tensor);
    } else {
      StringOutputStream out_stream(&skeleton);
      CodedOutputStream out(&out_stream);
      if (!CopyField(tag, &in, &out)) return Malformed("ComputeRequest");
    }
  }
  if (!in.ConsumedEntireMessage() || in.CurrentPosition() != message.size()) {
    return Malformed("ComputeRequest");
  }
  if (!decoded.request.ParseFromString(skeleton)) return Malformed("ComputeRequest");
  // A later occurrence of a tensor may have replaced raw data by values (oneof semantics).
  if (decoded.request.a().data_case() != v1::Tensor::kRaw) decoded.a_raw.reset();
  if (decoded.request.b().data_case() != v1::Tensor::kRaw) decoded.b_raw.reset();
  return decoded;
}

namespace {

// Decodes a message of the shape { oneof part { Header header = 1; bytes ... = N; ... } }:
// the header is parsed into `header`, a bytes part is left in place as `data`. Returns the
// field number of the last part set (0: none), as protobuf would keep it.
absl::StatusOr<int> DecodeParts(const ReceivedMessage& message, const char* what, int header_field,
                                std::initializer_list<int> payload_fields,
                                google::protobuf::MessageLite* header, Range* data) {
  SpanInputStream stream(message.AllSpans());
  CodedInputStream in(&stream);
  in.SetTotalBytesLimit(INT_MAX);
  int part = 0;
  for (uint32_t tag = ReadTag(&in); tag != 0; tag = ReadTag(&in)) {
    const int field = static_cast<int>(tag >> 3);
    const bool length_delimited = (tag & 7) == kLengthDelimited;
    if (length_delimited && field == header_field) {
      uint32_t n = 0;
      std::string bytes;
      if (!ReadLength(&in, &n) || !in.ReadString(&bytes, static_cast<int>(n)) ||
          !header->MergeFromString(bytes)) {
        return Malformed(absl::StrCat(what, " header"));
      }
      part = field;
    } else if (length_delimited && std::find(payload_fields.begin(), payload_fields.end(), field) !=
                                       payload_fields.end()) {
      if (!SkipPayload(&in, data)) return Malformed(absl::StrCat(what, " data"));
      part = field;
    } else {
      std::string ignored;  // unknown field: skipped, as protobuf does
      StringOutputStream out_stream(&ignored);
      CodedOutputStream out(&out_stream);
      if (!CopyField(tag, &in, &out)) return Malformed(what);
    }
  }
  if (!in.ConsumedEntireMessage() || in.CurrentPosition() != message.size()) {
    return Malformed(what);
  }
  if (part != header_field) header->Clear();
  return part;
}

}  // namespace

absl::StatusOr<DecodedUploadRequest> DecodeUploadRequest(const ReceivedMessage& message) {
  DecodedUploadRequest decoded;
  auto part =
      DecodeParts(message, "UploadRequest", v1::UploadRequest::kHeaderFieldNumber,
                  {v1::UploadRequest::kADataFieldNumber, v1::UploadRequest::kBDataFieldNumber},
                  &decoded.header, &decoded.data);
  if (!part.ok()) return part.status();
  decoded.part = static_cast<v1::UploadRequest::PartCase>(*part);
  return decoded;
}

absl::StatusOr<DecodedRegisterGalleryRequest> DecodeRegisterGalleryRequest(
    const ReceivedMessage& message) {
  DecodedRegisterGalleryRequest decoded;
  auto part =
      DecodeParts(message, "RegisterGalleryRequest", v1::RegisterGalleryRequest::kHeaderFieldNumber,
                  {v1::RegisterGalleryRequest::kDataFieldNumber}, &decoded.header, &decoded.data);
  if (!part.ok()) return part.status();
  decoded.part = static_cast<v1::RegisterGalleryRequest::PartCase>(*part);
  return decoded;
}

absl::StatusOr<DecodedModelInferRequest> DecodeModelInferRequest(const ReceivedMessage& message) {
  SpanInputStream stream(message.AllSpans());
  CodedInputStream in(&stream);
  in.SetTotalBytesLimit(INT_MAX);
  DecodedModelInferRequest decoded;
  std::string skeleton;
  for (uint32_t tag = ReadTag(&in); tag != 0; tag = ReadTag(&in)) {
    if (tag == Tag(inference::ModelInferRequest::kRawInputContentsFieldNumber, kLengthDelimited)) {
      Range range;
      if (!SkipPayload(&in, &range)) return Malformed("ModelInferRequest raw_input_contents");
      decoded.raw_inputs.push_back(range);
    } else {
      StringOutputStream out_stream(&skeleton);
      CodedOutputStream out(&out_stream);
      if (!CopyField(tag, &in, &out)) return Malformed("ModelInferRequest");
    }
  }
  if (!in.ConsumedEntireMessage() || in.CurrentPosition() != message.size()) {
    return Malformed("ModelInferRequest");
  }
  if (!decoded.request.ParseFromString(skeleton)) return Malformed("ModelInferRequest");
  return decoded;
}

grpc::ByteBuffer WrapAsField(int field_number, const grpc::ByteBuffer& inner) {
  std::string framing;
  {
    StringOutputStream stream(&framing);
    CodedOutputStream out(&stream);
    out.WriteTag(Tag(field_number, kLengthDelimited));
    out.WriteVarint64(static_cast<uint64_t>(inner.Length()));
  }
  std::vector<grpc::Slice> slices;
  slices.emplace_back(framing);
  std::vector<grpc::Slice> inner_slices;
  (void)inner.Dump(&inner_slices);  // references, not copies; fails only when empty
  for (grpc::Slice& slice : inner_slices) slices.push_back(std::move(slice));
  return grpc::ByteBuffer(slices.data(), slices.size());
}

grpc::ByteBuffer EncodeWithPayloads(const google::protobuf::MessageLite& head,
                                    std::vector<PayloadField> payloads) {
  std::vector<grpc::Slice> slices;
  std::string framing = head.SerializeAsString();
  for (PayloadField& payload : payloads) {
    if (payload.size <= 0 && !payload.keep_empty) continue;
    {
      StringOutputStream stream(&framing);
      CodedOutputStream out(&stream);
      out.WriteTag(Tag(payload.field_number, kLengthDelimited));
      out.WriteVarint64(static_cast<uint64_t>(payload.size));
    }
    if (payload.size <= 0) continue;  // an empty kept field: tag and length 0 only
    slices.emplace_back(framing);     // a copy of a few bytes
    framing.clear();
    // The slice owns the buffer from here; gRPC destroys it (returning the memory to its
    // pool) once the bytes are sent.
    auto* owner = new AlignedBuffer(std::move(payload.data));
    slices.emplace_back(
        owner->get(), static_cast<size_t>(payload.size),
        [](void* p) { delete static_cast<AlignedBuffer*>(p); }, owner);
  }
  if (!framing.empty()) slices.emplace_back(framing);
  return grpc::ByteBuffer(slices.data(), slices.size());
}

}  // namespace simserve::codec
