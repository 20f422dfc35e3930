// SimilarityService: the simserve.v1.Similarity callback service. Handlers are thin: they
// convert and validate (convert.h), reserve capacity, and hand the work to the compute
// pool; results are written back by reactors while the next tile is being computed.
#ifndef SIMSERVE_SERVER_SERVICE_H_
#define SIMSERVE_SERVER_SERVICE_H_

#include <atomic>
#include <cstdint>

#include "kernels/similarity.h"
#include "server/compute_pool.h"
#include "server/config.h"
#include "server/metrics.h"
#include "simserve/v1/similarity.grpc.pb.h"

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

// The service. Thread-safe. `engine`, `pool` and `metrics` are borrowed and must outlive
// the service and every call it runs (i.e. until grpc::Server::Shutdown has returned).
class SimilarityService final : public v1::Similarity::CallbackService {
 public:
  SimilarityService(const ServerConfig& config, kernels::SimilarityEngine* engine,
                    ComputePool* pool, ServerMetrics* metrics);
  SimilarityService(const SimilarityService&) = delete;
  SimilarityService& operator=(const SimilarityService&) = delete;

  // From now on new compute calls fail with UNAVAILABLE; running ones continue.
  void StartDraining() { draining_.store(true); }
  bool draining() const { return draining_.load(); }
  const ServiceStats& stats() const { return stats_; }

  // Whole result in one message (RESOURCE_EXHAUSTED "use ComputeStream" if too big).
  grpc::ServerUnaryReactor* Compute(grpc::CallbackServerContext* context,
                                    const v1::ComputeRequest* request,
                                    v1::ComputeResponse* response) override;
  // Result as row tiles, computed at most `stream_window` tiles ahead of the writer.
  grpc::ServerWriteReactor<v1::ComputeChunk>* ComputeStream(
      grpc::CallbackServerContext* context, const v1::ComputeRequest* request) override;
  // Header, then B's bytes, then A's bytes; tiles stream back while A still arrives.
  grpc::ServerBidiReactor<v1::UploadRequest, v1::ComputeChunk>* ComputeUpload(
      grpc::CallbackServerContext* context) override;
  // Version, oneDNN version and ISA, pool sizes, limits and supported enums.
  grpc::ServerUnaryReactor* GetInfo(grpc::CallbackServerContext* context,
                                    const v1::GetInfoRequest* request,
                                    v1::GetInfoResponse* response) override;

  // Everything the reactors need; exposed for the reactor classes in service.cc only.
  struct Env {
    const ServerConfig& config;
    kernels::SimilarityEngine* engine;
    ComputePool* pool;
    ServerMetrics* metrics;
    ServiceStats* stats;
    const std::atomic<bool>* draining;
  };

 private:
  const ServerConfig config_;
  ServiceStats stats_;
  std::atomic<bool> draining_{false};
  Env env_;
};

}  // namespace simserve

#endif  // SIMSERVE_SERVER_SERVICE_H_
