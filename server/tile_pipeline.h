// TilePipeline: the data path of one compute call, independent of gRPC. It ingests input
// pieces (one copy from the received bytes into aligned buffers, fused with the NaN/Inf
// check), computes row tiles, and hands results to a Sink, all work running as tasks on the
// compute pool. The gRPC reactors in service.cc are thin adapters that feed it and
// implement the Sink; tile_pipeline_test drives it without gRPC.
#ifndef SIMSERVE_SERVER_TILE_PIPELINE_H_
#define SIMSERVE_SERVER_TILE_PIPELINE_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "kernels/similarity.h"
#include "server/aligned_buffer.h"
#include "server/compute_pool.h"
#include "server/convert.h"
#include "server/mutex.h"

namespace simserve {

// Counters that tests and logs read. All atomic; readable from any thread.
struct ServiceStats {
  // Result bytes of streamed tiles computed but not yet fully written, summed over calls.
  std::atomic<int64_t> stream_buffered_bytes{0};
  // Highest value stream_buffered_bytes reached.
  std::atomic<int64_t> stream_buffered_bytes_peak{0};
  // Kernel tiles (ComputeTile calls) executed.
  std::atomic<int64_t> tiles_computed{0};
};

// Bytes of input tensor a or b as received, still in the transport's buffers.
struct InputPiece {
  enum class Tensor { kA, kB };
  Tensor tensor = Tensor::kA;
  // The bytes, in order. They point into memory owned by `keep_alive`.
  std::vector<std::span<const std::byte>> spans;
  std::shared_ptr<const void> keep_alive;
  // The spans already are the tensor's memory (InPlaceIo): they are checked, not copied.
  bool in_place = false;

  int64_t size() const;
};

// Memory a whole-result call reads or writes where it is instead of in buffers of its own:
// tensors in a shared-memory region and the result's destination there. Each span is
// either empty (not in place) or exactly the tensor's / the result part's size, and stays
// valid (held by `keep_alive`) until the call ends.
struct InPlaceIo {
  std::span<const std::byte> a;  // a's bytes; nothing of a is received then
  std::span<const std::byte> b;
  std::span<std::byte> values;   // whole mode: the result values are written here
  std::span<std::byte> indices;  // whole mode, top-k: the int32 indices
  std::vector<std::shared_ptr<const void>> keep_alive;
};

// A computed tile (stream mode) or the whole result (whole mode; batch = row_offset = 0).
struct TileOutput {
  int64_t batch = 0;
  int64_t row_offset = 0;
  int64_t rows = 0;      // rows of A covered (whole mode: batch * n)
  bool first = false;    // the call's first tile (it carries the output shape)
  AlignedBuffer values;  // rows * output_cols values of the output dtype
  int64_t values_bytes = 0;
  AlignedBuffer indices;  // top-k only: rows * top_k int32 column indices
  int64_t indices_bytes = 0;
  // Whole mode: the values / indices were written to InPlaceIo memory (the buffer is empty).
  bool values_in_place = false;
  bool indices_in_place = false;
};

// Where one call's time went.
struct CallTimings {
  absl::Time start = absl::Now();
  absl::Duration queue;    // tasks of this call waiting in the pool queue
  absl::Duration ingest;   // copying + checking input bytes
  absl::Duration compute;  // kernel time (Prepare + tiles)
  absl::Duration write;    // writes outstanding (stream mode)
};

// What a finished call did, for metrics, logs and trailing metadata.
struct PipelineReport {
  CallTimings timings;
  int64_t sent_bytes = 0;  // result payload bytes written (stream) or produced (whole)
  int64_t tiles = 0;       // kernel tiles computed
  int64_t flops = 0;       // matmul flops of the problem, 0 if it never started
};

// Thread-safe: every method may be called from any thread (gRPC reactions, pool workers).
class TilePipeline {
 public:
  enum class Mode {
    kStreamTiles,  // tiles of at most spec.tile_rows rows go to Sink::WriteTile, windowed
    kWholeResult,  // tiles of whole batch entries fill one result, given to Sink::Finish
  };

  // Implemented by the transport (the gRPC reactor).
  class Sink {
   public:
    virtual ~Sink() = default;
    // Send `tile` and call WriteDone when done. Stream mode only; one write at a time.
    virtual void WriteTile(std::unique_ptr<TileOutput> tile) = 0;
    // Read the next input message: AddInput returned false and there is room again.
    virtual void ResumeReading() = 0;
    // Called exactly once, when no task and no write is outstanding. `whole` holds the
    // result in whole mode when `status` is OK (null otherwise). This is the pipeline's last
    // action: the sink may destroy the pipeline from here on.
    virtual void Finish(const absl::Status& status, const PipelineReport& report,
                        std::unique_ptr<TileOutput> whole) = 0;
  };

