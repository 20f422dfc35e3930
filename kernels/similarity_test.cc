// Kernel tests against an independent double-precision reference: every metric, output dtype,
// precision and input dtype over many shapes, tile splits, and the edge cases (zero rows, tiny
// vectors, identical / orthogonal rows, top-k ties, k = M), plus the "never ref:any" check.
#include "kernels/similarity.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/dtype.h"
#include "kernels/gallery.h"

namespace simserve::kernels {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

SimilarityEngine& TestEngine() {
  static auto engine = SimilarityEngine::Create({.threads_per_call = 2});
  return **engine;
}

struct Problem {
  Shape shape;
  std::vector<float> a;  // [batch, n, d]
  std::vector<float> b;  // [batch, m, d]
};

Problem RandomProblem(const Shape& shape, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0F, 1.0F);
  Problem p{shape, std::vector<float>(shape.batch * shape.n * shape.d),
            std::vector<float>(shape.batch * shape.m * shape.d)};
  for (float& v : p.a) v = dist(gen);
  for (float& v : p.b) v = dist(gen);
  return p;
}

// The reference: a plain double-precision loop, written from the definitions.
double ReferenceValue(const float* a, const float* b, int64_t d, const Options& options) {
  double dot = 0;
  double a_sq = 0;
  double b_sq = 0;
  for (int64_t c = 0; c < d; ++c) {
    dot += static_cast<double>(a[c]) * b[c];
    a_sq += static_cast<double>(a[c]) * a[c];
    b_sq += static_cast<double>(b[c]) * b[c];
  }
  switch (options.metric) {
    case Metric::kDot:
      return dot;
    case Metric::kCosine: {
      if (options.epsilon > 0) {
        return dot / std::sqrt(std::max(a_sq, double{options.epsilon})) /
               std::sqrt(std::max(b_sq, double{options.epsilon}));
      }
      const double norms = std::sqrt(a_sq) * std::sqrt(b_sq);
      return norms > 0 ? dot / norms : 0.0;
    }
    case Metric::kEuclidean:
    case Metric::kSquaredEuclidean: {
      double sq = 0;
      for (int64_t c = 0; c < d; ++c) {
        const double diff = static_cast<double>(a[c]) - b[c];
        sq += diff * diff;
      }
      return options.metric == Metric::kEuclidean ? std::sqrt(sq) : sq;
    }
  }
  return 0;
}

// Allowed absolute error for one entry: relative to the magnitudes the metric combines.
double Tolerance(const float* a, const float* b, int64_t d, const Options& options) {
  double a_sq = 0;
  double b_sq = 0;
  for (int64_t c = 0; c < d; ++c) {
    a_sq += static_cast<double>(a[c]) * a[c];
    b_sq += static_cast<double>(b[c]) * b[c];
  }
  // Matmul rounding: bf16 operands keep 8 bits; fp32 accumulation of d terms.
  const double operand_rel = options.precision == Precision::kBf16 ? 1.0 / 128 : 2e-6;
  double output_rel = 0;
  if (options.output_dtype == DataType::kBFloat16) output_rel = 1.0 / 128;
  if (options.output_dtype == DataType::kFloat16) output_rel = 1.0 / 1024;
  const double ref = std::abs(ReferenceValue(a, b, d, options));
  switch (options.metric) {
    case Metric::kCosine:
      return operand_rel * 2 + output_rel * ref + 1e-6;
    case Metric::kDot:
      return operand_rel * 2 * std::sqrt(a_sq * b_sq) + output_rel * ref + 1e-6;
    case Metric::kSquaredEuclidean:
      return operand_rel * 4 * (a_sq + b_sq) + output_rel * ref + 1e-6;
    case Metric::kEuclidean:
      // Error of the square root near 0 grows as sqrt(error of the square).
      return std::sqrt(operand_rel * 4 * (a_sq + b_sq)) + output_rel * ref + 1e-6;
  }
  return 0;
}

float OutputValue(const std::vector<std::byte>& values, DataType dtype, int64_t index) {
  if (dtype == DataType::kFloat32) {
    float v;
    std::memcpy(&v, values.data() + index * 4, 4);
    return v;
  }
  uint16_t bits;
  std::memcpy(&bits, values.data() + index * 2, 2);
  return dtype == DataType::kBFloat16 ? Bf16ToFloat(bits) : F16ToFloat(bits);
}

struct Result {
  std::vector<std::byte> values;
  std::vector<int32_t> indices;
};

