// TilePipeline driven without gRPC: a fake sink plays the transport. Results are compared
// with a double-precision reference; the window, the read pausing, errors and cancellation
// are checked through what the sink sees.
#include "server/tile_pipeline.h"

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace simserve {
namespace {

using ::testing::HasSubstr;

// Records what the pipeline hands to the transport. Writes complete only when the test
// calls CompleteWrite, so the test controls the network's pace.
class FakeSink final : public TilePipeline::Sink {
 public:
  void WriteTile(std::unique_ptr<TileOutput> tile) override {
    std::lock_guard<std::mutex> lock(mu_);
    ++writes_started_;
    pending_.push_back(std::move(tile));
    cv_.notify_all();
  }
  void ResumeReading() override {
    int resumes = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      resumes = ++resumes_;
      cv_.notify_all();
    }
    if (on_resume) on_resume(resumes);
  }
  void Finish(const absl::Status& status, const PipelineReport& report,
              std::unique_ptr<TileOutput> whole) override {
    std::lock_guard<std::mutex> lock(mu_);
    ++finishes_;
    status_ = status;
    report_ = report;
    whole_ = std::move(whole);
    cv_.notify_all();
  }

  // Waits for the next tile write (nullptr if the call finished instead).
  std::unique_ptr<TileOutput> NextWrite() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !pending_.empty() || finishes_ > 0; });
    if (pending_.empty()) return nullptr;
    auto tile = std::move(pending_.front());
    pending_.pop_front();
    return tile;
  }
  absl::Status WaitFinished() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return finishes_ > 0; });
    return status_;
  }
  void WaitResumed(int count) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return resumes_ >= count; });
  }
  int finishes() {
    std::lock_guard<std::mutex> lock(mu_);
    return finishes_;
  }
  PipelineReport report() {
    std::lock_guard<std::mutex> lock(mu_);
    return report_;
  }
  // Called inside ResumeReading with the number of resumes so far (set before the call).
  std::function<void(int)> on_resume;

  std::unique_ptr<TileOutput> TakeWhole() {
    std::lock_guard<std::mutex> lock(mu_);
    return std::move(whole_);
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::unique_ptr<TileOutput>> pending_;
  int writes_started_ = 0;
  int resumes_ = 0;
  int finishes_ = 0;
  absl::Status status_;
  PipelineReport report_;
  std::unique_ptr<TileOutput> whole_;
};

// A problem with random inputs and its double-precision cosine reference.
struct Problem {
  ProblemSpec spec;
  std::vector<float> a;
  std::vector<float> b;

  double Expected(int64_t batch, int64_t i, int64_t j) const {
    const int64_t d = spec.shape.d;
    const float* x = &a[(batch * spec.shape.n + i) * d];
    const float* y = &b[(batch * spec.shape.m + j) * d];
    double dot = 0, xx = 0, yy = 0;
    for (int64_t k = 0; k < d; ++k) {
      dot += double{x[k]} * y[k];
      xx += double{x[k]} * x[k];
      yy += double{y[k]} * y[k];
    }
    return xx == 0 || yy == 0 ? 0.0 : dot / std::sqrt(xx * yy);
  }
};

Problem MakeProblem(int64_t batch, int64_t n, int64_t m, int64_t d, int64_t tile_rows) {
  Problem p;
  ProblemSpec& s = p.spec;
  s.shape = {.batch = batch, .n = n, .m = m, .d = d};
  s.a_bytes = batch * n * d * 4;
  s.b_bytes = batch * m * d * 4;
  s.output_cols = m;
  s.value_row_bytes = m * 4;
  s.output_bytes = batch * n * m * 4;
  s.flops = 2 * batch * n * m * d;
  s.tile_rows = tile_rows;
  std::mt19937 rng(42);
  std::normal_distribution<float> normal;
  p.a.resize(static_cast<size_t>(batch * n * d));
  p.b.resize(static_cast<size_t>(batch * m * d));
  for (float& v : p.a) v = normal(rng);
  for (float& v : p.b) v = normal(rng);
  return p;
}

// `values` cut into pieces of `piece_bytes` (any size, not element aligned).
std::vector<InputPiece> Pieces(InputPiece::Tensor tensor, const std::vector<float>& values,
                               size_t piece_bytes) {
  const auto* bytes = reinterpret_cast<const std::byte*>(values.data());
  const size_t total = values.size() * sizeof(float);
  std::vector<InputPiece> pieces;
  for (size_t at = 0; at < total; at += piece_bytes) {
    InputPiece p{.tensor = tensor};
    p.spans.emplace_back(bytes + at, std::min(piece_bytes, total - at));
    pieces.push_back(std::move(p));
  }
  return pieces;
}

class TilePipelineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto engine = kernels::SimilarityEngine::Create({.threads_per_call = 1});
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = std::move(*engine);
  }
  TilePipeline::Deps Deps(int window = 2, int64_t read_ahead = int64_t{8} << 20,
                          int parallel_tiles = 1) {
    return {.engine = engine_.get(),
            .pool = &pool_,
            .stats = &stats_,
            .buffers = buffers_.get(),
            .window = window,
            .parallel_tiles = parallel_tiles,
            .max_pending_input_bytes = read_ahead};
  }
  Admission Admit(const ProblemSpec& spec) {
    auto admission = pool_.Admit(spec.InflightBytes(RequestKind::kUpload, 2));
    EXPECT_TRUE(admission.ok());
    return std::move(*admission);
  }
  // Values of a dense float32 tile must match the reference within the kernel's tolerance.
  static void ExpectTileMatches(const Problem& p, const TileOutput& tile) {
    const auto* v = reinterpret_cast<const float*>(tile.values.get());
    for (int64_t i = 0; i < tile.rows; ++i) {
      for (int64_t j = 0; j < p.spec.shape.m; ++j) {
        ASSERT_NEAR(v[i * p.spec.shape.m + j], p.Expected(tile.batch, tile.row_offset + i, j), 5e-6)
            << "batch " << tile.batch << " row " << tile.row_offset + i << " col " << j;
      }
    }
  }

  ServiceStats stats_;
  std::shared_ptr<BufferPool> buffers_ = BufferPool::Create(int64_t{64} << 20);
  ComputePool pool_{ComputePool::Options{.workers = 2}, nullptr};
  std::unique_ptr<kernels::SimilarityEngine> engine_;
};

TEST_F(TilePipelineTest, StreamTilesCoverTheOutputOnceInOrderWithinTheWindow) {
  const Problem p = MakeProblem(3, 10, 7, 5, /*tile_rows=*/4);
  FakeSink sink;
  TilePipeline pipeline(Deps(/*window=*/2), TilePipeline::Mode::kStreamTiles, &sink,
                        absl::InfiniteFuture());
  pipeline.Start(p.spec, Admit(p.spec), {}, false);
  // Odd piece sizes: element boundaries fall inside pieces.
  for (auto& piece : Pieces(InputPiece::Tensor::kB, p.b, 13)) pipeline.AddInput(std::move(piece));
  for (auto& piece : Pieces(InputPiece::Tensor::kA, p.a, 37)) pipeline.AddInput(std::move(piece));
  pipeline.CloseInput();
  int64_t batch = 0;
  int64_t row = 0;
  int tiles = 0;
  while (auto tile = sink.NextWrite()) {
    EXPECT_EQ(tile->batch, batch);
    EXPECT_EQ(tile->row_offset, row);
    EXPECT_EQ(tile->first, tiles == 0);
    EXPECT_EQ(tile->rows, std::min<int64_t>(4, 10 - row));
    EXPECT_EQ(tile->values_bytes, tile->rows * 7 * 4);
    ExpectTileMatches(p, *tile);
    // While this write is outstanding, at most window - 1 more tiles are buffered.
    EXPECT_LE(stats_.stream_buffered_bytes.load(), 2 * 4 * 7 * 4);
    row += tile->rows;
    if (row == 10) {
      row = 0;
      ++batch;
    }
    ++tiles;
    pipeline.WriteDone(true);
  }
  EXPECT_TRUE(sink.WaitFinished().ok());
  EXPECT_EQ(tiles, 9);  // 3 batch entries x ceil(10 / 4)
  EXPECT_EQ(sink.report().tiles, 9);
  EXPECT_EQ(sink.report().sent_bytes, p.spec.output_bytes);
  EXPECT_EQ(sink.finishes(), 1);
  EXPECT_EQ(stats_.stream_buffered_bytes.load(), 0);
  EXPECT_EQ(pool_.inflight_bytes(), 0);  // the reservation is released before Finish
}

