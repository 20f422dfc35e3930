// Prometheus metrics of the server: go-grpc-prometheus compatible RPC families recorded by a
// gRPC server interceptor, plus simserve's own stage families. See metrics.h for the contract.
#include "server/metrics.h"

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <functional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "grpcpp/server_context.h"
#include "grpcpp/support/interceptor.h"
#include "grpcpp/support/status.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"

namespace simserve {
namespace {

// go-grpc-prometheus spells codes as Go's codes.Code.String() does; index = numeric code.
constexpr std::array<const char*, 17> kCodeNames = {
    "OK",       "Canceled",       "Unknown",          "InvalidArgument",   "DeadlineExceeded",
    "NotFound", "AlreadyExists",  "PermissionDenied", "ResourceExhausted", "FailedPrecondition",
    "Aborted",  "OutOfRange",     "Unimplemented",    "Internal",          "Unavailable",
    "DataLoss", "Unauthenticated"};

constexpr std::array<const char*, 7> kRejectReasonNames = {
    "queue_full",     "too_many_elements", "too_many_flops", "output_too_large",
    "inflight_bytes", "draining",          "peer_share"};
// Indexed by RejectReason: keep both lists in the same order.
static_assert(static_cast<size_t>(RejectReason::kPeerShare) + 1 == kRejectReasonNames.size());

constexpr std::array<const char*, 3> kAuthFailureNames = {"missing", "malformed", "invalid"};
// Indexed by AuthFailure.
static_assert(static_cast<size_t>(AuthFailure::kInvalid) + 1 == kAuthFailureNames.size());

// Methods every simserve server exposes besides its own service (health and reflection are
// always on); they are counted even when the caller does not list them.
struct StandardMethod {
  const char* full_name;
  const char* grpc_type;
};
constexpr std::array<StandardMethod, 3> kStandardMethods = {{
    {"/grpc.health.v1.Health/Check", "unary"},
    {"/grpc.health.v1.Health/Watch", "server_stream"},
    {"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "bidi_stream"},
}};

// Latency buckets, 0.5 ms to 10 s (roughly 1-2.5-5 per decade).
prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  return {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0};
}

// Splits "/pkg.Service/Method" into ("pkg.Service", "Method").
std::pair<std::string, std::string> SplitFullName(std::string_view full_name) {
  if (!full_name.empty() && full_name.front() == '/') full_name.remove_prefix(1);
  const size_t slash = full_name.rfind('/');
  if (slash == std::string_view::npos) return {"unknown", std::string(full_name)};
  return {std::string(full_name.substr(0, slash)), std::string(full_name.substr(slash + 1))};
}

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

}  // namespace

// The series of one RPC method; pointers into families owned by the registry.
struct MethodSeries {
  prometheus::Counter* started = nullptr;
  std::array<prometheus::Counter*, kCodeNames.size()> handled{};
  prometheus::Histogram* handling_seconds = nullptr;
  prometheus::Counter* msg_received = nullptr;
  prometheus::Counter* msg_sent = nullptr;
};

class ServerMetrics::Impl {
 public:
  Impl(prometheus::Registry& registry, const BuildInfo& build_info,
       const std::vector<MethodInfo>& methods)
      : started_(prometheus::BuildCounter()
                     .Name("grpc_server_started_total")
                     .Help("Total number of RPCs started on the server.")
                     .Register(registry)),
        handled_(prometheus::BuildCounter()
                     .Name("grpc_server_handled_total")
                     .Help("Total number of RPCs completed on the server, regardless of success "
                           "or failure.")
                     .Register(registry)),
        handling_(prometheus::BuildHistogram()
                      .Name("grpc_server_handling_seconds")
                      .Help("Histogram of response latency (seconds) of gRPC that had been "
                            "application-level handled by the server.")
                      .Register(registry)),
        msg_received_(prometheus::BuildCounter()
                          .Name("grpc_server_msg_received_total")
                          .Help("Total number of RPC stream messages received on the server.")
                          .Register(registry)),
        msg_sent_(prometheus::BuildCounter()
                      .Name("grpc_server_msg_sent_total")
                      .Help("Total number of gRPC stream messages sent by the server.")
                      .Register(registry)),
        queue_wait_(Histogram(registry, "simserve_queue_wait_seconds",
                              "Time a request waited in the compute queue.")),
        compute_(Histogram(registry, "simserve_compute_seconds",
                           "Kernel time of a whole request (all tiles).")),
        write_(Histogram(registry, "simserve_write_seconds",
                         "Time spent sending a request's result to the client.")),
        total_(Histogram(registry, "simserve_request_seconds",
                         "End-to-end server time of a Similarity request.")),
        in_flight_(prometheus::BuildGauge()
                       .Name("simserve_requests_in_flight")
                       .Help("Similarity requests currently being processed.")
                       .Register(registry)
                       .Add({})),
        queue_depth_(prometheus::BuildGauge()
                         .Name("simserve_queue_depth")
                         .Help("Requests waiting in the compute queue.")
                         .Register(registry)
                         .Add({})),
        bytes_received_(
            Counter(registry, "simserve_received_bytes_total", "Tensor payload bytes received.")),
        bytes_sent_(Counter(registry, "simserve_sent_bytes_total", "Result payload bytes sent.")),
        flops_(Counter(registry, "simserve_flops_total",
                       "Floating-point operations performed by the similarity kernels.")),
        tiles_(Counter(registry, "simserve_tiles_streamed_total",
                       "Result tiles (chunks) streamed to clients.")),
        gallery_evictions_(Counter(registry, "simserve_gallery_evictions_total",
                                   "Uploaded galleries evicted to fit the gallery memory budget.")),
        gallery_load_failures_(Counter(registry, "simserve_gallery_load_failures_total",
                                       "Gallery files in --gallery_dir that could not be loaded.")),
        gallery_registration_(Histogram(registry, "simserve_gallery_registration_seconds",
                                        "Time to check and prepare a gallery (upload or file).")),
        shared_memory_regions_(prometheus::BuildGauge()
                                   .Name("simserve_shared_memory_regions")
                                   .Help("Registered system shared-memory regions.")
                                   .Register(registry)
                                   .Add({})),
        shared_memory_bytes_(prometheus::BuildGauge()
                                 .Name("simserve_shared_memory_bytes")
                                 .Help("Bytes of the registered shared-memory regions.")
                                 .Register(registry)
                                 .Add({})) {
    auto& galleries = prometheus::BuildGauge()
                          .Name("simserve_galleries")
                          .Help("Galleries held, by source (uploaded, directory).")
                          .Register(registry);
    auto& gallery_bytes = prometheus::BuildGauge()
                              .Name("simserve_gallery_bytes")
                              .Help("Memory held by prepared galleries, by source.")
                              .Register(registry);
    for (size_t i = 0; i < 2; ++i) {
      const char* source = i == 0 ? "uploaded" : "directory";
      galleries_[i] = &galleries.Add({{"source", source}});
      gallery_bytes_[i] = &gallery_bytes.Add({{"source", source}});
    }
    auto& lookups = prometheus::BuildCounter()
                        .Name("simserve_gallery_lookups_total")
                        .Help("Compute calls naming a gallery, by result (hit, miss).")
                        .Register(registry);
    gallery_hits_ = &lookups.Add({{"result", "hit"}});
    gallery_misses_ = &lookups.Add({{"result", "miss"}});
    auto& rejected = prometheus::BuildCounter()
                         .Name("simserve_rejected_requests_total")
                         .Help("Requests turned away by admission control, by reason.")
                         .Register(registry);
    for (size_t i = 0; i < kRejectReasonNames.size(); ++i) {
      rejected_[i] = &rejected.Add({{"reason", kRejectReasonNames[i]}});
    }
    auto& auth_failures =
        prometheus::BuildCounter()
            .Name("simserve_auth_failures_total")
            .Help(
                "Calls refused by token authentication (--auth_token_file), by reason "
                "(missing, malformed, invalid).")
            .Register(registry);
    for (size_t i = 0; i < kAuthFailureNames.size(); ++i) {
      auth_failures_[i] = &auth_failures.Add({{"reason", kAuthFailureNames[i]}});
    }
    prometheus::BuildGauge()
        .Name("simserve_build_info")
        .Help("Build information; the value is always 1.")
        .Register(registry)
        .Add({{"version", build_info.version},
              {"onednn_version", build_info.onednn_version},
              {"isa", build_info.isa}})
        .Set(1);

    for (const MethodInfo& m : methods) AddMethod(m);
    for (const StandardMethod& m : kStandardMethods) AddMethod({m.full_name, m.grpc_type});
  }

