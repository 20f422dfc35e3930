// The reactors behind SimilarityService: thin adapters between gRPC and a TilePipeline
// (tile_pipeline.h), which does all the work on the compute pool. They decode requests
// without copying payloads, validate and admit them, feed the pipeline, and write what it
// produces. gRPC's callback API owns reactors by raw pointer: each deletes itself in OnDone.
#include "server/service.h"

#include <malloc.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "server/auth.h"
#include "server/call_setup.h"
#include "server/convert.h"
#include "server/log.h"
#include "server/mutex.h"
#include "server/shared_memory_rpc.h"
#include "server/status.h"
#include "server/upload_assembler.h"
#include "server/wire_codec.h"

namespace simserve {
namespace {

using Env = SimilarityService::Env;

constexpr char kCompute[] = "Compute";
constexpr char kComputeStream[] = "ComputeStream";
constexpr char kComputeUpload[] = "ComputeUpload";

}  // namespace

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

namespace {

std::string Ms(absl::Duration d) { return absl::StrFormat("%.3f", absl::ToDoubleMilliseconds(d)); }

}  // namespace

grpc::Status Conclude(const ServiceEnv& env, grpc::CallbackServerContext* context,
                      const char* method, const PipelineReport& report, const absl::Status& status,
                      bool trailing_metadata) {
  const CallTimings& t = report.timings;
  const absl::Duration total = absl::Now() - t.start;
  if (trailing_metadata) {
    context->AddTrailingMetadata("simserve-queue-ms", Ms(t.queue));
    context->AddTrailingMetadata("simserve-ingest-ms", Ms(t.ingest));
    context->AddTrailingMetadata("simserve-compute-ms", Ms(t.compute));
    context->AddTrailingMetadata("simserve-total-ms", Ms(total));
  }
  env.metrics->ObserveTotal(absl::ToDoubleSeconds(total));
  if (t.compute > absl::ZeroDuration()) {
    env.metrics->ObserveQueueWait(absl::ToDoubleSeconds(t.queue));
    env.metrics->ObserveCompute(absl::ToDoubleSeconds(t.compute));
  }
  if (t.write > absl::ZeroDuration()) env.metrics->ObserveWrite(absl::ToDoubleSeconds(t.write));
  const int64_t sent = status.ok() ? report.sent_bytes : 0;
  if (sent > 0) env.metrics->AddBytesSent(static_cast<uint64_t>(sent));
  if (report.tiles > 0) env.metrics->AddTiles(static_cast<uint64_t>(report.tiles));
  if (status.ok() && report.flops > 0) env.metrics->AddFlops(static_cast<double>(report.flops));
  grpc::Status out = ToGrpcStatus(status);
  if (!status.ok()) {
    LogWarning(absl::StrCat(method, " failed: ", CodeName(out.error_code()), ": ", status.message(),
                            " (peer ", context->peer(), ", ", Ms(total), " ms)"));
  } else if (env.config.log_requests) {
    LogInfo(absl::StrCat(method, " OK: ", sent, " bytes, queue ", Ms(t.queue), " ms, ingest ",
                         Ms(t.ingest), " ms, compute ", Ms(t.compute), " ms, total ", Ms(total),
                         " ms (peer ", context->peer(), ")"));
  }
  return out;
}

// A call whose client went away before its request arrived gets no request message (an
// invalid ByteBuffer; an empty message is a valid one): that is a cancellation, not the
// client's INVALID_ARGUMENT, even before OnCancel has run.
void FailUnlessCancelled(grpc::CallbackServerContext* context, const grpc::ByteBuffer& request,
                         TilePipeline* pipeline, absl::Status error) {
  if (!request.Valid() || context->IsCancelled() || absl::Now() >= DeadlineOf(context)) {
    return pipeline->Cancel();
  }
  pipeline->Fail(std::move(error));
}

// The client a call counts against for the per-client share of the in-flight bytes: the
// token it authenticated with (auth.h), else its address without the port (one host's
// connections share one share; behind a proxy every caller looks the same: use tokens).
std::string PeerKey(const grpc::CallbackServerContext* context) {
  if (const std::shared_ptr<const grpc::AuthContext> auth = context->auth_context()) {
    const std::vector<grpc::string_ref> token = auth->FindPropertyValues(kTokenIdentityProperty);
    if (!token.empty()) return std::string(token.front().data(), token.front().size());
  }
  const std::string peer = context->peer();  // "ipv4:10.0.0.1:5000", "ipv6:[::1]:5000", "unix:"
  const size_t colon = peer.rfind(':');
  if (absl::StartsWith(peer, "ipv") && colon != std::string::npos && colon > 5) {
    return peer.substr(0, colon);
  }
  return peer;
}

namespace {

// Decodes, validates and admits a Compute/ComputeStream request and starts `pipeline` with
// all of its input (StartComputeCall). On success `*spec` is the problem.
absl::Status StartFromRequest(const Env& env, const grpc::ByteBuffer& buffer, RequestKind kind,
                              const std::string& peer, TilePipeline* pipeline, ProblemSpec* spec) {
  auto received = std::make_shared<ReceivedCompute>(buffer);
  auto decoded = codec::DecodeComputeRequest(received->message);
  if (!decoded.ok()) return decoded.status();
  received->request = std::move(decoded->request);
  received->a_raw = decoded->a_raw;
  received->b_raw = decoded->b_raw;
  return StartComputeCall(env, std::move(received), kind, peer, pipeline, spec);
}

// ComputeChunk of one streamed tile; the tile's buffers become the payload slices.
grpc::ByteBuffer EncodeChunk(const ProblemSpec& spec, TileOutput& tile) {
  v1::ComputeChunk head;
  if (tile.first) {
    for (int64_t dim : spec.OutputShape()) head.add_shape(dim);
  }
  head.set_dtype(ToProto(spec.options.output_dtype));
  head.set_batch_index(tile.batch);
  head.set_row_offset(tile.row_offset);
  head.set_row_count(tile.rows);
  std::vector<codec::PayloadField> payloads;
  payloads.push_back(
      {v1::ComputeChunk::kValuesRawFieldNumber, std::move(tile.values), tile.values_bytes});
  payloads.push_back(
      {v1::ComputeChunk::kIndicesRawFieldNumber, std::move(tile.indices), tile.indices_bytes});
  return codec::EncodeWithPayloads(head, std::move(payloads));
}

// ComputeResponse of a whole result; its buffers become the payload slices.
grpc::ByteBuffer EncodeResponse(const ProblemSpec& spec, TileOutput& whole) {
  v1::ComputeResponse head;
  for (int64_t dim : spec.OutputShape()) head.add_shape(dim);
  head.set_dtype(ToProto(spec.options.output_dtype));
  std::vector<codec::PayloadField> payloads;
  // Parts written to shared memory (ComputeRequest.*_shared_memory) stay out of the message.
  if (!whole.values_in_place) {
    payloads.push_back(
        {v1::ComputeResponse::kValuesRawFieldNumber, std::move(whole.values), whole.values_bytes});
  }
  if (!whole.indices_in_place) {
    payloads.push_back({v1::ComputeResponse::kIndicesRawFieldNumber, std::move(whole.indices),
                        whole.indices_bytes});
  }
  return codec::EncodeWithPayloads(head, std::move(payloads));
}

// ---------------------------------------------------------------------------------------
// Compute: the pipeline in whole-result mode; the response is encoded from its buffers.
class UnaryCall final : public grpc::ServerUnaryReactor, private TilePipeline::Sink {
 public:
  UnaryCall(const Env& env, grpc::CallbackServerContext* context, const grpc::ByteBuffer* request,
            grpc::ByteBuffer* response)
      : env_(env),
        context_(context),
        response_(response),
        pipeline_(PipelineDeps(env), TilePipeline::Mode::kWholeResult, this, DeadlineOf(context)) {
    env_.metrics->AddInFlight(1);
    absl::Status started = StartFromRequest(env_, *request, RequestKind::kUnary, PeerKey(context_),
                                            &pipeline_, &spec_);
    if (!started.ok()) FailUnlessCancelled(context_, *request, &pipeline_, std::move(started));
  }

