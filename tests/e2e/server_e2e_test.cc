// End-to-end tests of the simserve server: a real gRPC server on an ephemeral loopback
// port, started in-process through simserve_server_lib, called through the generated stub.
// Results are compared with a double-precision reference computed here.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "server/compute_pool.h"
#include "server/server.h"
#include "tests/e2e/e2e_util.h"

namespace simserve::e2e {
namespace {

using ::testing::HasSubstr;
using Stub = v1::Similarity::Stub;

ServerConfig TestConfig() {
  ServerConfig c = TestServerConfig();
  // Every call goes through the compute pool, so the queueing tests mean what they say;
  // ServerE2EInline covers the inline path of small unary calls.
  c.compute.inline_max_flops = 0;
  return c;
}

std::unique_ptr<SimilarityServer> StartServer(const ServerConfig& config) {
  auto server = SimilarityServer::Start(config);
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? std::move(*server) : nullptr;
}

std::shared_ptr<grpc::Channel> Connect(int port) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  return grpc::CreateCustomChannel("127.0.0.1:" + std::to_string(port),
                                   grpc::InsecureChannelCredentials(), args);
}

void SetDeadline(grpc::ClientContext* ctx, absl::Duration d) {
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(absl::ToInt64Milliseconds(d)));
}

grpc::Status Unary(Stub* stub, const v1::ComputeRequest& req, v1::ComputeResponse* resp,
                   absl::Duration deadline = absl::Seconds(60),
                   std::multimap<std::string, std::string>* trailers = nullptr) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx, deadline);
  grpc::Status s = stub->Compute(&ctx, req, resp);
  if (trailers != nullptr) *trailers = Trailers(ctx);
  return s;
}

int64_t RowsOf(const v1::Tensor& t) { return t.shape(t.shape_size() == 3 ? 1 : 0); }

// Reads a ComputeStream; `per_read` sleeps between reads (a slow reader). `cancel_after`
// >= 0 cancels after that many chunks.
StreamResult Stream(Stub* stub, const v1::ComputeRequest& req,
                    absl::Duration per_read = absl::ZeroDuration(),
                    absl::Duration deadline = absl::Seconds(60), int cancel_after = -1) {
  StreamResult r;
  grpc::ClientContext ctx;
  SetDeadline(&ctx, deadline);
  auto reader = stub->ComputeStream(&ctx, req);
  v1::ComputeChunk chunk;
  int64_t next_batch = 0, next_row = 0;
  std::string error;
  while (reader->Read(&chunk)) {
    if (error.empty()) error = AddChunk(&r, chunk, &next_batch, &next_row, RowsOf(req.a()));
    if (cancel_after >= 0 && static_cast<int>(r.chunks.size()) == cancel_after) ctx.TryCancel();
    if (per_read > absl::ZeroDuration()) absl::SleepFor(per_read);
  }
  r.status = reader->Finish();
  r.trailers = Trailers(ctx);
  EXPECT_EQ(error, "");
  return r;
}

// A ComputeUpload of `req` (which carries the data): header, B, then A in `piece` bytes.
StreamResult Upload(Stub* stub, const v1::ComputeRequest& req, size_t piece = 64 << 10) {
  StreamResult r;
  grpc::ClientContext ctx;
  SetDeadline(&ctx, absl::Seconds(120));
  auto stream = stub->ComputeUpload(&ctx);
  v1::UploadRequest header;
  *header.mutable_header()->mutable_request() = req;
  header.mutable_header()->mutable_request()->mutable_a()->clear_raw();
  header.mutable_header()->mutable_request()->mutable_b()->clear_raw();
  bool ok = stream->Write(header);
  for (const std::string* data : {&req.b().raw(), &req.a().raw()}) {
    for (size_t off = 0; ok && off < data->size(); off += piece) {
      v1::UploadRequest part;
      std::string bytes = data->substr(off, piece);
      if (data == &req.b().raw()) {
        part.set_b_data(std::move(bytes));
      } else {
        part.set_a_data(std::move(bytes));
      }
      ok = stream->Write(part);
    }
  }
  stream->WritesDone();
  v1::ComputeChunk chunk;
  int64_t next_batch = 0, next_row = 0;
  std::string error;
  while (stream->Read(&chunk)) {
    if (error.empty()) error = AddChunk(&r, chunk, &next_batch, &next_row, RowsOf(req.a()));
  }
  r.status = stream->Finish();
  r.trailers = Trailers(ctx);
  EXPECT_EQ(error, "");
  return r;
}

class ServerE2E : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    server_ = StartServer(TestConfig()).release();
    ASSERT_NE(server_, nullptr);
    stub_ = v1::Similarity::NewStub(Connect(server_->port())).release();
  }
  static void TearDownTestSuite() {
    delete stub_;
    delete server_;
  }

  // A small request that must succeed: the server still serves after whatever happened.
  static void ExpectStillServes() {
    const Problem p = RandomProblem(1, 3, 4, 8, 99);
    v1::ComputeResponse resp;
    ASSERT_TRUE(Unary(stub_, MakeRequest(p, v1::DOT), &resp).ok());
    ExpectMatches(p, MakeRequest(p, v1::DOT), {resp.shape().begin(), resp.shape().end()},
                  resp.values_raw(), resp.indices_raw(), resp.dtype());
  }

  static SimilarityServer* server_;
  static Stub* stub_;
};

SimilarityServer* ServerE2E::server_ = nullptr;
Stub* ServerE2E::stub_ = nullptr;