  // Series of `full_name`, or nullptr for a method not registered at construction (unknown
  // methods are not counted, so clients cannot create series at will).
  const MethodSeries* Find(std::string_view full_name) const {
    auto it = methods_.find(full_name);
    return it == methods_.end() ? nullptr : &it->second;
  }

  prometheus::Histogram& queue_wait() { return queue_wait_; }
  prometheus::Histogram& compute() { return compute_; }
  prometheus::Histogram& write() { return write_; }
  prometheus::Histogram& total() { return total_; }
  prometheus::Gauge& in_flight() { return in_flight_; }
  prometheus::Gauge& queue_depth() { return queue_depth_; }
  prometheus::Counter& bytes_received() { return bytes_received_; }
  prometheus::Counter& bytes_sent() { return bytes_sent_; }
  prometheus::Counter& flops() { return flops_; }
  prometheus::Counter& tiles() { return tiles_; }
  prometheus::Counter& rejected(RejectReason reason) {
    return *rejected_[static_cast<size_t>(reason)];
  }
  prometheus::Counter& auth_failures(AuthFailure reason) {
    return *auth_failures_[static_cast<size_t>(reason)];
  }
  prometheus::Gauge& shared_memory_regions() { return shared_memory_regions_; }
  prometheus::Gauge& shared_memory_bytes() { return shared_memory_bytes_; }
  prometheus::Gauge& galleries(bool directory) { return *galleries_[directory ? 1 : 0]; }
  prometheus::Gauge& gallery_bytes(bool directory) { return *gallery_bytes_[directory ? 1 : 0]; }
  prometheus::Counter& gallery_lookups(bool hit) { return hit ? *gallery_hits_ : *gallery_misses_; }
  prometheus::Counter& gallery_evictions() { return gallery_evictions_; }
  prometheus::Counter& gallery_load_failures() { return gallery_load_failures_; }
  prometheus::Histogram& gallery_registration() { return gallery_registration_; }

