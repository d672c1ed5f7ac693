// All argument checks and the threading policy of the engine. Compiled at baseline flags; the
// kernels it calls come from the active table (dispatch.cpp).
#include "sparsebp/ops.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "kernels/kernel_table.h"
#include "sparsebp/dispatch.h"
#include "sparsebp/errors.h"
#include "sparsebp/threading.h"

namespace sparsebp {
namespace {

using kernels::KernelTable;

// A job splits across threads only from this many multiply-adds per thread (~50-100 us of work on
// one core): below it, waking a worker gains at most tens of microseconds, and beside NumPy's
// BLAS, whose threads keep spinning after each call, a worker that loses its core costs far more.
// Measured in the demo MLP (per-example meProp, batch 32, 2 cores): the backward's gathered
// products (~0.3-0.5 M multiply-adds) took 60-80 us on one thread and 275-300 us split in two
// (backward 0.38 s per epoch with this threshold against 0.62 s with 2^16). SPARSEBP_MIN_WORK
// overrides it (read on every call; the tests set it low so that small cases still split).
constexpr int64_t kMinWorkPerThread = 1 << 19;

int64_t min_work_per_thread() {
  const char* e = std::getenv("SPARSEBP_MIN_WORK");
  if (!e || !*e) return kMinWorkPerThread;
  char* end = nullptr;
  const long long v = std::strtoll(e, &end, 10);
  SPARSEBP_CHECK_VALUE(*end == '\0' && v >= 1, "SPARSEBP_MIN_WORK must be a positive integer (multiply-adds per "
                                                "thread); got '", e, "'");
  return static_cast<int64_t>(v);
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Grow-only, 64-byte aligned scratch buffers, one set per calling thread (the GIL is released
// during kernels, so several Python threads may be inside ops at once).
class Workspace {
 public:
  template <typename T = float>
  T* get(int slot, int64_t count) {
    if (slot >= static_cast<int>(bufs_.size())) bufs_.resize(slot + 1);
    Buf& b = bufs_[slot];
    const int64_t bytes = round_up(std::max<int64_t>(count, 16) * static_cast<int64_t>(sizeof(T)), 64);
    if (b.bytes < bytes) {
      void* p = std::aligned_alloc(64, static_cast<size_t>(bytes));
      if (!p) throw std::bad_alloc();
      b.ptr.reset(p);
      b.bytes = bytes;
    }
    return static_cast<T*>(b.ptr.get());
  }

 private:
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  struct Buf {
    std::unique_ptr<void, Free> ptr;
    int64_t bytes = 0;
  };
  std::vector<Buf> bufs_;
};

Workspace& workspace() {
  thread_local Workspace ws;
  return ws;
}

// How a Dense is laid out: feature-major (element (b, f) at data[f * ld + b]) or batch-major
// (at data[b * ld + f]).
struct Layout {
  bool feature_major;
  int64_t ld;
};

template <typename T>
Layout layout_of(const Dense<T>& d, const char* name) {
  const int64_t B = d.batch, F = d.features;
  if ((d.stride_batch == 1 || B <= 1) && (F <= 1 || d.stride_feature >= B)) return {true, F <= 1 ? std::max<int64_t>(B, 1) : d.stride_feature};
  if ((d.stride_feature == 1 || F <= 1) && (B <= 1 || d.stride_batch >= F)) return {false, B <= 1 ? std::max<int64_t>(F, 1) : d.stride_batch};
  throw ValueError(str_cat(name, " must be contiguous along one axis (C or Fortran order); got strides (",
                           d.stride_batch, ", ", d.stride_feature, ") in elements for shape (", B, ", ", F, ")"));
}

template <typename T>
void check_shape(const Dense<T>& d, int64_t batch, int64_t features, const char* name, const char* expect) {
  SPARSEBP_CHECK_VALUE(d.batch == batch && d.features == features, name, " must have shape ", expect, " = (", batch,
                       ", ", features, "); got (", d.batch, ", ", d.features, ")");
}

// Byte span a Dense covers (for overlap checks).
struct Span {
  const char* lo;
  const char* hi;
};
template <typename T>
Span span_of(const Dense<T>& d, const Layout& l) {
  if (d.batch == 0 || d.features == 0) return {nullptr, nullptr};
  const int64_t outer = l.feature_major ? d.features : d.batch;
  const int64_t inner = l.feature_major ? d.batch : d.features;
  const char* lo = reinterpret_cast<const char*>(d.data);
  return {lo, lo + ((outer - 1) * l.ld + inner) * static_cast<int64_t>(sizeof(float))};
}
Span span_of(const float* p, int64_t n) {
  const char* lo = reinterpret_cast<const char*>(p);
  return {lo, n > 0 && p ? lo + n * static_cast<int64_t>(sizeof(float)) : lo};
}
bool overlaps(const Span& a, const Span& b) { return a.lo < b.hi && b.lo < a.hi && a.lo != a.hi && b.lo != b.hi; }

void check_no_overlap(const Span& out, const char* out_name, std::initializer_list<std::pair<Span, const char*>> others) {
  for (const auto& o : others)
    SPARSEBP_CHECK_VALUE(!overlaps(out, o.first), out_name, " must not share memory with ", o.second);
}

kernels::CsrPattern pattern_of(const CsrStructure& w) { return {w.rows(), w.cols(), w.indptr(), w.indices()}; }

// Splits rows [0, rows) of a compressed structure into at most `parts` ranges of about equal
// cost (nonzeros + a per-row overhead). Returns the boundaries (size = ranges + 1).
std::vector<int64_t> balanced_rows(const int64_t* indptr, int64_t rows, int64_t parts) {
  constexpr int64_t kRowCost = 4;
  const int64_t total = indptr[rows] + rows * kRowCost;
  std::vector<int64_t> cut{0};
  for (int64_t i = 1; i < parts; ++i) {
    const int64_t target = total * i / parts;
    // First row r with cost(prefix up to r) >= target.
    int64_t lo = cut.back(), hi = rows;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (indptr[mid] + mid * kRowCost < target) lo = mid + 1; else hi = mid;
    }
    if (lo > cut.back() && lo < rows) cut.push_back(lo);
  }
  cut.push_back(rows);
  return cut;
}

int64_t threads_for(int64_t work) {
  return std::max<int64_t>(1, std::min<int64_t>(get_num_threads(), work / min_work_per_thread()));
}

// The same for the memory-bound block and element-wise kernels (gather, scatter, the lazy SGD, the
// ReLU; their work counted as about the bytes they move): they split only from 1 MB per thread. These
// run between NumPy's BLAS calls in the NumPy training paths, and BLAS's threads keep spinning on
// the other cores after each call; measured on 2 cores (the polarised VR-PGE step at keep 0.25,
// interleaved with dense steps, three pairs of runs): 0.38x-0.48x of a dense step with this
// threshold against 0.51x-0.53x when they split from 64 KB, the dense steps unchanged. Alone, a second
// thread speeds such a kernel up (a 400 KB gather: 46 -> 17 us); beside BLAS it loses more than
// that waiting for a core.
constexpr int64_t kMinBlockBytesPerThread = 1 << 20;

int64_t block_threads_for(int64_t bytes) {
  return std::max<int64_t>(1, std::min<int64_t>(get_num_threads(), bytes / kMinBlockBytesPerThread));
}

// dst (cols x rows, leading dim ldd) = transpose of src (rows x cols, leading dim lds).
void transpose_parallel(const KernelTable& t, const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst,
                        int64_t ldd) {
  if (rows == 0 || cols == 0) return;
  const kernels::TransposeArgs args{src, lds, dst, ldd, cols};
  const int64_t nt = threads_for(rows * cols / 4);
  parallel_for(nt, [&](int64_t i) {
    const int64_t r0 = round_up(rows * i / nt, 8), r1 = i + 1 == nt ? rows : round_up(rows * (i + 1) / nt, 8);
    if (r0 < r1) t.transpose(args, r0, std::min(r1, rows));
  });
}

// A feature-major view of `d` for the kernels: itself if already so (and its stride is harmless),
// else a transposed or re-strided copy in workspace `slot`.
const float* feature_major_in(const KernelTable& t, const DenseIn& d, const Layout& l, int slot, int64_t* ld) {
  if (l.feature_major && (l.ld % 128 != 0 || d.batch <= 16 || d.features <= 1)) {
    *ld = l.ld;
    return d.data;
  }
  *ld = padded_ld(d.batch);
  float* buf = workspace().get(slot, d.features * *ld);
  if (l.feature_major) {
    const int64_t nt = threads_for(d.batch * d.features / 4);
    parallel_for(nt, [&](int64_t i) {
      for (int64_t f = d.features * i / nt; f < d.features * (i + 1) / nt; ++f)
        std::memcpy(buf + f * *ld, d.data + f * l.ld, static_cast<size_t>(d.batch) * sizeof(float));
    });
  } else {
    transpose_parallel(t, d.data, d.batch, d.features, l.ld, buf, *ld);
  }
  return buf;
}

// A feature-major operand cut into batch tiles of `tile` columns, tile k at data + k * stride with
// leading dimension ld (ld = tile and stride = features * tile when packed). The kernels gather
// whole rows of one tile at random; packed, those rows lie in one contiguous block instead of
// being strided across the full batch. Measured on a Zen 1 core (1 thread, batch 256, AVX2 tiles
// of 64): the forward 1.18x-1.23x and the SDDMM 1.34x-1.44x faster over 768->3072, 3072->768 and
// 4096^2 at s = 0.8-0.95. Why is not pinned down (this VM exposes no hardware counters); the
// strided rows of one tile span four times as many pages and cache sets. One tile (batch <= tile)
// is not repacked.
struct Tiles {
  const float* data;
  int64_t ld;
  int64_t stride;
  int64_t count;
  int64_t tile;
  const float* at(int64_t k) const { return data + k * stride; }
  int64_t width(int64_t k, int64_t batch) const { return std::min(tile, batch - k * tile); }
};

Tiles tiled_in(const KernelTable& t, const DenseIn& d, const Layout& l, int slot, int64_t tile) {
  const int64_t B = d.batch, F = d.features;
  const char* env = std::getenv("SPARSEBP_TILE_PACK");
  if (B <= tile || (env && std::strcmp(env, "0") == 0)) {
    int64_t ld;
    const float* p = feature_major_in(t, d, l, slot, &ld);
    return {p, ld, 0, 1, std::max<int64_t>(B, 1)};
  }
  const int64_t n = (B + tile - 1) / tile;
  float* buf = workspace().get(slot, n * F * tile);
  if (l.feature_major) {
    const int64_t nt = threads_for(B * F / 4);
    parallel_for(nt, [&](int64_t i) {
      for (int64_t f = F * i / nt; f < F * (i + 1) / nt; ++f)
        for (int64_t k = 0; k < n; ++k)
          std::memcpy(buf + k * F * tile + f * tile, d.data + f * l.ld + k * tile,
                      static_cast<size_t>(std::min(tile, B - k * tile)) * sizeof(float));
    });
  } else {
    // One parallel region: each thread transposes its batch rows (multiples of 8), tile by tile.
    const int64_t nt = threads_for(B * F / 4);
    parallel_for(nt, [&](int64_t i) {
      const int64_t r0 = round_up(B * i / nt, 8), r1 = i + 1 == nt ? B : round_up(B * (i + 1) / nt, 8);
      for (int64_t k = r0 / tile; k * tile < std::min(r1, B); ++k) {
        const int64_t b0 = k * tile;
        const kernels::TransposeArgs a{d.data + b0 * l.ld, l.ld, buf + k * F * tile, tile, F};
        const int64_t lo = std::max(r0, b0) - b0, hi = std::min({r1, B, b0 + tile}) - b0;
        if (lo < hi) t.transpose(a, lo, hi);
      }
    });
  }
  return {buf, tile, F * tile, n, tile};
}

// The forward kernel over rows [r0, r1) of `a`, one batch tile of `in` at a time, into the
// matching columns of a.yt.
void forward_by_tiles(const KernelTable& t, const kernels::LinearForwardArgs& a, const Tiles& in, int64_t batch,
                      int64_t r0, int64_t r1) {
  for (int64_t k = 0; k < in.count; ++k) {
    kernels::LinearForwardArgs ak = a;
    ak.xt = in.at(k);
    ak.yt = a.yt + k * in.tile;
    ak.batch = in.width(k, batch);
    t.linear_forward(ak, r0, r1);
  }
}

// Column-panel width for a gather over `cols` feature rows of `tile` batch columns each: about
// kPanelBytes of rows per panel (they stay in L2; measured best at 512 KB on a 1 MB L2), but at
// least ~4 nonzeros per row and panel (each row pays a little per panel), and a single sweep when
// splitting would barely help. `tile` is the kernel's register tile, capped by the batch.
int64_t panel_width(int64_t cols, int64_t tile, int64_t nnz, int64_t rows) {
  static const int64_t kPanelBytes = [] {
    const char* e = std::getenv("SPARSEBP_PANEL_KB");
    return (e && *e ? std::atoll(e) : 512) * 1024;
  }();
  const double density = rows > 0 && cols > 0 ? static_cast<double>(nnz) / (static_cast<double>(rows) * cols) : 1.0;
  int64_t p = std::max<int64_t>(64, kPanelBytes / (tile * 4));
  p = std::max<int64_t>(p, static_cast<int64_t>(4.0 / std::max(density, 1e-9)));
  return p * 3 / 2 >= cols ? std::max<int64_t>(cols, 1) : p;
}

}  // namespace

int64_t padded_ld(int64_t batch) {
  int64_t ld = round_up(std::max<int64_t>(batch, 1), 16);
  if (ld % 128 == 0) ld += 16;
  return ld;
}

void linear_forward(const CsrStructure& w, const float* values, int64_t values_len, const float* bias,
                    int64_t bias_len, const DenseIn& x, const DenseOut& y) {
  SPARSEBP_CHECK_VALUE(values_len == w.nnz(), "values must have nnz = ", w.nnz(), " entries; got ", values_len);
  if (bias) SPARSEBP_CHECK_VALUE(bias_len == w.rows(), "bias must have shape (", w.rows(), ",); got (", bias_len, ",)");
  check_shape(x, x.batch, w.cols(), "x", "(batch, in_features)");
  check_shape(y, x.batch, w.rows(), "out", "(batch, out_features)");
  const Layout lx = layout_of(x, "x"), ly = layout_of(y, "out");
  check_no_overlap(span_of(y, ly), "out",
                   {{span_of(x, lx), "x"}, {span_of(values, values_len), "values"}, {span_of(bias, bias_len), "bias"}});
  const int64_t B = x.batch;
  if (B == 0 || w.rows() == 0) return;

  const KernelTable& t = active_table();
  const Tiles xt = tiled_in(t, x, lx, 0, t.forward_tile_cols);
  int64_t ldy = ly.ld;
  float* yt = y.data;
  if (!ly.feature_major) {
    ldy = padded_ld(B);
    yt = workspace().get(1, w.rows() * ldy);
  }
  const int64_t tile = std::min<int64_t>(t.forward_tile_cols, round_up(B, 8));
  int64_t* cursor = workspace().get<int64_t>(4, w.rows());
  const kernels::LinearForwardArgs args{pattern_of(w), values, nullptr, bias, xt.data, xt.ld, yt, ldy, B,
                                        panel_width(w.cols(), tile, w.nnz(), w.rows()), cursor};
  const std::vector<int64_t> cut = balanced_rows(w.indptr(), w.rows(), threads_for((w.nnz() + w.rows()) * B));
  parallel_for(static_cast<int64_t>(cut.size()) - 1,
               [&](int64_t i) { forward_by_tiles(t, args, xt, B, cut[i], cut[i + 1]); });
  if (!ly.feature_major) transpose_parallel(t, yt, w.rows(), B, ldy, y.data, ly.ld);
}

void linear_backward(const CsrStructure& w, const float* values, int64_t values_len, const DenseIn& grad_output,
                     const DenseIn& x, const DenseOut* grad_input, float* grad_values, int64_t grad_values_len,
                     float* grad_bias, int64_t grad_bias_len) {
  const int64_t nnz = w.nnz();
  SPARSEBP_CHECK_VALUE(values_len == nnz, "values must have nnz = ", nnz, " entries; got ", values_len);
  if (grad_values)
    SPARSEBP_CHECK_VALUE(grad_values_len == nnz, "grad_values must have nnz = ", nnz, " entries; got ", grad_values_len);
  check_shape(x, x.batch, w.cols(), "x", "(batch, in_features)");
  check_shape(grad_output, x.batch, w.rows(), "grad_output", "(batch, out_features)");
  if (grad_bias)
    SPARSEBP_CHECK_VALUE(grad_bias_len == w.rows(), "grad_bias must have shape (", w.rows(), ",); got (", grad_bias_len,
                         ",)");
  const Layout lx = layout_of(x, "x"), lg = layout_of(grad_output, "grad_output");
  Layout ldx_l{true, 0};
  const Span sx = span_of(x, lx), sg = span_of(grad_output, lg), sv = span_of(values, values_len);
  const Span sgv = span_of(grad_values, grad_values_len), sgb = span_of(grad_bias, grad_bias_len);
  check_no_overlap(sgv, "grad_values", {{sx, "x"}, {sg, "grad_output"}, {sv, "values"}, {sgb, "grad_bias"}});
  check_no_overlap(sgb, "grad_bias", {{sx, "x"}, {sg, "grad_output"}, {sv, "values"}});
  if (grad_input) {
    check_shape(*grad_input, x.batch, w.cols(), "grad_input", "(batch, in_features)");
    ldx_l = layout_of(*grad_input, "grad_input");
    check_no_overlap(span_of(*grad_input, ldx_l), "grad_input",
                     {{sx, "x"}, {sg, "grad_output"}, {sv, "values"}, {sgv, "grad_values"}, {sgb, "grad_bias"}});
  }
  const int64_t B = x.batch;
  if (B == 0) {
    if (grad_values) std::fill(grad_values, grad_values + nnz, 0.0f);
    if (grad_bias) std::fill(grad_bias, grad_bias + w.rows(), 0.0f);
    return;
  }

  const KernelTable& t = active_table();
  // G is gathered by the input gradient and X by the SDDMM: both in the forward's batch tiles.
  const Tiles gt = tiled_in(t, grad_output, lg, 0, t.forward_tile_cols);
  const Tiles xt = tiled_in(t, x, lx, 1, t.forward_tile_cols);
  const int64_t fwd_tile = std::min<int64_t>(t.forward_tile_cols, round_up(B, 8));
  const int64_t sddmm_tile = std::min<int64_t>(t.sddmm_tile_cols, round_up(B, 8));
  const int64_t rows = w.rows(), cols = w.cols();

  // Weight (and bias) gradient at the stored entries: rows split across threads; every entry is
  // computed by one thread in a fixed order, so the bits do not depend on the thread count.
  if (!grad_values && grad_bias) {
    // Frozen weights: the bias gradient alone, a sum over each row of G^T.
    const std::vector<int64_t> cut = balanced_rows(w.indptr(), rows, threads_for(rows * B));
    parallel_for(static_cast<int64_t>(cut.size()) - 1, [&](int64_t i) {
      for (int64_t o = cut[i]; o < cut[i + 1]; ++o) {
        float s = 0.0f;
        for (int64_t k = 0; k < gt.count; ++k) {
          const float* g = gt.at(k) + o * gt.ld;
          for (int64_t b = 0, wk = gt.width(k, B); b < wk; ++b) s += g[b];
        }
        grad_bias[o] = s;
      }
    });
  }
  if (grad_values) {
    int64_t* cursor = workspace().get<int64_t>(4, rows);
    const kernels::SddmmArgs a{pattern_of(w), gt.data, gt.ld, xt.data, xt.ld, grad_values, grad_bias, B,
                               panel_width(cols, sddmm_tile, nnz, rows), cursor, false};
    const std::vector<int64_t> cut = balanced_rows(w.indptr(), rows, threads_for((nnz + rows) * B));
    parallel_for(static_cast<int64_t>(cut.size()) - 1, [&](int64_t i) {
      for (int64_t k = 0; k < xt.count; ++k) {
        kernels::SddmmArgs ak = a;
        ak.gt = gt.at(k);
        ak.xt = xt.at(k);
        ak.batch = xt.width(k, B);
        ak.accumulate = k > 0;
        t.sddmm(ak, cut[i], cut[i + 1]);
      }
    });
  }

  // Input gradient dX^T = W^T G^T: the forward kernel over the transposed structure, with W's
  // values copied into CSC order (measured faster than scattering into dX^T in the SDDMM sweep:
  // the scatter's read-modify-write of dX^T rows costs more than a second, gathering sweep).
  if (grad_input) {
    float* dxt = grad_input->data;
    int64_t lddx = ldx_l.ld;
    if (!ldx_l.feature_major) {
      lddx = padded_ld(B);
      dxt = workspace().get(2, cols * lddx);
    }
    const CscStructure& csc = w.csc();
    int64_t* cursor = workspace().get<int64_t>(5, cols);
    // W's values in CSC order: one gathering copy per call (nnz floats, read once each), then the
    // kernel reads them in sequence. Measured against reading values[perm[p]] inside the kernel:
    // 0.68x-1.06x of its time over the bench layers (the indirect reads miss the cache once the
    // values outgrow L2, and inside the kernel they stall the FMA chains).
    float* vals = workspace().get(6, nnz);
    {
      const int64_t* perm = csc.perm.data();
      const int64_t nt = block_threads_for(nnz * 16);  // bytes moved: perm, value, copy
      parallel_for(nt, [&](int64_t i) {
        const int64_t p0 = nnz * i / nt, p1 = nnz * (i + 1) / nt;
        for (int64_t p = p0; p < p1; ++p) vals[p] = values[perm[p]];
      });
    }
    const kernels::LinearForwardArgs a{{cols, rows, csc.colptr.data(), csc.rowidx.data()},
                                       vals, nullptr, nullptr, gt.data, gt.ld, dxt, lddx, B,
                                       panel_width(rows, fwd_tile, nnz, cols), cursor};
    const std::vector<int64_t> cut = balanced_rows(csc.colptr.data(), cols, threads_for((nnz + cols) * B));
    parallel_for(static_cast<int64_t>(cut.size()) - 1,
                 [&](int64_t i) { forward_by_tiles(t, a, gt, B, cut[i], cut[i + 1]); });
    if (!ldx_l.feature_major) transpose_parallel(t, dxt, cols, B, lddx, grad_input->data, ldx_l.ld);
  }
}

namespace {

void check_gather(const int64_t* indptr, int64_t rows, const int64_t* offsets, int64_t nnz_len, int64_t x_len,
                  int64_t y_len, const GatherGeometry& g, const char* y_name) {
  SPARSEBP_CHECK_VALUE(rows >= 0, "rows must be >= 0; got ", rows);
  SPARSEBP_CHECK_VALUE(indptr[0] == 0, "indptr[0] must be 0; got ", indptr[0]);
  for (int64_t o = 0; o < rows; ++o)
    SPARSEBP_CHECK_VALUE(indptr[o + 1] >= indptr[o], "indptr must not decrease (row ", o, ")");
  SPARSEBP_CHECK_VALUE(indptr[rows] == nnz_len, "indptr[-1] must equal len(offsets) = ", nnz_len, "; got ",
                       indptr[rows]);
  for (int64_t v : {g.ncols, g.seg_outer, g.seg_inner, g.x_outer, g.x_inner, g.y_row, g.y_outer, g.y_inner})
    SPARSEBP_CHECK_VALUE(v >= 0, "gather geometry must be non-negative; got ", v);
  if (g.taps) {
    SPARSEBP_CHECK_VALUE(g.windows && g.ntaps >= 1 && g.ntaps <= 64, "taps needs windows with 1 to 64 rows; got ",
                         g.ntaps);
    for (int64_t p = 0; p < nnz_len; ++p)
      SPARSEBP_CHECK_VALUE(g.taps[p] >= 0 && g.taps[p] < g.ntaps, "taps[", p, "] = ", g.taps[p], " is outside [0, ",
                           g.ntaps, ")");
  }
  if (rows == 0 || g.ncols == 0 || g.seg_outer == 0 || g.seg_inner == 0) return;
  const int64_t x_span = (g.seg_outer - 1) * g.x_outer + (g.seg_inner - 1) * g.x_inner + g.ncols;
  for (int64_t p = 0; p < nnz_len; ++p) {
    if (g.taps) {  // the cells of x the window lets the entry read
      const int64_t* w = g.windows + 4 * int64_t{g.taps[p]};
      const int64_t s0 = std::max<int64_t>(w[0], 0), s1 = std::min(w[1], g.seg_outer);
      const int64_t c0 = std::max<int64_t>(w[2], 0), c1 = std::min(w[3], g.ncols);
      if (s0 >= s1 || c0 >= c1) continue;
      const int64_t first = offsets[p] + s0 * g.x_outer + c0;
      const int64_t last = offsets[p] + (s1 - 1) * g.x_outer + (g.seg_inner - 1) * g.x_inner + c1 - 1;
      SPARSEBP_CHECK_VALUE(first >= 0 && last < x_len, "offsets[", p, "] = ", offsets[p], " with its window reads ",
                           "outside x (", x_len, " elements)");
      continue;
    }
    SPARSEBP_CHECK_VALUE(offsets[p] >= 0 && offsets[p] <= x_len - x_span, "offsets[", p, "] = ", offsets[p],
                         " reads outside x (", x_len, " elements; segments span ", x_span, ")");
  }
  const int64_t y_span = (rows - 1) * g.y_row + (g.seg_outer - 1) * g.y_outer + (g.seg_inner - 1) * g.y_inner + g.ncols;
  SPARSEBP_CHECK_VALUE(y_span <= y_len, y_name, " has ", y_len, " elements; the geometry needs ", y_span);
}

void check_blocks(const int64_t* indptr, int64_t rows, const GatherGeometry& g) {
  if (!g.blocks) return;
  SPARSEBP_CHECK_VALUE(g.nblocks >= 1, "blocks needs nblocks >= 1; got ", g.nblocks);
  const int64_t w = g.nblocks + 1;
  for (int64_t o = 0; o < rows; ++o) {
    const int64_t* b = g.blocks + o * w;
    SPARSEBP_CHECK_VALUE(b[0] == indptr[o] && b[g.nblocks] == indptr[o + 1], "blocks row ", o,
                         " must run from indptr[", o, "] = ", indptr[o], " to indptr[", o + 1, "] = ", indptr[o + 1]);
    for (int64_t k = 0; k < g.nblocks; ++k)
      SPARSEBP_CHECK_VALUE(b[k] <= b[k + 1], "blocks must not decrease along a row (row ", o, ")");
  }
}

// The arguments both gather passes share (structure, x, geometry, blocks, windows); the caller
// sets its own operands.
kernels::GatherArgs gather_args(int64_t rows, const int64_t* indptr, const int64_t* offsets, const float* x,
                                const GatherGeometry& g) {
  kernels::GatherArgs a{};
  a.rows = rows, a.indptr = indptr, a.offsets = offsets, a.x = x;
  a.y_row = g.y_row, a.y_outer = g.y_outer, a.y_inner = g.y_inner, a.x_outer = g.x_outer, a.x_inner = g.x_inner;
  a.seg_outer = g.seg_outer, a.seg_inner = g.seg_inner, a.ncols = g.ncols;
  a.blocks = g.blocks, a.nblocks = g.nblocks;
  a.taps = g.taps, a.windows = g.windows, a.ntaps = g.ntaps;
  return a;
}

// One gather pass (checked by the caller), output rows split across threads by their nonzeros.
void run_gather(kernels::GatherFn KernelTable::*fn, const kernels::GatherArgs& a) {
  if (a.rows == 0 || a.ncols == 0) return;
  const KernelTable& t = active_table();
  const int64_t work = (a.indptr[a.rows] + a.rows) * a.ncols * a.seg_outer * a.seg_inner;
  const std::vector<int64_t> cut = balanced_rows(a.indptr, a.rows, threads_for(work));
  parallel_for(static_cast<int64_t>(cut.size()) - 1, [&](int64_t i) { (t.*fn)(a, cut[i], cut[i + 1]); });
}

}  // namespace

void gather_forward(const int64_t* indptr, int64_t rows, const int64_t* offsets, int64_t offsets_len,
                    const float* values, int64_t values_len, const int64_t* value_index, int64_t value_index_len,
                    const float* bias, int64_t bias_len, const float* x, int64_t x_len, float* y, int64_t y_len,
                    const GatherGeometry& geo) {
  check_gather(indptr, rows, offsets, offsets_len, x_len, y_len, geo, "y");
  if (value_index) {
    SPARSEBP_CHECK_VALUE(value_index_len == offsets_len, "value_index must have ", offsets_len, " entries; got ",
                         value_index_len);
    for (int64_t p = 0; p < value_index_len; ++p)
      SPARSEBP_CHECK_VALUE(value_index[p] >= 0 && value_index[p] < values_len, "value_index[", p, "] = ",
                           value_index[p], " is outside values (", values_len, ")");
  } else {
    SPARSEBP_CHECK_VALUE(values_len == offsets_len, "values must have ", offsets_len, " entries; got ", values_len);
  }
  if (bias) SPARSEBP_CHECK_VALUE(bias_len == rows, "bias must have ", rows, " entries; got ", bias_len);
  check_no_overlap(span_of(y, y_len), "y", {{span_of(x, x_len), "x"}, {span_of(values, values_len), "values"},
                                            {span_of(bias, bias_len), "bias"}});
  check_blocks(indptr, rows, geo);
  kernels::GatherArgs a = gather_args(rows, indptr, offsets, x, geo);
  a.values = values, a.value_index = value_index, a.bias = bias, a.y = y;
  run_gather(&KernelTable::gather_forward, a);
}

void gather_sddmm(const int64_t* indptr, int64_t rows, const int64_t* offsets, int64_t offsets_len, const float* g,
                  int64_t g_len, const float* x, int64_t x_len, float* dvalues, int64_t dvalues_len, float* dbias,
                  int64_t dbias_len, const GatherGeometry& geo) {
  check_gather(indptr, rows, offsets, offsets_len, x_len, g_len, geo, "g");
  SPARSEBP_CHECK_VALUE(dvalues_len == offsets_len, "dvalues must have ", offsets_len, " entries; got ", dvalues_len);
  if (dbias) SPARSEBP_CHECK_VALUE(dbias_len == rows, "dbias must have ", rows, " entries; got ", dbias_len);
  check_no_overlap(span_of(dvalues, dvalues_len), "dvalues",
                   {{span_of(x, x_len), "x"}, {span_of(g, g_len), "g"}, {span_of(dbias, dbias_len), "dbias"}});
  check_no_overlap(span_of(dbias, dbias_len), "dbias", {{span_of(x, x_len), "x"}, {span_of(g, g_len), "g"}});
  std::fill(dvalues, dvalues + dvalues_len, 0.0f);
  if (dbias) std::fill(dbias, dbias + dbias_len, 0.0f);
  check_blocks(indptr, rows, geo);
  kernels::GatherArgs a = gather_args(rows, indptr, offsets, x, geo);
  a.g = g, a.dvalues = dvalues, a.dbias = dbias;
  run_gather(&KernelTable::gather_sddmm, a);
}

// ---- Sparse gradients -----------------------------------------------------------------------------

namespace {
// indptr: rows + 1 non-decreasing offsets from 0 to nnz; every index in [0, bound).
void check_row_csr(const int64_t* indptr, int64_t rows, const int32_t* indices, int64_t nnz, int64_t bound,
                   const char* what) {
  SPARSEBP_CHECK_VALUE(indptr[0] == 0 && indptr[rows] == nnz, "indptr must start at 0 and end at nnz = ", nnz);
  for (int64_t r = 0; r < rows; ++r)
    SPARSEBP_CHECK_VALUE(indptr[r] <= indptr[r + 1], "indptr must be non-decreasing (row ", r, ")");
  for (int64_t p = 0; p < nnz; ++p)
    SPARSEBP_CHECK_VALUE(indices[p] >= 0 && indices[p] < bound, "indices[", p, "] = ", indices[p], " is outside ",
                         what, " ", bound, " rows");
}
}  // namespace

void topk_rows(const float* g, int64_t rows, int64_t n, int64_t ldg, int64_t k, int32_t* idx) {
  SPARSEBP_CHECK_VALUE(k >= 0, "k must be >= 0; got ", k);
  SPARSEBP_CHECK_VALUE(rows >= 0 && n >= 0 && ldg >= n, "bad shape for topk_rows");
  SPARSEBP_CHECK_VALUE(n <= INT32_MAX, "topk_rows: rows longer than 2^31 - 1 are not supported; got ", n);
  const int64_t kk = std::min(k, n);
  if (rows == 0 || kk == 0) return;
  if (kk == n) {  // every column, in order
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < n; ++j) idx[r * n + j] = static_cast<int32_t>(j);
    return;
  }
  const KernelTable& t = active_table();
  std::vector<uint8_t> nan_rows(static_cast<size_t>(rows), 0);
  // SPARSEBP_TOPK_ONE_PASS=K (for comparisons): k <= K takes the one-pass path on every kernel set
  // (0: never), instead of each set's own rule; read on every call, so a process can alternate.
  int64_t one_pass_k = -1;
  if (const char* env = std::getenv("SPARSEBP_TOPK_ONE_PASS"); env && *env)
    one_pass_k = std::max<int64_t>(0, std::atoll(env));
  const kernels::TopkArgs a{g, ldg, n, kk, idx, nan_rows.data(), one_pass_k};
  // An entry costs ~3.5 ns here in 500-wide rows (k = 20) and ~2 ns in 4096-wide ones (k = 164),
  // Zen 1, about what 24 (12) multiply-adds of the product kernels cost, which threads_for counts:
  // so 256 x 500 (~0.45 ms) splits, while the demo's 32 x 500 (~45 us, beside NumPy's BLAS) stays
  // on one thread.
  const int64_t nt = threads_for(rows * n * 24);
  parallel_for(nt, [&](int64_t i) { t.topk_rows(a, rows * i / nt, rows * (i + 1) / nt); });
  for (int64_t r = 0; r < rows; ++r)
    SPARSEBP_CHECK_VALUE(!nan_rows[static_cast<size_t>(r)], "g holds NaN (row ", r, "); top-k is undefined there");
}

void abs_colsum(const float* g, int64_t rows, int64_t n, int64_t ldg, float* out) {
  SPARSEBP_CHECK_VALUE(rows >= 0 && n >= 0 && ldg >= n, "bad shape for abs_colsum");
  if (n == 0) return;
  const KernelTable& t = active_table();
  const kernels::AbsColsumArgs a{g, ldg, rows, out};
  const int64_t chunks = (n + 63) / 64;
  const int64_t nt = std::min(threads_for(rows * n), chunks);
  parallel_for(nt, [&](int64_t i) {
    const int64_t c0 = std::min(n, chunks * i / nt * 64), c1 = std::min(n, chunks * (i + 1) / nt * 64);
    if (c0 < c1) t.abs_colsum(a, c0, c1);
  });
}

void msbp_step(const float* g, int64_t rows, int64_t n, int64_t ldg, const float* m, int64_t ldm, float* u,
               int64_t ldu, float alpha, int64_t k, int32_t* cols, float* m_out, int64_t ldmo) {
  SPARSEBP_CHECK_VALUE(rows >= 0 && n >= 0 && ldg >= n && ldmo >= n && (!m || (ldm >= n && ldu >= n)),
                       "bad shape for msbp_step");
  SPARSEBP_CHECK_VALUE(k >= 0, "k must be >= 0; got ", k);
  const KernelTable& t = active_table();
  // Row by row (the operands may have padded rows): u = g + m and the next memory before the
  // selection's zeros, alpha * u with subnormals flushed. The memory of a unit whose gradient stays
  // 0 (a ReLU that does not fire) shrinks by alpha every step, and would otherwise stay subnormal
  // for many steps (23 at alpha = 0.5), slowing every sum and product it enters.
  for (int64_t r = 0; r < rows; ++r) {
    const kernels::ScaleFlushArgs a{g + r * ldg, m ? m + r * ldm : nullptr, m ? u + r * ldu : nullptr,
                                    m_out + r * ldmo, alpha};
    t.scale_flush(a, 0, n);
  }
  std::vector<float> scores(static_cast<size_t>(n));
  abs_colsum(m ? u : g, rows, n, m ? ldu : ldg, scores.data());
  const int64_t kk = std::min(k, n);
  topk_rows(scores.data(), 1, n, n, kk, cols);  // NaN: a ValueError (m_out is then scratch)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t q = 0; q < kk; ++q) m_out[r * ldmo + cols[q]] = 0.0f;
}

void spmm_rows(const int64_t* indptr, int64_t rows, const int32_t* indices, const float* values, int64_t nnz,
               const float* d, int64_t d_rows, int64_t ldd, int64_t ncols, float* out, int64_t ldo) {
  SPARSEBP_CHECK_VALUE(rows >= 0 && ncols >= 0 && ldd >= ncols && ldo >= ncols, "bad shape for spmm_rows");
  check_row_csr(indptr, rows, indices, nnz, d_rows, "the dense operand's");
  if (rows == 0 || ncols == 0) return;
  const KernelTable& t = active_table();
  // A d within a last-level cache share is gathered whole-row (one panel as wide as d, in whole
  // 64-float tiles): each output row is then written once. Column panels keeping the gathered
  // slice within ~512 KB (the L2) were slower, each re-walking the row pointers and indices:
  // per-example meProp's weight gradient, d = x of 256 x 4096, one thread, 17.9 ms against 23.6 on
  // a Zen 3 core (19 against 24 on Zen 1); no case measured slower (batches 32-256, widths 500-4096).
  int64_t panel = std::max<int64_t>(64, (ncols + 63) / 64 * 64);
  // A d larger than 8 MB (the per-example meProp input gradient, d = W) cannot be reused from
  // cache by the rows that gather from it: tiles of 128 of its rows are. So is a d over 2 MB with
  // 512 rows or more (W of 768..1536-wide layers; Zen 3, batches 32 and 256, one core: 0.07 /
  // 0.46 ms against 0.11 / 0.58 unblocked at 768^2, 0.13 / 0.89 against 0.28 / 2.22 at 1024^2,
  // 1.94 against 2.93 at 1536^2, batch 256); not a d of fewer rows (x in the weight gradient,
  // whose rows are a batch: 0.82 against 0.74 ms unblocked at 256 x 1024). The tile's width: what
  // fits in the larger of 512 KB and 1/16 of the last-level cache share (every output row streams
  // through that cache once per tile, beside it). Measured at 4096^2, batch 256, 164 entries per
  // row, one core:
  //   Zen 1 (512 KB L2, 8 MB L3): 1024-column tiles, 29 ms against 67 unblocked; 64..256-row
  //     blocks and 256..4096-column panels were slower.
  //   Zen 3 (512 KB L2, 32 MB L3): 4096-column tiles, 15.0 ms against 18.6 for 1024 and 17.5 for
  //     2048; also faster at batches 32 and 100 and at 2 threads (2.7 / 7.0 / 8.3 ms against
  //     3.5 / 9.2 / 10.1), and at 2048^2 and 8192^2. 64-, 256- and 512-row blocks were slower.
  // An unknown cache share gives the Zen 1's tiles; tiles stop at 2 MB, the widest measured (a
  // share the hypervisor reports whole, as glibc does the socket's 256 MB here, gets no wider).
  // Blocks need non-decreasing indices in each row.
  int64_t dblock = 0;
  if (d_rows * ncols > (int64_t{2} << 20) || (d_rows >= 512 && d_rows * ncols > (int64_t{512} << 10))) {
    dblock = 128;
    const int64_t tile_bytes =
        std::min<int64_t>(int64_t{2} << 20, std::max<int64_t>(int64_t{512} << 10, llc_share_bytes() / 16));
    panel = std::max<int64_t>(64, tile_bytes / (4 * dblock) / 64 * 64);
  }
  if (const char* env = std::getenv("SPARSEBP_SPMM_PANEL"); env && *env)  // (set and not empty)
    panel = std::max<int64_t>(1, std::atoll(env));
  if (const char* env = std::getenv("SPARSEBP_SPMM_DBLOCK"); env && *env)
    dblock = std::max<int64_t>(0, std::atoll(env));
  for (int64_t r = 0; r < rows && dblock > 0; ++r)
    for (int64_t p = indptr[r] + 1; p < indptr[r + 1]; ++p)
      if (indices[p] < indices[p - 1]) {
        dblock = 0;
        break;
      }
  const kernels::SpmmRowsArgs a{indptr, indices, values, d, ldd, out, ldo, ncols, panel, d_rows, dblock};
  const std::vector<int64_t> cut = balanced_rows(indptr, rows, threads_for((nnz + rows) * ncols));
  parallel_for(static_cast<int64_t>(cut.size()) - 1, [&](int64_t i) { t.spmm_rows(a, cut[i], cut[i + 1]); });
}

void transpose(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst, int64_t ldd) {
  SPARSEBP_CHECK_VALUE(rows >= 0 && cols >= 0 && (rows <= 1 || lds >= cols) && (cols <= 1 || ldd >= rows),
                       "bad shape for transpose");
  const char* s0 = reinterpret_cast<const char*>(src);
  const char* d0 = reinterpret_cast<const char*>(dst);
  if (rows > 0 && cols > 0) {
    const char* s1 = reinterpret_cast<const char*>(src + (rows - 1) * lds + cols);
    const char* d1 = reinterpret_cast<const char*>(dst + (cols - 1) * ldd + rows);
    SPARSEBP_CHECK_VALUE(s1 <= d0 || d1 <= s0, "transpose: the source and destination overlap");
  }
  transpose_parallel(active_table(), src, rows, cols, lds, dst, ldd);
}

void spmm_scatter(const int64_t* indptr, int64_t rows, const int32_t* indices, const float* values, int64_t nnz,
                  const float* d, int64_t ldd, int64_t ncols, float* out, int64_t out_rows, int64_t ldo) {
  SPARSEBP_CHECK_VALUE(rows >= 0 && ncols >= 0 && ldd >= ncols && ldo >= ncols && out_rows >= 0,
                       "bad shape for spmm_scatter");
  check_row_csr(indptr, rows, indices, nnz, out_rows, "the output's");
  if (out_rows == 0 || ncols == 0) return;
  const KernelTable& t = active_table();
  // Panel: out's slice (out_rows x panel floats) within ~512 KB, whole 64-float tiles.
  int64_t panel = std::max<int64_t>(64, (int64_t{512} << 10) / (4 * out_rows) / 64 * 64);
  if (const char* env = std::getenv("SPARSEBP_SPMM_PANEL"); env && *env)  // (set and not empty)
    panel = std::max<int64_t>(1, std::atoll(env));
  const kernels::SpmmScatterArgs a{indptr, indices, values, rows, d, ldd, out, ldo, out_rows, panel};
  // Threads own column ranges (whole 64-float tiles), so no two write the same element.
  const int64_t tiles = (ncols + 63) / 64;
  const int64_t nt = std::min(threads_for((nnz + rows) * ncols), tiles);
  parallel_for(nt, [&](int64_t i) {
    const int64_t c0 = std::min(ncols, tiles * i / nt * 64), c1 = std::min(ncols, tiles * (i + 1) / nt * 64);
    if (c0 < c1) t.spmm_scatter(a, c0, c1);
  });
}

double softmax_xent(const float* z, int64_t rows, int64_t classes, int64_t ldz, const int64_t* labels, float* grad) {
  SPARSEBP_CHECK_VALUE(rows >= 0 && classes >= 1 && ldz >= classes, "bad shape for softmax_xent");
  for (int64_t r = 0; r < rows; ++r)
    SPARSEBP_CHECK_VALUE(labels[r] >= 0 && labels[r] < classes, "labels[", r, "] = ", labels[r],
                         " is outside [0, ", classes, ")");
  const float tiny = std::numeric_limits<float>::min();
  const float inv_n = rows ? 1.0f / static_cast<float>(rows) : 0.0f;
  double loss = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* zr = z + r * ldz;
    float* gr = grad + r * classes;
    float mx = zr[0];
    for (int64_t c = 1; c < classes; ++c) mx = zr[c] > mx || zr[c] != zr[c] ? zr[c] : mx;
    double sum = 0.0;
    for (int64_t c = 0; c < classes; ++c) {
      const float d = zr[c] - mx;
      const float e = d < -80.0f ? 0.0f : std::exp(d);
      gr[c] = e;
      sum += e;
    }
    loss += std::log(sum) - static_cast<double>(zr[labels[r]] - mx);
    const float scale = static_cast<float>(1.0 / sum) * inv_n;
    for (int64_t c = 0; c < classes; ++c) {
      const float g = gr[c] * scale;
      gr[c] = std::fabs(g) < tiny ? 0.0f : g;
    }
    gr[labels[r]] -= inv_n;
  }
  return rows ? loss / static_cast<double>(rows) : 0.0;
}

