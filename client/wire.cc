// Protobuf wire format by hand, only where it saves copying tensor-sized payloads:
// varints, tags (field << 3 | wire type) and length-delimited fields over grpc::Slices.
#include "client/wire.h"

#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"

namespace simserve::wire {
namespace {

constexpr int kVarint = 0;
constexpr int kFixed64 = 1;
constexpr int kLengthDelimited = 2;
constexpr int kFixed32 = 5;

void AppendVarint(uint64_t value, std::string* out) {
  while (value >= 0x80) {
    out->push_back(static_cast<char>((value & 0x7F) | 0x80));
    value >>= 7;
  }
  out->push_back(static_cast<char>(value));
}

void AppendTag(int field, int wire_type, std::string* out) {
  AppendVarint((static_cast<uint64_t>(field) << 3) | static_cast<uint64_t>(wire_type), out);
}

size_t VarintSize(uint64_t value) {
  size_t size = 1;
  while (value >= 0x80) {
    value >>= 7;
    ++size;
  }
  return size;
}

grpc::Slice StaticSlice(std::span<const std::byte> data) {
  return grpc::Slice(data.data(), data.size(), grpc::Slice::STATIC_SLICE);
}

grpc::Slice CopySlice(const std::string& bytes) { return grpc::Slice(bytes); }

// Reads the protobuf wire format across a list of slices.
class SliceReader {
 public:
  explicit SliceReader(const std::vector<grpc::Slice>& slices) : slices_(slices) { SkipEmpty(); }

  bool AtEnd() const { return index_ >= slices_.size(); }
  SlicePosition position() const { return {index_, offset_}; }
  // Bytes read or skipped so far.
  size_t consumed() const { return consumed_; }

  bool ReadVarint(uint64_t* value) {
    *value = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (AtEnd()) return false;
      const auto byte = static_cast<uint8_t>(slices_[index_].begin()[offset_]);
      Advance(1);
      *value |= static_cast<uint64_t>(byte & 0x7F) << shift;
      if ((byte & 0x80) == 0) return true;
    }
    return false;
  }

  bool Skip(size_t n) {
    while (n > 0) {
      if (AtEnd()) return false;
      const size_t step = std::min(n, slices_[index_].size() - offset_);
      Advance(step);
      n -= step;
    }
    return true;
  }

 private:
  void Advance(size_t n) {
    offset_ += n;
    consumed_ += n;
    if (offset_ == slices_[index_].size()) {
      ++index_;
      offset_ = 0;
      SkipEmpty();
    }
  }
  void SkipEmpty() {
    while (index_ < slices_.size() && slices_[index_].size() == 0) ++index_;
  }

  const std::vector<grpc::Slice>& slices_;
  size_t index_ = 0;
  size_t offset_ = 0;
  size_t consumed_ = 0;
};

absl::Status Malformed(const char* message, const char* what) {
  return absl::InternalError(absl::StrCat("malformed ", message, " on the wire: ", what));
}

}  // namespace

grpc::ByteBuffer EncodeComputeRequest(const v1::ComputeRequest& request,
                                      std::span<const std::byte> a_data,
                                      std::span<const std::byte> b_data) {
  // ComputeRequest = [Tensor a][Tensor b][options...] (protobuf accepts fields in any
  // order). Each tensor is its serialized header (shape, dtype) followed by its `raw`
  // field = the data slice.
  std::vector<grpc::Slice> slices;
  const auto add_tensor = [&slices](int field, const v1::Tensor& header,
                                    std::span<const std::byte> data) {
    std::string tensor_prefix = header.SerializeAsString();
    AppendTag(v1::Tensor::kRawFieldNumber, kLengthDelimited, &tensor_prefix);
    AppendVarint(data.size(), &tensor_prefix);
    std::string prefix;
    AppendTag(field, kLengthDelimited, &prefix);
    AppendVarint(tensor_prefix.size() + data.size(), &prefix);
    prefix += tensor_prefix;
    slices.push_back(CopySlice(prefix));
    if (!data.empty()) slices.push_back(StaticSlice(data));
  };
  add_tensor(v1::ComputeRequest::kAFieldNumber, request.a(), a_data);
  // A gallery plays B: then `b` must be absent from the message, not an empty tensor.
  if (request.has_b()) add_tensor(v1::ComputeRequest::kBFieldNumber, request.b(), b_data);
  v1::ComputeRequest options = request;
  options.clear_a();
  options.clear_b();
  const std::string rest = options.SerializeAsString();
  if (!rest.empty()) slices.push_back(CopySlice(rest));
  return grpc::ByteBuffer(slices.data(), slices.size());
}

grpc::ByteBuffer EncodeUploadPiece(UploadField field, std::span<const std::byte> piece) {
  std::string prefix;
  prefix.reserve(2 + VarintSize(piece.size()));
  AppendTag(static_cast<int>(field), kLengthDelimited, &prefix);
  AppendVarint(piece.size(), &prefix);
  const grpc::Slice slices[] = {CopySlice(prefix), StaticSlice(piece)};
  return grpc::ByteBuffer(slices, piece.empty() ? 1 : 2);
}

grpc::ByteBuffer EncodeMessage(const google::protobuf::MessageLite& message) {
  const grpc::Slice slice = CopySlice(message.SerializeAsString());
  return grpc::ByteBuffer(&slice, 1);
}