  struct Deps {
    kernels::SimilarityEngine* engine = nullptr;
    ComputePool* pool = nullptr;
    ServiceStats* stats = nullptr;
    BufferPool* buffers = nullptr;  // input, tile and result buffers
    // Stream mode: tiles computed ahead of the writer (computing + ready + writing).
    int window = 3;
    // Tiles of one call computed at the same time, each by its own kernel job on its own
    // pool worker (the pool's workers; with one OpenMP thread per worker this replaces
    // OpenMP's fork/join by whole tiles in parallel).
    int parallel_tiles = 1;
    // AddInput asks the caller to pause reading while this many received bytes wait to be
    // ingested.
    int64_t max_pending_input_bytes = int64_t{8} << 20;
    // Whole-result calls with complete input, at most this many flops and input bytes, run
    // on the thread that starts them instead of the pool (0 disables).
    int64_t inline_max_flops = 0;
    int64_t inline_max_input_bytes = 0;
  };

  // All pointers in `deps` and `sink` are borrowed and must outlive the pipeline.
  TilePipeline(const Deps& deps, Mode mode, Sink* sink, absl::Time deadline);
  TilePipeline(const TilePipeline&) = delete;
  TilePipeline& operator=(const TilePipeline&) = delete;
  ~TilePipeline();

  // Sets the (validated) problem and its in-flight reservation, allocates the input and, in
  // whole mode, output buffers, and adds `pieces` as AddInput does (then closes the input if
  // `input_complete`). Call at most once, before AddInput. When spec.from_gallery, `gallery`
  // plays B (held until the call ends, so a replaced version stays valid) and no b input
  // is accepted. Tensors in `in_place` are read there (checked for NaN/Inf, not copied) and
  // must not also come as pieces; its result spans (whole mode only) receive the result.
  void Start(const ProblemSpec& spec, Admission admission, std::vector<InputPiece> pieces,
             bool input_complete, std::shared_ptr<const kernels::PreparedGallery> gallery = nullptr,
             InPlaceIo in_place = {}) ABSL_LOCKS_EXCLUDED(mu_);

  // Adds received bytes of a or b, each tensor's in order, in pieces of any size and in any
  // interleaving: a tile starts as soon as its rows of a and its batch entry of b are in, so
  // a client that sends b[0], a[0], b[1], a[1], ... overlaps its upload with the compute.
  // Data past a tensor's size fails the call with INVALID_ARGUMENT. Returns true
  // if the caller may read more input now; false means wait for Sink::ResumeReading (or the
  // end of the call).
  bool AddInput(InputPiece piece) ABSL_LOCKS_EXCLUDED(mu_);

  // No more input will come. Missing bytes fail the call with INVALID_ARGUMENT. The call
  // ends OK only after this (so excess data is an error rather than silently dropped).
  void CloseInput() ABSL_LOCKS_EXCLUDED(mu_);

  // Completion of the last Sink::WriteTile; !ok means the client went away.
  void WriteDone(bool ok) ABSL_LOCKS_EXCLUDED(mu_);

  // Ends the call with `status` once nothing is outstanding (the first error wins).
  void Fail(absl::Status status) ABSL_LOCKS_EXCLUDED(mu_);

  // The client went away (or the deadline passed): fails the call with CANCELLED or
  // DEADLINE_EXCEEDED and skips its queued tasks.
  void Cancel() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Tile {
    int64_t seq = 0;  // position in the output order
    int64_t batch = 0;
    int64_t row = 0;
    int64_t rows = 0;
    bool first = false;
  };
  // Per-tensor ingest progress, carried by the one running ingest task.
  struct IngestCursor {
    int64_t a_checked = 0;  // elements of a checked for NaN/Inf
    int64_t b_checked = 0;
  };

