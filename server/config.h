// ServerConfig: every setting of the simserve server in one struct with nested groups.
// Defaults live in the declarations; main.cc fills it from flags and SIMSERVE_* variables.
#ifndef SIMSERVE_SERVER_CONFIG_H_
#define SIMSERVE_SERVER_CONFIG_H_

#include <cstdint>
#include <string>

#include "absl/time/time.h"

namespace simserve {

// Compute pool sizing. workers * threads_per_worker should not exceed the cores the
// process may use (in Kubernetes: the CPU limit), or OpenMP threads oversubscribe.
struct ComputeConfig {
  // Requests computed concurrently (worker threads of the compute pool). 0 = 1 worker.
  int workers = 0;
  // OpenMP threads per computation. 0 = cores / workers (at least 1).
  int threads_per_worker = 0;
  // Result tiles computed ahead of the network writer per streaming call. Bounds the
  // memory of a call with a slow reader to window * chunk bytes; >= 1.
  int stream_window = 3;
  // Warm the oneDNN primitives of the common shapes before reporting SERVING.
  bool warmup = true;
  // ComputeUpload stops reading from a client while this many received bytes wait to be
  // copied into the input buffers (HTTP/2 flow control then slows the client down). Bounds
  // the memory of a call beyond its reservation; a few upload pieces. Uploads reserve their
  // input in the in-flight budget as it arrives, two read-aheads at a time.
  int64_t upload_read_ahead_bytes = int64_t{8} << 20;
  // A ComputeUpload or RegisterGallery stream waiting this long for its next message is
  // ended with DEADLINE_EXCEEDED ("no data for 30 s"), freeing what it holds. Time the server
  // itself paused reading (flow control) does not count. Infinite: off.
  absl::Duration upload_idle_timeout = absl::Seconds(30);
  // Unary calls this small (matmul flops, and input bytes below) run on the gRPC thread that
  // received them: a hop to the compute pool and back costs more than their work (about
  // 50 us at these sizes). 0 disables; bigger calls always run on the pool.
  int64_t inline_max_flops = int64_t{4} << 20;
  int64_t inline_max_input_bytes = int64_t{256} << 10;
  // Freed input, tile and result buffers kept for reuse (bytes). A fresh buffer costs a
  // page fault per 4 KiB on first touch (about 30 ms of CPU for the seed's 72 MB of inputs);
  // reused ones cost nothing. Memory held on top of max_inflight_bytes; 0 disables.
  int64_t buffer_cache_bytes = int64_t{256} << 20;
  // Freed heap memory glibc keeps for reuse instead of returning it to the kernel
  // (M_TRIM_THRESHOLD; blocks up to 32 MiB also stop being separate mmaps). With glibc's
  // defaults (128 KiB) gRPC's socket read buffers page-fault afresh on every call: a quarter
  // of the server's CPU for a 4 MiB request. Applied by the `simserve` executable; 0 keeps
  // glibc's defaults.
  int64_t malloc_retain_bytes = int64_t{1} << 30;
  // glibc malloc arenas (M_ARENA_MAX). glibc's default (8 per core) gives each of gRPC's and
  // the pool's threads its own heap, and each fragments on its own: RSS crept 11-13 % in
  // the 10-minute soak. 0 keeps glibc's default. Applied by the `simserve` executable.
  int malloc_arena_max = 2;
  // After this long with nothing in flight (no call holding input or results), the cached
  // buffers (buffer_cache_bytes) and the heap memory glibc retains (malloc_retain_bytes)
  // are given back to the kernel (malloc_trim), so a pod's RSS returns near its idle level
  // after a burst. Steady traffic never waits this long and keeps its warm buffers; the
  // first call after a quiet spell pays the page faults again. Under steady traffic the free
  // pages inside the heap are still returned every 5 delays, at a moment with nothing in
  // flight (fragmentation otherwise creeps: +11 % RSS in the 10-minute soak). Infinite: never.
  absl::Duration memory_release_delay = absl::Seconds(2);
  // How long an OpenMP thread spins (GOMP_SPINCOUNT iterations) after a parallel region
  // before it sleeps. libgomp's default (300000, about 0.1-1 ms) keeps the compute threads
  // busy between tiles while the pipeline waits on the network, taking the cores gRPC
  // needs. 0 = sleep at once (OMP_WAIT_POLICY=passive); -1 = libgomp's default;
  // kAutoOmpSpinCount (the default) = 0, or kSharedMemoryOmpSpinCount when shared memory is
  // allowed: same-host callers whose tensors are in shared memory leave the tiles of a call
  // nothing to wait for, and a short spin saves the team's wake-up at each of the ~3
  // parallel regions per batch entry (seed, this project's Xeon: 42 vs 80 ms a call with
  // inputs in place, and less CPU); over the network the same spin costs 5-10 % more
  // server CPU. An explicit
  // GOMP_SPINCOUNT or OMP_WAIT_POLICY in the environment wins. Applied by the `simserve`
  // executable (main.cc), which re-executes itself once because libgomp reads it at load.
  static constexpr int64_t kAutoOmpSpinCount = -2;
  static constexpr int64_t kSharedMemoryOmpSpinCount = 2000;
  int64_t omp_spin_count = kAutoOmpSpinCount;
  // Filled by main.cc: the OpenMP wait policy actually in force, for the startup line.
  std::string omp_wait_policy = "not applied (library use)";
};

// Admission limits. A request over any of them is rejected with RESOURCE_EXHAUSTED before
// any work is done; the message states the limit.
struct LimitsConfig {
  // Elements of one input tensor (batch * rows * dim). 64 Mi = 256 MiB of float32.
  int64_t max_input_elements = int64_t{64} << 20;
  // Matmul flops of one request (2 * batch * N * M * D). 2e12 is ~4 s at fp32 peak.
  int64_t max_flops = 2'000'000'000'000;
  // Bytes of one request's complete result (values + top-k indices).
  int64_t max_output_bytes = int64_t{1} << 30;
  // Requests admitted but not yet started on the compute pool.
  int64_t max_queued_requests = 64;
  // Sum over running requests of input bytes held plus result bytes buffered.
  int64_t max_inflight_bytes = int64_t{2} << 30;
  // One client's share of max_inflight_bytes, so that one client cannot take all of it. A
  // client is its bearer token when tokens are on, else its IP address (behind a proxy all
  // callers share one address: use tokens). 0 = half of max_inflight_bytes; set it equal to
  // max_inflight_bytes to turn the share off.
  int64_t max_inflight_bytes_per_peer = 0;
  // gRPC maximum received message size; ComputeUpload carries bigger inputs in pieces.
  int64_t max_receive_message_bytes = int64_t{64} << 20;
  // gRPC maximum sent message size. A unary Compute whose result is bigger fails with
  // RESOURCE_EXHAUSTED ("use ComputeStream").
  int64_t max_send_message_bytes = int64_t{256} << 20;
  // Chunk payload when ComputeRequest.max_chunk_bytes is 0.
  int64_t default_chunk_bytes = int64_t{1} << 20;
  // Cap on ComputeRequest.max_chunk_bytes (must not exceed max_send_message_bytes).
  int64_t max_chunk_bytes = int64_t{16} << 20;
};

// HTTP/2 and TCP settings of the gRPC port. 0 keeps gRPC's own default. Measured on the
// seed workload before being changed (README, "Performance").
struct TransportConfig {
  // SETTINGS_MAX_FRAME_SIZE the server advertises: the largest DATA frame clients send
  // (16 KiB to 16 MiB; gRPC's default 16 KiB).
  int http2_max_frame_size = 0;
  // Initial per-stream flow-control window (GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES; gRPC
  // starts at 64 KiB and grows it by BDP probing).
  int http2_lookahead_bytes = 0;
  // BDP probing: flow-control windows follow the measured bandwidth-delay product.
  bool http2_bdp_probe = true;
  // Bytes gRPC buffers per stream before a write completes (GRPC_ARG_HTTP2_WRITE_BUFFER_SIZE).
  int http2_write_buffer_bytes = 0;
  // Initial size of socket reads (GRPC_ARG_TCP_READ_CHUNK_SIZE; gRPC adapts it from 8 KiB).
  int tcp_read_chunk_bytes = 0;
  // Largest socket read buffer gRPC allocates (GRPC_ARG_TCP_MAX_READ_CHUNK_SIZE; gRPC's
  // default 4 MiB).
  int tcp_max_read_chunk_bytes = 0;

