// Runtime choice between the row_ops builds.
#include "kernels/row_ops.h"

namespace simserve::kernels {
namespace generic {
extern const RowOps kRowOps;
}
namespace avx512 {
extern const RowOps kRowOps;
}

namespace {
bool HasAvx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
}  // namespace

const RowOps& BestRowOps() {
  static const RowOps& ops = HasAvx512() ? avx512::kRowOps : generic::kRowOps;
  return ops;
}

const char* RowOpsIsa() { return HasAvx512() ? "avx512" : "generic"; }

}  // namespace simserve::kernels
