// End-to-end tests of galleries: RegisterGallery / GetGallery / ListGalleries /
// DeleteGallery and ComputeRequest.gallery on every compute RPC, against a real in-process
// server on loopback, with results compared to the double-precision reference of
// e2e_util.h. Also: versions and replacement under a running call, LRU eviction, the memory
// budget against RSS, --gallery_dir (add, change, remove, a corrupt file), and queries racing
// registration and deletion.
#include <netinet/in.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/npy.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"
#include "server/server.h"
#include "tests/e2e/e2e_util.h"

namespace simserve::e2e {
namespace {

using ::testing::HasSubstr;
using Stub = v1::Similarity::Stub;

ServerConfig TestConfig() { return TestServerConfig(); }

struct Running {
  std::unique_ptr<SimilarityServer> server;
  std::unique_ptr<Stub> stub;
};

Running Start(const ServerConfig& config) {
  auto server = SimilarityServer::Start(config);
  EXPECT_TRUE(server.ok()) << server.status();
  if (!server.ok()) return {};
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  auto channel = grpc::CreateCustomChannel("127.0.0.1:" + std::to_string((*server)->port()),
                                           grpc::InsecureChannelCredentials(), args);
  return {std::move(*server), v1::Similarity::NewStub(channel)};
}

std::unique_ptr<grpc::ClientContext> Context(absl::Duration deadline = absl::Seconds(60)) {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(absl::ToInt64Milliseconds(deadline)));
  return ctx;
}

// Registers `rows` ([shape...] float32) as `name`, in pieces of `piece` bytes.
grpc::Status Register(Stub* stub, const std::string& name, const std::vector<int64_t>& shape,
                      const std::vector<float>& rows, v1::DataType storage = v1::FLOAT32,
                      v1::GalleryInfo* info = nullptr, size_t piece = 100 << 10) {
  auto ctx = Context();
  v1::GalleryInfo ignored;
  auto writer = stub->RegisterGallery(ctx.get(), info != nullptr ? info : &ignored);
  v1::RegisterGalleryRequest header;
  header.mutable_header()->set_name(name);
  for (const int64_t dim : shape) header.mutable_header()->add_shape(dim);
  header.mutable_header()->set_storage_dtype(storage);
  bool ok = writer->Write(header);
  const std::string bytes = Bytes(rows);
  for (size_t off = 0; ok && off < bytes.size(); off += piece) {
    v1::RegisterGalleryRequest part;
    part.set_data(bytes.substr(off, piece));
    ok = writer->Write(part);
  }
  writer->WritesDone();
  return writer->Finish();
}

// A compute request with `a` only, naming `gallery`.
v1::ComputeRequest GalleryRequest(const Problem& p, const std::string& gallery, v1::Metric metric,
                                  bool two_d, uint32_t top_k = 0, v1::DataType out = v1::FLOAT32) {
  v1::ComputeRequest r = MakeRequest(p, metric, out, top_k, two_d);
  r.clear_b();
  r.set_gallery(gallery);
  return r;
}

StreamResult Stream(Stub* stub, const v1::ComputeRequest& req, absl::Duration per_read = {}) {
  StreamResult r;
  auto ctx = Context();
  auto reader = stub->ComputeStream(ctx.get(), req);
  v1::ComputeChunk chunk;
  int64_t next_batch = 0, next_row = 0;
  const int64_t rows = req.a().shape(req.a().shape_size() == 3 ? 1 : 0);
  while (reader->Read(&chunk)) {
    EXPECT_EQ(AddChunk(&r, chunk, &next_batch, &next_row, rows), "");
    if (per_read > absl::ZeroDuration()) absl::SleepFor(per_read);
  }
  r.status = reader->Finish();
  return r;
}

// ComputeUpload naming the gallery in the header; A follows in pieces.
StreamResult Upload(Stub* stub, const v1::ComputeRequest& req, bool send_b_too = false) {
  StreamResult r;
  auto ctx = Context();
  auto stream = stub->ComputeUpload(ctx.get());
  v1::UploadRequest header;
  *header.mutable_header()->mutable_request() = req;
  header.mutable_header()->mutable_request()->mutable_a()->clear_raw();
  bool ok = stream->Write(header);
  const std::string& a = req.a().raw();
  for (size_t off = 0; ok && off < a.size(); off += 1000) {
    v1::UploadRequest part;
    part.set_a_data(a.substr(off, 1000));
    ok = stream->Write(part);
  }
  if (send_b_too) {
    v1::UploadRequest part;
    part.set_b_data("abcd");
    stream->Write(part);
  }
  stream->WritesDone();
  v1::ComputeChunk chunk;
  int64_t next_batch = 0, next_row = 0;
  const int64_t rows = req.a().shape(req.a().shape_size() == 3 ? 1 : 0);
  while (stream->Read(&chunk)) {
    EXPECT_EQ(AddChunk(&r, chunk, &next_batch, &next_row, rows), "");
  }
  r.status = stream->Finish();
  return r;
}

// The problem the server solves for a gallery call: B = the gallery's rows, repeated over
// the batch for a 2D gallery.
Problem WithGallery(Problem p, const std::vector<float>& gallery_rows, bool two_d_gallery) {
  if (two_d_gallery) {
    p.b.clear();
    for (int64_t k = 0; k < p.batch; ++k) {
      p.b.insert(p.b.end(), gallery_rows.begin(), gallery_rows.end());
    }
  } else {
    p.b = gallery_rows;
  }
  return p;
}

void ExpectCode(const grpc::Status& status, grpc::StatusCode code, const std::string& text) {
  EXPECT_EQ(status.error_code(), code) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr(text));
}

