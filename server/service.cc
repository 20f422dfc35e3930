// The reactors behind SimilarityService. Unary calls run as one pool task; streaming calls
// run one pool task per tile, at most `stream_window` tiles ahead of the network writer.
// gRPC's callback API owns reactors by raw pointer: each one deletes itself in OnDone.
#include "server/service.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "server/convert.h"
#include "server/log.h"
#include "server/status.h"

namespace simserve {
namespace {

using Env = SimilarityService::Env;
using Chunk = v1::ComputeChunk;

constexpr char kCompute[] = "Compute";
constexpr char kComputeStream[] = "ComputeStream";
constexpr char kComputeUpload[] = "ComputeUpload";

absl::Time DeadlineOf(const grpc::CallbackServerContext* context) {
  const auto deadline = context->deadline();
  // gRPC reports "no deadline" as time_point::max(); absl::FromChrono would overflow.
  if (deadline >= std::chrono::system_clock::now() + std::chrono::hours(24 * 365 * 100)) {
    return absl::InfiniteFuture();
  }
  return absl::FromChrono(deadline);
}

const char* CodeName(grpc::StatusCode code) {
  static constexpr const char* kNames[] = {"OK",
                                           "CANCELLED",
                                           "UNKNOWN",
                                           "INVALID_ARGUMENT",
                                           "DEADLINE_EXCEEDED",
                                           "NOT_FOUND",
                                           "ALREADY_EXISTS",
                                           "PERMISSION_DENIED",
                                           "RESOURCE_EXHAUSTED",
                                           "FAILED_PRECONDITION",
                                           "ABORTED",
                                           "OUT_OF_RANGE",
                                           "UNIMPLEMENTED",
                                           "INTERNAL",
                                           "UNAVAILABLE",
                                           "DATA_LOSS",
                                           "UNAUTHENTICATED"};
  const int index = static_cast<int>(code);
  return index >= 0 && index < 17 ? kNames[index] : "UNKNOWN";
}

std::string Ms(absl::Duration d) { return absl::StrFormat("%.3f", absl::ToDoubleMilliseconds(d)); }

// Per-call timings that go into trailing metadata and metrics.
struct Timings {
  absl::Time start = absl::Now();
  absl::Duration queue;    // time tasks of this call waited in the pool queue
  absl::Duration compute;  // kernel time (Prepare + tiles)
  absl::Duration write;    // time writes were outstanding (streams only)
};

// Ends a call: trailing metadata with the server timings, metrics, the log line. Returns
// the status to hand to the reactor's Finish.
grpc::Status Conclude(const Env& env, grpc::CallbackServerContext* context, const char* method,
                      const Timings& timings, const absl::Status& status, int64_t sent_bytes,
                      int64_t flops, int64_t tiles) {
  const absl::Duration total = absl::Now() - timings.start;
  context->AddTrailingMetadata("simserve-queue-ms", Ms(timings.queue));
  context->AddTrailingMetadata("simserve-compute-ms", Ms(timings.compute));
  context->AddTrailingMetadata("simserve-total-ms", Ms(total));
  env.metrics->ObserveTotal(absl::ToDoubleSeconds(total));
  if (timings.compute > absl::ZeroDuration()) {
    env.metrics->ObserveQueueWait(absl::ToDoubleSeconds(timings.queue));
    env.metrics->ObserveCompute(absl::ToDoubleSeconds(timings.compute));
  }
  if (timings.write > absl::ZeroDuration()) {
    env.metrics->ObserveWrite(absl::ToDoubleSeconds(timings.write));
  }
  if (sent_bytes > 0) env.metrics->AddBytesSent(static_cast<uint64_t>(sent_bytes));
  if (tiles > 0) env.metrics->AddTiles(static_cast<uint64_t>(tiles));
  if (status.ok() && flops > 0) env.metrics->AddFlops(static_cast<double>(flops));
  grpc::Status out = ToGrpcStatus(status);
  if (!status.ok()) {
    LogWarning(absl::StrCat(method, " failed: ", CodeName(out.error_code()), ": ", status.message(),
                            " (peer ", context->peer(), ", ", Ms(total), " ms)"));
  } else if (env.config.log_requests) {
    LogInfo(absl::StrCat(method, " OK: ", sent_bytes, " bytes, queue ", Ms(timings.queue),
                         " ms, compute ", Ms(timings.compute), " ms, total ", Ms(total),
                         " ms (peer ", context->peer(), ")"));
  }
  return out;
}

// Records a RESOURCE_EXHAUSTED from validation as a rejection.
void CountReject(const Env& env, const absl::Status& status, RejectReason reason) {
  if (status.code() == absl::StatusCode::kResourceExhausted) env.metrics->Reject(reason);
}

absl::Status DrainingError() {
  return absl::UnavailableError("server is draining (shutting down); retry on another replica");
}

// ---------------------------------------------------------------------------------------
// Compute: the whole result in one response, computed by one pool task.
class UnaryCall final : public grpc::ServerUnaryReactor {
 public:
  UnaryCall(const Env& env, grpc::CallbackServerContext* context, const v1::ComputeRequest* request,
            v1::ComputeResponse* response)
      : env_(env), context_(context), request_(request), response_(response) {
    env_.metrics->AddInFlight(1);
    Start();
  }