double mask_estimator(const double* s, const uint8_t* m1, const uint8_t* m2, int64_t n, double df, bool textbook,
                      double* g) {
  SPARSEBP_CHECK_VALUE(n >= 0, "bad size for mask_estimator");
  double sumsq = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double q = s[i] * (1.0 - s[i]);
    const double den = textbook ? q : std::sqrt(std::max(q, 0.0));
    const double diff = static_cast<double>(m1[i] != 0) - static_cast<double>(m2[i] != 0);
    g[i] = (den > 0.0 && diff != 0.0) ? 0.5 * df * diff / den : 0.0;
    sumsq += g[i] * g[i];
  }
  return sumsq;
}

double mask_estimator_csr(const double* s, int64_t rows, int64_t cols, const int64_t* indptr1,
                          const int32_t* indices1, int64_t nnz1, const int64_t* indptr2, const int32_t* indices2,
                          int64_t nnz2, double df, bool textbook, double* g) {
  SPARSEBP_CHECK_VALUE(rows >= 0 && cols >= 0, "bad shape for mask_estimator_csr");
  const int64_t* ips[2] = {indptr1, indptr2};
  const int32_t* ixs[2] = {indices1, indices2};
  const int64_t nnzs[2] = {nnz1, nnz2};
  for (int q = 0; q < 2; ++q) {
    const int64_t* ip = ips[q];
    const int32_t* ix = ixs[q];
    SPARSEBP_CHECK_VALUE(ip[0] == 0 && ip[rows] == nnzs[q], "mask ", q + 1, ": indptr must start at 0 and end at nnz = ",
                         nnzs[q]);
    for (int64_t r = 0; r < rows; ++r)  // all of indptr first: then every row lies within [0, nnz)
      SPARSEBP_CHECK_VALUE(ip[r] <= ip[r + 1], "mask ", q + 1, ": indptr must be non-decreasing (row ", r, ")");
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t p = ip[r]; p < ip[r + 1]; ++p)
        SPARSEBP_CHECK_VALUE(ix[p] >= 0 && ix[p] < cols && (p == ip[r] || ix[p - 1] < ix[p]), "mask ", q + 1,
                             ": the column indices of row ", r, " must be strictly increasing and within [0, ", cols,
                             ")");
    }
  }
  std::fill(g, g + rows * cols, 0.0);
  double sumsq = 0.0;
  auto put = [&](int64_t at, double diff) {
    const double q = s[at] * (1.0 - s[at]);
    const double den = textbook ? q : std::sqrt(std::max(q, 0.0));
    if (den > 0.0) {
      g[at] = 0.5 * df * diff / den;
      sumsq += g[at] * g[at];
    }
  };
  for (int64_t r = 0; r < rows; ++r) {  // merge the two sorted rows: the symmetric difference
    int64_t a = indptr1[r], b = indptr2[r];
    const int64_t a1 = indptr1[r + 1], b1 = indptr2[r + 1], base = r * cols;
    while (a < a1 || b < b1) {
      if (b == b1 || (a < a1 && indices1[a] < indices2[b])) {
        put(base + indices1[a++], 1.0);
      } else if (a == a1 || indices2[b] < indices1[a]) {
        put(base + indices2[b++], -1.0);
      } else {  // in both masks: m1 - m2 = 0
        ++a;
        ++b;
      }
    }
  }
  return sumsq;
}