// The value of series `family`{label=value} (any series when label is empty), or -1.
double MetricValue(SimilarityServer& server, const std::string& family,
                   const std::string& label = "", const std::string& value = "") {
  for (const auto& f : server.registry().Collect()) {
    if (f.name != family) continue;
    for (const auto& m : f.metric) {
      bool match = label.empty();
      for (const auto& l : m.label) match = match || (l.name == label && l.value == value);
      if (!match) continue;
      return f.type == prometheus::MetricType::Gauge ? m.gauge.value : m.counter.value;
    }
  }
  return -1;
}

TEST(GalleryE2E, EveryRpcMetricAndGalleryRankMatchesReference) {
  Running s = Start(TestConfig());
  const Problem p = RandomProblem(3, 5, 40, 16, 7, /*zero_row=*/1);
  const std::vector<float> flat(p.b.begin(), p.b.begin() + 40 * 16);  // one [40, 16] entry
  ASSERT_TRUE(Register(s.stub.get(), "flat", {40, 16}, flat).ok());
  ASSERT_TRUE(Register(s.stub.get(), "batched", {3, 40, 16}, p.b).ok());
  for (const bool two_d_gallery : {true, false}) {
    const Problem want = WithGallery(p, two_d_gallery ? flat : p.b, two_d_gallery);
    const std::string name = two_d_gallery ? "flat" : "batched";
    for (const v1::Metric metric : {v1::COSINE, v1::DOT, v1::EUCLIDEAN, v1::SQUARED_EUCLIDEAN}) {
      for (const uint32_t top_k : {0U, 4U}) {
        SCOPED_TRACE(testing::Message() << name << " metric " << metric << " top_k " << top_k);
        v1::ComputeRequest req = GalleryRequest(p, name, metric, false, top_k);
        req.set_max_chunk_bytes(200);
        v1::ComputeResponse resp;
        auto ctx = Context();
        ASSERT_TRUE(s.stub->Compute(ctx.get(), req, &resp).ok());
        ExpectMatches(want, req, {resp.shape().begin(), resp.shape().end()}, resp.values_raw(),
                      resp.indices_raw(), resp.dtype());
        const StreamResult streamed = Stream(s.stub.get(), req);
        ASSERT_TRUE(streamed.status.ok()) << streamed.status.error_message();
        EXPECT_GT(streamed.chunks.size(), 1U);
        ExpectMatches(want, req, streamed.shape, streamed.values, streamed.indices, streamed.dtype);
        const StreamResult uploaded = Upload(s.stub.get(), req);
        ASSERT_TRUE(uploaded.status.ok()) << uploaded.status.error_message();
        ExpectMatches(want, req, uploaded.shape, uploaded.values, uploaded.indices, uploaded.dtype);
      }
    }
  }
  // A 2D query against a 2D gallery gives a 2D result.
  const Problem one = RandomProblem(1, 4, 40, 16, 8);
  v1::ComputeRequest req = GalleryRequest(one, "flat", v1::COSINE, /*two_d=*/true);
  v1::ComputeResponse resp;
  auto ctx = Context();
  ASSERT_TRUE(s.stub->Compute(ctx.get(), req, &resp).ok());
  ExpectMatches(WithGallery(one, flat, true), req, {resp.shape().begin(), resp.shape().end()},
                resp.values_raw(), "", resp.dtype());
}

