// simserve::Client — the C++ client library of the simserve.v1.Similarity service: unary,
// streamed and full-duplex upload calls that write the result straight into one buffer
// (the caller's, or one they allocate), an automatic mode that picks the RPC by size,
// top-k, deadlines and server timings; galleries (a B kept on the server, queried by name).
// Public gRPC API only (grpc::GenericStub).
#ifndef SIMSERVE_CLIENT_CLIENT_H_
#define SIMSERVE_CLIENT_CLIENT_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "client/dtype.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/security/credentials.h"
#include "simserve/v1/similarity.grpc.pb.h"

namespace simserve {

// Which RPC carries a request.
enum class CallMode {
  kAuto,    // pick by size, see ClientOptions
  kUnary,   // Compute: one request, one response message
  kStream,  // ComputeStream: one request message, result in row tiles
  kUpload,  // ComputeUpload: header, B and A in pieces, result tiles while A uploads
};

// Lower-case name of `mode` ("auto", "unary", "stream", "upload").
const char* Name(CallMode mode);

// OK if `token` can travel as `authorization: Bearer <token>` metadata: printable ASCII
// without whitespace (empty = no token). INVALID_ARGUMENT says what is wrong and where, never
// the token itself. Connect() checks ClientOptions::bearer_token with it.
absl::Status CheckBearerToken(std::string_view token);

// Connection-wide settings. Defaults suit a server on the same host or LAN.
struct ClientOptions {
  // Channel credentials; nullptr means insecure (plaintext) — the server speaks plaintext.
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  // Bearer token for a server with --auth_token_file: every call (GetInfo, Compute*, the
  // gallery calls) sends the metadata `authorization: Bearer <bearer_token>`, over TLS or
  // plaintext (where it travels in clear). Empty (the default): no token. Connect() refuses
  // a malformed one (CheckBearerToken). A wrong or missing token is the server's
  // UNAUTHENTICATED, with its message.
  std::string bearer_token;
  // Deadline of every call that does not give its own timeout.
  absl::Duration default_timeout = absl::Seconds(60);
  // Connect() waits this long for the channel to become ready and fails with UNAVAILABLE
  // otherwise; zero connects lazily on the first call.
  absl::Duration connect_timeout = absl::Seconds(5);
  // Channel max receive/send message sizes (bytes); -1 is unlimited. Large by default so the
  // client never is the limit: the server's own limits (GetInfo) decide.
  int max_receive_message_bytes = -1;
  int max_send_message_bytes = -1;
  // ComputeUpload sends A and B in pieces of this many bytes (~1 MiB is the sweet spot).
  int64_t upload_piece_bytes = int64_t{1} << 20;
  // kAuto: requests whose inputs + result are at most this many bytes use unary Compute
  // (one round trip, lowest latency for small requests).
  int64_t auto_unary_max_bytes = int64_t{1} << 20;
  // kAuto: inputs (A + B bytes) of at least this size use ComputeUpload, which overlaps
  // sending A with computing and receiving the result. Inputs that do not fit the server's
  // max receive message size always use ComputeUpload.
  int64_t auto_upload_min_input_bytes = int64_t{8} << 20;
};

// A borrowed input tensor: shape [batch, rows, dim] or [rows, dim] and C-order little-endian
// elements of `dtype` (FLOAT32, BFLOAT16 or FLOAT16). The data must outlive the call.
struct TensorRef {
  std::vector<int64_t> shape;
  v1::DataType dtype = v1::FLOAT32;
  std::span<const std::byte> data;

