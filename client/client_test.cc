// End-to-end tests of simserve::Client against a real SimilarityServer started in-process
// on an ephemeral loopback port. Every result is checked against an independent
// double-precision reference computed here with plain loops.
#include "client/client.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "client/dtype.h"
#include "gmock/gmock.h"
#include "google/protobuf/struct.pb.h"
#include "google/protobuf/util/json_util.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"
#include "kernels/dtype.h"
#include "server/config.h"
#include "server/server.h"

namespace simserve {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kMiB = int64_t{1} << 20;

// Inputs of one problem in float32, C order.
struct Problem {
  int64_t batch = 1;
  int64_t n = 1;
  int64_t m = 1;
  int64_t d = 1;
  bool two_d = false;
  std::vector<float> a;
  std::vector<float> b;

  std::vector<int64_t> AShape() const {
    return two_d ? std::vector<int64_t>{n, d} : std::vector<int64_t>{batch, n, d};
  }
  std::vector<int64_t> BShape() const {
    return two_d ? std::vector<int64_t>{m, d} : std::vector<int64_t>{batch, m, d};
  }
  TensorRef A() const { return TensorRef::Float32(AShape(), a); }
  TensorRef B() const { return TensorRef::Float32(BShape(), b); }
};

Problem MakeProblem(int64_t batch, int64_t n, int64_t m, int64_t d, uint32_t seed,
                    bool two_d = false) {
  Problem p{batch, n, m, d, two_d, {}, {}};
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0F, 1.0F);
  p.a.resize(static_cast<size_t>(batch * n * d));
  p.b.resize(static_cast<size_t>(batch * m * d));
  for (float& x : p.a) x = normal(rng);
  for (float& x : p.b) x = normal(rng);
  return p;
}

// The reference: S[k][i][j] in double precision with the documented semantics, plus the
// per-element error scale (|a|*|b| for dot, |a|^2+|b|^2 for distances, 1 for cosine).
struct Reference {
  std::vector<double> values;
  std::vector<double> scale;
};

Reference ComputeReference(const Problem& p, v1::Metric metric, float epsilon = 0.0F) {
  Reference ref;
  ref.values.resize(static_cast<size_t>(p.batch * p.n * p.m));
  ref.scale.resize(ref.values.size());
  for (int64_t k = 0; k < p.batch; ++k) {
    for (int64_t i = 0; i < p.n; ++i) {
      const float* a = &p.a[static_cast<size_t>((k * p.n + i) * p.d)];
      for (int64_t j = 0; j < p.m; ++j) {
        const float* b = &p.b[static_cast<size_t>((k * p.m + j) * p.d)];
        double dot = 0, aa = 0, bb = 0, diff = 0;
        for (int64_t t = 0; t < p.d; ++t) {
          dot += static_cast<double>(a[t]) * b[t];
          aa += static_cast<double>(a[t]) * a[t];
          bb += static_cast<double>(b[t]) * b[t];
          const double delta = static_cast<double>(a[t]) - b[t];
          diff += delta * delta;
        }
        double value = 0;
        double scale = 1;
        switch (metric) {
          case v1::COSINE: {
            double na = std::sqrt(aa);
            double nb = std::sqrt(bb);
            if (epsilon > 0) {
              na = std::sqrt(std::max(aa, static_cast<double>(epsilon)));
              nb = std::sqrt(std::max(bb, static_cast<double>(epsilon)));
            } else {
              if (na == 0) na = 1;  // sklearn: a zero row gives 0
              if (nb == 0) nb = 1;
            }
            value = dot / (na * nb);
            break;
          }
          case v1::DOT:
            value = dot;
            scale = std::sqrt(aa * bb) + 1e-30;
            break;
          case v1::EUCLIDEAN:
            value = std::sqrt(diff);
            scale = (aa + bb) / std::max(value, 1e-3);  // d(sqrt(x)) = dx / (2 sqrt(x))
            break;
          case v1::SQUARED_EUCLIDEAN:
            value = diff;
            scale = aa + bb;
            break;
          default:
            break;
        }
        const auto at = static_cast<size_t>((k * p.n + i) * p.m + j);
        ref.values[at] = value;
        ref.scale[at] = scale;
      }
    }
  }
  return ref;
}

// Relative error bound of one output element for an output dtype and precision.
double Tolerance(v1::DataType output, v1::Precision precision) {
  double tol = precision == v1::BF16 ? 2e-2 : 2e-5;
  if (output == v1::BFLOAT16) tol += 8e-3;  // 8 mantissa bits
  if (output == v1::FLOAT16) tol += 1e-3;   // 11 mantissa bits
  return tol;
}

void ExpectMatchesReference(const Result& result, const Reference& ref, double tol) {
  // float16 flushes magnitudes below half its smallest subnormal (2^-25) to zero.
  const double abs_floor = result.dtype == v1::FLOAT16 ? 3e-8 : 0.0;
  const std::vector<float> got = result.ValuesAsFloat();
  ASSERT_EQ(got.size(), ref.values.size());
  int failures = 0;
  for (size_t i = 0; i < got.size() && failures < 10; ++i) {
    const double bound = tol * (ref.scale[i] + std::abs(ref.values[i])) + abs_floor;
    if (!(std::abs(got[i] - ref.values[i]) <= bound)) {
      ADD_FAILURE() << "element " << i << ": got " << got[i] << ", reference " << ref.values[i]
                    << " (bound " << bound << ")";
      ++failures;
    }
  }
}

// Expected top-k of row `row` of `ref`: best first, ties to the lower column.
std::vector<int32_t> ReferenceTopK(const Reference& ref, size_t row, int64_t m, uint32_t k,
                                   bool largest) {
  std::vector<int32_t> idx(static_cast<size_t>(m));
  std::iota(idx.begin(), idx.end(), 0);
  const double* v = &ref.values[row * static_cast<size_t>(m)];
  std::stable_sort(idx.begin(), idx.end(), [v, largest](int32_t x, int32_t y) {
    return largest ? v[x] > v[y] : v[x] < v[y];
  });
  idx.resize(k);
  return idx;
}

// An in-process server on an ephemeral loopback port: no metrics port, one worker, no warm-up.
ServerConfig LoopbackServerConfig(int threads) {
  ServerConfig config;
  config.listen = "127.0.0.1:0";
  config.metrics_listen = "";
  config.compute.workers = 1;
  config.compute.threads_per_worker = threads;
  config.compute.warmup = false;
  return config;
}

class ClientTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ServerConfig config = LoopbackServerConfig(2);
    // Small message limits so that the size-dependent paths are exercised cheaply.
    config.limits.max_receive_message_bytes = kMiB;
    config.limits.max_send_message_bytes = kMiB;
    config.limits.max_chunk_bytes = 256 << 10;
    config.limits.default_chunk_bytes = 64 << 10;
    auto server = SimilarityServer::Start(config);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    target_ = absl::StrCat("127.0.0.1:", server_->port());
    auto client = Client::Connect(target_);
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = *std::move(client);
  }
  static void TearDownTestSuite() {
    client_.reset();
    if (server_ != nullptr) server_->Shutdown(absl::Seconds(5));
    server_.reset();
  }
  void SetUp() override { ASSERT_NE(client_, nullptr) << "server did not start"; }

  // gtest suite-level state: one server and one client shared by the tests.
  static std::unique_ptr<SimilarityServer> server_;
  static std::unique_ptr<Client> client_;
  static std::string target_;
};

std::unique_ptr<SimilarityServer> ClientTest::server_;
std::unique_ptr<Client> ClientTest::client_;
std::string ClientTest::target_;

absl::StatusOr<Result> Call(Client& client, CallMode mode, const Problem& p,
                            const ComputeOptions& options) {
  return client.Similarity(p.A(), p.B(), options, mode);
}

TEST_F(ClientTest, GetInfoReportsTheServersLimits) {
  auto info = client_->GetInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_FALSE(info->version().empty());
  EXPECT_FALSE(info->onednn_version().empty());
  EXPECT_EQ(info->limits().max_receive_message_bytes(), kMiB);
  EXPECT_EQ(info->limits().max_send_message_bytes(), kMiB);
  EXPECT_EQ(info->metrics_size(), 4);
}

// Every RPC x metric x output dtype against the double reference.
class ModeMetricDtypeTest
    : public ClientTest,
      public ::testing::WithParamInterface<std::tuple<CallMode, v1::Metric, v1::DataType>> {};

TEST_P(ModeMetricDtypeTest, MatchesDoubleReference) {
  const auto [mode, metric, dtype] = GetParam();
  Problem p = MakeProblem(3, 17, 13, 24, 11);
  // A zero row and a tiny row: cosine must give 0 and stay undistorted.
  std::fill_n(p.a.begin(), p.d, 0.0F);
  for (int64_t t = 0; t < p.d; ++t) p.a[static_cast<size_t>(p.d + t)] *= 1e-20F;
  ComputeOptions options;
  options.metric = metric;
  options.output_dtype = dtype;
  options.max_chunk_bytes = 200;  // several chunks in the streaming modes
  auto result = Call(*client_, mode, p, options);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->mode, mode);
  EXPECT_EQ(result->shape, (std::vector<int64_t>{3, 17, 13}));
  EXPECT_EQ(result->dtype, dtype);
  EXPECT_TRUE(result->indices.empty());
  if (mode != CallMode::kUnary) {
    EXPECT_GT(result->chunks, 3);
  }
  ExpectMatchesReference(*result, ComputeReference(p, metric), Tolerance(dtype, v1::FP32));
  EXPECT_TRUE(result->server.total_ms.has_value());
  EXPECT_TRUE(result->server.compute_ms.has_value());
  EXPECT_TRUE(result->server.queue_ms.has_value());
  EXPECT_GT(result->client_wall_ms, 0.0);
}

INSTANTIATE_TEST_SUITE_P(
    AllCombinations, ModeMetricDtypeTest,
    ::testing::Combine(::testing::Values(CallMode::kUnary, CallMode::kStream, CallMode::kUpload),
                       ::testing::Values(v1::COSINE, v1::DOT, v1::EUCLIDEAN, v1::SQUARED_EUCLIDEAN),
                       ::testing::Values(v1::FLOAT32, v1::BFLOAT16, v1::FLOAT16)),
    [](const auto& info) {
      return absl::StrCat(Name(std::get<0>(info.param)), "_",
                          v1::Metric_Name(std::get<1>(info.param)), "_",
                          v1::DataType_Name(std::get<2>(info.param)));
    });

