// Test support (header only): one ComputeUpload call driven through UploadAssembler and a
// TilePipeline the way UploadCall's gRPC reactions drive them, without gRPC. A message is
// delivered only while reading is allowed (OnMessage returned true, or the pipeline asked
// to resume), the stream half-closes after the last one, and a fake transport keeps the
// tiles and completes each write. Used by upload_assembler_test and fuzz/upload_fuzzer.
#ifndef SIMSERVE_SERVER_UPLOAD_CALL_DRIVER_H_
#define SIMSERVE_SERVER_UPLOAD_CALL_DRIVER_H_

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "server/call_setup.h"
#include "server/tile_pipeline.h"
#include "server/upload_assembler.h"
#include "server/wire_codec.h"

namespace simserve {

// What a driven call did.
struct DrivenUpload {
  absl::Status status;                             // as the pipeline finished the call
  ProblemSpec spec;                                // the admitted problem (if any)
  std::vector<std::unique_ptr<TileOutput>> tiles;  // written, in order
  size_t delivered = 0;                            // messages handed to the assembler
};

// How the client behaves besides sending `messages`.
struct UploadBehaviour {
  size_t cancel_before = SIZE_MAX;  // the client goes away before this message
  bool fail_first_write = false;    // the first write fails (the client went away)
};

// Runs one call to its end. The call (pipeline, assembler, transport) lives on the heap like
// the reactor that owns them and is destroyed once the pipeline has finished. Aborts if the
// pipeline breaks the Sink contract (two writes at once, a resume while reading, two Finish).
inline DrivenUpload DriveUpload(
    const ServiceEnv& env, const std::vector<std::shared_ptr<codec::ReceivedMessage>>& messages,
    const UploadBehaviour& behaviour = {}) {
  class Transport final : public TilePipeline::Sink {
   public:
    enum class Event { kWrite, kResume, kFinish };
    void WriteTile(std::unique_ptr<TileOutput> tile) override {
      std::lock_guard<std::mutex> lock(mu_);
      if (writing_) std::abort();  // one write at a time
      writing_ = true;
      result_.tiles.push_back(std::move(tile));
      Push(Event::kWrite);
    }
    void ResumeReading() override {
      std::lock_guard<std::mutex> lock(mu_);
      Push(Event::kResume);
    }
    void Finish(const absl::Status& status, const PipelineReport& /*report*/,
                std::unique_ptr<TileOutput> whole) override {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_ || whole != nullptr) std::abort();  // once, and no whole result
      finished_ = true;
      result_.status = status;
      Push(Event::kFinish);
    }
    Event Next() {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return !events_.empty(); });
      const Event event = events_.front();
      events_.pop_front();
      if (event == Event::kWrite) writing_ = false;  // the driver completes it now
      return event;
    }
    DrivenUpload Take() { return std::move(result_); }

   private:
    void Push(Event event) {
      events_.push_back(event);
      cv_.notify_all();
    }
    std::mutex mu_;
    std::condition_variable cv_;
    std::deque<Event> events_;
    bool writing_ = false;
    bool finished_ = false;
    DrivenUpload result_;
  };
  struct Call {
    explicit Call(const ServiceEnv& env)
        : pipeline(PipelineDeps(env), TilePipeline::Mode::kStreamTiles, &transport,
                   absl::InfiniteFuture()),
          assembler(env, &pipeline, &spec) {}
    Transport transport;
    ProblemSpec spec;
    TilePipeline pipeline;
    UploadAssembler assembler;
  };

  auto call = std::make_unique<Call>(env);
  size_t next = 0;
  bool may_read = true;  // a read is outstanding (UploadCall starts one at once)
  bool ended = false;    // the read ended with !ok (half-close or cancellation)
  bool fail_write = behaviour.fail_first_write;
  while (true) {
    if (may_read && !ended) {
      if (next == behaviour.cancel_before) call->pipeline.Cancel();  // the read then fails
      if (next < messages.size() && next != behaviour.cancel_before) {
        may_read = call->assembler.OnMessage(messages[next++]);
      } else {
        ended = true;
        call->assembler.OnEndOfStream();
      }
      continue;
    }
    const auto event = call->transport.Next();
    if (event == Transport::Event::kFinish) break;
    if (event == Transport::Event::kResume) {
      if (may_read) std::abort();  // a resume while a read is outstanding
      may_read = true;
    }
    if (event == Transport::Event::kWrite) {
      call->pipeline.WriteDone(!fail_write);
      fail_write = false;
    }
  }
  DrivenUpload result = call->transport.Take();
  result.spec = call->spec;
  result.delivered = next;
  call.reset();
  return result;
}

}  // namespace simserve

#endif  // SIMSERVE_SERVER_UPLOAD_CALL_DRIVER_H_