const v1::Metric kMetrics[] = {v1::COSINE, v1::DOT, v1::EUCLIDEAN, v1::SQUARED_EUCLIDEAN};
const v1::DataType kDtypes[] = {v1::FLOAT32, v1::BFLOAT16, v1::FLOAT16};

TEST_F(ServerE2E, EveryRpcMetricAndOutputDtypeMatchesReference) {
  const Problem p = RandomProblem(2, 5, 7, 16, 1, /*zero_row=*/2);
  for (v1::Metric metric : kMetrics) {
    for (v1::DataType dtype : kDtypes) {
      SCOPED_TRACE(testing::Message() << "metric " << metric << " dtype " << dtype);
      v1::ComputeRequest req = MakeRequest(p, metric, dtype);
      req.set_max_chunk_bytes(40);  // 2-3 rows per tile: several tiles per batch entry
      v1::ComputeResponse resp;
      ASSERT_TRUE(Unary(stub_, req, &resp).ok());
      ExpectMatches(p, req, {resp.shape().begin(), resp.shape().end()}, resp.values_raw(), "",
                    resp.dtype());
      StreamResult s = Stream(stub_, req);
      ASSERT_TRUE(s.status.ok()) << s.status.error_message();
      EXPECT_GT(s.chunks.size(), 2U);
      ExpectMatches(p, req, s.shape, s.values, s.indices, s.dtype);
      StreamResult u = Upload(stub_, req, 100);  // pieces split elements and rows
      ASSERT_TRUE(u.status.ok()) << u.status.error_message();
      ExpectMatches(p, req, u.shape, u.values, u.indices, u.dtype);
    }
  }
}

TEST_F(ServerE2E, TopKMatchesReferenceOnEveryRpc) {
  const Problem p = RandomProblem(2, 6, 20, 12, 2);
  for (v1::Metric metric : kMetrics) {
    SCOPED_TRACE(testing::Message() << "metric " << metric);
    v1::ComputeRequest req = MakeRequest(p, metric, v1::FLOAT32, /*top_k=*/5);
    req.set_max_chunk_bytes(50);
    v1::ComputeResponse resp;
    ASSERT_TRUE(Unary(stub_, req, &resp).ok());
    ExpectMatches(p, req, {resp.shape().begin(), resp.shape().end()}, resp.values_raw(),
                  resp.indices_raw(), resp.dtype());
    StreamResult s = Stream(stub_, req);
    ASSERT_TRUE(s.status.ok());
    ExpectMatches(p, req, s.shape, s.values, s.indices, s.dtype);
    StreamResult u = Upload(stub_, req);
    ASSERT_TRUE(u.status.ok());
    ExpectMatches(p, req, u.shape, u.values, u.indices, u.dtype);
  }
}

TEST_F(ServerE2E, CosineEpsilonFollowsKerasClamp) {
  Problem p = RandomProblem(1, 4, 5, 8, 3);
  for (int x = 0; x < 8; ++x) p.a[x] *= 1e-3F;  // a tiny row: the clamp matters
  v1::ComputeRequest req = MakeRequest(p, v1::COSINE);
  req.set_epsilon(1e-3F);
  v1::ComputeResponse resp;
  ASSERT_TRUE(Unary(stub_, req, &resp).ok());
  ExpectMatches(p, req, {resp.shape().begin(), resp.shape().end()}, resp.values_raw(), "",
                resp.dtype());
}

// Bit for bit where oneDNN runs its brgemm kernels (AVX-512); gemm:jit (AVX2-only CPUs) may
// split the reduction differently by tile size, so there the values agree to a few ulp.
void ExpectSameValues(const std::string& got, const std::string& want) {
  if (__builtin_cpu_supports("avx512f")) {
    EXPECT_EQ(got, want);
    return;
  }
  ASSERT_EQ(got.size(), want.size());
  std::vector<float> g(got.size() / 4), w(want.size() / 4);
  std::memcpy(g.data(), got.data(), got.size());
  std::memcpy(w.data(), want.data(), want.size());
  for (size_t i = 0; i < g.size(); ++i) {
    ASSERT_NEAR(g[i], w[i], 1e-6 * std::max(1.0F, std::fabs(w[i]))) << "element " << i;
  }
}

TEST_F(ServerE2E, StreamedTilesReassembleToExactlyTheUnaryResult) {
  const Problem p = RandomProblem(3, 50, 40, 32, 4);
  for (uint32_t top_k : {0U, 3U}) {
    v1::ComputeRequest req = MakeRequest(p, v1::COSINE, v1::FLOAT32, top_k);
    req.set_max_chunk_bytes(1000);
    v1::ComputeResponse resp;
    ASSERT_TRUE(Unary(stub_, req, &resp).ok());
    StreamResult s = Stream(stub_, req);
    ASSERT_TRUE(s.status.ok());
    ExpectSameValues(s.values, resp.values_raw());
    EXPECT_EQ(s.indices, resp.indices_raw());
    EXPECT_EQ(s.shape, std::vector<int64_t>(resp.shape().begin(), resp.shape().end()));
    for (const auto& chunk : s.chunks) {
      EXPECT_LE(chunk.values_raw().size() + chunk.indices_raw().size(), 1000U);
    }
    StreamResult u = Upload(stub_, req, 777);
    ASSERT_TRUE(u.status.ok());
    ExpectSameValues(u.values, resp.values_raw());
    EXPECT_EQ(u.indices, resp.indices_raw());
  }
}

