// The one validation and conversion module of the server: turns a ComputeRequest (or the
// header of a ComputeUpload) into kernel types, checks every rule of the API contract and
// the admission limits, and views tensor bytes without copying. Shared by all compute RPCs.
#ifndef SIMSERVE_SERVER_CONVERT_H_
#define SIMSERVE_SERVER_CONVERT_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/similarity.h"
#include "server/config.h"
#include "server/gallery_store.h"
#include "server/reject_reason.h"
#include "simserve/v1/similarity.pb.h"

namespace simserve {

// Bytes of a gRPC message taken by everything but tensor payloads (tags, lengths, shapes,
// options): a payload fits a message limit if payload + this <= limit. Reported to clients
// as Limits.message_overhead_bytes, so they apply the same rule.
inline constexpr int64_t kMessageOverheadBytes = 4096;

// Which RPC a request arrived on; decides the data and size rules.
enum class RequestKind {
  kUnary,   // Compute: tensors carry data; the whole result must fit one message.
  kStream,  // ComputeStream: tensors carry data; the result goes out in tiles.
  kUpload,  // ComputeUpload header: tensors carry shape and dtype only, no data.
};

// A validated problem: sizes, options and the derived costs. All byte counts are exact.
struct ProblemSpec {
  kernels::Shape shape;
  kernels::Options options;
  kernels::DataType a_dtype = kernels::DataType::kFloat32;
  kernels::DataType b_dtype = kernels::DataType::kFloat32;
  // True when both inputs were 2D (or a was 2D, with a gallery): the output shape then has
  // no batch dimension.
  bool two_d = false;
  // B is a gallery (ComputeRequest.gallery): nothing of B is received (b_bytes = 0).
  bool from_gallery = false;
  int64_t a_bytes = 0;          // batch * n * d * sizeof(a_dtype)
  int64_t b_bytes = 0;          // batch * m * d * sizeof(b_dtype)
  int64_t output_cols = 0;      // m for dense results, top_k for top-k
  int64_t value_row_bytes = 0;  // output_cols * sizeof(output_dtype)
  int64_t index_row_bytes = 0;  // top_k * 4, or 0 for dense results
  int64_t output_bytes = 0;     // batch * n * (value_row_bytes + index_row_bytes)
  int64_t flops = 0;            // 2 * batch * n * m * d
  int64_t chunk_bytes = 0;      // effective payload bound of one streamed chunk
  int64_t tile_rows = 0;        // rows of A per streamed tile, in [1, n]

  // Output shape as sent to clients: [batch, n, cols], or [n, cols] for 2D inputs.
  std::vector<int64_t> OutputShape() const;
  // Number of streamed tiles (tiles never span two batch entries).
  int64_t TileCount() const;
  // Bytes this request holds while running: its inputs (twice for unary and stream calls:
  // the received message stays with gRPC until the call ends, beside the kernel's aligned
  // copy) plus the result bytes buffered at once (all of it for unary calls, at most
  // `window` tiles for streams).
  int64_t InflightBytes(RequestKind kind, int window) const;
};

// A validated Compute/ComputeStream request. `a` and `b` point into the request message
// (raw bytes or the float32 `values` array; no copy) and are valid as long as it is; a
// tensor whose raw bytes the caller holds elsewhere (see RawPayloadSizes) has a null view.
struct ConvertedRequest {
  ProblemSpec spec;
  kernels::ConstTensorView a;
  kernels::ConstTensorView b;
};

// For requests decoded with their raw payloads left in the received message (wire_codec.h):
// the payload lengths, which then replace the lengths of the (empty) `raw` fields.
struct RawPayloadSizes {
  int64_t a = 0;
  int64_t b = 0;
};

// The dimensions of the gallery a request names (ComputeRequest.gallery), looked up by the
// caller: rank 2 ([m, d], serves every batch entry) or 3 ([batch, m, d]).
struct GalleryDims {
  int rank = 2;
  int64_t batch = 1;
  int64_t m = 0;
  int64_t d = 0;
};

// Validates `request` for `kind` against `limits` and converts it.
// INVALID_ARGUMENT: missing or empty tensor, rank not 2 or 3, a dimension <= 0, ranks or
//   batch or D of a and b differ, unsupported dtype/metric/precision, data length !=
//   prod(shape) * sizeof(dtype), top_k > M, epsilon < 0 or not finite, data present in an
//   upload header.
// RESOURCE_EXHAUSTED (and *reason set, if non-null): elements, flops or output bytes over
//   the limit (an int64 overflow counts as over), a unary result over the send limit
//   ("use ComputeStream"), one streamed row over the send limit.
// NaN/Inf values are not checked here: they are found while the bytes are copied for the
// kernel (TilePipeline, with CheckFinite's message), off the gRPC threads.
// For kUpload the returned views are null; use ProblemFromUploadHeader instead.
// With `request.gallery` set, `gallery` must describe it: b must then be absent, D must
// match, and a 3D gallery's batch must equal a's (all INVALID_ARGUMENT); view b stays null.
// gallery_version without gallery is INVALID_ARGUMENT.
absl::StatusOr<ConvertedRequest> ConvertRequest(const v1::ComputeRequest& request, RequestKind kind,
                                                const LimitsConfig& limits, RejectReason* reason,
                                                const RawPayloadSizes* raw_sizes = nullptr,
                                                const GalleryDims* gallery = nullptr);

// Validates a ComputeUpload header's request (no tensor data allowed) as ConvertRequest
// does for kUpload and returns its problem.
absl::StatusOr<ProblemSpec> ProblemFromUploadHeader(const v1::ComputeRequest& request,
                                                    const LimitsConfig& limits,
                                                    RejectReason* reason,
                                                    const GalleryDims* gallery = nullptr);

// Checks `count` elements of `dtype` at `data` for NaN/Inf. On the first one returns
// INVALID_ARGUMENT naming `tensor` and its flat index (`index_offset` + position). Large
// tensors are scanned by `threads` OpenMP threads (kernels::FirstNonFinite).
absl::Status CheckFinite(absl::string_view tensor, const std::byte* data, int64_t count,
                         kernels::DataType dtype, int64_t index_offset, int threads = 1);

// The gallery a RegisterGallery header describes. INVALID_ARGUMENT for an unknown dtype or
// storage_dtype, and MakeGallerySpec's errors (name, rank, dimensions, size).
absl::StatusOr<GallerySpec> GallerySpecFromHeader(const v1::GalleryHeader& header);

// Enum conversions between the wire and the kernel. Return INVALID_ARGUMENT for values
// the server does not know (proto3 enums are open).
absl::StatusOr<kernels::DataType> FromProto(v1::DataType dtype);
absl::StatusOr<kernels::Metric> FromProto(v1::Metric metric);
absl::StatusOr<kernels::Precision> FromProto(v1::Precision precision);
v1::DataType ToProto(kernels::DataType dtype);

}  // namespace simserve

#endif  // SIMSERVE_SERVER_CONVERT_H_