  void OnCancel() override { pipeline_.Cancel(); }
  void OnDone() override {
    env_.metrics->AddInFlight(-1);
    delete this;  // gRPC callback API: the reactor owns itself.
  }

 private:
  void WriteTile(std::unique_ptr<TileOutput> /*tile*/) override {}  // whole mode: never called
  void ResumeReading() override {}                                  // all input is present
  void Finish(const absl::Status& status, const PipelineReport& report,
              std::unique_ptr<TileOutput> whole) override {
    if (status.ok()) *response_ = EncodeResponse(spec_, *whole);
    grpc::ServerUnaryReactor::Finish(Conclude(env_, context_, kCompute, report, status));
  }

  const Env env_;
  grpc::CallbackServerContext* const context_;
  grpc::ByteBuffer* const response_;
  ProblemSpec spec_;  // written before the pipeline starts, read when it finishes
  TilePipeline pipeline_;
};

// ---------------------------------------------------------------------------------------
// The writing half shared by ComputeStream and ComputeUpload: the pipeline in stream mode,
// each tile encoded without a copy and written as one message. `Reactor` is the gRPC
// reactor base (write-only or bidi).
template <class Reactor>
class StreamingCall : public Reactor, protected TilePipeline::Sink {
 public:
  void OnWriteDone(bool ok) override {
    writing_.Clear();  // releases the tile's buffers (unless the transport still holds them)
    pipeline_.WriteDone(ok);
  }
  void OnCancel() override { pipeline_.Cancel(); }
  void OnDone() override {
    env_.metrics->AddInFlight(-1);
    delete this;  // gRPC callback API: the reactor owns itself.
  }