// Runs a prepared job over all of p's A.
Result Run(absl::StatusOr<std::unique_ptr<SimilarityJob>> job, const Problem& p,
           const Options& options, int64_t tile_rows) {
  EXPECT_TRUE(job.ok()) << job.status();
  if (!job.ok()) return {};
  const ConstTensorView a{reinterpret_cast<const std::byte*>(p.a.data()), DataType::kFloat32};
  const int64_t rows = p.shape.batch * p.shape.n;
  Result r{std::vector<std::byte>((*job)->ValueBytes(rows)),
           std::vector<int32_t>(rows * options.top_k)};
  const absl::Status status = ComputeAll(**job, a, tile_rows, r.values, r.indices);
  EXPECT_TRUE(status.ok()) << status;
  return r;
}

Result Compute(const Problem& p, const Options& options, int64_t tile_rows = 0) {
  const ConstTensorView b{reinterpret_cast<const std::byte*>(p.b.data()), DataType::kFloat32};
  return Run(TestEngine().Prepare(p.shape, options, b), p, options, tile_rows);
}

// Compares a dense result entry by entry with the reference.
void ExpectDenseMatchesReference(const Problem& p, const Options& options, const Result& r) {
  const Shape& s = p.shape;
  int failures = 0;
  for (int64_t k = 0; k < s.batch; ++k) {
    for (int64_t i = 0; i < s.n; ++i) {
      const float* a_row = p.a.data() + (k * s.n + i) * s.d;
      for (int64_t j = 0; j < s.m; ++j) {
        const float* b_row = p.b.data() + (k * s.m + j) * s.d;
        const double want = ReferenceValue(a_row, b_row, s.d, options);
        const double got = OutputValue(r.values, options.output_dtype, (k * s.n + i) * s.m + j);
        const double tol = Tolerance(a_row, b_row, s.d, options);
        if (!(std::abs(got - want) <= tol) && ++failures <= 5) {
          ADD_FAILURE() << "S[" << k << "][" << i << "][" << j << "] = " << got << ", reference "
                        << want << ", tolerance " << tol;
        }
      }
    }
  }
  EXPECT_EQ(failures, 0);
}

using DenseParam = std::tuple<Shape, Metric, DataType, Precision>;

class DenseTest : public ::testing::TestWithParam<DenseParam> {};

TEST_P(DenseTest, MatchesDoublePrecisionReference) {
  const auto& [shape, metric, output_dtype, precision] = GetParam();
  const Problem p = RandomProblem(shape, 42);
  const Options options{.metric = metric, .output_dtype = output_dtype, .precision = precision};
  ExpectDenseMatchesReference(p, options, Compute(p, options));
}

std::string ShapeName(const Shape& s) {
  return absl::StrCat("b", s.batch, "n", s.n, "m", s.m, "d", s.d);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, DenseTest,
    ::testing::Combine(::testing::Values(Shape{1, 1, 1, 1}, Shape{1, 1, 7, 3}, Shape{2, 5, 1, 17},
                                         Shape{3, 9, 13, 33}, Shape{64, 3, 4, 8},
                                         Shape{1, 4, 6, 4096}, Shape{2, 37, 50, 200}),
                       ::testing::Values(Metric::kCosine, Metric::kDot, Metric::kEuclidean,
                                         Metric::kSquaredEuclidean),
                       ::testing::Values(DataType::kFloat32, DataType::kBFloat16,
                                         DataType::kFloat16),
                       ::testing::Values(Precision::kFp32, Precision::kBf16)),
    [](const ::testing::TestParamInfo<DenseParam>& info) {
      return absl::StrCat(ShapeName(std::get<0>(info.param)), "_", Name(std::get<1>(info.param)),
                          "_", Name(std::get<2>(info.param)), "_", Name(std::get<3>(info.param)));
    });

TEST(Kernel, UnevenTilesReassembleToTheWholeResult) {
  const Problem p = RandomProblem({3, 23, 19, 40}, 7);
  for (const Metric metric : {Metric::kCosine, Metric::kEuclidean}) {
    const Options options{.metric = metric};
    const Result whole = Compute(p, options, 0);
    ExpectDenseMatchesReference(p, options, whole);
    for (const int64_t tile_rows : {1, 4, 7, 22}) {
      const Result tiled = Compute(p, options, tile_rows);
      ExpectDenseMatchesReference(p, options, tiled);
      for (int64_t i = 0; i < int64_t{3} * 23 * 19; ++i) {
        ASSERT_NEAR(OutputValue(tiled.values, DataType::kFloat32, i),
                    OutputValue(whole.values, DataType::kFloat32, i), 1e-6)
            << "tile_rows " << tile_rows << " entry " << i;
      }
    }
  }
}

