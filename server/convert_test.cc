// Tests of request validation and conversion: every rule of the API contract with its
// status code and message, sizes and tiling, and zero-copy views of raw and values data.
#include "server/convert.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/dtype.h"
#include "kernels/finite.h"

namespace simserve {
namespace {

using ::testing::HasSubstr;

v1::Tensor RawTensor(const std::vector<int64_t>& shape, const std::vector<float>& values) {
  v1::Tensor t;
  for (int64_t d : shape) t.add_shape(d);
  t.set_dtype(v1::FLOAT32);
  t.set_raw(std::string(reinterpret_cast<const char*>(values.data()), values.size() * 4));
  return t;
}

std::vector<float> Iota(size_t n) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<float>(i % 7) - 3.0F;
  return v;
}

v1::ComputeRequest Request(const std::vector<int64_t>& a_shape,
                           const std::vector<int64_t>& b_shape) {
  auto count = [](const std::vector<int64_t>& s) {
    size_t n = 1;
    for (int64_t d : s) n *= static_cast<size_t>(d);
    return n;
  };
  v1::ComputeRequest r;
  *r.mutable_a() = RawTensor(a_shape, Iota(count(a_shape)));
  *r.mutable_b() = RawTensor(b_shape, Iota(count(b_shape)));
  return r;
}

absl::Status Convert(const v1::ComputeRequest& r, RequestKind kind = RequestKind::kStream,
                     const LimitsConfig& limits = LimitsConfig{}, RejectReason* reason = nullptr) {
  return ConvertRequest(r, kind, limits, reason).status();
}

void ExpectInvalid(const v1::ComputeRequest& r, const std::string& part1,
                   const std::string& part2 = "") {
  absl::Status s = Convert(r);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr(part1));
  EXPECT_THAT(std::string(s.message()), HasSubstr(part2));
}

TEST(ConvertRequest, ValidThreeDimensionalRequestGivesSizesAndViews) {
  v1::ComputeRequest r = Request({2, 3, 4}, {2, 5, 4});
  r.set_top_k(2);
  auto c = ConvertRequest(r, RequestKind::kStream, LimitsConfig{}, nullptr);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->spec.shape.batch, 2);
  EXPECT_EQ(c->spec.shape.n, 3);
  EXPECT_EQ(c->spec.shape.m, 5);
  EXPECT_EQ(c->spec.shape.d, 4);
  EXPECT_EQ(c->spec.a_bytes, 2 * 3 * 4 * 4);
  EXPECT_EQ(c->spec.b_bytes, 2 * 5 * 4 * 4);
  EXPECT_EQ(c->spec.output_cols, 2);
  EXPECT_EQ(c->spec.value_row_bytes, 8);
  EXPECT_EQ(c->spec.index_row_bytes, 8);
  EXPECT_EQ(c->spec.output_bytes, 2 * 3 * 16);
  EXPECT_EQ(c->spec.flops, 2 * 2 * 3 * 5 * 4);
  EXPECT_EQ(c->spec.OutputShape(), (std::vector<int64_t>{2, 3, 2}));
  EXPECT_FALSE(c->spec.two_d);
  // Zero copy: the view points into the request's bytes.
  EXPECT_EQ(static_cast<const void*>(c->a.data), static_cast<const void*>(r.a().raw().data()));
  EXPECT_EQ(static_cast<const void*>(c->b.data), static_cast<const void*>(r.b().raw().data()));
}

TEST(ConvertRequest, TwoDimensionalInputsAreBatchOne) {
  auto c = ConvertRequest(Request({3, 4}, {5, 4}), RequestKind::kUnary, LimitsConfig{}, nullptr);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->spec.shape.batch, 1);
  EXPECT_TRUE(c->spec.two_d);
  EXPECT_EQ(c->spec.OutputShape(), (std::vector<int64_t>{3, 5}));
}

