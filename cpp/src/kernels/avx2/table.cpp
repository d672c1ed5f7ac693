// avx2 table getter (this folder's flags).
#include "kernels/avx2/isa.h"
#include "kernels/table.inc"
