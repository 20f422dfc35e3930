// Request validation and proto -> kernel conversion. Sizes are computed with saturating
// arithmetic so that a shape whose product overflows int64 is simply "over the limit".
#include "server/convert.h"

#include <algorithm>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/finite.h"

namespace simserve {
namespace {

constexpr int64_t kMax = std::numeric_limits<int64_t>::max();

// a * b for non-negative operands, kMax on overflow.
int64_t SatMul(int64_t a, int64_t b) {
  int64_t out = 0;
  return __builtin_mul_overflow(a, b, &out) ? kMax : out;
}

int64_t SatAdd(int64_t a, int64_t b) {
  int64_t out = 0;
  return __builtin_add_overflow(a, b, &out) ? kMax : out;
}

std::string ShapeString(const v1::Tensor& t) {
  return absl::StrCat("[", absl::StrJoin(t.shape(), ", "), "]");
}

// Shape of one tensor as [batch, rows, dim].
struct TensorDims {
  int rank = 0;
  int64_t batch = 1;
  int64_t rows = 0;
  int64_t dim = 0;
  int64_t elements = 0;  // saturated at kMax
  kernels::DataType dtype = kernels::DataType::kFloat32;
};

absl::StatusOr<TensorDims> ParseDims(absl::string_view name, const v1::Tensor& t,
                                     bool has_message) {
  if (!has_message || t.shape_size() == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor ", name,
                     " is missing or empty: it needs a shape [batch, rows, "
                     "dim] or [rows, dim] and data"));
  }
  TensorDims dims;
  dims.rank = t.shape_size();
  if (dims.rank != 2 && dims.rank != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor ", name, " has rank ", dims.rank, " (shape ", ShapeString(t),
                     "); expected rank 3 [batch, rows, dim] or rank 2 [rows, dim]"));
  }
  for (int i = 0; i < dims.rank; ++i) {
    if (t.shape(i) <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " has dimension ", i, " = ",
                                                     t.shape(i), " (shape ", ShapeString(t),
                                                     "); every dimension must be positive"));
    }
  }
  const int off = dims.rank == 3 ? 1 : 0;
  dims.batch = dims.rank == 3 ? t.shape(0) : 1;
  dims.rows = t.shape(off);
  dims.dim = t.shape(off + 1);
  dims.elements = SatMul(SatMul(dims.batch, dims.rows), dims.dim);
  if (t.has_values()) {
    dims.dtype = kernels::DataType::kFloat32;  // `values` are always float32
  } else {
    auto dtype = FromProto(t.dtype());
    if (!dtype.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor ", name, ": ", dtype.status().message()));
    }
    dims.dtype = *dtype;
  }
  return dims;
}

absl::Status ResourceError(RejectReason why, RejectReason* reason, const std::string& message) {
  if (reason != nullptr) *reason = why;
  return absl::ResourceExhaustedError(message);
}

// Shared by all kinds: everything except the data checks.
// B's dimensions from a gallery: a 2D gallery serves every batch entry of `a`.
absl::StatusOr<TensorDims> GalleryBDims(const v1::ComputeRequest& request, const TensorDims& a,
                                        const GalleryDims* gallery) {
  if (request.has_b()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor b must be absent when gallery '", request.gallery(), "' plays B"));
  }
  if (gallery == nullptr) {
    return absl::InternalError("gallery call converted without its gallery");
  }
  if (gallery->rank == 3 && gallery->batch != a.batch) {
    return absl::InvalidArgumentError(absl::StrCat(
        "batch mismatch: tensor a has batch ", a.batch, " but gallery '", request.gallery(),
        "' has ", gallery->batch, " batch entries (a 2D gallery serves any batch)"));
  }
  if (gallery->d != a.dim) {
    return absl::InvalidArgumentError(absl::StrCat("D mismatch: tensor a has dim ", a.dim,
                                                   " but gallery '", request.gallery(),
                                                   "' has dim ", gallery->d));
  }
  TensorDims b;
  b.rank = a.rank;
  b.batch = a.batch;
  b.rows = gallery->m;
  b.dim = gallery->d;
  b.elements = 0;  // nothing to receive
  return b;
}

