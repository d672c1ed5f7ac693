// The selection logic of topk_rows, shared by every kernel set: each includes this after its isa.h
// and passes its own candidate filter (scalar loop or SIMD compare). Contract: kernel_table.h.
//
// Per row: estimate a threshold t from an evenly strided sample (so that about 2k entries pass),
// collect the candidates |v| >= t in one pass (the only pass over the whole row), and select the k
// best among them (larger |v|, then lower column). Every entry outside the candidates is < t, below
// every candidate, so the answer is exact; when fewer than k pass, all entries become candidates.
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
// k itself when a row of at most 64 entries is its own sample, k <= n/4): found by insertion below
// this rank, where std::nth_element's partitioning cost ~10% of a 500-wide row (k = 20) and ~20% of
// a 4096-wide one (k = 41), measured on a Zen 1 core. (On the ~2k candidates, insertion and a
// counted rank were measured too: no faster, or slower, than nth_element.)
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

// The r-th largest of v (1 <= r <= v.size(); no NaN); reorders v.
inline float kth_largest_by_select(std::vector<float>& v, int64_t r) {
  std::nth_element(v.begin(), v.begin() + (r - 1), v.end(), std::greater<float>());
  return v[r - 1];
}

constexpr int64_t kSmallK = 8;  // at most this many: one pass with a running threshold (measured crossover ~10-16)

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

// filter(row, n, t, out) -> m: writes {|row[j]|, j} for every j with !(|row[j]| < t), in order of j,
// to out[0, m); out has room for n + kFilterSlack entries, and anything past out[m - 1] is scratch.
template <class Filter>
void select_row(const float* row, int64_t n, int64_t k, int32_t* out, uint8_t* nan_flag, std::vector<float>& sample,
                std::vector<Cand>& cand, Filter filter) {
  if (k <= kSmallK && k < n) {
    select_row_small(row, n, k, out, nan_flag, cand);
    return;
  }
  // Grows only, so the entries are not re-initialised row after row.
  if (static_cast<int64_t>(cand.size()) < n + kFilterSlack) cand.resize(static_cast<size_t>(n + kFilterSlack));
  Cand* const cd = cand.data();
  int64_t m = 0;
  bool filtered = false;
  if (4 * k <= n) {
    // Sample size: enough that ~6 samples lie above the k-th largest (3n/k, at least 64, at most
    // kSample); a row no longer than that is its own sample, and t is then exactly the k-th largest.
    const int64_t s_len = std::min(n, std::max<int64_t>(64, std::min<int64_t>(kSample, (3 * n + k - 1) / k)));
    sample.resize(static_cast<size_t>(s_len));
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
    const float t = r <= kInsertRank ? kth_largest_by_insertion(sample.data(), s_len, r)
                                     : kth_largest_by_select(sample, r);
    m = filter(row, n, t, cd);
    filtered = m >= k;
  }
  if (!filtered) m = filter(row, n, 0.0f, cd);  // |v| < 0 never holds: every entry
  uint8_t has_nan = 0;
  for (int64_t q = 0; q < m; ++q) {
    if (std::isnan(cd[q].v)) {
      has_nan = 1;
      cd[q].v = std::numeric_limits<float>::infinity();  // keep the ordering strict-weak; result unspecified
    }
  }
  *nan_flag = has_nan;
  // The candidates are in increasing column order. Find the k-th largest value T among them (on the
  // values alone), then take, in that order, every candidate above T and the first (lowest-column)
  // ones equal to T until k are taken: the tie rule, with the output already sorted.
  if (m == k) {
    for (int64_t q = 0; q < k; ++q) out[q] = cd[q].i;
    return;
  }
  std::vector<float>& vals = sample;  // free again: reused as scratch
  vals.resize(static_cast<size_t>(m));
  for (int64_t q = 0; q < m; ++q) vals[q] = cd[q].v;
  const float t = kth_largest_by_select(vals, k);
  int64_t above = 0;
  for (int64_t q = 0; q < m; ++q) above += cd[q].v > t;
  int64_t ties = k - above, o = 0;
  for (int64_t q = 0; q < m; ++q) {
    const Cand c = cd[q];
    if (c.v > t || (c.v == t && ties > 0)) {
      ties -= c.v == t;
      out[o++] = c.i;
    }
  }
}

}  // namespace
}  // namespace SPARSEBP_ISA_NS
}  // namespace kernels
}  // namespace sparsebp