// oneDNN's default build must not run one primitive on two threads at once; the engine
// caches primitives per thread. Two threads computing the same tile shape with different
// inputs must each get exactly their own single-threaded result.
TEST(Kernel, ConcurrentJobsOfTheSameShapeGetTheirOwnResults) {
  const Problem p0 = RandomProblem({1, 8, 64, 32}, 5);
  const Problem p1 = RandomProblem({1, 8, 64, 32}, 6);
  const Result want0 = Compute(p0, {});
  const Result want1 = Compute(p1, {});
  std::atomic<int> mismatches{0};
  auto run = [&](const Problem& p, const Result& want) {
    const ConstTensorView a{reinterpret_cast<const std::byte*>(p.a.data()), DataType::kFloat32};
    const ConstTensorView b{reinterpret_cast<const std::byte*>(p.b.data()), DataType::kFloat32};
    auto job = TestEngine().Prepare(p.shape, {}, b);
    ASSERT_TRUE(job.ok()) << job.status();
    std::vector<std::byte> got(want.values.size());
    for (int i = 0; i < 300; ++i) {
      ASSERT_TRUE(ComputeAll(**job, a, 0, got, {}).ok());
      if (got != want.values) ++mismatches;
    }
  };
  std::thread t0(run, std::cref(p0), std::cref(want0));
  std::thread t1(run, std::cref(p1), std::cref(want1));
  t0.join();
  t1.join();
  EXPECT_EQ(mismatches.load(), 0);
}

TEST(Kernel, CosineOfZeroRowIsZeroNotNan) {
  Problem p = RandomProblem({2, 3, 4, 5}, 3);
  std::fill_n(p.a.begin() + 5, 5, 0.0F);   // A[0][1] = 0
  std::fill_n(p.b.begin() + 20, 5, 0.0F);  // B[1][0] = 0
  const Result r = Compute(p, {});
  for (int64_t j = 0; j < 4; ++j) EXPECT_EQ(OutputValue(r.values, DataType::kFloat32, 4 + j), 0.0F);
  for (int64_t i = 0; i < 3; ++i) {
    EXPECT_EQ(OutputValue(r.values, DataType::kFloat32, 12 + i * 4), 0.0F);
  }
  for (int64_t i = 0; i < 24; ++i) {
    EXPECT_FALSE(std::isnan(OutputValue(r.values, DataType::kFloat32, i)));
  }
}

TEST(Kernel, TinyAndHugeVectorsAreNotDistorted) {
  const Problem unit = RandomProblem({1, 4, 5, 64}, 11);
  const Result expected = Compute(unit, {});
  for (const float scale : {1e-30F, 1e-41F /* subnormal */, 1e30F}) {
    Problem scaled = unit;
    for (float& v : scaled.a) v *= scale;
    for (float& v : scaled.b) v *= scale;
    const Result got = Compute(scaled, {});
    // Against the double-precision reference on the scaled inputs themselves...
    ExpectDenseMatchesReference(scaled, {}, got);
    // ...and scale invariance: the same similarities as the unscaled problem.
    for (int64_t i = 0; i < 20; ++i) {
      // Subnormal inputs themselves carry fewer bits; allow for that rounding only.
      EXPECT_NEAR(OutputValue(got.values, DataType::kFloat32, i),
                  OutputValue(expected.values, DataType::kFloat32, i), scale < 1e-38F ? 1e-3 : 1e-6)
          << "scale " << scale << " entry " << i;
    }
  }
}

TEST(Kernel, IdenticalRowsGiveOneAndOrthogonalRowsGiveZero) {
  Problem p{{1, 2, 2, 3}, {1, 2, 3, 0, 0, 5}, {2, 4, 6, -5, 0, 0}};
  const Result r = Compute(p, {});
  EXPECT_NEAR(OutputValue(r.values, DataType::kFloat32, 0), 1.0, 1e-6);  // parallel
  EXPECT_NEAR(OutputValue(r.values, DataType::kFloat32, 3), 0.0, 1e-7);  // orthogonal
  const Result dist = Compute(p, {.metric = Metric::kEuclidean});
  // |(1,2,3) - (-5,0,0)| = |(6,2,3)| = 7
  EXPECT_NEAR(OutputValue(dist.values, DataType::kFloat32, 1), 7.0, 1e-5);
  Problem same{{1, 1, 1, 4}, {0.5F, -2, 3, 1}, {0.5F, -2, 3, 1}};
  EXPECT_NEAR(OutputValue(Compute(same, {.metric = Metric::kSquaredEuclidean}).values,
                          DataType::kFloat32, 0),
              0.0, 1e-5);
}