  // Limits against abusive clients (README, "Security"). Streams one connection may have
  // open at once (SETTINGS_MAX_CONCURRENT_STREAMS; more wait in the client). gRPC's default
  // is unlimited; each stream can hold a call's buffers.
  int max_concurrent_streams = 128;
  // Keepalive enforcement: a client pinging more often than this (without data in flight)
  // earns a strike; after max_ping_strikes the connection is closed with GOAWAY
  // (ENHANCE_YOUR_CALM "too_many_pings"). Clients may ping idle connections at this rate.
  absl::Duration min_client_ping_interval = absl::Seconds(10);
  int max_ping_strikes = 2;
  // The server pings each connection this often and closes it when no answer comes within
  // keepalive_timeout: a peer that vanished (no FIN) stops holding its calls' memory.
  absl::Duration keepalive_time = absl::Seconds(60);
  absl::Duration keepalive_timeout = absl::Seconds(20);
  // Connections with no call for this long are closed (GOAWAY; clients reconnect on demand).
  absl::Duration max_connection_idle = absl::Minutes(5);
  // Largest request metadata (headers) accepted; bigger ones fail the call with
  // RESOURCE_EXHAUSTED. Tokens are at most 4 KiB.
  int max_metadata_bytes = 16 << 10;
};

// Galleries: B operands that live on the server (RegisterGallery, --gallery_dir).
struct GalleryConfig {
  // Directory whose NAME.npy files (float32 or float16, [M, D] or [batch, M, D]) are loaded
  // as DIRECTORY galleries before the server reports SERVING. Empty: none.
  std::string dir;
  // How often `dir` is rescanned: new or changed files are loaded beside the old version and
  // swapped in atomically, removed files remove their gallery.
  absl::Duration rescan_period = absl::Seconds(10);
  // Storage dtype of directory galleries ("float32", "bfloat16", "float16"): half types
  // halve their memory and a query's reads, at 8 (bf16) or 11 (f16) bits of precision.
  std::string dir_storage_dtype = "float32";
  // Cap on the memory all galleries hold together. Registering over it evicts the least
  // recently used uploaded galleries (never directory ones); RESOURCE_EXHAUSTED if that is
  // not enough. Registrations in progress also hold their bytes in max_inflight_bytes.
  int64_t memory_bytes = int64_t{4} << 30;
};

// System shared memory (server/shared_memory.h): same-host clients pass tensors and receive
// results through POSIX shared-memory regions instead of messages. Off by default: a region
// gives the server read-write access to memory the client shares.
struct SharedMemoryConfig {
  bool allow = false;
  // Regions registered at once, over both front ends.
  int max_regions = 256;
};

// Transport security of the gRPC port. All empty: plaintext (the default, for local use).
struct TlsConfig {
  // PEM server certificate chain and private key. Both set: the gRPC port serves TLS only.
  std::string cert_file;
  std::string key_file;
  // PEM CA bundle. Set (with cert and key): mutual TLS; a client without a certificate
  // signed by it is refused at the handshake.
  std::string client_ca_file;
  // How often the files are re-read: replaced certificates are picked up without a restart
  // (gRPC's FileWatcherCertificateProvider); connections made before keep theirs.
  int refresh_seconds = 10;