  // A float32 tensor over `values`.
  static TensorRef Float32(std::vector<int64_t> shape, std::span<const float> values);
};

// What to compute (mirrors ComputeRequest's options; see similarity.proto).
struct ComputeOptions {
  v1::Metric metric = v1::COSINE;
  v1::DataType output_dtype = v1::FLOAT32;
  v1::Precision precision = v1::FP32;
  // 0: dense result. k > 0: per row the k best values and their int32 column indices.
  uint32_t top_k = 0;
  // Cosine only: 0 = sklearn semantics, > 0 = Keras clamp sqrt(max(sum_sq, epsilon)).
  float epsilon = 0.0F;
  // Streaming calls: max bytes per result chunk; 0 = server default (1 MiB).
  uint32_t max_chunk_bytes = 0;
  // Name of a gallery on the server (Client::RegisterGallery, or a NAME.npy in the server's
  // --gallery_dir) that plays B instead of sending it; `b` must then be empty (TensorRef{}),
  // else INVALID_ARGUMENT before anything is sent. A 2D gallery [M, D] is compared with every
  // batch entry of A, a 3D one [batch, M, D] must match A's batch. Unknown name: NOT_FOUND.
  // Empty (the default): B is the `b` argument.
  std::string gallery;
  // With `gallery`: 0 = the version that is current when the call starts; any other value
  // must be the current version, else FAILED_PRECONDITION (pin what you registered, e.g.
  // GalleryInfo::version from RegisterGallery).
  int64_t gallery_version = 0;
  // Deadline of this call; nullopt = ClientOptions::default_timeout.
  std::optional<absl::Duration> timeout;
};

// How RegisterGallery stores a gallery (mirrors GalleryHeader; see similarity.proto).
struct GalleryOptions {
  // Element type of the prepared gallery on the server: FLOAT32 (exact, the default);
  // BFLOAT16 / FLOAT16 halve its memory and the bytes every query reads.
  v1::DataType storage_dtype = v1::FLOAT32;
  // Deadline of the call; nullopt = ClientOptions::default_timeout.
  std::optional<absl::Duration> timeout;
};

// The shape, element type and byte size of the result of a request: the one definition of
// the client's output-size arithmetic (checked against client/testdata/output_sizes.json,
// which the Python client's tests check too).
struct OutputSpec {
  // [batch, N, M] dense, [batch, N, k] top-k; 2D inputs give [N, M] / [N, k].
  std::vector<int64_t> shape;
  v1::DataType dtype = v1::FLOAT32;
  int64_t elements = 0;       // prod(shape)
  int64_t values_bytes = 0;   // elements * ElementBytes(dtype)
  int64_t indices_bytes = 0;  // top-k: elements * 4; dense: 0

  int64_t total_bytes() const { return values_bytes + indices_bytes; }
};

// Bytes per element of `dtype`: 4 for FLOAT32, 2 for BFLOAT16 and FLOAT16.
int64_t ElementBytes(v1::DataType dtype);

// The result `a` x `b` with `options` will have (options.output_dtype, options.top_k).
// Only what sizing needs is checked: INVALID_ARGUMENT unless both shapes have rank 2 or
// both rank 3 with no negative dimension; RESOURCE_EXHAUSTED if the sizes overflow int64.
// Everything else (batch or D mismatch, top_k > M, zero dimensions, ...) is the server's
// to reject, with its own message.
// With options.gallery set, `b_shape` is the gallery's shape (GalleryInfo::shape): a 2D
// gallery [M, D] is allowed with a 3D A (result [batch, N, M]); the result's rank is A's.
absl::StatusOr<OutputSpec> OutputSize(std::span<const int64_t> a_shape,
                                      std::span<const int64_t> b_shape,
                                      const ComputeOptions& options);

// Where a call writes its result: caller-owned memory that the received messages are
// copied into directly (one copy per byte, no intermediate buffer). The sizes must match
// OutputSize() exactly, else the call fails with INVALID_ARGUMENT before anything is sent:
// `values` = values_bytes (C-order little-endian elements of options.output_dtype);
// `indices` = `elements` int32 column indices for top-k, empty for a dense result.
// The memory must stay valid for the call; after a failed call its contents are undefined.
struct OutputRef {
  std::span<std::byte> values;
  std::span<int32_t> indices;
};

// Server-side timings from the trailing metadata (simserve-queue-ms, simserve-compute-ms,
// simserve-total-ms), in milliseconds; nullopt when the server did not send one.
struct ServerTimings {
  std::optional<double> queue_ms;
  std::optional<double> compute_ms;
  std::optional<double> total_ms;
};

// What a call reports besides the result data.
struct CallInfo {
  // [batch, N, M] dense, [batch, N, k] top-k; 2D inputs give [N, M] / [N, k].
  std::vector<int64_t> shape;
  // Element type of the values.
  v1::DataType dtype = v1::FLOAT32;
  ServerTimings server;
  // Client wall time of the call, from before the request is built to the last byte placed.
  double client_wall_ms = 0.0;
  // The RPC that carried the call (never kAuto).
  CallMode mode = CallMode::kUnary;
  // Number of result messages received (1 for unary).
  int64_t chunks = 0;
};

// The result of one computation, in buffers the client allocated.
struct Result : CallInfo {
  // C-order little-endian values of `dtype` (prod(shape) elements).
  ByteVector values;
  // Top-k only: int32 column indices, same shape as the values; empty for dense results.
  std::vector<int32_t> indices;

  // prod(shape).
  int64_t element_count() const;
  // The values converted to float32 (bfloat16 / float16 are widened exactly).
  std::vector<float> ValuesAsFloat() const;
};

// A connection to one simserve server. Thread-safe: any number of threads may issue calls
// at once (they share one HTTP/2 connection).
class Client {
 public:
  // Creates a channel to `target` ("host:port", any gRPC target URI). Waits for readiness
  // up to options.connect_timeout: UNAVAILABLE if the server cannot be reached in time,
  // INVALID_ARGUMENT for an empty target or nonsensical options.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(const std::string& target,
                                                         const ClientOptions& options = {});
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // The server's version, ISA, limits and capabilities. Errors carry the gRPC code/message.
  absl::StatusOr<v1::GetInfoResponse> GetInfo(std::optional<absl::Duration> timeout = {});

