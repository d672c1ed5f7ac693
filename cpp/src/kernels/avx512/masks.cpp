// avx512 block (unit-mask) kernels: the shared loops of ../block_ops.inc, with this folder's flags.
#include "kernels/avx512/isa.h"
#include "kernels/block_ops.inc"
