// scalar block (unit-mask) kernels: the shared loops of ../block_ops.inc, with this folder's flags.
#include "kernels/scalar/isa.h"
#include "kernels/block_ops.inc"