  void OnCancel() override { cancelled_.store(true); }
  void OnDone() override {
    env_.metrics->AddInFlight(-1);
    delete this;  // gRPC callback API: the reactor owns itself.
  }

 private:
  void Start() {
    if (env_.draining->load()) {
      env_.metrics->Reject(RejectReason::kDraining);
      return Done(DrainingError());
    }
    RejectReason reason = RejectReason::kTooManyElements;
    auto converted = ConvertRequest(*request_, RequestKind::kUnary, env_.config.limits, &reason);
    if (!converted.ok()) {
      CountReject(env_, converted.status(), reason);
      return Done(converted.status());
    }
    input_ = *converted;
    env_.metrics->AddBytesReceived(
        static_cast<uint64_t>(input_.spec.a_bytes + input_.spec.b_bytes));
    auto admission = env_.pool->Admit(
        input_.spec.InflightBytes(RequestKind::kUnary, env_.config.compute.stream_window));
    if (!admission.ok()) return Done(admission.status());
    admission_ = std::move(*admission);
    ComputeTask task;
    task.run = [this](absl::Duration wait) { Run(wait); };
    task.skip = [this](const absl::Status& why) { Done(why); };
    task.deadline = DeadlineOf(context_);
    task.cancelled = [this] { return cancelled_.load(); };
    absl::Status submitted = env_.pool->Submit(std::move(task), /*new_request=*/true);
    if (!submitted.ok()) Done(submitted);
  }

  // On a pool worker.
  void Run(absl::Duration wait) {
    timings_.queue = wait;
    const absl::Time begin = absl::Now();
    absl::Status status = Compute();
    timings_.compute = absl::Now() - begin;
    Done(status);
  }

  absl::Status Compute() {
    const ProblemSpec& spec = input_.spec;
    auto job = env_.engine->Prepare(spec.shape, spec.options, input_.b);
    if (!job.ok()) return job.status();
    std::string* values = response_->mutable_values_raw();
    std::string* indices = response_->mutable_indices_raw();
    values->resize(static_cast<size_t>(spec.shape.batch * spec.shape.n * spec.value_row_bytes));
    indices->resize(static_cast<size_t>(spec.shape.batch * spec.shape.n * spec.index_row_bytes));
    const int64_t a_batch_bytes =
        spec.shape.n * spec.shape.d * static_cast<int64_t>(kernels::SizeOf(spec.a_dtype));
    const absl::Time deadline = DeadlineOf(context_);
    for (int64_t k = 0; k < spec.shape.batch; ++k) {
      if (cancelled_.load()) return absl::CancelledError("cancelled by the client");
      if (absl::Now() >= deadline) return absl::DeadlineExceededError("deadline expired");
      const kernels::ConstTensorView a_rows{input_.a.data + k * a_batch_bytes, spec.a_dtype};
      auto* value_ptr =
          reinterpret_cast<std::byte*>(values->data()) + k * spec.shape.n * spec.value_row_bytes;
      std::span<int32_t> index_span;
      if (spec.index_row_bytes > 0) {
        index_span = {
            reinterpret_cast<int32_t*>(indices->data()) + k * spec.shape.n * spec.options.top_k,
            static_cast<size_t>(spec.shape.n * spec.options.top_k)};
      }
      absl::Status tile = (*job)->ComputeTile(
          k, 0, spec.shape.n, a_rows,
          {value_ptr, static_cast<size_t>(spec.shape.n * spec.value_row_bytes)}, index_span);
      if (!tile.ok()) return tile;
      env_.stats->tiles_computed.fetch_add(1);
    }
    for (int64_t dim : spec.OutputShape()) response_->add_shape(dim);
    response_->set_dtype(ToProto(spec.options.output_dtype));
    return absl::OkStatus();
  }