TEST(ConvertRequest, ValuesAreViewedAsTheSameFloatsAsRaw) {
  v1::ComputeRequest raw = Request({2, 3}, {4, 3});
  v1::ComputeRequest values = raw;
  const std::vector<float> a = Iota(6);
  values.mutable_a()->clear_raw();
  values.mutable_a()->set_dtype(v1::BFLOAT16);  // ignored for values
  for (float x : a) values.mutable_a()->mutable_values()->add_values(x);
  auto c = ConvertRequest(values, RequestKind::kUnary, LimitsConfig{}, nullptr);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->spec.a_dtype, kernels::DataType::kFloat32);
  EXPECT_EQ(std::memcmp(c->a.data, raw.a().raw().data(), 24), 0);
}

TEST(ConvertRequest, TileRowsFollowChunkBytesWithinOneBatchEntry) {
  v1::ComputeRequest r = Request({2, 10, 4}, {2, 8, 4});  // row = 8 floats = 32 bytes
  r.set_max_chunk_bytes(100);
  auto c = ConvertRequest(r, RequestKind::kStream, LimitsConfig{}, nullptr);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->spec.tile_rows, 3);
  EXPECT_EQ(c->spec.TileCount(), 2 * 4);  // 3+3+3+1 per batch entry
  r.set_max_chunk_bytes(1);               // at least one row
  EXPECT_EQ(ConvertRequest(r, RequestKind::kStream, LimitsConfig{}, nullptr)->spec.tile_rows, 1);
  r.set_max_chunk_bytes(0);  // default 1 MiB: the whole batch entry
  EXPECT_EQ(ConvertRequest(r, RequestKind::kStream, LimitsConfig{}, nullptr)->spec.tile_rows, 10);
  LimitsConfig small;
  small.max_chunk_bytes = 64;
  r.set_max_chunk_bytes(4000);  // capped at 64 -> 2 rows
  EXPECT_EQ(ConvertRequest(r, RequestKind::kStream, small, nullptr)->spec.tile_rows, 2);
}

TEST(ConvertRequest, MissingOrEmptyTensorIsInvalid) {
  v1::ComputeRequest r = Request({2, 3}, {4, 3});
  r.clear_a();
  ExpectInvalid(r, "tensor a", "missing or empty");
  r = Request({2, 3}, {4, 3});
  r.mutable_b()->clear_shape();
  ExpectInvalid(r, "tensor b", "missing or empty");
  r = Request({2, 3}, {4, 3});
  r.mutable_b()->clear_raw();
  ExpectInvalid(r, "tensor b has no data");
}

TEST(ConvertRequest, WrongRankIsInvalid) {
  ExpectInvalid(Request({1, 2, 3, 4}, {1, 2, 3, 4}), "tensor a has rank 4");
  ExpectInvalid(Request({3, 4}, {12}), "tensor b has rank 1");
  ExpectInvalid(Request({1, 3, 4}, {5, 4}), "rank 3 but tensor b has rank 2");
}

TEST(ConvertRequest, ZeroOrNegativeDimensionIsInvalid) {
  v1::ComputeRequest r = Request({2, 3}, {4, 3});
  r.mutable_a()->set_shape(0, 0);
  ExpectInvalid(r, "tensor a has dimension 0 = 0", "must be positive");
  r = Request({2, 3}, {4, 3});
  r.mutable_b()->set_shape(1, -3);
  ExpectInvalid(r, "tensor b has dimension 1 = -3");
}

TEST(ConvertRequest, BatchOrDimMismatchIsInvalid) {
  ExpectInvalid(Request({2, 3, 4}, {3, 5, 4}), "batch mismatch", "batch 3");
  ExpectInvalid(Request({3, 4}, {5, 6}), "D mismatch", "dim 6");
}

