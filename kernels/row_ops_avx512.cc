// row_ops compiled for AVX-512 (Skylake-SP and later); CMake sets the flags for this file.
#define ROW_OPS_NAMESPACE avx512
// GCC 12 reports its own AVX-512 intrinsics' internal undefined vectors as
// maybe-uninitialized (GCC bug 105593); the warning is about the header, not this code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include "kernels/row_ops_impl.inc"
