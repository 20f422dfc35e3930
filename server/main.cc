// simserve: the gRPC similarity server. Parses flags (and their SIMSERVE_* environment
// equivalents) into one ServerConfig and runs the server until SIGTERM/SIGINT.
#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "server/config.h"
#include "server/server.h"

namespace {
const simserve::ServerConfig kDefaults;
}  // namespace

ABSL_FLAG(std::string, listen, kDefaults.listen,
          "gRPC listen address host:port (port 0 = any free port). Env SIMSERVE_LISTEN.");
ABSL_FLAG(std::string, metrics_listen, kDefaults.metrics_listen,
          "Prometheus /metrics address host:port; empty disables. Env SIMSERVE_METRICS_LISTEN.");
ABSL_FLAG(int, workers, kDefaults.compute.workers,
          "Requests computed concurrently; 0 = 1. workers x threads_per_worker should not "
          "exceed the cores. Env SIMSERVE_WORKERS.");
ABSL_FLAG(int, threads_per_worker, kDefaults.compute.threads_per_worker,
          "OpenMP threads per computation; 0 = usable cores / workers. "
          "Env SIMSERVE_THREADS_PER_WORKER.");
ABSL_FLAG(int, stream_window, kDefaults.compute.stream_window,
          "Tiles a streaming call computes ahead of the network (memory bound per call = "
          "window x chunk). Env SIMSERVE_STREAM_WINDOW.");
ABSL_FLAG(bool, warmup, kDefaults.compute.warmup,
          "Warm the common kernel shapes before reporting SERVING. Env SIMSERVE_WARMUP.");
ABSL_FLAG(int64_t, upload_read_ahead_bytes, kDefaults.compute.upload_read_ahead_bytes,
          "ComputeUpload pauses reading while this many received bytes wait to be copied. "
          "Env SIMSERVE_UPLOAD_READ_AHEAD_BYTES.");
ABSL_FLAG(int, malloc_arena_max, kDefaults.compute.malloc_arena_max,
          "glibc malloc arenas (M_ARENA_MAX; fewer arenas fragment less); 0 = glibc default. "
          "Env SIMSERVE_MALLOC_ARENA_MAX.");
ABSL_FLAG(int64_t, malloc_retain_bytes, kDefaults.compute.malloc_retain_bytes,
          "Freed heap memory kept for reuse (glibc M_TRIM_THRESHOLD; avoids page faults on "
          "every call's receive buffers); 0 = glibc default. Env SIMSERVE_MALLOC_RETAIN_BYTES.");
ABSL_FLAG(int64_t, inline_max_flops, kDefaults.compute.inline_max_flops,
          "Unary calls with at most this many flops (and --inline_max_input_bytes of input) run "
          "on the gRPC thread, skipping the pool hop; 0 disables. Env SIMSERVE_INLINE_MAX_FLOPS.");
ABSL_FLAG(int64_t, inline_max_input_bytes, kDefaults.compute.inline_max_input_bytes,
          "Input bytes limit of inline unary calls. Env SIMSERVE_INLINE_MAX_INPUT_BYTES.");
ABSL_FLAG(int64_t, buffer_cache_bytes, kDefaults.compute.buffer_cache_bytes,
          "Freed input/result buffers kept for reuse (avoids page faults on large calls); "
          "memory on top of max_inflight_bytes. 0 disables. Env SIMSERVE_BUFFER_CACHE_BYTES.");
ABSL_FLAG(int64_t, omp_spin_count, kDefaults.compute.omp_spin_count,
          "GOMP_SPINCOUNT of the compute threads: how long they spin after a parallel region "
          "before sleeping. 0 = sleep at once (passive: no core burnt while a call waits on "
          "the network), -1 = libgomp's default (300000), -2 = auto: 0, or 2000 with "
          "--allow_shared_memory (same-host calls wait on no network). GOMP_SPINCOUNT or "
          "OMP_WAIT_POLICY in the environment win. Env SIMSERVE_OMP_SPIN_COUNT.");
