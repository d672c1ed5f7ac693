// Declarations of one kernel set's functions. Included by the files of every ISA folder after its
// isa.h, which defines SPARSEBP_ISA_NS (the namespace that keeps each ISA's symbols apart: see
// NOTE [ One namespace per ISA ] in table.inc).
#pragma once
#include "kernels/kernel_table.h"

namespace sparsebp {
namespace kernels {
namespace SPARSEBP_ISA_NS {

void linear_forward(const LinearForwardArgs& a, int64_t row_begin, int64_t row_end);
void sddmm(const SddmmArgs& a, int64_t row_begin, int64_t row_end);
void transpose(const TransposeArgs& a, int64_t row_begin, int64_t row_end);
void gather_forward(const GatherArgs& a, int64_t row_begin, int64_t row_end);
void gather_sddmm(const GatherArgs& a, int64_t row_begin, int64_t row_end);
void topk_rows(const TopkArgs& a, int64_t row_begin, int64_t row_end);
void abs_colsum(const AbsColsumArgs& a, int64_t col_begin, int64_t col_end);
void spmm_rows(const SpmmRowsArgs& a, int64_t row_begin, int64_t row_end);
void spmm_scatter(const SpmmScatterArgs& a, int64_t col_begin, int64_t col_end);
void gather_block(const BlockArgs& a, int64_t i_begin, int64_t i_end);
void scatter_add_block(const BlockArgs& a, int64_t i_begin, int64_t i_end);
void lazy_sgd(const LazySgdArgs& a, int64_t i_begin, int64_t i_end);
void adam(const AdamArgs& a, int64_t i_begin, int64_t i_end);
void mask_adam(const MaskAdamArgs& a, int64_t begin, int64_t end);
void budget_clip(const ClipArgs& a, int64_t begin, int64_t end);
void bernoulli_rows(const BernoulliArgs& a, int64_t row_begin, int64_t row_end);
void relu(const EltwiseArgs& a, int64_t begin, int64_t end);
void bias_relu_mask(const BiasReluMaskArgs& a, int64_t row_begin, int64_t row_end);
void scale_flush(const ScaleFlushArgs& a, int64_t begin, int64_t end);
void dropout(const DropoutArgs& a, int64_t begin, int64_t end);

}  // namespace SPARSEBP_ISA_NS
}  // namespace kernels
}  // namespace sparsebp
