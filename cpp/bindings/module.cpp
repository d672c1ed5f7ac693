// pybind11 module sparsebp._core: converts, releases the GIL, calls. No policy, no algorithm:
// the Python layer (python/sparsebp/ops.py) gives friendly errors first; the checks here and in
// ops.cpp are the safety net that keeps a bad call from touching memory it should not.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <tuple>

#include "sparsebp/buffer_cache.h"
#include "sparsebp/csr.h"
#include "sparsebp/cuda.h"
#include "sparsebp/dispatch.h"
#include "sparsebp/errors.h"
#include "sparsebp/ops.h"
#include "sparsebp/threading.h"

namespace py = pybind11;
using sparsebp::CsrStructure;
using sparsebp::str_cat;

namespace {

bool is_float32(const py::array& a) { return py::array_t<float>::check_(a); }

void check_float32(const py::array& a, const char* name) {
  if (!is_float32(a))
    throw sparsebp::TypeError(str_cat(name, " must be a float32 array; got dtype ", std::string(py::str(a.dtype()))));
  if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) throw sparsebp::ValueError(str_cat(name, " must be aligned"));
}

template <typename T>
sparsebp::Dense<T> dense_of(const py::array& a, const char* name, bool writable) {
  check_float32(a, name);
  if (a.ndim() != 2) throw sparsebp::ValueError(str_cat(name, " must be 2-D; got ", a.ndim(), "-D"));
  if (writable && !a.writeable()) throw sparsebp::ValueError(str_cat(name, " must be writeable"));
  if (a.strides(0) % 4 != 0 || a.strides(1) % 4 != 0 || a.strides(0) < 0 || a.strides(1) < 0)
    throw sparsebp::ValueError(str_cat(name, " has unsupported strides"));
  T* data = static_cast<T*>(const_cast<void*>(a.data()));
  return {data, a.shape(0), a.shape(1), a.strides(0) / 4, a.strides(1) / 4};
}

// A 1-D float32 vector (values, bias, gradients). Returns its pointer; len via out-parameter.
template <typename T>
T* vector_of(const py::array& a, const char* name, bool writable, int64_t* len) {
  check_float32(a, name);
  if (a.ndim() != 1) throw sparsebp::ValueError(str_cat(name, " must be 1-D; got ", a.ndim(), "-D"));
  if (a.shape(0) > 1 && a.strides(0) != 4) throw sparsebp::ValueError(str_cat(name, " must be contiguous"));
  if (writable && !a.writeable()) throw sparsebp::ValueError(str_cat(name, " must be writeable"));
  *len = a.shape(0);
  return static_cast<T*>(const_cast<void*>(a.data()));
}

template <typename IP>
CsrStructure build_with_indices(int64_t rows, int64_t cols, const py::array& indptr, const py::array& indices) {
  const IP* ip = static_cast<const IP*>(indptr.data());
  if (py::array_t<int32_t>::check_(indices))
    return CsrStructure::build(rows, cols, ip, indptr.shape(0), static_cast<const int32_t*>(indices.data()), indices.shape(0));
  if (py::array_t<int64_t>::check_(indices))
    return CsrStructure::build(rows, cols, ip, indptr.shape(0), static_cast<const int64_t*>(indices.data()), indices.shape(0));
  throw sparsebp::TypeError(str_cat("indices must be an int32 or int64 array; got dtype ",
                                    std::string(py::str(indices.dtype()))));
}

CsrStructure make_structure(int64_t rows, int64_t cols, const py::array& indptr, const py::array& indices) {
  for (const auto& [arr, name] : {std::pair<const py::array&, const char*>{indptr, "indptr"}, {indices, "indices"}}) {
    if (arr.ndim() != 1) throw sparsebp::ValueError(str_cat(name, " must be 1-D; got ", arr.ndim(), "-D"));
    if (!(arr.flags() & py::array::c_style)) throw sparsebp::ValueError(str_cat(name, " must be C-contiguous"));
  }
  if (indptr.shape(0) < 1) throw sparsebp::ValueError("indptr must have shape[0] + 1 >= 1 entries; got 0");
  if (py::array_t<int32_t>::check_(indptr)) return build_with_indices<int32_t>(rows, cols, indptr, indices);
  if (py::array_t<int64_t>::check_(indptr)) return build_with_indices<int64_t>(rows, cols, indptr, indices);
  throw sparsebp::TypeError(str_cat("indptr must be an int32 or int64 array; got dtype ",
                                    std::string(py::str(indptr.dtype()))));
}