absl::Status DecodeMessage(const grpc::ByteBuffer& buffer, google::protobuf::MessageLite* message) {
  std::vector<grpc::Slice> slices;
  if (!buffer.Dump(&slices).ok()) {
    return Malformed(message->GetTypeName().c_str(), "cannot read the message buffer");
  }
  std::string bytes;
  bytes.reserve(buffer.Length());
  for (const grpc::Slice& slice : slices) {
    bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  if (!message->ParseFromString(bytes)) {
    return Malformed(message->GetTypeName().c_str(), "not a valid protobuf message");
  }
  return absl::OkStatus();
}

struct ResultDecoder::Fields {
  const char* message;
  int shape;
  int dtype;
  int batch_index;  // 0: the message has no such field
  int row_offset;
  int row_count;
  int values;
  int indices;
};

absl::Status ResultDecoder::DecodeChunk(grpc::ByteBuffer& buffer, ResultView* view) {
  using C = v1::ComputeChunk;
  static constexpr Fields kChunk = {"ComputeChunk",           C::kShapeFieldNumber,
                                    C::kDtypeFieldNumber,     C::kBatchIndexFieldNumber,
                                    C::kRowOffsetFieldNumber, C::kRowCountFieldNumber,
                                    C::kValuesRawFieldNumber, C::kIndicesRawFieldNumber};
  return Decode(buffer, kChunk, view);
}

absl::Status ResultDecoder::DecodeResponse(grpc::ByteBuffer& buffer, ResultView* view) {
  using R = v1::ComputeResponse;
  static constexpr Fields kResponse = {
      "ComputeResponse",        R::kShapeFieldNumber,     R::kDtypeFieldNumber, 0, 0, 0,
      R::kValuesRawFieldNumber, R::kIndicesRawFieldNumber};
  return Decode(buffer, kResponse, view);
}

absl::Status ResultDecoder::Decode(grpc::ByteBuffer& buffer, const Fields& fields,
                                   ResultView* view) {
  const char* const message = fields.message;
  slices_.clear();
  if (!buffer.Dump(&slices_).ok()) return Malformed(message, "cannot read the message buffer");
  *view = ResultView();
  SliceReader reader(slices_);
  while (!reader.AtEnd()) {
    uint64_t tag = 0;
    if (!reader.ReadVarint(&tag)) return Malformed(message, "truncated tag");
    const auto field = static_cast<int>(tag >> 3);
    const auto wire_type = static_cast<int>(tag & 7);
    if (field == 0) return Malformed(message, "field number 0");
    uint64_t value = 0;
    if (wire_type == kVarint) {
      if (!reader.ReadVarint(&value)) return Malformed(message, "truncated varint");
      const auto signed_value = static_cast<int64_t>(value);
      if (field == fields.shape) {  // unpacked repeated shape
        view->shape.push_back(signed_value);
      } else if (field == fields.dtype) {
        view->dtype = static_cast<int>(value);
      } else if (field == fields.batch_index) {
        view->batch_index = signed_value;
      } else if (field == fields.row_offset) {
        view->row_offset = signed_value;
      } else if (field == fields.row_count) {
        view->row_count = signed_value;
      }  // else an unknown field: ignore
    } else if (wire_type == kLengthDelimited) {
      uint64_t length = 0;
      if (!reader.ReadVarint(&length)) return Malformed(message, "truncated length");
      if (field == fields.shape) {  // packed shape
        const size_t end = reader.consumed() + static_cast<size_t>(length);
        while (reader.consumed() < end) {
          uint64_t dim = 0;
          if (!reader.ReadVarint(&dim)) return Malformed(message, "truncated shape");
          view->shape.push_back(static_cast<int64_t>(dim));
        }
        if (reader.consumed() != end) return Malformed(message, "shape overruns its length");
      } else if (field == fields.values || field == fields.indices) {
        (field == fields.values ? view->values_at : view->indices_at) = reader.position();
        (field == fields.values ? view->values_size : view->indices_size) =
            static_cast<size_t>(length);
        if (!reader.Skip(static_cast<size_t>(length))) {
          return Malformed(message, "truncated payload");
        }
      } else if (!reader.Skip(static_cast<size_t>(length))) {
        return Malformed(message, "truncated field");
      }
    } else if (wire_type == kFixed64) {
      if (!reader.Skip(8)) return Malformed(message, "truncated fixed64");
    } else if (wire_type == kFixed32) {
      if (!reader.Skip(4)) return Malformed(message, "truncated fixed32");
    } else {
      return Malformed(message, "unsupported wire type");
    }
  }
  return absl::OkStatus();
}

void ResultDecoder::Copy(SlicePosition at, size_t size, std::byte* dst) const {
  while (size > 0) {
    const grpc::Slice& slice = slices_[at.slice];
    const size_t step = std::min(size, slice.size() - at.offset);
    std::memcpy(dst, slice.begin() + at.offset, step);
    dst += step;
    size -= step;
    ++at.slice;
    at.offset = 0;
  }
}

void ResultDecoder::CopyValues(const ResultView& view, std::byte* dst) const {
  Copy(view.values_at, view.values_size, dst);
}

void ResultDecoder::CopyIndices(const ResultView& view, std::byte* dst) const {
  Copy(view.indices_at, view.indices_size, dst);
}

}  // namespace simserve::wire