  void Done(const absl::Status& status) {
    if (!status.ok()) response_->Clear();
    const int64_t sent = status.ok() ? input_.spec.output_bytes : 0;
    Finish(Conclude(env_, context_, kCompute, timings_, status, sent, input_.spec.flops,
                    status.ok() ? input_.spec.shape.batch : 0));
  }

  const Env env_;
  grpc::CallbackServerContext* const context_;
  const v1::ComputeRequest* const request_;
  v1::ComputeResponse* const response_;
  ConvertedRequest input_;
  Admission admission_;
  Timings timings_;
  std::atomic<bool> cancelled_{false};
};

// ---------------------------------------------------------------------------------------
// The tile pipeline shared by ComputeStream and ComputeUpload. `Reactor` is the gRPC
// reactor base (write-only or bidi); both have StartWrite and Finish.
//
// Invariants (under mu_): at most one tile is being computed and at most one written;
// computing + written + ready tiles <= window. Finish is called exactly once, when no
// compute task and no write is outstanding, so the reactor outlives every task.
// gRPC operations are started after releasing mu_ (their reactions may run inline).
template <class Reactor>
class TileStreamCall : public Reactor {
 protected:
  TileStreamCall(const Env& env, grpc::CallbackServerContext* context, const char* method)
      : env_(env), context_(context), method_(method), deadline_(DeadlineOf(context)) {
    env_.metrics->AddInFlight(1);
  }

  ~TileStreamCall() override {
    int64_t left = 0;
    for (const auto& chunk : ready_) left += PayloadBytes(*chunk);
    if (writing_ != nullptr) left += PayloadBytes(*writing_);
    env_.stats->stream_buffered_bytes.fetch_sub(left);
  }

 public:
  void OnWriteDone(bool ok) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      timings_.write += absl::Now() - write_started_;
      const int64_t bytes = PayloadBytes(*writing_);
      env_.stats->stream_buffered_bytes.fetch_sub(bytes);
      writing_.reset();
      if (ok) {
        sent_bytes_ += bytes;
        ++tiles_written_;
      } else {
        FailLocked(WhyGone());
      }
    }
    Pump();
  }

  void OnCancel() override {
    cancelled_.store(true);
    Fail(WhyGone());
  }

  void OnDone() override {
    env_.metrics->AddInFlight(-1);
    delete this;  // gRPC callback API: the reactor owns itself.
  }

 protected:
  static int64_t PayloadBytes(const Chunk& chunk) {
    return static_cast<int64_t>(chunk.values_raw().size() + chunk.indices_raw().size());
  }

  absl::Status WhyGone() const {
    if (absl::Now() >= deadline_) return absl::DeadlineExceededError("deadline expired");
    return absl::CancelledError("cancelled by the client");
  }