absl::StatusOr<ProblemSpec> ParseProblem(const v1::ComputeRequest& request, RequestKind kind,
                                         const LimitsConfig& limits, RejectReason* reason,
                                         const GalleryDims* gallery) {
  auto a = ParseDims("a", request.a(), request.has_a());
  if (!a.ok()) return a.status();
  const bool from_gallery = !request.gallery().empty();
  auto b = from_gallery ? GalleryBDims(request, *a, gallery)
                        : ParseDims("b", request.b(), request.has_b());
  if (!b.ok()) return b.status();
  if (!from_gallery && request.gallery_version() != 0) {
    return absl::InvalidArgumentError("gallery_version is set but gallery is not");
  }
  if (a->rank != b->rank) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor a has rank ", a->rank, " but tensor b has rank ", b->rank,
                     "; both must be 3D [batch, rows, dim] or both 2D [rows, dim]"));
  }
  if (a->batch != b->batch) {
    return absl::InvalidArgumentError(absl::StrCat("batch mismatch: tensor a has batch ", a->batch,
                                                   " but tensor b has batch ", b->batch));
  }
  if (a->dim != b->dim) {
    return absl::InvalidArgumentError(absl::StrCat("D mismatch: tensor a has dim ", a->dim,
                                                   " but tensor b has dim ", b->dim,
                                                   " (the last dimensions must be equal)"));
  }
  ProblemSpec spec;
  spec.shape = {.batch = a->batch, .n = a->rows, .m = b->rows, .d = a->dim};
  spec.a_dtype = a->dtype;
  spec.b_dtype = b->dtype;
  spec.two_d = a->rank == 2;
  spec.from_gallery = from_gallery;

  auto metric = FromProto(request.metric());
  if (!metric.ok()) return metric.status();
  auto out_dtype = FromProto(request.output_dtype());
  if (!out_dtype.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("output_dtype: ", out_dtype.status().message()));
  }
  auto precision = FromProto(request.precision());
  if (!precision.ok()) return precision.status();
  spec.options.metric = *metric;
  spec.options.output_dtype = *out_dtype;
  spec.options.precision = *precision;
  spec.options.top_k = request.top_k();
  spec.options.epsilon = request.epsilon();
  if (spec.options.top_k > spec.shape.m) {
    return absl::InvalidArgumentError(absl::StrCat(
        "top_k = ", spec.options.top_k, " exceeds M = ", spec.shape.m, " (the rows of tensor b)"));
  }
  if (!(spec.options.epsilon >= 0.0F) ||
      spec.options.epsilon == std::numeric_limits<float>::infinity()) {
    return absl::InvalidArgumentError(absl::StrCat("epsilon = ", spec.options.epsilon,
                                                   " is invalid; it must be finite and >= 0"));
  }

  // Limits, before anything depends on the sizes being representable.
  for (const auto* t : {&*a, &*b}) {
    if (t->elements > limits.max_input_elements) {
      const char* name = t == &*a ? "a" : "b";
      return ResourceError(
          RejectReason::kTooManyElements, reason,
          absl::StrCat(
              "tensor ", name, " has ",
              t->elements == kMax ? std::string("more than 2^63") : absl::StrCat(t->elements),
              " elements; the limit is max_input_elements = ", limits.max_input_elements));
    }
  }
  spec.a_bytes = a->elements * static_cast<int64_t>(kernels::SizeOf(a->dtype));
  spec.b_bytes = b->elements * static_cast<int64_t>(kernels::SizeOf(b->dtype));
  spec.flops = kernels::MatmulFlops(spec.shape);
  if (spec.flops < 0 || spec.flops > limits.max_flops) {
    return ResourceError(
        RejectReason::kTooManyFlops, reason,
        absl::StrCat("request needs ",
                     spec.flops < 0 ? std::string("more than 2^63") : absl::StrCat(spec.flops),
                     " flops (2*batch*N*M*D); the limit is max_flops = ", limits.max_flops));
  }
  spec.output_cols = spec.options.top_k > 0 ? spec.options.top_k : spec.shape.m;
  spec.value_row_bytes =
      spec.output_cols * static_cast<int64_t>(kernels::SizeOf(spec.options.output_dtype));
  spec.index_row_bytes = spec.options.top_k > 0 ? spec.options.top_k * 4 : 0;
  const int64_t row_bytes = spec.value_row_bytes + spec.index_row_bytes;
  spec.output_bytes = SatMul(SatMul(spec.shape.batch, spec.shape.n), row_bytes);
  if (spec.output_bytes > limits.max_output_bytes) {
    return ResourceError(
        RejectReason::kOutputTooLarge, reason,
        absl::StrCat("result would be ", spec.output_bytes,
                     " bytes; the limit is max_output_bytes = ", limits.max_output_bytes));
  }
  // Result parts written to shared memory (ComputeRequest.*_shared_memory) are not sent.
  const int64_t rows = SatMul(spec.shape.batch, spec.shape.n);
  const int64_t sent_bytes =
      SatAdd(request.has_values_shared_memory() ? 0 : SatMul(rows, spec.value_row_bytes),
             request.has_indices_shared_memory() ? 0 : SatMul(rows, spec.index_row_bytes));
  if (kind != RequestKind::kUnary &&
      (request.has_values_shared_memory() || request.has_indices_shared_memory())) {
    return absl::InvalidArgumentError(
        "values_shared_memory / indices_shared_memory are for Compute (unary) only");
  }
  if (request.has_indices_shared_memory() && spec.options.top_k == 0) {
    return absl::InvalidArgumentError("indices_shared_memory needs top_k > 0");
  }
  if (kind == RequestKind::kUnary &&
      sent_bytes + kMessageOverheadBytes > limits.max_send_message_bytes) {
    return ResourceError(
        RejectReason::kOutputTooLarge, reason,
        absl::StrCat("result of ", sent_bytes,
                     " bytes exceeds the unary message limit max_send_message_bytes = ",
                     limits.max_send_message_bytes, "; use ComputeStream (or ComputeUpload)"));
  }
  if (kind != RequestKind::kUnary &&
      row_bytes + kMessageOverheadBytes > limits.max_send_message_bytes) {
    return ResourceError(
        RejectReason::kOutputTooLarge, reason,
        absl::StrCat("one result row is ", row_bytes,
                     " bytes, over max_send_message_bytes = ", limits.max_send_message_bytes));
  }
  const int64_t requested = request.max_chunk_bytes();
  spec.chunk_bytes = requested == 0 ? limits.default_chunk_bytes
                                    : std::min<int64_t>(requested, limits.max_chunk_bytes);
  spec.tile_rows = std::clamp<int64_t>(spec.chunk_bytes / row_bytes, 1, spec.shape.n);

  // Catch-all for rules the kernel knows (kept in sync with kernels by construction).
  absl::Status kernel_check = kernels::ValidateProblem(spec.shape, spec.options);
  if (!kernel_check.ok()) {
    return absl::InvalidArgumentError(kernel_check.message());
  }
  return spec;
}

