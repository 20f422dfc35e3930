// row_ops compiled for AVX-512 (Skylake-SP and later); CMake sets the flags for this file.
#define ROW_OPS_NAMESPACE avx512
#include "kernels/row_ops_impl.inc"