  // Records the first error; the call finishes with it once nothing is outstanding.
  void FailLocked(absl::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (error_.ok()) error_ = std::move(status);
  }
  void Fail(absl::Status status) ABSL_LOCKS_EXCLUDED(mu_) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      FailLocked(std::move(status));
    }
    Pump();
  }

  // Sets the problem; the caller then provides the data (a_data_, b_view_, a_rows_ready_).
  void SetProblemLocked(const ProblemSpec& spec, Admission admission)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    spec_ = spec;
    admission_ = std::move(admission);
    have_problem_ = true;
    total_tiles_ = spec.TileCount();
    a_row_bytes_ = spec.shape.d * static_cast<int64_t>(kernels::SizeOf(spec.a_dtype));
  }

  // Starts whatever can start: the next write, the next tile, or Finish.
  void Pump() ABSL_LOCKS_EXCLUDED(mu_) {
    const Chunk* to_write = nullptr;
    std::optional<absl::Status> to_finish;
    std::optional<Tile> to_compute;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_) return;
      if (!error_.ok()) {
        if (!computing_ && writing_ == nullptr) {
          finished_ = true;
          to_finish = error_;
        }
      } else {
        if (writing_ == nullptr && !ready_.empty()) {
          writing_ = std::move(ready_.front());
          ready_.pop_front();
          to_write = writing_.get();
          write_started_ = absl::Now();
        }
        if (CanComputeLocked()) {
          computing_ = true;
          to_compute = NextTileLocked();
        }
        if (have_problem_ && input_closed_ && tiles_written_ == total_tiles_ && !computing_ &&
            writing_ == nullptr) {
          finished_ = true;
          to_finish = absl::OkStatus();
        }
      }
    }
    bool submit_failed = false;
    if (to_compute.has_value()) {
      const Tile tile = *to_compute;
      ComputeTask task;
      task.run = [this, tile](absl::Duration wait) { RunTile(tile, wait); };
      task.skip = [this](absl::Status why) {
        {
          std::lock_guard<std::mutex> lock(mu_);
          computing_ = false;
          FailLocked(std::move(why));
        }
        Pump();
      };
      task.deadline = deadline_;
      task.cancelled = [this] { return cancelled_.load(); };
      absl::Status submitted = env_.pool->Submit(std::move(task), /*new_request=*/tile.first);
      if (!submitted.ok()) {
        std::lock_guard<std::mutex> lock(mu_);
        computing_ = false;
        FailLocked(std::move(submitted));
        submit_failed = true;
      }
    }
    if (to_write != nullptr) this->StartWrite(to_write);
    if (to_finish.has_value()) {
      int64_t sent = 0;
      int64_t tiles = 0;
      int64_t flops = 0;
      {
        std::lock_guard<std::mutex> lock(mu_);
        sent = sent_bytes_;
        tiles = tiles_written_;
        flops = have_problem_ ? spec_.flops : 0;
      }
      // No tile is running: release the kernel job (it borrows B) and the reservation now.
      job_.reset();
      admission_ = Admission();
      this->Finish(Conclude(env_, context_, method_, timings_, *to_finish, sent, flops, tiles));
    }
    if (submit_failed) Pump();
  }

  const Env env_;
  grpc::CallbackServerContext* const context_;
  const char* const method_;
  const absl::Time deadline_;
  std::atomic<bool> cancelled_{false};

  std::mutex mu_;  // std::mutex: visible to TSan (the system Abseil is not instrumented)
  // Set once under mu_ before the first tile is scheduled, then read-only: tile tasks read
  // them without the lock (the pool's queue orders the accesses).
  ProblemSpec spec_;
  bool have_problem_ ABSL_GUARDED_BY(mu_) = false;
  int64_t a_row_bytes_ = 0;
  const std::byte* a_data_ = nullptr;
  kernels::ConstTensorView b_view_;
  bool b_ready_ ABSL_GUARDED_BY(mu_) = false;
  // Rows of A (counted over all batch entries) whose bytes are present.
  int64_t a_rows_ready_ ABSL_GUARDED_BY(mu_) = 0;
  // False while the client may still send (upload): the call ends OK only after the client's
  // half-close, so data past the declared shapes is an error rather than silently dropped.
  bool input_closed_ ABSL_GUARDED_BY(mu_) = true;
  absl::Status error_ ABSL_GUARDED_BY(mu_);
  Timings timings_;

 private:
  struct Tile {
    int64_t batch = 0;
    int64_t row = 0;
    int64_t rows = 0;
    bool first = false;
  };

  bool CanComputeLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (computing_ || !have_problem_ || !b_ready_ || tiles_scheduled_ >= total_tiles_) {
      return false;
    }
    const int64_t outstanding = static_cast<int64_t>(ready_.size()) + (writing_ ? 1 : 0);
    if (outstanding + 1 > env_.config.compute.stream_window) return false;
    const int64_t rows = std::min(spec_.tile_rows, spec_.shape.n - next_row_);
    return next_batch_ * spec_.shape.n + next_row_ + rows <= a_rows_ready_;
  }

  Tile NextTileLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Tile tile{next_batch_, next_row_, std::min(spec_.tile_rows, spec_.shape.n - next_row_),
              tiles_scheduled_ == 0};
    next_row_ += tile.rows;
    if (next_row_ == spec_.shape.n) {
      next_row_ = 0;
      ++next_batch_;
    }
    ++tiles_scheduled_;
    return tile;
  }

  // On a pool worker; the only code touching job_.
  void RunTile(const Tile& tile, absl::Duration wait) {
    const absl::Time begin = absl::Now();
    auto chunk = std::make_unique<Chunk>();
    absl::Status status = ComputeInto(tile, chunk.get());
    const absl::Duration took = absl::Now() - begin;
    if (status.ok()) {
      env_.stats->tiles_computed.fetch_add(1);
      const int64_t now =
          env_.stats->stream_buffered_bytes.fetch_add(PayloadBytes(*chunk)) + PayloadBytes(*chunk);
      int64_t peak = env_.stats->stream_buffered_bytes_peak.load();
      while (now > peak &&
             !env_.stats->stream_buffered_bytes_peak.compare_exchange_weak(peak, now)) {
      }
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      computing_ = false;
      timings_.queue += wait;
      timings_.compute += took;
      if (status.ok()) {
        ready_.push_back(std::move(chunk));
      } else {
        FailLocked(std::move(status));
      }
    }
    Pump();
  }

  absl::Status ComputeInto(const Tile& tile, Chunk* chunk) {
    if (job_ == nullptr) {
      auto job = env_.engine->Prepare(spec_.shape, spec_.options, b_view_);
      if (!job.ok()) return job.status();
      job_ = std::move(*job);
    }
    if (tile.first) {
      for (int64_t dim : spec_.OutputShape()) chunk->add_shape(dim);
    }
    chunk->set_dtype(ToProto(spec_.options.output_dtype));
    chunk->set_batch_index(tile.batch);
    chunk->set_row_offset(tile.row);
    chunk->set_row_count(tile.rows);
    // Computed straight into the message's buffers: no copy on the way out.
    std::string* values = chunk->mutable_values_raw();
    values->resize(static_cast<size_t>(tile.rows * spec_.value_row_bytes));
    std::span<int32_t> index_span;
    if (spec_.index_row_bytes > 0) {
      std::string* indices = chunk->mutable_indices_raw();
      indices->resize(static_cast<size_t>(tile.rows * spec_.index_row_bytes));
      index_span = {reinterpret_cast<int32_t*>(indices->data()),
                    static_cast<size_t>(tile.rows * spec_.options.top_k)};
    }
    const kernels::ConstTensorView a_rows{
        a_data_ + (tile.batch * spec_.shape.n + tile.row) * a_row_bytes_, spec_.a_dtype};
    return job_->ComputeTile(tile.batch, tile.row, tile.rows, a_rows,
                             {reinterpret_cast<std::byte*>(values->data()), values->size()},
                             index_span);
  }

  Admission admission_;
  std::unique_ptr<kernels::SimilarityJob> job_;
  int64_t next_batch_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t next_row_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t tiles_scheduled_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t tiles_written_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t total_tiles_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t sent_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  std::deque<std::unique_ptr<Chunk>> ready_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<Chunk> writing_ ABSL_GUARDED_BY(mu_);
  absl::Time write_started_ ABSL_GUARDED_BY(mu_);
  bool computing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

