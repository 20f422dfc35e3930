// The similarity kernel: S[k][i][j] = sim(A[k][i], B[k][j]) for A [batch, N, D]
// and B [batch, M, D], computed tile by tile with oneDNN matmul primitives.
// Plain C++ types in and out; knows nothing of gRPC or protobuf.
#ifndef SIMSERVE_KERNELS_SIMILARITY_H_
#define SIMSERVE_KERNELS_SIMILARITY_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/dtype.h"
#include "kernels/gallery.h"

namespace simserve::kernels {

enum class Metric { kCosine, kDot, kEuclidean, kSquaredEuclidean };
enum class Precision { kFp32, kBf16 };

// Lower-case names ("cosine", "bfloat16", "bf16", ...) for logs and errors.
const char* Name(Metric metric);
const char* Name(DataType dtype);
const char* Name(Precision precision);

// Problem size: A is [batch, n, d], B is [batch, m, d], S is [batch, n, m].
struct Shape {
  int64_t batch = 1;
  int64_t n = 1;
  int64_t m = 1;
  int64_t d = 1;
};

// What to compute. Defaults give float32 sklearn-compatible cosine similarity.
struct Options {
  Metric metric = Metric::kCosine;
  // Element type written to the value output.
  DataType output_dtype = DataType::kFloat32;
  // kFp32: exact float32 matmul. kBf16: bf16 operands (AMX), fp32 accumulation.
  Precision precision = Precision::kFp32;
  // 0: dense rows of m values. k in [1, m]: per row the k best values (largest for
  // cosine/dot, smallest for distances; ties -> lower column) and their indices.
  int64_t top_k = 0;
  // Cosine only. 0: a zero row gives similarity 0 (sklearn). > 0: each row is divided by
  // sqrt(max(sum_sq, epsilon)) (the Keras l2_normalize clamp).
  float epsilon = 0.0F;
};

// Engine-wide settings.
struct EngineConfig {
  // Most OpenMP threads one ComputeTile call uses (set on the calling thread). 0: all cores.
  // Tiles below ~4 MFLOP per thread use fewer threads (one for tiny requests).
  int threads_per_call = 0;
  // Maximum number of cached matmul primitives (one per distinct tile shape and dtype, per
  // thread: gallery tiles run one matmul per OpenMP thread).
  size_t primitive_cache_capacity = 512;
};

// Read-only view of C-order elements of one dtype.
struct ConstTensorView {
  const std::byte* data = nullptr;
  DataType dtype = DataType::kFloat32;
};

// Number of floating-point operations of the matmul for `shape` (2*batch*n*m*d), or -1
// when it overflows int64.
int64_t MatmulFlops(const Shape& shape);

// Checks a shape and options without computing anything: positive dims, top_k <= m,
// epsilon >= 0 and finite. Returns INVALID_ARGUMENT with a message naming the problem.
absl::Status ValidateProblem(const Shape& shape, const Options& options);

class SimilarityJob;

// Owns the oneDNN engine, the primitive cache and a pool of reusable scratch buffers.
// Thread-safe: Prepare and the jobs it returns may be used from many threads at once
// (each job by one thread at a time). Must outlive every job it created.
class SimilarityEngine {
 public:
  // Creates the engine. Fails if oneDNN cannot create a CPU engine.
  static absl::StatusOr<std::unique_ptr<SimilarityEngine>> Create(const EngineConfig& config);
  ~SimilarityEngine();
  SimilarityEngine(const SimilarityEngine&) = delete;
  SimilarityEngine& operator=(const SimilarityEngine&) = delete;

  // Starts a computation. `b` holds all of B ([batch, m, d] elements of b.dtype); it is
  // borrowed, not copied, and must stay valid and unchanged until the job is destroyed.
  // Returns INVALID_ARGUMENT for a bad shape or options (see ValidateProblem).
  absl::StatusOr<std::unique_ptr<SimilarityJob>> Prepare(const Shape& shape, const Options& options,
                                                         ConstTensorView b);
  // Starts a computation against a prepared gallery playing B: shape.m and shape.d must be
  // the gallery's, and it must have one entry (used for every batch entry of A) or
  // shape.batch entries. No per-call work on B. Tiles run in column blocks: per-call memory
  // does not grow with m for top-k. Borrowed like `b` above.
  absl::StatusOr<std::unique_ptr<SimilarityJob>> Prepare(const Shape& shape, const Options& options,
                                                         const PreparedGallery& gallery);

  // Creates (and caches) the primitives for tiles of `tile_rows` rows and for the
  // remainder tile, so the first real request does not pay for primitive creation.
  absl::Status Warmup(const Shape& shape, const Options& options, int64_t tile_rows);

  // Name of the matmul implementation oneDNN selects for a tile of `rows` rows of this
  // problem (e.g. "brg:avx512_core"). Never "ref:*" in a successful answer.
  absl::StatusOr<std::string> MatmulImplementation(const Shape& shape, const Options& options,
                                                   int64_t rows);

  // oneDNN version ("2.6.3") and the CPU ISA it dispatches to ("avx512_core_amx").
  static std::string OneDnnVersion();
  static std::string CpuIsa();
  int threads_per_call() const;

  class Impl;

 private:
  explicit SimilarityEngine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// One prepared request. Computes row tiles of S in any order (the (batch, row) order
// is fastest: each batch's B operand is prepared once). Not thread-safe: one thread
// at a time.
class SimilarityJob {
 public:
  ~SimilarityJob();
  SimilarityJob(const SimilarityJob&) = delete;
  SimilarityJob& operator=(const SimilarityJob&) = delete;

  const Shape& shape() const;
  const Options& options() const;
  // Values per output row: m for dense results, top_k for top-k.
  int64_t output_cols() const;
  // Bytes of the value output of `rows` rows (rows * output_cols * SizeOf(output_dtype)).
  size_t ValueBytes(int64_t rows) const;

  // Computes rows [row_begin, row_begin + rows) of S[batch]. `a_rows` holds exactly those
  // rows of A (rows * d elements). Writes rows * output_cols values of the output dtype to
  // `values_out` and, for top-k, rows * top_k column indices to `indices_out`. Sizes must
  // match exactly (INVALID_ARGUMENT otherwise); oneDNN failures come back as INTERNAL.
  absl::Status ComputeTile(int64_t batch, int64_t row_begin, int64_t rows, ConstTensorView a_rows,
                           std::span<std::byte> values_out, std::span<int32_t> indices_out);

  class Impl;

 private:
  friend class SimilarityEngine;
  explicit SimilarityJob(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Computes all of S with `job`, tile by tile (tile_rows rows per tile; 0 = whole batch
// entries). `a` holds all of A ([batch, n, d]); `values_out` / `indices_out` are sized for
// the whole output (ValueBytes(batch * n) bytes / batch * n * top_k indices).
absl::Status ComputeAll(SimilarityJob& job, ConstTensorView a, int64_t tile_rows,
                        std::span<std::byte> values_out, std::span<int32_t> indices_out);

}  // namespace simserve::kernels

#endif  // SIMSERVE_KERNELS_SIMILARITY_H_
