// Server assembly and lifecycle: builds the gRPC server with health, reflection, message
// limits and the metrics interceptor; warms the kernels; drains on request or on signals.
#include "server/server.h"

#include <malloc.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <climits>
#include <csignal>
#include <cstring>
#include <exception>
#include <fstream>
#include <future>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "grpc/health/v1/health.pb.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/generic/async_generic_service.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/security/tls_certificate_provider.h"
#include "grpcpp/security/tls_credentials_options.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "prometheus/exposer.h"
#include "prometheus/registry.h"
#include "server/auth.h"
#include "server/compute_pool.h"
#include "server/convert.h"
#include "server/inference_service.h"
#include "server/log.h"
#include "server/metrics.h"
#include "server/metrics_exposer.h"
#include "server/shared_memory.h"

namespace simserve {
namespace {

// The TLS files must exist and be readable at start: a missing file would otherwise only
// show as failed handshakes.
absl::Status ValidateTls(const TlsConfig& tls) {
  if (!tls.enabled()) {
    if (!tls.client_ca_file.empty()) {
      return absl::InvalidArgumentError(
          "--tls_client_ca_file needs --tls_cert_file and --tls_key_file (mutual TLS is TLS)");
    }
    return absl::OkStatus();
  }
  if (tls.cert_file.empty() || tls.key_file.empty()) {
    return absl::InvalidArgumentError("TLS needs both --tls_cert_file and --tls_key_file");
  }
  if (tls.refresh_seconds <= 0) {
    return absl::InvalidArgumentError("--tls_refresh_seconds must be > 0");
  }
  for (const auto& [flag, path] :
       {std::pair{"--tls_cert_file", tls.cert_file}, std::pair{"--tls_key_file", tls.key_file},
        std::pair{"--tls_client_ca_file", tls.client_ca_file}}) {
    if (path.empty()) continue;
    std::ifstream file(path);
    std::string first_line;
    if (!file || !std::getline(file, first_line)) {
      return absl::InvalidArgumentError(absl::StrCat(flag, " ", path, " cannot be read"));
    }
    if (first_line.rfind("-----BEGIN", 0) != 0) {
      return absl::InvalidArgumentError(absl::StrCat(flag, " ", path, " is not PEM"));
    }
  }
  return absl::OkStatus();
}

// The gRPC port's credentials (TLS, then the token check if `authenticator`) and a
// description of them for the startup line.
std::shared_ptr<grpc::ServerCredentials> ServerCredentials(const TlsConfig& tls,
                                                           CallAuthenticator* authenticator,
                                                           std::string* description) {
  const std::string tokens =
      authenticator == nullptr
          ? std::string("no token authentication")
          : absl::StrCat("BEARER TOKENS required (", authenticator->token_count(),
                         " accepted, from ", authenticator->path(), "; health stays open)");
  if (!tls.enabled()) {
    if (authenticator == nullptr) {
      *description = "PLAINTEXT (no TLS, no client authentication: for local use only)";
      return grpc::InsecureServerCredentials();
    }
    *description = absl::StrCat(
        "PLAINTEXT (no TLS: tokens travel in clear, use behind a TLS-terminating "
        "proxy or mesh only), ",
        tokens);
    return authenticator->PlaintextCredentials();
  }
  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      tls.key_file, tls.cert_file, tls.client_ca_file, tls.refresh_seconds);
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_identity_key_cert_pairs();
  if (tls.client_ca_file.empty()) {
    options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
    *description = absl::StrCat("TLS (certificate ", tls.cert_file, ")");
  } else {
    options.watch_root_certs();
    options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
    *description =
        absl::StrCat("MUTUAL TLS (certificate ", tls.cert_file,
                     ", clients must present a certificate signed by ", tls.client_ca_file, ")");
  }
  absl::StrAppend(description, ", files re-read every ", tls.refresh_seconds, " s; ", tokens);
  std::shared_ptr<grpc::ServerCredentials> credentials =
      grpc::experimental::TlsServerCredentials(options);
  if (authenticator != nullptr) authenticator->InstallOn(*credentials);
  return credentials;
}

int64_t PerPeerInflightBytes(const LimitsConfig& limits) {
  return limits.max_inflight_bytes_per_peer > 0 ? limits.max_inflight_bytes_per_peer
                                                : limits.max_inflight_bytes / 2;
}

absl::StatusOr<kernels::DataType> ParseStorageDtype(const std::string& name) {
  if (name == "float32") return kernels::DataType::kFloat32;
  if (name == "bfloat16") return kernels::DataType::kBFloat16;
  if (name == "float16") return kernels::DataType::kFloat16;
  return absl::InvalidArgumentError(absl::StrCat("unknown storage dtype '", name, "'"));
}

constexpr char kService[] = "simserve.v1.Similarity";

absl::Status ValidateConfig(const ServerConfig& c) {
  const LimitsConfig& l = c.limits;
  if (c.listen.empty()) return absl::InvalidArgumentError("--listen must not be empty");
  if (c.compute.workers < 0 || c.compute.threads_per_worker < 0) {
    return absl::InvalidArgumentError("--workers and --threads_per_worker must be >= 0");
  }
  if (c.compute.stream_window < 1) {
    return absl::InvalidArgumentError("--stream_window must be >= 1");
  }
  if (c.compute.buffer_cache_bytes < 0) {
    return absl::InvalidArgumentError("--buffer_cache_bytes must be >= 0");
  }
  if (c.compute.omp_spin_count < ComputeConfig::kAutoOmpSpinCount) {
    return absl::InvalidArgumentError(
        "--omp_spin_count must be >= 0, -1 (libgomp's default) or -2 (auto)");
  }
  if (l.max_inflight_bytes_per_peer < 0) {
    return absl::InvalidArgumentError("--max_inflight_bytes_per_peer must be >= 0");
  }
  if (c.compute.memory_release_delay < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--memory_release_delay must be >= 0 (inf: never)");
  }
  if (c.compute.upload_idle_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--upload_idle_timeout must be > 0 (inf: off)");
  }
  if (c.compute.upload_read_ahead_bytes < 1) {
    return absl::InvalidArgumentError("--upload_read_ahead_bytes must be >= 1");
  }
  for (auto [name, value] : std::vector<std::pair<const char*, int64_t>>{
           {"max_input_elements", l.max_input_elements},
           {"max_flops", l.max_flops},
           {"max_output_bytes", l.max_output_bytes},
           {"max_queued_requests", l.max_queued_requests},
           {"max_inflight_bytes", l.max_inflight_bytes},
           {"max_receive_message_bytes", l.max_receive_message_bytes},
           {"max_send_message_bytes", l.max_send_message_bytes},
           {"default_chunk_bytes", l.default_chunk_bytes},
           {"max_chunk_bytes", l.max_chunk_bytes}}) {
    if (value <= 0) return absl::InvalidArgumentError(absl::StrCat("--", name, " must be > 0"));
  }
  constexpr int64_t kIntMax = 0x7fffffff;
  if (l.max_receive_message_bytes > kIntMax || l.max_send_message_bytes > kIntMax) {
    return absl::InvalidArgumentError("message size limits must be < 2 GiB (gRPC uses int)");
  }
  if (l.max_chunk_bytes > l.max_send_message_bytes || l.default_chunk_bytes > l.max_chunk_bytes) {
    return absl::InvalidArgumentError(
        "need default_chunk_bytes <= max_chunk_bytes <= max_send_message_bytes");
  }
  const TransportConfig& t = c.transport;
  if (t.http2_max_frame_size != 0 &&
      (t.http2_max_frame_size < (16 << 10) || t.http2_max_frame_size > (16 << 20) - 1)) {
    return absl::InvalidArgumentError("--http2_max_frame_size must be 0 or in [16 KiB, 16 MiB)");
  }
  if (t.http2_lookahead_bytes < 0 || t.http2_write_buffer_bytes < 0 || t.tcp_read_chunk_bytes < 0 ||
      t.tcp_max_read_chunk_bytes < 0) {
    return absl::InvalidArgumentError(
        "--http2_lookahead_bytes, --http2_write_buffer_bytes, --tcp_read_chunk_bytes and "
        "--tcp_max_read_chunk_bytes must be >= 0");
  }
  if (t.max_concurrent_streams < 1 || t.max_ping_strikes < 0 || t.max_metadata_bytes < 1024) {
    return absl::InvalidArgumentError(
        "need --max_concurrent_streams >= 1, --max_ping_strikes >= 0 and "
        "--max_metadata_bytes >= 1024");
  }
  for (auto [name, value] : std::vector<std::pair<const char*, absl::Duration>>{
           {"min_client_ping_interval", t.min_client_ping_interval},
           {"keepalive_time", t.keepalive_time},
           {"keepalive_timeout", t.keepalive_timeout},
           {"max_connection_idle", t.max_connection_idle}}) {
    if (value <= absl::ZeroDuration()) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, " must be > 0 (inf: off)"));
    }
  }
  if (c.drain_grace < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--drain_grace must be >= 0");
  }
  if (absl::Status tls = ValidateTls(c.tls); !tls.ok()) return tls;
  if (c.galleries.memory_bytes < 0) {
    return absl::InvalidArgumentError("--gallery_memory_bytes must be >= 0");
  }
  if (!c.galleries.dir.empty() && c.galleries.rescan_period <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--gallery_rescan_seconds must be > 0");
  }
  if (!ParseStorageDtype(c.galleries.dir_storage_dtype).ok()) {
    return absl::InvalidArgumentError(
        "--gallery_dir_storage_dtype must be float32, bfloat16 or float16");
  }
  return absl::OkStatus();
}