TEST(ConvertRequest, ByteLengthMismatchIsInvalid) {
  v1::ComputeRequest r = Request({2, 3}, {4, 3});
  r.mutable_a()->mutable_raw()->pop_back();
  ExpectInvalid(r, "tensor a: raw has 23 bytes", "needs 24");
  r = Request({2, 3}, {4, 3});
  r.mutable_b()->set_dtype(v1::BFLOAT16);  // 48 bytes given, 24 needed
  ExpectInvalid(r, "tensor b: raw has 48 bytes", "needs 24");
  r = Request({2, 3}, {4, 3});
  r.mutable_a()->clear_raw();
  r.mutable_a()->mutable_values()->add_values(1.0F);
  ExpectInvalid(r, "tensor a: values has 1 elements", "needs 6");
}

TEST(ConvertRequest, UnsupportedEnumsAreInvalid) {
  v1::ComputeRequest r = Request({2, 3}, {4, 3});
  r.mutable_a()->set_dtype(static_cast<v1::DataType>(9));
  ExpectInvalid(r, "tensor a: unsupported dtype 9");
  r = Request({2, 3}, {4, 3});
  r.set_output_dtype(static_cast<v1::DataType>(5));
  ExpectInvalid(r, "output_dtype: unsupported dtype 5");
  r = Request({2, 3}, {4, 3});
  r.set_metric(static_cast<v1::Metric>(17));
  ExpectInvalid(r, "unsupported metric 17");
  r = Request({2, 3}, {4, 3});
  r.set_precision(static_cast<v1::Precision>(4));
  ExpectInvalid(r, "unsupported precision 4");
}

TEST(ConvertRequest, TopKAboveMIsInvalid) {
  v1::ComputeRequest r = Request({2, 3}, {4, 3});
  r.set_top_k(5);
  ExpectInvalid(r, "top_k = 5 exceeds M = 4");
  r.set_top_k(4);
  EXPECT_TRUE(Convert(r).ok());
}

TEST(ConvertRequest, BadEpsilonIsInvalid) {
  for (float eps :
       {-1.0F, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    v1::ComputeRequest r = Request({2, 3}, {4, 3});
    r.set_epsilon(eps);
    ExpectInvalid(r, "epsilon", "finite and >= 0");
  }
}

TEST(ConvertRequest, NonFiniteValuesAreLeftToTheIngestCheck) {
  // NaN/Inf are found while the pipeline copies the bytes (tile_pipeline_test, e2e tests);
  // validation itself never scans the payload.
  v1::ComputeRequest r = Request({2, 3}, {4, 3});
  std::vector<float> b = Iota(12);
  b[7] = std::numeric_limits<float>::infinity();
  *r.mutable_b() = RawTensor({4, 3}, b);
  EXPECT_TRUE(Convert(r).ok());
}

TEST(ConvertRequest, RawPayloadSizesReplaceTheRawFieldLengths) {
  v1::ComputeRequest r = Request({2, 3}, {4, 3});
  r.mutable_a()->set_raw("");
  r.mutable_b()->set_raw("");
  const RawPayloadSizes right{.a = 24, .b = 48};
  auto c = ConvertRequest(r, RequestKind::kUnary, LimitsConfig{}, nullptr, &right);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->a.data, nullptr);  // the caller holds the bytes
  const RawPayloadSizes wrong{.a = 24, .b = 44};
  absl::Status s = ConvertRequest(r, RequestKind::kUnary, LimitsConfig{}, nullptr, &wrong).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("tensor b: raw has 44 bytes"));
}

TEST(CheckFinite, Float32NonFiniteNamesTensorAndFirstIndex) {
  std::vector<float> b = Iota(12);
  b[7] = std::numeric_limits<float>::infinity();
  b[9] = std::numeric_limits<float>::quiet_NaN();
  absl::Status s = CheckFinite("b", reinterpret_cast<const std::byte*>(b.data()), 12,
                               kernels::DataType::kFloat32, 0);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "tensor b contains NaN or Inf at flat index 7");
}