TEST_F(ServerE2E, TwoDimensionalInputsGiveTwoDimensionalOutput) {
  const Problem p = RandomProblem(1, 6, 9, 10, 5);
  const v1::ComputeRequest req = MakeRequest(p, v1::EUCLIDEAN, v1::FLOAT32, 0, /*two_d=*/true);
  v1::ComputeResponse resp;
  ASSERT_TRUE(Unary(stub_, req, &resp).ok());
  ExpectMatches(p, req, {resp.shape().begin(), resp.shape().end()}, resp.values_raw(), "",
                resp.dtype());
  StreamResult s = Stream(stub_, req);
  ASSERT_TRUE(s.status.ok());
  EXPECT_EQ(s.shape, (std::vector<int64_t>{6, 9}));
  StreamResult u = Upload(stub_, req);
  ASSERT_TRUE(u.status.ok());
  EXPECT_EQ(u.values, resp.values_raw());
}

TEST_F(ServerE2E, ValuesAndRawInputsGiveTheSameResult) {
  const Problem p = RandomProblem(2, 4, 6, 8, 6);
  const v1::ComputeRequest raw = MakeRequest(p, v1::COSINE);
  v1::ComputeRequest values = raw;
  for (auto* t : {values.mutable_a(), values.mutable_b()}) t->clear_raw();
  for (float x : p.a) values.mutable_a()->mutable_values()->add_values(x);
  for (float x : p.b) values.mutable_b()->mutable_values()->add_values(x);
  v1::ComputeResponse from_raw, from_values;
  ASSERT_TRUE(Unary(stub_, raw, &from_raw).ok());
  ASSERT_TRUE(Unary(stub_, values, &from_values).ok());
  EXPECT_EQ(from_raw.values_raw(), from_values.values_raw());
  ExpectMatches(p, raw, {from_raw.shape().begin(), from_raw.shape().end()}, from_raw.values_raw(),
                "", from_raw.dtype());
}

TEST_F(ServerE2E, TrailingMetadataCarriesServerTimings) {
  const Problem p = RandomProblem(1, 4, 4, 8, 7);
  v1::ComputeResponse resp;
  std::multimap<std::string, std::string> trailers;
  ASSERT_TRUE(Unary(stub_, MakeRequest(p, v1::DOT), &resp, absl::Seconds(30), &trailers).ok());
  StreamResult s = Stream(stub_, MakeRequest(p, v1::DOT));
  for (const auto* t : {&trailers, &s.trailers}) {
    for (const char* key : {"simserve-queue-ms", "simserve-compute-ms", "simserve-total-ms"}) {
      auto it = t->find(key);
      ASSERT_NE(it, t->end()) << key;
      EXPECT_GE(std::stod(it->second), 0.0) << key;
    }
    EXPECT_GE(std::stod(t->find("simserve-total-ms")->second),
              std::stod(t->find("simserve-compute-ms")->second));
  }
}

struct BadCase {
  const char* name;
  std::function<void(v1::ComputeRequest*)> mutate;
  grpc::StatusCode code;
  const char* message;
};

TEST_F(ServerE2E, BadInputsGetTheirStatusAndTheServerKeepsServing) {
  const Problem p = RandomProblem(2, 3, 4, 5, 8);
  auto set_nan = [](v1::Tensor* t, size_t index) {
    float nan = std::numeric_limits<float>::quiet_NaN();
    std::memcpy(t->mutable_raw()->data() + 4 * index, &nan, 4);
  };
  const BadCase cases[] = {
      {"wrong rank", [](auto* r) { r->mutable_a()->add_shape(1); },
       grpc::StatusCode::INVALID_ARGUMENT, "tensor a has rank 4"},
      {"batch mismatch", [](auto* r) { r->mutable_b()->set_shape(0, 1); },
       grpc::StatusCode::INVALID_ARGUMENT, "batch mismatch"},
      {"D mismatch", [](auto* r) { r->mutable_b()->set_shape(2, 4); },
       grpc::StatusCode::INVALID_ARGUMENT, "D mismatch"},
      {"byte length", [](auto* r) { r->mutable_a()->mutable_raw()->append("xyz"); },
       grpc::StatusCode::INVALID_ARGUMENT, "tensor a: raw has 123 bytes"},
      {"zero dim", [](auto* r) { r->mutable_a()->set_shape(1, 0); },
       grpc::StatusCode::INVALID_ARGUMENT, "must be positive"},
      {"negative dim", [](auto* r) { r->mutable_b()->set_shape(1, -4); },
       grpc::StatusCode::INVALID_ARGUMENT, "tensor b has dimension 1 = -4"},
      {"overflow",
       [](auto* r) {
         r->mutable_a()->set_shape(0, int64_t{1} << 62);
         r->mutable_b()->set_shape(0, int64_t{1} << 62);
       },
       grpc::StatusCode::RESOURCE_EXHAUSTED, "more than 2^63 elements"},
      {"dtype", [](auto* r) { r->mutable_b()->set_dtype(static_cast<v1::DataType>(7)); },
       grpc::StatusCode::INVALID_ARGUMENT, "unsupported dtype 7"},
      {"top_k", [](auto* r) { r->set_top_k(5); }, grpc::StatusCode::INVALID_ARGUMENT,
       "top_k = 5 exceeds M = 4"},
      {"NaN", [&](auto* r) { set_nan(r->mutable_b(), 17); }, grpc::StatusCode::INVALID_ARGUMENT,
       "tensor b contains NaN or Inf at flat index 17"},
      {"empty tensor", [](auto* r) { r->clear_a(); }, grpc::StatusCode::INVALID_ARGUMENT,
       "tensor a is missing or empty"},
      {"no data", [](auto* r) { r->mutable_b()->clear_raw(); }, grpc::StatusCode::INVALID_ARGUMENT,
       "tensor b has no data"},
      {"epsilon", [](auto* r) { r->set_epsilon(-0.5F); }, grpc::StatusCode::INVALID_ARGUMENT,
       "epsilon"},
      {"too many elements", [](auto* r) { r->mutable_a()->set_shape(1, int64_t{1} << 30); },
       grpc::StatusCode::RESOURCE_EXHAUSTED, "max_input_elements"},
  };
  for (const BadCase& c : cases) {
    SCOPED_TRACE(c.name);
    v1::ComputeRequest req = MakeRequest(p, v1::COSINE);
    c.mutate(&req);
    v1::ComputeResponse resp;
    grpc::Status unary = Unary(stub_, req, &resp);
    EXPECT_EQ(unary.error_code(), c.code) << unary.error_message();
    EXPECT_THAT(unary.error_message(), HasSubstr(c.message));
    StreamResult s = Stream(stub_, req);
    EXPECT_EQ(s.status.error_code(), c.code);
    EXPECT_THAT(s.status.error_message(), HasSubstr(c.message));
    EXPECT_TRUE(s.chunks.empty());
  }
  ExpectStillServes();
}