int64_t mask_union_count(const uint8_t* m1, const uint8_t* m2, int64_t n) {
  SPARSEBP_CHECK_VALUE(n >= 0, "bad size for mask_union_count");
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) c += (m1[i] | m2[i]) != 0;
  return c;
}

void mask_union(const uint8_t* m1, const uint8_t* m2, int64_t n, int64_t count, int64_t* idx, float* keep) {
  SPARSEBP_CHECK_VALUE(n >= 0 && count >= 0, "bad size for mask_union");
  int64_t k = 0;
  for (int64_t i = 0; i < n; ++i) {
    if ((m1[i] | m2[i]) == 0) continue;
    SPARSEBP_CHECK_VALUE(k < count, "mask_union: count does not match the masks");  // (before writing past it)
    idx[k] = i;
    keep[k] = m1[i] ? 1.0f : 0.0f;
    keep[count + k] = m2[i] ? 1.0f : 0.0f;
    ++k;
  }
  SPARSEBP_CHECK_VALUE(k == count, "mask_union: count does not match the masks");
}

void mask_adam_project(double* s, double* m, double* v, const double* g, int64_t n, double scale, double b1,
                       double b2, double step_size, double inv_c2, double eps, double budget) {
  SPARSEBP_CHECK_VALUE(n >= 0 && budget >= 0, "bad arguments for mask_adam_project");
  SPARSEBP_CHECK_VALUE(std::isfinite(scale) && eps > 0, "mask_adam_project: scale must be finite and eps > 0");
  bool finite = true;  // checked before anything is written: s, m and v stay as they were on error
  for (int64_t i = 0; i < n; ++i) finite &= std::isfinite(g[i]);
  for (int64_t i = 0; i < n && !finite; ++i)
    SPARSEBP_CHECK_VALUE(std::isfinite(g[i]), "the gradient of s is not finite at entry ", i, ": ", g[i]);
  // The Adam step in the kernel table (vectorised, -fno-math-errno): as scalar code here it took
  // ~2.4 ms more of a 642,000-entry per-weight VR-PGE step on a Zen 1 core. Threads split whole
  // cache lines of doubles.
  if (n > 0) {
    const KernelTable& t = active_table();
    const kernels::MaskAdamArgs a{s, m, v, g, scale, b1, b2, step_size, inv_c2, eps};
    const int64_t lines = (n + 7) / 8;
    const int64_t nt = std::min(threads_for(n * 8), lines);
    parallel_for(nt, [&](int64_t i) {
      const int64_t b = std::min(n, lines * i / nt * 8), e = std::min(n, lines * (i + 1) / nt * 8);
      if (b < e) t.mask_adam(a, b, e);
    });
  }
  project_budget_select(s, n, budget, s);
}

