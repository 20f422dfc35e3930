// SimilarityService: the simserve.v1.Similarity callback service. Handlers are thin: they
// convert and validate (convert.h), reserve capacity, and hand the work to the compute
// pool; results are written back by reactors while the next tile is being computed.
#ifndef SIMSERVE_SERVER_SERVICE_H_
#define SIMSERVE_SERVER_SERVICE_H_

#include <atomic>
#include <string>

#include "kernels/similarity.h"
#include "server/call_setup.h"
#include "server/compute_pool.h"
#include "server/config.h"
#include "server/gallery_store.h"
#include "server/metrics.h"
#include "server/shared_memory.h"
#include "server/tile_pipeline.h"
#include "simserve/v1/similarity.grpc.pb.h"

namespace simserve {

// The generated service with the three compute methods and RegisterGallery in raw form: they
// receive and send grpc::ByteBuffer, so tensors are decoded and results encoded without copying
// payloads (server/wire_codec.h). The wire format is exactly the proto's.
using SimilarityServiceBase = v1::Similarity::WithRawCallbackMethod_Compute<
    v1::Similarity::WithRawCallbackMethod_ComputeStream<
        v1::Similarity::WithRawCallbackMethod_ComputeUpload<
            v1::Similarity::WithCallbackMethod_GetInfo<
                v1::Similarity::WithRawCallbackMethod_RegisterGallery<
                    v1::Similarity::WithCallbackMethod_GetGallery<
                        v1::Similarity::WithCallbackMethod_ListGalleries<
                            v1::Similarity::WithCallbackMethod_DeleteGallery<
                                v1::Similarity::WithCallbackMethod_SystemSharedMemoryRegister<
                                    v1::Similarity::WithCallbackMethod_SystemSharedMemoryStatus<
                                        v1::Similarity::
                                            WithCallbackMethod_SystemSharedMemoryUnregister<
                                                v1::Similarity::Service>>>>>>>>>>>;

// The service. Thread-safe. `engine`, `pool`, `metrics` and `buffers` are borrowed and must outlive
// the service and every call it runs (i.e. until grpc::Server::Shutdown has returned).
class SimilarityService final : public SimilarityServiceBase {
 public:
  SimilarityService(const ServerConfig& config, kernels::SimilarityEngine* engine,
                    ComputePool* pool, ServerMetrics* metrics, BufferPool* buffers,
                    GalleryStore* galleries, SharedMemoryRegistry* shared_memory);
  SimilarityService(const SimilarityService&) = delete;
  SimilarityService& operator=(const SimilarityService&) = delete;

  // From now on new compute calls fail with UNAVAILABLE; running ones continue.
  void StartDraining() { draining_.store(true); }
  bool draining() const { return draining_.load(); }
  const ServiceStats& stats() const { return stats_; }

  // ComputeRequest -> ComputeResponse: the whole result in one message
  // (RESOURCE_EXHAUSTED "use ComputeStream" if too big).
  grpc::ServerUnaryReactor* Compute(grpc::CallbackServerContext* context,
                                    const grpc::ByteBuffer* request,
                                    grpc::ByteBuffer* response) override;
  // ComputeRequest -> stream of ComputeChunk: row tiles, computed at most `stream_window`
  // tiles ahead of the writer.
  grpc::ServerWriteReactor<grpc::ByteBuffer>* ComputeStream(
      grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) override;
  // Stream of UploadRequest (header, then B's bytes, then A's bytes) -> stream of
  // ComputeChunk; tiles stream back while A still arrives.
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* ComputeUpload(
      grpc::CallbackServerContext* context) override;
  // Version, oneDNN version and ISA, pool sizes, limits and supported enums.
  grpc::ServerUnaryReactor* GetInfo(grpc::CallbackServerContext* context,
                                    const v1::GetInfoRequest* request,
                                    v1::GetInfoResponse* response) override;

  // Header, then the gallery's bytes -> GalleryInfo. Raw: the pieces are copied from
  // gRPC's slices straight into the gallery's buffer by compute pool tasks, then one more
  // task checks and prepares it and stores the gallery.
  grpc::ServerReadReactor<grpc::ByteBuffer>* RegisterGallery(grpc::CallbackServerContext* context,
                                                             grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* GetGallery(grpc::CallbackServerContext* context,
                                       const v1::GetGalleryRequest* request,
                                       v1::GalleryInfo* response) override;
  grpc::ServerUnaryReactor* ListGalleries(grpc::CallbackServerContext* context,
                                          const v1::ListGalleriesRequest* request,
                                          v1::ListGalleriesResponse* response) override;
  grpc::ServerUnaryReactor* DeleteGallery(grpc::CallbackServerContext* context,
                                          const v1::DeleteGalleryRequest* request,
                                          v1::DeleteGalleryResponse* response) override;

  // Triton's system shared-memory RPCs (server/shared_memory_rpc.h), on the native API.
  grpc::ServerUnaryReactor* SystemSharedMemoryRegister(
      grpc::CallbackServerContext* context, const v1::SystemSharedMemoryRegisterRequest* request,
      v1::SystemSharedMemoryRegisterResponse* response) override;
  grpc::ServerUnaryReactor* SystemSharedMemoryStatus(
      grpc::CallbackServerContext* context, const v1::SystemSharedMemoryStatusRequest* request,
      v1::SystemSharedMemoryStatusResponse* response) override;
  grpc::ServerUnaryReactor* SystemSharedMemoryUnregister(
      grpc::CallbackServerContext* context, const v1::SystemSharedMemoryUnregisterRequest* request,
      v1::SystemSharedMemoryUnregisterResponse* response) override;

  // Everything the reactors need (call_setup.h).
  using Env = ServiceEnv;
  const Env& env() const { return env_; }

 private:
  const ServerConfig config_;
  ServiceStats stats_;
  std::atomic<bool> draining_{false};
  IdleWatchdog idle_watchdog_;
  Env env_;
};

// ---- Helpers of the compute reactors, shared by both front ends ----

// The canonical name of a gRPC status code, e.g. "INVALID_ARGUMENT".
const char* CodeName(grpc::StatusCode code);

// Finishes a unary call with `status` through the one status mapping (status.h).
grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context,
                                      const absl::Status& status);

// The call's deadline (InfiniteFuture when it has none).
absl::Time DeadlineOf(const grpc::CallbackServerContext* context);

// Ends a compute call: metrics, the log line and (if `trailing_metadata`) the server timings
// as trailing metadata. Returns the status to hand to the reactor's Finish.
grpc::Status Conclude(const ServiceEnv& env, grpc::CallbackServerContext* context,
                      const char* method, const PipelineReport& report, const absl::Status& status,
                      bool trailing_metadata = true);

// Fails `pipeline` with `error`, or cancels it if the client went away (or the deadline
// passed) before its request arrived: gRPC then hands over an invalid ByteBuffer.
void FailUnlessCancelled(grpc::CallbackServerContext* context, const grpc::ByteBuffer& request,
                         TilePipeline* pipeline, absl::Status error);

// The client a call counts against for the per-client share of the in-flight bytes: its
// token's identity (auth.h), else its address without the port.
std::string PeerKey(const grpc::CallbackServerContext* context);

}  // namespace simserve

#endif  // SIMSERVE_SERVER_SERVICE_H_