 private:
  static prometheus::Histogram& Histogram(prometheus::Registry& registry, const std::string& name,
                                          const std::string& help) {
    return prometheus::BuildHistogram().Name(name).Help(help).Register(registry).Add(
        {}, LatencyBuckets());
  }
  static prometheus::Counter& Counter(prometheus::Registry& registry, const std::string& name,
                                      const std::string& help) {
    return prometheus::BuildCounter().Name(name).Help(help).Register(registry).Add({});
  }

  void AddMethod(const MethodInfo& m) {
    if (methods_.count(m.full_name) != 0) return;
    auto [service, method] = SplitFullName(m.full_name);
    const prometheus::Labels labels = {
        {"grpc_type", m.grpc_type}, {"grpc_service", service}, {"grpc_method", method}};
    MethodSeries series;
    series.started = &started_.Add(labels);
    for (size_t code = 0; code < kCodeNames.size(); ++code) {
      prometheus::Labels with_code = labels;
      with_code.emplace("grpc_code", kCodeNames[code]);
      series.handled[code] = &handled_.Add(with_code);
    }
    series.handling_seconds = &handling_.Add(labels, LatencyBuckets());
    series.msg_received = &msg_received_.Add(labels);
    series.msg_sent = &msg_sent_.Add(labels);
    methods_.emplace(m.full_name, series);
  }

  prometheus::Family<prometheus::Counter>& started_;
  prometheus::Family<prometheus::Counter>& handled_;
  prometheus::Family<prometheus::Histogram>& handling_;
  prometheus::Family<prometheus::Counter>& msg_received_;
  prometheus::Family<prometheus::Counter>& msg_sent_;
  prometheus::Histogram& queue_wait_;
  prometheus::Histogram& compute_;
  prometheus::Histogram& write_;
  prometheus::Histogram& total_;
  prometheus::Gauge& in_flight_;
  prometheus::Gauge& queue_depth_;
  prometheus::Counter& bytes_received_;
  prometheus::Counter& bytes_sent_;
  prometheus::Counter& flops_;
  prometheus::Counter& tiles_;
  std::array<prometheus::Counter*, kRejectReasonNames.size()> rejected_{};
  std::array<prometheus::Counter*, kAuthFailureNames.size()> auth_failures_{};
  prometheus::Counter& gallery_evictions_;
  prometheus::Counter& gallery_load_failures_;
  prometheus::Histogram& gallery_registration_;
  prometheus::Gauge& shared_memory_regions_;
  prometheus::Gauge& shared_memory_bytes_;
  std::array<prometheus::Gauge*, 2> galleries_{};
  std::array<prometheus::Gauge*, 2> gallery_bytes_{};
  prometheus::Counter* gallery_hits_ = nullptr;
  prometheus::Counter* gallery_misses_ = nullptr;
  // Written only in the constructor, read concurrently afterwards.
  std::unordered_map<std::string, MethodSeries, StringHash, std::equal_to<>> methods_;
};

namespace {

// One per RPC (gRPC creates it when the call starts and destroys it when the call is done).
// Hooks may run on different threads for streaming calls; counters are atomic and the status
// is recorded once.
class MetricsInterceptor final : public grpc::experimental::Interceptor {
 public:
  MetricsInterceptor(const MethodSeries& series, grpc::ServerContextBase* context)
      : series_(series), context_(context), start_(std::chrono::steady_clock::now()) {
    series_.started->Increment();
  }