  bool enabled() const { return !cert_file.empty() || !key_file.empty(); }
};

// Security of the Prometheus /metrics port (server/metrics_exposer.h). All empty: plaintext,
// open (the default; scrapes usually stay inside the cluster).
struct MetricsSecurityConfig {
  // PEM certificate chain and key: /metrics is served over HTTPS only. May be the gRPC
  // port's files. Re-read on every handshake (a renewed certificate needs no restart).
  std::string tls_cert_file;
  std::string tls_key_file;
  // File of `user:password` lines: scrapes need HTTP basic auth. Re-read on every scrape.
  std::string basic_auth_file;

  bool tls_enabled() const { return !tls_cert_file.empty() || !tls_key_file.empty(); }
};

// Bearer-token authentication (server/auth.h). Empty token_file: none (the default).
struct AuthConfig {
  // File with one accepted token per line (`#` comments, blank lines ignored). Set: every
  // call except grpc.health.v1.Health needs `authorization: Bearer <token>`.
  std::string token_file;
  // How often the file is checked for changes (a revoked token stops working within this).
  int refresh_seconds = 5;

  bool enabled() const { return !token_file.empty(); }
};

// Everything the server needs to start. Plain data; copyable.
struct ServerConfig {
  // gRPC listen address, host:port. Port 0 picks a free port (see SimilarityServer::port).
  std::string listen = "0.0.0.0:50051";
  // Extra PLAINTEXT listener serving only grpc.health.v1.Health (same statuses as the main
  // port), for Kubernetes gRPC probes, which cannot speak TLS. Empty: off.
  std::string health_listen;
  // Prometheus /metrics listen address, host:port. Empty disables the exposer.
  std::string metrics_listen = "0.0.0.0:9464";
  MetricsSecurityConfig metrics_security;
  ComputeConfig compute;
  LimitsConfig limits;
  TransportConfig transport;
  GalleryConfig galleries;
  TlsConfig tls;
  AuthConfig auth;
  SharedMemoryConfig shared_memory;
  // How long running calls may continue after SIGTERM/SIGINT before they are cancelled.
  absl::Duration drain_grace = absl::Seconds(20);
  // GRPC_ARG_MAX_CONNECTION_AGE_MS: clients reconnect after this long, which lets a
  // Kubernetes Service rebalance connections. Zero or infinite disables it.
  absl::Duration max_connection_age = absl::InfiniteDuration();
  // Log one line per successful request too (failures are always logged).
  bool log_requests = false;
};

}  // namespace simserve

#endif  // SIMSERVE_SERVER_CONFIG_H_
