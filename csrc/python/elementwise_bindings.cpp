// amct_caffe._kernels, continued: glibc's float math as Caffe's layers call it (expf, tanhf, logf, powf, the
// sigmoid and BNLL of their layers), LRN across channels, and the element-wise loops of Eltwise (the strict-
// greater select of MAX, the fused saxpy of SUM's coefficients). The conventions of bindings.cpp hold: dtype,
// C-contiguity and shapes checked, outputs allocated here, the GIL released around the C++ loop.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <vector>

#include "amct/conv_cols.h"
#include "amct/libm_float.h"
#include "amct/lrn.h"
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
  m.def("fused_axpy", &fused_axpy, py::arg("a"), py::arg("x"), py::arg("y"), py::arg("threads"));
}