TEST_F(ClientTest, UnaryStreamAndUploadAreBitIdentical) {
  const Problem p = MakeProblem(2, 300, 200, 64, 5);
  for (const uint32_t top_k : {0U, 7U}) {
    ComputeOptions options;
    options.top_k = top_k;
    auto unary = Call(*client_, CallMode::kUnary, p, options);
    ASSERT_TRUE(unary.ok()) << unary.status();
    options.max_chunk_bytes = 10000;
    auto stream = Call(*client_, CallMode::kStream, p, options);
    ASSERT_TRUE(stream.ok()) << stream.status();
    ClientOptions small_pieces;
    small_pieces.upload_piece_bytes = 64 << 10;
    auto piece_client = Client::Connect(target_, small_pieces);
    ASSERT_TRUE(piece_client.ok());
    auto upload = Call(**piece_client, CallMode::kUpload, p, options);
    ASSERT_TRUE(upload.ok()) << upload.status();
    EXPECT_GT(stream->chunks, top_k == 0 ? 40 : 3);  // 10000-byte chunks
    for (const Result* r : {&*stream, &*upload}) {
      EXPECT_EQ(r->shape, unary->shape);
      ASSERT_EQ(r->values.size(), unary->values.size());
      if (__builtin_cpu_supports("avx512f")) {  // oneDNN's brgemm: row results independent
        EXPECT_EQ(std::memcmp(r->values.data(), unary->values.data(), r->values.size()), 0)
            << Name(r->mode) << " differs from unary, top_k " << top_k;
      } else {  // gemm:jit (AVX2) may split the reduction by tile size: a few ulp apart
        std::vector<float> got(r->values.size() / 4), want(got.size());
        std::memcpy(got.data(), r->values.data(), r->values.size());
        std::memcpy(want.data(), unary->values.data(), unary->values.size());
        for (size_t i = 0; i < got.size(); ++i) {
          ASSERT_NEAR(got[i], want[i], 1e-6 * std::max(1.0F, std::fabs(want[i])))
              << Name(r->mode) << " element " << i << ", top_k " << top_k;
        }
      }
      EXPECT_EQ(r->indices, unary->indices);
    }
  }
}

TEST_F(ClientTest, OutputRefIsFilledInPlaceInEveryModeLikeTheResultApi) {
  const Problem p = MakeProblem(2, 30, 20, 16, 9);
  for (const uint32_t top_k : {0U, 5U}) {
    for (const v1::DataType dtype : {v1::FLOAT32, v1::BFLOAT16}) {
      ComputeOptions options;
      options.top_k = top_k;
      options.output_dtype = dtype;
      options.max_chunk_bytes = 500;
      auto spec = OutputSize(p.AShape(), p.BShape(), options);
      ASSERT_TRUE(spec.ok()) << spec.status();
      const int64_t cols = top_k > 0 ? top_k : 20;
      EXPECT_EQ(spec->shape, (std::vector<int64_t>{2, 30, cols}));
      const auto reference = Call(*client_, CallMode::kUnary, p, options);
      ASSERT_TRUE(reference.ok()) << reference.status();
      for (const CallMode mode :
           {CallMode::kAuto, CallMode::kUnary, CallMode::kStream, CallMode::kUpload}) {
        SCOPED_TRACE(absl::StrCat(Name(mode), " top_k ", top_k, " ", v1::DataType_Name(dtype)));
        // Guard bytes around the caller's buffers must stay untouched.
        std::vector<std::byte> values(static_cast<size_t>(spec->values_bytes) + 16,
                                      std::byte{0x5A});
        std::vector<int32_t> indices(static_cast<size_t>(spec->indices_bytes / 4) + 4, -7);
        const OutputRef out{std::span(values).subspan(8, static_cast<size_t>(spec->values_bytes)),
                            std::span(indices).subspan(2, indices.size() - 4)};
        auto info = client_->Similarity(p.A(), p.B(), options, out, mode);
        ASSERT_TRUE(info.ok()) << info.status();
        EXPECT_EQ(info->shape, spec->shape);
        EXPECT_EQ(info->dtype, dtype);
        if (mode != CallMode::kAuto) {
          EXPECT_EQ(info->mode, mode);
        }
        EXPECT_EQ(std::memcmp(out.values.data(), reference->values.data(), out.values.size()), 0);
        EXPECT_TRUE(std::equal(out.indices.begin(), out.indices.end(), reference->indices.begin(),
                               reference->indices.end()));
        for (size_t i = 0; i < 8; ++i) {
          EXPECT_EQ(values[i], std::byte{0x5A});
          EXPECT_EQ(values[values.size() - 1 - i], std::byte{0x5A});
        }
        EXPECT_EQ(indices.front(), -7);
        EXPECT_EQ(indices.back(), -7);
      }
    }
  }
  // The per-mode entry points take an OutputRef too.
  auto spec = OutputSize(p.AShape(), p.BShape(), {});
  ASSERT_TRUE(spec.ok());
  ByteVector values(static_cast<size_t>(spec->values_bytes));
  EXPECT_TRUE(client_->Compute(p.A(), p.B(), {}, OutputRef{values, {}}).ok());
  EXPECT_TRUE(client_->ComputeStream(p.A(), p.B(), {}, OutputRef{values, {}}).ok());
  EXPECT_TRUE(client_->ComputeUpload(p.A(), p.B(), {}, OutputRef{values, {}}).ok());
}