 protected:
  StreamingCall(const Env& env, grpc::CallbackServerContext* context, const char* method)
      : env_(env),
        context_(context),
        method_(method),
        pipeline_(PipelineDeps(env), TilePipeline::Mode::kStreamTiles, this, DeadlineOf(context)) {
    env_.metrics->AddInFlight(1);
  }

  void WriteTile(std::unique_ptr<TileOutput> tile) override {
    writing_ = EncodeChunk(spec_, *tile);
    this->StartWrite(&writing_);
  }
  void Finish(const absl::Status& status, const PipelineReport& report,
              std::unique_ptr<TileOutput> /*whole*/) override {
    Reactor::Finish(Conclude(env_, context_, method_, report, status));
  }

  const Env env_;
  grpc::CallbackServerContext* const context_;
  const char* const method_;
  // Written once before the first tile can exist (the pipeline orders it), then read-only.
  ProblemSpec spec_;
  grpc::ByteBuffer writing_;  // the message being written (one at a time)
  TilePipeline pipeline_;
};

// ComputeStream: all input is in the request; tiles start once it is ingested.
class StreamCall final : public StreamingCall<grpc::ServerWriteReactor<grpc::ByteBuffer>> {
 public:
  StreamCall(const Env& env, grpc::CallbackServerContext* context, const grpc::ByteBuffer* request)
      : StreamingCall(env, context, kComputeStream) {
    absl::Status started = StartFromRequest(env_, *request, RequestKind::kStream, PeerKey(context_),
                                            &pipeline_, &spec_);
    if (!started.ok()) FailUnlessCancelled(context_, *request, &pipeline_, std::move(started));
  }