namespace {
// The root v > 0 of f(v) = sum clip(s_i - v, 0, 1) = budget, given f(0) = csum > budget.
//
// By a sort: f is continuous, non-increasing and linear between consecutive breakpoints
// {s_i - 1, s_i}; walk them in increasing order, tracking f's value and slope. The root is >= 0,
// where an entry with s_i <= 0 adds nothing to f or its slope: only the others are sorted (once s
// has polarised, most entries sit at or below 0).
double budget_root_sort(const double* s, int64_t n, double budget, double csum) {
  std::vector<double> srt;
  srt.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    if (s[i] > 0.0) srt.push_back(s[i]);
  std::sort(srt.begin(), srt.end());
  const int64_t m = static_cast<int64_t>(srt.size());
  // Events: at v = s_i - 1 entry i starts decreasing (slope -1 more); at v = s_i it reaches 0 (slope
  // +1). Merge the two sorted lists.
  double v = 0.0;
  double f = csum;    // f(v)
  int64_t slope = 0;  // f's slope just right of v: -(number of entries with s_i - 1 <= v < s_i)
  int64_t a = 0, b = 0;  // next start event (srt[a] - 1) and end event (srt[b])
  auto consume = [&] {
    while (a < m && srt[a] - 1.0 <= v) --slope, ++a;
    while (b < m && srt[b] <= v) ++slope, ++b;
  };
  consume();
  for (;;) {  // invariant: f(v) > budget
    const double next_a = a < m ? srt[a] - 1.0 : std::numeric_limits<double>::infinity();
    const double next_b = b < m ? srt[b] : std::numeric_limits<double>::infinity();
    const double nv = std::min(next_a, next_b);
    const double fn = std::isfinite(nv) ? f + static_cast<double>(slope) * (nv - v) : f;
    if (fn <= budget || !std::isfinite(nv)) {
      double root = slope < 0 ? v + (f - budget) / static_cast<double>(-slope) : v;
      if (std::isfinite(nv) && root > nv) root = nv;
      return root;
    }
    v = nv;
    f = fn;
    consume();
  }
}

// By selection, O(n) expected. f on a bracket (lo, hi) holding the root, f(lo) > budget >= f(hi):
// an entry's part of f is 0 on it when s_i <= lo, 1 when s_i - 1 >= hi, s_i - v when
// s_i - 1 <= lo and s_i >= hi: those are summed up (ones; lin_n, lin_sum) and set aside. Every
// entry left has a breakpoint (s_i - 1 or s_i) strictly inside the bracket, so the pivot, one such
// breakpoint of an entry drawn at random, narrows it; the left ones halve on average. The root is
// >= 0, where entries with s_i <= 0 add nothing: they are never taken.
double budget_root_select(const double* s, int64_t n, double budget) {
  const KernelTable& t = active_table();
  thread_local std::vector<double> buf;  // kept between calls (and never shrunk): no fresh pages
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
  double* const act = buf.data();
  size_t na = 0;  // act[0, na): the entries still in play
  for (int64_t i = 0; i < n; ++i) {  // without a branch: s's signs come mixed
    act[na] = s[i];
    na += s[i] > 0.0;
  }
  double lo = 0.0, hi = std::numeric_limits<double>::infinity();
  double ones = 0.0, lin_sum = 0.0;
  int64_t lin_n = 0;
  uint64_t state = 0x9E3779B97F4A7C15ull ^ static_cast<uint64_t>(n);  // fixed: the result is reproducible
  while (na > 0) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    const double e = act[static_cast<size_t>((state >> 33) % na)];
    const double p = (e > lo && e < hi) ? e : e - 1.0;  // one of the two lies strictly inside
    double part[4];  // four partial sums (the kernel table's: vectorised, no branch)
    uint8_t fin = 1;
    t.budget_clip(kernels::ClipArgs{act, p, nullptr, part, &fin}, 0, static_cast<int64_t>(na));
    const double f = ones + lin_sum - static_cast<double>(lin_n) * p + ((part[0] + part[1]) + (part[2] + part[3]));
    if (f == budget) return p;
    (f > budget ? lo : hi) = p;
    // Branch-free (the entries' classes come mixed at random): kept ones are compacted in place.
    size_t kept = 0;
    int64_t n_one = 0;
    double lin_part = 0.0;
    for (size_t q2 = 0; q2 < na; ++q2) {
      const double x = act[q2];
      const bool live = x > lo, one = live && x - 1.0 >= hi, lin = live && !one && x - 1.0 <= lo && x >= hi;
      n_one += one;
      lin_n += lin;
      lin_part += lin ? x : 0.0;
      act[kept] = x;
      kept += live && !one && !lin;
    }
    ones += static_cast<double>(n_one);
    lin_sum += lin_part;
    na = kept;
  }
  // f(v) = ones + lin_sum - lin_n v on the bracket
  const double root = lin_n > 0 ? (ones + lin_sum - budget) / static_cast<double>(lin_n) : lo;
  return std::min(std::max(root, lo), hi);
}

