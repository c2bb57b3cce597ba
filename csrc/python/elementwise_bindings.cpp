// amct_caffe._kernels, continued: glibc's float math as Caffe's layers call it (expf, tanhf, logf, powf, the
// sigmoid and BNLL of their layers), LRN across channels, and the element-wise loops of Eltwise (the strict-
// greater select of MAX, the fused saxpy of SUM's coefficients). The conventions of bindings.cpp hold: dtype,
// C-contiguity and shapes checked, outputs allocated here, the GIL released around the C++ loop.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "amct/conv_cols.h"
#include "amct/libm_float.h"
#include "amct/lrn.h"
#include "amct/nms.h"
#include "array_args.h"

namespace py = pybind11;

using amct_py::checked;
using amct_py::shape_of;
using amct_py::size_of;

namespace {

py::array greater_select(const py::handle& a_obj, const py::handle& b_obj, int threads, const py::object& into) {
  auto a = checked<float>(a_obj, "a");
  auto b = checked<float>(b_obj, "b");
  if (size_of(a) != size_of(b)) throw py::value_error("a and b must have the same size");
  auto y = amct_py::output_into(into, shape_of(a), {});
  auto* yp = y.mutable_data();
  py::gil_scoped_release release;
  amct::greater_select(a.data(), b.data(), yp, size_of(a), threads);
  return std::move(y);
}

py::tuple lrn_across(const py::handle& x_obj, int size, float alpha_over_size, float beta, float k, int threads) {
  auto x = checked<float>(x_obj, "x", 4);
  if (size < 1 || size % 2 != 1) throw py::value_error("lrn_across: size must be odd and positive");
  py::array_t<float> y(shape_of(x)), scale(shape_of(x));
  auto* yp = y.mutable_data();
  auto* sp = scale.mutable_data();
  const std::size_t n = x.shape(0), c = x.shape(1), hw = static_cast<std::size_t>(x.shape(2)) * x.shape(3);
  {
    py::gil_scoped_release release;
    amct::lrn_across(x.data(), yp, sp, n, c, hw, size, alpha_over_size, beta, k, threads);
  }
  return py::make_tuple(std::move(y), std::move(scale));
}

void fused_axpy(float a, const py::handle& x_obj, const py::handle& y_obj, int threads) {
  auto x = checked<float>(x_obj, "x");
  auto y = checked<float>(y_obj, "y");
  if (size_of(x) != size_of(y)) throw py::value_error("x and y must have the same size");
  if (!(y.flags() & py::array::c_style) || !y.writeable()) throw py::value_error("y must be a writeable C array");
  auto* yp = y.mutable_data();
  py::gil_scoped_release release;
  amct::fused_axpy(a, x.data(), yp, size_of(x), threads);
}

// y = f(x) element by element, by one of libm_float.h's array loops (or the machine's own expf).
template <void (*F)(const float*, float*, std::size_t, int)>
py::array map_floats(const py::handle& x_obj, int threads) {
  auto x = checked<float>(x_obj, "x");
  py::array_t<float> y(shape_of(x));
  auto* yp = y.mutable_data();
  py::gil_scoped_release release;
  F(x.data(), yp, size_of(x), threads);
  return std::move(y);
}

py::array_t<std::int64_t> nms_fast(const py::handle& boxes_obj, const py::handle& sizes_obj,
                                   const py::handle& cand_obj, float threshold, float eta) {
  auto boxes = checked<float>(boxes_obj, "boxes", 2);
  auto sizes = checked<float>(sizes_obj, "sizes", 1);
  auto cand = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(cand_obj);
  if (!cand || cand.ndim() != 1) throw py::value_error("cand must be a 1-D integer array");
  const auto p = static_cast<std::int64_t>(boxes.shape(0));
  if (boxes.shape(1) != 4 || sizes.shape(0) != p) throw py::value_error("boxes must be (P, 4) and sizes (P,)");
  const std::int64_t* cp = cand.data();
  const auto n = static_cast<std::size_t>(cand.shape(0));
  for (std::size_t k = 0; k < n; ++k) {
    if (cp[k] < 0 || cp[k] >= p) throw py::value_error("a candidate index is out of range");
  }
  std::vector<std::int64_t> kept;
  {
    py::gil_scoped_release release;
    kept = amct::nms_fast(boxes.data(), sizes.data(), cp, n, threshold, eta);
  }
  py::array_t<std::int64_t> out(static_cast<py::ssize_t>(kept.size()));
  std::copy(kept.begin(), kept.end(), out.mutable_data());
  return out;
}

// Each row's sum as Caffe's Softmax takes it over an axis with nothing after it: per row,
// cblas_sgemv(RowMajor, Trans, channels, 1, 1, row, 1, ones, 1, 0, &sum, 1) through the cblas_sgemv at `address`
// (numpy's own OpenBLAS, which runtime/layers/cblas.py finds and checks), 64-bit integers if `ilp64`: the calls
// runtime/layers/cblas.py makes through ctypes, without its 3 microseconds per call.
py::array_t<float> row_sums_sgemv(const py::handle& rows_obj, std::uintptr_t address, bool ilp64) {
  auto rows = checked<float>(rows_obj, "rows", 2);
  if (address == 0) throw py::value_error("no sgemv address");
  const auto outer = static_cast<std::size_t>(rows.shape(0));
  const auto channels = static_cast<std::int64_t>(rows.shape(1));
  py::array_t<float> sums(static_cast<py::ssize_t>(outer));
  float* out = sums.mutable_data();
  const float* base = rows.data();
  const std::vector<float> ones(static_cast<std::size_t>(channels), 1.0f);
  constexpr int kRowMajor = 101, kTrans = 112;
  py::gil_scoped_release release;
  if (ilp64) {
    using Gemv = void (*)(int, int, std::int64_t, std::int64_t, float, const float*, std::int64_t, const float*,
                          std::int64_t, float, float*, std::int64_t);
    auto gemv = reinterpret_cast<Gemv>(address);
    for (std::size_t i = 0; i < outer; ++i) {
      out[i] = 0.0f;
      gemv(kRowMajor, kTrans, channels, 1, 1.0f, base + i * channels, 1, ones.data(), 1, 0.0f, out + i, 1);
    }
  } else {
    using Gemv = void (*)(int, int, int, int, float, const float*, int, const float*, int, float, float*, int);
    auto gemv = reinterpret_cast<Gemv>(address);
    for (std::size_t i = 0; i < outer; ++i) {
      out[i] = 0.0f;
      gemv(kRowMajor, kTrans, static_cast<int>(channels), 1, 1.0f, base + i * channels, 1, ones.data(), 1, 0.0f,
           out + i, 1);
    }
  }
  return sums;
}

// The permutation libstdc++'s std::sort leaves when sorting indices by keys[i] > keys[j] (DetectionOutput's
// keep_top_k cut: SortScorePairDescend over (score, (label, index)) pairs makes the same comparisons, so the
// same moves); runtime/layers/detection.py libstdcxx_sort_desc is its Python form.
py::array_t<std::int64_t> sort_desc(const py::handle& keys_obj) {
  auto keys = checked<float>(keys_obj, "keys", 1);
  std::vector<std::int64_t> order(static_cast<std::size_t>(keys.shape(0)));
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = static_cast<std::int64_t>(i);
  const float* k = keys.data();
  {
    py::gil_scoped_release release;
    std::sort(order.begin(), order.end(), [k](std::int64_t a, std::int64_t b) { return k[a] > k[b]; });
  }
  py::array_t<std::int64_t> out(static_cast<py::ssize_t>(order.size()));
  std::copy(order.begin(), order.end(), out.mutable_data());
  return out;
}

// The machine's own libm expf, element by element: what the port is tested against.
void libm_expf_loop(const float* x, float* y, std::size_t n, int /*threads*/) {
  for (std::size_t i = 0; i < n; ++i) y[i] = ::expf(x[i]);
}

}  // namespace

