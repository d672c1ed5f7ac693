// Scalar kernel set: the executable specification. Compiled with the baseline flags only.
#pragma once
#define SPARSEBP_ISA_NS scalar
#define SPARSEBP_TABLE_GETTER get_scalar_table
#define SPARSEBP_TABLE_NAME "scalar"
#define SPARSEBP_FWD_TILE_COLS 64
#define SPARSEBP_SDDMM_TILE_COLS 64
