// avx2 sparse linear kernels: the shared SIMD code in ../simd/linear.inc, with this folder's flags.
#include "kernels/avx2/isa.h"
#include "kernels/simd/linear.inc"