// ---------------------------------------------------------------------------------------
// ComputeStream: inputs complete in the request; tiles start right away.
class StreamCall final : public TileStreamCall<grpc::ServerWriteReactor<Chunk>> {
 public:
  StreamCall(const Env& env, grpc::CallbackServerContext* context,
             const v1::ComputeRequest* request)
      : TileStreamCall(env, context, kComputeStream) {
    Fail(Start(request));
  }

 private:
  absl::Status Start(const v1::ComputeRequest* request) {
    if (env_.draining->load()) {
      env_.metrics->Reject(RejectReason::kDraining);
      return DrainingError();
    }
    RejectReason reason = RejectReason::kTooManyElements;
    auto converted = ConvertRequest(*request, RequestKind::kStream, env_.config.limits, &reason);
    if (!converted.ok()) {
      CountReject(env_, converted.status(), reason);
      return converted.status();
    }
    const ProblemSpec& spec = converted->spec;
    env_.metrics->AddBytesReceived(static_cast<uint64_t>(spec.a_bytes + spec.b_bytes));
    auto admission = env_.pool->Admit(
        spec.InflightBytes(RequestKind::kStream, env_.config.compute.stream_window));
    if (!admission.ok()) return admission.status();
    std::lock_guard<std::mutex> lock(mu_);
    SetProblemLocked(spec, std::move(*admission));
    a_data_ = converted->a.data;
    b_view_ = converted->b;
    b_ready_ = true;
    a_rows_ready_ = spec.shape.batch * spec.shape.n;
    return absl::OkStatus();  // Fail(OK) records nothing and pumps the first tile.
  }
};