 private:
  void ResumeReading() override {}  // all input is present
};

// ComputeUpload: header, B's bytes, A's bytes; tiles start once B and enough of A are in.
// A thin adapter: the UploadAssembler (upload_assembler.h) applies the stream's rules; reads
// are paused while the pipeline has too many received bytes still to ingest.
class UploadCall final
    : public StreamingCall<grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>> {
 public:
  UploadCall(const Env& env, grpc::CallbackServerContext* context)
      : StreamingCall(env, context, kComputeUpload) {
    if (env_.draining->load()) {
      env_.metrics->Reject(RejectReason::kDraining);
      pipeline_.Fail(DrainingError());
      return;
    }
    Read();
  }

  // Reactions of reads are serialized (one read outstanding), as the assembler requires.
  void OnReadDone(bool ok) override {
    idle_->NotWaiting();
    // !ok: the client half-closed, or went away (then OnCancel follows; the missing bytes
    // are its cancellation, not an INVALID_ARGUMENT).
    if (!ok) return context_->IsCancelled() ? pipeline_.Cancel() : assembler_.OnEndOfStream();
    auto message = std::make_shared<codec::ReceivedMessage>(read_);
    read_.Clear();
    if (assembler_.OnMessage(std::move(message))) Read();
  }

 private:
  void ResumeReading() override { Read(); }
  void Read() {
    idle_->Waiting();
    StartRead(&read_);
  }

  // Destroyed before pipeline_ (a base member): an expiry never sees a half-destroyed call.
  std::unique_ptr<IdleWatch> idle_ =
      env_.idle_watchdog->Watch([this](absl::Status why) { pipeline_.Fail(std::move(why)); });
  grpc::ByteBuffer read_;  // the message being read (one at a time)
  UploadAssembler assembler_{env_, &pipeline_, &spec_, PeerKey(context_)};
};

// ---------------------------------------------------------------------------------------
// Galleries.

void FillGalleryInfo(const Gallery& gallery, v1::GalleryInfo* info) {
  info->set_name(gallery.name);
  for (const int64_t dim : gallery.shape) info->add_shape(dim);
  info->set_storage_dtype(ToProto(gallery.prepared->storage_dtype()));
  info->set_version(gallery.version);
  info->set_bytes(gallery.bytes());
  info->set_source(gallery.source == GallerySource::kDirectory ? v1::DIRECTORY : v1::UPLOADED);
  info->set_last_used_unix_ms(gallery.last_used_unix_ms.load(std::memory_order_relaxed));
  info->set_registered_unix_ms(absl::ToUnixMillis(gallery.registered));
  info->set_dtype(ToProto(gallery.dtype));
  info->set_path(gallery.path);
  info->set_prepare_seconds(absl::ToDoubleSeconds(gallery.prepare_time));
}

// RegisterGallery: header first, then data pieces of any size. Messages are decoded in place
// (wire_codec) and each piece is copied from gRPC's slices into the gallery's buffer at its
// offset by a compute pool task (disjoint ranges, so the copies may run on several workers);
// reading pauses while more than upload_read_ahead_bytes wait to be copied, so the call holds
// the gallery's buffer plus a few messages. When the stream has ended and every copy is done,
// one more pool task checks and prepares the gallery and stores it. The call finishes only
// when no task is outstanding and no read is being started, so nothing outlives the reactor.
class RegisterCall final : public grpc::ServerReadReactor<grpc::ByteBuffer> {
 public:
  RegisterCall(const Env& env, grpc::CallbackServerContext* context, grpc::ByteBuffer* response)
      : env_(env), context_(context), response_(response) {
    if (env_.draining->load()) {
      env_.metrics->Reject(RejectReason::kDraining);
      Fail(DrainingError());
      return;
    }
    Read();
  }