TEST_F(ClientTest, WronglySizedOutputRefIsInvalidArgumentBeforeAnyCall) {
  const Problem p = MakeProblem(2, 6, 5, 8, 4);
  constexpr size_t kDenseBytes = size_t{2} * 6 * 5 * 4;
  constexpr size_t kTop3Elements = size_t{2} * 6 * 3;
  ByteVector values(kDenseBytes);
  std::vector<int32_t> indices(kTop3Elements);
  ComputeOptions dense;
  ComputeOptions top3;
  top3.top_k = 3;
  const std::span<std::byte> all(values);
  for (const CallMode mode :
       {CallMode::kAuto, CallMode::kUnary, CallMode::kStream, CallMode::kUpload}) {
    SCOPED_TRACE(Name(mode));
    auto short_values =
        client_->Similarity(p.A(), p.B(), dense, {all.first(all.size() - 4), {}}, mode);
    EXPECT_EQ(short_values.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(short_values.status().message(), HasSubstr("OutputRef.values has 236 bytes"));
    EXPECT_THAT(short_values.status().message(), HasSubstr("needs 240"));
    auto stray_indices = client_->Similarity(p.A(), p.B(), dense, {all, indices}, mode);
    EXPECT_EQ(stray_indices.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(stray_indices.status().message(), HasSubstr("dense results have no indices"));
    auto no_indices =
        client_->Similarity(p.A(), p.B(), top3, {all.first(kTop3Elements * 4), {}}, mode);
    EXPECT_EQ(no_indices.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(no_indices.status().message(), HasSubstr("OutputRef.indices has 0 elements"));
    auto ok =
        client_->Similarity(p.A(), p.B(), top3, {all.first(kTop3Elements * 4), indices}, mode);
    EXPECT_TRUE(ok.ok()) << ok.status();
  }
  const TensorRef rank1 = TensorRef::Float32({static_cast<int64_t>(p.a.size())}, p.a);
  auto rank = client_->Similarity(rank1, p.B(), dense, {all, {}});
  EXPECT_EQ(rank.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(rank.status().message(), HasSubstr("must both be 2D"));
}

TEST_F(ClientTest, TwoDimensionalInputsGiveTwoDimensionalOutput) {
  const Problem p = MakeProblem(1, 9, 5, 16, 2, /*two_d=*/true);
  for (const CallMode mode : {CallMode::kUnary, CallMode::kStream, CallMode::kUpload}) {
    ComputeOptions options;
    options.metric = v1::DOT;
    auto result = Call(*client_, mode, p, options);
    ASSERT_TRUE(result.ok()) << Name(mode) << ": " << result.status();
    EXPECT_EQ(result->shape, (std::vector<int64_t>{9, 5}));
    ExpectMatchesReference(*result, ComputeReference(p, v1::DOT), 2e-5);
  }
}

TEST_F(ClientTest, TopKMatchesReferenceOrderInEveryMode) {
  const Problem p = MakeProblem(2, 23, 40, 16, 9);
  for (const v1::Metric metric : {v1::COSINE, v1::EUCLIDEAN}) {
    const Reference ref = ComputeReference(p, metric);
    for (const CallMode mode : {CallMode::kUnary, CallMode::kStream, CallMode::kUpload}) {
      ComputeOptions options;
      options.metric = metric;
      options.top_k = 5;
      options.max_chunk_bytes = 100;
      auto result = Call(*client_, mode, p, options);
      ASSERT_TRUE(result.ok()) << result.status();
      ASSERT_EQ(result->shape, (std::vector<int64_t>{2, 23, 5}));
      ASSERT_EQ(result->indices.size(), 2U * 23 * 5);
      const std::vector<float> values = result->ValuesAsFloat();
      for (size_t row = 0; row < size_t{2} * 23; ++row) {
        const auto expected = ReferenceTopK(ref, row, p.m, 5, metric == v1::COSINE);
        for (size_t j = 0; j < 5; ++j) {
          const int32_t got = result->indices[row * 5 + j];
          EXPECT_EQ(got, expected[j]) << Name(mode) << " row " << row << " rank " << j;
          const double want = ref.values[row * static_cast<size_t>(p.m) + expected[j]];
          EXPECT_NEAR(values[row * 5 + j], want, 1e-4 * (1 + std::abs(want)));
        }
      }
    }
  }
}

TEST_F(ClientTest, EpsilonAppliesTheKerasClamp) {
  Problem p = MakeProblem(1, 4, 3, 8, 4);
  for (int64_t t = 0; t < p.d; ++t) p.a[static_cast<size_t>(t)] *= 1e-4F;  // |a0|^2 ~ 1e-7
  ComputeOptions options;
  options.epsilon = 1e-3F;
  auto result = client_->Similarity(p.A(), p.B(), options);
  ASSERT_TRUE(result.ok()) << result.status();
  ExpectMatchesReference(*result, ComputeReference(p, v1::COSINE, 1e-3F), 2e-5);
}

TEST_F(ClientTest, Bf16PrecisionIsCloseToReference) {
  const Problem p = MakeProblem(2, 32, 48, 64, 8);
  ComputeOptions options;
  options.precision = v1::BF16;
  auto result = client_->Similarity(p.A(), p.B(), options, CallMode::kStream);
  ASSERT_TRUE(result.ok()) << result.status();
  ExpectMatchesReference(*result, ComputeReference(p, v1::COSINE),
                         Tolerance(v1::FLOAT32, v1::BF16));
}

TEST_F(ClientTest, HalfPrecisionInputsAreAccepted) {
  Problem p = MakeProblem(2, 6, 7, 32, 12);
  // Round the inputs to float16 so the reference sees exactly what the server sees.
  std::vector<uint16_t> a16(p.a.size());
  std::vector<uint16_t> b16(p.b.size());
  for (size_t i = 0; i < p.a.size(); ++i) {
    a16[i] = kernels::FloatToF16(p.a[i]);
    p.a[i] = kernels::F16ToFloat(a16[i]);
  }
  for (size_t i = 0; i < p.b.size(); ++i) {
    b16[i] = kernels::FloatToF16(p.b[i]);
    p.b[i] = kernels::F16ToFloat(b16[i]);
  }
  const TensorRef a{p.AShape(), v1::FLOAT16, std::as_bytes(std::span(a16))};
  const TensorRef b{p.BShape(), v1::FLOAT16, std::as_bytes(std::span(b16))};
  for (const CallMode mode : {CallMode::kUnary, CallMode::kUpload}) {
    auto result = client_->Similarity(a, b, {}, mode);
    ASSERT_TRUE(result.ok()) << result.status();
    ExpectMatchesReference(*result, ComputeReference(p, v1::COSINE), 2e-5);
  }
}

TEST_F(ClientTest, AutoPicksUnaryStreamOrUploadBySize) {
  // Tiny: unary.
  const Problem small = MakeProblem(1, 8, 8, 8, 1);
  auto r1 = client_->Similarity(small.A(), small.B());
  ASSERT_TRUE(r1.ok()) << r1.status();
  EXPECT_EQ(r1->mode, CallMode::kUnary);
  // Small inputs, 1.6 MB result (over the 1 MiB send limit): stream.
  const Problem wide = MakeProblem(1, 1000, 400, 4, 2);
  auto r2 = client_->Similarity(wide.A(), wide.B());
  ASSERT_TRUE(r2.ok()) << r2.status();
  EXPECT_EQ(r2->mode, CallMode::kStream);
  ExpectMatchesReference(*r2, ComputeReference(wide, v1::COSINE), 2e-5);
  // 1.2 MB of input, over the 1 MiB receive limit: upload; unary must be refused.
  const Problem big = MakeProblem(1, 3000, 40, 100, 3);
  auto r3 = client_->Similarity(big.A(), big.B());
  ASSERT_TRUE(r3.ok()) << r3.status();
  EXPECT_EQ(r3->mode, CallMode::kUpload);
  ExpectMatchesReference(*r3, ComputeReference(big, v1::COSINE), 2e-5);
  auto refused = client_->Compute(big.A(), big.B());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
}

TEST_F(ClientTest, UploadPiecesAreClampedToTheServersMessageLimit) {
  ClientOptions huge_pieces;
  huge_pieces.upload_piece_bytes = 8 * kMiB;  // more than the server's 1 MiB limit
  auto client = Client::Connect(target_, huge_pieces);
  ASSERT_TRUE(client.ok());
  const Problem big = MakeProblem(1, 3000, 40, 100, 6);
  auto result = (*client)->ComputeUpload(big.A(), big.B());
  ASSERT_TRUE(result.ok()) << result.status();
  ExpectMatchesReference(*result, ComputeReference(big, v1::COSINE), 2e-5);
}

TEST_F(ClientTest, UnaryResultOverTheSendLimitSaysUseComputeStream) {
  const Problem wide = MakeProblem(1, 1000, 400, 4, 2);
  auto result = client_->Compute(wide.A(), wide.B());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(result.status().message(), HasSubstr("ComputeStream"));
}

TEST_F(ClientTest, ExpiredDeadlineSurfacesAsDeadlineExceeded) {
  // A deadline that has passed when the call starts. (A few microseconds are not enough:
  // the calls start within them now that requests are not copied, and whether the client's
  // deadline timer or the response comes first is then up to the scheduler.)
  const Problem p = MakeProblem(4, 200, 200, 64, 7);
  for (const CallMode mode : {CallMode::kUnary, CallMode::kStream, CallMode::kUpload}) {
    ComputeOptions options;
    options.timeout = absl::Nanoseconds(1);
    auto result = client_->Similarity(p.A(), p.B(), options, mode);
    EXPECT_EQ(result.status().code(), absl::StatusCode::kDeadlineExceeded)
        << Name(mode) << ": " << result.status();
  }
  // A deadline that passes while the 10 MB result streams (the server checks it per tile);
  // 0.8 MB of inputs fit one request message.
  const Problem big = MakeProblem(16, 400, 400, 16, 8);
  for (const CallMode mode : {CallMode::kStream, CallMode::kUpload}) {
    ComputeOptions options;
    options.timeout = absl::Milliseconds(2);
    auto result = client_->Similarity(big.A(), big.B(), options, mode);
    EXPECT_EQ(result.status().code(), absl::StatusCode::kDeadlineExceeded)
        << Name(mode) << ": " << result.status();
  }
  // A client whose default deadline is tiny: the default applies too.
  ClientOptions hasty;
  hasty.default_timeout = absl::Nanoseconds(1);
  auto client = Client::Connect(target_, hasty);
  ASSERT_TRUE(client.ok());
  auto result = (*client)->ComputeStream(p.A(), p.B());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kDeadlineExceeded) << result.status();
  // The server keeps serving.
  auto ok = client_->Similarity(p.A(), p.B(), {}, CallMode::kStream);
  ASSERT_TRUE(ok.ok()) << ok.status();
}

TEST_F(ClientTest, BadInputSurfacesAsInvalidArgumentWithTheServersMessage) {
  const Problem p = MakeProblem(2, 5, 6, 8, 3);
  const Problem other_d = MakeProblem(2, 6, 6, 9, 3);
  std::vector<float> nan_a = p.a;
  nan_a[13] = std::nanf("");
  for (const CallMode mode : {CallMode::kUnary, CallMode::kStream, CallMode::kUpload}) {
    SCOPED_TRACE(Name(mode));
    auto mismatch = client_->Similarity(p.A(), other_d.B(), {}, mode);
    EXPECT_EQ(mismatch.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(mismatch.status().message(), HasSubstr("D mismatch"));

    ComputeOptions too_many;
    too_many.top_k = 7;  // M = 6
    auto top_k = client_->Similarity(p.A(), p.B(), too_many, mode);
    EXPECT_EQ(top_k.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(top_k.status().message(), HasSubstr("top_k = 7 exceeds M = 6"));

    const TensorRef nan_ref = TensorRef::Float32(p.AShape(), nan_a);
    auto nan = client_->Similarity(nan_ref, p.B(), {}, mode);
    EXPECT_EQ(nan.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(nan.status().message(), HasSubstr("tensor a"));

    // Shape says 2x5x8 floats but only part of the bytes come.
    const TensorRef short_a{p.AShape(), v1::FLOAT32,
                            std::as_bytes(std::span(p.a)).first(p.a.size() * 4 - 8)};
    auto truncated = client_->Similarity(short_a, p.B(), {}, mode);
    EXPECT_EQ(truncated.status().code(), absl::StatusCode::kInvalidArgument) << truncated.status();

    const TensorRef rank1 = TensorRef::Float32({static_cast<int64_t>(p.a.size())}, p.a);
    auto rank = client_->Similarity(rank1, p.B(), {}, mode);
    EXPECT_EQ(rank.status().code(), absl::StatusCode::kInvalidArgument) << rank.status();
  }
  auto still_ok = client_->Similarity(p.A(), p.B());
  EXPECT_TRUE(still_ok.ok()) << still_ok.status();
}

TEST_F(ClientTest, ConcurrentCallsAllGetTheirOwnCorrectResult) {
  constexpr int kThreads = 6;
  constexpr int kCallsPerThread = 4;
  std::vector<std::thread> threads;
  threads.reserve(kThreads);
  std::vector<int> failures(kThreads, 0);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([t, &failures, client = client_.get()] {
      for (int c = 0; c < kCallsPerThread; ++c) {
        const Problem p = MakeProblem(2, 20 + t, 30 + c, 16, 100 * t + c);
        const CallMode mode =
            std::array{CallMode::kUnary, CallMode::kStream, CallMode::kUpload}[(t + c) % 3];
        ComputeOptions options;
        options.metric = v1::SQUARED_EUCLIDEAN;
        options.max_chunk_bytes = 512;
        auto result = client->Similarity(p.A(), p.B(), options, mode);
        if (!result.ok()) {
          ++failures[t];
          continue;
        }
        const Reference ref = ComputeReference(p, v1::SQUARED_EUCLIDEAN);
        const std::vector<float> got = result->ValuesAsFloat();
        if (got.size() != ref.values.size()) {
          ++failures[t];
          continue;
        }
        for (size_t i = 0; i < got.size(); ++i) {
          if (!(std::abs(got[i] - ref.values[i]) <= 1e-4 * ref.scale[i])) {
            ++failures[t];
            break;
          }
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(std::accumulate(failures.begin(), failures.end(), 0), 0);
}

// ---- Galleries on the real server ----

// A query A [batch, n, d] against a gallery [m, d] (shared by every batch entry) or
// [batch, m, d]. `p.b` holds the gallery repeated for each batch entry, so that
// ComputeReference(p, ...) is the independent reference of a gallery call.
struct GalleryProblem {
  Problem p;
  std::vector<float> gallery;
  std::vector<int64_t> gallery_shape;

  TensorRef Gallery() const { return TensorRef::Float32(gallery_shape, gallery); }
};

GalleryProblem MakeGalleryProblem(int64_t batch, int64_t n, int64_t m, int64_t d, uint32_t seed,
                                  bool shared) {
  GalleryProblem g{MakeProblem(batch, n, m, d, seed), {}, {}};
  if (shared) {
    g.gallery.assign(g.p.b.begin(), g.p.b.begin() + m * d);
    for (int64_t k = 1; k < batch; ++k) {
      std::copy(g.gallery.begin(), g.gallery.end(), g.p.b.begin() + k * m * d);
    }
    g.gallery_shape = {m, d};
  } else {
    g.gallery = g.p.b;
    g.gallery_shape = {batch, m, d};
  }
  return g;
}

// Whether every element of `result` is within `tol` of `ref` (ExpectMatchesReference's rule).
bool MatchesReference(const Result& result, const Reference& ref, double tol) {
  const std::vector<float> got = result.ValuesAsFloat();
  if (got.size() != ref.values.size()) return false;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!(std::abs(got[i] - ref.values[i]) <= tol * (ref.scale[i] + std::abs(ref.values[i])))) {
      return false;
    }
  }
  return true;
}

ComputeOptions GalleryOptionsFor(const std::string& name, v1::Metric metric = v1::COSINE) {
  ComputeOptions options;
  options.gallery = name;
  options.metric = metric;
  return options;
}

TEST_F(ClientTest, GalleryMatchesDoubleReferenceInEveryModeAndMetric) {
  for (const bool shared : {true, false}) {
    GalleryProblem g = MakeGalleryProblem(3, 17, 13, 24, shared ? 21 : 22, shared);
    // A zero gallery row: cosine gives 0 for it, never NaN.
    std::fill_n(g.gallery.begin() + 24, 24, 0.0F);
    for (int64_t k = 0; k < (shared ? 3 : 1); ++k) {
      std::fill_n(g.p.b.begin() + (k * 13 + 1) * 24, 24, 0.0F);
    }
    const std::string name = shared ? "ct-ref-2d" : "ct-ref-3d";
    auto info = client_->RegisterGallery(name, g.Gallery());
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(info->name(), name);
    EXPECT_EQ(std::vector<int64_t>(info->shape().begin(), info->shape().end()), g.gallery_shape);
    EXPECT_EQ(info->source(), v1::UPLOADED);
    EXPECT_EQ(info->dtype(), v1::FLOAT32);
    EXPECT_EQ(info->storage_dtype(), v1::FLOAT32);
    EXPECT_GE(info->version(), 1);
    EXPECT_GT(info->bytes(), 0);
    for (const v1::Metric metric : {v1::COSINE, v1::DOT, v1::EUCLIDEAN, v1::SQUARED_EUCLIDEAN}) {
      const Reference ref = ComputeReference(g.p, metric);
      for (const CallMode mode :
           {CallMode::kUnary, CallMode::kStream, CallMode::kUpload, CallMode::kAuto}) {
        SCOPED_TRACE(absl::StrCat(name, " ", v1::Metric_Name(metric), " ", Name(mode)));
        ComputeOptions options = GalleryOptionsFor(name, metric);
        options.max_chunk_bytes = 200;
        auto result = client_->Similarity(g.p.A(), {}, options, mode);
        ASSERT_TRUE(result.ok()) << result.status();
        EXPECT_EQ(result->shape, (std::vector<int64_t>{3, 17, 13}));
        ExpectMatchesReference(*result, ref, Tolerance(v1::FLOAT32, v1::FP32));
        if (metric == v1::COSINE) {
          const std::vector<float> values = result->ValuesAsFloat();
          // Column 1 is the zero row: in every batch entry (2D), in entry 0 (3D).
          for (size_t row = 0; row < (shared ? size_t{3} : size_t{1}) * 17; ++row) {
            EXPECT_EQ(values[row * 13 + 1], 0.0F) << "row " << row;
          }
        }
      }
    }
    ASSERT_TRUE(client_->DeleteGallery(name).ok());
  }
}

TEST_F(ClientTest, GalleryTopKMatchesReferenceOrderInEveryMode) {
  const GalleryProblem g = MakeGalleryProblem(2, 23, 40, 16, 23, /*shared=*/true);
  ASSERT_TRUE(client_->RegisterGallery("ct-topk", g.Gallery()).ok());
  for (const v1::Metric metric : {v1::COSINE, v1::EUCLIDEAN}) {
    const Reference ref = ComputeReference(g.p, metric);
    for (const CallMode mode : {CallMode::kUnary, CallMode::kStream, CallMode::kUpload}) {
      ComputeOptions options = GalleryOptionsFor("ct-topk", metric);
      options.top_k = 5;
      options.max_chunk_bytes = 100;
      auto result = client_->Similarity(g.p.A(), {}, options, mode);
      ASSERT_TRUE(result.ok()) << result.status();
      ASSERT_EQ(result->shape, (std::vector<int64_t>{2, 23, 5}));
      const std::vector<float> values = result->ValuesAsFloat();
      for (size_t row = 0; row < size_t{2} * 23; ++row) {
        const auto expected = ReferenceTopK(ref, row, 40, 5, metric == v1::COSINE);
        for (size_t j = 0; j < 5; ++j) {
          EXPECT_EQ(result->indices[row * 5 + j], expected[j]) << Name(mode) << " row " << row;
          const double want = ref.values[row * 40 + expected[j]];
          EXPECT_NEAR(values[row * 5 + j], want, 1e-4 * (1 + std::abs(want)));
        }
      }
    }
  }
  ASSERT_TRUE(client_->DeleteGallery("ct-topk").ok());
}

TEST_F(ClientTest, GalleryTopKTiesGoToTheLowerColumnInEveryModeAndTileSize) {
  // Small integers make the dot products exact, and gallery row 4 repeats row 1: real ties,
  // which the lower column must win in every mode and with tiles of any height (the
  // interop vector topk_dot_ties_3d, as a 2D gallery).
  GalleryProblem g = MakeGalleryProblem(2, 4, 6, 5, 34, /*shared=*/true);
  std::mt19937 rng(34);
  std::uniform_int_distribution<int> small(-3, 3);
  for (float& x : g.p.a) x = static_cast<float>(small(rng));
  for (float& x : g.gallery) x = static_cast<float>(small(rng));
  std::copy_n(g.gallery.begin() + 5, 5, g.gallery.begin() + 4 * 5);
  for (int64_t k = 0; k < 2; ++k)
    std::copy(g.gallery.begin(), g.gallery.end(), g.p.b.begin() + k * 30);
  ASSERT_TRUE(client_->RegisterGallery("ct-ties", g.Gallery()).ok());
  const Reference ref = ComputeReference(g.p, v1::DOT);
  for (const CallMode mode : {CallMode::kUnary, CallMode::kStream, CallMode::kUpload}) {
    for (const uint32_t chunk : {0U, 24U, 64U}) {
      ComputeOptions options = GalleryOptionsFor("ct-ties", v1::DOT);
      options.top_k = 3;
      options.max_chunk_bytes = chunk;
      auto result = client_->Similarity(g.p.A(), {}, options, mode);
      ASSERT_TRUE(result.ok()) << result.status();
      for (size_t row = 0; row < size_t{2} * 4; ++row) {
        const auto expected = ReferenceTopK(ref, row, 6, 3, /*largest=*/true);
        const std::vector<int32_t> got(result->indices.begin() + row * 3,
                                       result->indices.begin() + row * 3 + 3);
        EXPECT_EQ(got, expected) << Name(mode) << ", max_chunk_bytes " << chunk << ", row " << row;
      }
    }
  }
  ASSERT_TRUE(client_->DeleteGallery("ct-ties").ok());
}

TEST_F(ClientTest, GalleryStorageDtypesHalveTheMemoryAndStayCloseToTheReference) {
  const GalleryProblem g = MakeGalleryProblem(2, 16, 64, 96, 24, /*shared=*/true);
  const Reference ref = ComputeReference(g.p, v1::COSINE);
  int64_t fp32_bytes = 0;
  for (const v1::DataType storage : {v1::FLOAT32, v1::BFLOAT16, v1::FLOAT16}) {
    SCOPED_TRACE(v1::DataType_Name(storage));
    GalleryOptions gallery_options;
    gallery_options.storage_dtype = storage;
    auto info = client_->RegisterGallery("ct-storage", g.Gallery(), gallery_options);
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(info->storage_dtype(), storage);
    EXPECT_EQ(info->dtype(), v1::FLOAT32);
    if (storage == v1::FLOAT32) {
      fp32_bytes = info->bytes();
    } else {
      EXPECT_LT(info->bytes(), fp32_bytes * 3 / 4) << "fp32 held " << fp32_bytes;
    }
    auto result = client_->Similarity(g.p.A(), {}, GalleryOptionsFor("ct-storage"));
    ASSERT_TRUE(result.ok()) << result.status();
    // Rounding the gallery to 8 (bfloat16) or 11 (float16) mantissa bits.
    const double tol = storage == v1::FLOAT32 ? 2e-5 : storage == v1::BFLOAT16 ? 1.6e-2 : 2e-3;
    ExpectMatchesReference(*result, ref, tol);
    if (storage != v1::FLOAT32) {
      EXPECT_FALSE(MatchesReference(*result, ref, 1e-7)) << "no rounding visible at all";
    }
  }
  // A float16 gallery upload (2 bytes per element on the wire).
  std::vector<uint16_t> half(g.gallery.size());
  GalleryProblem rounded = g;
  for (size_t i = 0; i < half.size(); ++i) {
    half[i] = kernels::FloatToF16(g.gallery[i]);
    rounded.gallery[i] = kernels::F16ToFloat(half[i]);
  }
  for (int64_t k = 0; k < 2; ++k) {
    std::copy(rounded.gallery.begin(), rounded.gallery.end(), rounded.p.b.begin() + k * 64 * 96);
  }
  auto info = client_->RegisterGallery(
      "ct-storage", TensorRef{g.gallery_shape, v1::FLOAT16, std::as_bytes(std::span(half))});
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->dtype(), v1::FLOAT16);
  auto result = client_->Similarity(g.p.A(), {}, GalleryOptionsFor("ct-storage"));
  ASSERT_TRUE(result.ok()) << result.status();
  ExpectMatchesReference(*result, ComputeReference(rounded.p, v1::COSINE), 2e-5);
  ASSERT_TRUE(client_->DeleteGallery("ct-storage").ok());
}

TEST_F(ClientTest, GalleryLargerThanOneMessageIsRegisteredInPieces) {
  // 600 x 512 float32 = 1.2 MB, over the server's 1 MiB receive limit.
  const GalleryProblem g = MakeGalleryProblem(1, 4, 600, 512, 25, /*shared=*/true);
  ASSERT_GT(g.gallery.size() * 4, static_cast<size_t>(kMiB));
  auto info = client_->RegisterGallery("ct-large", g.Gallery());
  ASSERT_TRUE(info.ok()) << info.status();
  auto result = client_->Similarity(g.p.A(), {}, GalleryOptionsFor("ct-large", v1::DOT));
  ASSERT_TRUE(result.ok()) << result.status();
  ExpectMatchesReference(*result, ComputeReference(g.p, v1::DOT), 2e-5);
  ASSERT_TRUE(client_->DeleteGallery("ct-large").ok());
}

TEST_F(ClientTest, GalleryVersionsPinReplaceAndOutliveDeletes) {
  const GalleryProblem first = MakeGalleryProblem(2, 6, 5, 8, 26, /*shared=*/true);
  GalleryProblem second = MakeGalleryProblem(2, 6, 8, 8, 27, /*shared=*/true);
  second.p.a = first.p.a;  // the same queries against the replacement
  auto v1_info = client_->RegisterGallery("ct-version", first.Gallery());
  ASSERT_TRUE(v1_info.ok()) << v1_info.status();
  const int64_t v1 = v1_info->version();
  ComputeOptions pinned = GalleryOptionsFor("ct-version");
  pinned.gallery_version = v1;
  auto before = client_->Similarity(first.p.A(), {}, pinned);
  ASSERT_TRUE(before.ok()) << before.status();
  ExpectMatchesReference(*before, ComputeReference(first.p, v1::COSINE), 2e-5);

  auto v2_info = client_->RegisterGallery("ct-version", second.Gallery());
  ASSERT_TRUE(v2_info.ok()) << v2_info.status();
  EXPECT_EQ(v2_info->version(), v1 + 1);
  for (const CallMode mode : {CallMode::kUnary, CallMode::kStream, CallMode::kUpload}) {
    SCOPED_TRACE(Name(mode));
    auto stale = client_->Similarity(first.p.A(), {}, pinned, mode);
    EXPECT_EQ(stale.status().code(), absl::StatusCode::kFailedPrecondition) << stale.status();
    // Version 0 follows the replacement, whose M is 8.
    auto current = client_->Similarity(first.p.A(), {}, GalleryOptionsFor("ct-version"), mode);
    ASSERT_TRUE(current.ok()) << current.status();
    EXPECT_EQ(current->shape, (std::vector<int64_t>{2, 6, 8}));
    ExpectMatchesReference(*current, ComputeReference(second.p, v1::COSINE), 2e-5);
    // A buffer sized for the old M no longer fits.
    ByteVector old_size(before->values.size());
    auto no_fit = client_->Similarity(first.p.A(), {}, GalleryOptionsFor("ct-version"),
                                      OutputRef{old_size, {}}, mode);
    EXPECT_EQ(no_fit.status().code(), absl::StatusCode::kFailedPrecondition) << no_fit.status();
  }
  auto deleted = client_->DeleteGallery("ct-version");
  ASSERT_TRUE(deleted.ok()) << deleted.status();
  EXPECT_EQ(deleted->version(), v1 + 1);
  EXPECT_EQ(client_->GetGallery("ct-version").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(client_->Similarity(first.p.A(), {}, GalleryOptionsFor("ct-version")).status().code(),
            absl::StatusCode::kNotFound);
  auto v3_info = client_->RegisterGallery("ct-version", first.Gallery());
  ASSERT_TRUE(v3_info.ok()) << v3_info.status();
  EXPECT_EQ(v3_info->version(), v1 + 2);  // versions continue across deletes
  ASSERT_TRUE(client_->DeleteGallery("ct-version").ok());
}

TEST_F(ClientTest, ListAndGetGalleriesReportWhatWasRegistered) {
  const GalleryProblem g = MakeGalleryProblem(1, 3, 6, 4, 28, /*shared=*/true);
  const int64_t now_ms = absl::ToUnixMillis(absl::Now());
  for (const char* name : {"ct-list-b", "ct-list-a", "ct-list-c"}) {
    ASSERT_TRUE(client_->RegisterGallery(name, g.Gallery()).ok()) << name;
  }
  auto list = client_->ListGalleries();
  ASSERT_TRUE(list.ok()) << list.status();
  std::vector<std::string> names;
  for (const v1::GalleryInfo& info : *list) names.push_back(info.name());
  EXPECT_TRUE(std::is_sorted(names.begin(), names.end()));
  EXPECT_THAT(names, ::testing::IsSupersetOf({"ct-list-a", "ct-list-b", "ct-list-c"}));
  auto got = client_->GetGallery("ct-list-a");
  ASSERT_TRUE(got.ok()) << got.status();
  const auto listed = std::find_if(
      list->begin(), list->end(), [](const v1::GalleryInfo& i) { return i.name() == "ct-list-a"; });
  ASSERT_NE(listed, list->end());
  EXPECT_EQ(got->version(), listed->version());
  EXPECT_EQ(got->bytes(), listed->bytes());
  EXPECT_THAT(got->shape(), ::testing::ElementsAre(6, 4));
  EXPECT_EQ(got->source(), v1::UPLOADED);
  EXPECT_TRUE(got->path().empty());
  EXPECT_GE(got->prepare_seconds(), 0.0);
  EXPECT_NEAR(static_cast<double>(got->registered_unix_ms()), static_cast<double>(now_ms), 60e3);
  EXPECT_GE(got->last_used_unix_ms(), got->registered_unix_ms());
  ASSERT_TRUE(client_->Similarity(g.p.A(), {}, GalleryOptionsFor("ct-list-a")).ok());
  auto used = client_->GetGallery("ct-list-a");
  ASSERT_TRUE(used.ok());
  EXPECT_GE(used->last_used_unix_ms(), got->last_used_unix_ms());
  for (const char* name : {"ct-list-a", "ct-list-b", "ct-list-c"}) {
    auto deleted = client_->DeleteGallery(name);
    ASSERT_TRUE(deleted.ok()) << deleted.status();
    EXPECT_EQ(deleted->name(), name);
  }
  auto after = client_->ListGalleries();
  ASSERT_TRUE(after.ok());
  for (const v1::GalleryInfo& info : *after) EXPECT_FALSE(absl::StartsWith(info.name(), "ct-list"));
}

TEST_F(ClientTest, GalleryErrorsHaveTheDocumentedCodes) {
  const GalleryProblem g = MakeGalleryProblem(2, 3, 6, 4, 29, /*shared=*/true);
  const auto code = [](const auto& status_or) { return status_or.status().code(); };
  using Code = absl::StatusCode;
  // Unknown names.
  for (const CallMode mode :
       {CallMode::kUnary, CallMode::kStream, CallMode::kUpload, CallMode::kAuto}) {
    EXPECT_EQ(code(client_->Similarity(g.p.A(), {}, GalleryOptionsFor("ct-missing"), mode)),
              Code::kNotFound)
        << Name(mode);
  }
  EXPECT_EQ(code(client_->GetGallery("ct-missing")), Code::kNotFound);
  EXPECT_EQ(code(client_->DeleteGallery("ct-missing")), Code::kNotFound);
  // Names: [A-Za-z0-9._-]{1,128}.
  for (const std::string& bad : {std::string(), std::string("a/b"), std::string("two words"),
                                 std::string(129, 'x'), std::string("caf\xc3\xa9")}) {
    auto registered = client_->RegisterGallery(bad, g.Gallery());
    EXPECT_EQ(code(registered), Code::kInvalidArgument)
        << "'" << bad << "' " << registered.status();
  }
  const std::string longest(128, 'x');
  ASSERT_TRUE(client_->RegisterGallery(longest, g.Gallery()).ok());
  ASSERT_TRUE(client_->DeleteGallery(longest).ok());
  // Shapes and byte counts.
  const auto bytes = std::as_bytes(std::span(g.gallery));
  for (const std::vector<int64_t>& shape :
       std::vector<std::vector<int64_t>>{{24}, {1, 1, 6, 4}, {-6, -4}, {0, 24}, {6, 0}, {}}) {
    auto registered = client_->RegisterGallery("ct-bad", TensorRef{shape, v1::FLOAT32, bytes});
    EXPECT_EQ(code(registered), Code::kInvalidArgument)
        << "[" << absl::StrJoin(shape, ",") << "] " << registered.status();
  }
  for (const size_t size : {bytes.size() - 4, bytes.size() - 1}) {
    auto registered = client_->RegisterGallery(
        "ct-bad", TensorRef{g.gallery_shape, v1::FLOAT32, bytes.first(size)});
    EXPECT_EQ(code(registered), Code::kInvalidArgument) << size << " " << registered.status();
  }
  std::vector<float> longer = g.gallery;
  longer.push_back(1.0F);
  EXPECT_EQ(code(client_->RegisterGallery("ct-bad", TensorRef::Float32(g.gallery_shape, longer))),
            Code::kInvalidArgument);
  std::vector<float> nan = g.gallery;
  nan[5] = std::nanf("");
  EXPECT_EQ(code(client_->RegisterGallery("ct-bad", TensorRef::Float32(g.gallery_shape, nan))),
            Code::kInvalidArgument);
  EXPECT_EQ(code(client_->GetGallery("ct-bad")), Code::kNotFound) << "a failed register left it";
  // The header must come first (sent with the typed stub: our client cannot get this wrong).
  {
    auto stub = v1::Similarity::NewStub(client_->channel());
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
    v1::GalleryInfo info;
    auto writer = stub->RegisterGallery(&context, &info);
    v1::RegisterGalleryRequest data;
    data.set_data(std::string(16, '\0'));
    writer->Write(data);
    v1::RegisterGalleryRequest header;
    header.mutable_header()->set_name("ct-bad");
    header.mutable_header()->add_shape(1);
    header.mutable_header()->add_shape(4);
    writer->Write(header);
    writer->WritesDone();
    const grpc::Status status = writer->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  }
  // Mismatches between A and the gallery.
  ASSERT_TRUE(client_->RegisterGallery("ct-errors", g.Gallery()).ok());
  const GalleryProblem other_d = MakeGalleryProblem(2, 3, 6, 5, 30, /*shared=*/true);
  const GalleryProblem batch3 = MakeGalleryProblem(3, 3, 6, 4, 31, /*shared=*/false);
  ASSERT_TRUE(client_->RegisterGallery("ct-errors-3d", batch3.Gallery()).ok());
  for (const CallMode mode : {CallMode::kUnary, CallMode::kStream, CallMode::kUpload}) {
    SCOPED_TRACE(Name(mode));
    auto d = client_->Similarity(other_d.p.A(), {}, GalleryOptionsFor("ct-errors"), mode);
    EXPECT_EQ(code(d), Code::kInvalidArgument) << d.status();
    auto batch = client_->Similarity(g.p.A(), {}, GalleryOptionsFor("ct-errors-3d"), mode);
    EXPECT_EQ(code(batch), Code::kInvalidArgument) << batch.status();
    ComputeOptions too_many = GalleryOptionsFor("ct-errors");
    too_many.top_k = 7;  // M = 6
    EXPECT_EQ(code(client_->Similarity(g.p.A(), {}, too_many, mode)), Code::kInvalidArgument);
    // b and a gallery at once: refused by the client before anything is sent.
    auto both = client_->Similarity(g.p.A(), g.p.B(), GalleryOptionsFor("ct-errors"), mode);
    EXPECT_EQ(code(both), Code::kInvalidArgument);
    EXPECT_THAT(both.status().message(), HasSubstr("b must be empty"));
  }
  // The server keeps serving, the gallery too.
  auto ok = client_->Similarity(g.p.A(), {}, GalleryOptionsFor("ct-errors"));
  ASSERT_TRUE(ok.ok()) << ok.status();
  ExpectMatchesReference(*ok, ComputeReference(g.p, v1::COSINE), 2e-5);
  ASSERT_TRUE(client_->DeleteGallery("ct-errors").ok());
  ASSERT_TRUE(client_->DeleteGallery("ct-errors-3d").ok());
}

TEST_F(ClientTest, CallsDuringAReplacementSeeOneWholeVersion) {
  // Two galleries of the same shape swapped under running calls: every result must be
  // entirely one of them, never a mix.
  const GalleryProblem x = MakeGalleryProblem(4, 64, 96, 32, 32, /*shared=*/true);
  GalleryProblem y = MakeGalleryProblem(4, 64, 96, 32, 33, /*shared=*/true);
  y.p.a = x.p.a;
  const Reference ref_x = ComputeReference(x.p, v1::DOT);
  const Reference ref_y = ComputeReference(y.p, v1::DOT);
  ASSERT_TRUE(client_->RegisterGallery("ct-swap", x.Gallery()).ok());
  std::atomic<bool> stop{false};
  std::atomic<int> calls{0};
  std::atomic<int> bad{0};
  std::thread reader([&] {
    for (int i = 0; !stop.load() || i < 4; ++i) {
      ComputeOptions options = GalleryOptionsFor("ct-swap", v1::DOT);
      options.max_chunk_bytes = 4096;
      const CallMode mode = i % 2 == 0 ? CallMode::kStream : CallMode::kUpload;
      auto result = client_->Similarity(x.p.A(), {}, options, mode);
      ++calls;
      if (!result.ok() ||
          (!MatchesReference(*result, ref_x, 2e-5) && !MatchesReference(*result, ref_y, 2e-5))) {
        ++bad;
      }
    }
  });
  for (int i = 0; i < 10; ++i) {
    ASSERT_TRUE(client_->RegisterGallery("ct-swap", (i % 2 == 0 ? y : x).Gallery()).ok());
  }
  stop = true;
  reader.join();
  EXPECT_EQ(bad.load(), 0) << "of " << calls.load() << " calls";
  ASSERT_TRUE(client_->DeleteGallery("ct-swap").ok());
}

TEST(ClientConnectTest, UnreachableServerIsUnavailable) {
  // A port that nobody listens on: bind an ephemeral port, then close it.
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  socklen_t len = sizeof(addr);
  ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  close(fd);
  ClientOptions options;
  options.connect_timeout = absl::Milliseconds(300);
  auto client = Client::Connect(absl::StrCat("127.0.0.1:", ntohs(addr.sin_port)), options);
  EXPECT_EQ(client.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(Client::Connect("").status().code(), absl::StatusCode::kInvalidArgument);
}

// A server with --auth_token_file: every call of a client with the token succeeds (and
// computes the right values), without it or with another token each is UNAUTHENTICATED.
TEST(ClientTokenTest, EveryCallCarriesTheBearerTokenAndOthersAreUnauthenticated) {
  const std::string token_file = ::testing::TempDir() + "/client_test_tokens";
  std::ofstream(token_file) << "# test tokens\ntok-right.1\n";
  ServerConfig config = LoopbackServerConfig(1);
  config.auth.token_file = token_file;
  auto server = SimilarityServer::Start(config);
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string target = absl::StrCat("127.0.0.1:", (*server)->port());
  ClientOptions options;
  options.bearer_token = "tok-right.1";
  auto client = Client::Connect(target, options);
  ASSERT_TRUE(client.ok()) << client.status();

  EXPECT_TRUE((*client)->GetInfo().ok());
  const Problem p = MakeProblem(2, 5, 7, 16, 31);
  const Reference ref = ComputeReference(p, v1::COSINE);
  ComputeOptions compute;
  compute.max_chunk_bytes = 64;
  for (CallMode mode : {CallMode::kUnary, CallMode::kStream, CallMode::kUpload, CallMode::kAuto}) {
    auto result = Call(**client, mode, p, compute);
    ASSERT_TRUE(result.ok()) << Name(mode) << ": " << result.status();
    ExpectMatchesReference(*result, ref, 2e-5);
  }
  const TensorRef gallery = TensorRef::Float32({p.batch, p.m, p.d}, p.b);
  auto registered = (*client)->RegisterGallery("token-gallery", gallery);
  ASSERT_TRUE(registered.ok()) << registered.status();
  EXPECT_TRUE((*client)->GetGallery("token-gallery").ok());
  EXPECT_TRUE((*client)->ListGalleries().ok());
  ComputeOptions by_name = compute;
  by_name.gallery = "token-gallery";
  auto result = (*client)->Similarity(p.A(), TensorRef{}, by_name, CallMode::kStream);
  ASSERT_TRUE(result.ok()) << result.status();
  ExpectMatchesReference(*result, ref, 2e-5);
  EXPECT_TRUE((*client)->DeleteGallery("token-gallery").ok());

  for (const std::string token : {"", "tok-wrong"}) {
    ClientOptions other;
    other.bearer_token = token;
    auto refused = Client::Connect(target, other);  // the connection itself is not refused
    ASSERT_TRUE(refused.ok()) << refused.status();
    const std::string message = token.empty() ? "authorization: Bearer <token>" : "not valid";
    const auto expect_refused = [&](const absl::Status& status, const char* what) {
      EXPECT_EQ(status.code(), absl::StatusCode::kUnauthenticated) << what << ": " << status;
      EXPECT_THAT(status.message(), HasSubstr(message)) << what;
    };
    expect_refused((*refused)->GetInfo().status(), "GetInfo");
    for (CallMode mode : {CallMode::kUnary, CallMode::kStream, CallMode::kUpload}) {
      expect_refused(Call(**refused, mode, p, compute).status(), Name(mode));
    }
    expect_refused((*refused)->RegisterGallery("token-gallery", gallery).status(), "Register");
    expect_refused((*refused)->ListGalleries().status(), "ListGalleries");
  }
  (*server)->Shutdown(absl::Seconds(5));
}

TEST(ClientTokenTest, MalformedTokensAreRefusedByConnectWithoutEchoingThem) {
  for (const std::string token :
       {"tok secret", "tok-secret\n", "Bearer tok-secret", "tok\x01secret", "t\xc3\xb6k-secret"}) {
    ClientOptions options;
    options.bearer_token = token;
    options.connect_timeout = absl::ZeroDuration();
    auto client = Client::Connect("127.0.0.1:1", options);
    EXPECT_EQ(client.status().code(), absl::StatusCode::kInvalidArgument) << token;
    EXPECT_THAT(client.status().message(), HasSubstr("bearer token"));
    EXPECT_THAT(client.status().message(), ::testing::Not(HasSubstr("secret")));
  }
  EXPECT_TRUE(CheckBearerToken("").ok());
  EXPECT_TRUE(CheckBearerToken("A-z0-9._~+/==").ok());
}

TEST(ChooseModeTest, FollowsTheDocumentedRule) {
  ClientOptions options;  // unary <= 1 MiB total, upload >= 8 MiB of input
  v1::Limits limits;
  limits.set_max_receive_message_bytes(64 * kMiB);
  limits.set_max_send_message_bytes(256 * kMiB);
  EXPECT_EQ(Client::ChooseMode(1000, 1000, limits, options), CallMode::kUnary);
  EXPECT_EQ(Client::ChooseMode(1000, 2 * kMiB, limits, options), CallMode::kStream);
  EXPECT_EQ(Client::ChooseMode(4 * kMiB, 80 * kMiB, limits, options), CallMode::kStream);
  EXPECT_EQ(Client::ChooseMode(8 * kMiB, 1000, limits, options), CallMode::kUpload);
  EXPECT_EQ(Client::ChooseMode(72 * kMiB, 80 * kMiB, limits, options), CallMode::kUpload);
  // Over the receive limit: upload even when the upload threshold is huge.
  options.auto_upload_min_input_bytes = int64_t{1} << 40;
  EXPECT_EQ(Client::ChooseMode(64 * kMiB, 10, limits, options), CallMode::kUpload);
  EXPECT_EQ(Client::ChooseMode(60 * kMiB, 10, limits, options), CallMode::kStream);
  // Small send limit: a result that does not fit one message is never unary.
  limits.set_max_send_message_bytes(100 << 10);
  options.auto_unary_max_bytes = 4 * kMiB;
  EXPECT_EQ(Client::ChooseMode(1000, 200 << 10, limits, options), CallMode::kStream);
  // Unset limits mean gRPC's 4 MiB default.
  EXPECT_EQ(Client::ChooseMode(5 * kMiB, 10, v1::Limits(), options), CallMode::kUpload);
}

// client/testdata/output_sizes.json, the test vectors the Python client's tests check too,
// parsed into a protobuf Struct (numbers are doubles: every value in the file is exact).
class SharedVectorsTest : public ::testing::Test {
 protected:
  using Struct = google::protobuf::Struct;
  using Value = google::protobuf::Value;

  static void SetUpTestSuite() {
    std::ifstream file(SIMSERVE_CLIENT_TESTDATA "/output_sizes.json");
    ASSERT_TRUE(file.good()) << "cannot read " SIMSERVE_CLIENT_TESTDATA "/output_sizes.json";
    std::stringstream text;
    text << file.rdbuf();
    vectors_ = new Struct;
    ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(text.str(), vectors_).ok());
  }
  static void TearDownTestSuite() {
    delete vectors_;
    vectors_ = nullptr;
  }
  void SetUp() override { ASSERT_NE(vectors_, nullptr); }

  static const google::protobuf::RepeatedPtrField<Value>& List(const char* key) {
    return vectors_->fields().at(key).list_value().values();
  }
  static bool Has(const Struct& s, const char* key) { return s.fields().contains(key); }
  static int64_t Int(const Struct& s, const char* key) {
    return static_cast<int64_t>(s.fields().at(key).number_value());
  }
  static std::vector<int64_t> Ints(const Struct& s, const char* key) {
    std::vector<int64_t> out;
    for (const Value& v : s.fields().at(key).list_value().values()) {
      out.push_back(static_cast<int64_t>(v.number_value()));
    }
    return out;
  }
  static ComputeOptions Options(const Struct& s) {
    ComputeOptions options;
    EXPECT_TRUE(
        v1::DataType_Parse(s.fields().at("output_dtype").string_value(), &options.output_dtype));
    options.top_k = static_cast<uint32_t>(Int(s, "top_k"));
    return options;
  }
  // Limits from a JSON object whose keys are Limits field names (descriptor-driven).
  static v1::Limits LimitsOf(const Struct& s) {
    v1::Limits limits;
    for (const auto& [name, value] : s.fields().at("limits").struct_value().fields()) {
      const auto* field = v1::Limits::descriptor()->FindFieldByName(name);
      EXPECT_NE(field, nullptr) << name;
      if (field != nullptr) {
        limits.GetReflection()->SetInt64(&limits, field,
                                         static_cast<int64_t>(value.number_value()));
      }
    }
    return limits;
  }
  static ClientOptions ThresholdsOf(const Struct& s) {
    const Struct& defaults = vectors_->fields().at("defaults").struct_value();
    ClientOptions options;
    options.auto_unary_max_bytes = Int(Has(s, "unary_max_bytes") ? s : defaults, "unary_max_bytes");
    options.auto_upload_min_input_bytes =
        Int(Has(s, "upload_min_bytes") ? s : defaults, "upload_min_bytes");
    return options;
  }
  static int64_t Elements(const std::vector<int64_t>& shape) {
    return std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<>());
  }

  static Struct* vectors_;
};

SharedVectorsTest::Struct* SharedVectorsTest::vectors_ = nullptr;

TEST_F(SharedVectorsTest, OutputSizes) {
  ASSERT_GT(List("output_sizes").size(), 10);
  for (const Value& entry : List("output_sizes")) {
    const Struct& c = entry.struct_value();
    SCOPED_TRACE(c.fields().at("name").string_value());
    auto spec = OutputSize(Ints(c, "a_shape"), Ints(c, "b_shape"), Options(c));
    if (Has(c, "error")) {
      EXPECT_EQ(absl::StatusCodeToString(spec.status().code()),
                c.fields().at("error").string_value())
          << spec.status();
      continue;
    }
    ASSERT_TRUE(spec.ok()) << spec.status();
    EXPECT_EQ(spec->shape, Ints(c, "out_shape"));
    EXPECT_EQ(spec->values_bytes, Int(c, "values_bytes"));
    EXPECT_EQ(spec->indices_bytes, Int(c, "indices_bytes"));
    EXPECT_EQ(spec->elements, Elements(spec->shape));
  }
}

TEST_F(SharedVectorsTest, AutoModes) {
  ASSERT_GT(List("modes").size(), 10);
  for (const Value& entry : List("modes")) {
    const Struct& c = entry.struct_value();
    SCOPED_TRACE(c.fields().at("name").string_value());
    auto spec = OutputSize(Ints(c, "a_shape"), Ints(c, "b_shape"), Options(c));
    ASSERT_TRUE(spec.ok()) << spec.status();
    const int64_t input_bytes = 4 * (Elements(Ints(c, "a_shape")) + Elements(Ints(c, "b_shape")));
    const CallMode mode =
        Client::ChooseMode(input_bytes, spec->total_bytes(), LimitsOf(c), ThresholdsOf(c));
    EXPECT_EQ(Name(mode), c.fields().at("mode").string_value());
  }
}

TEST_F(SharedVectorsTest, UploadPieceBytes) {
  ASSERT_GT(List("upload_piece_bytes").size(), 4);
  for (const Value& entry : List("upload_piece_bytes")) {
    const Struct& c = entry.struct_value();
    SCOPED_TRACE(c.fields().at("name").string_value());
    EXPECT_EQ(Client::UploadPieceBytes(Int(c, "wanted"), LimitsOf(c)), Int(c, "piece_bytes"));
  }
}

// A deliberately broken server: streams chunks that do not tile the output correctly.
class BrokenStreamService final : public v1::Similarity::Service {
 public:
  // A unary result [1, 4, 3] float32 with one defect, chosen by request.epsilon.
  grpc::Status Compute(grpc::ServerContext* /*context*/, const v1::ComputeRequest* request,
                       v1::ComputeResponse* response) override {
    for (const int64_t dim : {1, 4, 3}) response->add_shape(dim);
    response->set_values_raw(std::string(size_t{4} * 3 * 4, '\0'));
    if (request->epsilon() > 2) {
      response->set_values_raw(std::string(7, '\0'));  // wrong payload size
    } else if (request->epsilon() > 1) {
      response->set_dtype(v1::FLOAT16);  // not the requested dtype
    } else {
      response->set_shape(1, 5);  // not the shape the inputs give
    }
    return grpc::Status::OK;
  }

  grpc::Status ComputeStream(grpc::ServerContext* /*context*/, const v1::ComputeRequest* request,
                             grpc::ServerWriter<v1::ComputeChunk>* writer) override {
    // Output [1, 4, 3] float32; request.top_k selects the defect.
    v1::ComputeChunk chunk;
    chunk.add_shape(1);
    chunk.add_shape(4);
    chunk.add_shape(3);
    chunk.set_row_count(2);
    chunk.set_values_raw(std::string(size_t{2} * 3 * 4, '\0'));
    writer->Write(chunk);
    chunk.clear_shape();
    switch (request->epsilon() > 2 ? 2 : request->epsilon() > 1 ? 1 : 0) {
      case 0:  // a gap: rows 2..3 skipped, row 3 sent
        chunk.set_row_offset(3);
        chunk.set_row_count(1);
        chunk.set_values_raw(std::string(size_t{3} * 4, '\0'));
        writer->Write(chunk);
        break;
      case 1:  // the stream ends after 2 of 4 rows
        break;
      default:  // wrong payload size
        chunk.set_row_offset(2);
        chunk.set_row_count(2);
        chunk.set_values_raw(std::string(5, '\0'));
        writer->Write(chunk);
        break;
    }
    return grpc::Status::OK;
  }
};

TEST(MalformedResultTest, GapsShortStreamsWrongShapesAndBadSizesAreInternalErrors) {
  BrokenStreamService service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  auto client = Client::Connect(absl::StrCat("127.0.0.1:", port));
  ASSERT_TRUE(client.ok()) << client.status();
  const Problem p = MakeProblem(1, 4, 3, 2, 1);
  const std::vector<std::pair<float, std::string>> cases = {
      {0.5F, "expected batch 0 row 2"}, {1.5F, "ended at batch 0 row 2"}, {2.5F, "value bytes"}};
  for (const auto& [selector, message] : cases) {
    ComputeOptions options;
    options.epsilon = selector;
    auto result = (*client)->ComputeStream(p.A(), p.B(), options);
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInternal) << result.status();
    EXPECT_THAT(result.status().message(), HasSubstr(message));
  }
  const std::vector<std::pair<float, std::string>> unary_cases = {
      {0.5F, "shape [1,5,3], expected [1,4,3]"},
      {1.5F, "dtype 2, expected FLOAT32"},
      {2.5F, "7 value bytes, expected 48"}};
  for (const auto& [selector, message] : unary_cases) {
    ComputeOptions options;
    options.epsilon = selector;
    auto result = (*client)->Compute(p.A(), p.B(), options);
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInternal) << result.status();
    EXPECT_THAT(result.status().message(), HasSubstr(message));
  }
  server->Shutdown();
}

// ---- Galleries against a stand-in server: the client's side of the protocol ----

// Records what the gallery RPCs receive and answers them like a server would, but without
// computing: a gallery computation's result has the registered gallery's M and every value
// is its own flat index in the output (so placement can be checked exactly). A gallery
// named "bad-shape" answers with one row too many.
class FakeGalleryService final : public v1::Similarity::Service {
 public:
  static constexpr int64_t kReceiveLimit = 64 << 10;
  static constexpr int64_t kOverhead = 4096;

  struct Registration {
    std::vector<v1::RegisterGalleryRequest::PartCase> parts;
    std::vector<size_t> piece_bytes;
    std::string data;
    v1::GalleryHeader header;
  };
  struct ComputeSeen {
    std::string method;
    bool has_b = false;
    std::string gallery;
    int64_t gallery_version = 0;
    int64_t b_pieces = 0;
  };

  grpc::Status GetInfo(grpc::ServerContext* /*context*/, const v1::GetInfoRequest* /*request*/,
                       v1::GetInfoResponse* response) override {
    response->mutable_limits()->set_max_receive_message_bytes(kReceiveLimit);
    response->mutable_limits()->set_max_send_message_bytes(int64_t{64} << 20);
    response->mutable_limits()->set_message_overhead_bytes(kOverhead);
    return grpc::Status::OK;
  }

  grpc::Status RegisterGallery(grpc::ServerContext* /*context*/,
                               grpc::ServerReader<v1::RegisterGalleryRequest>* reader,
                               v1::GalleryInfo* info) override {
    Registration seen;
    v1::RegisterGalleryRequest request;
    while (reader->Read(&request)) {
      seen.parts.push_back(request.part_case());
      if (request.has_header()) {
        seen.header = request.header();
      } else {
        seen.piece_bytes.push_back(request.data().size());
        seen.data += request.data();
      }
    }
    absl::MutexLock lock(&mu_);
    const v1::GalleryHeader& h = seen.header;
    info->set_name(h.name());
    info->mutable_shape()->CopyFrom(h.shape());
    info->set_dtype(h.dtype());
    info->set_storage_dtype(h.storage_dtype());
    info->set_version(++versions_[h.name()]);
    info->set_bytes(static_cast<int64_t>(seen.data.size()));
    galleries_[h.name()] = *info;
    registrations_.push_back(std::move(seen));
    return grpc::Status::OK;
  }

  grpc::Status GetGallery(grpc::ServerContext* /*context*/, const v1::GetGalleryRequest* request,
                          v1::GalleryInfo* info) override {
    absl::MutexLock lock(&mu_);
    ++get_gallery_calls_;
    const auto it = galleries_.find(request->name());
    if (it == galleries_.end()) return {grpc::StatusCode::NOT_FOUND, "no such gallery"};
    *info = it->second;
    return grpc::Status::OK;
  }

  grpc::Status Compute(grpc::ServerContext* /*context*/, const v1::ComputeRequest* request,
                       v1::ComputeResponse* response) override {
    std::vector<int64_t> shape;
    if (grpc::Status s = Answer("Compute", *request, 0, &shape); !s.ok()) return s;
    response->mutable_shape()->Assign(shape.begin(), shape.end());
    response->set_values_raw(Values(0, Elements(shape)));
    if (request->top_k() > 0) {
      response->set_indices_raw(std::string(static_cast<size_t>(Elements(shape)) * 4, '\0'));
    }
    return grpc::Status::OK;
  }

  grpc::Status ComputeStream(grpc::ServerContext* /*context*/, const v1::ComputeRequest* request,
                             grpc::ServerWriter<v1::ComputeChunk>* writer) override {
    std::vector<int64_t> shape;
    if (grpc::Status s = Answer("ComputeStream", *request, 0, &shape); !s.ok()) return s;
    WriteRows(shape, request->top_k() > 0, writer);
    return grpc::Status::OK;
  }

  grpc::Status ComputeUpload(
      grpc::ServerContext* /*context*/,
      grpc::ServerReaderWriter<v1::ComputeChunk, v1::UploadRequest>* stream) override {
    v1::UploadRequest message;
    v1::ComputeRequest request;
    int64_t b_pieces = 0;
    while (stream->Read(&message)) {
      if (message.has_header()) request = message.header().request();
      if (message.part_case() == v1::UploadRequest::kBData) ++b_pieces;
    }
    std::vector<int64_t> shape;
    if (grpc::Status s = Answer("ComputeUpload", request, b_pieces, &shape); !s.ok()) return s;
    WriteRows(shape, request.top_k() > 0, stream);
    return grpc::Status::OK;
  }

  std::vector<Registration> registrations() {
    absl::MutexLock lock(&mu_);
    return registrations_;
  }
  std::vector<ComputeSeen> computes() {
    absl::MutexLock lock(&mu_);
    return computes_;
  }
  int get_gallery_calls() {
    absl::MutexLock lock(&mu_);
    return get_gallery_calls_;
  }

 private:
  static int64_t Elements(const std::vector<int64_t>& shape) {
    return std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<>());
  }
  // float32 values first, first + 1, ... as raw bytes.
  static std::string Values(int64_t first, int64_t count) {
    std::string raw(static_cast<size_t>(count) * 4, '\0');
    for (int64_t i = 0; i < count; ++i) {
      const auto value = static_cast<float>(first + i);
      std::memcpy(raw.data() + 4 * i, &value, 4);
    }
    return raw;
  }

  // Records the request; the result shape [.., N, M or k] from A and the gallery.
  grpc::Status Answer(const char* method, const v1::ComputeRequest& request, int64_t b_pieces,
                      std::vector<int64_t>* shape) {
    absl::MutexLock lock(&mu_);
    computes_.push_back(
        {method, request.has_b(), request.gallery(), request.gallery_version(), b_pieces});
    const auto it = galleries_.find(request.gallery());
    if (it == galleries_.end()) return {grpc::StatusCode::NOT_FOUND, "no such gallery"};
    if (request.gallery_version() != 0 && request.gallery_version() != it->second.version()) {
      return {grpc::StatusCode::FAILED_PRECONDITION, "version mismatch"};
    }
    shape->assign(request.a().shape().begin(), request.a().shape().end() - 1);
    shape->push_back(request.top_k() > 0 ? request.top_k()
                                         : it->second.shape(it->second.shape_size() - 2));
    if (request.gallery() == "bad-shape") ++(*shape)[shape->size() - 2];
    return grpc::Status::OK;
  }

  // One chunk per row, the first with the full shape (top-k: all indices 0).
  template <typename Writer>
  static void WriteRows(const std::vector<int64_t>& shape, bool top_k, Writer* writer) {
    const int64_t batches = shape.size() == 3 ? shape[0] : 1;
    const int64_t rows = shape[shape.size() - 2];
    const int64_t cols = shape.back();
    for (int64_t k = 0; k < batches; ++k) {
      for (int64_t i = 0; i < rows; ++i) {
        v1::ComputeChunk chunk;
        if (k == 0 && i == 0) chunk.mutable_shape()->Assign(shape.begin(), shape.end());
        chunk.set_batch_index(k);
        chunk.set_row_offset(i);
        chunk.set_row_count(1);
        chunk.set_values_raw(Values((k * rows + i) * cols, cols));
        if (top_k) chunk.set_indices_raw(std::string(static_cast<size_t>(cols) * 4, '\0'));
        writer->Write(chunk);
      }
    }
  }

  absl::Mutex mu_;
  std::map<std::string, int64_t> versions_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, v1::GalleryInfo> galleries_ ABSL_GUARDED_BY(mu_);
  std::vector<Registration> registrations_ ABSL_GUARDED_BY(mu_);
  std::vector<ComputeSeen> computes_ ABSL_GUARDED_BY(mu_);
  int get_gallery_calls_ ABSL_GUARDED_BY(mu_) = 0;
};

class FakeGalleryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    auto client = Connect();
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = *std::move(client);
  }
  void TearDown() override {
    client_.reset();
    if (server_ != nullptr) server_->Shutdown();
  }
  absl::StatusOr<std::unique_ptr<Client>> Connect(const ClientOptions& options = {}) const {
    return Client::Connect(absl::StrCat("127.0.0.1:", port_), options);
  }
  // Registers a float32 gallery [m, d] (values irrelevant to the stand-in).
  v1::GalleryInfo Register(Client& client, const std::string& name, int64_t m, int64_t d) {
    gallery_data_.assign(static_cast<size_t>(m * d), 0.5F);
    auto info = client.RegisterGallery(name, TensorRef::Float32({m, d}, gallery_data_));
    EXPECT_TRUE(info.ok()) << info.status();
    return info.ok() ? *info : v1::GalleryInfo();
  }

  FakeGalleryService service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<Client> client_;
  int port_ = 0;
  std::vector<float> gallery_data_;
};

// What the stand-in answers for a result of `shape`: value = flat index.
void ExpectFlatIndexValues(const Result& result, const std::vector<int64_t>& shape) {
  EXPECT_EQ(result.shape, shape);
  const std::vector<float> values = result.ValuesAsFloat();
  ASSERT_EQ(static_cast<int64_t>(values.size()), result.element_count());
  for (size_t i = 0; i < values.size(); ++i) {
    ASSERT_EQ(values[i], static_cast<float>(i)) << "element " << i;
  }
}

TEST_F(FakeGalleryTest, RegisterSendsTheHeaderFirstThenPiecesWithinTheReceiveLimit) {
  ClientOptions big_pieces;
  big_pieces.upload_piece_bytes = 8 * kMiB;  // clamped to 64 KiB - 4096 by the server's limits
  auto client = Connect(big_pieces);
  ASSERT_TRUE(client.ok());
  const Problem p = MakeProblem(1, 1, 500, 100, 3);  // B: 500 x 100 float32 = 200000 bytes
  GalleryOptions options;
  options.storage_dtype = v1::BFLOAT16;
  auto info = (*client)->RegisterGallery("faces-1", p.B(), options);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->name(), "faces-1");
  EXPECT_THAT(info->shape(), ::testing::ElementsAre(1, 500, 100));
  EXPECT_EQ(info->storage_dtype(), v1::BFLOAT16);
  EXPECT_EQ(info->version(), 1);
  const auto registrations = service_.registrations();
  ASSERT_EQ(registrations.size(), 1U);
  const auto& r = registrations[0];
  ASSERT_FALSE(r.parts.empty());
  EXPECT_EQ(r.parts[0], v1::RegisterGalleryRequest::kHeader);
  EXPECT_EQ(std::count(r.parts.begin(), r.parts.end(), v1::RegisterGalleryRequest::kHeader), 1);
  EXPECT_EQ(r.header.name(), "faces-1");
  EXPECT_THAT(r.header.shape(), ::testing::ElementsAre(1, 500, 100));
  EXPECT_EQ(r.header.dtype(), v1::FLOAT32);
  EXPECT_EQ(r.header.storage_dtype(), v1::BFLOAT16);
  constexpr size_t kPiece = FakeGalleryService::kReceiveLimit - FakeGalleryService::kOverhead;
  EXPECT_THAT(r.piece_bytes, ::testing::ElementsAre(kPiece, kPiece, kPiece, 200000 - 3 * kPiece));
  ASSERT_EQ(r.data.size(), p.b.size() * 4);
  EXPECT_EQ(std::memcmp(r.data.data(), p.b.data(), r.data.size()), 0);
  // Registering again replaces it: version 2.
  auto again = (*client)->RegisterGallery("faces-1", p.B());
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->version(), 2);
  // An empty gallery is a header alone (the server judges it).
  ASSERT_TRUE((*client)->RegisterGallery("empty", TensorRef{{0, 4}, v1::FLOAT32, {}}).ok());
  EXPECT_THAT(service_.registrations().back().parts,
              ::testing::ElementsAre(v1::RegisterGalleryRequest::kHeader));
}

