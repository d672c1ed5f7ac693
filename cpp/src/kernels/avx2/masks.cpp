// avx2 block (unit-mask) kernels: the shared loops of ../block_ops.inc, with this folder's flags.
#include "kernels/avx2/isa.h"
#include "kernels/block_ops.inc"