  // Reactions are serialized by gRPC, so read_, spec_ (until it is published under mu_) and
  // received_ are only touched here.
  void OnReadDone(bool ok) override {
    idle_->NotWaiting();
    if (!ok) {  // half-close, or cancellation (then Finish is moot)
      if (context_->IsCancelled()) return Fail(absl::CancelledError("the client cancelled"));
      return EndOfStream();
    }
    auto message = std::make_shared<codec::ReceivedMessage>(read_);
    read_.Clear();  // before anything that may resume reading into read_
    auto decoded = codec::DecodeRegisterGalleryRequest(*message);
    if (!decoded.ok()) return Fail(decoded.status());
    switch (decoded->part) {
      case v1::RegisterGalleryRequest::kHeader: {
        if (spec_.has_value()) return Fail(absl::InvalidArgumentError("second gallery header"));
        if (absl::Status accepted = AcceptHeader(decoded->header); !accepted.ok()) {
          return Fail(std::move(accepted));
        }
        return ReadNext();
      }
      case v1::RegisterGalleryRequest::kData: {
        if (!spec_.has_value()) {
          return Fail(absl::InvalidArgumentError(
              "gallery data before the header: send the GalleryHeader first"));
        }
        const int64_t offset = received_;
        received_ += decoded->data.size;
        if (received_ > spec_->input_bytes) {
          return Fail(absl::InvalidArgumentError(
              absl::StrCat("too many bytes for gallery '", spec_->name, "': the header declares ",
                           spec_->input_bytes, " (shape x dtype), received ", received_,
                           " so far; nothing was registered")));
        }
        env_.metrics->AddBytesReceived(static_cast<uint64_t>(decoded->data.size));
        return Copy(offset, decoded->data, std::move(message));
      }
      case v1::RegisterGalleryRequest::PART_NOT_SET:
        break;
    }
    Fail(absl::InvalidArgumentError("empty RegisterGalleryRequest: set header or data"));
  }

  void OnDone() override { delete this; }  // gRPC callback API: the reactor owns itself.

 private:
  void Read() {
    idle_->Waiting();
    StartRead(&read_);
  }

  enum class Next { kNothing, kPrepare, kFinishError };

  absl::Status AcceptHeader(const v1::GalleryHeader& header) {
    auto spec = GallerySpecFromHeader(header);
    if (!spec.ok()) return spec.status();
    if (absl::Status room =
            env_.galleries->CheckRoom(spec->name, GallerySource::kUploaded, spec->prepared_bytes);
        !room.ok()) {
      return room;
    }
    auto builder = kernels::GalleryBuilder::Create(spec->dims, spec->dtype, spec->storage_dtype);
    if (!builder.ok()) return builder.status();
    // Held while registering: the gallery's buffers and the messages waiting to be copied
    // (the read-ahead, overshot by at most one message).
    auto admission =
        env_.pool->Admit((*builder)->PeakBytes() + env_.config.compute.upload_read_ahead_bytes +
                             env_.config.limits.max_receive_message_bytes,
                         PeerKey(context_));
    if (!admission.ok()) return admission.status();
    admission_ = *std::move(admission);
    spec_ = *std::move(spec);
    MutexLock lock(&mu_);  // publishes spec_, started_ and the buffer to the pool tasks
    started_ = absl::Now();
    builder_ = *std::move(builder);
    return absl::OkStatus();
  }

  // Starts the next read unless the call failed; a read being started holds the call open.
  void ReadNext() {
    {
      MutexLock lock(&mu_);
      if (!error_.ok()) return;
      reading_ = true;
    }
    Read();
    Next next = Next::kNothing;
    {
      MutexLock lock(&mu_);
      reading_ = false;
      next = NextLocked();
    }
    Continue(next);
  }

  // Queues the copy of one piece; reads on unless too many bytes wait.
  void Copy(int64_t offset, codec::Range range, std::shared_ptr<codec::ReceivedMessage> message) {
    bool read_more = false;
    {
      MutexLock lock(&mu_);
      pending_bytes_ += range.size;
      ++tasks_;
      read_more = pending_bytes_ < env_.config.compute.upload_read_ahead_bytes;
      paused_ = !read_more;
    }
    absl::Status submitted = env_.pool->Submit(
        {.run = [this, offset, range,
                 message](absl::Duration /*wait*/) { CopyDone(offset, range, *message, {}); },
         .skip = [this, offset, range,
                  message](absl::Status why) { CopyDone(offset, range, *message, why); }},
        /*new_request=*/false);
    if (!submitted.ok()) CopyDone(offset, range, *message, std::move(submitted));
    if (read_more) ReadNext();
  }