  // Every call comes in two forms: one returns a Result in buffers it allocates, the other
  // writes into the caller's OutputRef (sizes: see OutputRef) and returns the CallInfo.
  // Both send the tensors without copying them and copy every received byte exactly
  // once, straight into place. Errors: the server's status (INVALID_ARGUMENT for bad
  // input, RESOURCE_EXHAUSTED over a limit, DEADLINE_EXCEEDED, ...); INVALID_ARGUMENT
  // from OutputSize() or for a wrongly sized OutputRef; INTERNAL for a malformed result
  // (shape or dtype not the requested one, wrong sizes, gaps or overlaps of tiles).
  //
  // With options.gallery, pass an empty `b` (TensorRef{}): the server's gallery plays B and
  // only A is sent. The Result form learns M from the first result message. The OutputRef
  // form must be sized with OutputSize(a.shape, <the gallery's GalleryInfo::shape>,
  // options); for a dense result it is checked when the result's shape arrives, and a result
  // that does not fit it (the gallery was replaced by one of another M; pin gallery_version
  // to rule that out) cancels the call with FAILED_PRECONDITION.

  // Unary Compute: the whole result in one response message, decoded from the received
  // slices. RESOURCE_EXHAUSTED when the result exceeds one message (use ComputeStream).
  absl::StatusOr<Result> Compute(const TensorRef& a, const TensorRef& b,
                                 const ComputeOptions& options = {});
  absl::StatusOr<CallInfo> Compute(const TensorRef& a, const TensorRef& b,
                                   const ComputeOptions& options, OutputRef out);

  // ComputeStream: the result arrives in row tiles, each written into place as it arrives.
  absl::StatusOr<Result> ComputeStream(const TensorRef& a, const TensorRef& b,
                                       const ComputeOptions& options = {});
  absl::StatusOr<CallInfo> ComputeStream(const TensorRef& a, const TensorRef& b,
                                         const ComputeOptions& options, OutputRef out);

  // ComputeUpload: sends the header, then B, then A in pieces of
  // ClientOptions::upload_piece_bytes (clamped to the server's receive limit) while result
  // tiles are placed as they arrive (full duplex). No input size limit beyond the server's.
  absl::StatusOr<Result> ComputeUpload(const TensorRef& a, const TensorRef& b,
                                       const ComputeOptions& options = {});
  absl::StatusOr<CallInfo> ComputeUpload(const TensorRef& a, const TensorRef& b,
                                         const ComputeOptions& options, OutputRef out);

  // Picks the RPC with ChooseMode (kAuto; the server's limits come from one cached GetInfo
  // call) or uses `mode` as given, then calls it. A dense gallery call sizes its result from
  // the gallery's shape as this client last saw it (RegisterGallery, GetGallery,
  // ListGalleries or a previous call's result; one GetGallery on the first use of a name);
  // a stale shape only affects the choice, never the result.
  absl::StatusOr<Result> Similarity(const TensorRef& a, const TensorRef& b,
                                    const ComputeOptions& options = {},
                                    CallMode mode = CallMode::kAuto);
  absl::StatusOr<CallInfo> Similarity(const TensorRef& a, const TensorRef& b,
                                      const ComputeOptions& options, OutputRef out,
                                      CallMode mode = CallMode::kAuto);

  // Galleries: a B that lives on the server (per pod for uploaded galleries; see
  // deploy/README.md). Errors carry the server's gRPC code and message.

  // Uploads `gallery` ([M, D] or [batch, M, D], elements of gallery.dtype) as `name`
  // ([A-Za-z0-9._-]{1,128}): the header, then the bytes in pieces of
  // ClientOptions::upload_piece_bytes clamped to the server's receive limit (as
  // ComputeUpload), referenced, not copied. Registering an existing name replaces it and bumps
  // its version. Returns what the server holds now. INVALID_ARGUMENT for a bad name, shape,
  // byte count or NaN/Inf; RESOURCE_EXHAUSTED over the server's gallery memory budget (after
  // it evicted what it could); FAILED_PRECONDITION for the name of a --gallery_dir gallery.
  absl::StatusOr<v1::GalleryInfo> RegisterGallery(const std::string& name, const TensorRef& gallery,
                                                  const GalleryOptions& options = {});
  // One gallery (NOT_FOUND for an unknown name), all of them sorted by name, and removing an
  // uploaded one (returns what was removed; NOT_FOUND, or FAILED_PRECONDITION for a gallery
  // loaded from the server's --gallery_dir: remove its file instead).
  absl::StatusOr<v1::GalleryInfo> GetGallery(const std::string& name,
                                             std::optional<absl::Duration> timeout = {});
  absl::StatusOr<std::vector<v1::GalleryInfo>> ListGalleries(
      std::optional<absl::Duration> timeout = {});
  absl::StatusOr<v1::GalleryInfo> DeleteGallery(const std::string& name,
                                                std::optional<absl::Duration> timeout = {});

