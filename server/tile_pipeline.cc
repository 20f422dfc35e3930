// Invariants, all under mu_: at most one ingest task and `parallel_tiles` tile tasks of a
// call run at a time (the cursor and a kernel job travel with each and come back under the
// lock); in stream mode computing + ready + writing tiles <= window and tiles are written
// in output order; Finish happens exactly once, when no task, no write and no
// ResumeReading call is outstanding, so the pipeline outlives every task and every sink
// call. Sink calls and pool submissions are made after releasing mu_ (a gRPC reaction may
// run inline).
#include "server/tile_pipeline.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"

namespace simserve {
namespace {

// Received bytes gathered into one ingest task while nothing waits for them.
constexpr int64_t kIngestBatchBytes = int64_t{4} << 20;

int64_t ElementSize(kernels::DataType dtype) {
  return static_cast<int64_t>(kernels::SizeOf(dtype));
}

// Copies `piece` to `dst` and checks every element it completes for NaN/Inf, slice by slice
// while the bytes are in cache. `done` is the tensor's byte count before the piece, `checked`
// its checked elements (advanced).
absl::Status CopyAndCheck(const InputPiece& piece, const char* name, kernels::DataType dtype,
                          std::byte* tensor, int64_t done, int64_t* checked) {
  const int64_t elem = ElementSize(dtype);
  for (std::span<const std::byte> span : piece.spans) {
    std::memcpy(tensor + done, span.data(), span.size());
    done += static_cast<int64_t>(span.size());
    const int64_t complete = done / elem;
    absl::Status finite =
        CheckFinite(name, tensor + *checked * elem, complete - *checked, dtype, *checked);
    if (!finite.ok()) return finite;
    *checked = complete;
  }
  return absl::OkStatus();
}

// Checks an in-place tensor (one piece, the whole tensor) for NaN/Inf without copying it.
absl::Status CheckInPlace(const InputPiece& piece, const char* name, kernels::DataType dtype,
                          int threads, int64_t* checked) {
  for (std::span<const std::byte> span : piece.spans) {
    const int64_t count = static_cast<int64_t>(span.size()) / ElementSize(dtype);
    absl::Status finite = CheckFinite(name, span.data(), count, dtype, *checked, threads);
    if (!finite.ok()) return finite;
    *checked += count;
  }
  return absl::OkStatus();
}

void RaisePeak(std::atomic<int64_t>& peak, int64_t value) {
  int64_t seen = peak.load();
  while (value > seen && !peak.compare_exchange_weak(seen, value)) {
  }
}

}  // namespace

int64_t InputPiece::size() const {
  int64_t total = 0;
  for (std::span<const std::byte> span : spans) total += static_cast<int64_t>(span.size());
  return total;
}

TilePipeline::TilePipeline(const Deps& deps, Mode mode, Sink* sink, absl::Time deadline)
    : deps_(deps), mode_(mode), sink_(sink), deadline_(deadline) {}

TilePipeline::~TilePipeline() {
  MutexLock lock(&mu_);
  deps_.stats->stream_buffered_bytes.fetch_sub(ready_bytes_ + writing_bytes_);
}

void TilePipeline::Start(const ProblemSpec& spec, Admission admission,
                         std::vector<InputPiece> pieces, bool input_complete,
                         std::shared_ptr<const kernels::PreparedGallery> gallery,
                         InPlaceIo in_place) {
  bool run_inline = false;
  {
    MutexLock lock(&mu_);
    spec_ = spec;
    admission_ = std::move(admission);
    have_problem_ = true;
    report_.flops = spec.flops;
    tile_rows_ = mode_ == Mode::kWholeResult ? spec.shape.n : spec.tile_rows;
    total_tiles_ = spec.shape.batch * ((spec.shape.n + tile_rows_ - 1) / tile_rows_);
    in_place_keep_alive_ = std::move(in_place.keep_alive);
    gallery_ = std::move(gallery);
    const int64_t value_bytes = spec.shape.batch * spec.shape.n * spec.value_row_bytes;
    const int64_t index_bytes = spec.shape.batch * spec.shape.n * spec.index_row_bytes;
    const auto wrong_size = [](auto span, int64_t bytes) {
      return !span.empty() && static_cast<int64_t>(span.size()) != bytes;
    };
    if (wrong_size(in_place.a, spec.a_bytes) || wrong_size(in_place.b, spec.b_bytes) ||
        wrong_size(in_place.values, value_bytes) || wrong_size(in_place.indices, index_bytes) ||
        (mode_ != Mode::kWholeResult && (!in_place.values.empty() || !in_place.indices.empty()))) {
      FailLocked(absl::InternalError("in-place memory does not match the problem"));
    }
    // In-place tensors are checked like received ones: one piece that is the tensor itself.
    auto in_place_piece = [&](InputPiece::Tensor tensor, std::span<const std::byte> bytes) {
      pieces.insert(pieces.begin(),
                    InputPiece{.tensor = tensor, .spans = {bytes}, .in_place = true});
    };
    if (!in_place.a.empty()) {
      a_data_ = in_place.a.data();
      in_place_piece(InputPiece::Tensor::kA, in_place.a);
    } else {
      a_buffer_ = deps_.buffers->Allocate(spec.a_bytes);
      a_data_ = a_buffer_.get();
    }
    bool allocated = a_data_ != nullptr;
    if (!spec.from_gallery && !in_place.b.empty()) {
      b_data_ = in_place.b.data();
      in_place_piece(InputPiece::Tensor::kB, in_place.b);
    } else if (!spec.from_gallery) {
      b_buffer_ = deps_.buffers->Allocate(spec.b_bytes);
      b_data_ = b_buffer_.get();
      allocated = allocated && b_data_ != nullptr;
    }
    if (spec.from_gallery && gallery_ == nullptr) {
      FailLocked(absl::InternalError("gallery call started without its gallery"));
    }
    if (mode_ == Mode::kWholeResult) {
      whole_ = std::make_unique<TileOutput>();
      whole_->first = true;
      whole_->rows = spec.shape.batch * spec.shape.n;
      whole_->values_bytes = value_bytes;
      whole_->values_in_place = !in_place.values.empty();
      if (whole_->values_in_place) {
        values_out_ = in_place.values.data();
      } else {
        whole_->values = deps_.buffers->Allocate(value_bytes);
        values_out_ = whole_->values.get();
      }
      whole_->indices_bytes = index_bytes;
      whole_->indices_in_place = !in_place.indices.empty();
      if (whole_->indices_in_place) {
        indices_out_ = in_place.indices.data();
      } else if (index_bytes > 0) {
        whole_->indices = deps_.buffers->Allocate(index_bytes);
        indices_out_ = whole_->indices.get();
      }
      allocated =
          allocated && values_out_ != nullptr && (index_bytes == 0 || indices_out_ != nullptr);
    }
    if (!allocated) {
      FailLocked(absl::ResourceExhaustedError("server out of memory for this request's buffers"));
    }
    for (InputPiece& piece : pieces) AddInputLocked(std::move(piece));
    if (input_complete) CloseInputLocked();
    run_inline = mode_ == Mode::kWholeResult && input_complete && spec.flops >= 0 &&
                 spec.flops <= deps_.inline_max_flops &&
                 spec.a_bytes + spec.b_bytes <= deps_.inline_max_input_bytes;
  }
  if (run_inline) {
    RunInline();
  } else {
    Pump();
  }
}

bool TilePipeline::AddInput(InputPiece piece) {
  bool read_more = false;
  {
    MutexLock lock(&mu_);
    read_more = AddInputLocked(std::move(piece));
  }
  Pump();
  return read_more;
}

bool TilePipeline::AddInputLocked(InputPiece piece) {
  if (finished_ || !error_.ok()) return false;
  if (!have_problem_) {
    FailLocked(absl::InternalError("input before the problem is known"));
    return false;
  }
  const bool is_b = piece.tensor == InputPiece::Tensor::kB;
  const char* name = is_b ? "b" : "a";
  const int64_t expected = is_b ? spec_.b_bytes : spec_.a_bytes;
  int64_t& received = is_b ? b_received_ : a_received_;
  const int64_t size = piece.size();
  if (is_b && spec_.from_gallery) {
    FailLocked(absl::InvalidArgumentError(
        "b_data sent, but this call's B is a gallery: send only a_data"));
    return false;
  }
  if (received == expected) {
    FailLocked(absl::InvalidArgumentError(absl::StrCat("too much data for tensor ", name, ": all ",
                                                       expected, " bytes already received")));
    return false;
  }
  if (received + size > expected) {
    FailLocked(absl::InvalidArgumentError(absl::StrCat("too much data for tensor ", name, ": ",
                                                       received + size,
                                                       " bytes received, shape needs ", expected)));
    return false;
  }
  received += size;
  pending_bytes_ += size;
  pending_.push_back(std::move(piece));
  reading_paused_ = pending_bytes_ >= deps_.max_pending_input_bytes;
  return !reading_paused_;
}

void TilePipeline::CloseInput() {
  {
    MutexLock lock(&mu_);
    CloseInputLocked();
  }
  Pump();
}

void TilePipeline::CloseInputLocked() {
  input_closed_ = true;
  if (have_problem_ && (b_received_ < spec_.b_bytes || a_received_ < spec_.a_bytes)) {
    FailLocked(absl::InvalidArgumentError(
        absl::StrCat("upload stream ended early: received ", b_received_, " of ", spec_.b_bytes,
                     " bytes of b and ", a_received_, " of ", spec_.a_bytes, " bytes of a")));
  }
}

void TilePipeline::WriteDone(bool ok) {
  {
    MutexLock lock(&mu_);
    report_.timings.write += absl::Now() - write_started_;
    deps_.stats->stream_buffered_bytes.fetch_sub(writing_bytes_);
    writing_ = false;
    if (ok) {
      report_.sent_bytes += writing_bytes_;
      ++tiles_written_;
    } else {
      FailLocked(WhyGone());
    }
    writing_bytes_ = 0;
  }
  Pump();
}

void TilePipeline::Fail(absl::Status status) {
  {
    MutexLock lock(&mu_);
    FailLocked(std::move(status));
  }
  Pump();
}

void TilePipeline::Cancel() {
  cancelled_.store(true);
  Fail(WhyGone());
}

absl::Status TilePipeline::WhyGone() const {
  if (absl::Now() >= deadline_) return absl::DeadlineExceededError("deadline expired");
  return absl::CancelledError("cancelled by the client");
}

void TilePipeline::FailLocked(absl::Status status) {
  if (error_.ok()) error_ = std::move(status);
}

void TilePipeline::NextTileNeedsLocked(int64_t* a_bytes, int64_t* b_bytes) const {
  // The next tile reads its rows of a and all of b's batch entry.
  const int64_t rows = std::min(tile_rows_, spec_.shape.n - next_row_);
  *a_bytes =
      (next_batch_ * spec_.shape.n + next_row_ + rows) * spec_.shape.d * ElementSize(spec_.a_dtype);
  *b_bytes = spec_.from_gallery
                 ? 0
                 : (next_batch_ + 1) * spec_.shape.m * spec_.shape.d * ElementSize(spec_.b_dtype);
}

bool TilePipeline::CanComputeLocked() const {
  if (tiles_running_ >= deps_.parallel_tiles || !have_problem_ ||
      tiles_scheduled_ >= total_tiles_) {
    return false;
  }
  if (mode_ == Mode::kStreamTiles) {
    const int64_t outstanding =
        tiles_running_ + static_cast<int64_t>(ready_.size()) + (writing_ ? 1 : 0);
    if (outstanding + 1 > deps_.window) return false;
  }
  int64_t need_a = 0;
  int64_t need_b = 0;
  NextTileNeedsLocked(&need_a, &need_b);
  return need_a <= a_ingested_ && need_b <= b_ingested_;
}

TilePipeline::Tile TilePipeline::NextTileLocked() {
  Tile tile{tiles_scheduled_, next_batch_, next_row_,
            std::min(tile_rows_, spec_.shape.n - next_row_), tiles_scheduled_ == 0};
  next_row_ += tile.rows;
  if (next_row_ == spec_.shape.n) {
    next_row_ = 0;
    ++next_batch_;
  }
  ++tiles_scheduled_;
  return tile;
}

bool TilePipeline::IngestDueLocked() const {
  // Small pieces are gathered into fewer ingest tasks (each one is a wake-up of a worker)
  // unless something waits for them: reading is paused, the input is complete, or no tile
  // is running and the received bytes complete the next tile's input.
  if (pending_bytes_ >= kIngestBatchBytes || reading_paused_ || input_closed_) return true;
  if (tiles_running_ >= deps_.parallel_tiles || tiles_scheduled_ >= total_tiles_) return false;
  int64_t need_a = 0;
  int64_t need_b = 0;
  NextTileNeedsLocked(&need_a, &need_b);
  return need_a <= a_received_ && need_b <= b_received_;
}

bool TilePipeline::DoneLocked() const {
  if (!have_problem_ || !input_closed_ || tiles_running_ > 0 || ingesting_ || writing_ ||
      resuming_ > 0) {
    return false;
  }
  return mode_ == Mode::kWholeResult ? tiles_computed_ == total_tiles_
                                     : tiles_written_ == total_tiles_;
}

void TilePipeline::TaskEndedLocked(TaskKind kind, absl::Status status) {
  if (kind == TaskKind::kIngest) {
    ingesting_ = false;
  } else {
    --tiles_running_;
  }
  if (!status.ok()) FailLocked(std::move(status));
}

void TilePipeline::Submit(TaskKind kind, absl::AnyInvocable<void(absl::Duration)> run) {
  ComputeTask task;
  task.run = std::move(run);
  task.skip = [this, kind](absl::Status why) { Pump({.task = kind, .status = std::move(why)}); };
  task.deadline = deadline_;
  task.cancelled = [this] { return cancelled_.load(); };
  bool new_request = false;
  {
    MutexLock lock(&mu_);
    new_request = !submitted_any_;
    submitted_any_ = true;
  }
  absl::Status submitted = deps_.pool->Submit(std::move(task), new_request);
  if (!submitted.ok()) Pump({.task = kind, .status = std::move(submitted)});
}

void TilePipeline::Pump() { Pump(Ended()); }

void TilePipeline::Pump(Ended ended) {
  std::unique_ptr<TileOutput> to_write;
  std::optional<std::deque<InputPiece>> to_ingest;
  IngestCursor cursor;
  std::vector<std::pair<Tile, std::unique_ptr<kernels::SimilarityJob>>> to_compute;
  bool resume_reading = false;
  std::optional<absl::Status> to_finish;
  std::unique_ptr<TileOutput> whole;
  PipelineReport report;
  {
    MutexLock lock(&mu_);
    if (ended.task.has_value()) TaskEndedLocked(*ended.task, std::move(ended.status));
    if (ended.resuming) --resuming_;
    if (finished_) return;
    if (!error_.ok()) {
      if (tiles_running_ == 0 && !ingesting_ && !writing_ && resuming_ == 0) {
        finished_ = true;
        to_finish = error_;
      }
    } else {
      if (mode_ == Mode::kStreamTiles && !writing_ && !ready_.empty() &&
          ready_.begin()->first == next_write_) {
        to_write = std::move(ready_.begin()->second);
        ready_.erase(ready_.begin());
        ++next_write_;
        writing_ = true;
        writing_bytes_ = to_write->values_bytes + to_write->indices_bytes;
        ready_bytes_ -= writing_bytes_;
        write_started_ = absl::Now();
      }
      if (!ingesting_ && !pending_.empty() && IngestDueLocked()) {
        ingesting_ = true;
        to_ingest = std::move(pending_);
        pending_.clear();
        cursor = cursor_;
      }
      if (reading_paused_ && pending_bytes_ < deps_.max_pending_input_bytes) {
        reading_paused_ = false;
        resume_reading = true;
        ++resuming_;  // the call must not finish while the sink is being called
      }
      while (CanComputeLocked()) {
        ++tiles_running_;
        std::unique_ptr<kernels::SimilarityJob> job;  // null: the task prepares a new one
        if (!idle_jobs_.empty()) {
          job = std::move(idle_jobs_.back());
          idle_jobs_.pop_back();
        }
        to_compute.emplace_back(NextTileLocked(), std::move(job));
      }
      if (DoneLocked()) {
        finished_ = true;
        to_finish = absl::OkStatus();
        whole = std::move(whole_);
      }
    }
    if (to_finish.has_value()) {
      // Nothing runs any more: release the kernel job (it borrows b), the buffers and the
      // reservation before the transport finishes.
      idle_jobs_.clear();
      deps_.stats->stream_buffered_bytes.fetch_sub(ready_bytes_);
      ready_bytes_ = 0;
      ready_.clear();
      a_buffer_ = AlignedBuffer();
      b_buffer_ = AlignedBuffer();
      a_data_ = b_data_ = nullptr;
      values_out_ = indices_out_ = nullptr;
      in_place_keep_alive_.clear();  // a region unregistered meanwhile is unmapped now
      gallery_.reset();
      admission_ = Admission();
      report = report_;
    }
  }
  if (to_ingest.has_value()) {
    Submit(TaskKind::kIngest,
           [this, pieces = std::move(*to_ingest), cursor](absl::Duration wait) mutable {
             RunIngest(std::move(pieces), cursor, wait);
           });
  }
  for (auto& [tile, job] : to_compute) {
    Submit(TaskKind::kTile, [this, tile = tile, job = std::move(job)](absl::Duration wait) mutable {
      RunTile(tile, std::move(job), wait);
    });
  }
  if (to_write != nullptr) sink_->WriteTile(std::move(to_write));
  if (resume_reading) {
    sink_->ResumeReading();
    Pump({.resuming = true});  // a failure meanwhile may now finish the call
  }
  if (to_finish.has_value()) {
    sink_->Finish(*to_finish, report, to_finish->ok() ? std::move(whole) : nullptr);
  }
}

void TilePipeline::RunIngest(std::deque<InputPiece> pieces, IngestCursor cursor,
                             absl::Duration wait) {
  absl::Status status = DoIngest(std::move(pieces), cursor, wait);
  Pump({.task = TaskKind::kIngest, .status = std::move(status)});
}

void TilePipeline::RunTile(const Tile& tile, std::unique_ptr<kernels::SimilarityJob> job,
                           absl::Duration wait) {
  absl::Status status = DoTile(tile, std::move(job), wait);
  Pump({.task = TaskKind::kTile, .status = std::move(status)});
}

void TilePipeline::RunInline() {
  for (;;) {
    std::optional<std::deque<InputPiece>> to_ingest;
    IngestCursor cursor;
    std::optional<Tile> tile;
    std::unique_ptr<kernels::SimilarityJob> job;
    {
      MutexLock lock(&mu_);
      if (!error_.ok()) break;
      if (cancelled_.load() || absl::Now() >= deadline_) {
        FailLocked(WhyGone());
        break;
      }
      if (!pending_.empty()) {
        ingesting_ = true;
        to_ingest = std::move(pending_);
        pending_.clear();
        cursor = cursor_;
      } else if (CanComputeLocked()) {
        ++tiles_running_;
        tile = NextTileLocked();
        if (!idle_jobs_.empty()) {
          job = std::move(idle_jobs_.back());
          idle_jobs_.pop_back();
        }
      } else {
        break;
      }
    }
    const TaskKind kind = to_ingest.has_value() ? TaskKind::kIngest : TaskKind::kTile;
    absl::Status status = to_ingest.has_value()
                              ? DoIngest(std::move(*to_ingest), cursor, absl::ZeroDuration())
                              : DoTile(*tile, std::move(job), absl::ZeroDuration());
    MutexLock lock(&mu_);
    TaskEndedLocked(kind, std::move(status));
  }
  Pump();  // finishes the call
}

absl::Status TilePipeline::DoIngest(std::deque<InputPiece> pieces, IngestCursor cursor,
                                    absl::Duration wait) {
  const absl::Time begin = absl::Now();
  std::byte* a = nullptr;  // null when the tensor is in place
  std::byte* b = nullptr;
  int64_t a_done = 0;
  int64_t b_done = 0;
  kernels::DataType a_dtype = kernels::DataType::kFloat32;
  kernels::DataType b_dtype = kernels::DataType::kFloat32;
  {
    MutexLock lock(&mu_);
    a = a_buffer_.get();
    b = b_buffer_.get();
    a_done = a_ingested_;
    b_done = b_ingested_;
    a_dtype = spec_.a_dtype;
    b_dtype = spec_.b_dtype;
  }
  absl::Status status;
  int64_t ingested = 0;
  for (const InputPiece& piece : pieces) {
    const bool is_b = piece.tensor == InputPiece::Tensor::kB;
    int64_t& done = is_b ? b_done : a_done;
    if (piece.in_place) {
      status = CheckInPlace(piece, is_b ? "b" : "a", is_b ? b_dtype : a_dtype,
                            deps_.engine->threads_per_call(),
                            is_b ? &cursor.b_checked : &cursor.a_checked);
    } else {
      status = is_b ? CopyAndCheck(piece, "b", b_dtype, b, done, &cursor.b_checked)
                    : CopyAndCheck(piece, "a", a_dtype, a, done, &cursor.a_checked);
    }
    if (!status.ok()) break;
    done += piece.size();
    ingested += piece.size();
  }
  pieces.clear();  // the received bytes are no longer needed
  {
    MutexLock lock(&mu_);
    cursor_ = cursor;
    a_ingested_ = a_done;
    b_ingested_ = b_done;
    pending_bytes_ -= ingested;
    report_.timings.queue += wait;
    report_.timings.ingest += absl::Now() - begin;
  }
  return status;
}

absl::Status TilePipeline::DoTile(const Tile& tile, std::unique_ptr<kernels::SimilarityJob> job,
                                  absl::Duration wait) {
  const absl::Time begin = absl::Now();
  ProblemSpec spec;
  const std::byte* a = nullptr;
  const std::byte* b = nullptr;
  std::byte* values_out = nullptr;
  std::byte* indices_out = nullptr;
  const kernels::PreparedGallery* gallery = nullptr;
  {
    MutexLock lock(&mu_);
    spec = spec_;
    a = a_data_;
    b = b_data_;
    values_out = values_out_;
    indices_out = indices_out_;
    gallery = gallery_.get();
  }
  absl::Status status;
  if (job == nullptr) {
    auto prepared = gallery != nullptr
                        ? deps_.engine->Prepare(spec.shape, spec.options, *gallery)
                        : deps_.engine->Prepare(spec.shape, spec.options, {b, spec.b_dtype});
    if (prepared.ok()) {
      job = std::move(*prepared);
    } else {
      status = prepared.status();
    }
  }
  std::unique_ptr<TileOutput> out;
  if (status.ok()) {
    const int64_t first_row = tile.batch * spec.shape.n + tile.row;
    std::byte* values = nullptr;
    int32_t* indices = nullptr;
    if (mode_ == Mode::kStreamTiles) {
      out = std::make_unique<TileOutput>();
      out->batch = tile.batch;
      out->row_offset = tile.row;
      out->rows = tile.rows;
      out->first = tile.first;
      out->values_bytes = tile.rows * spec.value_row_bytes;
      out->values = deps_.buffers->Allocate(out->values_bytes);
      out->indices_bytes = tile.rows * spec.index_row_bytes;
      if (out->indices_bytes > 0) out->indices = deps_.buffers->Allocate(out->indices_bytes);
      values = out->values.get();
      indices = reinterpret_cast<int32_t*>(out->indices.get());
    } else {
      values = values_out + first_row * spec.value_row_bytes;
      if (indices_out != nullptr) {
        indices = reinterpret_cast<int32_t*>(indices_out + first_row * spec.index_row_bytes);
      }
    }
    if (values == nullptr || (spec.index_row_bytes > 0 && indices == nullptr)) {
      status = absl::ResourceExhaustedError("server out of memory for a result tile");
    } else {
      const kernels::ConstTensorView a_rows{
          a + first_row * spec.shape.d * ElementSize(spec.a_dtype), spec.a_dtype};
      std::span<int32_t> index_span;
      if (indices != nullptr) {
        index_span = {indices, static_cast<size_t>(tile.rows * spec.options.top_k)};
      }
      status = job->ComputeTile(tile.batch, tile.row, tile.rows, a_rows,
                                {values, static_cast<size_t>(tile.rows * spec.value_row_bytes)},
                                index_span);
    }
  }
  const absl::Duration took = absl::Now() - begin;
  {
    MutexLock lock(&mu_);
    if (job != nullptr) idle_jobs_.push_back(std::move(job));
    report_.timings.queue += wait;
    report_.timings.compute += took;
    if (status.ok()) {
      ++tiles_computed_;
      ++report_.tiles;
      deps_.stats->tiles_computed.fetch_add(1);
      if (mode_ == Mode::kWholeResult) {
        report_.sent_bytes += tile.rows * (spec.value_row_bytes + spec.index_row_bytes);
      } else {
        const int64_t bytes = out->values_bytes + out->indices_bytes;
        ready_bytes_ += bytes;
        RaisePeak(deps_.stats->stream_buffered_bytes_peak,
                  deps_.stats->stream_buffered_bytes.fetch_add(bytes) + bytes);
        ready_.emplace(tile.seq, std::move(out));
      }
    }
  }
  return status;
}

}  // namespace simserve