  // On a pool worker (or inline when the pool refused the task): copies unless the call
  // failed or the task was skipped (`skipped` not OK), then continues the call.
  void CopyDone(int64_t offset, codec::Range range, const codec::ReceivedMessage& message,
                absl::Status skipped) {
    std::span<std::byte> input;  // empty once the call failed
    {
      MutexLock lock(&mu_);
      if (error_.ok() && skipped.ok()) input = builder_->input();
    }
    if (!input.empty()) {
      std::byte* out = input.data() + offset;
      for (const std::span<const std::byte> span : message.Spans(range)) {
        std::memcpy(out, span.data(), span.size());
        out += span.size();
      }
    }
    bool resume = false;
    Next next = Next::kNothing;
    {
      MutexLock lock(&mu_);
      if (!skipped.ok() && error_.ok()) error_ = std::move(skipped);
      pending_bytes_ -= range.size;
      --tasks_;
      if (paused_ && error_.ok() && pending_bytes_ < env_.config.compute.upload_read_ahead_bytes) {
        paused_ = false;
        resume = true;  // this task starts the next read (none is outstanding while paused)
      } else {
        next = NextLocked();
      }
    }
    if (resume) return ReadNext();
    Continue(next);
  }

  // The stream ended: checks the byte count, then prepares once every copy is done.
  void EndOfStream() {
    if (!spec_.has_value()) {
      return Fail(absl::InvalidArgumentError("RegisterGallery stream ended before its header"));
    }
    if (received_ != spec_->input_bytes) {
      return Fail(absl::InvalidArgumentError(absl::StrCat(
          "too few bytes for gallery '", spec_->name, "': the header declares ", spec_->input_bytes,
          " (shape x dtype), received ", received_, "; nothing was registered")));
    }
    Next next = Next::kNothing;
    {
      MutexLock lock(&mu_);
      stream_ended_ = true;
      next = NextLocked();
    }
    Continue(next);
  }

  // Records the first error; the call finishes once nothing is outstanding.
  void Fail(absl::Status status) {
    Next next = Next::kNothing;
    {
      MutexLock lock(&mu_);
      if (error_.ok()) error_ = std::move(status);
      next = NextLocked();
    }
    Continue(next);
  }

  // What the call does next; decided once (concluded_) when nothing is outstanding.
  Next NextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (tasks_ > 0 || reading_ || concluded_) return Next::kNothing;
    if (!error_.ok()) {
      concluded_ = true;
      return Next::kFinishError;
    }
    if (stream_ended_) {
      concluded_ = true;
      return Next::kPrepare;
    }
    return Next::kNothing;
  }

  void Continue(Next next) {
    switch (next) {
      case Next::kNothing:
        return;
      case Next::kFinishError: {
        absl::Status error;
        {
          MutexLock lock(&mu_);
          error = error_;
        }
        return FinishWith(error);
      }
      case Next::kPrepare: {
        // A follow-up of an admitted call: never refused for the queue length.
        absl::Status submitted = env_.pool->Submit(
            {.run = [this](absl::Duration /*wait*/) { Prepare(); },
             .skip = [this](absl::Status why) { FinishWith(why); },
             .deadline = DeadlineOf(context_),
             .cancelled = [context = context_] { return context->IsCancelled(); }},
            /*new_request=*/false);
        if (!submitted.ok()) FinishWith(submitted);
        return;
      }
    }
  }