TEST(Kernel, EpsilonReproducesTheKerasClamp) {
  Problem p = RandomProblem({2, 6, 7, 9}, 5);
  for (int64_t c = 0; c < 9; ++c) p.a[c] *= 1e-3F;  // sum_sq well below epsilon
  const Options options{.epsilon = 1e-3F};
  ExpectDenseMatchesReference(p, options, Compute(p, options));
  const double clamped = OutputValue(Compute(p, options).values, DataType::kFloat32, 0);
  const double plain = OutputValue(Compute(p, {}).values, DataType::kFloat32, 0);
  EXPECT_GT(std::abs(plain), std::abs(clamped) * 5) << "the clamp must shrink tiny rows";
}

TEST(Kernel, AcceptsBf16AndFp16Inputs) {
  Problem p = RandomProblem({2, 5, 6, 24}, 9);
  // Round the float inputs to what the 16-bit types can hold, then compare with those values.
  for (const DataType dtype : {DataType::kBFloat16, DataType::kFloat16}) {
    std::vector<uint16_t> a16(p.a.size()), b16(p.b.size());
    Problem rounded = p;
    for (size_t i = 0; i < p.a.size(); ++i) {
      a16[i] = dtype == DataType::kBFloat16 ? FloatToBf16(p.a[i]) : FloatToF16(p.a[i]);
      rounded.a[i] = dtype == DataType::kBFloat16 ? Bf16ToFloat(a16[i]) : F16ToFloat(a16[i]);
    }
    for (size_t i = 0; i < p.b.size(); ++i) {
      b16[i] = dtype == DataType::kBFloat16 ? FloatToBf16(p.b[i]) : FloatToF16(p.b[i]);
      rounded.b[i] = dtype == DataType::kBFloat16 ? Bf16ToFloat(b16[i]) : F16ToFloat(b16[i]);
    }
    for (const Metric metric : {Metric::kCosine, Metric::kDot, Metric::kEuclidean}) {
      const Options options{.metric = metric};
      auto job = TestEngine().Prepare(p.shape, options,
                                      {reinterpret_cast<const std::byte*>(b16.data()), dtype});
      ASSERT_TRUE(job.ok());
      Result r{std::vector<std::byte>((*job)->ValueBytes(10)), {}};
      ASSERT_TRUE(ComputeAll(**job, {reinterpret_cast<const std::byte*>(a16.data()), dtype}, 2,
                             r.values, r.indices)
                      .ok());
      ExpectDenseMatchesReference(rounded, options, r);
    }
  }
}

// Reference top-k: a stable sort of the reference values.
void ExpectTopKMatchesReference(const Problem& p, const Options& options, const Result& r) {
  const Shape& s = p.shape;
  const bool largest = options.metric == Metric::kCosine || options.metric == Metric::kDot;
  for (int64_t k = 0; k < s.batch; ++k) {
    for (int64_t i = 0; i < s.n; ++i) {
      const float* a_row = p.a.data() + (k * s.n + i) * s.d;
      std::vector<double> ref(s.m);
      for (int64_t j = 0; j < s.m; ++j) {
        ref[j] = ReferenceValue(a_row, p.b.data() + (k * s.m + j) * s.d, s.d, options);
      }
      std::vector<int32_t> order(s.m);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int32_t x, int32_t y) {
        return largest ? ref[x] > ref[y] : ref[x] < ref[y];
      });
      std::vector<bool> seen(s.m, false);
      for (int64_t t = 0; t < options.top_k; ++t) {
        const int64_t out = (k * s.n + i) * options.top_k + t;
        const double tol = 1e-5 + 1e-6 * std::abs(ref[order[t]]);
        const int32_t got = r.indices[out];
        ASSERT_TRUE(got >= 0 && got < s.m && !seen[got])
            << "index " << got << " invalid or repeated";
        seen[got] = true;
        // The same column as the reference's stable sort, unless the two values tie within
        // float32 rounding (then either order is a correct answer).
        if (got != order[t]) {
          ASSERT_NEAR(ref[got], ref[order[t]], tol)
              << "batch " << k << " row " << i << " rank " << t << ": got column " << got
              << ", reference " << order[t];
        }
        ASSERT_NEAR(OutputValue(r.values, options.output_dtype, out), ref[order[t]], tol);
      }
    }
  }
}

TEST(Kernel, TopKMatchesStableSortOfReference) {
  const Problem p = RandomProblem({3, 7, 40, 16}, 13);
  for (const Metric metric :
       {Metric::kCosine, Metric::kDot, Metric::kEuclidean, Metric::kSquaredEuclidean}) {
    for (const int64_t k : {1, 5, 40}) {  // 40 = M: the whole row sorted
      const Options options{.metric = metric, .top_k = k};
      ExpectTopKMatchesReference(p, options, Compute(p, options, 3));
    }
  }
}

