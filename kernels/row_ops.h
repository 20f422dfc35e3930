// Internal to kernels/: the element-wise loops around the matmul (operand preparation,
// norms, distance epilogue, dtype conversion). Each is compiled twice — generic x86-64 and
// AVX-512 — and dispatched once at runtime on the CPU's features. Loops run on the calling
// thread's OpenMP team.
#ifndef SIMSERVE_KERNELS_ROW_OPS_H_
#define SIMSERVE_KERNELS_ROW_OPS_H_

#include <cstddef>
#include <cstdint>

#include "kernels/similarity.h"

namespace simserve::kernels {

// How a row is scaled while it is prepared as a matmul operand.
enum class RowScaling {
  kNone,               // as is
  kUnitLength,         // divided by its L2 norm; a zero row stays zero (sklearn)
  kUnitLengthClamped,  // divided by sqrt(max(sum_sq, epsilon)) (Keras)
};

// The loops, as one table of function pointers per instruction set.
struct RowOps {
  // Converts `rows` rows of `d` elements of `src` to float32 (or bf16 bits when bf16_out) in
  // `dst`, scaling each row per `scaling`; norms are accumulated in double. Stores each row's
  // squared norm in `sq_norms` when it is non-null.
  void (*prepare_rows)(ConstTensorView src, int64_t rows, int64_t d, RowScaling scaling,
                       float epsilon, bool bf16_out, void* dst, float* sq_norms);
  // Squared L2 norm of each row (double accumulation).
  void (*squared_norms)(ConstTensorView src, int64_t rows, int64_t d, float* sq_norms);
  // In place: dot products -> max(a_sq + b_sq - 2 dot, 0), square-rooted when take_root.
  void (*to_distances)(float* tile, int64_t rows, int64_t m, const float* a_sq, const float* b_sq,
                       bool take_root);
  // float32 -> `dtype` elements (round to nearest even).
  void (*convert_floats)(const float* src, int64_t count, DataType dtype, std::byte* dst);
  // L2 norm of each row (double accumulation, rounded to float32 once).
  void (*row_norms)(ConstTensorView src, int64_t rows, int64_t d, float* norms);
  // out[r * ld + j] = <a[r], b[j]> for a_rows float32 rows of A and b_rows rows of B in any
  // dtype (converted as they are loaded), float32 accumulation. On the calling thread only:
  // the gallery scan for a few queries, where reading B is the whole cost.
  void (*dot_rows)(const float* a, int64_t a_rows, int64_t d, ConstTensorView b, int64_t b_rows,
                   float* out, int64_t ld);
};

// The best implementation this CPU supports.
const RowOps& BestRowOps();
// Name of the instruction set BestRowOps() was compiled for ("avx512" or "generic").
const char* RowOpsIsa();

}  // namespace simserve::kernels

#endif  // SIMSERVE_KERNELS_ROW_OPS_H_
