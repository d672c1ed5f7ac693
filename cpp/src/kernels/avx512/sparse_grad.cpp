// avx512 sparse-gradient kernels: the shared SIMD code in ../simd/sparse_grad.inc, with this folder's flags.
#include "kernels/avx512/isa.h"
#include "kernels/simd/sparse_grad.inc"