TEST(GalleryE2E, HalfPrecisionStorageMatchesReferenceWithinItsPrecision) {
  Running s = Start(TestConfig());
  const Problem p = RandomProblem(1, 6, 300, 32, 9);
  for (const v1::DataType storage : {v1::BFLOAT16, v1::FLOAT16}) {
    v1::GalleryInfo info;
    ASSERT_TRUE(Register(s.stub.get(), "half", {300, 32}, p.b, storage, &info).ok());
    EXPECT_EQ(info.storage_dtype(), storage);
    EXPECT_GE(info.bytes(), 300 * 32 * 2 + 300 * 8);
    EXPECT_LT(info.bytes(), 300 * 32 * 4) << "half storage holds half the float32 bytes";
    for (const v1::Metric metric : {v1::COSINE, v1::DOT, v1::EUCLIDEAN}) {
      v1::ComputeRequest req = GalleryRequest(p, "half", metric, true);
      v1::ComputeResponse resp;
      auto ctx = Context();
      ASSERT_TRUE(s.stub->Compute(ctx.get(), req, &resp).ok());
      // The unit rows keep 8 (bf16) or 11 (f16) bits: the error of an entry is bounded by
      // 2^-8 of ||a|| ||b|| (the product's scale), not of the entry itself.
      const std::vector<double> ref = Reference(p, metric);
      const std::vector<double> got = Decode(resp.values_raw(), v1::FLOAT32);
      ASSERT_EQ(got.size(), ref.size());
      int bad = 0;
      for (int64_t i = 0; i < p.n; ++i) {
        double aa = 0;
        for (int64_t c = 0; c < p.d; ++c) aa += double{p.a[i * p.d + c]} * p.a[i * p.d + c];
        for (int64_t j = 0; j < p.m; ++j) {
          double bb = 0;
          for (int64_t c = 0; c < p.d; ++c) bb += double{p.b[j * p.d + c]} * p.b[j * p.d + c];
          const double scale =
              metric == v1::COSINE ? 1.0 : std::sqrt(aa * bb) * (metric == v1::EUCLIDEAN ? 2 : 1);
          const double tol = (storage == v1::BFLOAT16 ? 1.0 / 128 : 1.0 / 1024) * scale + 1e-5;
          if (metric == v1::EUCLIDEAN) {  // sqrt near 0 amplifies: compare squares
            const double g = got[i * p.m + j], w = ref[i * p.m + j];
            bad += std::abs(g * g - w * w) > tol * 2 ? 1 : 0;
          } else {
            bad += std::abs(got[i * p.m + j] - ref[i * p.m + j]) > tol ? 1 : 0;
          }
        }
      }
      EXPECT_EQ(bad, 0) << "storage " << storage << " metric " << metric;
    }
  }
}

TEST(GalleryE2E, PiecesOfAnySizeWithReadingPausedAndResumed) {
  ServerConfig config = TestConfig();
  config.compute.upload_read_ahead_bytes = 4096;  // pause after a few pieces, resume as copied
  Running s = Start(config);
  const Problem p = RandomProblem(2, 3, 500, 16, 20);
  for (const size_t piece : {size_t{999}, size_t{1}, size_t{1} << 20}) {  // elements split too
    SCOPED_TRACE(testing::Message() << "piece " << piece);
    v1::GalleryInfo info;
    ASSERT_TRUE(
        Register(s.stub.get(), "pieces", {2, 500, 16}, p.b, v1::FLOAT32, &info, piece).ok());
    v1::ComputeRequest req = GalleryRequest(p, "pieces", v1::EUCLIDEAN, false, 3);
    v1::ComputeResponse resp;
    auto ctx = Context();
    ASSERT_TRUE(s.stub->Compute(ctx.get(), req, &resp).ok());
    ExpectMatches(p, req, {resp.shape().begin(), resp.shape().end()}, resp.values_raw(),
                  resp.indices_raw(), resp.dtype());
  }
}

