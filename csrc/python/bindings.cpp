// The one pybind11 file: checks arguments, then releases the GIL around the C++ loops
// (they touch only the arrays' buffers, which the caller keeps alive).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "amct/fake_quant.h"

namespace py = pybind11;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

namespace {

FloatArray fake_quant(FloatArray x, float scale, int offset, int num_bits, bool with_offset) {
  if (!(scale > 0.0f) || !std::isfinite(scale)) throw std::invalid_argument("scale must be finite and > 0");
  if (num_bits < 2 || num_bits > 16) throw std::invalid_argument("num_bits must be in [2, 16]");
  FloatArray out(x.request().shape);
  const float* src = x.data();
  float* dst = out.mutable_data();
  const auto n = static_cast<std::size_t>(x.size());
  {
    py::gil_scoped_release release;
    amct::fake_quant(src, dst, n, scale, offset, num_bits, with_offset);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "amct_caffe C++ kernels (see amct_caffe/quant for the NumPy references)";
  m.def("fake_quant", &fake_quant, py::arg("x"), py::arg("scale"), py::arg("offset"),
        py::arg("num_bits") = 8, py::arg("with_offset") = true,
        "Quantize-dequantize float32 data on a uniform num_bits grid.");
}
