// avx512 table getter (this folder's flags).
#include "kernels/avx512/isa.h"
#include "kernels/table.inc"