TEST(Kernel, LargeTopKUsesTheSortPathAndMatchesTheReference) {
  const Problem p = RandomProblem({2, 3, 100, 8}, 19);
  for (const int64_t k : {65, 100}) {  // above the scan path's limit of 64
    for (const Metric metric : {Metric::kDot, Metric::kEuclidean}) {
      const Options options{.metric = metric, .top_k = k};
      ExpectTopKMatchesReference(p, options, Compute(p, options));
    }
  }
}

TEST(Kernel, TopKTiesGoToTheLowerIndex) {
  // Every B row is the same vector: all similarities tie, so indices must be 0, 1, 2, ...
  Problem p = RandomProblem({1, 2, 6, 4}, 17);
  for (int64_t j = 1; j < 6; ++j) std::copy_n(p.b.begin(), 4, p.b.begin() + j * 4);
  const Options options{.top_k = 4};
  const Result r = Compute(p, options);
  EXPECT_THAT(std::vector<int32_t>(r.indices.begin(), r.indices.begin() + 4),
              ::testing::ElementsAre(0, 1, 2, 3));
  ExpectTopKMatchesReference(p, options, r);
}

TEST(Kernel, NeverSelectsAReferenceMatmulForTheShapesThatMatter) {
  const Shape shapes[] = {{100, 400, 500, 200}, {1, 32, 1024, 768}, {1, 1, 10000, 384},
                          {1, 8, 256, 128},     {1, 64, 4096, 256}, {4, 3, 5, 17}};
  for (const Shape& shape : shapes) {
    for (const Precision precision : {Precision::kFp32, Precision::kBf16}) {
      for (const int64_t rows : {int64_t{1}, std::min<int64_t>(shape.n, 7), shape.n}) {
        auto impl = TestEngine().MatmulImplementation(shape, {.precision = precision}, rows);
        ASSERT_TRUE(impl.ok()) << impl.status();
        // The rule is "never a reference implementation"; which optimised one oneDNN picks
        // depends on the CPU (brg:* with AVX-512, gemm:jit on AVX2-only CPUs).
        EXPECT_THAT(*impl, Not(HasSubstr("ref"))) << ShapeName(shape) << " rows " << rows;
      }
    }
  }
}

TEST(Dtype, ConvertsToAndFromIeeeHalfAndBfloat16ExactlyAsSpecified) {
  // Expected bit patterns from the IEEE 754 binary16 and bfloat16 definitions.
  const std::pair<float, uint16_t> halves[] = {
      {1.0F, 0x3c00},
      {-2.0F, 0xc000},
      {65504.0F, 0x7bff},
      {65519.0F, 0x7bff},
      {65520.0F, 0x7c00},
      {0.1F, 0x2e66},
      {1.0F / 3, 0x3555},
      {5.9604645e-8F, 0x0001},
      {6.1035156e-5F, 0x0400} /* smallest normal */,
      {0.0F, 0x0000},
      {-0.0F, 0x8000},
      {2.9802322e-8F, 0x0000} /* half of the smallest subnormal: ties to even */,
      {8.940697e-8F, 0x0002} /* 1.5 units: ties to even */,
      {1e9F, 0x7c00}};
  for (const auto& [value, bits] : halves) {
    EXPECT_EQ(FloatToF16(value), bits) << value;
  }
  for (const uint16_t bits : {0x3c00, 0xc000, 0x7bff, 0x0001, 0x03ff, 0x0400, 0x3555, 0x7c00}) {
    EXPECT_EQ(FloatToF16(F16ToFloat(bits)), bits) << "round trip of " << bits;
  }
  EXPECT_EQ(F16ToFloat(0x0001), 5.9604644775390625e-8F);
  EXPECT_TRUE(std::isnan(F16ToFloat(FloatToF16(NAN))));
  EXPECT_EQ(FloatToBf16(1.0F), 0x3f80);
  EXPECT_EQ(FloatToBf16(1.00390625F), 0x3f80) << "tie (1 + 2^-8) rounds to even";
  EXPECT_EQ(FloatToBf16(1.01171875F), 0x3f82) << "tie (1 + 3*2^-8) rounds to even";
  EXPECT_EQ(Bf16ToFloat(0xc0a0), -5.0F);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(NAN))));
}