  // On a pool worker: check, prepare, store.
  void Prepare() {
    std::unique_ptr<kernels::GalleryBuilder> builder;
    absl::Time started;
    {
      MutexLock lock(&mu_);
      builder = std::move(builder_);
      started = started_;
    }
    auto gallery = FinishGallery(*spec_, std::move(builder), GallerySource::kUploaded, "",
                                 env_.engine->threads_per_call(), started);
    // gRPC's receive buffers of the upload were heap blocks that glibc keeps for reuse
    // (main.cc raises its trim threshold for the data path): hand their pages back now, once
    // per registration, so that a registered gallery costs the memory it states (measured:
    // +40% RSS on a 100 MB gallery without it).
    malloc_trim(0);
    if (!gallery.ok()) return FinishWith(gallery.status());
    const absl::Duration prepare = (*gallery)->prepare_time;
    auto stored = env_.galleries->Put(*std::move(gallery));
    if (!stored.ok()) return FinishWith(stored.status());
    env_.metrics->ObserveGalleryRegistration(absl::ToDoubleSeconds(prepare));
    v1::GalleryInfo info;
    FillGalleryInfo(**stored, &info);
    grpc::Slice slice(info.SerializeAsString());
    *response_ = grpc::ByteBuffer(&slice, 1);
    LogInfo(absl::StrCat("gallery '", (*stored)->name, "' version ", (*stored)->version,
                         " registered: ", (*stored)->bytes(), " bytes, received and prepared in ",
                         absl::FormatDuration(prepare), " (peer ", context_->peer(), ")"));
    admission_ = Admission();
    Finish(grpc::Status::OK);
  }

  // The call's one Finish (guaranteed by NextLocked's concluded_).
  void FinishWith(const absl::Status& status) {
    admission_ = Admission();
    {
      MutexLock lock(&mu_);
      builder_.reset();
    }
    const grpc::Status out = ToGrpcStatus(status);
    LogWarning(absl::StrCat("RegisterGallery failed: ", CodeName(out.error_code()), ": ",
                            status.message(), " (peer ", context_->peer(), ")"));
    Finish(out);
  }

  const Env env_;
  grpc::CallbackServerContext* const context_;
  grpc::ByteBuffer* const response_;
  // Reading state (reactions only; see OnReadDone). spec_ is also read by the prepare task,
  // after AcceptHeader published it under mu_ and no reaction writes it any more.
  grpc::ByteBuffer read_;
  std::optional<GallerySpec> spec_;
  int64_t received_ = 0;
  Admission admission_;
  // Shared with the pool tasks.
  Mutex mu_;
  absl::Time started_ ABSL_GUARDED_BY(mu_);
  // Its buffer is written by the copy tasks (disjoint ranges, outside the lock).
  std::unique_ptr<kernels::GalleryBuilder> builder_ ABSL_GUARDED_BY(mu_);
  int64_t pending_bytes_ ABSL_GUARDED_BY(mu_) = 0;  // received, not yet copied
  int tasks_ ABSL_GUARDED_BY(mu_) = 0;              // copy tasks queued or running
  bool paused_ ABSL_GUARDED_BY(mu_) = false;        // no read outstanding until resumed
  bool reading_ ABSL_GUARDED_BY(mu_) = false;       // StartRead is being called
  bool stream_ended_ ABSL_GUARDED_BY(mu_) = false;
  bool concluded_ ABSL_GUARDED_BY(mu_) = false;  // Prepare or Finish has been decided
  absl::Status error_ ABSL_GUARDED_BY(mu_);
  // Last: destroyed first, so an expiry (Fail) never sees a half-destroyed call.
  std::unique_ptr<IdleWatch> idle_ =
      env_.idle_watchdog->Watch([this](absl::Status why) { Fail(std::move(why)); });
};

}  // namespace

grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context,
                                      const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

SimilarityService::SimilarityService(const ServerConfig& config, kernels::SimilarityEngine* engine,
                                     ComputePool* pool, ServerMetrics* metrics, BufferPool* buffers,
                                     GalleryStore* galleries, SharedMemoryRegistry* shared_memory)
    : config_(config),
      idle_watchdog_(config.compute.upload_idle_timeout),
      env_{config_, engine,    pool,       metrics,         &stats_,
           buffers, galleries, &draining_, &idle_watchdog_, shared_memory} {}