TEST(CheckFinite, HalfPrecisionNonFiniteIsFoundWithOffset) {
  std::vector<uint16_t> bf(10, kernels::FloatToBf16(1.5F));
  EXPECT_TRUE(CheckFinite("a", reinterpret_cast<const std::byte*>(bf.data()), 10,
                          kernels::DataType::kBFloat16, 0)
                  .ok());
  bf[6] = kernels::FloatToBf16(std::numeric_limits<float>::quiet_NaN());
  absl::Status s = CheckFinite("a", reinterpret_cast<const std::byte*>(bf.data()), 10,
                               kernels::DataType::kBFloat16, 100);
  EXPECT_THAT(std::string(s.message()), HasSubstr("flat index 106"));
  std::vector<uint16_t> half(4, kernels::FloatToF16(2.0F));
  half[3] = kernels::FloatToF16(1e6F);  // overflows to +inf
  s = CheckFinite("b", reinterpret_cast<const std::byte*>(half.data()), 4,
                  kernels::DataType::kFloat16, 0);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("tensor b contains NaN or Inf at flat index 3"));
}

TEST(CheckFinite, LargeTensorsAreScannedInPartsAndReportTheFirstIndex) {
  // Above kernels::kParallelFiniteScanBytes the scan runs on `threads` OpenMP threads, one
  // part each: the index must still be the first one, wherever the parts split.
  constexpr int kThreads = 3;
  const int64_t count = 2 * kernels::kParallelFiniteScanBytes / 4 + 3;
  std::vector<float> x(static_cast<size_t>(count), 0.5F);
  const auto* data = reinterpret_cast<const std::byte*>(x.data());
  EXPECT_TRUE(CheckFinite("a", data, count, kernels::DataType::kFloat32, 0, kThreads).ok());
  for (const int64_t at : {count - 1, 2 * count / 3, count / 3 + 1, count / 3 - 1, int64_t{0}}) {
    x[static_cast<size_t>(at)] = std::numeric_limits<float>::quiet_NaN();
    absl::Status s = CheckFinite("a", data, count, kernels::DataType::kFloat32, 0, kThreads);
    EXPECT_EQ(s.message(), absl::StrCat("tensor a contains NaN or Inf at flat index ", at));
  }
  std::vector<uint16_t> half(static_cast<size_t>(count), kernels::FloatToF16(1.0F));
  const auto* half_data = reinterpret_cast<const std::byte*>(half.data());
  EXPECT_TRUE(CheckFinite("b", half_data, count, kernels::DataType::kFloat16, 0, kThreads).ok());
  half[static_cast<size_t>(count - 2)] = kernels::FloatToF16(1e6F);
  EXPECT_THAT(
      std::string(
          CheckFinite("b", half_data, count, kernels::DataType::kFloat16, 0, kThreads).message()),
      HasSubstr(absl::StrCat("flat index ", count - 2)));
}

TEST(ConvertRequest, ShapeProductOverflowIsResourceExhausted) {
  v1::ComputeRequest r;
  for (int64_t d : {int64_t{1} << 40, int64_t{1} << 40, int64_t{4}}) r.mutable_a()->add_shape(d);
  for (int64_t d : {int64_t{1} << 40, int64_t{2}, int64_t{4}}) r.mutable_b()->add_shape(d);
  RejectReason reason = RejectReason::kQueueFull;
  absl::Status s = Convert(r, RequestKind::kStream, LimitsConfig{}, &reason);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("more than 2^63 elements"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("max_input_elements"));
  EXPECT_EQ(reason, RejectReason::kTooManyElements);
}

