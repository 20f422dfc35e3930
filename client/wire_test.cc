// Unit tests of the hand-written wire encoding against the protobuf library as reference:
// what we encode must parse with protobuf, and what protobuf serializes we must decode.
#include "client/wire.h"

#include <cstring>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace simserve::wire {
namespace {

std::string Flatten(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(buffer.Dump(&slices).ok());
  std::string out;
  for (const auto& slice : slices) {
    out.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  return out;
}

// Splits `bytes` into slices at the given cut points, so decoding must cross boundaries.
grpc::ByteBuffer Split(const std::string& bytes, std::vector<size_t> cuts) {
  std::vector<grpc::Slice> slices;
  size_t begin = 0;
  cuts.push_back(bytes.size());
  for (const size_t cut : cuts) {
    slices.emplace_back(bytes.data() + begin, cut - begin);  // copies; may be empty
    begin = cut;
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

std::span<const std::byte> Bytes(const std::string& s) {
  return std::as_bytes(std::span(s.data(), s.size()));
}

TEST(WireTest, EncodedComputeRequestParsesWithProtobuf) {
  v1::ComputeRequest header;
  header.mutable_a()->add_shape(2);
  header.mutable_a()->add_shape(3);
  header.mutable_a()->set_dtype(v1::FLOAT16);
  header.mutable_b()->add_shape(5);
  header.mutable_b()->add_shape(3);
  header.set_metric(v1::EUCLIDEAN);
  header.set_top_k(4);
  header.set_epsilon(0.5F);
  header.set_max_chunk_bytes(300);
  std::string a_data(12, 'a');
  std::string b_data(200, '\0');
  for (size_t i = 0; i < b_data.size(); ++i) b_data[i] = static_cast<char>(i * 7);
  const grpc::ByteBuffer buffer = EncodeComputeRequest(header, Bytes(a_data), Bytes(b_data));
  v1::ComputeRequest parsed;
  ASSERT_TRUE(parsed.ParseFromString(Flatten(buffer)));
  EXPECT_THAT(parsed.a().shape(), ::testing::ElementsAre(2, 3));
  EXPECT_EQ(parsed.a().dtype(), v1::FLOAT16);
  EXPECT_EQ(parsed.a().raw(), a_data);
  EXPECT_THAT(parsed.b().shape(), ::testing::ElementsAre(5, 3));
  EXPECT_EQ(parsed.b().raw(), b_data);
  EXPECT_EQ(parsed.metric(), v1::EUCLIDEAN);
  EXPECT_EQ(parsed.top_k(), 4U);
  EXPECT_EQ(parsed.epsilon(), 0.5F);
  EXPECT_EQ(parsed.max_chunk_bytes(), 300U);

  // Empty data still gives a parsable message with an empty raw field.
  const grpc::ByteBuffer empty = EncodeComputeRequest(header, {}, {});
  ASSERT_TRUE(parsed.ParseFromString(Flatten(empty)));
  EXPECT_EQ(parsed.a().data_case(), v1::Tensor::kRaw);
  EXPECT_TRUE(parsed.a().raw().empty());
}

TEST(WireTest, EncodedUploadPiecesParseWithProtobuf) {
  const std::string big(300000, 'x');  // 3-byte length varint
  v1::UploadRequest parsed;
  ASSERT_TRUE(parsed.ParseFromString(Flatten(EncodeUploadPiece(UploadField::kBData, Bytes(big)))));
  EXPECT_EQ(parsed.part_case(), v1::UploadRequest::kBData);
  EXPECT_EQ(parsed.b_data(), big);
  ASSERT_TRUE(
      parsed.ParseFromString(Flatten(EncodeUploadPiece(UploadField::kAData, Bytes("abc")))));
  EXPECT_EQ(parsed.part_case(), v1::UploadRequest::kAData);
  EXPECT_EQ(parsed.a_data(), "abc");
  v1::UploadRequest header;
  header.mutable_header()->mutable_request()->set_top_k(3);
  ASSERT_TRUE(parsed.ParseFromString(Flatten(EncodeMessage(header))));
  EXPECT_EQ(parsed.header().request().top_k(), 3U);
}

TEST(WireTest, GalleryComputeRequestHasNoBAtAll) {
  // A gallery plays B: `b` must be absent (has_b() false on the server), not an empty tensor.
  v1::ComputeRequest header;
  header.mutable_a()->add_shape(3);
  header.mutable_a()->add_shape(4);
  header.set_gallery("faces.v2");
  header.set_gallery_version(7);
  header.set_top_k(2);
  const std::string a_data(48, 'a');
  v1::ComputeRequest parsed;
  ASSERT_TRUE(parsed.ParseFromString(Flatten(EncodeComputeRequest(header, Bytes(a_data), {}))));
  EXPECT_FALSE(parsed.has_b());
  EXPECT_EQ(parsed.a().raw(), a_data);
  EXPECT_EQ(parsed.gallery(), "faces.v2");
  EXPECT_EQ(parsed.gallery_version(), 7);
  EXPECT_EQ(parsed.top_k(), 2U);
  // Data offered for an absent b is not encoded either.
  ASSERT_TRUE(parsed.ParseFromString(
      Flatten(EncodeComputeRequest(header, Bytes(a_data), Bytes(std::string(8, 'b'))))));
  EXPECT_FALSE(parsed.has_b());
}

TEST(WireTest, GalleryPiecesAndMessagesRoundTrip) {
  const std::string big(200000, 'g');
  v1::RegisterGalleryRequest parsed;
  ASSERT_TRUE(
      parsed.ParseFromString(Flatten(EncodeUploadPiece(UploadField::kGalleryData, Bytes(big)))));
  EXPECT_EQ(parsed.part_case(), v1::RegisterGalleryRequest::kData);
  EXPECT_EQ(parsed.data(), big);

  v1::GalleryInfo info;
  info.set_name("g");
  info.add_shape(1000);
  info.add_shape(64);
  info.set_version(3);
  info.set_source(v1::DIRECTORY);
  info.set_prepare_seconds(0.25);
  const std::string bytes = info.SerializeAsString();
  v1::GalleryInfo decoded;
  ASSERT_TRUE(DecodeMessage(Split(bytes, {1, 5}), &decoded).ok());
  EXPECT_EQ(decoded.SerializeAsString(), bytes);
  const absl::Status truncated =
      DecodeMessage(Split(bytes.substr(0, bytes.size() - 1), {}), &decoded);
  EXPECT_EQ(truncated.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(truncated.message(), ::testing::HasSubstr("simserve.v1.GalleryInfo"));
}

TEST(WireTest, DecodesChunksSerializedByProtobufAcrossSliceBoundaries) {
  v1::ComputeChunk chunk;
  chunk.add_shape(100);
  chunk.add_shape(400);
  chunk.add_shape(500);
  chunk.set_dtype(v1::BFLOAT16);
  chunk.set_batch_index(99);
  chunk.set_row_offset(300);
  chunk.set_row_count(100);
  std::string values(1000, '\0');
  for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<char>(i * 13 + 1);
  chunk.set_values_raw(values);
  chunk.set_indices_raw("0123456789abcdef");
  const std::string bytes = chunk.SerializeAsString();
  for (const std::vector<size_t>& cuts :
       std::vector<std::vector<size_t>>{{}, {1}, {3, 3, 4}, {7, 20, 500, 1001}, {bytes.size()}}) {
    grpc::ByteBuffer buffer = Split(bytes, cuts);
    ResultDecoder decoder;
    ResultView view;
    ASSERT_TRUE(decoder.DecodeChunk(buffer, &view).ok());
    EXPECT_THAT(view.shape, ::testing::ElementsAre(100, 400, 500));
    EXPECT_EQ(view.dtype, v1::BFLOAT16);
    EXPECT_EQ(view.batch_index, 99);
    EXPECT_EQ(view.row_offset, 300);
    EXPECT_EQ(view.row_count, 100);
    ASSERT_EQ(view.values_size, values.size());
    std::string got(values.size(), '\0');
    decoder.CopyValues(view, reinterpret_cast<std::byte*>(got.data()));
    EXPECT_EQ(got, values);
    ASSERT_EQ(view.indices_size, 16U);
    std::string indices(16, '\0');
    decoder.CopyIndices(view, reinterpret_cast<std::byte*>(indices.data()));
    EXPECT_EQ(indices, "0123456789abcdef");
  }
}

TEST(WireTest, DecodesResponsesSerializedByProtobufAcrossSliceBoundaries) {
  v1::ComputeResponse response;
  response.add_shape(2);
  response.add_shape(3);
  response.add_shape(4);
  response.set_dtype(v1::FLOAT16);
  std::string values(48, '\0');
  for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<char>(i * 5 + 3);
  response.set_values_raw(values);
  response.set_indices_raw(std::string(96, 'i'));
  // An unknown varint field 9 and bytes field 12, which a newer server might send.
  const std::string bytes = response.SerializeAsString() +
                            std::string{static_cast<char>(0x48), 0x07} +
                            std::string{static_cast<char>(0x62), 0x02, 'z', 'z'};
  for (const std::vector<size_t>& cuts :
       std::vector<std::vector<size_t>>{{}, {2}, {5, 9, 30}, {bytes.size() - 1}}) {
    grpc::ByteBuffer buffer = Split(bytes, cuts);
    ResultDecoder decoder;
    ResultView view;
    ASSERT_TRUE(decoder.DecodeResponse(buffer, &view).ok());
    EXPECT_THAT(view.shape, ::testing::ElementsAre(2, 3, 4));
    EXPECT_EQ(view.dtype, v1::FLOAT16);
    EXPECT_EQ(view.batch_index, 0);
    EXPECT_EQ(view.row_count, 0);
    ASSERT_EQ(view.values_size, values.size());
    std::string got(values.size(), '\0');
    decoder.CopyValues(view, reinterpret_cast<std::byte*>(got.data()));
    EXPECT_EQ(got, values);
    ASSERT_EQ(view.indices_size, 96U);
    std::string indices(96, '\0');
    decoder.CopyIndices(view, reinterpret_cast<std::byte*>(indices.data()));
    EXPECT_EQ(indices, std::string(96, 'i'));
  }
  // The field numbers differ (values_raw is field 3 of a response, 6 of a chunk): read as
  // a chunk, the response's payloads are unknown fields.
  grpc::ByteBuffer as_chunk = Split(response.SerializeAsString(), {});
  ResultDecoder decoder;
  ResultView view;
  ASSERT_TRUE(decoder.DecodeChunk(as_chunk, &view).ok());
  EXPECT_EQ(view.values_size, 0U);
  EXPECT_EQ(view.indices_size, 0U);
}

TEST(WireTest, DecodesUnpackedShapesAndSkipsUnknownFields) {
  // shape as unpacked varints (field 1, wire type 0), then unknown fields of every type.
  std::string bytes = {0x08, 0x03, 0x08, 0x04, 0x18, 0x01, 0x28, 0x02};
  bytes += std::string{static_cast<char>(0x48), 0x05};                    // field 9 varint
  bytes += std::string{static_cast<char>(0x51), 1, 2, 3, 4, 5, 6, 7, 8};  // field 10 fixed64
  bytes += std::string{static_cast<char>(0x5D), 1, 2, 3, 4};              // field 11 fixed32
  bytes += std::string{static_cast<char>(0x62), 0x02, 'z', 'z'};          // field 12 bytes
  v1::ComputeChunk reference;
  ASSERT_TRUE(reference.ParseFromString(bytes));  // protobuf agrees it is well-formed
  grpc::ByteBuffer buffer = Split(bytes, {5});
  ResultDecoder decoder;
  ResultView view;
  ASSERT_TRUE(decoder.DecodeChunk(buffer, &view).ok());
  EXPECT_THAT(view.shape, ::testing::ElementsAre(3, 4));
  EXPECT_EQ(view.batch_index, reference.batch_index());
  EXPECT_EQ(view.row_count, reference.row_count());
  EXPECT_EQ(view.values_size, 0U);
}

TEST(WireTest, RejectsTruncatedMessages) {
  v1::ComputeChunk chunk;
  chunk.add_shape(4);
  chunk.set_values_raw(std::string(64, 'v'));
  const std::string bytes = chunk.SerializeAsString();
  for (const size_t keep : {bytes.size() - 1, size_t{1}, size_t{2}, size_t{4}}) {
    grpc::ByteBuffer buffer = Split(bytes.substr(0, keep), {});
    ResultDecoder decoder;
    ResultView view;
    const absl::Status status = decoder.DecodeChunk(buffer, &view);
    EXPECT_EQ(status.code(), absl::StatusCode::kInternal) << keep;
  }
  grpc::ByteBuffer group = Split(std::string{0x0B}, {});  // wire type 3 (group): unsupported
  ResultDecoder decoder;
  ResultView view;
  EXPECT_EQ(decoder.DecodeChunk(group, &view).code(), absl::StatusCode::kInternal);
}

}  // namespace
}  // namespace simserve::wire