TEST_F(ServerE2E, UnaryResultOverSendLimitSaysUseComputeStream) {
  // 8192 x 8192 float32 = 256 MiB: over the default 256 MiB send limit with framing.
  Problem p;
  p.n = p.m = 8192;
  p.d = 1;
  p.a.assign(8192, 1.0F);
  p.b.assign(8192, 1.0F);
  v1::ComputeResponse resp;
  grpc::Status s = Unary(stub_, MakeRequest(p, v1::DOT), &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(s.error_message(), HasSubstr("use ComputeStream"));
  ExpectStillServes();
}

// Sends `messages` on a ComputeUpload and returns the final status.
grpc::Status RawUpload(Stub* stub, const std::vector<v1::UploadRequest>& messages,
                       StreamResult* out = nullptr) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx, absl::Seconds(30));
  auto stream = stub->ComputeUpload(&ctx);
  for (const auto& m : messages) {
    if (!stream->Write(m)) break;
  }
  stream->WritesDone();
  v1::ComputeChunk chunk;
  while (stream->Read(&chunk)) {
    if (out != nullptr) out->chunks.push_back(chunk);
  }
  return stream->Finish();
}

TEST_F(ServerE2E, MalformedUploadStreamsAreInvalidArgument) {
  const Problem p = RandomProblem(1, 4, 3, 4, 9);
  const v1::ComputeRequest full = MakeRequest(p, v1::COSINE);
  v1::UploadRequest header;
  *header.mutable_header()->mutable_request() =
      MakeRequest(p, v1::COSINE, v1::FLOAT32, 0, false, /*with_data=*/false);
  auto a_data = [&](size_t from, size_t len) {
    v1::UploadRequest m;
    m.set_a_data(full.a().raw().substr(from, len));
    return m;
  };
  auto b_data = [&](size_t from, size_t len) {
    v1::UploadRequest m;
    m.set_b_data(full.b().raw().substr(from, len));
    return m;
  };
  const size_t a_bytes = full.a().raw().size();  // 64
  const size_t b_bytes = full.b().raw().size();  // 48
  v1::UploadRequest header_with_data;
  *header_with_data.mutable_header()->mutable_request() = full;
  struct Case {
    const char* name;
    std::vector<v1::UploadRequest> messages;
    const char* message;
  };
  const Case cases[] = {
      {"data before header", {b_data(0, b_bytes)}, "b_data before the upload header"},
      {"a before header", {a_data(0, 8)}, "a_data before the upload header"},
      {"second header", {header, header}, "second upload header"},
      {"too much b", {header, b_data(0, b_bytes), b_data(0, 4)}, "too much data for tensor b"},
      {"too much a in one piece",
       {header, b_data(0, b_bytes), a_data(0, a_bytes), a_data(0, 4)},
       "too much data for tensor a"},
      {"too little at half-close",
       {header, b_data(0, b_bytes), a_data(0, 10)},
       "upload stream ended early"},
      {"nothing", {}, "ended before its header"},
      {"header with data", {header_with_data}, "carries data"},
      {"empty message", {header, v1::UploadRequest()}, "empty UploadRequest"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    grpc::Status s = RawUpload(stub_, c.messages);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr(c.message));
  }
  // NaN in a piece: named with its flat index across pieces.
  std::string a_raw = full.a().raw();
  const float inf = std::numeric_limits<float>::infinity();
  std::memcpy(a_raw.data() + size_t{4} * 13, &inf, 4);
  v1::UploadRequest a1, a2;
  a1.set_a_data(a_raw.substr(0, 30));  // splits element 7
  a2.set_a_data(a_raw.substr(30));
  grpc::Status s = RawUpload(stub_, {header, b_data(0, b_bytes), a1, a2});
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("tensor a contains NaN or Inf at flat index 13"));
  // And the well-formed stream works.
  StreamResult ok;
  EXPECT_TRUE(RawUpload(stub_, {header, b_data(0, b_bytes), a_data(0, a_bytes)}, &ok).ok());
  EXPECT_EQ(ok.chunks.size(), 1U);
  // A and B may be interleaved in any way (each tensor's pieces in order).
  StreamResult interleaved;
  EXPECT_TRUE(RawUpload(stub_,
                        {header, a_data(0, 24), b_data(0, 20), a_data(24, a_bytes - 24),
                         b_data(20, b_bytes - 20)},
                        &interleaved)
                  .ok());
  EXPECT_EQ(interleaved.values, ok.values);
  ExpectStillServes();
}