TEST(GalleryE2E, InfoListGetDeleteAndVersions) {
  Running s = Start(TestConfig());
  const Problem p = RandomProblem(1, 2, 10, 4, 10);
  v1::GalleryInfo first, second;
  ASSERT_TRUE(Register(s.stub.get(), "g-1.a_b", {10, 4}, p.b, v1::FLOAT32, &first).ok());
  EXPECT_EQ(first.name(), "g-1.a_b");
  EXPECT_THAT(first.shape(), testing::ElementsAre(10, 4));
  EXPECT_EQ(first.version(), 1);
  EXPECT_EQ(first.source(), v1::UPLOADED);
  EXPECT_GE(first.bytes(), 10 * 4 * 4 + 10 * 8);
  EXPECT_GT(first.registered_unix_ms(), 0);
  ASSERT_TRUE(Register(s.stub.get(), "g-1.a_b", {10, 4}, p.b, v1::FLOAT32, &second).ok());
  EXPECT_EQ(second.version(), 2);
  ASSERT_TRUE(Register(s.stub.get(), "other", {5, 4}, p.b).error_code() ==
              grpc::StatusCode::INVALID_ARGUMENT)
      << "40 floats sent for a [5, 4] gallery";
  v1::ListGalleriesResponse list;
  {
    auto ctx = Context();
    ASSERT_TRUE(s.stub->ListGalleries(ctx.get(), {}, &list).ok());
  }
  ASSERT_EQ(list.galleries_size(), 1) << "a failed registration registers nothing";
  EXPECT_EQ(list.galleries(0).version(), 2);
  v1::GalleryInfo got;
  v1::GetGalleryRequest get;
  get.set_name("g-1.a_b");
  {
    auto ctx = Context();
    ASSERT_TRUE(s.stub->GetGallery(ctx.get(), get, &got).ok());
  }
  EXPECT_EQ(got.version(), 2);
  // Pinned versions.
  v1::ComputeRequest req = GalleryRequest(p, "g-1.a_b", v1::DOT, true);
  req.set_gallery_version(1);
  v1::ComputeResponse resp;
  {
    auto ctx = Context();
    ExpectCode(s.stub->Compute(ctx.get(), req, &resp), grpc::StatusCode::FAILED_PRECONDITION,
               "version 2");
  }
  req.set_gallery_version(-1);
  {
    auto ctx = Context();
    ExpectCode(s.stub->Compute(ctx.get(), req, &resp), grpc::StatusCode::INVALID_ARGUMENT,
               "gallery_version");
  }
  req.set_gallery_version(2);
  {
    auto ctx = Context();
    ASSERT_TRUE(s.stub->Compute(ctx.get(), req, &resp).ok());
  }
  v1::DeleteGalleryRequest del;
  del.set_name("g-1.a_b");
  v1::DeleteGalleryResponse deleted;
  {
    auto ctx = Context();
    ASSERT_TRUE(s.stub->DeleteGallery(ctx.get(), del, &deleted).ok());
  }
  EXPECT_EQ(deleted.deleted().version(), 2);
  {
    auto ctx = Context();
    ExpectCode(s.stub->DeleteGallery(ctx.get(), del, &deleted), grpc::StatusCode::NOT_FOUND,
               "g-1.a_b");
  }
  {
    auto ctx = Context();
    ExpectCode(s.stub->GetGallery(ctx.get(), get, &got), grpc::StatusCode::NOT_FOUND, "g-1.a_b");
  }
  // Versions never repeat, even after a delete.
  v1::GalleryInfo third;
  ASSERT_TRUE(Register(s.stub.get(), "g-1.a_b", {10, 4}, p.b, v1::FLOAT32, &third).ok());
  EXPECT_EQ(third.version(), 3);
}