  absl::Status WhyGone() const;
  bool AddInputLocked(InputPiece piece) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CloseInputLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FailLocked(absl::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Bytes of a and of b (counted from each tensor's start) the next tile needs.
  void NextTileNeedsLocked(int64_t* a_bytes, int64_t* b_bytes) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool CanComputeLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  Tile NextTileLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool DoneLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool IngestDueLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  enum class TaskKind { kIngest, kTile };
  // What the caller of Pump just stopped doing (a task ended, a ResumeReading call
  // returned). Pump records it in the critical section in which it decides, so the call
  // cannot finish, and the sink destroy the pipeline, between the two.
  struct Ended {
    std::optional<TaskKind> task;
    absl::Status status;  // the task's result
    bool resuming = false;
  };
  // Starts whatever can start: the next write, ingest, tile, reading, or Finish.
  void Pump() ABSL_LOCKS_EXCLUDED(mu_);
  void Pump(Ended ended) ABSL_LOCKS_EXCLUDED(mu_);
  // Queues a task of `kind` (its busy flag is already set); the call's first task counts as
  // a new request for the pool's queue bound.
  void Submit(TaskKind kind, absl::AnyInvocable<void(absl::Duration)> run) ABSL_LOCKS_EXCLUDED(mu_);
  // Clears the busy flag of `kind` and records `status` if it is an error.
  void TaskEndedLocked(TaskKind kind, absl::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Pool tasks: the work, then Pump, which ends the task.
  void RunIngest(std::deque<InputPiece> pieces, IngestCursor cursor, absl::Duration wait)
      ABSL_LOCKS_EXCLUDED(mu_);
  void RunTile(const Tile& tile, std::unique_ptr<kernels::SimilarityJob> job, absl::Duration wait)
      ABSL_LOCKS_EXCLUDED(mu_);
  // The work of one ingest / tile task; its result is recorded under mu_, but the task still
  // counts as running (the caller ends it with the returned status).
  absl::Status DoIngest(std::deque<InputPiece> pieces, IngestCursor cursor, absl::Duration wait)
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status DoTile(const Tile& tile, std::unique_ptr<kernels::SimilarityJob> job,
                      absl::Duration wait) ABSL_LOCKS_EXCLUDED(mu_);
  // Small whole-result calls: ingest and every tile on the calling thread, in order, then
  // Finish. A hop to the pool and back costs more than such a call's work.
  void RunInline() ABSL_LOCKS_EXCLUDED(mu_);

  const Deps deps_;
  const Mode mode_;
  Sink* const sink_;
  const absl::Time deadline_;
  std::atomic<bool> cancelled_{false};

  Mutex mu_;
  // The problem; set once by Start.
  ProblemSpec spec_ ABSL_GUARDED_BY(mu_);
  bool have_problem_ ABSL_GUARDED_BY(mu_) = false;
  Admission admission_ ABSL_GUARDED_BY(mu_);
  int64_t tile_rows_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t total_tiles_ ABSL_GUARDED_BY(mu_) = 0;
  // Input buffers. The bytes are written by the ingest task below the *_received_ marks and
  // read by tile tasks below the *_ingested_ marks, so writers and readers never overlap.
  AlignedBuffer a_buffer_ ABSL_GUARDED_BY(mu_);
  AlignedBuffer b_buffer_ ABSL_GUARDED_BY(mu_);
  // Where tiles read a and b: the buffers above, or InPlaceIo memory.
  const std::byte* a_data_ ABSL_GUARDED_BY(mu_) = nullptr;
  const std::byte* b_data_ ABSL_GUARDED_BY(mu_) = nullptr;
  // Whole mode: where tiles write the result (whole_'s buffers or InPlaceIo memory).
  std::byte* values_out_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::byte* indices_out_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::vector<std::shared_ptr<const void>> in_place_keep_alive_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<const kernels::PreparedGallery> gallery_ ABSL_GUARDED_BY(mu_);  // or b
  int64_t a_received_ ABSL_GUARDED_BY(mu_) = 0;  // bytes accepted by AddInput
  int64_t b_received_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t a_ingested_ ABSL_GUARDED_BY(mu_) = 0;  // bytes copied and checked
  int64_t b_ingested_ ABSL_GUARDED_BY(mu_) = 0;
  std::deque<InputPiece> pending_ ABSL_GUARDED_BY(mu_);  // accepted, not yet ingesting
  int64_t pending_bytes_ ABSL_GUARDED_BY(mu_) = 0;       // accepted, not yet ingested
  bool reading_paused_ ABSL_GUARDED_BY(mu_) = false;
  // Sink::ResumeReading calls not yet ended by their Pump. More than one at a time: the
  // transport may read, pause and be resumed by another task before the first call's Pump
  // runs (found by fuzz/upload_fuzzer: a bool let the call finish under the first one).
  int resuming_ ABSL_GUARDED_BY(mu_) = 0;
  bool input_closed_ ABSL_GUARDED_BY(mu_) = false;
  bool ingesting_ ABSL_GUARDED_BY(mu_) = false;
  IngestCursor cursor_ ABSL_GUARDED_BY(mu_);  // away while ingesting_
  // Tiles. A running tile task holds one kernel job; idle ones wait here for the next.
  std::vector<std::unique_ptr<kernels::SimilarityJob>> idle_jobs_ ABSL_GUARDED_BY(mu_);
  int tiles_running_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t next_batch_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t next_row_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t tiles_scheduled_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t tiles_computed_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t tiles_written_ ABSL_GUARDED_BY(mu_) = 0;
  std::unique_ptr<TileOutput> whole_ ABSL_GUARDED_BY(mu_);  // whole mode
  // Stream mode: computed tiles by output position; written in order from next_write_.
  std::map<int64_t, std::unique_ptr<TileOutput>> ready_ ABSL_GUARDED_BY(mu_);
  int64_t next_write_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t ready_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  int64_t writing_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time write_started_ ABSL_GUARDED_BY(mu_);
  // Completion.
  bool submitted_any_ ABSL_GUARDED_BY(mu_) = false;  // the first task counts as a new request
  absl::Status error_ ABSL_GUARDED_BY(mu_);
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  PipelineReport report_ ABSL_GUARDED_BY(mu_);
};

}  // namespace simserve

#endif  // SIMSERVE_SERVER_TILE_PIPELINE_H_