TEST_F(FakeGalleryTest, ComputeWithAGallerySendsNoBAndLearnsMFromTheResult) {
  Register(*client_, "g", 7, 4);
  const Problem p = MakeProblem(2, 3, 1, 4, 1);
  ComputeOptions options;
  options.gallery = "g";
  options.gallery_version = 1;
  for (const CallMode mode :
       {CallMode::kUnary, CallMode::kStream, CallMode::kUpload, CallMode::kAuto}) {
    SCOPED_TRACE(Name(mode));
    auto result = client_->Similarity(p.A(), TensorRef{}, options, mode);
    ASSERT_TRUE(result.ok()) << result.status();
    ExpectFlatIndexValues(*result, {2, 3, 7});
    const auto seen = service_.computes().back();
    EXPECT_FALSE(seen.has_b);
    EXPECT_EQ(seen.gallery, "g");
    EXPECT_EQ(seen.gallery_version, 1);
    EXPECT_EQ(seen.b_pieces, 0);
    if (mode != CallMode::kAuto) {
      EXPECT_EQ(seen.method, mode == CallMode::kUnary    ? "Compute"
                             : mode == CallMode::kStream ? "ComputeStream"
                                                         : "ComputeUpload");
    }
  }
  // 2D A: a 2D result.
  const Problem q = MakeProblem(1, 5, 1, 4, 2, /*two_d=*/true);
  auto two_d = client_->Compute(q.A(), {}, options);
  ASSERT_TRUE(two_d.ok()) << two_d.status();
  ExpectFlatIndexValues(*two_d, {5, 7});
  // The stand-in's errors come through as they are.
  options.gallery_version = 5;
  EXPECT_EQ(client_->Compute(p.A(), {}, options).status().code(),
            absl::StatusCode::kFailedPrecondition);
  options.gallery = "nope";
  options.gallery_version = 0;
  EXPECT_EQ(client_->ComputeStream(p.A(), {}, options).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(FakeGalleryTest, BWithAGalleryIsInvalidArgumentBeforeAnyCall) {
  Register(*client_, "g", 7, 4);
  const Problem p = MakeProblem(2, 3, 7, 4, 1);
  ComputeOptions options;
  options.gallery = "g";
  for (const CallMode mode :
       {CallMode::kAuto, CallMode::kUnary, CallMode::kStream, CallMode::kUpload}) {
    auto result = client_->Similarity(p.A(), p.B(), options, mode);
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << Name(mode);
    EXPECT_THAT(result.status().message(), HasSubstr("b must be empty"));
  }
  const TensorRef rank1 = TensorRef::Float32({static_cast<int64_t>(p.a.size())}, p.a);
  auto rank = client_->Similarity(rank1, {}, options);
  EXPECT_EQ(rank.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(rank.status().message(), HasSubstr("a must be 2D"));
  EXPECT_TRUE(service_.computes().empty());
}

TEST_F(FakeGalleryTest, OutputRefThatDoesNotFitTheGallerysResultIsFailedPrecondition) {
  const v1::GalleryInfo info = Register(*client_, "g", 7, 4);
  const Problem p = MakeProblem(2, 3, 1, 4, 1);
  ComputeOptions options;
  options.gallery = "g";
  const std::vector<int64_t> gallery_shape(info.shape().begin(), info.shape().end());
  auto spec = OutputSize(p.AShape(), gallery_shape, options);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->shape, (std::vector<int64_t>{2, 3, 7}));  // a 2D gallery with a 3D A
  ByteVector values(static_cast<size_t>(spec->values_bytes));
  for (const CallMode mode : {CallMode::kUnary, CallMode::kStream, CallMode::kUpload}) {
    auto fits = client_->Similarity(p.A(), {}, options, OutputRef{values, {}}, mode);
    ASSERT_TRUE(fits.ok()) << Name(mode) << ": " << fits.status();
    EXPECT_EQ(fits->shape, spec->shape);
    float last = 0;
    std::memcpy(&last, values.data() + values.size() - 4, 4);
    EXPECT_EQ(last, 41.0F);
  }
  Register(*client_, "g", 9, 4);  // replaced by one of another M
  for (const CallMode mode : {CallMode::kUnary, CallMode::kStream, CallMode::kUpload}) {
    auto stale = client_->Similarity(p.A(), {}, options, OutputRef{values, {}}, mode);
    EXPECT_EQ(stale.status().code(), absl::StatusCode::kFailedPrecondition) << Name(mode);
    EXPECT_THAT(stale.status().message(), HasSubstr("does not fit the OutputRef"));
    EXPECT_THAT(stale.status().message(), HasSubstr("needs 216"));
  }
  // Top-k is sized without the gallery: checked before the call, as always.
  options.top_k = 2;
  auto top = client_->Similarity(p.A(), {}, options, OutputRef{values, {}});
  EXPECT_EQ(top.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(FakeGalleryTest, ResultShapeOtherThanAsRowsIsInternal) {
  Register(*client_, "bad-shape", 7, 4);
  const Problem p = MakeProblem(2, 3, 1, 4, 1);
  ComputeOptions options;
  options.gallery = "bad-shape";
  for (const CallMode mode : {CallMode::kUnary, CallMode::kStream, CallMode::kUpload}) {
    auto result = client_->Similarity(p.A(), {}, options, mode);
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInternal) << Name(mode);
    EXPECT_THAT(result.status().message(), HasSubstr("shape [2,4,7], expected [2,3,M]"));
  }
}

TEST_F(FakeGalleryTest, AutoSizesAGalleryResultFromItsLastSeenShape) {
  // Registered by another client: this one asks GetGallery once, then uses what it saw.
  auto other = Connect();
  ASSERT_TRUE(other.ok());
  Register(**other, "wide", 3000, 4);
  Register(**other, "narrow", 5, 4);
  const Problem p = MakeProblem(1, 100, 1, 4, 1);  // dense result 100 x 3000 floats = 1.2 MB
  ComputeOptions options;
  options.gallery = "wide";
  auto wide = client_->Similarity(p.A(), {}, options);
  ASSERT_TRUE(wide.ok()) << wide.status();
  EXPECT_EQ(wide->mode, CallMode::kStream);  // over auto_unary_max_bytes (1 MiB)
  ExpectFlatIndexValues(*wide, {1, 100, 3000});
  EXPECT_EQ(service_.get_gallery_calls(), 1);
  options.gallery = "narrow";
  auto narrow = client_->Similarity(p.A(), {}, options);
  ASSERT_TRUE(narrow.ok()) << narrow.status();
  EXPECT_EQ(narrow->mode, CallMode::kUnary);
  EXPECT_EQ(service_.get_gallery_calls(), 2);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(client_->Similarity(p.A(), {}, options).ok());
  EXPECT_EQ(service_.get_gallery_calls(), 2);  // cached
  // Top-k needs no gallery shape; an unknown gallery is the server's NOT_FOUND.
  options.top_k = 3;
  options.gallery = "wide";
  ASSERT_TRUE(client_->Similarity(p.A(), {}, options).ok());
  EXPECT_EQ(service_.get_gallery_calls(), 2);
  options.top_k = 0;
  options.gallery = "missing";
  EXPECT_EQ(client_->Similarity(p.A(), {}, options).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace simserve