  // The rule kAuto applies, exposed for tests and tools. `input_bytes` = A + B payload,
  // `output_bytes` = OutputSpec::total_bytes(), `limits` = the server's (GetInfo; a limit
  // of 0 means gRPC's default 4 MiB, negative means unlimited), with
  // overhead = MessageOverheadBytes(limits):
  // 1. inputs + overhead exceed max_receive_message_bytes -> kUpload;
  // 2. inputs + output <= auto_unary_max_bytes and output + overhead fits
  //    max_send_message_bytes -> kUnary;
  // 3. inputs >= auto_upload_min_input_bytes -> kUpload;  4. otherwise kStream.
  static CallMode ChooseMode(int64_t input_bytes, int64_t output_bytes, const v1::Limits& limits,
                             const ClientOptions& options);

  // The framing slack of one message: the server's Limits.message_overhead_bytes, or 4096
  // when it reports 0 (an older server).
  static int64_t MessageOverheadBytes(const v1::Limits& limits);

  // ComputeUpload's piece size: `wanted`, clamped to max_receive_message_bytes minus the
  // overhead when the server reports a positive receive limit larger than the overhead.
  static int64_t UploadPieceBytes(int64_t wanted, const v1::Limits& limits);

  // The channel, e.g. for health checks or reflection.
  std::shared_ptr<grpc::Channel> channel() const { return channel_; }

 private:
  // Restricts construction to Connect() while still allowing std::make_unique.
  struct PassKey {
    explicit PassKey() = default;
  };

 public:
  // Use Connect().
  Client(PassKey key, std::shared_ptr<grpc::Channel> channel, const ClientOptions& options);

 private:
  // Checks and places the result messages of one call (client.cc).
  class ResultWriter;

  // Sets up the context of every call: its deadline and the bearer token, if any.
  void PrepareContext(grpc::ClientContext& context, absl::Duration timeout) const;
  absl::StatusOr<v1::Limits> CachedLimits(absl::Duration timeout);
  // The rows M of gallery `name` as this client last saw them (one GetGallery on a miss):
  // kAuto's estimate of a dense gallery call's result size.
  absl::StatusOr<int64_t> GalleryRows(const std::string& name, absl::Duration timeout);
  void RememberGalleryRows(const std::string& name, int64_t rows);
  // The calls behind both forms of Compute / ComputeStream / ComputeUpload, after the
  // expected result was worked out and the destination checked (Run).
  absl::StatusOr<CallInfo> Unary(const TensorRef& a, const TensorRef& b,
                                 const ComputeOptions& options, ResultWriter& writer);
  absl::StatusOr<CallInfo> Streamed(CallMode mode, const TensorRef& a, const TensorRef& b,
                                    const ComputeOptions& options, ResultWriter& writer);
  // Runs `mode` (never kAuto) with the result going to `out`, or with `result` set into
  // buffers allocated in *result once the result's shape is known.
  absl::StatusOr<CallInfo> Run(CallMode mode, const TensorRef& a, const TensorRef& b,
                               const ComputeOptions& options, OutputRef out, Result* result);
  // Similarity's choice of the RPC for kAuto, then Run.
  absl::StatusOr<CallInfo> Choose(const TensorRef& a, const TensorRef& b,
                                  const ComputeOptions& options, OutputRef out, Result* result,
                                  CallMode mode);

  ClientOptions options_;
  // "Bearer <token>", empty without a token.
  std::string authorization_;
  std::shared_ptr<grpc::Channel> channel_;
  // GetInfo and the unary gallery calls (small protobuf messages).
  std::unique_ptr<v1::Similarity::Stub> stub_;
  // Compute calls go through grpc::ByteBuffer: zero-copy requests, direct placement.
  grpc::GenericStub generic_stub_;
  absl::Mutex mu_;
  std::optional<v1::Limits> limits_ ABSL_GUARDED_BY(mu_);
  // Gallery name -> its rows M as last seen (see GalleryRows).
  std::map<std::string, int64_t, std::less<>> gallery_rows_ ABSL_GUARDED_BY(mu_);
};

}  // namespace simserve

#endif  // SIMSERVE_CLIENT_CLIENT_H_
