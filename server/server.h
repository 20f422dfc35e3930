// SimilarityServer: owns everything a running simserve needs (kernel engine, compute pool,
// metrics registry and exposer, the gRPC server with health and reflection) and drains it
// gracefully. RunServer adds signal handling for the `simserve` executable.
#ifndef SIMSERVE_SERVER_SERVER_H_
#define SIMSERVE_SERVER_SERVER_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/config.h"
#include "server/gallery_dir.h"
#include "server/gallery_store.h"
#include "server/mutex.h"
#include "server/periodic_thread.h"
#include "server/service.h"

namespace prometheus {
class Exposer;
class Registry;
}  // namespace prometheus

namespace grpc {
class CallbackGenericService;
class Server;
}  // namespace grpc

namespace simserve {

class CallAuthenticator;
class MetricsEndpoint;
class ComputePool;
class InferenceService;
class SharedMemoryRegistry;
class ServerMetrics;

// Workers and OpenMP threads per worker after applying the defaults of ComputeConfig to
// `cores` usable cores: workers = max(1, workers); threads = threads_per_worker, or
// max(1, cores / workers) when 0.
struct PoolSize {
  int workers = 1;
  int threads_per_worker = 1;
};
PoolSize ResolvePoolSize(const ComputeConfig& config, int cores);

// Cores this process may run on (its CPU affinity mask).
int UsableCores();

// A running server. Not copyable. Thread-safe: Shutdown may be called from any thread.
class SimilarityServer {
 public:
  // Validates `config`, creates the engine, the pool and the metrics, binds the gRPC
  // (and, unless disabled, the metrics) listener, warms the kernels up (health reports
  // NOT_SERVING until then) and returns a serving server. INVALID_ARGUMENT for a bad
  // config, UNAVAILABLE if an address cannot be bound, INTERNAL for engine failures.
  static absl::StatusOr<std::unique_ptr<SimilarityServer>> Start(const ServerConfig& config);
  // Shuts down with zero grace if Shutdown was not called.
  ~SimilarityServer();
  SimilarityServer(const SimilarityServer&) = delete;
  SimilarityServer& operator=(const SimilarityServer&) = delete;

  // Graceful drain: health NOT_SERVING, new compute calls UNAVAILABLE, running calls get
  // up to `grace` to finish (then they are cancelled), workers stop. Blocks until done.
  // Idempotent.
  void Shutdown(absl::Duration grace);

  // The bound gRPC port (useful with port 0 in `listen`).
  int port() const { return port_; }
  // The bound port of --health_listen, or 0 when it is off.
  int health_port() const { return health_port_; }
  // The bound metrics port, or 0 when the exposer is disabled.
  int metrics_port() const { return metrics_port_; }
  const ServerConfig& config() const { return config_; }
  const ServiceStats& stats() const { return service_->stats(); }
  // Tasks waiting in the compute pool queue.
  int64_t queued_tasks() const;
  // The compute pool, for tests and diagnostics (e.g. to occupy a worker).
  ComputePool& pool() { return *pool_; }
  prometheus::Registry& registry() { return *registry_; }
  // The galleries, for tests.
  GalleryStore& galleries() { return *galleries_; }

 private:
  explicit SimilarityServer(const ServerConfig& config);
  absl::Status Init();
  // The memory janitor's tick: gives cached and retained memory back once the server has
  // been quiet for config.compute.memory_release_delay.
  void ReleaseMemoryWhenQuiet() ABSL_LOCKS_EXCLUDED(janitor_mu_);
  // Health status of both listeners (overall and simserve.v1.Similarity).
  void SetServing(bool serving);
  // Warms the common kernel shapes; returns a summary for the startup line.
  std::string Warmup();

  ServerConfig config_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<ServerMetrics> metrics_;
  std::unique_ptr<MetricsEndpoint> metrics_endpoint_;
  std::unique_ptr<kernels::SimilarityEngine> engine_;
  std::shared_ptr<BufferPool> buffers_;
  std::unique_ptr<ComputePool> pool_;
  std::unique_ptr<GalleryStore> galleries_;
  std::unique_ptr<GalleryDirectory> gallery_dir_;
  std::unique_ptr<SharedMemoryRegistry> shared_memory_;
  std::unique_ptr<SimilarityService> service_;
  std::unique_ptr<InferenceService> inference_service_;
  std::unique_ptr<CallAuthenticator> authenticator_;  // null without --auth_token_file
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<grpc::CallbackGenericService> health_only_;
  std::unique_ptr<grpc::Server> health_server_;  // --health_listen
  int port_ = 0;
  int health_port_ = 0;
  int metrics_port_ = 0;
  Mutex janitor_mu_;
  absl::Time quiet_since_ ABSL_GUARDED_BY(janitor_mu_) = absl::InfiniteFuture();
  bool released_ ABSL_GUARDED_BY(janitor_mu_) = false;  // since the server went quiet
  absl::Time last_trim_ ABSL_GUARDED_BY(janitor_mu_) = absl::Now();
  std::unique_ptr<PeriodicThread> memory_janitor_;  // stopped first in Shutdown
  Mutex shutdown_mu_;
  bool shut_down_ ABSL_GUARDED_BY(shutdown_mu_) = false;
};

// Runs the server until SIGTERM or SIGINT, then drains it within config.drain_grace.
// Must be called before any other thread exists (it blocks those signals process-wide
// and waits for them with sigwait; no work happens in a signal handler). Returns OK after
// a clean drain, or the startup error.
absl::Status RunServer(const ServerConfig& config);

}  // namespace simserve

#endif  // SIMSERVE_SERVER_SERVER_H_