ABSL_FLAG(int64_t, max_input_elements, kDefaults.limits.max_input_elements,
          "Max elements of one input tensor. Env SIMSERVE_MAX_INPUT_ELEMENTS.");
ABSL_FLAG(int64_t, max_flops, kDefaults.limits.max_flops,
          "Max matmul flops (2*batch*N*M*D) of one request. Env SIMSERVE_MAX_FLOPS.");
ABSL_FLAG(int64_t, max_output_bytes, kDefaults.limits.max_output_bytes,
          "Max result bytes of one request. Env SIMSERVE_MAX_OUTPUT_BYTES.");
ABSL_FLAG(int64_t, max_queued_requests, kDefaults.limits.max_queued_requests,
          "Max requests waiting for a compute worker; more get RESOURCE_EXHAUSTED. "
          "Env SIMSERVE_MAX_QUEUED_REQUESTS.");
ABSL_FLAG(int64_t, max_inflight_bytes, kDefaults.limits.max_inflight_bytes,
          "Max bytes (inputs + buffered results) of all running requests. "
          "Env SIMSERVE_MAX_INFLIGHT_BYTES.");
ABSL_FLAG(int64_t, max_receive_message_bytes, kDefaults.limits.max_receive_message_bytes,
          "gRPC max received message size. Env SIMSERVE_MAX_RECEIVE_MESSAGE_BYTES.");
ABSL_FLAG(int64_t, max_send_message_bytes, kDefaults.limits.max_send_message_bytes,
          "gRPC max sent message size; bigger unary results must use ComputeStream. "
          "Env SIMSERVE_MAX_SEND_MESSAGE_BYTES.");
ABSL_FLAG(int64_t, default_chunk_bytes, kDefaults.limits.default_chunk_bytes,
          "Chunk payload when the request's max_chunk_bytes is 0. "
          "Env SIMSERVE_DEFAULT_CHUNK_BYTES.");
ABSL_FLAG(int64_t, max_chunk_bytes, kDefaults.limits.max_chunk_bytes,
          "Cap on the request's max_chunk_bytes. Env SIMSERVE_MAX_CHUNK_BYTES.");
ABSL_FLAG(int, http2_max_frame_size, kDefaults.transport.http2_max_frame_size,
          "HTTP/2 SETTINGS_MAX_FRAME_SIZE advertised to clients (16 KiB..16 MiB); 0 = gRPC "
          "default (16 KiB). Env SIMSERVE_HTTP2_MAX_FRAME_SIZE.");
ABSL_FLAG(int, http2_lookahead_bytes, kDefaults.transport.http2_lookahead_bytes,
          "Initial HTTP/2 stream flow-control window; 0 = gRPC default (grown by BDP probing). "
          "Env SIMSERVE_HTTP2_LOOKAHEAD_BYTES.");
ABSL_FLAG(bool, http2_bdp_probe, kDefaults.transport.http2_bdp_probe,
          "HTTP/2 BDP probing (windows follow the bandwidth-delay product). "
          "Env SIMSERVE_HTTP2_BDP_PROBE.");
ABSL_FLAG(int, http2_write_buffer_bytes, kDefaults.transport.http2_write_buffer_bytes,
          "Bytes gRPC buffers per stream before a write completes; 0 = gRPC default. "
          "Env SIMSERVE_HTTP2_WRITE_BUFFER_BYTES.");
ABSL_FLAG(int, tcp_read_chunk_bytes, kDefaults.transport.tcp_read_chunk_bytes,
          "Initial socket read size; 0 = gRPC default (adaptive from 8 KiB). "
          "Env SIMSERVE_TCP_READ_CHUNK_BYTES.");
ABSL_FLAG(int, tcp_max_read_chunk_bytes, kDefaults.transport.tcp_max_read_chunk_bytes,
          "Largest socket read buffer gRPC allocates; 0 = gRPC default (4 MiB). "
          "Env SIMSERVE_TCP_MAX_READ_CHUNK_BYTES.");