std::vector<ServerMetrics::MethodInfo> Methods() {
  return {{"/simserve.v1.Similarity/Compute", "unary"},
          {"/simserve.v1.Similarity/ComputeStream", "server_stream"},
          {"/simserve.v1.Similarity/ComputeUpload", "bidi_stream"},
          {"/simserve.v1.Similarity/GetInfo", "unary"},
          {"/simserve.v1.Similarity/RegisterGallery", "client_stream"},
          {"/simserve.v1.Similarity/GetGallery", "unary"},
          {"/simserve.v1.Similarity/ListGalleries", "unary"},
          {"/simserve.v1.Similarity/DeleteGallery", "unary"},
          {"/simserve.v1.Similarity/SystemSharedMemoryRegister", "unary"},
          {"/simserve.v1.Similarity/SystemSharedMemoryStatus", "unary"},
          {"/simserve.v1.Similarity/SystemSharedMemoryUnregister", "unary"},
          {"/inference.GRPCInferenceService/ServerLive", "unary"},
          {"/inference.GRPCInferenceService/ServerReady", "unary"},
          {"/inference.GRPCInferenceService/ModelReady", "unary"},
          {"/inference.GRPCInferenceService/ServerMetadata", "unary"},
          {"/inference.GRPCInferenceService/ModelMetadata", "unary"},
          {"/inference.GRPCInferenceService/ModelInfer", "unary"},
          {"/inference.GRPCInferenceService/ModelStreamInfer", "bidi_stream"},
          {"/inference.GRPCInferenceService/ModelConfig", "unary"},
          {"/inference.GRPCInferenceService/ModelStatistics", "unary"},
          {"/inference.GRPCInferenceService/RepositoryIndex", "unary"},
          {"/inference.GRPCInferenceService/SystemSharedMemoryStatus", "unary"},
          {"/inference.GRPCInferenceService/SystemSharedMemoryRegister", "unary"},
          {"/inference.GRPCInferenceService/SystemSharedMemoryUnregister", "unary"}};
}

}  // namespace