  ~MetricsInterceptor() override {
    // The call ended without the server sending a status (e.g. torn down on cancellation).
    Record(grpc::StatusCode::CANCELLED);
  }

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    using grpc::experimental::InterceptionHookPoints;
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::POST_RECV_MESSAGE) &&
        methods->GetRecvMessage() != nullptr) {
      series_.msg_received->Increment();
    }
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_MESSAGE)) {
      series_.msg_sent->Increment();
    }
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      grpc::StatusCode code = methods->GetSendStatus().error_code();
      // An OK status on a call the client already cancelled never reaches the client.
      if (code == grpc::StatusCode::OK && context_ != nullptr && context_->IsCancelled()) {
        code = grpc::StatusCode::CANCELLED;
      }
      Record(code);
    }
    methods->Proceed();
  }

 private:
  void Record(grpc::StatusCode code) {
    if (recorded_.exchange(true)) return;
    const auto index = static_cast<size_t>(code);
    series_.handled[index < kCodeNames.size() ? index : 2 /* Unknown */]->Increment();
    series_.handling_seconds->Observe(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
  }

  const MethodSeries& series_;
  grpc::ServerContextBase* const context_;
  const std::chrono::steady_clock::time_point start_;
  std::atomic<bool> recorded_{false};
};

class MetricsInterceptorFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit MetricsInterceptorFactory(const ServerMetrics::Impl& impl) : impl_(impl) {}

  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    const MethodSeries* series = impl_.Find(info->method() != nullptr ? info->method() : "");
    if (series == nullptr) return nullptr;  // gRPC skips a null interceptor.
    // gRPC's interface takes ownership of a raw pointer (it wraps it in a unique_ptr).
    return std::make_unique<MetricsInterceptor>(*series, info->server_context()).release();
  }

 private:
  const ServerMetrics::Impl& impl_;
};

}  // namespace

ServerMetrics::ServerMetrics(prometheus::Registry& registry, const BuildInfo& build_info,
                             const std::vector<MethodInfo>& methods)
    : impl_(std::make_unique<Impl>(registry, build_info, methods)) {}

ServerMetrics::~ServerMetrics() = default;

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
ServerMetrics::MakeInterceptorFactory() {
  return std::make_unique<MetricsInterceptorFactory>(*impl_);
}

void ServerMetrics::ObserveQueueWait(double seconds) { impl_->queue_wait().Observe(seconds); }
void ServerMetrics::ObserveCompute(double seconds) { impl_->compute().Observe(seconds); }
void ServerMetrics::ObserveWrite(double seconds) { impl_->write().Observe(seconds); }
void ServerMetrics::ObserveTotal(double seconds) { impl_->total().Observe(seconds); }
void ServerMetrics::AddInFlight(int64_t delta) {
  impl_->in_flight().Increment(static_cast<double>(delta));
}
void ServerMetrics::AddQueueDepth(int64_t delta) {
  impl_->queue_depth().Increment(static_cast<double>(delta));
}
void ServerMetrics::AddBytesReceived(uint64_t bytes) {
  impl_->bytes_received().Increment(static_cast<double>(bytes));
}
void ServerMetrics::AddBytesSent(uint64_t bytes) {
  impl_->bytes_sent().Increment(static_cast<double>(bytes));
}
void ServerMetrics::AddFlops(double flops) { impl_->flops().Increment(flops); }
void ServerMetrics::AddTiles(uint64_t tiles) {
  impl_->tiles().Increment(static_cast<double>(tiles));
}
void ServerMetrics::Reject(RejectReason reason) { impl_->rejected(reason).Increment(); }
void ServerMetrics::AuthFailed(AuthFailure reason) { impl_->auth_failures(reason).Increment(); }
void ServerMetrics::SetGalleries(bool directory, int64_t count, int64_t bytes) {
  impl_->galleries(directory).Set(static_cast<double>(count));
  impl_->gallery_bytes(directory).Set(static_cast<double>(bytes));
}
void ServerMetrics::SetSharedMemory(int64_t regions, int64_t bytes) {
  impl_->shared_memory_regions().Set(static_cast<double>(regions));
  impl_->shared_memory_bytes().Set(static_cast<double>(bytes));
}
void ServerMetrics::GalleryLookup(bool hit) { impl_->gallery_lookups(hit).Increment(); }
void ServerMetrics::GalleryEvicted() { impl_->gallery_evictions().Increment(); }
void ServerMetrics::GalleryLoadFailed() { impl_->gallery_load_failures().Increment(); }
void ServerMetrics::ObserveGalleryRegistration(double seconds) {
  impl_->gallery_registration().Observe(seconds);
}

}  // namespace simserve
