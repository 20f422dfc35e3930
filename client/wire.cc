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

absl::Status Malformed(const char* what) {
  return absl::InternalError(absl::StrCat("malformed ComputeChunk on the wire: ", what));
}

}  // namespace

grpc::ByteBuffer EncodeComputeRequest(const v1::ComputeRequest& request,
                                      std::span<const std::byte> a_data,
                                      std::span<const std::byte> b_data) {
  // ComputeRequest = [field 1: Tensor a][field 2: Tensor b][options...]. Each tensor is
  // its serialized header (shape, dtype) followed by field 3 (raw) = the data slice.
  std::vector<grpc::Slice> slices;
  const auto add_tensor = [&slices](int field, const v1::Tensor& header,
                                    std::span<const std::byte> data) {
    std::string tensor_prefix = header.SerializeAsString();
    AppendTag(3, kLengthDelimited, &tensor_prefix);
    AppendVarint(data.size(), &tensor_prefix);
    std::string prefix;
    AppendTag(field, kLengthDelimited, &prefix);
    AppendVarint(tensor_prefix.size() + data.size(), &prefix);
    prefix += tensor_prefix;
    slices.push_back(CopySlice(prefix));
    if (!data.empty()) slices.push_back(StaticSlice(data));
  };
  add_tensor(1, request.a(), a_data);
  add_tensor(2, request.b(), b_data);
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

absl::Status ChunkDecoder::Decode(grpc::ByteBuffer& buffer, ChunkView* view) {
  slices_.clear();
  if (!buffer.Dump(&slices_).ok()) return Malformed("cannot read the message buffer");
  *view = ChunkView();
  SliceReader reader(slices_);
  while (!reader.AtEnd()) {
    uint64_t tag = 0;
    if (!reader.ReadVarint(&tag)) return Malformed("truncated tag");
    const auto field = static_cast<int>(tag >> 3);
    const auto wire_type = static_cast<int>(tag & 7);
    uint64_t value = 0;
    if (wire_type == kVarint) {
      if (!reader.ReadVarint(&value)) return Malformed("truncated varint");
      switch (field) {
        case 1:  // unpacked repeated shape
          view->shape.push_back(static_cast<int64_t>(value));
          break;
        case 2:
          view->dtype = static_cast<int>(value);
          break;
        case 3:
          view->batch_index = static_cast<int64_t>(value);
          break;
        case 4:
          view->row_offset = static_cast<int64_t>(value);
          break;
        case 5:
          view->row_count = static_cast<int64_t>(value);
          break;
        default:
          break;  // unknown field: ignore
      }
    } else if (wire_type == kLengthDelimited) {
      uint64_t length = 0;
      if (!reader.ReadVarint(&length)) return Malformed("truncated length");
      if (field == 1) {  // packed shape
        const size_t end = reader.consumed() + static_cast<size_t>(length);
        while (reader.consumed() < end) {
          uint64_t dim = 0;
          if (!reader.ReadVarint(&dim)) return Malformed("truncated shape");
          view->shape.push_back(static_cast<int64_t>(dim));
        }
        if (reader.consumed() != end) return Malformed("shape overruns its length");
      } else if (field == 6 || field == 7) {
        (field == 6 ? view->values_at : view->indices_at) = reader.position();
        (field == 6 ? view->values_size : view->indices_size) = static_cast<size_t>(length);
        if (!reader.Skip(static_cast<size_t>(length))) return Malformed("truncated payload");
      } else if (!reader.Skip(static_cast<size_t>(length))) {
        return Malformed("truncated field");
      }
    } else if (wire_type == kFixed64) {
      if (!reader.Skip(8)) return Malformed("truncated fixed64");
    } else if (wire_type == kFixed32) {
      if (!reader.Skip(4)) return Malformed("truncated fixed32");
    } else {
      return Malformed("unsupported wire type");
    }
  }
  return absl::OkStatus();
}

void ChunkDecoder::Copy(SlicePosition at, size_t size, std::byte* dst) const {
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

void ChunkDecoder::CopyValues(const ChunkView& view, std::byte* dst) const {
  Copy(view.values_at, view.values_size, dst);
}

void ChunkDecoder::CopyIndices(const ChunkView& view, std::byte* dst) const {
  Copy(view.indices_at, view.indices_size, dst);
}

}  // namespace simserve::wire
