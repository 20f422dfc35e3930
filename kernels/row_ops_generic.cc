// row_ops compiled for the x86-64 baseline.
#define ROW_OPS_NAMESPACE generic
#include "kernels/row_ops_impl.inc"