// Both projections: s checked and its clipped sum taken before anything is written (out may be s),
// the root found when the budget binds, then out = clip(s - root, 0, 1).
void project_onto_budget(const double* s, int64_t n, double budget, double* out, bool select) {
  SPARSEBP_CHECK_VALUE(n >= 0 && budget >= 0, "bad arguments for project_budget");
  // The passes over s run in the kernel table (vectorised, without branches): here, at baseline
  // flags, the clip compiled to branches that s's mixed signs mispredict (project_budget of 642,000
  // entries on a Zen 1 core: 10.0 ms, now 1.7 ms). The sum is one call (four partials, in order):
  // the same for every thread count.
  const KernelTable& t = active_table();
  double part[4] = {0.0, 0.0, 0.0, 0.0};
  uint8_t all_finite = 1;
  if (n > 0) t.budget_clip(kernels::ClipArgs{s, 0.0, nullptr, part, &all_finite}, 0, n);
  const bool finite = all_finite != 0;
  if (!finite)
    for (int64_t i = 0; i < n; ++i) SPARSEBP_CHECK_VALUE(std::isfinite(s[i]), "s[", i, "] = ", s[i], " is not finite");
  const double csum = (part[0] + part[1]) + (part[2] + part[3]);
  const double root = csum <= budget ? 0.0 : select ? budget_root_select(s, n, budget) : budget_root_sort(s, n, budget, csum);
  const kernels::ClipArgs shift{s, root, out, nullptr, nullptr};
  const int64_t lines = (n + 7) / 8;  // threads split whole cache lines of doubles
  const int64_t nt = std::min(block_threads_for(n * 16), std::max<int64_t>(lines, 1));
  parallel_for(nt, [&](int64_t i) {
    const int64_t b = std::min(n, lines * i / nt * 8), e = std::min(n, lines * (i + 1) / nt * 8);
    if (b < e) t.budget_clip(shift, b, e);
  });
}
}  // namespace