ABSL_FLAG(std::string, metrics_tls_cert_file, kDefaults.metrics_security.tls_cert_file,
          "PEM certificate chain: with --metrics_tls_key_file /metrics is served over HTTPS "
          "only (re-read per handshake). Env SIMSERVE_METRICS_TLS_CERT_FILE.");
ABSL_FLAG(std::string, metrics_tls_key_file, kDefaults.metrics_security.tls_key_file,
          "PEM key of --metrics_tls_cert_file. Env SIMSERVE_METRICS_TLS_KEY_FILE.");
ABSL_FLAG(std::string, metrics_basic_auth_file, kDefaults.metrics_security.basic_auth_file,
          "File of user:password lines: /metrics then needs HTTP basic auth (re-read per "
          "scrape). Env SIMSERVE_METRICS_BASIC_AUTH_FILE.");
ABSL_FLAG(std::string, health_listen, kDefaults.health_listen,
          "Extra plaintext listener (host:port) serving only grpc.health.v1.Health, for "
          "Kubernetes gRPC probes of a TLS server; empty = off. Env SIMSERVE_HEALTH_LISTEN.");
ABSL_FLAG(int64_t, max_inflight_bytes_per_peer, kDefaults.limits.max_inflight_bytes_per_peer,
          "One client's share of --max_inflight_bytes (client = its token, else its IP); "
          "0 = half. Env SIMSERVE_MAX_INFLIGHT_BYTES_PER_PEER.");
ABSL_FLAG(absl::Duration, upload_idle_timeout, kDefaults.compute.upload_idle_timeout,
          "ComputeUpload/RegisterGallery streams waiting this long for data are ended "
          "(DEADLINE_EXCEEDED); inf = off. Env SIMSERVE_UPLOAD_IDLE_TIMEOUT.");
ABSL_FLAG(absl::Duration, memory_release_delay, kDefaults.compute.memory_release_delay,
          "After this long with nothing in flight, cached buffers and retained heap memory go "
          "back to the kernel (RSS drops after a burst); inf = never. "
          "Env SIMSERVE_MEMORY_RELEASE_DELAY.");
ABSL_FLAG(int, max_concurrent_streams, kDefaults.transport.max_concurrent_streams,
          "Streams one connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS)."
          " Env SIMSERVE_MAX_CONCURRENT_STREAMS.");
ABSL_FLAG(absl::Duration, min_client_ping_interval, kDefaults.transport.min_client_ping_interval,
          "Keepalive enforcement: clients pinging more often get strikes, then GOAWAY "
          "(too_many_pings). Env SIMSERVE_MIN_CLIENT_PING_INTERVAL.");
ABSL_FLAG(int, max_ping_strikes, kDefaults.transport.max_ping_strikes,
          "Pings too early tolerated before GOAWAY. Env SIMSERVE_MAX_PING_STRIKES.");
ABSL_FLAG(absl::Duration, keepalive_time, kDefaults.transport.keepalive_time,
          "The server pings each connection this often (dead peers are dropped). "
          "Env SIMSERVE_KEEPALIVE_TIME.");
ABSL_FLAG(absl::Duration, keepalive_timeout, kDefaults.transport.keepalive_timeout,
          "A connection whose ping is not answered within this is closed. "
          "Env SIMSERVE_KEEPALIVE_TIMEOUT.");
ABSL_FLAG(absl::Duration, max_connection_idle, kDefaults.transport.max_connection_idle,
          "Connections without calls for this long are closed with GOAWAY (inf: never). "
          "Env SIMSERVE_MAX_CONNECTION_IDLE.");
ABSL_FLAG(int, max_metadata_bytes, kDefaults.transport.max_metadata_bytes,
          "Largest request metadata accepted. Env SIMSERVE_MAX_METADATA_BYTES.");
ABSL_FLAG(absl::Duration, drain_grace, kDefaults.drain_grace,
          "After SIGTERM/SIGINT, how long running calls may finish before they are "
          "cancelled (e.g. 20s). Env SIMSERVE_DRAIN_GRACE.");