// A view of one tensor's data, checking its length and its values.
absl::StatusOr<kernels::ConstTensorView> ViewData(absl::string_view name, const v1::Tensor& t,
                                                  kernels::DataType dtype, int64_t bytes,
                                                  const int64_t* raw_size) {
  const int64_t elements = bytes / static_cast<int64_t>(kernels::SizeOf(dtype));
  kernels::ConstTensorView view;
  view.dtype = dtype;
  if (t.has_values()) {
    const int64_t have = t.values().values_size();
    if (have != elements) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", name, ": values has ", have,
                                                     " elements but shape ", ShapeString(t),
                                                     " needs ", elements));
    }
    view.data = reinterpret_cast<const std::byte*>(t.values().values().data());
  } else if (t.data_case() == v1::Tensor::kRaw) {
    const auto have = raw_size != nullptr ? *raw_size : static_cast<int64_t>(t.raw().size());
    if (have != bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor ", name, ": raw has ", have, " bytes but shape ", ShapeString(t), " of ",
          kernels::Name(dtype), " needs ", bytes, " (prod(shape) * ", kernels::SizeOf(dtype), ")"));
    }
    if (raw_size == nullptr) view.data = reinterpret_cast<const std::byte*>(t.raw().data());
  } else if (t.has_shared_memory()) {
    // The caller resolved the region (call_setup.h) and passes the bytes' length.
    const int64_t have = raw_size != nullptr ? *raw_size : t.shared_memory().byte_size();
    if (have != bytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor ", name, ": shared_memory.byte_size is ", have, " but shape ",
                       ShapeString(t), " of ", kernels::Name(dtype), " needs ", bytes,
                       " (prod(shape) * ", kernels::SizeOf(dtype), ")"));
    }
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor ", name, " has no data: set raw, values or shared_memory"));
  }
  return view;
}

}  // namespace

std::vector<int64_t> ProblemSpec::OutputShape() const {
  if (two_d) return {shape.n, output_cols};
  return {shape.batch, shape.n, output_cols};
}

int64_t ProblemSpec::TileCount() const {
  return shape.batch * ((shape.n + tile_rows - 1) / tile_rows);
}

int64_t ProblemSpec::InflightBytes(RequestKind kind, int window) const {
  const int64_t tile_bytes = tile_rows * (value_row_bytes + index_row_bytes);
  const int64_t buffered = kind == RequestKind::kUnary
                               ? output_bytes
                               : std::min(output_bytes, SatMul(tile_bytes, window));
  const int64_t inputs = SatAdd(a_bytes, b_bytes);
  const int64_t held = kind == RequestKind::kUpload ? inputs : SatMul(inputs, 2);
  return SatAdd(held, buffered);
}