TEST(GalleryE2E, BadRequestsGetTheirStatusAndNothingIsRegistered) {
  Running s = Start(TestConfig());
  const Problem p = RandomProblem(2, 3, 8, 4, 11);
  ASSERT_TRUE(Register(s.stub.get(), "g", {2, 8, 4}, p.b).ok());
  const std::vector<float> rows(8 * 4, 0.5F);
  ExpectCode(Register(s.stub.get(), "bad name", {8, 4}, rows), grpc::StatusCode::INVALID_ARGUMENT,
             "bad gallery name");
  ExpectCode(Register(s.stub.get(), std::string(129, 'x'), {8, 4}, rows),
             grpc::StatusCode::INVALID_ARGUMENT, "bad gallery name");
  ExpectCode(Register(s.stub.get(), "r1", {32}, rows), grpc::StatusCode::INVALID_ARGUMENT, "rank");
  ExpectCode(Register(s.stub.get(), "z", {0, 4}, {}), grpc::StatusCode::INVALID_ARGUMENT,
             "positive");
  ExpectCode(Register(s.stub.get(), "few", {9, 4}, rows), grpc::StatusCode::INVALID_ARGUMENT,
             "too few bytes");
  ExpectCode(Register(s.stub.get(), "many", {7, 4}, rows), grpc::StatusCode::INVALID_ARGUMENT,
             "too many bytes");
  std::vector<float> with_nan = rows;
  with_nan[13] = std::nanf("");
  ExpectCode(Register(s.stub.get(), "nan", {8, 4}, with_nan), grpc::StatusCode::INVALID_ARGUMENT,
             "flat index 13");
  {  // data before the header
    auto ctx = Context();
    v1::GalleryInfo info;
    auto writer = s.stub->RegisterGallery(ctx.get(), &info);
    v1::RegisterGalleryRequest part;
    part.set_data("abcd");
    writer->Write(part);
    writer->WritesDone();
    ExpectCode(writer->Finish(), grpc::StatusCode::INVALID_ARGUMENT, "before the header");
  }
  v1::ListGalleriesResponse list;
  {
    auto ctx = Context();
    ASSERT_TRUE(s.stub->ListGalleries(ctx.get(), {}, &list).ok());
  }
  EXPECT_EQ(list.galleries_size(), 1) << "only the good gallery";

  auto compute = [&](const v1::ComputeRequest& req) {
    v1::ComputeResponse resp;
    auto ctx = Context();
    return s.stub->Compute(ctx.get(), req, &resp);
  };
  const double misses = MetricValue(*s.server, "simserve_gallery_lookups_total", "result", "miss");
  ExpectCode(compute(GalleryRequest(p, "nope", v1::COSINE, false)), grpc::StatusCode::NOT_FOUND,
             "'nope'");
  EXPECT_EQ(MetricValue(*s.server, "simserve_gallery_lookups_total", "result", "miss"), misses + 1);
  v1::ComputeRequest with_b = MakeRequest(p, v1::COSINE);
  with_b.set_gallery("g");
  ExpectCode(compute(with_b), grpc::StatusCode::INVALID_ARGUMENT, "must be absent");
  const Problem wrong_d = RandomProblem(2, 3, 8, 5, 12);
  ExpectCode(compute(GalleryRequest(wrong_d, "g", v1::COSINE, false)),
             grpc::StatusCode::INVALID_ARGUMENT, "D mismatch");
  const Problem wrong_batch = RandomProblem(3, 3, 8, 4, 13);
  ExpectCode(compute(GalleryRequest(wrong_batch, "g", v1::COSINE, false)),
             grpc::StatusCode::INVALID_ARGUMENT, "batch mismatch");
  ExpectCode(compute(GalleryRequest(p, "g", v1::COSINE, false, /*top_k=*/9)),
             grpc::StatusCode::INVALID_ARGUMENT, "top_k");
  const StreamResult b_data = Upload(s.stub.get(), GalleryRequest(p, "g", v1::DOT, false), true);
  ExpectCode(b_data.status, grpc::StatusCode::INVALID_ARGUMENT, "send only a_data");
  // And the server still serves.
  v1::ComputeRequest good = GalleryRequest(p, "g", v1::DOT, false);
  v1::ComputeResponse resp;
  auto ctx = Context();
  ASSERT_TRUE(s.stub->Compute(ctx.get(), good, &resp).ok());
  ExpectMatches(p, good, {resp.shape().begin(), resp.shape().end()}, resp.values_raw(), "",
                resp.dtype());
}

TEST(GalleryE2E, ReplacingKeepsRunningCallsOnTheirVersionNeverMixed) {
  ServerConfig config = TestConfig();
  config.compute.stream_window = 1;  // the slow reader holds the call open for a while
  Running s = Start(config);
  const Problem p1 = RandomProblem(1, 40, 64, 8, 14);
  const Problem p2 = RandomProblem(1, 40, 64, 8, 15);
  ASSERT_TRUE(Register(s.stub.get(), "g", {64, 8}, p1.b).ok());
  v1::ComputeRequest req = GalleryRequest(p1, "g", v1::COSINE, true);
  req.set_max_chunk_bytes(256);  // one row per chunk: 40 chunks
  StreamResult slow;
  std::thread reader([&] { slow = Stream(s.stub.get(), req, absl::Milliseconds(20)); });
  absl::SleepFor(absl::Milliseconds(100));
  ASSERT_TRUE(Register(s.stub.get(), "g", {64, 8}, p2.b).ok());  // replaced mid-call
  reader.join();
  ASSERT_TRUE(slow.status.ok()) << slow.status.error_message();
  ExpectMatches(p1, req, slow.shape, slow.values, slow.indices, slow.dtype);
  const StreamResult fresh = Stream(s.stub.get(), req);
  ASSERT_TRUE(fresh.status.ok());
  Problem want2 = p1;
  want2.b = p2.b;
  ExpectMatches(want2, req, fresh.shape, fresh.values, fresh.indices, fresh.dtype);
}

