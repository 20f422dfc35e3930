// Prometheus metrics of the server: the go-grpc-prometheus RPC families (filled by a gRPC
// server interceptor, so every service incl. health and reflection is counted) and
// simserve's own per-stage families. Built from a registry that the caller owns.
#ifndef SIMSERVE_SERVER_METRICS_H_
#define SIMSERVE_SERVER_METRICS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "grpcpp/support/server_interceptor.h"
#include "prometheus/registry.h"
#include "server/reject_reason.h"

namespace simserve {

// Labels of simserve_build_info.
struct BuildInfo {
  std::string version;
  std::string onednn_version;
  std::string isa;
};

// All metric families of one server. Thread-safe (prometheus-cpp metrics are atomic).
// The registry must outlive this object.
class ServerMetrics {
 public:
  // Registers every family on `registry` and pre-creates the RPC series for each
  // (method, code) pair of the services in `methods` ("/pkg.Service/Method" + type).
  // grpc.health.v1.Health (Check, Watch) and v1alpha reflection are always added. RPCs of
  // methods not registered here are not counted (no client-controlled label values).
  struct MethodInfo {
    std::string full_name;  // "/simserve.v1.Similarity/Compute"
    std::string grpc_type;  // "unary", "server_stream", "client_stream", "bidi_stream"
  };
  ServerMetrics(prometheus::Registry& registry, const BuildInfo& build_info,
                const std::vector<MethodInfo>& methods);
  ~ServerMetrics();
  ServerMetrics(const ServerMetrics&) = delete;
  ServerMetrics& operator=(const ServerMetrics&) = delete;

  // An interceptor factory that records grpc_server_started_total, _handled_total,
  // _handling_seconds, _msg_received_total and _msg_sent_total for every RPC. Register it
  // with ServerBuilder::experimental().SetInterceptorCreators(). `this` must outlive it.
  std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> MakeInterceptorFactory();

  // simserve_* stage observations, all in seconds / bytes / counts.
  void ObserveQueueWait(double seconds);  // simserve_queue_wait_seconds
  void ObserveCompute(double seconds);    // simserve_compute_seconds (whole request)
  void ObserveWrite(double seconds);      // simserve_write_seconds (sending the result)
  void ObserveTotal(double seconds);      // simserve_request_seconds (end to end)
  void AddInFlight(int64_t delta);        // simserve_requests_in_flight (gauge)
  void AddQueueDepth(int64_t delta);      // simserve_queue_depth (gauge)
  void AddBytesReceived(uint64_t bytes);  // simserve_received_bytes_total (tensor payload)
  void AddBytesSent(uint64_t bytes);      // simserve_sent_bytes_total (result payload)
  void AddFlops(double flops);            // simserve_flops_total (matmul flops performed)
  void AddTiles(uint64_t tiles);          // simserve_tiles_streamed_total
  void Reject(RejectReason reason);       // simserve_rejected_requests_total{reason}
  void AuthFailed(AuthFailure reason);    // simserve_auth_failures_total{reason}
  // simserve_galleries / simserve_gallery_bytes {source="uploaded"|"directory"} (gauges).
  void SetGalleries(bool directory, int64_t count, int64_t bytes);
  // simserve_shared_memory_regions / simserve_shared_memory_bytes (gauges).
  void SetSharedMemory(int64_t regions, int64_t bytes);
  void GalleryLookup(bool hit);  // simserve_gallery_lookups_total{result="hit"|"miss"}
  void GalleryEvicted();         // simserve_gallery_evictions_total
  void GalleryLoadFailed();      // simserve_gallery_load_failures_total
  void ObserveGalleryRegistration(double seconds);  // simserve_gallery_registration_seconds

  class Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace simserve

#endif  // SIMSERVE_SERVER_METRICS_H_