absl::StatusOr<ConvertedRequest> ConvertRequest(const v1::ComputeRequest& request, RequestKind kind,
                                                const LimitsConfig& limits, RejectReason* reason,
                                                const RawPayloadSizes* raw_sizes,
                                                const GalleryDims* gallery) {
  auto spec = ParseProblem(request, kind, limits, reason, gallery);
  if (!spec.ok()) return spec.status();
  ConvertedRequest out;
  out.spec = *spec;
  if (kind == RequestKind::kUpload) {
    for (const auto* t : {&request.a(), &request.b()}) {
      if (t->data_case() != v1::Tensor::DATA_NOT_SET) {
        return absl::InvalidArgumentError(absl::StrCat(
            "upload header: tensor ", t == &request.a() ? "a" : "b",
            " carries data; send only shape and dtype, then the bytes as b_data/a_data"));
      }
    }
    return out;
  }
  auto a = ViewData("a", request.a(), spec->a_dtype, spec->a_bytes,
                    raw_sizes != nullptr ? &raw_sizes->a : nullptr);
  if (!a.ok()) return a.status();
  out.a = *a;
  if (spec->from_gallery) return out;
  auto b = ViewData("b", request.b(), spec->b_dtype, spec->b_bytes,
                    raw_sizes != nullptr ? &raw_sizes->b : nullptr);
  if (!b.ok()) return b.status();
  out.b = *b;
  return out;
}

absl::StatusOr<ProblemSpec> ProblemFromUploadHeader(const v1::ComputeRequest& request,
                                                    const LimitsConfig& limits,
                                                    RejectReason* reason,
                                                    const GalleryDims* gallery) {
  auto converted = ConvertRequest(request, RequestKind::kUpload, limits, reason, nullptr, gallery);
  if (!converted.ok()) return converted.status();
  return converted->spec;
}

absl::Status CheckFinite(absl::string_view tensor, const std::byte* data, int64_t count,
                         kernels::DataType dtype, int64_t index_offset, int threads) {
  const int64_t bad = kernels::FirstNonFinite(data, count, dtype, threads);
  if (bad < 0) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("tensor ", tensor, " contains NaN or Inf at flat index ", index_offset + bad));
}

absl::StatusOr<GallerySpec> GallerySpecFromHeader(const v1::GalleryHeader& header) {
  auto dtype = FromProto(header.dtype());
  if (!dtype.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("dtype: ", dtype.status().message()));
  }
  auto storage = FromProto(header.storage_dtype());
  if (!storage.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("storage_dtype: ", storage.status().message()));
  }
  return MakeGallerySpec(header.name(), {header.shape().begin(), header.shape().end()}, *dtype,
                         *storage);
}

absl::StatusOr<kernels::DataType> FromProto(v1::DataType dtype) {
  switch (dtype) {
    case v1::FLOAT32:
      return kernels::DataType::kFloat32;
    case v1::BFLOAT16:
      return kernels::DataType::kBFloat16;
    case v1::FLOAT16:
      return kernels::DataType::kFloat16;
    default:
      return absl::InvalidArgumentError(absl::StrCat("unsupported dtype ", static_cast<int>(dtype),
                                                     " (FLOAT32, BFLOAT16, FLOAT16)"));
  }
}

absl::StatusOr<kernels::Metric> FromProto(v1::Metric metric) {
  switch (metric) {
    case v1::COSINE:
      return kernels::Metric::kCosine;
    case v1::DOT:
      return kernels::Metric::kDot;
    case v1::EUCLIDEAN:
      return kernels::Metric::kEuclidean;
    case v1::SQUARED_EUCLIDEAN:
      return kernels::Metric::kSquaredEuclidean;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("unsupported metric ", static_cast<int>(metric),
                       " (COSINE, DOT, EUCLIDEAN, SQUARED_EUCLIDEAN)"));
  }
}

absl::StatusOr<kernels::Precision> FromProto(v1::Precision precision) {
  switch (precision) {
    case v1::FP32:
      return kernels::Precision::kFp32;
    case v1::BF16:
      return kernels::Precision::kBf16;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("unsupported precision ", static_cast<int>(precision), " (FP32, BF16)"));
  }
}

v1::DataType ToProto(kernels::DataType dtype) {
  switch (dtype) {
    case kernels::DataType::kBFloat16:
      return v1::BFLOAT16;
    case kernels::DataType::kFloat16:
      return v1::FLOAT16;
    case kernels::DataType::kFloat32:
      break;
  }
  return v1::FLOAT32;
}

}  // namespace simserve
