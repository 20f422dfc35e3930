// The codec against protobuf itself: decoding must give what protobuf parses, and encoding
// must give the bytes protobuf serializes, for messages split into slices anywhere.
#include "server/wire_codec.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace simserve::codec {
namespace {

using ::testing::HasSubstr;

// Splits `bytes` into pieces of `piece` bytes (the last one shorter).
std::vector<std::string> Split(const std::string& bytes, size_t piece) {
  std::vector<std::string> pieces;
  for (size_t at = 0; at < bytes.size(); at += piece) pieces.push_back(bytes.substr(at, piece));
  return pieces;
}

std::string Gather(const ReceivedMessage& message, Range range) {
  std::string out;
  for (auto span : message.Spans(range)) {
    out.append(reinterpret_cast<const char*>(span.data()), span.size());
  }
  return out;
}

std::string Flatten(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(buffer.Dump(&slices).ok());
  std::string out;
  for (const auto& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

v1::ComputeRequest SampleRequest() {
  v1::ComputeRequest r;
  r.mutable_a()->add_shape(2);
  r.mutable_a()->add_shape(3);
  r.mutable_a()->set_dtype(v1::BFLOAT16);
  r.mutable_a()->set_raw(std::string(12, 'a') + "xyz");
  r.mutable_b()->add_shape(4);
  r.mutable_b()->add_shape(3);
  for (int i = 0; i < 12; ++i) r.mutable_b()->mutable_values()->add_values(0.5F * i);
  r.set_metric(v1::EUCLIDEAN);
  r.set_top_k(3);
  r.set_epsilon(1e-3F);
  r.set_max_chunk_bytes(4096);
  return r;
}

TEST(DecodeComputeRequest, MatchesProtobufForAnySliceSplit) {
  const v1::ComputeRequest original = SampleRequest();
  const std::string bytes = original.SerializeAsString();
  for (size_t piece : {size_t{1}, size_t{3}, size_t{7}, bytes.size()}) {
    ReceivedMessage message(Split(bytes, piece));
    auto decoded = DecodeComputeRequest(message);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    ASSERT_TRUE(decoded->a_raw.has_value());
    EXPECT_FALSE(decoded->b_raw.has_value());  // b is sent as values
    EXPECT_EQ(Gather(message, *decoded->a_raw), original.a().raw());
    // Everything else is exactly what protobuf parses.
    v1::ComputeRequest expected = original;
    expected.mutable_a()->set_raw("");
    EXPECT_EQ(decoded->request.SerializeAsString(), expected.SerializeAsString()) << piece;
  }
}

TEST(DecodeComputeRequest, UnknownFieldsAreKeptAndMalformedDataIsInvalid) {
  std::string bytes = SampleRequest().SerializeAsString();
  bytes += std::string("\xa0\x06\x05", 3);  // field 100, varint 5: unknown, ignored
  ReceivedMessage ok_message({bytes});
  EXPECT_TRUE(DecodeComputeRequest(ok_message).ok());
  // A length that runs past the end.
  ReceivedMessage truncated({bytes.substr(0, 10)});
  absl::Status s = DecodeComputeRequest(truncated).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("malformed ComputeRequest"));
  // Found by fuzz/compute_request_fuzzer (protobuf refuses these, the decoder took them): a
  // tensor whose length runs past the end of the message after whole fields; tags and
  // lengths in more than 5 bytes (CodedInputStream alone takes up to 10).
  for (const std::string& cut :
       {std::string("\x0a\x3a", 2), std::string("\x0a\x7f\x1a\x03xyz", 7),
        std::string("\x12\x05\x08\x02", 4), std::string("\xb8\x9d\x9d\x9d\xa2\x00\x00", 7),
        std::string("\x0a\x80\x80\x80\x80\x80\x00", 7),
        std::string("\x0a\x80\x80\x80\x80\x10", 6)}) {
    EXPECT_FALSE(v1::ComputeRequest().ParseFromString(cut));
    EXPECT_EQ(DecodeComputeRequest(ReceivedMessage({cut})).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
}

TEST(DecodeUploadRequest, HeaderAndPiecesMatchProtobuf) {
  v1::UploadRequest header;
  *header.mutable_header()->mutable_request() = SampleRequest();
  header.mutable_header()->mutable_request()->mutable_a()->clear_raw();
  ReceivedMessage h(Split(header.SerializeAsString(), 5));
  auto decoded = DecodeUploadRequest(h);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->part, v1::UploadRequest::kHeader);
  EXPECT_EQ(decoded->header.SerializeAsString(), header.header().SerializeAsString());

  v1::UploadRequest piece;
  piece.set_b_data(std::string(1000, 'q') + "end");
  ReceivedMessage p(Split(piece.SerializeAsString(), 64));
  decoded = DecodeUploadRequest(p);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->part, v1::UploadRequest::kBData);
  EXPECT_EQ(Gather(p, decoded->data), piece.b_data());

  ReceivedMessage empty({std::string()});
  decoded = DecodeUploadRequest(empty);
  ASSERT_TRUE(decoded.ok());
  EXPECT_EQ(decoded->part, v1::UploadRequest::PART_NOT_SET);
}

TEST(DecodeRegisterGalleryRequest, HeaderPiecesAndMalformedDataMatchProtobuf) {
  v1::RegisterGalleryRequest header;
  header.mutable_header()->set_name("catalog");
  header.mutable_header()->add_shape(1000);
  header.mutable_header()->add_shape(384);
  header.mutable_header()->set_storage_dtype(v1::BFLOAT16);
  ReceivedMessage h(Split(header.SerializeAsString(), 3));
  auto decoded = DecodeRegisterGalleryRequest(h);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->part, v1::RegisterGalleryRequest::kHeader);
  EXPECT_EQ(decoded->header.SerializeAsString(), header.header().SerializeAsString());

  v1::RegisterGalleryRequest piece;
  piece.set_data(std::string(5000, 'g') + "end");
  ReceivedMessage p(Split(piece.SerializeAsString(), 100));
  decoded = DecodeRegisterGalleryRequest(p);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->part, v1::RegisterGalleryRequest::kData);
  EXPECT_EQ(Gather(p, decoded->data), piece.data());