TEST(GalleryE2E, BudgetEvictsLeastRecentlyUsedUploadsAndRefusesWhatCannotFit) {
  ServerConfig config = TestConfig();
  // Prepared bytes of a [1000, 64] float32 gallery.
  const int64_t one =
      kernels::PreparedGallery::BytesFor({1, 1000, 64}, kernels::DataType::kFloat32);
  config.galleries.memory_bytes = 2 * one + 100;  // room for two
  Running s = Start(config);
  const Problem p = RandomProblem(1, 2, 1000, 64, 16);
  ASSERT_TRUE(Register(s.stub.get(), "a", {1000, 64}, p.b).ok());
  absl::SleepFor(absl::Milliseconds(5));
  ASSERT_TRUE(Register(s.stub.get(), "b", {1000, 64}, p.b).ok());
  absl::SleepFor(absl::Milliseconds(5));
  v1::ComputeResponse resp;
  {
    auto ctx = Context();
    ASSERT_TRUE(s.stub->Compute(ctx.get(), GalleryRequest(p, "a", v1::DOT, true), &resp).ok());
  }  // "a" is now the more recently used
  absl::SleepFor(absl::Milliseconds(5));
  ASSERT_TRUE(Register(s.stub.get(), "c", {1000, 64}, p.b).ok());
  auto exists = [&](const std::string& name) {
    v1::GetGalleryRequest get;
    get.set_name(name);
    v1::GalleryInfo info;
    auto ctx = Context();
    return s.stub->GetGallery(ctx.get(), get, &info).ok();
  };
  EXPECT_TRUE(exists("a"));
  EXPECT_FALSE(exists("b")) << "the least recently used upload is evicted";
  EXPECT_TRUE(exists("c"));
  const std::vector<float> big(3000 * 64, 0.25F);
  ExpectCode(Register(s.stub.get(), "huge", {3000, 64}, big), grpc::StatusCode::RESOURCE_EXHAUSTED,
             "gallery memory budget");
  EXPECT_TRUE(exists("a") && exists("c")) << "a refused registration evicts nothing";
  EXPECT_LE(s.server->galleries().held_bytes(), config.galleries.memory_bytes);
  EXPECT_EQ(MetricValue(*s.server, "simserve_gallery_evictions_total"), 1);
  EXPECT_EQ(MetricValue(*s.server, "simserve_galleries", "source", "uploaded"), 2);
  EXPECT_EQ(MetricValue(*s.server, "simserve_gallery_bytes", "source", "uploaded"),
            static_cast<double>(s.server->galleries().held_bytes()));
  EXPECT_GE(MetricValue(*s.server, "simserve_gallery_lookups_total", "result", "hit"), 1);
}

// VmRSS of process `pid` in bytes.
int64_t RssBytes(pid_t pid) {
  std::ifstream status(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  }
  return -1;
}

// The `simserve` executable as a child process (its own allocator settings from main.cc,
// nothing of the client in its RSS), on a free loopback port.
class ServerProcess {
 public:
  ServerProcess() {
    const int port = FreePort();
    address_ = absl::StrCat("127.0.0.1:", port);
    const std::string listen = "--listen=" + address_;
    std::vector<std::string> args = {SIMSERVE_BINARY,   listen,        "--metrics_listen=",
                                     "--warmup=false",  "--workers=1", "--threads_per_worker=1",
                                     "--drain_grace=2s"};
    std::vector<char*> argv;
    for (std::string& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);
    EXPECT_EQ(posix_spawn(&pid_, SIMSERVE_BINARY, nullptr, nullptr, argv.data(), environ), 0);
    grpc::ChannelArguments channel_args;
    channel_args.SetMaxSendMessageSize(-1);
    stub_ = v1::Similarity::NewStub(
        grpc::CreateCustomChannel(address_, grpc::InsecureChannelCredentials(), channel_args));
    for (int i = 0; i < 300; ++i) {  // up to 30 s (the executable re-executes itself once)
      v1::GetInfoResponse info;
      auto ctx = Context(absl::Seconds(1));
      if (stub_->GetInfo(ctx.get(), {}, &info).ok()) return;
      absl::SleepFor(absl::Milliseconds(100));
    }
    ADD_FAILURE() << "simserve did not start";
  }
  ~ServerProcess() {
    kill(pid_, SIGTERM);
    int status = 0;
    waitpid(pid_, &status, 0);
  }
  Stub* stub() { return stub_.get(); }
  pid_t pid() const { return pid_; }

 private:
  static int FreePort() {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    socklen_t len = sizeof(addr);
    getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
    close(fd);
    return ntohs(addr.sin_port);
  }
  pid_t pid_ = 0;
  std::string address_;
  std::unique_ptr<Stub> stub_;
};

