// Scalar table getter (baseline flags).
#include "kernels/scalar/isa.h"
#include "kernels/table.inc"