TEST(Kernel, RejectsBadProblems) {
  EXPECT_EQ(ValidateProblem({1, 0, 2, 3}, {}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(ValidateProblem({1, 2, 2, -3}, {}).message()), HasSubstr("D"));
  EXPECT_THAT(std::string(ValidateProblem({1, 2, 3, 4}, {.top_k = 4}).message()),
              HasSubstr("top_k"));
  EXPECT_EQ(ValidateProblem({1, 2, 3, 4}, {.epsilon = -1}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateProblem({1, 2, 3, 4}, {.epsilon = NAN}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(ValidateProblem({1, 2, 3, 4}, {.top_k = 3}).ok());
  EXPECT_EQ(MatmulFlops({1, 2, 3, 4}), 48);
  EXPECT_EQ(MatmulFlops({int64_t{1} << 40, int64_t{1} << 20, 4, 4}), -1);
}

TEST(Kernel, RejectsWronglySizedTileBuffers) {
  const Problem p = RandomProblem({1, 4, 3, 2}, 1);
  auto job = TestEngine().Prepare(p.shape, {}, {reinterpret_cast<const std::byte*>(p.b.data())});
  ASSERT_TRUE(job.ok());
  std::vector<std::byte> small(size_t{4} * 3 * 4 - 1);
  const ConstTensorView a{reinterpret_cast<const std::byte*>(p.a.data())};
  EXPECT_EQ((*job)->ComputeTile(0, 0, 4, a, small, {}).code(), absl::StatusCode::kInvalidArgument);
  std::vector<std::byte> right(size_t{4} * 3 * 4);
  EXPECT_EQ((*job)->ComputeTile(0, 2, 4, a, right, {}).code(), absl::StatusCode::kInvalidArgument)
      << "rows past N";
  EXPECT_EQ((*job)->ComputeTile(1, 0, 4, a, right, {}).code(), absl::StatusCode::kInvalidArgument)
      << "batch past the end";
  EXPECT_TRUE((*job)->ComputeTile(0, 0, 4, a, right, {}).ok());
}

// ---- Galleries: B prepared once (kernels/gallery.h) ----

// A gallery of p.b's rows: entry 0 only when `shared` (a 2D gallery used for every batch
// entry; p.b must then repeat it), else one entry per batch entry.
std::unique_ptr<PreparedGallery> MakeGallery(const Problem& p, bool shared, DataType storage) {
  const Shape& s = p.shape;
  const GalleryShape shape{shared ? 1 : s.batch, s.m, s.d};
  auto builder = GalleryBuilder::Create(shape, DataType::kFloat32, storage);
  EXPECT_TRUE(builder.ok()) << builder.status();
  std::memcpy((*builder)->input().data(), p.b.data(), shape.rows() * s.d * 4);
  auto gallery = (*builder)->Build();
  EXPECT_TRUE(gallery.ok()) << gallery.status();
  return *std::move(gallery);
}

Result ComputeWithGallery(const Problem& p, const PreparedGallery& gallery, const Options& options,
                          int64_t tile_rows = 0) {
  return Run(TestEngine().Prepare(p.shape, options, gallery), p, options, tile_rows);
}

// Problem whose B is one [m, d] block repeated over the batch (for 2D galleries).
Problem SharedGalleryProblem(const Shape& shape, uint32_t seed) {
  Problem p = RandomProblem(shape, seed);
  for (int64_t k = 1; k < shape.batch; ++k) {
    std::copy_n(p.b.begin(), shape.m * shape.d, p.b.begin() + k * shape.m * shape.d);
  }
  return p;
}

// Half-precision storage rounds the unit rows to 8 (bf16) or 11 (f16) bits: the tolerance of
// bf16 operands covers both.
Options ToleranceOptions(Options options, DataType storage) {
  if (storage != DataType::kFloat32) options.precision = Precision::kBf16;
  return options;
}

using GalleryParam = std::tuple<Shape, bool, Metric, DataType>;
class GalleryDenseTest : public ::testing::TestWithParam<GalleryParam> {};

TEST_P(GalleryDenseTest, MatchesDoublePrecisionReference) {
  const auto& [shape, shared, metric, storage] = GetParam();
  const Problem p = shared ? SharedGalleryProblem(shape, 21) : RandomProblem(shape, 21);
  const auto gallery = MakeGallery(p, shared, storage);
  for (const float epsilon : {0.0F, 4.0F}) {
    if (epsilon > 0 && metric != Metric::kCosine) continue;
    for (const Precision precision : {Precision::kFp32, Precision::kBf16}) {
      // The big shape once (fp32): its reference loop dominates the test's time.
      if (precision == Precision::kBf16 && shape.n * shape.m > 1'000'000) continue;
      const Options options{.metric = metric, .precision = precision, .epsilon = epsilon};
      for (const int64_t tile_rows : {5, 0}) {  // scan tiles; whole entries (matmul for n > 8)
        const Result r = ComputeWithGallery(p, *gallery, options, tile_rows);
        ExpectDenseMatchesReference(p, ToleranceOptions(options, storage), r);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, GalleryDenseTest,
    ::testing::Combine(
        // n = 3: the scan path; n = 37 and 300: the matmul path, one and two row blocks;
        // m = 5000 with d = 64: several column blocks on both paths.
        ::testing::Values(Shape{1, 3, 7, 5}, Shape{3, 3, 5000, 64}, Shape{2, 37, 50, 33},
                          Shape{1, 300, 5000, 64}),
        ::testing::Bool(),
        ::testing::Values(Metric::kCosine, Metric::kDot, Metric::kEuclidean,
                          Metric::kSquaredEuclidean),
        ::testing::Values(DataType::kFloat32, DataType::kBFloat16, DataType::kFloat16)),
    [](const ::testing::TestParamInfo<GalleryParam>& info) {
      return absl::StrCat(ShapeName(std::get<0>(info.param)),
                          std::get<1>(info.param) ? "_shared_" : "_perbatch_",
                          Name(std::get<2>(info.param)), "_", Name(std::get<3>(info.param)));
    });

TEST(Gallery, TopKOverColumnBlocksMatchesStableSortOfReference) {
  for (const int64_t n : {2, 40}) {  // the scan and the matmul path (whole entries per tile)
    const Problem p = RandomProblem({2, n, 5000, 64}, 23);
    const auto gallery = MakeGallery(p, false, DataType::kFloat32);
    for (const Metric metric :
         {Metric::kCosine, Metric::kDot, Metric::kEuclidean, Metric::kSquaredEuclidean}) {
      for (const int64_t k : {1, 10, 100}) {  // 100: past the buffer of one cut
        const Options options{.metric = metric, .top_k = k};
        ExpectTopKMatchesReference(p, options, ComputeWithGallery(p, *gallery, options, 0));
      }
    }
  }
}

TEST(Gallery, TopKTiesAcrossColumnBlocksGoToTheLowerIndex) {
  Problem p = RandomProblem({1, 3, 9000, 16}, 29);
  for (int64_t j = 1; j < 9000; ++j) std::copy_n(p.b.begin(), 16, p.b.begin() + j * 16);
  const auto gallery = MakeGallery(p, false, DataType::kFloat32);
  for (const int64_t k : {3, 300}) {
    const Result r = ComputeWithGallery(p, *gallery, {.top_k = k});
    for (int64_t i = 0; i < 3; ++i) {
      for (int64_t t = 0; t < k; ++t) ASSERT_EQ(r.indices[i * k + t], t) << "row " << i;
    }
  }
}

TEST(Gallery, EqualRowsTieExactlyInEveryTileShape) {
  // Rows 1 and 4 of B are equal: in every tile height (scan and matmul paths, column tails)
  // they must score bit-equal, so top-k puts column 1 first.
  Problem p = RandomProblem({1, 12, 5, 24}, 43);
  std::copy_n(p.b.begin() + 24, 24, p.b.begin() + 4 * 24);
  const auto gallery = MakeGallery(p, false, DataType::kFloat32);
  for (const Metric metric : {Metric::kCosine, Metric::kDot, Metric::kEuclidean}) {
    for (const int64_t tile_rows : {1, 2, 3, 5, 12}) {
      const Result dense = ComputeWithGallery(p, *gallery, {.metric = metric}, tile_rows);
      for (int64_t i = 0; i < 12; ++i) {
        ASSERT_EQ(OutputValue(dense.values, DataType::kFloat32, i * 5 + 1),
                  OutputValue(dense.values, DataType::kFloat32, i * 5 + 4))
            << Name(metric) << " tile_rows " << tile_rows << " row " << i;
      }
    }
  }
}

TEST(Gallery, HalfStorageWithFp32PrecisionGivesTheSameScoresInEveryTileShape) {
  // FP32 precision keeps A in float32 on both paths (scan for <= 8 rows, matmul above), so a
  // row's scores do not depend on how many rows share its tile (bf16 storage must not turn
  // the matmul into a bf16 one).
  const Problem p = RandomProblem({1, 20, 300, 32}, 47);
  for (const DataType storage : {DataType::kBFloat16, DataType::kFloat16}) {
    const auto gallery = MakeGallery(p, false, storage);
    const Options options{.metric = Metric::kDot};
    const Result single = ComputeWithGallery(p, *gallery, options, 1);
    const Result whole = ComputeWithGallery(p, *gallery, options, 0);
    for (int64_t i = 0; i < 20 * 300; ++i) {
      ASSERT_NEAR(OutputValue(single.values, DataType::kFloat32, i),
                  OutputValue(whole.values, DataType::kFloat32, i), 2e-5)
          << Name(storage) << " entry " << i;
    }
  }
}

TEST(Gallery, ZeroTinyAndHugeRowsAreExactForCosine) {
  Problem p = RandomProblem({1, 4, 6, 64}, 31);
  std::fill_n(p.b.begin(), 64, 0.0F);  // B[0] = 0
  const Problem unit = p;
  for (int64_t j = 1; j < 6; ++j) {
    const float scale = j % 2 == 0 ? 1e-30F : 1e30F;
    for (int64_t c = 0; c < 64; ++c) p.b[j * 64 + c] *= scale;
  }
  const auto gallery = MakeGallery(p, false, DataType::kFloat32);
  const auto unit_gallery = MakeGallery(unit, false, DataType::kFloat32);
  const Result got = ComputeWithGallery(p, *gallery, {});
  const Result want = ComputeWithGallery(unit, *unit_gallery, {});
  for (int64_t i = 0; i < 24; ++i) {
    EXPECT_NEAR(OutputValue(got.values, DataType::kFloat32, i),
                OutputValue(want.values, DataType::kFloat32, i), 1e-6)
        << i;
  }
  for (int64_t i = 0; i < 4; ++i) EXPECT_EQ(OutputValue(got.values, DataType::kFloat32, i * 6), 0);
}

TEST(Gallery, OutputDtypesAndHalfInputsMatchTheReference) {
  const Problem p = RandomProblem({1, 9, 300, 24}, 37);
  std::vector<uint16_t> b16(p.b.size());
  Problem rounded = p;
  for (size_t i = 0; i < p.b.size(); ++i) {
    b16[i] = FloatToF16(p.b[i]);
    rounded.b[i] = F16ToFloat(b16[i]);
  }
  auto builder = GalleryBuilder::Create({1, 300, 24}, DataType::kFloat16, DataType::kFloat32);
  ASSERT_TRUE(builder.ok());
  std::memcpy((*builder)->input().data(), b16.data(), b16.size() * 2);
  auto gallery = (*builder)->Build();
  ASSERT_TRUE(gallery.ok());
  for (const DataType out : {DataType::kFloat32, DataType::kBFloat16, DataType::kFloat16}) {
    const Options options{.metric = Metric::kDot, .output_dtype = out};
    ExpectDenseMatchesReference(rounded, options, ComputeWithGallery(rounded, **gallery, options));
  }
}

TEST(Gallery, HoldsOneFormOfTheRowsInTheStorageDtype) {
  for (const auto& [input, storage, row_bytes] :
       {std::tuple{DataType::kFloat32, DataType::kFloat32, 4},
        std::tuple{DataType::kFloat32, DataType::kBFloat16, 2},
        std::tuple{DataType::kFloat16, DataType::kFloat16, 2},
        std::tuple{DataType::kBFloat16, DataType::kFloat32, 4}}) {
    auto builder = GalleryBuilder::Create({2, 1000, 100}, input, storage);
    ASSERT_TRUE(builder.ok());
    std::memset((*builder)->input().data(), 0, (*builder)->input().size());
    auto gallery = (*builder)->Build();
    ASSERT_TRUE(gallery.ok());
    const int64_t rows_bytes = int64_t{2000} * 100 * row_bytes;
    EXPECT_GE((*gallery)->bytes(), rows_bytes + 2000 * 8);
    EXPECT_LE((*gallery)->bytes(), rows_bytes + 2000 * 8 + 4096);
  }
}

TEST(Gallery, RejectsMismatchedProblems) {
  const Problem p = RandomProblem({2, 3, 10, 8}, 41);
  const auto per_batch = MakeGallery(p, false, DataType::kFloat32);
  EXPECT_EQ(TestEngine().Prepare({3, 3, 10, 8}, {}, *per_batch).status().code(),
            absl::StatusCode::kInvalidArgument)
      << "batch 3 against a 2-entry gallery";
  EXPECT_EQ(TestEngine().Prepare({2, 3, 10, 9}, {}, *per_batch).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(TestEngine().Prepare({2, 3, 11, 8}, {}, *per_batch).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(TestEngine().Prepare({2, 3, 10, 8}, {}, *per_batch).ok());
  EXPECT_EQ(
      GalleryBuilder::Create({1, 0, 8}, DataType::kFloat32, DataType::kFloat32).status().code(),
      absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace simserve::kernels
