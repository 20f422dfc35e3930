// UploadAssembler: the message sequencing of one ComputeUpload stream, without gRPC's
// reactor. The header comes first and only once; it is validated and admitted
// (ValidateAndAdmit) and starts the pipeline; then pieces of a and b, in any order and of
// any size, go to the pipeline; the end of the stream closes its input. Every error fails
// the pipeline, which then finishes the call. UploadCall (service.cc) feeds it what gRPC
// reads; upload_assembler_test and fuzz/upload_fuzzer drive it directly.
#ifndef SIMSERVE_SERVER_UPLOAD_ASSEMBLER_H_
#define SIMSERVE_SERVER_UPLOAD_ASSEMBLER_H_

#include <memory>

#include "server/call_setup.h"
#include "server/convert.h"
#include "server/tile_pipeline.h"
#include "server/wire_codec.h"

namespace simserve {

// Not thread-safe: one message at a time (gRPC serializes the read reactions of a call).
class UploadAssembler {
 public:
  // `pipeline`, `spec` and what `env` points to are borrowed and must outlive the assembler.
  // `*spec` is set to the admitted problem before the pipeline starts (the writer encodes tiles
  // with it).
  UploadAssembler(const ServiceEnv& env, TilePipeline* pipeline, ProblemSpec* spec);
  UploadAssembler(const UploadAssembler&) = delete;
  UploadAssembler& operator=(const UploadAssembler&) = delete;

  // One received UploadRequest, decoded in place: data pieces keep `message` alive until the
  // pipeline has ingested them. Fails the pipeline with INVALID_ARGUMENT for malformed wire
  // data, a second header, data before the header or a message with no part set, and with
  // ValidateAndAdmit's error for a refused header. Returns true when the caller should read
  // the next message now; false when it must wait for Sink::ResumeReading (the pipeline has
  // enough bytes to ingest) or read no more (the call failed).
  bool OnMessage(std::shared_ptr<const codec::ReceivedMessage> message);

  // The client half-closed the stream (or went away: its cancellation follows). Fails the
  // pipeline with INVALID_ARGUMENT when no header came; otherwise closes its input.
  void OnEndOfStream();

 private:
  bool AcceptHeader(const v1::ComputeRequest& request);

  const ServiceEnv env_;
  TilePipeline* const pipeline_;
  ProblemSpec* const spec_;
  bool have_header_ = false;
};

}  // namespace simserve

#endif  // SIMSERVE_SERVER_UPLOAD_ASSEMBLER_H_