void register_elementwise(py::module_& m) {
  m.def("tanhf", &map_floats<amct::tanhf_array>, py::arg("x"), py::arg("threads"));
  m.def("expf", &map_floats<amct::expf_array>, py::arg("x"), py::arg("threads"));
  m.def("logf", &map_floats<amct::logf_array>, py::arg("x"), py::arg("threads"));
  m.def("caffe_sigmoid", &map_floats<amct::caffe_sigmoid_array>, py::arg("x"), py::arg("threads"));
  m.def("caffe_bnll", &map_floats<amct::caffe_bnll_array>, py::arg("x"), py::arg("threads"));
  m.def("libm_expf", [](const py::handle& x) { return map_floats<libm_expf_loop>(x, 1); }, py::arg("x"));
  m.def(
      "powf",
      [](const py::handle& x_obj, float exponent, int threads) {
        auto x = checked<float>(x_obj, "x");
        py::array_t<float> y(shape_of(x));
        auto* yp = y.mutable_data();
        py::gil_scoped_release release;
        amct::powf_array(x.data(), yp, size_of(x), exponent, threads);
        return y;
      },
      py::arg("x"), py::arg("exponent"), py::arg("threads"));
  m.def("lrn_across", &lrn_across, py::arg("x"), py::arg("size"), py::arg("alpha_over_size"), py::arg("beta"),
        py::arg("k"), py::arg("threads"));
  m.def("greater_select", &greater_select, py::arg("a"), py::arg("b"), py::arg("threads"),
        py::arg("into") = py::none());
  m.def("row_sums_sgemv", &row_sums_sgemv, py::arg("rows"), py::arg("address"), py::arg("ilp64"));
  m.def("sort_desc", &sort_desc, py::arg("keys"));
  m.def("nms_fast", &nms_fast, py::arg("boxes"), py::arg("sizes"), py::arg("cand"), py::arg("threshold"),
        py::arg("eta"));
  m.def("fused_axpy", &fused_axpy, py::arg("a"), py::arg("x"), py::arg("y"), py::arg("threads"));
}