void project_budget(const double* s, int64_t n, double budget, double* out) {
  project_onto_budget(s, n, budget, out, false);
}

void project_budget_select(const double* s, int64_t n, double budget, double* out) {
  project_onto_budget(s, n, budget, out, true);
}

void selection_by_column(const int32_t* sel, int64_t rows, int64_t k, const float* g, int64_t ldg, int64_t n,
                         int64_t* indptr, int32_t* row_of, float* vals, int32_t* touched, int64_t* n_touched,
                         int64_t* touched_indptr, float* by_row) {
  SPARSEBP_CHECK_VALUE(rows >= 0 && k >= 0 && n >= 0 && ldg >= n, "bad shape for selection_by_column");
  std::fill(indptr, indptr + n + 1, int64_t{0});
  const int64_t total = rows * k;
  for (int64_t e = 0; e < total; ++e) {
    const int32_t j = sel[e];
    SPARSEBP_CHECK_VALUE(j >= 0 && j < n, "selected[", e / std::max<int64_t>(k, 1), ", ", e % std::max<int64_t>(k, 1),
                         "] = ", j, " is outside [0, ", n, ")");
    ++indptr[j + 1];
  }
  int64_t nt = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (indptr[j + 1]) touched[nt++] = static_cast<int32_t>(j);
    indptr[j + 1] += indptr[j];
  }
  *n_touched = nt;
  // Place each entry at its column's cursor; rows are visited in order, so each column's entries
  // come out in increasing row order. The cursor array is indptr itself, shifted back after.
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* sr = sel + r * k;
    const float* gr = g + r * ldg;
    for (int64_t q = 0; q < k; ++q) {
      const int32_t j = sr[q];
      const int64_t pos = indptr[j]++;
      row_of[pos] = static_cast<int32_t>(r);
      vals[pos] = gr[j];
    }
  }
  for (int64_t j = n; j > 0; --j) indptr[j] = indptr[j - 1];
  indptr[0] = 0;
  // (NumPy took ~5 and ~9 us for these two at 32 x 500.)
  if (touched_indptr) {
    touched_indptr[0] = 0;
    for (int64_t t = 0; t < nt; ++t) touched_indptr[t + 1] = indptr[touched[t] + 1];
  }
  if (by_row)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t q = 0; q < k; ++q) by_row[r * k + q] = g[r * ldg + sel[r * k + q]];
}

namespace {
// d[idx[p]] += v * w[p] for p < len, and dv[p] += v * xb[idx[p]]: per-example meProp's two inner
// loops, as free functions on restrict-qualified locals. Written inline in the lambdas below, the
// compiler reloaded the row pointer and the loop bound from the stack on every entry (it could not
// rule out that the stores alias them; inlined, these did the same). Out of line: the whole call
// 1.35-1.41x faster at 784 x 500 and 500 x 500, 10% dense, batch 32, k = 20.
__attribute__((noinline)) void scatter_scaled_row(float* __restrict d, const int32_t* __restrict idx,
                                                  const float* __restrict w, int64_t len, float v) {
  for (int64_t p = 0; p < len; ++p) d[idx[p]] += v * w[p];
}

__attribute__((noinline)) void gather_scaled_add(float* __restrict dv, const int32_t* __restrict idx,
                                                 const float* __restrict xb, int64_t len, float v) {
  for (int64_t p = 0; p < len; ++p) dv[p] += v * xb[idx[p]];
}
}  // namespace

void csr_example_backward(const int64_t* indptr, const int32_t* indices, const float* values, int64_t nnz,
                          int64_t rows, int64_t cols, const int32_t* sel, int64_t batch, int64_t k, const float* g,
                          int64_t ldg, const float* x, int64_t ldx, float* dx, int64_t lddx, float* dvalues,
                          int32_t* touched, int64_t* n_touched, bool structure_checked, int64_t* positions,
                          int64_t* n_positions) {
  SPARSEBP_CHECK_VALUE(rows >= 0 && cols >= 0 && batch >= 0 && k >= 0 && nnz >= 0 && ldg >= rows,
                       "bad shape for csr_example_backward");
  SPARSEBP_CHECK_VALUE(!dx || lddx >= cols, "bad dx stride for csr_example_backward");
  SPARSEBP_CHECK_VALUE(!dvalues || (x && ldx >= cols), "csr_example_backward: dvalues needs x");
  SPARSEBP_CHECK_VALUE(indptr[0] == 0 && indptr[rows] == nnz, "indptr must run from 0 to nnz = ", nnz);
  // The selection regrouped by row of W (unit): its examples in increasing order, with their g.
  std::vector<int64_t> by_unit(static_cast<size_t>(rows + 1));
  std::vector<int32_t> ex(static_cast<size_t>(batch * k));
  std::vector<float> gv(static_cast<size_t>(batch * k));
  selection_by_column(sel, batch, k, g, ldg, rows, by_unit.data(), ex.data(), gv.data(), touched, n_touched);
  const int64_t nt_rows = *n_touched;
  int64_t work = 0, n_pos = 0;
  for (int64_t t = 0; t < nt_rows; ++t) {
    const int64_t j = touched[t];
    // Each call's check of the touched rows' indices took ~10-20 us for the demo's 10%-dense
    // 500-wide layers (a third of the call); a CsrStructure was checked once, when built.
    if (!structure_checked) {
      SPARSEBP_CHECK_VALUE(indptr[j] <= indptr[j + 1] && indptr[j + 1] <= nnz, "indptr must not decrease (row ", j,
                           ")");
      for (int64_t p = indptr[j]; p < indptr[j + 1]; ++p)
        SPARSEBP_CHECK_VALUE(indices[p] >= 0 && indices[p] < cols, "indices[", p, "] = ", indices[p],
                             " is outside [0, ", cols, ")");
    }
    work += (by_unit[j + 1] - by_unit[j]) * (indptr[j + 1] - indptr[j]);
    if (positions)  // (the bound in a local: positions, int64 too, might alias indptr)
      for (int64_t p = indptr[j], end = indptr[j + 1]; p < end; ++p) positions[n_pos++] = p;
  }
  if (n_positions) *n_positions = n_pos;
  if (dx) {
    // Example by example: its k sparse rows of W scattered into its row of dx (in L1).
    const int64_t nt = std::min<int64_t>(threads_for(work + batch * cols), std::max<int64_t>(batch, 1));
    parallel_for(nt, [&](int64_t i) {
      for (int64_t b = batch * i / nt; b < batch * (i + 1) / nt; ++b) {
        float* d = dx + b * lddx;
        std::fill(d, d + cols, 0.0f);
        for (int64_t q = 0; q < k; ++q) {
          const int32_t j = sel[b * k + q];
          const int64_t p0 = indptr[j];
          scatter_scaled_row(d, indices + p0, values + p0, indptr[j + 1] - p0, g[b * ldg + j]);
        }
      }
    });
  }
  if (dvalues) {
    std::fill(dvalues, dvalues + nnz, 0.0f);
    // Unit by unit: its entries accumulate g[b, j] x[b, indices] over the examples that chose it.
    const int64_t nt = std::min<int64_t>(threads_for(work), std::max<int64_t>(nt_rows, 1));
    parallel_for(nt, [&](int64_t i) {
      for (int64_t t = nt_rows * i / nt; t < nt_rows * (i + 1) / nt; ++t) {
        const int64_t j = touched[t], p0 = indptr[j], len = indptr[j + 1] - p0;
        float* dv = dvalues + p0;
        const int32_t* idx = indices + p0;
        for (int64_t e = by_unit[j]; e < by_unit[j + 1]; ++e)
          gather_scaled_add(dv, idx, x + ex[e] * ldx, len, gv[e]);
      }
    });
  }
}