  std::string truncated = piece.SerializeAsString();
  truncated.resize(truncated.size() - 10);
  EXPECT_EQ(DecodeRegisterGalleryRequest(ReceivedMessage({truncated})).status().code(),
            absl::StatusCode::kInvalidArgument);
}

AlignedBuffer BufferOf(const std::string& bytes) {
  AlignedBuffer buffer = AllocateAligned(static_cast<int64_t>(bytes.size()));
  std::memcpy(buffer.get(), bytes.data(), bytes.size());
  return buffer;
}

TEST(EncodeWithPayloads, EqualsProtobufSerialization) {
  v1::ComputeChunk chunk;
  chunk.add_shape(2);
  chunk.add_shape(300);
  chunk.add_shape(7);
  chunk.set_dtype(v1::FLOAT16);
  chunk.set_batch_index(1);
  chunk.set_row_offset(200);
  chunk.set_row_count(100);
  chunk.set_values_raw(std::string(size_t{100} * 7 * 2, '\x3c'));
  chunk.set_indices_raw(std::string(size_t{100} * 7 * 4, '\x01'));
  v1::ComputeChunk head = chunk;
  head.clear_values_raw();
  head.clear_indices_raw();
  std::vector<PayloadField> payloads;
  payloads.push_back({v1::ComputeChunk::kValuesRawFieldNumber, BufferOf(chunk.values_raw()),
                      static_cast<int64_t>(chunk.values_raw().size())});
  payloads.push_back({v1::ComputeChunk::kIndicesRawFieldNumber, BufferOf(chunk.indices_raw()),
                      static_cast<int64_t>(chunk.indices_raw().size())});
  EXPECT_EQ(Flatten(EncodeWithPayloads(head, std::move(payloads))), chunk.SerializeAsString());

  // Dense result: no indices payload, as protobuf omits an empty bytes field.
  v1::ComputeResponse response;
  response.add_shape(3);
  response.set_values_raw("0123456789ab");
  v1::ComputeResponse response_head = response;
  response_head.clear_values_raw();
  std::vector<PayloadField> dense;
  dense.push_back(
      {v1::ComputeResponse::kValuesRawFieldNumber, BufferOf(response.values_raw()), 12});
  dense.push_back({v1::ComputeResponse::kIndicesRawFieldNumber, AlignedBuffer(), 0});
  EXPECT_EQ(Flatten(EncodeWithPayloads(response_head, std::move(dense))),
            response.SerializeAsString());
}

}  // namespace
}  // namespace simserve::codec