TEST_F(ServerE2E, UploadOf64MiBStartsComputingBeforeAIsComplete) {
#if defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "64 MiB through TSan-instrumented code takes minutes; run in release/asan";
#endif
  // A: 16384 x 1024 float32 = 64 MiB (the receive limit is 64 MiB per message), B small.
  const int64_t n = 16384, m = 32, d = 1024;
  Problem p = RandomProblem(1, 1, m, d, 10);
  p.n = n;
  p.a.resize(n * d);
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> dist(-1.0F, 1.0F);
  for (float& x : p.a) x = dist(rng);
  v1::ComputeRequest req = MakeRequest(p, v1::COSINE, v1::FLOAT32, 0, false, false);
  req.set_max_chunk_bytes(64 * 1024);  // 512 rows per tile
  grpc::ClientContext ctx;
  SetDeadline(&ctx, absl::Seconds(120));
  auto stream = stub_->ComputeUpload(&ctx);
  v1::UploadRequest msg;
  *msg.mutable_header()->mutable_request() = req;
  ASSERT_TRUE(stream->Write(msg));
  msg.set_b_data(Bytes(p.b));
  ASSERT_TRUE(stream->Write(msg));
  const std::string a = Bytes(p.a);
  ASSERT_GE(a.size(), size_t{64} << 20);
  const size_t piece = 1 << 20;
  StreamResult r;
  int64_t next_batch = 0, next_row = 0;
  v1::ComputeChunk chunk;
  for (size_t off = 0; off < a.size(); off += piece) {
    msg.set_a_data(a.substr(off, piece));
    ASSERT_TRUE(stream->Write(msg));
    if (off == 4 * piece) {
      // Only 5 of 64 MiB sent: a tile must already come back (full duplex).
      ASSERT_TRUE(stream->Read(&chunk));
      EXPECT_EQ(AddChunk(&r, chunk, &next_batch, &next_row, n), "");
    }
  }
  stream->WritesDone();
  while (stream->Read(&chunk)) {
    ASSERT_EQ(AddChunk(&r, chunk, &next_batch, &next_row, n), "");
  }
  ASSERT_TRUE(stream->Finish().ok());
  EXPECT_EQ(r.shape, (std::vector<int64_t>{1, n, m}));
  ASSERT_EQ(r.values.size(), static_cast<size_t>(n * m * 4));
  // Check a sample of rows against the reference (the full double reference is slow).
  const std::vector<double> got = Decode(r.values, v1::FLOAT32);
  for (int64_t i = 0; i < n; i += 397) {
    Problem row{1,  1, m, d, std::vector<float>(p.a.begin() + i * d, p.a.begin() + (i + 1) * d),
                p.b};
    const std::vector<double> ref = Reference(row, v1::COSINE);
    for (int64_t j = 0; j < m; ++j) {
      EXPECT_NEAR(got[i * m + j], ref[j], Tolerance(ref[j], v1::FLOAT32, d)) << i << "," << j;
    }
  }
}