PoolSize ResolvePoolSize(const ComputeConfig& config, int cores) {
  PoolSize size;
  size.workers = std::max(1, config.workers);
  size.threads_per_worker = config.threads_per_worker > 0
                                ? config.threads_per_worker
                                : std::max(1, std::max(1, cores) / size.workers);
  return size;
}

int UsableCores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
  return std::max(1, CPU_COUNT(&set));
}

SimilarityServer::SimilarityServer(const ServerConfig& config) : config_(config) {}

SimilarityServer::~SimilarityServer() { Shutdown(absl::ZeroDuration()); }

absl::StatusOr<std::unique_ptr<SimilarityServer>> SimilarityServer::Start(
    const ServerConfig& config) {
  absl::Status valid = ValidateConfig(config);
  if (!valid.ok()) return valid;
  // Private constructor: std::make_unique cannot reach it.
  std::unique_ptr<SimilarityServer> server(new SimilarityServer(config));
  absl::Status init = server->Init();
  if (!init.ok()) return init;
  return server;
}

absl::Status SimilarityServer::Init() {
  const PoolSize size = ResolvePoolSize(config_.compute, UsableCores());
  auto engine = kernels::SimilarityEngine::Create(
      kernels::EngineConfig{.threads_per_call = size.threads_per_worker});
  if (!engine.ok()) return engine.status();
  engine_ = std::move(*engine);

  registry_ = std::make_shared<prometheus::Registry>();
  metrics_ = std::make_unique<ServerMetrics>(
      *registry_,
      BuildInfo{SIMSERVE_VERSION, kernels::SimilarityEngine::OneDnnVersion(),
                kernels::SimilarityEngine::CpuIsa()},
      Methods());
  if (!config_.metrics_listen.empty()) {
    auto endpoint =
        MetricsEndpoint::Start(config_.metrics_listen, config_.metrics_security, registry_);
    if (!endpoint.ok()) return endpoint.status();
    metrics_endpoint_ = *std::move(endpoint);
    metrics_port_ = metrics_endpoint_->port();
  }

  pool_ = std::make_unique<ComputePool>(
      ComputePool::Options{.workers = size.workers,
                           .max_queued_requests = config_.limits.max_queued_requests,
                           .max_inflight_bytes = config_.limits.max_inflight_bytes,
                           .max_inflight_bytes_per_peer = PerPeerInflightBytes(config_.limits)},
      metrics_.get());
  buffers_ = BufferPool::Create(config_.compute.buffer_cache_bytes);
  galleries_ = std::make_unique<GalleryStore>(config_.galleries.memory_bytes, metrics_.get());
  shared_memory_ = std::make_unique<SharedMemoryRegistry>(
      config_.shared_memory.allow, config_.shared_memory.max_regions, metrics_.get());
  service_ =
      std::make_unique<SimilarityService>(config_, engine_.get(), pool_.get(), metrics_.get(),
                                          buffers_.get(), galleries_.get(), shared_memory_.get());
  inference_service_ = std::make_unique<InferenceService>(service_->env());

  if (config_.auth.enabled()) {
    auto authenticator = CallAuthenticator::Create(config_.auth, metrics_.get());
    if (!authenticator.ok()) return authenticator.status();
    authenticator_ = std::move(*authenticator);
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  // Links the health proto's descriptor into the binary (a static library member is dropped
  // unless referenced) so reflection can describe grpc.health.v1.Health.
  grpc::health::v1::HealthCheckRequest::descriptor();
  grpc::ServerBuilder builder;
  std::string transport_security;
  builder.AddListeningPort(
      config_.listen, ServerCredentials(config_.tls, authenticator_.get(), &transport_security),
      &port_);
  builder.RegisterService(service_.get());
  builder.RegisterService(inference_service_.get());
  builder.SetMaxReceiveMessageSize(static_cast<int>(config_.limits.max_receive_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(config_.limits.max_send_message_bytes));
  auto ms = [](absl::Duration d) {  // channel args are int
    return static_cast<int>(std::clamp<int64_t>(absl::ToInt64Milliseconds(d), 0, INT_MAX));
  };
  if (config_.max_connection_age > absl::ZeroDuration() &&
      config_.max_connection_age != absl::InfiniteDuration()) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS, ms(config_.max_connection_age));
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS, ms(config_.drain_grace));
  }
  const TransportConfig& t = config_.transport;
  for (auto [name, value] : std::vector<std::pair<const char*, int>>{
           {GRPC_ARG_HTTP2_MAX_FRAME_SIZE, t.http2_max_frame_size},
           {GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, t.http2_lookahead_bytes},
           {GRPC_ARG_HTTP2_WRITE_BUFFER_SIZE, t.http2_write_buffer_bytes},
           {GRPC_ARG_TCP_READ_CHUNK_SIZE, t.tcp_read_chunk_bytes},
           {GRPC_ARG_TCP_MAX_READ_CHUNK_SIZE, t.tcp_max_read_chunk_bytes}}) {
    if (value > 0) builder.AddChannelArgument(name, value);
  }
  if (!t.http2_bdp_probe) builder.AddChannelArgument(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, t.max_concurrent_streams);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                             ms(t.min_client_ping_interval));
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, t.max_ping_strikes);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, ms(t.keepalive_time));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, ms(t.keepalive_timeout));
  if (t.max_connection_idle != absl::InfiniteDuration()) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS, ms(t.max_connection_idle));
  }
  builder.AddChannelArgument(GRPC_ARG_MAX_METADATA_SIZE, t.max_metadata_bytes);
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> creators;
  creators.push_back(metrics_->MakeInterceptorFactory());
  builder.experimental().SetInterceptorCreators(std::move(creators));
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port_ == 0) {
    server_.reset();
    return absl::UnavailableError(absl::StrCat("cannot listen on ", config_.listen));
  }
  if (!config_.health_listen.empty()) {
    grpc::ServerBuilder health_builder;
    health_builder.AddListeningPort(config_.health_listen, grpc::InsecureServerCredentials(),
                                    &health_port_);
    // Answers every method but the default health service with UNIMPLEMENTED; a server
    // needs one callback service to poll its completion queues.
    health_only_ = std::make_unique<grpc::CallbackGenericService>();
    health_builder.RegisterCallbackGenericService(health_only_.get());
    health_server_ = health_builder.BuildAndStart();
    if (health_server_ == nullptr || health_port_ == 0) {
      health_server_.reset();
      return absl::UnavailableError(
          absl::StrCat("cannot listen on --health_listen ", config_.health_listen));
    }
  }
  SetServing(false);

  const std::string warmup = config_.compute.warmup ? Warmup() : "warm-up disabled";
  std::string galleries = "no gallery_dir";
  if (!config_.galleries.dir.empty()) {
    gallery_dir_ = std::make_unique<GalleryDirectory>(
        config_.galleries.dir, config_.galleries.rescan_period,
        *ParseStorageDtype(config_.galleries.dir_storage_dtype), galleries_.get(), metrics_.get());
    const absl::Time begin = absl::Now();
    const GalleryDirectory::ScanResult scan = gallery_dir_->Scan();
    gallery_dir_->StartWatching();
    galleries =
        absl::StrCat("gallery_dir ", config_.galleries.dir, ": ", scan.loaded,
                     " galleries loaded (", galleries_->held_bytes(), " bytes, ", scan.failed,
                     " files failed) in ", absl::FormatDuration(absl::Now() - begin),
                     ", rescanned every ", absl::FormatDuration(config_.galleries.rescan_period));
  }

  const LimitsConfig& l = config_.limits;
  LogInfo(absl::StrCat(
      "simserve ", SIMSERVE_VERSION, " serving gRPC on ", config_.listen, " (port ", port_,
      "), metrics on ",
      metrics_endpoint_ ? absl::StrCat(config_.metrics_listen, " (port ", metrics_port_, ") over ",
                                       metrics_endpoint_->description())
                        : std::string("(disabled)"),
      "; gRPC transport: ", transport_security,
      "; APIs: simserve.v1.Similarity and inference.GRPCInferenceService (Open Inference "
      "Protocol); shared memory ",
      config_.shared_memory.allow ? "allowed (--allow_shared_memory)" : "off",
      health_server_ ? absl::StrCat("; plaintext health-only listener on ", config_.health_listen,
                                    " (port ", health_port_, ")")
                     : std::string(),
      "; oneDNN ", kernels::SimilarityEngine::OneDnnVersion(), " isa ",
      kernels::SimilarityEngine::CpuIsa(), "; ", size.workers, " workers x ",
      size.threads_per_worker, " threads; limits: max_input_elements=", l.max_input_elements,
      " max_flops=", l.max_flops, " max_output_bytes=", l.max_output_bytes,
      " max_queued_requests=", l.max_queued_requests, " max_inflight_bytes=", l.max_inflight_bytes,
      " max_inflight_bytes_per_peer=", PerPeerInflightBytes(l),
      " upload_idle_timeout=", absl::FormatDuration(config_.compute.upload_idle_timeout),
      " max_receive_message_bytes=", l.max_receive_message_bytes,
      " max_send_message_bytes=", l.max_send_message_bytes, " chunk_bytes=", l.default_chunk_bytes,
      "/", l.max_chunk_bytes, " stream_window=", config_.compute.stream_window,
      " drain_grace=", absl::FormatDuration(config_.drain_grace),
      " buffer_cache_bytes=", config_.compute.buffer_cache_bytes,
      " memory_release_delay=", absl::FormatDuration(config_.compute.memory_release_delay),
      "; OpenMP wait: ", config_.compute.omp_wait_policy, "; ", warmup, "; ", galleries,
      "; gallery_memory_bytes=", config_.galleries.memory_bytes));
  if (config_.compute.memory_release_delay != absl::InfiniteDuration()) {
    memory_janitor_ =
        std::make_unique<PeriodicThread>(std::clamp(config_.compute.memory_release_delay / 4,
                                                    absl::Milliseconds(50), absl::Seconds(1)),
                                         [this] { ReleaseMemoryWhenQuiet(); });
  }
  SetServing(true);
  return absl::OkStatus();
}

