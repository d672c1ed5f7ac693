// avx512 transpose: the shared SIMD code in ../simd/transpose.inc, with this folder's flags.
#include "kernels/avx512/isa.h"
#include "kernels/simd/transpose.inc"
