// avx2 transpose: the shared SIMD code in ../simd/transpose.inc, with this folder's flags.
#include "kernels/avx2/isa.h"
#include "kernels/simd/transpose.inc"