void SimilarityServer::ReleaseMemoryWhenQuiet() {
  const bool quiet = pool_->inflight_bytes() == 0 && pool_->queued() == 0;
  const absl::Time now = absl::Now();
  MutexLock lock(&janitor_mu_);
  if (!quiet) {
    quiet_since_ = absl::InfiniteFuture();
    released_ = false;
    return;
  }
  if (quiet_since_ == absl::InfiniteFuture()) quiet_since_ = now;
  if (!released_ && now - quiet_since_ >= config_.compute.memory_release_delay) {
    released_ = true;
    last_trim_ = now;
    buffers_->Clear();
    malloc_trim(0);  // also the freed socket buffers gRPC allocated
    return;
  }
  // Under steady traffic the server is never quiet for long, and the heap glibc retains
  // fragments: the 10-minute soak grew RSS by 11 % with free pages inside the heap. At a
  // moment with nothing in flight, return those pages every few delays (the warm buffers of
  // the cache stay; what is trimmed costs a page fault when reused).
  if (now - last_trim_ >= 5 * config_.compute.memory_release_delay) {
    last_trim_ = now;
    malloc_trim(0);
  }
}

void SimilarityServer::SetServing(bool serving) {
  for (grpc::Server* server : {server_.get(), health_server_.get()}) {
    if (server == nullptr) continue;
    grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
    health->SetServingStatus(serving);
    health->SetServingStatus(kService, serving);
  }
}

