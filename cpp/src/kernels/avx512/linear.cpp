// avx512 sparse linear kernels: the shared SIMD code in ../simd/linear.inc, with this folder's flags.
#include "kernels/avx512/isa.h"
#include "kernels/simd/linear.inc"
