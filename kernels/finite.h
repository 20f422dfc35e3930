// The NaN/Inf scan of input tensors: one definition for every caller (the server's checks of
// request and gallery data), parallel for large tensors.
#ifndef SIMSERVE_KERNELS_FINITE_H_
#define SIMSERVE_KERNELS_FINITE_H_

#include <cstddef>
#include <cstdint>

#include "kernels/dtype.h"

namespace simserve::kernels {

// Tensors at least this large are scanned by `threads` OpenMP threads; smaller ones on the
// calling thread alone (waking a team costs more than it saves).
inline constexpr int64_t kParallelFiniteScanBytes = int64_t{8} << 20;

// The index of the first element of `count` elements of `dtype` at `data` whose exponent bits
// are all ones (NaN or +-Inf), or -1 when every element is finite. `threads` <= 1: the calling
// thread only; the server passes its compute threads per call.
int64_t FirstNonFinite(const std::byte* data, int64_t count, DataType dtype, int threads);

}  // namespace simserve::kernels

#endif  // SIMSERVE_KERNELS_FINITE_H_