std::string SimilarityServer::Warmup() {
  const absl::Time begin = absl::Now();
  // The seed workload (100x400x500x200) and a small request (1x8x256x128), in the tile
  // sizes the default chunk size gives, for both precisions.
  struct Case {
    kernels::Shape shape;
  };
  const Case cases[] = {{{.batch = 100, .n = 400, .m = 500, .d = 200}},
                        {{.batch = 1, .n = 8, .m = 256, .d = 128}}};
  int warmed = 0;
  for (const Case& c : cases) {
    for (auto precision : {kernels::Precision::kFp32, kernels::Precision::kBf16}) {
      kernels::Options options;
      options.precision = precision;
      const int64_t row_bytes = c.shape.m * 4;
      const int64_t tile_rows =
          std::clamp<int64_t>(config_.limits.default_chunk_bytes / row_bytes, 1, c.shape.n);
      // On a pool worker: the kernel caches primitives per thread, and the workers run them.
      std::promise<absl::Status> done;
      ComputeTask task;
      task.run = [&](absl::Duration) {
        done.set_value(engine_->Warmup(c.shape, options, tile_rows));
      };
      task.skip = [&](const absl::Status& why) { done.set_value(why); };
      absl::Status status = pool_->Submit(std::move(task), /*new_request=*/false);
      if (status.ok()) status = done.get_future().get();
      if (!status.ok()) {
        LogWarning(absl::StrCat("warm-up failed (continuing): ", status.message()));
      } else {
        ++warmed;
      }
    }
  }
  return absl::StrCat("warm-up of ", warmed, " problem shapes took ",
                      absl::FormatDuration(absl::Now() - begin));
}

