// UploadAssembler: the message sequencing of one ComputeUpload stream, without gRPC's
// reactor. The header comes first and only once; it is validated and admitted
// (ValidateAndAdmit) and starts the pipeline; then pieces of a and b, in any order and of
// any size, go to the pipeline; the end of the stream closes its input. Every error fails
// the pipeline, which then finishes the call. UploadCall (service.cc) feeds it what gRPC
// reads; upload_assembler_test and fuzz/upload_fuzzer drive it directly.
#ifndef SIMSERVE_SERVER_UPLOAD_ASSEMBLER_H_
#define SIMSERVE_SERVER_UPLOAD_ASSEMBLER_H_

#include <memory>
#include <string>

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
  // `peer` names the client for the per-client share of the in-flight bytes.
  UploadAssembler(const ServiceEnv& env, TilePipeline* pipeline, ProblemSpec* spec,
                  std::string peer = {});
  UploadAssembler(const UploadAssembler&) = delete;
  UploadAssembler& operator=(const UploadAssembler&) = delete;

  // One received UploadRequest, decoded in place: data pieces keep `message` alive until the
  // pipeline has ingested them. Fails the pipeline with INVALID_ARGUMENT for malformed wire
  // data, a second header, data before the header or a message with no part set, and with
  // ValidateAndAdmit's error for a refused header. Returns true when the caller should read
  // the next message now; false when it must wait for Sink::ResumeReading (the pipeline has
  // enough bytes to ingest) or read no more (the call failed). The input is reserved in the
  // in-flight budget as it arrives, one UploadReservationStep ahead; when the budget (or the
  // client's share) cannot grow, the call fails with RESOURCE_EXHAUSTED.
  bool OnMessage(std::shared_ptr<const codec::ReceivedMessage> message);

  // The client half-closed the stream (or went away: its cancellation follows). Fails the
  // pipeline with INVALID_ARGUMENT when no header came; otherwise closes its input.
  void OnEndOfStream();

 private:
  bool AcceptHeader(const v1::ComputeRequest& request);
  // Reserves input up to `received_` plus the read-ahead; false (call failed) if it cannot.
  bool ReserveInput();

  const ServiceEnv env_;
  TilePipeline* const pipeline_;
  ProblemSpec* const spec_;
  const std::string peer_;
  bool have_header_ = false;
  Admission input_reservation_;   // the input reserved beyond the header's admission
  int64_t input_unreserved_ = 0;  // input bytes not reserved yet
  int64_t input_reserved_ = 0;    // input bytes reserved (header's share + input_reservation_)
  int64_t received_ = 0;          // input bytes received
};

}  // namespace simserve

#endif  // SIMSERVE_SERVER_UPLOAD_ASSEMBLER_H_