void csr_rows_backward(const CsrStructure& w, const float* values, int64_t values_len, const int32_t* sel, int64_t n,
                       const DenseIn& grad_output, const DenseIn& x, const DenseOut* grad_input, float* dvalues,
                       int64_t dvalues_len, int64_t* positions, int64_t* n_positions) {
  const int64_t rows = w.rows(), cols = w.cols(), nnz = w.nnz(), B = x.batch;
  SPARSEBP_CHECK_VALUE(values_len == nnz, "values must have nnz = ", nnz, " entries; got ", values_len);
  SPARSEBP_CHECK_VALUE(n >= 0, "bad selection length for csr_rows_backward");
  if (dvalues)
    SPARSEBP_CHECK_VALUE(dvalues_len == nnz, "dvalues must have nnz = ", nnz, " entries; got ", dvalues_len);
  check_shape(x, B, cols, "x", "(batch, in_features)");
  check_shape(grad_output, B, rows, "grad_output", "(batch, out_features)");
  // The selection: strictly increasing, in [0, rows) (the ends, then the order without branches).
  if (n > 0) {
    SPARSEBP_CHECK_VALUE(sel[0] >= 0 && sel[n - 1] < rows, "selected holds rows outside [0, ", rows, "): ", sel[0],
                         " .. ", sel[n - 1]);
    bool increasing = true;
    for (int64_t i = 1; i < n; ++i) increasing &= sel[i] > sel[i - 1];
    if (!increasing)
      for (int64_t i = 1; i < n; ++i)
        SPARSEBP_CHECK_VALUE(sel[i] > sel[i - 1], "selected must be strictly increasing; selected[", i, "] = ", sel[i],
                             " follows ", sel[i - 1]);
  }
  // Outputs must not overlap the inputs or each other (linear_backward checks grad_input against
  // x and its own scratch; the caller's G and values are checked here).
  const Span sg = span_of(grad_output, layout_of(grad_output, "grad_output")), sv = span_of(values, values_len);
  const Span sdv = span_of(dvalues, dvalues_len);
  if (grad_input)
    check_no_overlap(span_of(*grad_input, layout_of(*grad_input, "grad_input")), "grad_input",
                     {{sg, "grad_output"}, {sv, "values"}, {sdv, "dvalues"}});
  if (dvalues) check_no_overlap(sdv, "dvalues", {{span_of(x, layout_of(x, "x")), "x"}, {sg, "grad_output"}, {sv, "values"}});
  // The selected rows' sub-matrix: row pointers, column indices and values, and the positions of
  // its entries in W (the rows' runs, in order).
  std::vector<int64_t> sub_ptr(static_cast<size_t>(n + 1));
  sub_ptr[0] = 0;
  const int64_t* ip = w.indptr();
  for (int64_t i = 0; i < n; ++i) sub_ptr[i + 1] = sub_ptr[i] + (ip[sel[i] + 1] - ip[sel[i]]);
  const int64_t sub_nnz = sub_ptr[n];
  std::vector<int32_t> sub_idx(static_cast<size_t>(sub_nnz));
  float* sub_vals = workspace().get(7, sub_nnz);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p0 = ip[sel[i]], len = sub_ptr[i + 1] - sub_ptr[i];
    if (len == 0) continue;  // (an empty row: no copy; with no entries at all the buffers are null)
    std::memcpy(sub_idx.data() + sub_ptr[i], w.indices() + p0, static_cast<size_t>(len) * sizeof(int32_t));
    std::memcpy(sub_vals + sub_ptr[i], values + p0, static_cast<size_t>(len) * sizeof(float));
    if (positions)
      for (int64_t q = 0; q < len; ++q) positions[sub_ptr[i] + q] = p0 + q;
  }
  if (n_positions) *n_positions = sub_nnz;
  // (W's rows are valid and in order: the sub-matrix's check is one cheap pass over its entries.)
  const CsrStructure sub = CsrStructure::build(n, cols, sub_ptr.data(), n + 1, sub_idx.data(), sub_nnz);
  // G's selected columns, gathered straight into the kernels' feature-major layout.
  const int64_t ldg = padded_ld(B);
  float* gs = workspace().get(8, std::max<int64_t>(n, 1) * ldg);
  const float* g = grad_output.data;
  const int64_t gb = grad_output.stride_batch, gf = grad_output.stride_feature;
  for (int64_t i = 0; i < n; ++i) {
    float* dst = gs + i * ldg;
    const float* src = g + sel[i] * gf;
    for (int64_t b = 0; b < B; ++b) dst[b] = src[b * gb];
  }
  const DenseIn gsub{gs, B, n, 1, ldg};
  float* dv_sub = dvalues ? workspace().get(9, sub_nnz) : nullptr;
  linear_backward(sub, sub_vals, sub_nnz, gsub, x, grad_input, dv_sub, sub_nnz, nullptr, 0);
  if (dvalues) {
    std::fill(dvalues, dvalues + nnz, 0.0f);
    for (int64_t i = 0; i < n; ++i)
      if (sub_ptr[i + 1] > sub_ptr[i])
        std::memcpy(dvalues + ip[sel[i]], dv_sub + sub_ptr[i],
                    static_cast<size_t>(sub_ptr[i + 1] - sub_ptr[i]) * sizeof(float));
  }
}

namespace {
// Every entry of idx in [0, bound) and strictly increasing (a ValueError naming the list otherwise;
// a null idx passes). The ends, then the order in one pass without branches (checked entry by
// entry with both tests, nn.SGD's step over a sparse layer's 29,000 positions took ~10 us longer):
// a strictly increasing list between ends in [0, bound) is in range. order = false: the caller's
// scan for runs of positions (for_each_position_run with the list's name) checks the order, before
// any write, at no extra pass.
void check_index_list(const int64_t* idx, int64_t n, int64_t bound, const char* name, bool order = true) {
  if (!idx || n == 0) return;
  for (const int64_t i : {int64_t{0}, n - 1})
    SPARSEBP_CHECK_VALUE(idx[i] >= 0 && idx[i] < bound, name, "[", i, "] = ", idx[i], " is outside [0, ", bound, ")");
  if (!order) return;
  bool increasing = true;
  for (int64_t i = 1; i < n; ++i) increasing &= idx[i] > idx[i - 1];
  if (!increasing)
    for (int64_t i = 1; i < n; ++i)
      SPARSEBP_CHECK_VALUE(idx[i] > idx[i - 1], name, " must be strictly increasing; ", name, "[", i, "] = ", idx[i],
                           " follows ", idx[i - 1]);
}

// fn(i0, len) for each run list[i0 .. i0 + len) of consecutive values (list[i] + 1 == list[i + 1]),
// up to max_threads threads taking runs that hold about equal numbers of entries (each run whole,
// in one thread). With a name, the list must be strictly increasing (ValueError naming it, before
// any fn call): checked where a run breaks, so at no extra pass over the list.
template <typename Fn>
void for_each_position_run(const int64_t* list, int64_t n, int64_t max_threads, Fn&& fn,
                           const char* increasing_name = nullptr) {
  std::vector<int64_t> run_at;  // the list index where each run starts; then n
  run_at.reserve(static_cast<size_t>(n) / 8 + 2);
  for (int64_t i = 0; i < n; ++i)
    if (i == 0 || list[i] != list[i - 1] + 1) {
      SPARSEBP_CHECK_VALUE(!increasing_name || i == 0 || list[i] > list[i - 1], increasing_name,
                           " must be strictly increasing; ", increasing_name, "[", i, "] = ", list[i], " follows ",
                           list[i - 1]);
      run_at.push_back(i);
    }
  const int64_t runs = static_cast<int64_t>(run_at.size());
  run_at.push_back(n);
  auto do_runs = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      fn(run_at[static_cast<size_t>(r)], run_at[static_cast<size_t>(r) + 1] - run_at[static_cast<size_t>(r)]);
  };
  const int64_t nt = std::min<int64_t>(max_threads, runs);
  if (nt <= 1) {
    do_runs(0, runs);
    return;
  }
  const auto first_run = [&](int64_t q) {  // the first run starting at or after entry n q / nt
    return std::lower_bound(run_at.begin(), run_at.begin() + runs, n * q / nt) - run_at.begin();
  };
  parallel_for(nt, [&](int64_t i) { do_runs(first_run(i), i + 1 == nt ? runs : first_run(i + 1)); });
}
}  // namespace

void adam_step(float* p, const float* g, float* m, float* v, int64_t rows, int64_t cols, const int64_t* row_list,
               int64_t n_rows, bool g_compact, double b1, double b2, float step_size, float inv_c2, float eps) {
  SPARSEBP_CHECK_VALUE(rows >= 0 && cols >= 0, "bad shape for adam_step");
  // The row list is strictly increasing: a repeated row would take two steps, and the threads that
  // split the list could update it at the same time. A list of single entries (below) has its order
  // checked by the scan for runs.
  const bool position_runs = row_list && cols == 1 && n_rows > 1;
  check_index_list(row_list, n_rows, rows, "rows", !position_runs);
  const int64_t n = row_list ? n_rows : rows;
  if (n == 0 || cols == 0) return;
  const KernelTable& t = active_table();
  // 1 - b in double, then rounded (as PyTorch's float32 Adam): 1.0f - 0.999f is off by 1.3e-5.
  const kernels::AdamArgs a{p,
                            g,
                            m,
                            v,
                            cols,
                            row_list,
                            g_compact && row_list != nullptr,
                            static_cast<float>(b1),
                            static_cast<float>(b2),
                            static_cast<float>(1.0 - b1),
                            static_cast<float>(1.0 - b2),
                            step_size,
                            inv_c2,
                            eps};
  if (position_runs) {
    // Single entries (a sparse layer's stored values at the touched rows' positions): each run of
    // consecutive positions goes to the kernel as one row, vectorised. Entry by entry, the
    // kernel's square root and division ran one at a time: ~7.6 ns per entry, 0.36 ms a step
    // for the demo's sparse + meProp model on a Zen 3 core.
    for_each_position_run(row_list, n, threads_for(n), [&](int64_t i0, int64_t len) {
      const int64_t at = row_list[i0];
      kernels::AdamArgs b = a;
      b.p = p + at;
      b.g = g + (a.g_compact ? i0 : at);
      b.m = m + at;
      b.v = v + at;
      b.cols = len;
      b.rows = nullptr;
      b.g_compact = false;
      t.adam(b, 0, 1);
    }, "rows");
    return;
  }
  const int64_t nt = std::min<int64_t>(threads_for(n * cols), n);
  parallel_for(nt, [&](int64_t i) { t.adam(a, n * i / nt, n * (i + 1) / nt); });
}

namespace {
template <typename Fn>
void run_block_rows(int64_t n_rows, int64_t work, Fn&& fn) {
  const int64_t nt = std::min<int64_t>(block_threads_for(work), std::max<int64_t>(n_rows, 1));
  parallel_for(nt, [&](int64_t i) { fn(n_rows * i / nt, n_rows * (i + 1) / nt); });
}
}  // namespace

void gather_block(const float* src, int64_t src_rows, int64_t src_cols, int64_t lds, const int64_t* rows,
                  int64_t n_rows, const int64_t* cols, int64_t n_cols, float* dst, int64_t ldd) {
  SPARSEBP_CHECK_VALUE(src_rows >= 0 && src_cols >= 0 && lds >= src_cols && n_rows >= 0 && n_cols >= 0 &&
                           ldd >= n_cols, "bad shape for gather_block");
  SPARSEBP_CHECK_VALUE(rows || n_rows == src_rows, "without rows, the block has all ", src_rows, " rows");
  SPARSEBP_CHECK_VALUE(cols || n_cols == src_cols, "without cols, the block has all ", src_cols, " columns");
  check_index_list(rows, n_rows, src_rows, "rows");
  check_index_list(cols, n_cols, src_cols, "cols");
  if (n_rows == 0 || n_cols == 0) return;
  const KernelTable& t = active_table();
  const kernels::BlockArgs a{src, lds, dst, ldd, rows, cols, n_cols, 1.0f};
  run_block_rows(n_rows, n_rows * n_cols * 8, [&](int64_t i0, int64_t i1) { t.gather_block(a, i0, i1); });
}