TEST_F(TilePipelineTest, ParallelTilesAreWrittenInOutputOrder) {
  const Problem p = MakeProblem(4, 9, 6, 3, /*tile_rows=*/2);  // 5 tiles per batch entry
  for (int parallel : {1, 2}) {
    FakeSink sink;
    TilePipeline pipeline(Deps(/*window=*/4, int64_t{8} << 20, parallel),
                          TilePipeline::Mode::kStreamTiles, &sink, absl::InfiniteFuture());
    std::vector<InputPiece> pieces = Pieces(InputPiece::Tensor::kB, p.b, 1 << 20);
    for (auto& piece : Pieces(InputPiece::Tensor::kA, p.a, 1 << 20)) {
      pieces.push_back(std::move(piece));
    }
    pipeline.Start(p.spec, Admit(p.spec), std::move(pieces), true);
    int64_t flat_row = 0;
    while (auto tile = sink.NextWrite()) {
      EXPECT_EQ(tile->batch * 9 + tile->row_offset, flat_row) << "parallel " << parallel;
      ExpectTileMatches(p, *tile);
      flat_row += tile->rows;
      pipeline.WriteDone(true);
    }
    EXPECT_TRUE(sink.WaitFinished().ok());
    EXPECT_EQ(flat_row, 36);
    EXPECT_EQ(sink.report().tiles, 20);
  }
  EXPECT_EQ(stats_.stream_buffered_bytes.load(), 0);
}

TEST_F(TilePipelineTest, WholeResultIsComputedIntoOneBufferAndHandedToFinish) {
  const Problem p = MakeProblem(2, 6, 9, 3, /*tile_rows=*/1);
  FakeSink sink;
  TilePipeline pipeline(Deps(), TilePipeline::Mode::kWholeResult, &sink, absl::InfiniteFuture());
  std::vector<InputPiece> pieces = Pieces(InputPiece::Tensor::kB, p.b, 1 << 20);
  for (auto& piece : Pieces(InputPiece::Tensor::kA, p.a, 1 << 20)) {
    pieces.push_back(std::move(piece));
  }
  pipeline.Start(p.spec, Admit(p.spec), std::move(pieces), /*input_complete=*/true);
  ASSERT_TRUE(sink.WaitFinished().ok());
  std::unique_ptr<TileOutput> whole = sink.TakeWhole();
  ASSERT_NE(whole, nullptr);
  EXPECT_EQ(whole->rows, 12);
  EXPECT_EQ(whole->values_bytes, p.spec.output_bytes);
  const auto* v = reinterpret_cast<const float*>(whole->values.get());
  for (int64_t r = 0; r < 12; ++r) {  // rows of both batch entries, one after the other
    for (int64_t j = 0; j < 9; ++j) {
      ASSERT_NEAR(v[r * 9 + j], p.Expected(r / 6, r % 6, j), 5e-6) << "row " << r;
    }
  }
  EXPECT_EQ(sink.report().tiles, 2);  // whole batch entries
}

TEST_F(TilePipelineTest, SmallWholeResultRunsInlineAndFinishesWithinStart) {
  const Problem p = MakeProblem(2, 5, 6, 4, 1);
  FakeSink sink;
  TilePipeline::Deps deps = Deps();
  deps.inline_max_flops = p.spec.flops;
  deps.inline_max_input_bytes = p.spec.a_bytes + p.spec.b_bytes;
  TilePipeline pipeline(deps, TilePipeline::Mode::kWholeResult, &sink, absl::InfiniteFuture());
  std::vector<InputPiece> pieces = Pieces(InputPiece::Tensor::kB, p.b, 7);
  for (auto& piece : Pieces(InputPiece::Tensor::kA, p.a, 9)) pieces.push_back(std::move(piece));
  pipeline.Start(p.spec, Admit(p.spec), std::move(pieces), true);
  EXPECT_EQ(sink.finishes(), 1);  // no pool task: done on this thread before Start returned
  EXPECT_EQ(sink.report().timings.queue, absl::ZeroDuration());
  std::unique_ptr<TileOutput> whole = sink.TakeWhole();
  ASSERT_NE(whole, nullptr);
  const auto* v = reinterpret_cast<const float*>(whole->values.get());
  for (int64_t r = 0; r < 10; ++r) {
    for (int64_t j = 0; j < 6; ++j) ASSERT_NEAR(v[r * 6 + j], p.Expected(r / 5, r % 5, j), 5e-6);
  }
}

TEST_F(TilePipelineTest, NonFiniteInputNamesTensorAndFlatIndexAcrossPieces) {
  Problem p = MakeProblem(1, 4, 4, 3, 4);
  p.a[7] = std::numeric_limits<float>::quiet_NaN();
  FakeSink sink;
  TilePipeline pipeline(Deps(), TilePipeline::Mode::kWholeResult, &sink, absl::InfiniteFuture());
  std::vector<InputPiece> pieces = Pieces(InputPiece::Tensor::kB, p.b, 5);
  for (auto& piece : Pieces(InputPiece::Tensor::kA, p.a, 6)) pieces.push_back(std::move(piece));
  pipeline.Start(p.spec, Admit(p.spec), std::move(pieces), true);
  const absl::Status s = sink.WaitFinished();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "tensor a contains NaN or Inf at flat index 7");
  EXPECT_EQ(sink.TakeWhole(), nullptr);
}