int64_t SimilarityServer::queued_tasks() const { return pool_ ? pool_->queued() : 0; }

void SimilarityServer::Shutdown(absl::Duration grace) {
  MutexLock lock(&shutdown_mu_);
  if (shut_down_) return;
  shut_down_ = true;
  memory_janitor_.reset();
  if (server_ != nullptr) {
    service_->StartDraining();
    // Marks everything NOT_SERVING for good and ends Health.Watch streams.
    server_->GetHealthCheckService()->Shutdown();
    if (health_server_ != nullptr) health_server_->GetHealthCheckService()->Shutdown();
    server_->Shutdown(absl::ToChronoTime(absl::Now() + grace));
    server_->Wait();
  }
  if (health_server_ != nullptr) {  // answered NOT_SERVING until the main port was drained
    health_server_->Shutdown(absl::ToChronoTime(absl::Now()));
    health_server_->Wait();
  }
  gallery_dir_.reset();  // no rescans while draining
  if (pool_ != nullptr) pool_->Shutdown();
  metrics_endpoint_.reset();
}

absl::Status RunServer(const ServerConfig& config) {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  // Blocked in this thread before any other exists, so every thread inherits the mask and
  // the signals are only ever consumed by sigwait below.
  if (pthread_sigmask(SIG_BLOCK, &signals, nullptr) != 0) {
    return absl::InternalError("pthread_sigmask failed");
  }
  auto server = SimilarityServer::Start(config);
  if (!server.ok()) return server.status();
  int signal_number = 0;
  if (sigwait(&signals, &signal_number) != 0) return absl::InternalError("sigwait failed");
  LogInfo(absl::StrCat("received ", strsignal(signal_number), "; draining for up to ",
                       absl::FormatDuration(config.drain_grace)));
  const absl::Time begin = absl::Now();
  (*server)->Shutdown(config.drain_grace);
  LogInfo(absl::StrCat("drained and stopped in ", absl::FormatDuration(absl::Now() - begin)));
  return absl::OkStatus();
}

}  // namespace simserve