// ---------------------------------------------------------------------------------------
// ComputeUpload: header, B's bytes, A's bytes; tiles start once B and enough of A are in.
class UploadCall final : public TileStreamCall<grpc::ServerBidiReactor<v1::UploadRequest, Chunk>> {
 public:
  UploadCall(const Env& env, grpc::CallbackServerContext* context)
      : TileStreamCall(env, context, kComputeUpload) {
    if (env_.draining->load()) {
      env_.metrics->Reject(RejectReason::kDraining);
      Fail(DrainingError());
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      input_closed_ = false;
    }
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    bool read_more = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (error_.ok()) {
        absl::Status status = ok ? Accept() : HalfClosed();
        if (!status.ok()) FailLocked(std::move(status));
        read_more = ok && error_.ok();
      }
    }
    if (read_more) StartRead(&request_);
    Pump();
  }

 private:
  absl::Status HalfClosed() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    input_closed_ = true;
    if (!have_header_) {
      return absl::InvalidArgumentError("upload stream ended before its header");
    }
    if (b_received_ < spec_.b_bytes || a_received_ < spec_.a_bytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("upload stream ended early: received ", b_received_, " of ", spec_.b_bytes,
                       " bytes of b and ", a_received_, " of ", spec_.a_bytes, " bytes of a"));
    }
    return absl::OkStatus();
  }

  absl::Status Accept() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    switch (request_.part_case()) {
      case v1::UploadRequest::kHeader:
        return AcceptHeader();
      case v1::UploadRequest::kBData: {
        if (!have_header_) return absl::InvalidArgumentError("b_data before the upload header");
        if (b_received_ == spec_.b_bytes) {
          return absl::InvalidArgumentError(absl::StrCat("too much data for tensor b: all ",
                                                         spec_.b_bytes, " bytes already received"));
        }
        absl::Status status = Append("b", request_.b_data(), spec_.b_bytes, spec_.b_dtype,
                                     b_buffer_.get(), &b_received_, &b_checked_);
        if (!status.ok()) return status;
        if (b_received_ == spec_.b_bytes) {
          b_view_ = {b_buffer_.get(), spec_.b_dtype};
          b_ready_ = true;
        }
        return absl::OkStatus();
      }
      case v1::UploadRequest::kAData: {
        if (!have_header_) return absl::InvalidArgumentError("a_data before the upload header");
        if (b_received_ < spec_.b_bytes) {
          return absl::InvalidArgumentError(
              absl::StrCat("a_data before all of b: received ", b_received_, " of ", spec_.b_bytes,
                           " bytes of b (send b_data first, then a_data)"));
        }
        if (a_received_ == spec_.a_bytes) {
          return absl::InvalidArgumentError(absl::StrCat("too much data for tensor a: all ",
                                                         spec_.a_bytes, " bytes already received"));
        }
        absl::Status status = Append("a", request_.a_data(), spec_.a_bytes, spec_.a_dtype,
                                     a_buffer_.get(), &a_received_, &a_checked_);
        if (!status.ok()) return status;
        a_rows_ready_ = a_received_ / a_row_bytes_;
        return absl::OkStatus();
      }
      case v1::UploadRequest::PART_NOT_SET:
        break;
    }
    return absl::InvalidArgumentError("empty UploadRequest: set header, b_data or a_data");
  }

  absl::Status AcceptHeader() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (have_header_) return absl::InvalidArgumentError("second upload header in one stream");
    have_header_ = true;
    RejectReason reason = RejectReason::kTooManyElements;
    auto spec = ProblemFromUploadHeader(request_.header().request(), env_.config.limits, &reason);
    if (!spec.ok()) {
      CountReject(env_, spec.status(), reason);
      return spec.status();
    }
    auto admission = env_.pool->Admit(
        spec->InflightBytes(RequestKind::kUpload, env_.config.compute.stream_window));
    if (!admission.ok()) return admission.status();
    SetProblemLocked(*spec, std::move(*admission));
    // Uninitialised: the bytes are written once, as they arrive.
    a_buffer_ = std::make_unique_for_overwrite<std::byte[]>(static_cast<size_t>(spec->a_bytes));
    b_buffer_ = std::make_unique_for_overwrite<std::byte[]>(static_cast<size_t>(spec->b_bytes));
    a_data_ = a_buffer_.get();
    return absl::OkStatus();
  }

  // Appends one piece of a tensor and checks the complete elements it finished for NaN/Inf.
  absl::Status Append(absl::string_view name, const std::string& piece, int64_t expected,
                      kernels::DataType dtype, std::byte* buffer, int64_t* received,
                      int64_t* checked) {
    const auto size = static_cast<int64_t>(piece.size());
    if (*received + size > expected) {
      return absl::InvalidArgumentError(absl::StrCat("too much data for tensor ", name, ": ",
                                                     *received + size,
                                                     " bytes received, shape needs ", expected));
    }
    std::memcpy(buffer + *received, piece.data(), piece.size());
    *received += size;
    env_.metrics->AddBytesReceived(static_cast<uint64_t>(size));
    const auto elem = static_cast<int64_t>(kernels::SizeOf(dtype));
    const int64_t complete = *received / elem;
    absl::Status finite =
        CheckFinite(name, buffer + *checked * elem, complete - *checked, dtype, *checked);
    *checked = complete;
    return finite;
  }

  v1::UploadRequest request_;
  bool have_header_ ABSL_GUARDED_BY(mu_) = false;
  std::unique_ptr<std::byte[]> a_buffer_;
  std::unique_ptr<std::byte[]> b_buffer_;
  int64_t a_received_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t b_received_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t a_checked_ ABSL_GUARDED_BY(mu_) = 0;  // elements of A checked for NaN/Inf
  int64_t b_checked_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace

SimilarityService::SimilarityService(const ServerConfig& config, kernels::SimilarityEngine* engine,
                                     ComputePool* pool, ServerMetrics* metrics)
    : config_(config), env_{config_, engine, pool, metrics, &stats_, &draining_} {}

grpc::ServerUnaryReactor* SimilarityService::Compute(grpc::CallbackServerContext* context,
                                                     const v1::ComputeRequest* request,
                                                     v1::ComputeResponse* response) {
  return new UnaryCall(env_, context, request, response);
}

grpc::ServerWriteReactor<v1::ComputeChunk>* SimilarityService::ComputeStream(
    grpc::CallbackServerContext* context, const v1::ComputeRequest* request) {
  return new StreamCall(env_, context, request);
}

grpc::ServerBidiReactor<v1::UploadRequest, v1::ComputeChunk>* SimilarityService::ComputeUpload(
    grpc::CallbackServerContext* context) {
  return new UploadCall(env_, context);
}

grpc::ServerUnaryReactor* SimilarityService::GetInfo(grpc::CallbackServerContext* context,
                                                     const v1::GetInfoRequest* /*request*/,
                                                     v1::GetInfoResponse* response) {
  response->set_version(SIMSERVE_VERSION);
  response->set_onednn_version(kernels::SimilarityEngine::OneDnnVersion());
  response->set_cpu_isa(kernels::SimilarityEngine::CpuIsa());
  response->set_compute_workers(env_.pool->workers());
  response->set_threads_per_worker(env_.engine->threads_per_call());
  const LimitsConfig& l = config_.limits;
  v1::Limits* limits = response->mutable_limits();
  limits->set_max_receive_message_bytes(l.max_receive_message_bytes);
  limits->set_max_send_message_bytes(l.max_send_message_bytes);
  limits->set_max_input_elements(l.max_input_elements);
  limits->set_max_output_bytes(l.max_output_bytes);
  limits->set_max_flops(l.max_flops);
  limits->set_max_chunk_bytes(l.max_chunk_bytes);
  limits->set_default_chunk_bytes(l.default_chunk_bytes);
  limits->set_max_queued_requests(l.max_queued_requests);
  limits->set_max_inflight_bytes(l.max_inflight_bytes);
  limits->set_message_overhead_bytes(kMessageOverheadBytes);
  for (auto m : {v1::COSINE, v1::DOT, v1::EUCLIDEAN, v1::SQUARED_EUCLIDEAN}) {
    response->add_metrics(m);
  }
  for (auto t : {v1::FLOAT32, v1::BFLOAT16, v1::FLOAT16}) {
    response->add_input_dtypes(t);
    response->add_output_dtypes(t);
  }
  response->add_precisions(v1::FP32);
  response->add_precisions(v1::BF16);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace simserve