TEST_F(TilePipelineTest, InterleavedInputStartsEachBatchEntryAsSoonAsItsBytesArrive) {
  const Problem p = MakeProblem(3, 4, 5, 2, /*tile_rows=*/4);  // one tile per batch entry
  FakeSink sink;
  TilePipeline pipeline(Deps(/*window=*/3), TilePipeline::Mode::kStreamTiles, &sink,
                        absl::InfiniteFuture());
  pipeline.Start(p.spec, Admit(p.spec), {}, false);
  const size_t a_entry = size_t{4} * 2 * sizeof(float);
  const size_t b_entry = size_t{5} * 2 * sizeof(float);
  const auto* a = reinterpret_cast<const std::byte*>(p.a.data());
  const auto* b = reinterpret_cast<const std::byte*>(p.b.data());
  for (int64_t k = 0; k < 3; ++k) {
    InputPiece bk{.tensor = InputPiece::Tensor::kB};
    bk.spans.emplace_back(b + k * b_entry, b_entry);
    InputPiece ak{.tensor = InputPiece::Tensor::kA};
    ak.spans.emplace_back(a + k * a_entry, a_entry);
    pipeline.AddInput(std::move(bk));
    pipeline.AddInput(std::move(ak));
    // Batch entry k is computed while later entries have not been sent yet.
    auto tile = sink.NextWrite();
    ASSERT_NE(tile, nullptr);
    EXPECT_EQ(tile->batch, k);
    ExpectTileMatches(p, *tile);
    pipeline.WriteDone(true);
  }
  pipeline.CloseInput();
  EXPECT_TRUE(sink.WaitFinished().ok());
}

TEST_F(TilePipelineTest, InputOrderAndSizeRulesFailTheCall) {
  const Problem p = MakeProblem(1, 2, 2, 2, 2);
  {
    FakeSink sink;
    TilePipeline pipeline(Deps(), TilePipeline::Mode::kStreamTiles, &sink, absl::InfiniteFuture());
    pipeline.Start(p.spec, Admit(p.spec), {}, false);
    std::vector<float> too_long(p.b.size() + 1, 1.0F);
    pipeline.AddInput(Pieces(InputPiece::Tensor::kB, too_long, 1 << 20)[0]);
    EXPECT_THAT(std::string(sink.WaitFinished().message()),
                HasSubstr("too much data for tensor b: 20 bytes received, shape needs 16"));
  }
  {
    FakeSink sink;
    TilePipeline pipeline(Deps(), TilePipeline::Mode::kStreamTiles, &sink, absl::InfiniteFuture());
    pipeline.Start(p.spec, Admit(p.spec), Pieces(InputPiece::Tensor::kB, p.b, 1 << 20), false);
    pipeline.CloseInput();
    EXPECT_EQ(sink.WaitFinished().message(),
              "upload stream ended early: received 16 of 16 bytes of b and 0 of 16 bytes of a");
  }
}

TEST_F(TilePipelineTest, ReadingPausesWhileTooMuchInputWaitsAndResumesAfterIngest) {
  const Problem p = MakeProblem(1, 64, 8, 16, 64);  // b: 512 bytes, a: 4096 bytes
  // Both workers are held, so nothing is ingested until the test lets go.
  std::mutex mu;
  std::condition_variable cv;
  bool release = false;
  int holds_done = 0;  // the test waits for both before its locals go away
  for (int i = 0; i < 2; ++i) {
    ComputeTask hold;
    hold.run = [&](absl::Duration) {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return release; });
      ++holds_done;
      cv.notify_all();
    };
    hold.skip = [](const absl::Status&) {};
    ASSERT_TRUE(pool_.Submit(std::move(hold), false).ok());
  }
  FakeSink sink;
  TilePipeline pipeline(Deps(2, /*read_ahead=*/1000), TilePipeline::Mode::kStreamTiles, &sink,
                        absl::InfiniteFuture());
  pipeline.Start(p.spec, Admit(p.spec), {}, false);
  std::vector<InputPiece> a = Pieces(InputPiece::Tensor::kA, p.a, 600);
  EXPECT_TRUE(pipeline.AddInput(Pieces(InputPiece::Tensor::kB, p.b, 1 << 20)[0]));  // 512 pending
  EXPECT_FALSE(pipeline.AddInput(std::move(a[0])));  // 1112 pending >= 1000: pause
  {
    std::lock_guard<std::mutex> lock(mu);
    release = true;
  }
  cv.notify_all();
  sink.WaitResumed(1);  // once ingested, the pipeline asks for more
  int resumes = 1;
  for (size_t i = 1; i < a.size(); ++i) {
    if (!pipeline.AddInput(std::move(a[i]))) sink.WaitResumed(++resumes);
  }
  pipeline.CloseInput();
  auto tile = sink.NextWrite();
  ASSERT_NE(tile, nullptr);
  ExpectTileMatches(p, *tile);
  pipeline.WriteDone(true);
  EXPECT_TRUE(sink.WaitFinished().ok());
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return holds_done == 2; });
}