grpc::ServerUnaryReactor* SimilarityService::SystemSharedMemoryRegister(
    grpc::CallbackServerContext* context, const v1::SystemSharedMemoryRegisterRequest* request,
    v1::SystemSharedMemoryRegisterResponse* /*response*/) {
  return FinishUnary(context, RegisterSharedMemory(*env_.shared_memory, *request, context->peer()));
}

grpc::ServerUnaryReactor* SimilarityService::SystemSharedMemoryStatus(
    grpc::CallbackServerContext* context, const v1::SystemSharedMemoryStatusRequest* request,
    v1::SystemSharedMemoryStatusResponse* response) {
  return FinishUnary(context, SharedMemoryStatus(*env_.shared_memory, *request, response));
}

grpc::ServerUnaryReactor* SimilarityService::SystemSharedMemoryUnregister(
    grpc::CallbackServerContext* context, const v1::SystemSharedMemoryUnregisterRequest* request,
    v1::SystemSharedMemoryUnregisterResponse* /*response*/) {
  return FinishUnary(context, UnregisterSharedMemory(*env_.shared_memory, *request));
}

grpc::ServerReadReactor<grpc::ByteBuffer>* SimilarityService::RegisterGallery(
    grpc::CallbackServerContext* context, grpc::ByteBuffer* response) {
  return new RegisterCall(env_, context, response);
}

grpc::ServerUnaryReactor* SimilarityService::GetGallery(grpc::CallbackServerContext* context,
                                                        const v1::GetGalleryRequest* request,
                                                        v1::GalleryInfo* response) {
  auto gallery = env_.galleries->Get(request->name());
  if (gallery.ok()) FillGalleryInfo(**gallery, response);
  return FinishUnary(context, gallery.status());
}

grpc::ServerUnaryReactor* SimilarityService::ListGalleries(
    grpc::CallbackServerContext* context, const v1::ListGalleriesRequest* /*request*/,
    v1::ListGalleriesResponse* response) {
  for (const auto& gallery : env_.galleries->List()) {
    FillGalleryInfo(*gallery, response->add_galleries());
  }
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* SimilarityService::DeleteGallery(grpc::CallbackServerContext* context,
                                                           const v1::DeleteGalleryRequest* request,
                                                           v1::DeleteGalleryResponse* response) {
  auto removed = env_.galleries->Remove(request->name(), GallerySource::kUploaded);
  if (removed.ok()) {
    FillGalleryInfo(**removed, response->mutable_deleted());
    LogInfo(absl::StrCat("gallery '", request->name(), "' deleted (peer ", context->peer(), ")"));
  }
  return FinishUnary(context, removed.status());
}

grpc::ServerUnaryReactor* SimilarityService::Compute(grpc::CallbackServerContext* context,
                                                     const grpc::ByteBuffer* request,
                                                     grpc::ByteBuffer* response) {
  return new UnaryCall(env_, context, request, response);
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* SimilarityService::ComputeStream(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) {
  return new StreamCall(env_, context, request);
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* SimilarityService::ComputeUpload(
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
  limits->set_max_gallery_bytes(env_.galleries->memory_budget());
  for (auto m : {v1::COSINE, v1::DOT, v1::EUCLIDEAN, v1::SQUARED_EUCLIDEAN}) {
    response->add_metrics(m);
  }
  for (auto t : {v1::FLOAT32, v1::BFLOAT16, v1::FLOAT16}) {
    response->add_input_dtypes(t);
    response->add_output_dtypes(t);
  }
  response->add_precisions(v1::FP32);
  response->add_precisions(v1::BF16);
  response->set_shared_memory(env_.shared_memory != nullptr && env_.shared_memory->allowed());
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace simserve
