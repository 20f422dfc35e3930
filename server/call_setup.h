// What every compute call of the service starts with, independent of gRPC's reactors: the
// environment the calls share, the validation and admission preamble, and the pipeline's
// dependencies. Used by the reactors (service.cc) and the upload assembler; the fuzzers
// (fuzz/) drive it without a server.
#ifndef SIMSERVE_SERVER_CALL_SETUP_H_
#define SIMSERVE_SERVER_CALL_SETUP_H_

#include <atomic>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/gallery.h"
#include "kernels/similarity.h"
#include "server/aligned_buffer.h"
#include "server/compute_pool.h"
#include "server/config.h"
#include "server/convert.h"
#include "server/gallery_store.h"
#include "server/idle_watchdog.h"
#include "server/metrics.h"
#include "server/shared_memory.h"
#include "server/tile_pipeline.h"
#include "server/wire_codec.h"
#include "simserve/v1/similarity.pb.h"

namespace simserve {

// Everything the calls need, borrowed from the server: every pointer must outlive every call.
struct ServiceEnv {
  const ServerConfig& config;
  kernels::SimilarityEngine* engine;
  ComputePool* pool;
  ServerMetrics* metrics;
  ServiceStats* stats;
  BufferPool* buffers;
  GalleryStore* galleries;
  const std::atomic<bool>* draining;
  // Ends client streams that wait too long for data (the reactors use it; may be null).
  IdleWatchdog* idle_watchdog = nullptr;
  // Shared-memory regions of both front ends (may be null: shared memory off).
  SharedMemoryRegistry* shared_memory = nullptr;
};

// UNAVAILABLE: the server is draining (shutting down).
absl::Status DrainingError();

// A validated request, its in-flight reservation and, for gallery calls, the gallery
// version it runs against (held until the call ends).
struct Admitted {
  ConvertedRequest converted;
  Admission admission;
  std::shared_ptr<const kernels::PreparedGallery> gallery;
  // kUpload: input bytes not reserved yet. An upload reserves its input as it arrives (see
  // UploadAssembler), so a client that declares a big upload and sends nothing holds little.
  int64_t deferred_input_bytes = 0;
};

// The preamble of every compute RPC: refuses while draining (UNAVAILABLE), looks up the
// named gallery (GalleryStore::Acquire's errors), validates (ConvertRequest's errors) and
// reserves the in-flight bytes for client `peer` (ComputePool::Admit's RESOURCE_EXHAUSTED).
// An upload header reserves at most UploadReservationStep of its input up front.
// Rejections are counted in the metrics.
absl::StatusOr<Admitted> ValidateAndAdmit(const ServiceEnv& env, const v1::ComputeRequest& request,
                                          RequestKind kind, const RawPayloadSizes* raw_sizes,
                                          const std::string& peer = {});

// How much more input an upload reserves each time its received bytes come within
// upload_read_ahead_bytes of its reservation: two read-aheads.
int64_t UploadReservationStep(const ServerConfig& config);

// A received compute request with all of its input (Compute, ComputeStream, ModelInfer):
// the message's slices, the request without its raw payloads, and where those payloads
// are in the message. Held by the input pieces until they are ingested.
struct ReceivedCompute {
  explicit ReceivedCompute(const grpc::ByteBuffer& buffer) : message(buffer) {}
  codec::ReceivedMessage message;
  // A tensor sent as raw bytes has `raw` = "" here; its bytes are at a_raw / b_raw.
  v1::ComputeRequest request;
  std::optional<codec::Range> a_raw;
  std::optional<codec::Range> b_raw;
};

// Validates and admits `received` (ValidateAndAdmit) and starts `pipeline` with all of its
// input; on success `*spec` is the problem. Tensors and result parts that name shared
// memory are resolved in env.shared_memory (FAILED_PRECONDITION when off, INVALID_ARGUMENT
// for an unknown region, a range outside it, an output region smaller than the result or
// misaligned for its element type) and read or written in place.
absl::Status StartComputeCall(const ServiceEnv& env, std::shared_ptr<ReceivedCompute> received,
                              RequestKind kind, const std::string& peer, TilePipeline* pipeline,
                              ProblemSpec* spec);

// The TilePipeline dependencies of one call, from the server's configuration.
TilePipeline::Deps PipelineDeps(const ServiceEnv& env);

}  // namespace simserve

#endif  // SIMSERVE_SERVER_CALL_SETUP_H_
