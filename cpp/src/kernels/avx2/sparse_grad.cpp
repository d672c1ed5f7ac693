// avx2 sparse-gradient kernels: the shared SIMD code in ../simd/sparse_grad.inc, with this folder's flags.
#include "kernels/avx2/isa.h"
#include "kernels/simd/sparse_grad.inc"