TEST(GalleryE2E, HeldBytesMatchTheServersRss) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "the sanitizers' allocators (quarantine, shadow memory) change the RSS";
#endif
  ServerProcess server;
  const int64_t m = 100000, d = 256;  // 102 MB of float32
  std::vector<float> rows(m * d);
  for (int64_t i = 0; i < m * d; ++i) rows[i] = static_cast<float>((i * 7919) % 1000) - 500.0F;
  // A first registration and delete of the same size brings the transport's buffers to their
  // high-water mark (kept for reuse), so that what follows measures the gallery itself.
  v1::DeleteGalleryRequest del;
  v1::DeleteGalleryResponse deleted;
  ASSERT_TRUE(Register(server.stub(), "warm-up", {m, d}, rows, v1::FLOAT32, nullptr, 4 << 20).ok());
  del.set_name("warm-up");
  {
    auto ctx = Context();
    ASSERT_TRUE(server.stub()->DeleteGallery(ctx.get(), del, &deleted).ok());
  }
  const int64_t before = RssBytes(server.pid());
  v1::GalleryInfo info;
  ASSERT_TRUE(Register(server.stub(), "rss", {m, d}, rows, v1::FLOAT32, &info, 4 << 20).ok());
  const int64_t after = RssBytes(server.pid());
  const int64_t raw = m * d * 4;
  EXPECT_GE(info.bytes(), raw);
  EXPECT_LE(info.bytes(), raw + m * 8 + 4096);
  // Stated tolerance: 15% of the gallery plus 64 MiB of transport slack: gRPC's receive
  // buffers (kept by glibc for reuse) vary from upload to upload, 25-53 MB measured here for a
  // 100 MB upload even after the warm-up. Still well apart from a second copy (+100 MB); the
  // 1M x 384 benchmark measures 1.03x at a size where this slack is negligible.
  const int64_t tolerance = raw * 15 / 100 + (64 << 20);
  EXPECT_NEAR(static_cast<double>(after - before), static_cast<double>(info.bytes()),
              static_cast<double>(tolerance))
      << "server RSS grew by " << (after - before) << " bytes for a gallery that states "
      << info.bytes();
  EXPECT_LE(after - before, raw * 22 / 10) << "at most 2.2x the raw bytes";
  del.set_name("rss");
  auto ctx = Context();
  ASSERT_TRUE(server.stub()->DeleteGallery(ctx.get(), del, &deleted).ok());
  EXPECT_LT(RssBytes(server.pid()) - before, (after - before) - raw * 9 / 10)
      << "deleting gives the gallery's memory back";
}

void WriteNpy(const std::string& path, const std::vector<int64_t>& shape,
              const std::vector<float>& data) {
  const std::string tmp = path + ".tmp";
  auto file = npy::MappedOutputFile::Create(tmp, shape, npy::DType::kFloat32);
  ASSERT_TRUE(file.ok()) << file.status();
  std::memcpy(file->data().data(), data.data(), data.size() * 4);
  ASSERT_TRUE(file->Close().ok());
  std::filesystem::rename(tmp, path);  // readers see the old or the new file, never half
}