void scatter_add_block(float* dst, int64_t dst_rows, int64_t dst_cols, int64_t ldd, const int64_t* rows,
                       int64_t n_rows, const int64_t* cols, int64_t n_cols, const float* src, int64_t lds,
                       float alpha) {
  SPARSEBP_CHECK_VALUE(dst_rows >= 0 && dst_cols >= 0 && ldd >= dst_cols && n_rows >= 0 && n_cols >= 0 &&
                           lds >= n_cols, "bad shape for scatter_add_block");
  SPARSEBP_CHECK_VALUE(rows || n_rows == dst_rows, "without rows, the block has all ", dst_rows, " rows");
  SPARSEBP_CHECK_VALUE(cols || n_cols == dst_cols, "without cols, the block has all ", dst_cols, " columns");
  check_index_list(rows, n_rows, dst_rows, "rows");
  check_index_list(cols, n_cols, dst_cols, "cols");
  if (n_rows == 0 || n_cols == 0) return;
  const KernelTable& t = active_table();
  kernels::BlockArgs a{src, lds, dst, ldd, rows, cols, n_cols, alpha};
  run_block_rows(n_rows, n_rows * n_cols * 12, [&](int64_t i0, int64_t i1) { t.scatter_add_block(a, i0, i1); });
}

void lazy_sgd(float* w, float* buf, int32_t* stamp, bool row_stamps, int64_t w_rows, int64_t w_cols,
              const int64_t* rows, int64_t n_rows, const int64_t* cols, int64_t n_cols, const float* powers,
              int64_t max_lag, int32_t now, const float* g, float* out, float lr, float momentum, float decay,
              bool peek, const int64_t* g_cols, int64_t n_gcols) {
  SPARSEBP_CHECK_VALUE(w_rows >= 0 && w_cols >= 0 && n_rows >= 0 && n_cols >= 0 && max_lag >= 0,
                       "bad shape for lazy_sgd");
  SPARSEBP_CHECK_VALUE(rows || n_rows == w_rows, "without rows, the block has all ", w_rows, " rows");
  SPARSEBP_CHECK_VALUE(cols || n_cols == w_cols, "without cols, the block has all ", w_cols, " columns");
  SPARSEBP_CHECK_VALUE(stamp == nullptr || powers != nullptr, "lazy_sgd with stamps needs the powers table");
  SPARSEBP_CHECK_VALUE(!(stamp && row_stamps && cols && !peek),
                       "with row stamps, blocks must span whole rows (cols = all), except a peek");
  SPARSEBP_CHECK_VALUE(!peek || (out && !g), "peek needs out and no g");
  SPARSEBP_CHECK_VALUE(n_gcols < 0 || (g && !cols && !peek && (g_cols || n_gcols == 0)),
                       "g_cols needs g, no cols and no peek");
  static const int64_t kNoColumns = 0;
  if (n_gcols >= 0 && !g_cols) g_cols = &kNoColumns;  // none: the step with g = 0 alone
  if (n_gcols < 0) g_cols = nullptr;
  // The plain step on single entries (a sparse layer's values at the touched positions) runs over
  // runs of consecutive positions, whose scan checks the order of rows.
  const bool position_runs = w_cols == 1 && rows && n_rows > 1 && g && !stamp && !cols && !out && !peek && !g_cols;
  check_index_list(rows, n_rows, w_rows, "rows", !position_runs);
  check_index_list(cols, n_cols, w_cols, "cols");
  check_index_list(g_cols, std::max<int64_t>(n_gcols, 0), w_cols, "g_cols");
  if (n_rows == 0 || n_cols == 0) return;
  const KernelTable& t = active_table();
  std::vector<uint8_t> bad(static_cast<size_t>(n_rows), 0);
  const kernels::LazySgdArgs a{w,     buf, stamp,  row_stamps, w_cols, rows,  cols,     n_cols, powers, max_lag,
                               now,   g,   g_cols ? n_gcols : n_cols, out, n_cols, lr, momentum, decay, peek,
                               bad.data(), g_cols, std::max<int64_t>(n_gcols, 0)};
  if (position_runs) {
    // Each run of consecutive positions as one row (as adam_step), not entry by entry.
    for_each_position_run(rows, n_rows, block_threads_for(n_rows * 20), [&](int64_t i0, int64_t len) {
      kernels::LazySgdArgs b = a;
      b.w = w + rows[i0];
      b.buf = buf + rows[i0];
      b.ld = b.ncols = b.ldg = len;
      b.rows = nullptr;
      b.g = g + i0;
      b.bad = bad.data() + i0;
      t.lazy_sgd(b, 0, 1);
    }, "rows");
    return;
  }
  // about 20 bytes per entry when stepping (w, momentum, gradient read; w, momentum written)
  run_block_rows(n_rows, n_rows * n_cols * 20, [&](int64_t i0, int64_t i1) { t.lazy_sgd(a, i0, i1); });
  for (int64_t i = 0; i < n_rows; ++i)
    SPARSEBP_CHECK_VALUE(!bad[static_cast<size_t>(i)], "lazy_sgd: an entry of block row ", i,
                         " is more than max_lag = ", max_lag, " steps behind (or ahead of) now = ", now,
                         "; flush more often");
}

void bernoulli_csr(const float* s, int64_t rows, int64_t cols, int64_t lds, uint64_t seed,
                   std::vector<int64_t>* indptr, std::vector<int32_t>* indices) {
  SPARSEBP_CHECK_VALUE(rows >= 0 && cols >= 0 && lds >= cols, "bad shape for bernoulli_csr");
  SPARSEBP_CHECK_VALUE(cols <= INT32_MAX, "bernoulli_csr: more than 2^31 - 1 columns; got ", cols);
  indptr->assign(static_cast<size_t>(rows) + 1, 0);
  if (rows == 0 || cols == 0) {
    indices->clear();
    return;
  }
  const KernelTable& t = active_table();
  // One pass of the generator, branch-free (it ran twice, to count and then to fill with a branch
  // per entry: 2.2x-2.9x slower on a Zen 1 core, ~25% of a per-weight VR-PGE step). Row blocks of
  // at most ~1M entries are drawn into a work buffer with room for all their entries, each thread's
  // rows packed from its chunk's start, then appended in row order.
  constexpr int64_t kBlockEntries = int64_t{1} << 20;
  const int64_t block_rows = std::max<int64_t>(1, std::min<int64_t>(rows, kBlockEntries / cols));
  thread_local std::vector<int32_t> buf;  // kept between calls: no fresh pages every draw
  std::vector<int64_t> counts(static_cast<size_t>(rows), 0);
  std::vector<uint8_t> bad(static_cast<size_t>(rows), 0);
  indices->clear();
  for (int64_t r0 = 0; r0 < rows; r0 += block_rows) {
    const int64_t nb = std::min(block_rows, rows - r0);
    if (static_cast<int64_t>(buf.size()) < nb * cols) buf.resize(static_cast<size_t>(nb * cols));
    const kernels::BernoulliArgs a{s + r0 * lds, lds, cols, seed, r0, counts.data() + r0, buf.data(),
                                   bad.data() + r0};
    const int64_t nt = std::min<int64_t>(threads_for(nb * cols * 4), nb);
    parallel_for(nt, [&](int64_t i) { t.bernoulli_rows(a, nb * i / nt, nb * (i + 1) / nt); });
    for (int64_t r = r0; r < r0 + nb; ++r) {
      if (!bad[static_cast<size_t>(r)]) continue;
      int64_t j = 0;
      const float* sr = s + r * lds;
      while (j < cols && sr[j] >= 0.0f && sr[j] <= 1.0f) ++j;
      indices->clear();
      SPARSEBP_CHECK_VALUE(false, "s must hold probabilities in [0, 1]; s[", r, ", ", j, "] = ", sr[j]);
    }
    for (int64_t i = 0; i < nt; ++i) {
      const int64_t b = nb * i / nt, e = nb * (i + 1) / nt;
      int64_t kept = 0;
      for (int64_t r = b; r < e; ++r) kept += counts[static_cast<size_t>(r0 + r)];
      const int32_t* from = buf.data() + b * cols;
      indices->insert(indices->end(), from, from + kept);
    }
  }
  for (int64_t r = 0; r < rows; ++r) (*indptr)[r + 1] = (*indptr)[r] + counts[static_cast<size_t>(r)];
}

void bias_relu_mask(const float* z, int64_t z_rows, int64_t n, const float* bias, const float* keep, int64_t groups,
                    int64_t rpg, float* out) {
  SPARSEBP_CHECK_VALUE(n >= 0 && groups >= 1 && rpg >= 0 && (z_rows == rpg || z_rows == groups * rpg),
                       "bias_relu_mask: z must have rpg or groups * rpg rows");
  const int64_t rows = groups * rpg;
  if (rows == 0 || n == 0) return;
  const KernelTable& t = active_table();
  const kernels::BiasReluMaskArgs a{z, z_rows != rows, n, bias, keep, rpg, out};
  run_block_rows(rows, rows * n * 12, [&](int64_t i0, int64_t i1) { t.bias_relu_mask(a, i0, i1); });
}

void relu(const float* x, const float* mask, float* y, int64_t n) {
  SPARSEBP_CHECK_VALUE(n >= 0, "bad size for relu");
  if (n == 0) return;
  const KernelTable& t = active_table();
  const kernels::EltwiseArgs a{x, mask, y};
  // Whole 64-byte lines per thread, so that no two threads write one cache line.
  const int64_t lines = (n + 15) / 16;
  const int64_t nt = std::min(block_threads_for(n * 8), lines);  // reads 4 (or 8) bytes, writes 4
  parallel_for(nt, [&](int64_t i) {
    const int64_t b = std::min(n, lines * i / nt * 16), e = std::min(n, lines * (i + 1) / nt * 16);
    if (b < e) t.relu(a, b, e);
  });
}

void dropout(const float* x, float* y, float* factor, int64_t n, uint64_t seed, float p, float scale) {
  SPARSEBP_CHECK_VALUE(n >= 0, "bad size for dropout");
  SPARSEBP_CHECK_VALUE(p >= 0.0f && p < 1.0f, "dropout: p must be in [0, 1); got ", p);
  if (n == 0) return;
  const KernelTable& t = active_table();
  const kernels::DropoutArgs a{x, y, factor, seed, p, scale};
  // Whole 64-byte lines per thread (so every chunk starts at an even entry, as the kernel needs).
  const int64_t lines = (n + 15) / 16;
  const int64_t nt = std::min(block_threads_for(n * 12), lines);  // reads 4 bytes, writes 8
  parallel_for(nt, [&](int64_t i) {
    const int64_t b = std::min(n, lines * i / nt * 16), e = std::min(n, lines * (i + 1) / nt * 16);
    if (b < e) t.dropout(a, b, e);
  });
}

}  // namespace sparsebp