// A read-only NumPy view of memory owned by `owner`.
template <typename T>
py::array readonly_view(const T* data, int64_t n, py::handle owner) {
  py::array_t<T> a({n}, {static_cast<py::ssize_t>(sizeof(T))}, data, owner);
  py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return std::move(a);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "sparsebp engine (C++). Use the Python package sparsebp, not this module directly.";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const sparsebp::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const sparsebp::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  sparsebp::init_isa_from_environment();

  py::class_<CsrStructure>(m, "CsrStructure")
      .def_property_readonly("shape", [](const CsrStructure& s) { return py::make_tuple(s.rows(), s.cols()); })
      .def_property_readonly("nnz", &CsrStructure::nnz)
      .def_property_readonly("indptr",
                             [](py::object self) {
                               const auto& s = self.cast<const CsrStructure&>();
                               return readonly_view(s.indptr(), s.rows() + 1, self);
                             })
      .def_property_readonly("indices",
                             [](py::object self) {
                               const auto& s = self.cast<const CsrStructure&>();
                               return readonly_view(s.indices(), s.nnz(), self);
                             })
      // Pickled as a call of csr_structure (below): validated again when loaded. (No py::init or
      // py::pickle: with pybind11 3.1 an exception thrown out of a constructor factory crashed the
      // process instead of reaching Python; a plain function's errors do reach it.)
      .def("__reduce__", [m](py::object self) {
        const auto& s = self.cast<const CsrStructure&>();
        return py::make_tuple(m.attr("csr_structure"),
                              py::make_tuple(s.rows(), s.cols(), readonly_view(s.indptr(), s.rows() + 1, self),
                                             readonly_view(s.indices(), s.nnz(), self)));
      });
  m.def("csr_structure", &make_structure, py::arg("rows"), py::arg("cols"), py::arg("indptr"), py::arg("indices"),
        "A validated CSR structure (indptr monotone from 0 to nnz, indices in range and strictly increasing "
        "within each row); ValueError / TypeError naming what is wrong.");

  m.def(
      "linear_forward",
      [](const CsrStructure& w, const py::array& values, const py::array& x, const py::object& bias,
         const py::array& out) {
        int64_t nv = 0, nb = 0;
        const float* v = vector_of<const float>(values, "values", false, &nv);
        const float* b = bias.is_none() ? nullptr : vector_of<const float>(bias.cast<py::array>(), "bias", false, &nb);
        const auto xd = dense_of<const float>(x, "x", false);
        const auto yd = dense_of<float>(out, "out", true);
        py::gil_scoped_release nogil;
        sparsebp::linear_forward(w, v, nv, b, nb, xd, yd);
      },
      py::arg("structure"), py::arg("values"), py::arg("x"), py::arg("bias"), py::arg("out"));

  m.def(
      "linear_backward",
      [](const CsrStructure& w, const py::array& values, const py::array& grad_output, const py::array& x,
         const py::object& grad_input, const py::object& grad_values, const py::object& grad_bias) {
        int64_t nv = 0, ngv = 0, ngb = 0;
        const float* v = vector_of<const float>(values, "values", false, &nv);
        const auto gd = dense_of<const float>(grad_output, "grad_output", false);
        const auto xd = dense_of<const float>(x, "x", false);
        sparsebp::DenseOut gid{};
        const bool want_gi = !grad_input.is_none();
        if (want_gi) gid = dense_of<float>(grad_input.cast<py::array>(), "grad_input", true);
        float* gv =
            grad_values.is_none() ? nullptr : vector_of<float>(grad_values.cast<py::array>(), "grad_values", true, &ngv);
        float* gb = grad_bias.is_none() ? nullptr : vector_of<float>(grad_bias.cast<py::array>(), "grad_bias", true, &ngb);
        py::gil_scoped_release nogil;
        sparsebp::linear_backward(w, v, nv, gd, xd, want_gi ? &gid : nullptr, gv, ngv, gb, ngb);
      },
      py::arg("structure"), py::arg("values"), py::arg("grad_output"), py::arg("x"), py::arg("grad_input"),
      py::arg("grad_values"), py::arg("grad_bias"));

  // Flat 1-D arrays; geometry (ncols, seg_outer, seg_inner, x_outer, x_inner, y_row, y_outer, y_inner).
  auto i64_vector = [](const py::object& o, const char* name, int64_t* len) -> const int64_t* {
    if (o.is_none()) {
      *len = 0;
      return nullptr;
    }
    const py::array a = o.cast<py::array>();
    if (!py::array_t<int64_t>::check_(a) || a.ndim() != 1 || !(a.flags() & py::array::c_style))
      throw sparsebp::TypeError(str_cat(name, " must be a contiguous 1-D int64 array"));
    *len = a.shape(0);
    return static_cast<const int64_t*>(a.data());
  };
  using BlockArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
  // blocks: None or a (rows, nblocks + 1) int64 array (kept alive by *keep for the call).
  auto geometry = [](const py::tuple& t, const py::object& blocks, int64_t rows, BlockArray* keep) {
    if (t.size() != 8) throw sparsebp::ValueError("geometry must have 8 entries");
    sparsebp::GatherGeometry g{t[0].cast<int64_t>(), t[1].cast<int64_t>(), t[2].cast<int64_t>(),
                               t[3].cast<int64_t>(), t[4].cast<int64_t>(), t[5].cast<int64_t>(),
                               t[6].cast<int64_t>(), t[7].cast<int64_t>()};
    if (!blocks.is_none()) {
      *keep = BlockArray(blocks);
      if (keep->ndim() != 2 || keep->shape(0) != rows || keep->shape(1) < 2)
        throw sparsebp::ValueError(str_cat("blocks must have shape (", rows, ", nblocks + 1) with nblocks >= 1"));
      g.blocks = keep->data();
      g.nblocks = keep->shape(1) - 1;
    }
    return g;
  };
  using TapArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
  // taps / windows: both None, or an (nnz,) int32 array and an (ntaps, 4) int64 array (kept alive
  // by *keep_t / *keep_w for the call).
  auto windows = [](sparsebp::GatherGeometry* g, const py::object& taps, const py::object& wins, int64_t nnz,
                    TapArray* keep_t, BlockArray* keep_w) {
    if (taps.is_none() != wins.is_none()) throw sparsebp::ValueError("taps and windows go together (both or neither)");
    if (taps.is_none()) return;
    *keep_t = TapArray(taps);
    *keep_w = BlockArray(wins);
    if (keep_t->ndim() != 1 || keep_t->shape(0) != nnz)
      throw sparsebp::ValueError(str_cat("taps must have shape (", nnz, ",); got ndim ", keep_t->ndim()));
    if (keep_w->ndim() != 2 || keep_w->shape(1) != 4 || keep_w->shape(0) < 1)
      throw sparsebp::ValueError("windows must have shape (ntaps, 4) with ntaps >= 1");
    g->taps = keep_t->data();
    g->windows = keep_w->data();
    g->ntaps = keep_w->shape(0);
  };
  m.def(
      "gather_forward",
      [i64_vector, geometry, windows](const py::object& indptr, const py::object& offsets, const py::array& values,
                                      const py::object& value_index, const py::object& bias, const py::array& x,
                                      const py::array& y, const py::tuple& geo, const py::object& blocks,
                                      const py::object& taps, const py::object& wins) {
        int64_t nip = 0, noff = 0, nv = 0, nvi = 0, nb = 0, nx = 0, ny = 0;
        const int64_t* ip = i64_vector(indptr, "indptr", &nip);
        const int64_t* off = i64_vector(offsets, "offsets", &noff);
        const int64_t* vi = i64_vector(value_index, "value_index", &nvi);
        if (!ip || nip < 1) throw sparsebp::ValueError("indptr must have at least 1 entry");
        const float* v = vector_of<const float>(values, "values", false, &nv);
        const float* b = bias.is_none() ? nullptr : vector_of<const float>(bias.cast<py::array>(), "bias", false, &nb);
        const float* xp = vector_of<const float>(x, "x", false, &nx);
        float* yp = vector_of<float>(y, "y", true, &ny);
        BlockArray keep, keep_w;
        TapArray keep_t;
        auto g = geometry(geo, blocks, nip - 1, &keep);
        windows(&g, taps, wins, noff, &keep_t, &keep_w);
        py::gil_scoped_release nogil;
        sparsebp::gather_forward(ip, nip - 1, off, noff, v, nv, vi, nvi, b, nb, xp, nx, yp, ny, g);
      },
      py::arg("indptr"), py::arg("offsets"), py::arg("values"), py::arg("value_index"), py::arg("bias"), py::arg("x"),
      py::arg("y"), py::arg("geometry"), py::arg("blocks") = py::none(), py::arg("taps") = py::none(),
      py::arg("windows") = py::none());
  m.def(
      "gather_sddmm",
      [i64_vector, geometry, windows](const py::object& indptr, const py::object& offsets, const py::array& g,
                                      const py::array& x, const py::array& dvalues, const py::object& dbias,
                                      const py::tuple& geo, const py::object& blocks, const py::object& taps,
                                      const py::object& wins) {
        int64_t nip = 0, noff = 0, ng = 0, nx = 0, ndv = 0, ndb = 0;
        const int64_t* ip = i64_vector(indptr, "indptr", &nip);
        const int64_t* off = i64_vector(offsets, "offsets", &noff);
        if (!ip || nip < 1) throw sparsebp::ValueError("indptr must have at least 1 entry");
        const float* gp = vector_of<const float>(g, "g", false, &ng);
        const float* xp = vector_of<const float>(x, "x", false, &nx);
        float* dv = vector_of<float>(dvalues, "dvalues", true, &ndv);
        float* db = dbias.is_none() ? nullptr : vector_of<float>(dbias.cast<py::array>(), "dbias", true, &ndb);
        BlockArray keep, keep_w;
        TapArray keep_t;
        auto gg = geometry(geo, blocks, nip - 1, &keep);
        windows(&gg, taps, wins, noff, &keep_t, &keep_w);
        py::gil_scoped_release nogil;
        sparsebp::gather_sddmm(ip, nip - 1, off, noff, gp, ng, xp, nx, dv, ndv, db, ndb, gg);
      },
      py::arg("indptr"), py::arg("offsets"), py::arg("g"), py::arg("x"), py::arg("dvalues"), py::arg("dbias"),
      py::arg("geometry"), py::arg("blocks") = py::none(), py::arg("taps") = py::none(),
      py::arg("windows") = py::none());

  // Sparse gradients: C-contiguous 2-D float32 operands (the Python layer arranges that).
  auto rowmajor = [](const py::array& a, const char* name, bool writable) {
    check_float32(a, name);
    if (a.ndim() != 2) throw sparsebp::ValueError(str_cat(name, " must be 2-D; got ", a.ndim(), "-D"));
    if (writable && !a.writeable()) throw sparsebp::ValueError(str_cat(name, " must be writeable"));
    if (a.size() == 0)  // NumPy gives empty arrays zero strides
      return std::make_tuple(static_cast<float*>(const_cast<void*>(a.data())), a.shape(0), a.shape(1), a.shape(1));
    if (a.shape(1) > 1 && a.strides(1) != 4) throw sparsebp::ValueError(str_cat(name, " must be C-contiguous"));
    if (a.shape(0) > 1 && (a.strides(0) % 4 != 0 || a.strides(0) < 4 * a.shape(1)))
      throw sparsebp::ValueError(str_cat(name, " has unsupported strides"));
    const int64_t ld = a.shape(0) > 1 ? a.strides(0) / 4 : a.shape(1);
    return std::make_tuple(static_cast<float*>(const_cast<void*>(a.data())), a.shape(0), a.shape(1), ld);
  };
  m.def(
      "topk_rows",
      [rowmajor](const py::array& g, int64_t k, const py::array& idx) {
        auto [gp, rows, n, ld] = rowmajor(g, "g", false);
        if (!py::array_t<int32_t>::check_(idx) || idx.ndim() != 2 || !idx.writeable() ||
            idx.shape(0) != rows || idx.shape(1) != std::min<int64_t>(std::max<int64_t>(k, 0), n) ||
            !(idx.flags() & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_))
          throw sparsebp::ValueError("idx must be a writeable C-contiguous int32 array of shape (rows, min(k, n))");
        int32_t* ip = static_cast<int32_t*>(const_cast<void*>(idx.data()));
        py::gil_scoped_release nogil;
        sparsebp::topk_rows(gp, rows, n, ld, k, ip);
      },
      py::arg("g"), py::arg("k"), py::arg("idx"));
  m.def(
      "softmax_xent",
      [rowmajor](const py::array& z, const py::array& labels, const py::array& grad) {
        auto [zp, rows, classes, ld] = rowmajor(z, "logits", false);
        py::array_t<int64_t, py::array::c_style | py::array::forcecast> lab(labels);
        if (lab.ndim() != 1 || lab.shape(0) != rows)
          throw sparsebp::ValueError(str_cat("labels must have shape (", rows, ",)"));
        check_float32(grad, "grad");
        if (grad.ndim() != 2 || grad.shape(0) != rows || grad.shape(1) != classes || !grad.writeable() ||
            !(grad.flags() & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_))
          throw sparsebp::ValueError("grad must be a writeable C-contiguous float32 array of the logits' shape");
        if (classes == 0) throw sparsebp::ValueError("logits must have at least one class");
        float* gp = static_cast<float*>(const_cast<void*>(grad.data()));
        const int64_t* lp = lab.data();
        py::gil_scoped_release nogil;
        return sparsebp::softmax_xent(zp, rows, classes, ld, lp, gp);
      },
      py::arg("logits"), py::arg("labels"), py::arg("grad"));
  m.def(
      "project_budget",
      [](const py::array& s, double budget, bool select) {
        py::array_t<double, py::array::c_style | py::array::forcecast> sd(s);
        if (sd.ndim() != 1) throw sparsebp::ValueError(str_cat("s must be 1-D; got ", sd.ndim(), "-D"));
        py::array_t<double> out(sd.shape(0));
        const double* sp = sd.data();
        double* op = out.mutable_data();
        const int64_t n = sd.shape(0);
        {
          py::gil_scoped_release nogil;
          if (select)
            sparsebp::project_budget_select(sp, n, budget, op);
          else
            sparsebp::project_budget(sp, n, budget, op);
        }
        return out;
      },
      py::arg("s"), py::arg("budget"), py::arg("select") = false);
  auto f64_vec = [](const py::array& a, const char* name, int64_t n, bool writable) {
    if (!py::array_t<double>::check_(a) || a.ndim() != 1 || a.shape(0) != n ||
        !(a.flags() & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_) || (writable && !a.writeable()))
      throw sparsebp::ValueError(
          str_cat(name, " must be a ", writable ? "writeable " : "", "contiguous float64 array of shape (", n, ",)"));
    return static_cast<double*>(const_cast<void*>(a.data()));
  };
  auto bool_vec = [](const py::array& a, const char* name, int64_t n) {
    if (!py::array_t<bool>::check_(a) || a.ndim() != 1 || a.shape(0) != n ||
        !(a.flags() & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_))
      throw sparsebp::ValueError(str_cat(name, " must be a contiguous bool array of shape (", n, ",)"));
    return static_cast<const uint8_t*>(a.data());
  };
  m.def(
      "mask_estimator",
      [f64_vec, bool_vec](const py::array& s, const py::array& m1, const py::array& m2, double df, bool textbook,
                const py::array& g) {
        if (s.ndim() != 1) throw sparsebp::ValueError(str_cat("s must be 1-D; got ", s.ndim(), "-D"));
        const int64_t n = s.shape(0);
        const double* sp = f64_vec(s, "s", n, false);
        double* gp = f64_vec(g, "g", n, true);
        const uint8_t* p1 = bool_vec(m1, "m1", n);
        const uint8_t* p2 = bool_vec(m2, "m2", n);
        py::gil_scoped_release nogil;
        return sparsebp::mask_estimator(sp, p1, p2, n, df, textbook, gp);
      },
      py::arg("s"), py::arg("m1"), py::arg("m2"), py::arg("df"), py::arg("textbook"), py::arg("g"));
  m.def(
      "mask_estimator_csr",
      [](const py::array& s, const py::array& indptr1, const py::array& indices1, const py::array& indptr2,
         const py::array& indices2, double df, bool textbook, const py::array& g) {
        const auto c_contig = py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_;
        if (!py::array_t<double>::check_(s) || s.ndim() != 2 || !(s.flags() & c_contig))
          throw sparsebp::ValueError("s must be a C-contiguous 2-D float64 array");
        const int64_t rows = s.shape(0), cols = s.shape(1);
        if (!py::array_t<double>::check_(g) || g.ndim() != 2 || g.shape(0) != rows || g.shape(1) != cols ||
            !(g.flags() & c_contig) || !g.writeable())
          throw sparsebp::ValueError(
              str_cat("g must be a writeable C-contiguous float64 array of shape (", rows, ", ", cols, ")"));
        auto structure = [&](const py::array& ip, const py::array& ix, const char* which) {
          if (!py::array_t<int64_t>::check_(ip) || ip.ndim() != 1 || ip.shape(0) != rows + 1 || !(ip.flags() & c_contig))
            throw sparsebp::ValueError(
                str_cat("indptr", which, " must be a contiguous int64 array of length ", rows + 1));
          if (!py::array_t<int32_t>::check_(ix) || ix.ndim() != 1 || !(ix.flags() & c_contig))
            throw sparsebp::ValueError(str_cat("indices", which, " must be a contiguous 1-D int32 array"));
          return std::make_tuple(static_cast<const int64_t*>(ip.data()), static_cast<const int32_t*>(ix.data()),
                                 static_cast<int64_t>(ix.shape(0)));
        };
        auto [ip1, ix1, n1] = structure(indptr1, indices1, "1");
        auto [ip2, ix2, n2] = structure(indptr2, indices2, "2");
        const double* sp = static_cast<const double*>(s.data());
        double* gp = static_cast<double*>(const_cast<void*>(g.data()));
        if (rows * cols > 0 && sp < gp + rows * cols && gp < sp + rows * cols)
          throw sparsebp::ValueError("g must not overlap s (g is overwritten whole)");
        py::gil_scoped_release nogil;
        return sparsebp::mask_estimator_csr(sp, rows, cols, ip1, ix1, n1, ip2, ix2, n2, df, textbook, gp);
      },
      py::arg("s"), py::arg("indptr1"), py::arg("indices1"), py::arg("indptr2"), py::arg("indices2"), py::arg("df"),
      py::arg("textbook"), py::arg("g"));
  // The union of two flat bool masks, cut into consecutive segments of the given sizes (one per
  // layer): for each segment, (positions in the segment where either mask is set: int64, the two
  // masks there: a 2 x count float32 array of 1 / 0).
  m.def(
      "mask_union",
      [bool_vec](const py::array& m1, const py::array& m2, const std::vector<int64_t>& sizes) {
        if (m1.ndim() != 1) throw sparsebp::ValueError(str_cat("m1 must be 1-D; got ", m1.ndim(), "-D"));
        const int64_t n = m1.shape(0);
        const uint8_t* p1 = bool_vec(m1, "m1", n);
        const uint8_t* p2 = bool_vec(m2, "m2", n);
        int64_t total = 0;
        for (int64_t sz : sizes) {
          if (sz < 0) throw sparsebp::ValueError(str_cat("sizes must be >= 0; got ", sz));
          total += sz;
        }
        if (total != n) throw sparsebp::ValueError(str_cat("sizes must add up to the masks' length ", n, "; got ", total));
        py::list out;
        int64_t off = 0;
        for (int64_t sz : sizes) {
          const int64_t c = sparsebp::mask_union_count(p1 + off, p2 + off, sz);
          py::array_t<int64_t> idx(c);
          py::array_t<float> keep({int64_t{2}, c});
          sparsebp::mask_union(p1 + off, p2 + off, sz, c, idx.mutable_data(), keep.mutable_data());
          out.append(py::make_tuple(idx, keep));
          off += sz;
        }
        return out;
      },
      py::arg("m1"), py::arg("m2"), py::arg("sizes"));
  m.def(
      "mask_adam_project",
      [f64_vec](const py::array& s, const py::array& mm, const py::array& vv, const py::array& g, double scale,
                double b1, double b2, double step_size, double inv_c2, double eps, double budget) {
        if (s.ndim() != 1) throw sparsebp::ValueError(str_cat("s must be 1-D; got ", s.ndim(), "-D"));
        const int64_t n = s.shape(0);
        double* sp = f64_vec(s, "s", n, true);
        double* mp = f64_vec(mm, "m", n, true);
        double* vp = f64_vec(vv, "v", n, true);
        const double* gp = f64_vec(g, "g", n, false);
        py::gil_scoped_release nogil;
        sparsebp::mask_adam_project(sp, mp, vp, gp, n, scale, b1, b2, step_size, inv_c2, eps, budget);
      },
      py::arg("s"), py::arg("m"), py::arg("v"), py::arg("g"), py::arg("scale"), py::arg("b1"), py::arg("b2"),
      py::arg("step_size"), py::arg("inv_c2"), py::arg("eps"), py::arg("budget"));
  m.def(
      "selection_by_column",
      [rowmajor](const py::array& sel, const py::array& g) {
        auto [gp, rows, n, ld] = rowmajor(g, "g", false);
        if (!py::array_t<int32_t>::check_(sel) || sel.ndim() != 2 || sel.shape(0) != rows ||
            !(sel.flags() & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_))
          throw sparsebp::ValueError(str_cat("selected must be a C-contiguous int32 array of shape (", rows, ", k)"));
        const int64_t k = sel.shape(1), total = rows * k;
        py::array_t<int64_t> indptr(n + 1);
        py::array_t<int32_t> row_of(total);
        py::array_t<float> vals(total);
        py::array_t<int32_t> touched(std::min(n, total));
        py::array_t<int64_t> touched_indptr(std::min(n, total) + 1);
        py::array_t<float> by_example(total);
        int64_t nt = 0;
        {
          py::gil_scoped_release nogil;
          sparsebp::selection_by_column(static_cast<const int32_t*>(sel.data()), rows, k, gp, ld, n,
                                        indptr.mutable_data(), row_of.mutable_data(), vals.mutable_data(),
                                        touched.mutable_data(), &nt, touched_indptr.mutable_data(),
                                        by_example.mutable_data());
        }
        return py::make_tuple(indptr, row_of, vals, touched[py::slice(0, nt, 1)], touched_indptr[py::slice(0, nt + 1, 1)],
                              by_example);
      },
      py::arg("selected"), py::arg("g"));
  m.def(
      "msbp_step",
      [rowmajor](const py::array& g, const py::object& memory, const py::object& u, double alpha, int64_t k,
                 const py::array& cols, const py::array& m_out) {
        auto [gp, rows, n, ldg] = rowmajor(g, "g", false);
        auto [mo, mrows, mn, ldmo] = rowmajor(m_out, "m_out", true);
        if (mrows != rows || mn != n)
          throw sparsebp::ValueError(str_cat("m_out must have shape (", rows, ", ", n, "); got (", mrows, ", ", mn, ")"));
        const float* mp = nullptr;
        float* up = nullptr;
        int64_t ldm = n, ldu = n;
        if (memory.is_none() != u.is_none()) throw sparsebp::ValueError("memory and u must be given together");
        if (!memory.is_none()) {
          auto [p1, r1, c1, l1] = rowmajor(memory.cast<py::array>(), "memory", false);
          auto [p2, r2, c2, l2] = rowmajor(u.cast<py::array>(), "u", true);
          if (r1 != rows || c1 != n || r2 != rows || c2 != n)
            throw sparsebp::ValueError(str_cat("memory and u must have g's shape (", rows, ", ", n, ")"));
          mp = p1;
          up = p2;
          ldm = l1;
          ldu = l2;
        }
        if (k < 0) throw sparsebp::ValueError(str_cat("k must be >= 0; got ", k));
        if (!py::array_t<int32_t>::check_(cols) || cols.ndim() != 1 || !cols.writeable() ||
            cols.shape(0) != std::min(k, n) || !(cols.flags() & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_))
          throw sparsebp::ValueError("cols must be a writeable contiguous int32 array of min(k, n) entries");
        int32_t* cp = static_cast<int32_t*>(const_cast<void*>(cols.data()));
        py::gil_scoped_release nogil;
        sparsebp::msbp_step(gp, rows, n, ldg, mp, ldm, up, ldu, static_cast<float>(alpha), k, cp, mo, ldmo);
      },
      py::arg("g"), py::arg("memory"), py::arg("u"), py::arg("alpha"), py::arg("k"), py::arg("cols"),
      py::arg("m_out"),
      "One step of MSBP-style memory (sparsebp.algorithms.MSBP.select): u = g + memory, the top-k columns "
      "of u by sum |u|, m_out = alpha * u outside them (subnormals flushed to 0).");
  m.def(
      "abs_colsum",
      [rowmajor](const py::array& g, const py::array& out) {
        auto [gp, rows, n, ld] = rowmajor(g, "g", false);
        int64_t no = 0;
        float* op = vector_of<float>(out, "out", true, &no);
        if (no != n) throw sparsebp::ValueError(str_cat("out must have ", n, " entries; got ", no));
        py::gil_scoped_release nogil;
        sparsebp::abs_colsum(gp, rows, n, ld, op);
      },
      py::arg("g"), py::arg("out"));
  // A CSR given as three arrays (indptr int64, indices int32, values float32), contiguous.
  auto csr_arrays = [](const py::array& indptr, const py::array& indices, const py::array& values) {
    if (!py::array_t<int64_t>::check_(indptr) || indptr.ndim() != 1 || indptr.shape(0) < 1 ||
        !(indptr.flags() & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_))
      throw sparsebp::ValueError("indptr must be a contiguous 1-D int64 array with at least 1 entry");
    if (!py::array_t<int32_t>::check_(indices) || indices.ndim() != 1 ||
        !(indices.flags() & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_))
      throw sparsebp::ValueError("indices must be a contiguous 1-D int32 array");
    int64_t nv = 0;
    const float* vp = vector_of<const float>(values, "values", false, &nv);
    if (nv != indices.shape(0)) throw sparsebp::ValueError("values and indices differ in length");
    return std::make_tuple(static_cast<const int64_t*>(indptr.data()), static_cast<const int32_t*>(indices.data()),
                           vp, nv);
  };
  m.def(
      "csr_example_backward",
      [rowmajor, csr_arrays](const py::object& w, const py::object& indices, const py::array& values, int64_t cols,
                             const py::array& sel, const py::array& g, const py::object& x, const py::object& dx,
                             const py::object& dvalues) {
        // w: a CsrStructure (validated when built; indices must then be None) or the row pointers.
        const bool is_structure = py::isinstance<CsrStructure>(w);
        const int64_t* ip = nullptr;
        const int32_t* ix = nullptr;
        const float* vp = nullptr;
        int64_t nv = 0, rows = 0;
        if (is_structure) {
          const auto& s = w.cast<const CsrStructure&>();
          if (!indices.is_none()) throw sparsebp::ValueError("indices must be None when w is a CSR structure");
          if (s.cols() != cols)
            throw sparsebp::ValueError(str_cat("cols must be the structure's ", s.cols(), "; got ", cols));
          ip = s.indptr();
          ix = s.indices();
          rows = s.rows();
          vp = vector_of<const float>(values, "values", false, &nv);
          if (nv != s.nnz()) throw sparsebp::ValueError(str_cat("values must have nnz = ", s.nnz(), " entries; got ", nv));
        } else {
          std::tie(ip, ix, vp, nv) = csr_arrays(w.cast<py::array>(), indices.cast<py::array>(), values);
          rows = w.cast<py::array>().shape(0) - 1;
        }
        auto [gp, batch, gn, ldg] = rowmajor(g, "grad_output", false);
        if (gn != rows) throw sparsebp::ValueError(str_cat("grad_output must have ", rows, " columns; got ", gn));
        if (!py::array_t<int32_t>::check_(sel) || sel.ndim() != 2 || sel.shape(0) != batch ||
            !(sel.flags() & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_))
          throw sparsebp::ValueError(str_cat("selected must be a C-contiguous int32 array of shape (", batch, ", k)"));
        const int64_t k = sel.shape(1), nb = batch;  // (a structured binding cannot be captured in C++17)
        // An optional (batch, cols) row-major array: (data or null, row stride).
        auto optional_rows = [&](const py::object& a, const char* name, bool writable) {
          if (a.is_none()) return std::make_pair(static_cast<float*>(nullptr), cols);
          auto [p, r, c, l] = rowmajor(a.cast<py::array>(), name, writable);
          if (r != nb || c != cols)
            throw sparsebp::ValueError(
                str_cat(name, " must have shape (", nb, ", ", cols, "); got (", r, ", ", c, ")"));
          return std::make_pair(p, l);
        };
        const auto [xp, ldx] = optional_rows(x, "x", false);
        const auto [dxp, lddx] = optional_rows(dx, "dx", true);
        float* dvp = nullptr;
        if (!dvalues.is_none()) {
          int64_t n = 0;
          dvp = vector_of<float>(dvalues.cast<py::array>(), "dvalues", true, &n);
          if (n != nv) throw sparsebp::ValueError(str_cat("dvalues must have nnz = ", nv, " entries; got ", n));
          if (!xp) throw sparsebp::ValueError("dvalues needs x");
        }
        py::array_t<int32_t> touched(std::max<int64_t>(std::min(rows, batch * k), 0));
        py::array_t<int64_t> positions(nv);
        int64_t nt = 0, npos = 0;
        {
          py::gil_scoped_release nogil;
          sparsebp::csr_example_backward(ip, ix, vp, nv, rows, cols, static_cast<const int32_t*>(sel.data()), batch, k,
                                         gp, ldg, xp, ldx, dxp, lddx, dvp, touched.mutable_data(), &nt, is_structure,
                                         positions.mutable_data(), &npos);
        }
        // The touched rows (increasing) and the positions of their entries (increasing).
        return py::make_tuple(touched[py::slice(0, nt, 1)], positions[py::slice(0, npos, 1)]);
      },
      py::arg("w"), py::arg("indices"), py::arg("values"), py::arg("cols"), py::arg("selected"),
      py::arg("grad_output"), py::arg("x"), py::arg("dx"), py::arg("dvalues"));
  m.def(
      "csr_rows_backward",
      [](const CsrStructure& w, const py::array& values, const py::array& sel, const py::array& grad_output,
         const py::array& x, const py::object& grad_input, const py::object& dvalues) {
        int64_t nv = 0, ndv = 0;
        const float* v = vector_of<const float>(values, "values", false, &nv);
        if (!py::array_t<int32_t>::check_(sel) || sel.ndim() != 1 ||
            !(sel.flags() & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_))
          throw sparsebp::ValueError("selected must be a contiguous 1-D int32 array");
        const auto gd = dense_of<const float>(grad_output, "grad_output", false);
        const auto xd = dense_of<const float>(x, "x", false);
        sparsebp::DenseOut gid{};
        const bool want_gi = !grad_input.is_none();
        if (want_gi) gid = dense_of<float>(grad_input.cast<py::array>(), "grad_input", true);
        float* dv = dvalues.is_none() ? nullptr : vector_of<float>(dvalues.cast<py::array>(), "dvalues", true, &ndv);
        // Room for the selected rows' entries (a row outside the structure counts 0 here; the
        // call below refuses it before writing).
        const auto* sp = static_cast<const int32_t*>(sel.data());
        int64_t room = 0;
        for (int64_t i = 0; i < sel.shape(0); ++i)
          if (sp[i] >= 0 && sp[i] < w.rows()) room += w.indptr()[sp[i] + 1] - w.indptr()[sp[i]];
        py::array_t<int64_t> positions(std::min(room, w.nnz()));
        int64_t npos = 0;
        {
          py::gil_scoped_release nogil;
          sparsebp::csr_rows_backward(w, v, nv, sp, sel.shape(0), gd, xd,
                                      want_gi ? &gid : nullptr, dv, ndv, positions.mutable_data(), &npos);
        }
        return positions;  // the positions of the selected rows' entries (increasing)
      },
      py::arg("structure"), py::arg("values"), py::arg("selected"), py::arg("grad_output"), py::arg("x"),
      py::arg("grad_input"), py::arg("dvalues"));
  m.def(
      "spmm_rows",
      [rowmajor, csr_arrays](const py::array& indptr, const py::array& indices, const py::array& values,
                             const py::array& d, const py::array& out) {
        auto [ip, ix, vp, nv] = csr_arrays(indptr, indices, values);
        auto [dp, drows, dcols, ldd] = rowmajor(d, "d", false);
        auto [op, orows, ocols, ldo] = rowmajor(out, "out", true);
        const int64_t rows = indptr.shape(0) - 1;
        if (orows != rows || ocols != dcols)
          throw sparsebp::ValueError(
              str_cat("out must have shape (", rows, ", ", dcols, "); got (", orows, ", ", ocols, ")"));
        py::gil_scoped_release nogil;
        sparsebp::spmm_rows(ip, rows, ix, vp, nv, dp, drows, ldd, dcols, op, ldo);
      },
      py::arg("indptr"), py::arg("indices"), py::arg("values"), py::arg("d"), py::arg("out"));
  m.def(
      "transpose",
      [rowmajor](const py::array& src, const py::array& out) {
        auto [sp, rows, cols, lds] = rowmajor(src, "src", false);
        auto [op, orows, ocols, ldo] = rowmajor(out, "out", true);
        if (orows != cols || ocols != rows)
          throw sparsebp::ValueError(
              str_cat("out must have shape (", cols, ", ", rows, "); got (", orows, ", ", ocols, ")"));
        py::gil_scoped_release nogil;
        sparsebp::transpose(sp, rows, cols, lds, op, ldo);
      },
      py::arg("src"), py::arg("out"),
      "out[j, i] = src[i, j] for 2-D float32 arrays with unit column stride (out: (cols, rows)), threaded.");
  m.def(
      "spmm_scatter",
      [rowmajor, csr_arrays](const py::array& indptr, const py::array& indices, const py::array& values,
                             const py::array& d, const py::array& out) {
        auto [ip, ix, vp, nv] = csr_arrays(indptr, indices, values);
        auto [dp, drows, dcols, ldd] = rowmajor(d, "d", false);
        auto [op, orows, ocols, ldo] = rowmajor(out, "out", true);
        const int64_t rows = indptr.shape(0) - 1;
        if (drows != rows)
          throw sparsebp::ValueError(str_cat("d must have ", rows, " rows (one per CSR row); got ", drows));
        if (ocols != dcols) throw sparsebp::ValueError(str_cat("out must have ", dcols, " columns; got ", ocols));
        py::gil_scoped_release nogil;
        sparsebp::spmm_scatter(ip, rows, ix, vp, nv, dp, ldd, dcols, op, orows, ldo);
      },
      py::arg("indptr"), py::arg("indices"), py::arg("values"), py::arg("d"), py::arg("out"));
  m.def(
      "adam_step",
      [](const py::array& p, const py::array& g, const py::array& m, const py::array& v, const py::object& rows,
         double b1, double b2, float step_size, float inv_c2, float eps, bool compact) {
        auto c_f32 = [](const py::array& a, const char* name, bool writable) {
          check_float32(a, name);
          if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_))
            throw sparsebp::ValueError(str_cat(name, " must be C-contiguous"));
          if (writable && !a.writeable()) throw sparsebp::ValueError(str_cat(name, " must be writeable"));
          return static_cast<float*>(const_cast<void*>(a.data()));
        };
        if (p.ndim() < 1 || p.ndim() > 2) throw sparsebp::ValueError("p must be 1-D or 2-D");
        for (const py::array* a : {&m, &v})
          if (a->ndim() != p.ndim() || !std::equal(a->shape(), a->shape() + a->ndim(), p.shape()))
            throw sparsebp::ValueError("m and v must have p's shape");
        const int64_t* rl = nullptr;
        int64_t nrl = 0;
        py::array_t<int64_t, py::array::c_style | py::array::forcecast> rows_arr;
        if (!rows.is_none()) {
          rows_arr = py::array_t<int64_t, py::array::c_style | py::array::forcecast>(rows);
          if (rows_arr.ndim() != 1) throw sparsebp::ValueError("rows must be 1-D");
          rl = rows_arr.data();
          nrl = rows_arr.shape(0);
        }
        if (compact && rows.is_none()) throw sparsebp::ValueError("compact=True needs a row list");
        if (compact) {  // g: one row per listed row
          if (g.ndim() != p.ndim() || g.shape(0) != nrl || (p.ndim() == 2 && g.shape(1) != p.shape(1)))
            throw sparsebp::ValueError(str_cat("g must have one row per listed row (", nrl, ") and p's columns"));
        } else if (g.ndim() != p.ndim() || !std::equal(g.shape(), g.shape() + g.ndim(), p.shape())) {
          throw sparsebp::ValueError("g must have p's shape");
        }
        float* pp = c_f32(p, "p", true);
        const float* gp = c_f32(g, "g", false);
        float* mp = c_f32(m, "m", true);
        float* vp = c_f32(v, "v", true);
        // A 1-D parameter is one row of n (contiguous, vectorised) unless a row list picks elements.
        const bool one_row = p.ndim() == 1 && rows.is_none();
        const int64_t nrows = one_row ? 1 : p.shape(0), ncols = p.ndim() == 2 ? p.shape(1) : one_row ? p.shape(0) : 1;
        py::gil_scoped_release nogil;
        sparsebp::adam_step(pp, gp, mp, vp, nrows, ncols, rl, nrl, compact, b1, b2, step_size, inv_c2, eps);
      },
      py::arg("p"), py::arg("g"), py::arg("m"), py::arg("v"), py::arg("rows"), py::arg("b1"), py::arg("b2"),
      py::arg("step_size"), py::arg("inv_c2"), py::arg("eps"), py::arg("compact") = false);
  // Unit-mask blocks. Index lists: None or 1-D int64 (converted); 1-D float arrays count as (n, 1).
  using IndexArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
  auto index_list = [](const py::object& o, const char* name, IndexArray* keep) -> std::pair<const int64_t*, int64_t> {
    if (o.is_none()) return {nullptr, -1};
    *keep = IndexArray(o);
    if (keep->ndim() != 1) throw sparsebp::ValueError(str_cat(name, " must be 1-D"));
    return {keep->data(), keep->shape(0)};
  };
  auto matrix = [rowmajor](const py::array& a, const char* name, bool writable) {
    if (a.ndim() == 1) {
      check_float32(a, name);
      if (writable && !a.writeable()) throw sparsebp::ValueError(str_cat(name, " must be writeable"));
      if (a.shape(0) > 1 && a.strides(0) != 4) throw sparsebp::ValueError(str_cat(name, " must be contiguous"));
      return std::make_tuple(static_cast<float*>(const_cast<void*>(a.data())), static_cast<int64_t>(a.shape(0)),
                             int64_t{1}, int64_t{1});
    }
    auto [p, r, c, ld] = rowmajor(a, name, writable);
    return std::make_tuple(p, static_cast<int64_t>(r), static_cast<int64_t>(c), static_cast<int64_t>(ld));
  };
  // The block rows x cols of a (big_rows x big_cols) matrix (None: all), and the check that the
  // compact operand `name` has the block's shape.
  auto block = [index_list](const py::object& rows, const py::object& cols, int64_t big_rows, int64_t big_cols,
                            int64_t got_rows, int64_t got_cols, const char* name, IndexArray* ra, IndexArray* ca) {
    auto [rp, nr] = index_list(rows, "rows", ra);
    auto [cp, nc] = index_list(cols, "cols", ca);
    if (!rp) nr = big_rows;
    if (!cp) nc = big_cols;
    if (got_rows != nr || got_cols != nc)
      throw sparsebp::ValueError(
          str_cat(name, " must have shape (", nr, ", ", nc, "); got (", got_rows, ", ", got_cols, ")"));
    return std::make_tuple(rp, nr, cp, nc);
  };
  m.def(
      "gather_block",
      [matrix, block](const py::array& src, const py::object& rows, const py::object& cols, const py::array& out) {
        IndexArray ra, ca;
        auto [sp, srows, scols, lds] = matrix(src, "src", false);
        auto [op, orows, ocols, ldo] = matrix(out, "out", true);
        auto [rp, nr, cp, nc] = block(rows, cols, srows, scols, orows, ocols, "out", &ra, &ca);
        py::gil_scoped_release nogil;
        sparsebp::gather_block(sp, srows, scols, lds, rp, nr, cp, nc, op, ldo);
      },
      py::arg("src"), py::arg("rows"), py::arg("cols"), py::arg("out"));
  m.def(
      "scatter_add_block",
      [matrix, block](const py::array& dst, const py::object& rows, const py::object& cols, const py::array& src,
                           float alpha) {
        IndexArray ra, ca;
        auto [dp, drows, dcols, ldd] = matrix(dst, "dst", true);
        auto [sp, srows, scols, lds] = matrix(src, "src", false);
        auto [rp, nr, cp, nc] = block(rows, cols, drows, dcols, srows, scols, "src", &ra, &ca);
        py::gil_scoped_release nogil;
        sparsebp::scatter_add_block(dp, drows, dcols, ldd, rp, nr, cp, nc, sp, lds, alpha);
      },
      py::arg("dst"), py::arg("rows"), py::arg("cols"), py::arg("src"), py::arg("alpha") = 1.0f);
  m.def(
      "lazy_sgd",
      [index_list, matrix](const py::array& w, const py::array& buf, const py::object& stamp, const py::object& rows,
                           const py::object& cols, const py::object& powers, int64_t now, const py::object& g,
                           const py::object& out, double lr, double momentum, double decay, bool peek,
                           const py::object& g_cols) {
        IndexArray ra, ca, ga;
        auto [rp, nr] = index_list(rows, "rows", &ra);
        auto [cp, nc] = index_list(cols, "cols", &ca);
        auto [gcp, ngc] = index_list(g_cols, "g_cols", &ga);  // ngc = -1 without
        auto [wp, wr, wc, ldw] = matrix(w, "w", true);
        auto [bp, br, bc, ldb] = matrix(buf, "buf", true);
        if (ldw != wc || ldb != bc || br != wr || bc != wc)
          throw sparsebp::ValueError("w and buf must be C-contiguous arrays of the same shape");
        if (!rp) nr = wr;
        if (!cp) nc = wc;
        int32_t* stp = nullptr;
        bool row_stamps = false;
        if (!stamp.is_none()) {
          py::array st = stamp.cast<py::array>();
          if (!py::array_t<int32_t>::check_(st) || (st.size() != wr * wc && st.size() != wr) || !st.writeable() ||
              !(st.flags() & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_))
            throw sparsebp::ValueError(
                "stamp must be a writeable C-contiguous int32 array with w's size, or one entry per row");
          row_stamps = st.size() == wr && wc != 1;
          stp = static_cast<int32_t*>(st.mutable_data());
        }
        const float* pw = nullptr;
        int64_t max_lag = 0;
        py::array_t<float, py::array::c_style | py::array::forcecast> pa;
        if (!powers.is_none()) {
          pa = py::array_t<float, py::array::c_style | py::array::forcecast>(powers);
          if (pa.ndim() != 3 || pa.shape(1) != 2 || pa.shape(2) != 2 || pa.shape(0) < 1)
            throw sparsebp::ValueError("powers must have shape (max_lag + 1, 2, 2)");
          pw = pa.data();
          max_lag = pa.shape(0) - 1;
        }
        if (now < 0 || now > INT32_MAX - 1) throw sparsebp::ValueError(str_cat("now must lie in [0, 2^31 - 2]; got ", now));
        auto block = [&](const py::object& o, const char* name, bool writable, int64_t want_cols) -> float* {
          if (o.is_none()) return nullptr;
          py::array a = o.cast<py::array>();
          auto [p, r, c, ld] = matrix(a, name, writable);
          if (r != nr || c != want_cols || ld != want_cols)
            throw sparsebp::ValueError(str_cat(name, " must be a C-contiguous (", nr, ", ", want_cols, ") block"));
          return p;
        };
        if (gcp && g.is_none()) throw sparsebp::ValueError("g_cols needs g");
        const float* gp = block(g, "g", false, gcp ? ngc : nc);
        float* op = block(out, "out", true, nc);
        py::gil_scoped_release nogil;
        sparsebp::lazy_sgd(wp, bp, stp, row_stamps, wr, wc, rp, nr, cp, nc, pw, max_lag, static_cast<int32_t>(now), gp,
                           op, static_cast<float>(lr), static_cast<float>(momentum), static_cast<float>(decay), peek,
                           gcp, gcp ? ngc : -1);
      },
      py::arg("w"), py::arg("buf"), py::arg("stamp"), py::arg("rows"), py::arg("cols"), py::arg("powers"),
      py::arg("now"), py::arg("g"), py::arg("out"), py::arg("lr"), py::arg("momentum"), py::arg("decay"),
      py::arg("peek") = false, py::arg("g_cols") = py::none());
  m.def(
      "bernoulli_csr",
      [rowmajor](const py::array& s, uint64_t seed) {
        auto [sp, rows, cols, lds] = rowmajor(s, "s", false);
        std::vector<int64_t> indptr;
        std::vector<int32_t> indices;
        {
          py::gil_scoped_release nogil;
          sparsebp::bernoulli_csr(sp, rows, cols, lds, seed, &indptr, &indices);
        }
        return py::make_tuple(py::array_t<int64_t>(indptr.size(), indptr.data()),
                              py::array_t<int32_t>(indices.size(), indices.data()));
      },
      py::arg("s"), py::arg("seed"));
  // The first i with a[i] <= a[i - 1] in a 1-D int32 array, or -1 when it is strictly increasing
  // (a selection's sortedness check: NumPy's np.diff and compare took ~5-10 us for 20 entries).
  m.def(
      "first_not_increasing",
      [](const py::array& a) -> int64_t {
        if (!py::array_t<int32_t>::check_(a) || a.ndim() != 1 ||
            !(a.flags() & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_))
          throw sparsebp::ValueError("first_not_increasing takes a C-contiguous 1-D int32 array");
        const int32_t* d = static_cast<const int32_t*>(a.data());
        for (int64_t i = 1; i < a.shape(0); ++i)
          if (d[i] <= d[i - 1]) return i;
        return -1;
      },
      py::arg("a"));
  // Whether two host buffers (raw addresses) hold the same bytes: the structure caches' check that
  // index tensors still hold what a cached structure was built from (sparsebp/torch/_ops.py).
  m.def("memeq", [](uintptr_t a, uintptr_t b, int64_t nbytes) {
    if (nbytes < 0) throw sparsebp::ValueError("memeq: nbytes must be >= 0");
    if (nbytes == 0 || a == b) return true;
    py::gil_scoped_release nogil;
    return std::memcmp(reinterpret_cast<const void*>(a), reinterpret_cast<const void*>(b),
                       static_cast<size_t>(nbytes)) == 0;
  });
  // CUDA: raw device pointers as Python ints (0 = null); the Python layer (sparsebp/_cuda.py)
  // checks devices, shapes and dtypes and allocates the outputs.
  namespace cu = sparsebp::cuda;
  auto fptr = [](uintptr_t p) { return reinterpret_cast<float*>(p); };
  m.def("cuda_compiled", &cu::compiled);
  m.def("cuda_device_count", &cu::device_count);
  m.def("cuda_device_name", &cu::device_name, py::arg("device"));
  m.def("cuda_synchronize", [](int dev, uintptr_t stream) {
    py::gil_scoped_release nogil;
    cu::synchronize(dev, stream);
  });
  m.def("cuda_csr_rows", [fptr](int dev, uintptr_t stream, int64_t batch, int64_t rows, uintptr_t indptr,
                                uintptr_t indices, uintptr_t values, uintptr_t vidx, uintptr_t bias, uintptr_t x,
                                int64_t ldx, uintptr_t y, int64_t ldy) {
    py::gil_scoped_release nogil;
    cu::csr_rows_times_dense(dev, stream, batch, rows, reinterpret_cast<const int64_t*>(indptr),
                             reinterpret_cast<const int32_t*>(indices), fptr(values),
                             reinterpret_cast<const int64_t*>(vidx), fptr(bias), fptr(x), ldx, fptr(y), ldy);
  });
  m.def(
      "cuda_sddmm",
      [fptr](int dev, uintptr_t stream, int64_t batch, int64_t rows, uintptr_t indptr, uintptr_t indices, uintptr_t gt,
             int64_t ldg, uintptr_t xt, int64_t ldx, uintptr_t dv, uintptr_t db, uintptr_t g, int64_t ldg_src,
             uintptr_t partials, int64_t parts, int64_t nnz) {
        py::gil_scoped_release nogil;
        cu::sddmm(dev, stream, batch, rows, reinterpret_cast<const int64_t*>(indptr),
                  reinterpret_cast<const int32_t*>(indices), fptr(gt), ldg, fptr(xt), ldx, fptr(dv), fptr(db), fptr(g),
                  ldg_src, fptr(partials), parts, nnz);
      },
      py::arg("dev"), py::arg("stream"), py::arg("batch"), py::arg("rows"), py::arg("indptr"), py::arg("indices"),
      py::arg("gt"), py::arg("ldg"), py::arg("xt"), py::arg("ldx"), py::arg("dvalues"), py::arg("dbias"),
      py::arg("g") = 0, py::arg("ldg_src") = 0, py::arg("partials") = 0, py::arg("parts") = 1, py::arg("nnz") = 0);
  m.def(
      "cuda_csr_fm",
      [fptr](int dev, uintptr_t stream, int64_t batch, int64_t rows, uintptr_t indptr, uintptr_t indices,
             uintptr_t values, uintptr_t vidx, uintptr_t bias, uintptr_t xt, int64_t ldx, uintptr_t y, int64_t ldy,
             bool y_batch_major, uintptr_t x, int64_t cols, int64_t ldx_src) {
        py::gil_scoped_release nogil;
        cu::csr_times_feature_major(dev, stream, batch, rows, reinterpret_cast<const int64_t*>(indptr),
                                    reinterpret_cast<const int32_t*>(indices), fptr(values),
                                    reinterpret_cast<const int64_t*>(vidx), fptr(bias), fptr(xt), ldx, fptr(y), ldy,
                                    y_batch_major, fptr(x), cols, ldx_src);
      },
      py::arg("dev"), py::arg("stream"), py::arg("batch"), py::arg("rows"), py::arg("indptr"), py::arg("indices"),
      py::arg("values"), py::arg("vidx"), py::arg("bias"), py::arg("xt"), py::arg("ldx"), py::arg("y"),
      py::arg("ldy"), py::arg("y_batch_major"), py::arg("x") = 0, py::arg("cols") = 0, py::arg("ldx_src") = 0);
  m.def("cuda_transpose", [fptr](int dev, uintptr_t stream, int64_t rows, int64_t cols, uintptr_t in, int64_t ldi,
                                 uintptr_t out, int64_t ldo) {
    py::gil_scoped_release nogil;
    cu::transpose(dev, stream, rows, cols, fptr(in), ldi, fptr(out), ldo);
  });
  m.def("cuda_sddmm_bm", [fptr](int dev, uintptr_t stream, int64_t batch, int64_t rows, uintptr_t indptr,
                                uintptr_t indices, uintptr_t g, int64_t ldg, uintptr_t x, int64_t ldx, uintptr_t dv,
                                uintptr_t db) {
    py::gil_scoped_release nogil;
    cu::sddmm_batch_major(dev, stream, batch, rows, reinterpret_cast<const int64_t*>(indptr),
                          reinterpret_cast<const int32_t*>(indices), fptr(g), ldg, fptr(x), ldx, fptr(dv), fptr(db));
  });
  m.def("cuda_topk_rows", [fptr](int dev, uintptr_t stream, uintptr_t src, int64_t rows, int64_t n, int64_t lds,
                                 int64_t k, uintptr_t idx, uintptr_t nan_rows) {
    py::gil_scoped_release nogil;
    cu::topk_rows(dev, stream, fptr(src), rows, n, lds, k, reinterpret_cast<int32_t*>(idx),
                  reinterpret_cast<uint8_t*>(nan_rows));
  });
  m.def("cuda_abs_colsum", [fptr](int dev, uintptr_t stream, uintptr_t src, int64_t rows, int64_t n, int64_t lds,
                                  uintptr_t out) {
    py::gil_scoped_release nogil;
    cu::abs_colsum(dev, stream, fptr(src), rows, n, lds, fptr(out));
  });
  m.def("cuda_meprop_example", [fptr](int dev, uintptr_t stream, int64_t batch, int64_t k, int64_t out, int64_t in,
                                      uintptr_t sel, uintptr_t g, int64_t ldg, uintptr_t w, uintptr_t x, int64_t ldx,
                                      uintptr_t dx, uintptr_t dw) {
    py::gil_scoped_release nogil;
    cu::meprop_example(dev, stream, batch, k, out, in, reinterpret_cast<const int32_t*>(sel), fptr(g), ldg, fptr(w),
                       fptr(x), ldx, fptr(dx), fptr(dw));
  });
  m.def("cuda_gemm", [fptr](int dev, uintptr_t stream, int64_t m_, int64_t n, int64_t kk, uintptr_t a, int64_t sa0,
                            int64_t sa1, uintptr_t b, int64_t sb0, int64_t sb1, uintptr_t c, int64_t ldc) {
    py::gil_scoped_release nogil;
    cu::gemm(dev, stream, m_, n, kk, fptr(a), sa0, sa1, fptr(b), sb0, sb1, fptr(c), ldc);
  });
  m.def(
      "relu",
      [](const py::array& x, const py::object& mask, const py::array& y) {
        auto flat = [](const py::array& a, const char* name, bool writable) {
          check_float32(a, name);
          if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_))
            throw sparsebp::ValueError(str_cat(name, " must be C-contiguous"));
          if (writable && !a.writeable()) throw sparsebp::ValueError(str_cat(name, " must be writeable"));
          return static_cast<float*>(const_cast<void*>(a.data()));
        };
        const float* xp = flat(x, "x", false);
        float* yp = flat(y, "out", true);
        const float* mp = nullptr;
        if (!mask.is_none()) {
          py::array m = mask.cast<py::array>();
          mp = flat(m, "mask", false);
          if (m.size() != x.size()) throw sparsebp::ValueError("mask must have x's size");
        }
        if (y.size() != x.size()) throw sparsebp::ValueError("out must have x's size");
        py::gil_scoped_release nogil;
        sparsebp::relu(xp, mp, yp, x.size());
      },
      py::arg("x"), py::arg("mask"), py::arg("out"));
  m.def(
      "dropout",
      [](const py::array& x, const py::array& y, const py::array& factor, uint64_t seed, float p, float scale) {
        auto flat = [&x](const py::array& a, const char* name, bool writable) {
          check_float32(a, name);
          if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_))
            throw sparsebp::ValueError(str_cat(name, " must be C-contiguous"));
          if (writable && !a.writeable()) throw sparsebp::ValueError(str_cat(name, " must be writeable"));
          if (a.size() != x.size()) throw sparsebp::ValueError(str_cat(name, " must have x's size ", x.size()));
          return static_cast<float*>(const_cast<void*>(a.data()));
        };
        const float* xp = flat(x, "x", false);
        float* yp = flat(y, "out", true);
        float* fp = flat(factor, "factor", true);
        const int64_t n = x.size();
        auto overlap = [n](const float* a, const float* b) { return a < b + n && b < a + n; };
        if (n > 0 && (overlap(fp, xp) || overlap(fp, yp)))
          throw sparsebp::ValueError("factor must not share memory with x or out");
        py::gil_scoped_release nogil;
        sparsebp::dropout(xp, yp, fp, n, seed, p, scale);
      },
      py::arg("x"), py::arg("out"), py::arg("factor"), py::arg("seed"), py::arg("p"), py::arg("scale"));
  m.def(
      "bias_relu_mask",
      [rowmajor](const py::array& z, const py::object& bias, const py::array& keep, const py::array& out) {
        auto [zp, z_rows, n, ldz] = rowmajor(z, "z", false);
        auto [kp, groups, kn, ldk] = rowmajor(keep, "keep", false);
        auto [op, out_rows, on, ldo] = rowmajor(out, "out", true);
        if (ldz != n || ldk != kn || ldo != on) throw sparsebp::ValueError("z, keep and out must be C-contiguous");
        if (kn != n || on != n)
          throw sparsebp::ValueError(str_cat("keep and out must have z's ", n, " columns; got ", kn, " and ", on));
        if (groups < 1 || out_rows % groups != 0)
          throw sparsebp::ValueError(str_cat("out's ", out_rows, " rows must be a multiple of keep's ", groups));
        const int64_t rpg = out_rows / groups;
        if (z_rows != rpg && z_rows != out_rows)
          throw sparsebp::ValueError(str_cat("z must have ", rpg, " or ", out_rows, " rows; got ", z_rows));
        if (op != zp && op < zp + z_rows * n && zp < op + out_rows * n)
          throw sparsebp::ValueError("out must be z itself or not overlap it");
        const float* bp = nullptr;
        py::array b;
        if (!bias.is_none()) {
          b = bias.cast<py::array>();
          check_float32(b, "bias");
          if (b.ndim() != 1 || b.shape(0) != n || (n > 1 && b.strides(0) != 4))
            throw sparsebp::ValueError(str_cat("bias must be a contiguous float32 array of shape (", n, ",)"));
          bp = static_cast<const float*>(b.data());
        }
        py::gil_scoped_release nogil;
        sparsebp::bias_relu_mask(zp, z_rows, n, bp, kp, groups, rpg, op);
      },
      py::arg("z"), py::arg("bias"), py::arg("keep"), py::arg("out"));
  // An uninitialised float32 (rows, cols) array with row stride ld >= cols floats, its memory from
  // the buffer cache (buffer_cache.h): given back to it when the last array using it goes (the
  // capsule is every view's base).
  m.def(
      "empty_f32",
      [](int64_t rows, int64_t cols, int64_t ld) {
        if (ld < 0) ld = cols;
        if (rows < 0 || cols < 0 || ld < cols)
          throw sparsebp::ValueError(str_cat("empty_f32: need rows >= 0 and ld >= cols >= 0; got rows = ", rows,
                                             ", cols = ", cols, ", ld = ", ld));
        if (rows > 0 && ld > (int64_t{1} << 60) / 4 / rows)
          throw sparsebp::ValueError(str_cat("empty_f32: ", rows, " x ", ld, " floats is too large"));
        const size_t bytes = static_cast<size_t>(std::max<int64_t>(1, rows * ld)) * 4;
        size_t cap = 0;
        void* p = sparsebp::buffer_cache::acquire(bytes, &cap);
        struct Held {  // the block and its capacity, for the capsule's destructor
          void* p;
          size_t cap;
        };
        Held* h = nullptr;
        try {
          h = new Held{p, cap};
        } catch (...) {
          sparsebp::buffer_cache::release(p, cap);
          throw;
        }
        py::capsule base(h, [](void* q) {
          Held* hh = static_cast<Held*>(q);
          sparsebp::buffer_cache::release(hh->p, hh->cap);
          delete hh;
        });
        return py::array_t<float>({rows, cols}, {static_cast<py::ssize_t>(ld * 4), py::ssize_t{4}},
                                  static_cast<float*>(p), base);
      },
      py::arg("rows"), py::arg("cols"), py::arg("ld") = -1);
  m.def("buffer_cache_stats", []() {
    const auto st = sparsebp::buffer_cache::stats();
    py::dict d;
    d["cached_bytes"] = st.cached_bytes;
    d["cached_blocks"] = st.cached_blocks;
    d["hits"] = st.hits;
    d["misses"] = st.misses;
    d["limit_bytes"] = sparsebp::buffer_cache::limit();
    d["min_bytes"] = sparsebp::buffer_cache::kMinBytes;
    return d;
  });
  m.def(
      "set_buffer_cache_limit", [](int64_t bytes) {
        if (bytes < 0) throw sparsebp::ValueError(str_cat("limit must be >= 0 bytes; got ", bytes));
        sparsebp::buffer_cache::set_limit(static_cast<size_t>(bytes));
      },
      py::arg("bytes"));
  m.def("clear_buffer_cache", &sparsebp::buffer_cache::clear);
  m.def("active_isa", &sparsebp::active_isa);
  m.def("available_isas", &sparsebp::available_isas);
  m.def("compiled_isas", &sparsebp::compiled_isas);
  m.def("set_isa", &sparsebp::set_isa, py::arg("name"));
  m.def("cpu_features", &sparsebp::cpu_features);
  m.def("l2_cache_bytes", &sparsebp::l2_cache_bytes);
  m.def("llc_share_bytes", &sparsebp::llc_share_bytes);
  m.def("get_num_threads", &sparsebp::get_num_threads);
  m.def("set_num_threads", &sparsebp::set_num_threads, py::arg("n"));
  m.def("padded_ld", &sparsebp::padded_ld, py::arg("batch"));
  m.def("max_job_threads", &sparsebp::max_job_threads, py::arg("reset") = false);
  m.def("set_thread_backend", &sparsebp::set_thread_backend, py::arg("name"));
  m.def("thread_backend", &sparsebp::thread_backend);
  m.def("openmp_available", &sparsebp::openmp_available);
  m.attr("build_tables") = SPARSEBP_BUILD_TABLES;
  m.attr("compiler") = SPARSEBP_COMPILER;
  m.attr("build_type") = SPARSEBP_BUILD_TYPE;
  m.attr("version") = SPARSEBP_VERSION_STR;
}