ABSL_FLAG(absl::Duration, max_connection_age, kDefaults.max_connection_age,
          "GRPC_ARG_MAX_CONNECTION_AGE: clients reconnect after this long so a Kubernetes "
          "Service rebalances (e.g. 5m; inf disables). Env SIMSERVE_MAX_CONNECTION_AGE.");
ABSL_FLAG(std::string, gallery_dir, kDefaults.galleries.dir,
          "Directory whose NAME.npy files (float32/float16, [M,D] or [batch,M,D]) are served "
          "as galleries, loaded before SERVING and rescanned; empty = none. "
          "Env SIMSERVE_GALLERY_DIR.");
ABSL_FLAG(int64_t, gallery_rescan_seconds, absl::ToInt64Seconds(kDefaults.galleries.rescan_period),
          "How often --gallery_dir is rescanned (new/changed files swapped in, removed ones "
          "removed). Env SIMSERVE_GALLERY_RESCAN_SECONDS.");
ABSL_FLAG(std::string, gallery_dir_storage_dtype, kDefaults.galleries.dir_storage_dtype,
          "Storage dtype of directory galleries: float32, bfloat16 or float16 (half the memory "
          "and reads). Env SIMSERVE_GALLERY_DIR_STORAGE_DTYPE.");
ABSL_FLAG(int64_t, gallery_memory_bytes, kDefaults.galleries.memory_bytes,
          "Cap on the memory of all galleries; registering over it evicts least recently used "
          "uploaded galleries. Env SIMSERVE_GALLERY_MEMORY_BYTES.");
ABSL_FLAG(std::string, tls_cert_file, kDefaults.tls.cert_file,
          "PEM server certificate chain: with --tls_key_file the gRPC port serves TLS only. "
          "Env SIMSERVE_TLS_CERT_FILE.");
ABSL_FLAG(std::string, tls_key_file, kDefaults.tls.key_file,
          "PEM private key of --tls_cert_file. Env SIMSERVE_TLS_KEY_FILE.");
ABSL_FLAG(std::string, tls_client_ca_file, kDefaults.tls.client_ca_file,
          "PEM CA bundle: mutual TLS, clients must present a certificate it signed. "
          "Env SIMSERVE_TLS_CLIENT_CA_FILE.");
ABSL_FLAG(int, tls_refresh_seconds, kDefaults.tls.refresh_seconds,
          "How often the TLS files are re-read (rotation without a restart). "
          "Env SIMSERVE_TLS_REFRESH_SECONDS.");
ABSL_FLAG(std::string, auth_token_file, kDefaults.auth.token_file,
          "File of accepted bearer tokens, one per line (# comments): every call except "
          "grpc.health.v1.Health then needs 'authorization: Bearer <token>'. Re-read when it "
          "changes. Env SIMSERVE_AUTH_TOKEN_FILE.");
ABSL_FLAG(int, auth_refresh_seconds, kDefaults.auth.refresh_seconds,
          "How often --auth_token_file is checked for changes. "
          "Env SIMSERVE_AUTH_REFRESH_SECONDS.");
ABSL_FLAG(bool, allow_shared_memory, kDefaults.shared_memory.allow,
          "Let same-host clients pass tensors and receive results through POSIX shared-memory "
          "regions (Triton's system shared-memory extension, both front ends). Off by default: "
          "a region gives the server read-write access to the client's memory. "
          "Env SIMSERVE_ALLOW_SHARED_MEMORY.");
ABSL_FLAG(int, max_shared_memory_regions, kDefaults.shared_memory.max_regions,
          "Shared-memory regions registered at once. Env SIMSERVE_MAX_SHARED_MEMORY_REGIONS.");
ABSL_FLAG(bool, log_requests, kDefaults.log_requests,
          "Log one line per successful request too (failures are always logged). "
          "Env SIMSERVE_LOG_REQUESTS.");