TEST(ConvertRequest, LimitsGiveResourceExhaustedStatingTheLimit) {
  const v1::ComputeRequest r = Request({2, 30, 4}, {2, 50, 4});
  LimitsConfig limits;
  RejectReason reason = RejectReason::kQueueFull;
  limits.max_input_elements = 239;
  absl::Status s = Convert(r, RequestKind::kStream, limits, &reason);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.message()), HasSubstr("max_input_elements = 239"));
  EXPECT_EQ(reason, RejectReason::kTooManyElements);

  limits = LimitsConfig{};
  limits.max_flops = 1000;
  s = Convert(r, RequestKind::kStream, limits, &reason);
  EXPECT_THAT(std::string(s.message()), HasSubstr("24000 flops"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("max_flops = 1000"));
  EXPECT_EQ(reason, RejectReason::kTooManyFlops);

  limits = LimitsConfig{};
  limits.max_output_bytes = 1000;
  s = Convert(r, RequestKind::kStream, limits, &reason);
  EXPECT_THAT(std::string(s.message()), HasSubstr("max_output_bytes = 1000"));
  EXPECT_EQ(reason, RejectReason::kOutputTooLarge);

  limits = LimitsConfig{};
  limits.max_send_message_bytes = 8192;  // result is 12000 bytes; a row + framing fits
  s = Convert(r, RequestKind::kUnary, limits, &reason);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.message()), HasSubstr("use ComputeStream"));
  EXPECT_TRUE(Convert(r, RequestKind::kStream, limits).ok());
}

TEST(ConvertRequest, UploadHeaderMustNotCarryData) {
  v1::ComputeRequest r = Request({2, 3}, {4, 3});
  auto bad = ProblemFromUploadHeader(r, LimitsConfig{}, nullptr);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("tensor a carries data"));
  r.mutable_a()->clear_raw();
  r.mutable_b()->clear_raw();
  r.mutable_b()->set_dtype(v1::FLOAT16);
  auto spec = ProblemFromUploadHeader(r, LimitsConfig{}, nullptr);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->a_bytes, 24);
  EXPECT_EQ(spec->b_bytes, 24);  // 12 float16 elements
  EXPECT_EQ(spec->b_dtype, kernels::DataType::kFloat16);
}

TEST(GallerySpecFromHeader, ChecksDtypesAndDerivesTheSizes) {
  v1::GalleryHeader header;
  header.set_name("g");
  header.add_shape(3);
  header.add_shape(5);
  header.set_dtype(v1::FLOAT16);
  auto spec = GallerySpecFromHeader(header);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->input_bytes, 3 * 5 * 2);
  EXPECT_EQ(spec->dims.m, 3);
  EXPECT_EQ(spec->storage_dtype, kernels::DataType::kFloat32);
  header.set_storage_dtype(static_cast<v1::DataType>(9));
  EXPECT_THAT(GallerySpecFromHeader(header).status().message(), HasSubstr("storage_dtype: "));
  header.set_storage_dtype(v1::FLOAT32);
  header.set_dtype(static_cast<v1::DataType>(-1));
  EXPECT_THAT(GallerySpecFromHeader(header).status().message(), HasSubstr("dtype: "));
  header.set_dtype(v1::FLOAT32);
  header.set_name("bad name");
  EXPECT_EQ(GallerySpecFromHeader(header).status().code(), absl::StatusCode::kInvalidArgument);
  // batch * M overflows int64 before D is applied (found by fuzz/gallery_fuzzer: UB).
  header.set_name("g");
  header.clear_shape();
  for (int64_t dim : {int64_t{1} << 51, int64_t{29527900159}, int64_t{1}}) header.add_shape(dim);
  EXPECT_THAT(GallerySpecFromHeader(header).status().message(), HasSubstr("too large"));
}

TEST(ProblemSpec, InflightBytesCountsInputsAndBufferedResult) {
  auto c =
      ConvertRequest(Request({2, 10, 4}, {2, 8, 4}), RequestKind::kStream, LimitsConfig{}, nullptr);
  ASSERT_TRUE(c.ok());
  const int64_t inputs = c->spec.a_bytes + c->spec.b_bytes;
  // Unary and stream hold the received message and the kernel's copy of the inputs.
  EXPECT_EQ(c->spec.InflightBytes(RequestKind::kUnary, 3), 2 * inputs + int64_t{2} * 10 * 32);
  // One tile = the whole batch entry (320 bytes); window 1 buffers one tile.
  EXPECT_EQ(c->spec.InflightBytes(RequestKind::kStream, 1), 2 * inputs + 320);
  EXPECT_EQ(c->spec.InflightBytes(RequestKind::kUpload, 1), inputs + 320);
}

}  // namespace
}  // namespace simserve