TEST_F(ServerE2E, ClientCancelMidStreamFreesTheCall) {
  const Problem p = RandomProblem(1, 400, 256, 16, 12);
  v1::ComputeRequest req = MakeRequest(p, v1::DOT);
  req.set_max_chunk_bytes(4096);  // 4 rows per tile, 100 tiles
  StreamResult s = Stream(stub_, req, absl::Milliseconds(5), absl::Seconds(30), /*cancel_after=*/3);
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_LT(s.chunks.size(), 100U);
  // The server lets go of the call's buffered tiles (bounded wait, no timing assertion).
  for (int i = 0; i < 500 && server_->stats().stream_buffered_bytes.load() != 0; ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_EQ(server_->stats().stream_buffered_bytes.load(), 0);
  ExpectStillServes();
}

TEST_F(ServerE2E, DeadlineExpiresWhileStreaming) {
  const Problem p = RandomProblem(1, 400, 256, 16, 13);
  v1::ComputeRequest req = MakeRequest(p, v1::DOT);
  req.set_max_chunk_bytes(4096);
  StreamResult s = Stream(stub_, req, absl::Milliseconds(20), absl::Milliseconds(300));
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_LT(s.chunks.size(), 100U);
  ExpectStillServes();
}

// Occupies the pool's only worker until Release() so that requests stay queued.
class WorkerBlocker {
 public:
  explicit WorkerBlocker(ComputePool& pool) {
    ComputeTask t;
    t.run = [this](absl::Duration) {
      started_.Notify();
      release_.WaitForNotification();
    };
    t.skip = [this](const absl::Status&) { started_.Notify(); };
    EXPECT_TRUE(pool.Submit(std::move(t), false).ok());
    started_.WaitForNotification();
  }
  ~WorkerBlocker() { Release(); }
  void Release() {
    if (!release_.HasBeenNotified()) release_.Notify();
  }

 private:
  Event started_;
  Event release_;
};

void WaitUntilQueueEmpty(SimilarityServer* server) {
  for (int i = 0; i < 1000 && server->queued_tasks() != 0; ++i) {
    absl::SleepFor(absl::Milliseconds(5));
  }
}

TEST_F(ServerE2E, RequestWhoseDeadlineExpiresWhileQueuedIsNeverComputed) {
  const Problem p = RandomProblem(2, 8, 8, 8, 14);
  WorkerBlocker blocker(server_->pool());
  const int64_t tiles_before = server_->stats().tiles_computed.load();
  v1::ComputeResponse resp;
  EXPECT_EQ(Unary(stub_, MakeRequest(p, v1::DOT), &resp, absl::Milliseconds(200)).error_code(),
            grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_EQ(Stream(stub_, MakeRequest(p, v1::DOT), absl::ZeroDuration(), absl::Milliseconds(200))
                .status.error_code(),
            grpc::StatusCode::DEADLINE_EXCEEDED);
  // The server's deadline trails the client's by the time the request took to arrive; wait
  // until it has surely passed there too before letting the worker take the queued tasks.
  absl::SleepFor(absl::Milliseconds(50));
  blocker.Release();
  WaitUntilQueueEmpty(server_);
  EXPECT_EQ(server_->stats().tiles_computed.load(), tiles_before);
  ExpectStillServes();
}

TEST(ServerE2EInline, SmallUnaryCallsRunInlineWhileTheWorkersAreBusy) {
  ServerConfig config = TestConfig();
  config.compute.inline_max_flops = ServerConfig().compute.inline_max_flops;  // the default
  auto server = StartServer(config);
  ASSERT_NE(server, nullptr);
  auto stub = v1::Similarity::NewStub(Connect(server->port()));
  WorkerBlocker blocker(server->pool());  // the only worker is busy
  // 1x8x256x128 (0.5 MFLOP, 132 KB): computed on the gRPC thread, correct, not queued.
  const Problem small = RandomProblem(1, 8, 256, 128, 31);
  const v1::ComputeRequest req = MakeRequest(small, v1::COSINE);
  v1::ComputeResponse resp;
  grpc::Status status = Unary(stub.get(), req, &resp, absl::Seconds(10));
  ASSERT_TRUE(status.ok()) << status.error_message();
  ExpectMatches(small, req, {resp.shape().begin(), resp.shape().end()}, resp.values_raw(), "",
                resp.dtype());
  // NaN checks and every other rule apply inline as well.
  v1::ComputeRequest bad = req;
  std::vector<float> a = small.a;
  a[5] = std::numeric_limits<float>::quiet_NaN();
  bad.mutable_a()->set_raw(Bytes(a));
  status = Unary(stub.get(), bad, &resp, absl::Seconds(10));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("tensor a contains NaN or Inf at flat index 5"));
  // A bigger call waits for the pool: with the worker held it misses its deadline.
  const Problem big = RandomProblem(1, 64, 512, 128, 32);  // 8 MFLOP
  EXPECT_EQ(
      Unary(stub.get(), MakeRequest(big, v1::COSINE), &resp, absl::Milliseconds(200)).error_code(),
      grpc::StatusCode::DEADLINE_EXCEEDED);
  blocker.Release();
}

TEST(ServerE2EQueue, FullQueueIsResourceExhaustedStatingTheLimit) {
  ServerConfig config = TestConfig();
  config.limits.max_queued_requests = 1;
  auto server = StartServer(config);
  ASSERT_NE(server, nullptr);
  auto stub = v1::Similarity::NewStub(Connect(server->port()));
  const Problem p = RandomProblem(1, 4, 4, 8, 15);
  const v1::ComputeRequest req = MakeRequest(p, v1::DOT);
  WorkerBlocker blocker(server->pool());
  grpc::ClientContext ctx;
  SetDeadline(&ctx, absl::Seconds(30));
  v1::ComputeResponse queued_resp;
  Event queued_done;
  grpc::Status queued_status;
  stub->async()->Compute(&ctx, &req, &queued_resp, [&](grpc::Status s) {
    queued_status = std::move(s);
    queued_done.Notify();
  });
  for (int i = 0; i < 1000 && server->queued_tasks() < 1; ++i) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  ASSERT_EQ(server->queued_tasks(), 1);
  v1::ComputeResponse resp;
  grpc::Status full = Unary(stub.get(), req, &resp);
  EXPECT_EQ(full.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(full.error_message(), HasSubstr("max_queued_requests = 1"));
  blocker.Release();
  queued_done.WaitForNotification();
  EXPECT_TRUE(queued_status.ok()) << queued_status.error_message();
  ExpectMatches(p, req, {queued_resp.shape().begin(), queued_resp.shape().end()},
                queued_resp.values_raw(), "", queued_resp.dtype());
}

TEST(ServerE2EInflight, OverInflightBytesIsResourceExhausted) {
  ServerConfig config = TestConfig();
  config.limits.max_inflight_bytes = 1000;
  auto server = StartServer(config);
  ASSERT_NE(server, nullptr);
  auto stub = v1::Similarity::NewStub(Connect(server->port()));
  const Problem p = RandomProblem(1, 10, 10, 8, 16);  // 640 input + 400 output bytes
  v1::ComputeResponse resp;
  grpc::Status s = Unary(stub.get(), MakeRequest(p, v1::DOT), &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(s.error_message(), HasSubstr("max_inflight_bytes = 1000"));
}

TEST(ServerE2ESlowReader, ServerBuffersAtMostTheWindowOfTiles) {
  ServerConfig config = TestConfig();
  config.compute.stream_window = 2;
  auto server = StartServer(config);
  ASSERT_NE(server, nullptr);
  auto stub = v1::Similarity::NewStub(Connect(server->port()));
  const Problem p = RandomProblem(1, 400, 1024, 8, 17);
  v1::ComputeRequest req = MakeRequest(p, v1::DOT);
  req.set_max_chunk_bytes(16384);  // 4 rows of 4 KiB per tile: 100 tiles, 1.6 MB in all
  StreamResult s = Stream(stub.get(), req, absl::Milliseconds(3));
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(s.chunks.size(), 100U);
  ExpectMatches(p, req, s.shape, s.values, s.indices, s.dtype);
  const int64_t peak = server->stats().stream_buffered_bytes_peak.load();
  std::printf("slow reader: peak server-side buffered result bytes %lld (window 2 x 16384)\n",
              static_cast<long long>(peak));
  EXPECT_GT(peak, 0);
  EXPECT_LE(peak, 2 * 16384);
}

TEST_F(ServerE2E, ManyConcurrentClientsAllGetCorrectResults) {
  constexpr int kClients = 8;
  constexpr int kCalls = 4;
  std::atomic<int> correct{0};
  std::vector<std::thread> threads;
  threads.reserve(kClients);
  for (int c = 0; c < kClients; ++c) {
    threads.emplace_back([c, &correct] {
      // A channel per client: separate connections, like separate processes.
      auto stub = v1::Similarity::NewStub(Connect(server_->port()));
      for (int i = 0; i < kCalls; ++i) {
        const Problem p = RandomProblem(1 + (c + i) % 3, 5 + c, 6 + i, 16, 100 * c + i);
        v1::ComputeRequest req = MakeRequest(p, kMetrics[(c + i) % 4]);
        req.set_max_chunk_bytes(64);
        std::vector<int64_t> shape;
        std::string values;
        v1::DataType dtype = v1::FLOAT32;
        grpc::Status status;
        switch ((c + i) % 3) {
          case 0: {
            v1::ComputeResponse resp;
            status = Unary(stub.get(), req, &resp);
            shape.assign(resp.shape().begin(), resp.shape().end());
            values = resp.values_raw();
            dtype = resp.dtype();
            break;
          }
          case 1: {
            StreamResult s = Stream(stub.get(), req);
            status = s.status;
            shape = s.shape;
            values = s.values;
            dtype = s.dtype;
            break;
          }
          default: {
            StreamResult s = Upload(stub.get(), req, 200);
            status = s.status;
            shape = s.shape;
            values = s.values;
            dtype = s.dtype;
            break;
          }
        }
        EXPECT_TRUE(status.ok()) << status.error_message();
        ExpectMatches(p, req, shape, values, "", dtype);
        if (status.ok()) correct.fetch_add(1);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(correct.load(), kClients * kCalls);
}

TEST_F(ServerE2E, GetInfoFillsEveryField) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx, absl::Seconds(10));
  v1::GetInfoResponse info;
  ASSERT_TRUE(stub_->GetInfo(&ctx, v1::GetInfoRequest(), &info).ok());
  EXPECT_EQ(info.version(), SIMSERVE_VERSION);
  EXPECT_FALSE(info.onednn_version().empty());
  EXPECT_FALSE(info.cpu_isa().empty());
  EXPECT_EQ(info.compute_workers(), 1);
  EXPECT_EQ(info.threads_per_worker(), 1);
  const LimitsConfig defaults;
  EXPECT_EQ(info.limits().max_receive_message_bytes(), defaults.max_receive_message_bytes);
  EXPECT_EQ(info.limits().max_send_message_bytes(), defaults.max_send_message_bytes);
  EXPECT_EQ(info.limits().max_input_elements(), defaults.max_input_elements);
  EXPECT_EQ(info.limits().max_output_bytes(), defaults.max_output_bytes);
  EXPECT_EQ(info.limits().max_flops(), defaults.max_flops);
  EXPECT_EQ(info.limits().max_chunk_bytes(), defaults.max_chunk_bytes);
  EXPECT_EQ(info.limits().default_chunk_bytes(), defaults.default_chunk_bytes);
  EXPECT_EQ(info.limits().max_queued_requests(), defaults.max_queued_requests);
  EXPECT_EQ(info.limits().max_inflight_bytes(), defaults.max_inflight_bytes);
  EXPECT_EQ(info.metrics_size(), 4);
  EXPECT_EQ(info.input_dtypes_size(), 3);
  EXPECT_EQ(info.output_dtypes_size(), 3);
  EXPECT_EQ(info.precisions_size(), 2);
}

// grpc.health.v1.Health/Check through the generic stub (the health protos are not
// installed as C++ headers): HealthCheckResponse{status: SERVING} is the bytes 08 01.
grpc::Status HealthCheck(const std::shared_ptr<grpc::Channel>& channel, std::string* reply) {
  grpc::GenericStub generic(channel);
  grpc::ClientContext ctx;
  SetDeadline(&ctx, absl::Seconds(10));
  grpc::Slice empty("");  // HealthCheckRequest{service: ""} serialises to no bytes
  grpc::ByteBuffer request(&empty, 1);
  grpc::ByteBuffer response;
  Event done;
  grpc::Status status;
  generic.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                    [&](grpc::Status s) {
                      status = std::move(s);
                      done.Notify();
                    });
  done.WaitForNotification();
  std::vector<grpc::Slice> slices;
  if (status.ok() && response.Dump(&slices).ok()) {
    for (const auto& s : slices) reply->append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  return status;
}

TEST_F(ServerE2E, HealthReportsServing) {
  std::string reply;
  ASSERT_TRUE(HealthCheck(Connect(server_->port()), &reply).ok());
  EXPECT_EQ(reply, std::string("\x08\x01", 2));
}

// Server reflection through the generic stub: ServerReflectionRequest{list_services: ""}
// is the bytes 3a 00; the reply lists the service names.
class ReflectionList final : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  explicit ReflectionList(const std::shared_ptr<grpc::Channel>& channel) : generic_(channel) {
    SetDeadline(&ctx_, absl::Seconds(10));
    generic_.PrepareBidiStreamingCall(
        &ctx_, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        grpc::StubOptions(), this);
    request_slice_ = grpc::Slice(std::string("\x3a\x00", 2));
    request_ = grpc::ByteBuffer(&request_slice_, 1);
    StartWrite(&request_);
    StartRead(&response_);
    StartCall();
  }
  void OnWriteDone(bool /*ok*/) override { StartWritesDone(); }
  void OnReadDone(bool ok) override {
    if (!ok) return;
    std::vector<grpc::Slice> slices;
    if (response_.Dump(&slices).ok()) {
      for (const auto& s : slices) {
        reply_.append(reinterpret_cast<const char*>(s.begin()), s.size());
      }
    }
    StartRead(&response_);
  }
  void OnDone(const grpc::Status& s) override {
    status_ = s;
    done_.Notify();
  }
  grpc::Status Wait(std::string* reply) {
    done_.WaitForNotification();
    *reply = reply_;
    return status_;
  }

 private:
  grpc::GenericStub generic_;
  grpc::ClientContext ctx_;
  grpc::Slice request_slice_;
  grpc::ByteBuffer request_;
  grpc::ByteBuffer response_;
  std::string reply_;
  grpc::Status status_;
  Event done_;
};

TEST_F(ServerE2E, ReflectionListsTheServices) {
  ReflectionList call(Connect(server_->port()));
  std::string reply;
  ASSERT_TRUE(call.Wait(&reply).ok());
  EXPECT_THAT(reply, HasSubstr("simserve.v1.Similarity"));
  EXPECT_THAT(reply, HasSubstr("grpc.health.v1.Health"));
}

TEST(ServerE2EDrain, ShutdownDrainsRunningStreamsAndRefusesNewCalls) {
  auto server = StartServer(TestConfig());
  ASSERT_NE(server, nullptr);
  auto channel = Connect(server->port());
  auto stub = v1::Similarity::NewStub(channel);
  const Problem p = RandomProblem(1, 200, 256, 8, 18);
  v1::ComputeRequest req = MakeRequest(p, v1::COSINE);
  req.set_max_chunk_bytes(4096);  // 50 tiles
  StreamResult result;
  Event started;
  std::thread reader([&] {
    grpc::ClientContext ctx;
    SetDeadline(&ctx, absl::Seconds(30));
    auto stream = stub->ComputeStream(&ctx, req);
    v1::ComputeChunk chunk;
    int64_t next_batch = 0, next_row = 0;
    while (stream->Read(&chunk)) {
      EXPECT_EQ(AddChunk(&result, chunk, &next_batch, &next_row, p.n), "");
      if (result.chunks.size() == 1) started.Notify();
      absl::SleepFor(absl::Milliseconds(5));
    }
    result.status = stream->Finish();
  });
  started.WaitForNotification();
  std::thread stopper([&] { server->Shutdown(absl::Seconds(20)); });
  // Health turns NOT_SERVING / the listener closes; new calls are refused.
  absl::SleepFor(absl::Milliseconds(50));
  v1::ComputeResponse resp;
  grpc::Status refused = Unary(stub.get(), MakeRequest(RandomProblem(1, 2, 2, 2, 1), v1::DOT),
                               &resp, absl::Seconds(5));
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAVAILABLE) << refused.error_message();
  reader.join();
  stopper.join();
  EXPECT_TRUE(result.status.ok()) << result.status.error_message();
  EXPECT_EQ(result.chunks.size(), 50U);
  ExpectMatches(p, req, result.shape, result.values, result.indices, result.dtype);
}

// Same-node sidecars: a unix domain socket serves every compute RPC like TCP does.
TEST(UnixSocket, ServesUnaryStreamAndUploadCalls) {
  const std::string path = "/tmp/simserve-e2e-" + std::to_string(getpid()) + ".sock";
  ServerConfig config = TestConfig();
  config.listen = "unix://" + path;
  std::unique_ptr<SimilarityServer> server = StartServer(config);
  ASSERT_NE(server, nullptr);
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  auto stub = v1::Similarity::NewStub(
      grpc::CreateCustomChannel("unix://" + path, grpc::InsecureChannelCredentials(), args));
  const Problem p = RandomProblem(3, 40, 50, 16, 77);
  v1::ComputeRequest req = MakeRequest(p, v1::COSINE);
  v1::ComputeResponse resp;
  grpc::Status status = Unary(stub.get(), req, &resp);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ExpectMatches(p, req, {resp.shape().begin(), resp.shape().end()}, resp.values_raw(),
                resp.indices_raw(), resp.dtype());
  req.set_max_chunk_bytes(1024);
  StreamResult streamed = Stream(stub.get(), req);
  ASSERT_TRUE(streamed.status.ok()) << streamed.status.error_message();
  EXPECT_GT(streamed.chunks.size(), 3U);
  ExpectMatches(p, req, streamed.shape, streamed.values, streamed.indices, streamed.dtype);
  StreamResult uploaded = Upload(stub.get(), req, 999);
  ASSERT_TRUE(uploaded.status.ok()) << uploaded.status.error_message();
  ExpectMatches(p, req, uploaded.shape, uploaded.values, uploaded.indices, uploaded.dtype);
  server->Shutdown(absl::Seconds(1));
  unlink(path.c_str());
}

}  // namespace
}  // namespace simserve::e2e