namespace {

// The one place environment variables are read: SIMSERVE_<FLAG> sets the flag's value
// before the command line is parsed, so a flag given on the command line wins.
bool ApplyEnvironment() {
  static constexpr const char* kNames[] = {"listen",
                                           "metrics_listen",
                                           "workers",
                                           "threads_per_worker",
                                           "stream_window",
                                           "warmup",
                                           "upload_read_ahead_bytes",
                                           "omp_spin_count",
                                           "buffer_cache_bytes",
                                           "malloc_retain_bytes",
                                           "malloc_arena_max",
                                           "inline_max_flops",
                                           "inline_max_input_bytes",
                                           "max_input_elements",
                                           "max_flops",
                                           "max_output_bytes",
                                           "max_queued_requests",
                                           "max_inflight_bytes",
                                           "max_receive_message_bytes",
                                           "max_send_message_bytes",
                                           "default_chunk_bytes",
                                           "max_chunk_bytes",
                                           "http2_max_frame_size",
                                           "http2_lookahead_bytes",
                                           "http2_bdp_probe",
                                           "http2_write_buffer_bytes",
                                           "tcp_read_chunk_bytes",
                                           "tcp_max_read_chunk_bytes",
                                           "health_listen",
                                           "metrics_tls_cert_file",
                                           "metrics_tls_key_file",
                                           "metrics_basic_auth_file",
                                           "max_inflight_bytes_per_peer",
                                           "upload_idle_timeout",
                                           "memory_release_delay",
                                           "max_concurrent_streams",
                                           "min_client_ping_interval",
                                           "max_ping_strikes",
                                           "keepalive_time",
                                           "keepalive_timeout",
                                           "max_connection_idle",
                                           "max_metadata_bytes",
                                           "drain_grace",
                                           "max_connection_age",
                                           "gallery_dir",
                                           "gallery_rescan_seconds",
                                           "gallery_dir_storage_dtype",
                                           "gallery_memory_bytes",
                                           "tls_cert_file",
                                           "tls_key_file",
                                           "tls_client_ca_file",
                                           "tls_refresh_seconds",
                                           "auth_token_file",
                                           "auth_refresh_seconds",
                                           "allow_shared_memory",
                                           "max_shared_memory_regions",
                                           "log_requests"};
  bool ok = true;
  for (const char* name : kNames) {
    const std::string variable = absl::StrCat("SIMSERVE_", absl::AsciiStrToUpper(name));
    const char* value = std::getenv(variable.c_str());
    if (value == nullptr) continue;
    absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    std::string error;
    if (flag == nullptr || !flag->ParseFrom(value, &error)) {
      std::cerr << "simserve: invalid " << variable << "=" << value << ": " << error << "\n";
      ok = false;
    }
  }
  return ok;
}

simserve::ServerConfig ConfigFromFlags() {
  simserve::ServerConfig c;
  c.listen = absl::GetFlag(FLAGS_listen);
  c.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  c.health_listen = absl::GetFlag(FLAGS_health_listen);
  c.metrics_security.tls_cert_file = absl::GetFlag(FLAGS_metrics_tls_cert_file);
  c.metrics_security.tls_key_file = absl::GetFlag(FLAGS_metrics_tls_key_file);
  c.metrics_security.basic_auth_file = absl::GetFlag(FLAGS_metrics_basic_auth_file);
  c.compute.workers = absl::GetFlag(FLAGS_workers);
  c.compute.threads_per_worker = absl::GetFlag(FLAGS_threads_per_worker);
  c.compute.stream_window = absl::GetFlag(FLAGS_stream_window);
  c.compute.warmup = absl::GetFlag(FLAGS_warmup);
  c.compute.upload_read_ahead_bytes = absl::GetFlag(FLAGS_upload_read_ahead_bytes);
  c.compute.omp_spin_count = absl::GetFlag(FLAGS_omp_spin_count);
  c.compute.buffer_cache_bytes = absl::GetFlag(FLAGS_buffer_cache_bytes);
  c.compute.malloc_retain_bytes = absl::GetFlag(FLAGS_malloc_retain_bytes);
  c.compute.malloc_arena_max = absl::GetFlag(FLAGS_malloc_arena_max);
  c.compute.inline_max_flops = absl::GetFlag(FLAGS_inline_max_flops);
  c.compute.inline_max_input_bytes = absl::GetFlag(FLAGS_inline_max_input_bytes);
  c.limits.max_input_elements = absl::GetFlag(FLAGS_max_input_elements);
  c.limits.max_flops = absl::GetFlag(FLAGS_max_flops);
  c.limits.max_output_bytes = absl::GetFlag(FLAGS_max_output_bytes);
  c.limits.max_queued_requests = absl::GetFlag(FLAGS_max_queued_requests);
  c.limits.max_inflight_bytes = absl::GetFlag(FLAGS_max_inflight_bytes);
  c.limits.max_inflight_bytes_per_peer = absl::GetFlag(FLAGS_max_inflight_bytes_per_peer);
  c.compute.upload_idle_timeout = absl::GetFlag(FLAGS_upload_idle_timeout);
  c.compute.memory_release_delay = absl::GetFlag(FLAGS_memory_release_delay);
  c.limits.max_receive_message_bytes = absl::GetFlag(FLAGS_max_receive_message_bytes);
  c.limits.max_send_message_bytes = absl::GetFlag(FLAGS_max_send_message_bytes);
  c.limits.default_chunk_bytes = absl::GetFlag(FLAGS_default_chunk_bytes);
  c.limits.max_chunk_bytes = absl::GetFlag(FLAGS_max_chunk_bytes);
  c.transport.http2_max_frame_size = absl::GetFlag(FLAGS_http2_max_frame_size);
  c.transport.http2_lookahead_bytes = absl::GetFlag(FLAGS_http2_lookahead_bytes);
  c.transport.http2_bdp_probe = absl::GetFlag(FLAGS_http2_bdp_probe);
  c.transport.http2_write_buffer_bytes = absl::GetFlag(FLAGS_http2_write_buffer_bytes);
  c.transport.tcp_read_chunk_bytes = absl::GetFlag(FLAGS_tcp_read_chunk_bytes);
  c.transport.tcp_max_read_chunk_bytes = absl::GetFlag(FLAGS_tcp_max_read_chunk_bytes);
  c.transport.max_concurrent_streams = absl::GetFlag(FLAGS_max_concurrent_streams);
  c.transport.min_client_ping_interval = absl::GetFlag(FLAGS_min_client_ping_interval);
  c.transport.max_ping_strikes = absl::GetFlag(FLAGS_max_ping_strikes);
  c.transport.keepalive_time = absl::GetFlag(FLAGS_keepalive_time);
  c.transport.keepalive_timeout = absl::GetFlag(FLAGS_keepalive_timeout);
  c.transport.max_connection_idle = absl::GetFlag(FLAGS_max_connection_idle);
  c.transport.max_metadata_bytes = absl::GetFlag(FLAGS_max_metadata_bytes);
  c.drain_grace = absl::GetFlag(FLAGS_drain_grace);
  c.max_connection_age = absl::GetFlag(FLAGS_max_connection_age);
  c.galleries.dir = absl::GetFlag(FLAGS_gallery_dir);
  c.galleries.rescan_period = absl::Seconds(absl::GetFlag(FLAGS_gallery_rescan_seconds));
  c.galleries.dir_storage_dtype = absl::GetFlag(FLAGS_gallery_dir_storage_dtype);
  c.galleries.memory_bytes = absl::GetFlag(FLAGS_gallery_memory_bytes);
  c.tls.cert_file = absl::GetFlag(FLAGS_tls_cert_file);
  c.tls.key_file = absl::GetFlag(FLAGS_tls_key_file);
  c.tls.client_ca_file = absl::GetFlag(FLAGS_tls_client_ca_file);
  c.tls.refresh_seconds = absl::GetFlag(FLAGS_tls_refresh_seconds);
  c.auth.token_file = absl::GetFlag(FLAGS_auth_token_file);
  c.auth.refresh_seconds = absl::GetFlag(FLAGS_auth_refresh_seconds);
  c.shared_memory.allow = absl::GetFlag(FLAGS_allow_shared_memory);
  c.shared_memory.max_regions = absl::GetFlag(FLAGS_max_shared_memory_regions);
  c.log_requests = absl::GetFlag(FLAGS_log_requests);
  return c;
}

// libgomp reads its wait policy once, when the library is loaded (before main), so the
// configured spin count is applied by re-executing this binary once with GOMP_SPINCOUNT set.
// The variables then present stop a second re-exec; set by the operator, they win. Returns
// the policy in force, for the startup line.
std::string ApplyOpenMpWaitPolicy(simserve::ServerConfig* config, char** argv) {
  const char* spin = std::getenv("GOMP_SPINCOUNT");
  const char* policy = std::getenv("OMP_WAIT_POLICY");
  if (spin != nullptr || policy != nullptr) {
    return absl::StrCat("GOMP_SPINCOUNT=", spin != nullptr ? spin : "(unset)",
                        " OMP_WAIT_POLICY=", policy != nullptr ? policy : "(unset)");
  }
  int64_t count = config->compute.omp_spin_count;
  if (count == simserve::ComputeConfig::kAutoOmpSpinCount) {
    count = config->shared_memory.allow ? simserve::ComputeConfig::kSharedMemoryOmpSpinCount : 0;
  }
  if (count < 0) return "libgomp default (active spin)";
  setenv("GOMP_SPINCOUNT", absl::StrCat(count).c_str(), 1);
  if (count == 0) setenv("OMP_WAIT_POLICY", "passive", 1);
  // Exec the binary by its real path, so the process keeps its name ("simserve" in ps, top
  // and /proc/PID/comm, as a container's init); /proc/self/exe only if that cannot be read.
  std::string self(4096, '\0');
  const ssize_t length = readlink("/proc/self/exe", self.data(), self.size() - 1);
  self.resize(length > 0 ? static_cast<size_t>(length) : 0);
  execv(self.empty() ? "/proc/self/exe" : self.c_str(), argv);
  return absl::StrCat("libgomp default: re-exec to apply GOMP_SPINCOUNT=", count,
                      " failed: ", std::strerror(errno));
}

// glibc returns freed memory above M_TRIM_THRESHOLD to the kernel and maps blocks above
// M_MMAP_THRESHOLD separately, so large buffers that are freed after every call (gRPC's
// socket reads) page-fault again on the next one. Keeps up to `retain_bytes` for reuse.
void RetainFreedMemory(int64_t retain_bytes) {
  if (retain_bytes <= 0) return;
  constexpr int64_t kMaxMmapThreshold = int64_t{32} << 20;  // glibc's cap on 64-bit
  mallopt(M_MMAP_THRESHOLD, static_cast<int>(std::min(retain_bytes, kMaxMmapThreshold)));
  mallopt(M_TRIM_THRESHOLD, static_cast<int>(std::min<int64_t>(retain_bytes, INT_MAX)));
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "simserve: batched pairwise similarity (cosine, dot, euclidean) over gRPC.\n"
      "Every flag can also be set with the environment variable SIMSERVE_<FLAG> "
      "(flag beats environment beats default).\nUsage: simserve [flags]");
  // --help lists the flags of this file (absl's default only matches files named after
  // the program).
  absl::FlagsUsageConfig usage;
  usage.contains_help_flags = [](absl::string_view path) {
    return absl::EndsWith(path, "server/main.cc");
  };
  usage.contains_helpshort_flags = usage.contains_help_flags;
  absl::SetFlagsUsageConfig(usage);
  if (!ApplyEnvironment()) return 2;
  absl::ParseCommandLine(argc, argv);
  simserve::ServerConfig config = ConfigFromFlags();
  config.compute.omp_wait_policy = ApplyOpenMpWaitPolicy(&config, argv);
  RetainFreedMemory(config.compute.malloc_retain_bytes);
  if (config.compute.malloc_arena_max > 0) mallopt(M_ARENA_MAX, config.compute.malloc_arena_max);
  const absl::Status status = simserve::RunServer(config);
  if (!status.ok()) {
    std::cerr << "simserve: " << status << "\n";
    return 1;
  }
  return 0;
}