TEST(GalleryE2E, DirectoryGalleriesLoadBeforeServingAndFollowTheirFiles) {
  const std::string dir = absl::StrCat(testing::TempDir(), "/galleries_", getpid());
  std::filesystem::create_directories(dir);
  const Problem p1 = RandomProblem(2, 3, 20, 8, 17);
  const Problem p2 = RandomProblem(2, 3, 20, 8, 18);
  WriteNpy(dir + "/items.npy", {20, 8}, {p1.b.begin(), p1.b.begin() + 160});
  WriteNpy(dir + "/per_batch.npy", {2, 20, 8}, p1.b);
  {
    std::ofstream corrupt(dir + "/broken.npy");
    corrupt << "this is not an npy file";
  }
  ServerConfig config = TestConfig();
  config.galleries.dir = dir;
  config.galleries.rescan_period = absl::Milliseconds(200);
  Running s = Start(config);
  ASSERT_NE(s.server, nullptr);
  EXPECT_EQ(MetricValue(*s.server, "simserve_gallery_load_failures_total"), 1);
  auto info = [&](const std::string& name) {
    v1::GetGalleryRequest get;
    get.set_name(name);
    v1::GalleryInfo out;
    auto ctx = Context();
    grpc::Status status = s.stub->GetGallery(ctx.get(), get, &out);
    return std::make_pair(status, out);
  };
  ASSERT_TRUE(info("items").first.ok()) << "loaded before Start returned (before SERVING)";
  EXPECT_EQ(info("items").second.source(), v1::DIRECTORY);
  EXPECT_EQ(info("items").second.path(), dir + "/items.npy");
  EXPECT_EQ(info("broken").first.error_code(), grpc::StatusCode::NOT_FOUND);
  auto check = [&](const Problem& want_b, const std::string& name, bool flat) {
    v1::ComputeRequest req = GalleryRequest(p1, name, v1::COSINE, false);
    v1::ComputeResponse resp;
    auto ctx = Context();
    ASSERT_TRUE(s.stub->Compute(ctx.get(), req, &resp).ok());
    const std::vector<float> rows =
        flat ? std::vector<float>(want_b.b.begin(), want_b.b.begin() + 160) : want_b.b;
    ExpectMatches(WithGallery(p1, rows, flat), req, {resp.shape().begin(), resp.shape().end()},
                  resp.values_raw(), "", resp.dtype());
  };
  check(p1, "items", true);
  check(p1, "per_batch", false);
  v1::DeleteGalleryRequest del;
  del.set_name("items");
  v1::DeleteGalleryResponse deleted;
  {
    auto ctx = Context();
    ExpectCode(s.stub->DeleteGallery(ctx.get(), del, &deleted),
               grpc::StatusCode::FAILED_PRECONDITION, "gallery directory");
  }
  ExpectCode(Register(s.stub.get(), "items", {20, 8}, p2.b), grpc::StatusCode::FAILED_PRECONDITION,
             "gallery directory");

  auto wait_for = [&](auto done) {
    for (int i = 0; i < 100 && !done(); ++i) absl::SleepFor(absl::Milliseconds(100));
    return done();
  };
  WriteNpy(dir + "/items.npy", {20, 8}, {p2.b.begin(), p2.b.begin() + 160});  // changed
  ASSERT_TRUE(wait_for([&] { return info("items").second.version() == 2; }));
  check(p2, "items", true);
  WriteNpy(dir + "/added.npy", {20, 8}, {p2.b.begin(), p2.b.begin() + 160});  // added
  ASSERT_TRUE(wait_for([&] { return info("added").first.ok(); }));
  std::filesystem::remove(dir + "/per_batch.npy");  // removed
  ASSERT_TRUE(wait_for([&] { return !info("per_batch").first.ok(); }));
  EXPECT_EQ(info("per_batch").first.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(MetricValue(*s.server, "simserve_gallery_load_failures_total"), 1)
      << "a bad file is counted once, not at every rescan";
  check(p2, "items", true);
  // A bad file and an uploaded gallery of the same name: removing the file must not remove
  // the upload.
  ASSERT_TRUE(Register(s.stub.get(), "broken", {20, 8}, {p2.b.begin(), p2.b.begin() + 160}).ok());
  std::filesystem::remove(dir + "/broken.npy");
  absl::SleepFor(absl::Milliseconds(600));  // three rescans
  EXPECT_TRUE(info("broken").first.ok()) << "the directory loader removed an uploaded gallery";
  EXPECT_EQ(info("broken").second.source(), v1::UPLOADED);
  std::filesystem::remove_all(dir);
}

TEST(GalleryE2E, QueriesRacingRegistrationAndDeletionSeeWholeVersions) {
  ServerConfig config = TestConfig();
  config.compute.workers = 2;
  Running s = Start(config);
  const Problem p = RandomProblem(1, 4, 200, 16, 19);
  // Version v's rows are all equal to v: a dot product with a row of ones is 16 * v in
  // every column, so a result mixing two versions is visible.
  auto rows_of = [](float v) { return std::vector<float>(200 * 16, v); };
  ASSERT_TRUE(Register(s.stub.get(), "race", {200, 16}, rows_of(1)).ok());
  Problem ones = p;
  std::fill(ones.a.begin(), ones.a.end(), 1.0F);
  std::atomic<bool> stop{false};
  std::atomic<int> ok_calls{0}, mixed{0}, unexpected{0};
  std::thread querier([&] {
    while (!stop.load()) {
      v1::ComputeResponse resp;
      auto ctx = Context();
      grpc::Status status =
          s.stub->Compute(ctx.get(), GalleryRequest(ones, "race", v1::DOT, true), &resp);
      if (status.error_code() == grpc::StatusCode::NOT_FOUND) continue;
      if (!status.ok()) {
        ++unexpected;
        continue;
      }
      ++ok_calls;
      const std::vector<double> got = Decode(resp.values_raw(), v1::FLOAT32);
      for (const double g : got) {
        if (g != got[0]) {
          ++mixed;
          break;
        }
      }
    }
  });
  for (int v = 2; v <= 30; ++v) {
    ASSERT_TRUE(Register(s.stub.get(), "race", {200, 16}, rows_of(static_cast<float>(v))).ok());
    if (v % 5 == 0) {
      v1::DeleteGalleryRequest del;
      del.set_name("race");
      v1::DeleteGalleryResponse deleted;
      auto ctx = Context();
      ASSERT_TRUE(s.stub->DeleteGallery(ctx.get(), del, &deleted).ok());
    }
  }
  stop.store(true);
  querier.join();
  EXPECT_GT(ok_calls.load(), 0);
  EXPECT_EQ(mixed.load(), 0);
  EXPECT_EQ(unexpected.load(), 0);
}

}  // namespace
}  // namespace simserve::e2e
