// The validated sparsity structure of a CSR matrix (no values: values live with the caller, so a
// training framework can own them as parameters). Built once, validated once, immutable after.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace sparsebp {

// The transposed structure (CSC of the matrix = CSR of its transpose), for the input gradient.
struct CscStructure {
  std::vector<int64_t> colptr;  // cols + 1 entries
  std::vector<int32_t> rowidx;  // nnz entries, increasing within each column
  std::vector<int64_t> perm;    // perm[q] = position in CSR order of the q-th entry in CSC order
};

class CsrStructure {
 public:
  // Validates and copies. indptr has rows+1 entries; indices has indptr[rows] entries.
  // Throws ValueError naming the first offending position: indptr[0] != 0, indptr decreasing,
  // indptr[rows] != len(indices), an index outside [0, cols), or indices not strictly increasing
  // within a row (unsorted or duplicate). rows and cols must fit in int32 (the stored index type of
  // this structure and of its transpose).
  template <typename IndptrT, typename IndexT>
  static CsrStructure build(int64_t rows, int64_t cols, const IndptrT* indptr, int64_t indptr_len,
                            const IndexT* indices, int64_t indices_len);

  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  int64_t nnz() const { return static_cast<int64_t>(indices_.size()); }
  const int64_t* indptr() const { return indptr_.data(); }
  const int32_t* indices() const { return indices_.data(); }
  // The transposed structure, built on first use (thread-safe) and then kept; copies share it.
  const CscStructure& csc() const;

 private:
  struct CscCache {
    std::once_flag once;
    CscStructure csc;
  };
  std::shared_ptr<CscCache> csc_cache_ = std::make_shared<CscCache>();
  int64_t rows_ = 0;
  int64_t cols_ = 0;
  std::vector<int64_t> indptr_;  // rows+1 entries, int64: correct far beyond 2^31 nonzeros
  std::vector<int32_t> indices_;
};

}  // namespace sparsebp