TEST_F(TilePipelineTest, ACallResumedAgainDuringAResumeFinishesOnlyAfterBoth) {
  // Found by fuzz/upload_fuzzer: while a ResumeReading call is still in the sink, the
  // transport reads, pauses again and another task resumes it. A failure must not finish the
  // call before the first ResumeReading has returned (its caller still uses the pipeline).
  const Problem p = MakeProblem(1, 4, 4, 8, 4);  // b: 128 bytes
  FakeSink sink;
  TilePipeline pipeline(Deps(2, /*read_ahead=*/16), TilePipeline::Mode::kStreamTiles, &sink,
                        absl::InfiniteFuture());
  std::vector<InputPiece> b = Pieces(InputPiece::Tensor::kB, p.b, 16);
  bool finished_inside = true;
  sink.on_resume = [&](int resumes) {
    if (resumes != 1) return;  // the second resume, from the next ingest task
    EXPECT_FALSE(pipeline.AddInput(std::move(b[1])));  // pauses again
    sink.WaitResumed(2);
    // Lets the second resume end first (without the fix, its end let the call finish).
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    pipeline.Fail(absl::InvalidArgumentError("stop"));
    finished_inside = sink.finishes() > 0;
  };
  pipeline.Start(p.spec, Admit(p.spec), {}, false);
  EXPECT_FALSE(pipeline.AddInput(std::move(b[0])));  // 16 bytes pending: pause
  EXPECT_EQ(sink.WaitFinished().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(finished_inside);
}

TEST_F(TilePipelineTest, CancelAndFailedWritesEndTheCallOnce) {
  const Problem p = MakeProblem(4, 8, 8, 8, 2);
  for (bool cancel : {true, false}) {
    FakeSink sink;
    TilePipeline pipeline(Deps(), TilePipeline::Mode::kStreamTiles, &sink, absl::InfiniteFuture());
    std::vector<InputPiece> pieces = Pieces(InputPiece::Tensor::kB, p.b, 1 << 20);
    for (auto& piece : Pieces(InputPiece::Tensor::kA, p.a, 1 << 20)) {
      pieces.push_back(std::move(piece));
    }
    pipeline.Start(p.spec, Admit(p.spec), std::move(pieces), true);
    auto tile = sink.NextWrite();
    ASSERT_NE(tile, nullptr);
    if (cancel) {
      pipeline.Cancel();
      pipeline.WriteDone(true);
    } else {
      pipeline.WriteDone(false);  // the client went away
    }
    EXPECT_EQ(sink.WaitFinished().code(), absl::StatusCode::kCancelled);
    EXPECT_EQ(sink.NextWrite(), nullptr);  // no tile is written after the failure
    EXPECT_LT(sink.report().tiles, 16);
    EXPECT_EQ(sink.finishes(), 1);
  }
  EXPECT_EQ(stats_.stream_buffered_bytes.load(), 0);
  EXPECT_EQ(pool_.inflight_bytes(), 0);
}

TEST_F(TilePipelineTest, DeadlineInThePastFailsWithDeadlineExceeded) {
  const Problem p = MakeProblem(1, 2, 2, 2, 2);
  FakeSink sink;
  TilePipeline pipeline(Deps(), TilePipeline::Mode::kWholeResult, &sink,
                        absl::Now() - absl::Seconds(1));
  std::vector<InputPiece> pieces = Pieces(InputPiece::Tensor::kB, p.b, 1 << 20);
  for (auto& piece : Pieces(InputPiece::Tensor::kA, p.a, 1 << 20)) {
    pieces.push_back(std::move(piece));
  }
  pipeline.Start(p.spec, Admit(p.spec), std::move(pieces), true);
  EXPECT_EQ(sink.WaitFinished().code(), absl::StatusCode::kDeadlineExceeded);
}

}  // namespace
}  // namespace simserve
