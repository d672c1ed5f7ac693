// The selection logic of topk_rows, shared by every kernel set: each includes this after its isa.h
// and passes its own candidate filter, k-th-value search and take pass. Contract: kernel_table.h.
//
// Per row: estimate a threshold t from an evenly strided sample (so that about 2k entries pass),
// collect the candidates |v| >= t in one pass (the only pass over the whole row), find T, the k-th
// largest candidate value, and take the k best (larger |v|, then lower column) in one more pass
// over the candidates. Every entry outside the candidates is < t, below every candidate, so the
// answer is exact; when fewer than k pass, all entries become candidates. The scalar set passes a
// plain loop, std::nth_element and take_top; the SIMD sets a compressing compare, a vectorised
// quickselect and a compressing take pass.
// NaN is never "less than t", so a NaN always lands among the candidates and is reported.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

namespace sparsebp {
namespace kernels {
namespace SPARSEBP_ISA_NS {
namespace {

struct Cand {
  float v;
  int32_t i;
};


constexpr int64_t kSample = 256;
// The sample's threshold rank is at most ~34 (about 2k/n of a sample of ~3n/k entries, plus 2, or
// k itself when a row of at most 64 entries is its own sample, k <= n/4). The scalar set finds
// ranks up to this one by insertion, where std::nth_element's partitioning cost ~10% of a 500-wide
// row (k = 20) and ~20% of a 4096-wide one (k = 41) on a Zen 1 core; the SIMD sets' quickselect
// beats both (its partition does not branch on the data).
constexpr int64_t kInsertRank = 40;

// The r-th largest of v[0, m) (1 <= r <= min(m, kInsertRank); no NaN), keeping the r best seen in
// descending order: an entry costs one compare unless it beats the r-th kept one.
inline float kth_largest_by_insertion(const float* v, int64_t m, int64_t r) {
  float best[kInsertRank];
  for (int64_t q = 0; q < r; ++q) {  // the first r entries, sorted descending by insertion
    const float a = v[q];
    int64_t p = q;
    while (p > 0 && best[p - 1] < a) {
      best[p] = best[p - 1];
      --p;
    }
    best[p] = a;
  }
  for (int64_t q = r; q < m; ++q) {
    const float a = v[q];
    if (!(a > best[r - 1])) continue;
    int64_t p = r - 1;
    while (p > 0 && best[p - 1] < a) {
      best[p] = best[p - 1];
      --p;
    }
    best[p] = a;
  }
  return best[r - 1];
}

// The scalar set's: k up to this takes one pass with a running threshold (select_row_small). On
// fresh rows 128-4096 wide (one Zen 3 core) that was 1.6x-3.4x faster there than the scalar
// sampled path at k = 1..6 (bench/results/sparse_grad_zen3/run_94d4a2a/topk_one_pass_scalar.txt).
// The SIMD sets have their own rule (one_pass_max_k in simd/sparse_grad.inc): with a vectorised
// filter, quickselect and take, their sampled path is the faster one from k = 3 on most widths.
constexpr int64_t kSmallK = 6;

// Small k: one pass over the row keeping the best k seen so far in `best`, ordered by (|v|
// descending, column ascending); a later entry enters only if strictly larger than the k-th kept
// one (an equal one has a higher column and loses the tie), so the final set is exactly the top k
// under the tie rule. Entries rarely beat the threshold after the first few, so the pass costs
// about one compare per entry. NaN is flagged.
inline void select_row_small(const float* row, int64_t n, int64_t k, int32_t* out, uint8_t* nan_flag,
                             std::vector<Cand>& best) {
  best.clear();
  uint8_t has_nan = 0;
  int64_t j = 0;
  for (; j < n && static_cast<int64_t>(best.size()) < k; ++j) {  // fill: insertion in order
    const float a = std::fabs(row[j]);
    if (a != a) {
      has_nan = 1;
      continue;
    }
    int64_t q = static_cast<int64_t>(best.size());
    best.push_back({a, static_cast<int32_t>(j)});
    while (q > 0 && best[q - 1].v < a) {  // strictly smaller values move down; equal ones stay ahead
      best[q] = best[q - 1];
      --q;
    }
    best[q] = {a, static_cast<int32_t>(j)};
  }
  float t = static_cast<int64_t>(best.size()) == k ? best[k - 1].v : -1.0f;
  for (; j < n; ++j) {
    const float a = std::fabs(row[j]);
    if (!(a <= t)) {  // larger than the k-th kept, or NaN
      if (a != a) {
        has_nan = 1;
        continue;
      }
      int64_t q = k - 1;
      while (q > 0 && best[q - 1].v < a) {
        best[q] = best[q - 1];
        --q;
      }
      best[q] = {a, static_cast<int32_t>(j)};
      t = best[k - 1].v;
    }
  }
  *nan_flag = has_nan;
  const int64_t m = static_cast<int64_t>(best.size());  // < k only when NaN took places (then an error)
  for (int64_t q = 0; q < m; ++q) out[q] = best[q].i;
  for (int64_t q = m; q < k; ++q) out[q] = 0;
  std::sort(out, out + k);
}

// Room the filter may write past its last candidate (a SIMD filter stores whole vectors).
constexpr int64_t kFilterSlack = 16;

// A row's candidates as two arrays (values, columns), in column order, and the scratch of the
// selection; one per thread, grown only, so that nothing is re-initialised row after row.
struct Candidates {
  std::vector<float> v, spare, sample;
  std::vector<int32_t> col;
  std::vector<Cand> best;  // select_row_small
  void reserve(int64_t n) {
    const size_t need = static_cast<size_t>(n + kFilterSlack);
    if (v.size() < need) {
      v.resize(need);
      spare.resize(need);
      col.resize(need);
    }
  }
};

// The k-th largest of v[0, m) (1 <= k <= m, no NaN) by std::nth_element. Reorders v; `spare` is
// unused here (a vectorised kth partitions into it).
inline float kth_largest_std(float* v, int64_t m, int64_t k, float* /*spare*/) {
  std::nth_element(v, v + (k - 1), v + m, std::greater<float>());
  return v[k - 1];
}

// The scalar set's: insertion for small ranks (a sample's), else std::nth_element.
inline float kth_largest_scalar(float* v, int64_t m, int64_t k, float* spare) {
  return k <= kInsertRank ? kth_largest_by_insertion(v, m, k) : kth_largest_std(v, m, k, spare);
}

// The k columns of the candidates (cv, col)[0, m) under the tie rule, given T, the k-th largest
// value among them: every candidate above T, then the first (lowest-column) ones equal to T until
// k are taken, in column order. No branch on the data: every candidate is written at out[o] and o
// advances when it is taken; the loop stops once k are (so out needs only k entries).
inline void take_top(const float* cv, const int32_t* col, int64_t m, int64_t k, float t, int32_t* out) {
  int64_t above = 0;
  for (int64_t q = 0; q < m; ++q) above += cv[q] > t;
  int64_t ties = k - above, o = 0;
  for (int64_t q = 0; q < m && o < k; ++q) {
    const float v = cv[q];
    const bool eq = v == t;
    out[o] = col[q];
    o += (v > t) | (eq & (ties > 0));
    ties -= eq;
  }
}

// filter(row, n, t, cv, col) -> m: writes |row[j]| and j for every j with !(|row[j]| < t), in
// order of j, to cv[0, m) and col[0, m); both have room for n + kFilterSlack entries, and anything
// past m is scratch. kth(v, m, k, spare) -> the k-th largest of v[0, m) (1 <= k <= m, no NaN);
// v and spare have room for m + kFilterSlack entries and may be reordered or overwritten.
// take(cv, col, m, k, t, out): as take_top (col, room m + kFilterSlack, may be overwritten).
// small_k: the largest k that takes select_row_small instead (0: none).
template <class Filter, class Kth, class Take>
void select_row(const float* row, int64_t n, int64_t k, int32_t* out, uint8_t* nan_flag, Candidates& c,
                Filter filter, Kth kth, Take take, int64_t small_k) {
  if (k <= small_k && k < n) {
    select_row_small(row, n, k, out, nan_flag, c.best);
    return;
  }
  c.reserve(n);
  float* const cv = c.v.data();
  int32_t* const col = c.col.data();
  int64_t m = 0;
  bool filtered = false;
  if (4 * k <= n) {
    // Sample size: enough that ~6 samples lie above the k-th largest (3n/k, at least 64, at most
    // kSample); a row no longer than that is its own sample, and t is then exactly the k-th largest.
    const int64_t s_len = std::min(n, std::max<int64_t>(64, std::min<int64_t>(kSample, (3 * n + k - 1) / k)));
    std::vector<float>& sample = c.sample;
    if (sample.size() < static_cast<size_t>(s_len + kFilterSlack)) sample.resize(static_cast<size_t>(s_len + kFilterSlack));
    // Sample s reads entry floor(s * n / s_len), in 32.32 fixed point: one division per row instead
    // of one per sample (a 64-bit division costs tens of cycles; this loop was a third of a
    // 500-wide row's time). n < 2^31 and s < s_len keep s * step below 2^63.
    const uint64_t step = (static_cast<uint64_t>(n) << 32) / static_cast<uint64_t>(s_len);
    for (int64_t s = 0; s < s_len; ++s) {
      const int64_t at = s_len == n ? s : static_cast<int64_t>((static_cast<uint64_t>(s) * step) >> 32);
      const float a = std::fabs(row[at]);
      sample[s] = std::isnan(a) ? std::numeric_limits<float>::infinity() : a;
    }
    // Rank in the sample: k itself when it is the row, else about twice k's share (so that ~2k pass).
    const int64_t r = s_len == n ? k : std::min<int64_t>(s_len, (2 * k * s_len + n - 1) / n + 2);
    const float t = kth(sample.data(), s_len, r, c.spare.data());
    m = filter(row, n, t, cv, col);
    filtered = m >= k;
  }
  if (!filtered) m = filter(row, n, 0.0f, cv, col);  // |v| < 0 never holds: every entry
  uint8_t has_nan = 0;
  for (int64_t q = 0; q < m; ++q) {
    if (std::isnan(cv[q])) {
      has_nan = 1;
      cv[q] = std::numeric_limits<float>::infinity();  // keeps the comparisons a strict weak order; result unspecified
    }
  }
  *nan_flag = has_nan;
  if (m == k) {
    std::copy(col, col + k, out);
    return;
  }
  // T, the k-th largest value among the candidates, from a copy (kth reorders), then the pass.
  std::vector<float>& work = c.sample;  // free again: reused as the copy kth reorders
  if (work.size() < static_cast<size_t>(m + kFilterSlack)) work.resize(static_cast<size_t>(m + kFilterSlack));
  std::copy(cv, cv + m, work.data());
  const float t = kth(work.data(), m, k, c.spare.data());
  take(cv, col, m, k, t, out);
}

}  // namespace
}  // namespace SPARSEBP_ISA_NS
}  // namespace kernels
}  // namespace sparsebp
