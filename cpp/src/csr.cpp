// CsrStructure::build: the one place a CSR structure is validated.
#include "sparsebp/csr.h"

#include <limits>

#include "sparsebp/errors.h"

namespace sparsebp {

template <typename IndptrT, typename IndexT>
CsrStructure CsrStructure::build(int64_t rows, int64_t cols, const IndptrT* indptr, int64_t indptr_len,
                                 const IndexT* indices, int64_t indices_len) {
  SPARSEBP_CHECK_VALUE(rows >= 0 && cols >= 0, "shape must be non-negative; got (", rows, ", ", cols, ")");
  SPARSEBP_CHECK_VALUE(cols <= std::numeric_limits<int32_t>::max(), "shape[1] = ", cols,
                       " exceeds the int32 column index range (max ", std::numeric_limits<int32_t>::max(), ")");
  SPARSEBP_CHECK_VALUE(rows <= std::numeric_limits<int32_t>::max(), "shape[0] = ", rows,
                       " exceeds the int32 row index range (max ", std::numeric_limits<int32_t>::max(), ")");
  SPARSEBP_CHECK_VALUE(indptr_len == rows + 1, "indptr must have shape[0] + 1 = ", rows + 1, " entries; got ",
                       indptr_len);
  SPARSEBP_CHECK_VALUE(indptr[0] == 0, "indptr[0] must be 0; got ", static_cast<int64_t>(indptr[0]));
  for (int64_t r = 0; r < rows; ++r) {
    SPARSEBP_CHECK_VALUE(indptr[r + 1] >= indptr[r], "indptr must be non-decreasing; indptr[", r + 1,
                         "] = ", static_cast<int64_t>(indptr[r + 1]), " < indptr[", r,
                         "] = ", static_cast<int64_t>(indptr[r]));
  }
  SPARSEBP_CHECK_VALUE(static_cast<int64_t>(indptr[rows]) == indices_len, "indptr[-1] must equal len(indices) = ",
                       indices_len, "; got ", static_cast<int64_t>(indptr[rows]));
  CsrStructure s;
  s.rows_ = rows;
  s.cols_ = cols;
  s.indptr_.resize(static_cast<size_t>(rows + 1));
  s.indices_.resize(static_cast<size_t>(indices_len));
  for (int64_t r = 0; r <= rows; ++r) s.indptr_[r] = static_cast<int64_t>(indptr[r]);
  for (int64_t r = 0; r < rows; ++r) {
    int64_t prev = -1;
    for (int64_t p = s.indptr_[r]; p < s.indptr_[r + 1]; ++p) {
      const int64_t c = static_cast<int64_t>(indices[p]);
      SPARSEBP_CHECK_VALUE(c >= 0 && c < cols, "indices[", p, "] = ", c, " (row ", r, ") is outside [0, ", cols,
                           ")");
      SPARSEBP_CHECK_VALUE(c > prev, "indices must be strictly increasing within each row (sorted, no duplicates); row ",
                           r, " has ", c, " after ", prev, " at indices[", p, "]");
      prev = c;
      s.indices_[p] = static_cast<int32_t>(c);
    }
  }
  return s;
}

const CscStructure& CsrStructure::csc() const {
  std::call_once(csc_cache_->once, [this] {
    CscStructure& t = csc_cache_->csc;
    const int64_t n = nnz();
    t.colptr.assign(static_cast<size_t>(cols_ + 1), 0);
    t.rowidx.resize(static_cast<size_t>(n));
    t.perm.resize(static_cast<size_t>(n));
    for (int64_t p = 0; p < n; ++p) ++t.colptr[indices_[p] + 1];
    for (int64_t c = 0; c < cols_; ++c) t.colptr[c + 1] += t.colptr[c];
    std::vector<int64_t> next(t.colptr.begin(), t.colptr.end() - 1);
    // Rows visited in increasing order: row indices come out sorted within each column.
    for (int64_t r = 0; r < rows_; ++r) {
      for (int64_t p = indptr_[r]; p < indptr_[r + 1]; ++p) {
        const int64_t q = next[indices_[p]]++;
        t.rowidx[q] = static_cast<int32_t>(r);
        t.perm[q] = p;
      }
    }
  });
  return csc_cache_->csc;
}

#define SPARSEBP_INSTANTIATE(IP, IX)                                                                      \
  template CsrStructure CsrStructure::build<IP, IX>(int64_t, int64_t, const IP*, int64_t, const IX*, int64_t);
SPARSEBP_INSTANTIATE(int32_t, int32_t)
SPARSEBP_INSTANTIATE(int32_t, int64_t)
SPARSEBP_INSTANTIATE(int64_t, int32_t)
SPARSEBP_INSTANTIATE(int64_t, int64_t)
#undef SPARSEBP_INSTANTIATE

}  // namespace sparsebp
