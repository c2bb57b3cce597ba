// amct_caffe._kernels: the module, and the executor's forward and backward kernels (convolution, pooling,
// per-channel maps, activations); the quantization algorithms are in quant_bindings.cpp, the small-net
// runner in small_conv.cpp, glibc's float math and the element-wise layers' loops in elementwise_bindings.cpp. Each function checks dtype, C-contiguity and
// shape of its arrays (no silent conversion: the Python wrappers in amct_caffe/quant convert),
// allocates the outputs, then releases the GIL around the C++ loop. Releasing is safe because
// the loops touch only raw buffers of arrays this frame keeps referenced, and no Python object.
// Bad data in the core throws std::invalid_argument, which pybind11 raises as ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "amct/blob_stats.h"
#include "amct/channel_ops.h"
#include "amct/conv_backward.h"
#include "amct/conv_cols.h"
#include "amct/cpu.h"
#include "amct/depthwise.h"
#include "amct/direct_conv.h"
#include "amct/softmax.h"
#include "amct/max_pool.h"
#include "amct/sgd.h"
#include "amct/pointwise_conv.h"
#include "amct/winograd.h"
#include "array_args.h"

namespace py = pybind11;

void register_small_conv(py::module_& m);  // small_conv.cpp
void register_quant(py::module_& m);       // quant_bindings.cpp
void register_elementwise(py::module_& m);  // elementwise_bindings.cpp

using amct_py::checked;
using amct_py::shape_of;
using amct_py::size_of;
using amct_py::to_array;

namespace {
py::array depthwise_conv2d(const py::handle& x_obj, const py::handle& w_obj, std::vector<int> stride,
                           std::vector<int> pad, std::vector<int> dilation, std::vector<int> out, int threads,
                           const py::object& bias_obj, const py::object& into) {
  auto x = checked<float>(x_obj, "x", 4);
  auto w = checked<float>(w_obj, "weight", 3);
  for (const auto* v : {&stride, &pad, &dilation, &out}) {
    if (v->size() != 2) throw py::value_error("stride, pad, dilation and out must have 2 values each");
  }
  if (w.shape(0) != x.shape(1)) throw py::value_error("weight must have one (kh, kw) kernel per input channel");
  amct::Conv2dGeometry g{static_cast<int>(x.shape(0)), static_cast<int>(x.shape(1)), static_cast<int>(x.shape(2)),
                         static_cast<int>(x.shape(3)), static_cast<int>(w.shape(1)), static_cast<int>(w.shape(2)),
                         stride[0], stride[1], pad[0], pad[1], dilation[0], dilation[1], out[0], out[1]};
  py::array_t<float> bias;
  if (!bias_obj.is_none()) {
    bias = checked<float>(bias_obj, "bias", 1);
    if (bias.shape(0) != x.shape(1)) throw py::value_error("bias must have one value per channel");
  }
  const float* bp = bias_obj.is_none() ? nullptr : bias.data();
  auto y = amct_py::output_into(
      into, {x.shape(0), x.shape(1), static_cast<py::ssize_t>(out[0]), static_cast<py::ssize_t>(out[1])}, {&x, &w});
  auto* yp = y.mutable_data();
  py::gil_scoped_release release;
  amct::depthwise_conv2d(x.data(), w.data(), yp, g, threads, bp);
  return std::move(y);
}

// The window geometry over x (N, C, H, W) from (h, w) pairs; `what` names the call in errors.
amct::Conv2dGeometry window_geometry(const py::array& x, const std::vector<int>& kernel, const std::vector<int>& stride,
                                    const std::vector<int>& pad, const std::vector<int>& dilation,
                                    const std::vector<int>& out, const char* what) {
  for (const auto* v : {&kernel, &stride, &pad, &dilation, &out}) {
    if (v->size() != 2) {
      throw py::value_error(std::string(what) + ": kernel, stride, pad, dilation and out take 2 values");
    }
  }
  return {static_cast<int>(x.shape(0)), static_cast<int>(x.shape(1)), static_cast<int>(x.shape(2)),
          static_cast<int>(x.shape(3)), kernel[0], kernel[1], stride[0], stride[1], pad[0], pad[1], dilation[0],
          dilation[1], out[0], out[1]};
}

std::size_t cols_size(const amct::Conv2dGeometry& g) {
  return static_cast<std::size_t>(g.n) * g.c * g.kh * g.kw * g.ho * g.wo;
}

void im2col_2d(const py::handle& x_obj, const py::handle& cols_obj, std::vector<int> kernel, std::vector<int> stride,
               std::vector<int> pad, std::vector<int> dilation, std::vector<int> out, bool batch_last, int threads) {
  auto x = checked<float>(x_obj, "x", 4);
  auto cols = checked<float>(cols_obj, "cols");
  const auto g = window_geometry(x, kernel, stride, pad, dilation, out, "im2col_2d");
  if (size_of(cols) != cols_size(g)) throw py::value_error("im2col_2d: cols must hold N*C*kh*kw*Ho*Wo values");
  auto* cp = cols.mutable_data();
  py::gil_scoped_release release;
  amct::im2col_2d(x.data(), cp, g, batch_last, threads);
}

void col2im_2d(const py::handle& cols_obj, const py::handle& x_obj, std::vector<int> kernel, std::vector<int> stride,
               std::vector<int> pad, std::vector<int> dilation, std::vector<int> out, bool batch_last, int threads) {
  auto cols = checked<float>(cols_obj, "cols");
  auto x = checked<float>(x_obj, "x", 4);
  const auto g = window_geometry(x, kernel, stride, pad, dilation, out, "col2im_2d");
  if (size_of(cols) != cols_size(g)) throw py::value_error("col2im_2d: cols must hold N*C*kh*kw*Ho*Wo values");
  auto* xp = x.mutable_data();
  py::gil_scoped_release release;
  amct::col2im_2d(cols.data(), xp, g, batch_last, threads);
}

py::tuple max_pool2d_argmax(const py::handle& x_obj, std::vector<int> kernel, std::vector<int> stride,
                            std::vector<int> pad, std::vector<int> out, int threads) {
  auto x = checked<float>(x_obj, "x", 4);
  const auto g = window_geometry(x, kernel, stride, pad, {1, 1}, out, "max_pool2d_argmax");
  const std::vector<py::ssize_t> shape{x.shape(0), x.shape(1), out[0], out[1]};
  py::array_t<float> y(shape);
  py::array_t<std::int32_t> mask(shape);
  auto* yp = y.mutable_data();
  auto* mp = mask.mutable_data();
  {
    py::gil_scoped_release release;
    amct::max_pool2d_argmax(x.data(), yp, mp, g, threads);
  }
  return py::make_tuple(y, mask);
}

py::array_t<float> max_pool2d_backward(const py::handle& dy_obj, const py::handle& mask_obj, std::vector<int> in_hw,
                                       std::vector<int> kernel, std::vector<int> stride, std::vector<int> pad,
                                       int threads) {
  auto dy = checked<float>(dy_obj, "dy", 4);
  auto mask = checked<std::int32_t>(mask_obj, "mask", 4);
  if (shape_of(dy) != shape_of(mask)) throw py::value_error("max_pool2d_backward: dy and mask must have one shape");
  if (in_hw.size() != 2) throw py::value_error("max_pool2d_backward: in_hw takes 2 values");
  py::array_t<float> dx({dy.shape(0), dy.shape(1), static_cast<py::ssize_t>(in_hw[0]),
                         static_cast<py::ssize_t>(in_hw[1])});
  const auto g = window_geometry(dx, kernel, stride, pad, {1, 1}, {static_cast<int>(dy.shape(2)),
                                 static_cast<int>(dy.shape(3))}, "max_pool2d_backward");
  auto* dp = dx.mutable_data();
  py::gil_scoped_release release;
  amct::max_pool2d_backward(dy.data(), mask.data(), dp, g, threads);
  return dx;
}

void sgd_update(const py::handle& w_obj, const py::handle& g_obj, const py::handle& h_obj, float decay, float momentum,
                float rate, int threads) {
  auto w = checked<float>(w_obj, "weight");
  auto g = checked<float>(g_obj, "diff");
  auto h = checked<float>(h_obj, "history");
  if (size_of(g) != size_of(w) || size_of(h) != size_of(w)) {
    throw py::value_error("sgd_update: weight, diff and history must have the same size");
  }
  auto* wp = w.mutable_data();
  auto* gp = g.mutable_data();
  auto* hp = h.mutable_data();
  py::gil_scoped_release release;
  amct::sgd_update(wp, gp, hp, size_of(w), decay, momentum, rate, threads);
}

amct::ChannelShape channel_shape(const py::array& a) {
  return {static_cast<std::size_t>(a.shape(0)), static_cast<std::size_t>(a.shape(1)),
          static_cast<std::size_t>(a.shape(2))};
}

py::tuple channel_sums(const py::handle& a_obj, const py::handle& b_obj, int threads) {
  auto a = checked<float>(a_obj, "a", 3);
  py::array_t<float> b;
  const bool product = !b_obj.is_none();
  if (product) {
    b = checked<float>(b_obj, "b", 3);
    if (shape_of(b) != shape_of(a)) throw py::value_error("channel_sums: a and b must have one shape");
  }
  const auto shape = channel_shape(a);
  py::array_t<double> sum_a(a.shape(1)), sum_ab(product ? a.shape(1) : 0);
  auto* sa = sum_a.mutable_data();
  auto* sab = sum_ab.mutable_data();
  const float* bp = product ? b.data() : nullptr;
  {
    py::gil_scoped_release release;
    amct::channel_sums(a.data(), bp, shape, sa, sab, threads);
  }
  return py::make_tuple(sum_a, product ? py::object(sum_ab) : py::object(py::none()));
}

py::tuple blob_stats(const py::handle& a_obj, const py::handle& b_obj, std::size_t rows, int threads) {
  auto a = checked<float>(a_obj, "a");
  auto b = checked<float>(b_obj, "b");
  const std::size_t n = size_of(a);
  if (size_of(b) != n) throw py::value_error("blob_stats: a and b must have one size");
  if (rows == 0 || n % rows) throw py::value_error("blob_stats: rows must divide the size");
  py::array_t<double> dot(rows), aa(rows), bb(rows), dd(rows);
  const amct::RowSums sums{dot.mutable_data(), aa.mutable_data(), bb.mutable_data(), dd.mutable_data()};
  double max_abs;
  {
    py::gil_scoped_release release;
    max_abs = amct::blob_stats(a.data(), b.data(), rows, n / rows, sums, threads);
  }
  return py::make_tuple(dot, aa, bb, dd, max_abs);
}

py::array_t<float> batch_norm_backward(const py::handle& dy_obj, const py::handle& xn_obj, const py::handle& std_obj,
                                       const py::handle& s1_obj, const py::handle& s2_obj, float inv_m, int threads) {
  auto dy = checked<float>(dy_obj, "dy", 3);
  auto xn = checked<float>(xn_obj, "x_norm", 3);
  auto sd = checked<float>(std_obj, "std", 1);
  auto s1 = checked<float>(s1_obj, "sum_dy", 1);
  auto s2 = checked<float>(s2_obj, "sum_dyx", 1);
  if (shape_of(xn) != shape_of(dy)) throw py::value_error("batch_norm_backward: dy and x_norm must have one shape");
  for (const auto* v : {&sd, &s1, &s2}) {
    if (v->size() != dy.shape(1)) throw py::value_error("batch_norm_backward: one value per channel expected");
  }
  const auto shape = channel_shape(dy);
  py::array_t<float> dx(shape_of(dy));
  auto* dp = dx.mutable_data();
  py::gil_scoped_release release;
  amct::batch_norm_backward(dy.data(), xn.data(), sd.data(), s1.data(), s2.data(), inv_m, shape, dp, threads);
  return dx;
}

amct::Conv2dGeometry geometry_2d(const py::array& x, std::vector<int> kernel, std::vector<int> stride,
                                 std::vector<int> pad, std::vector<int> dilation, std::vector<int> out) {
  for (const auto* v : {&kernel, &stride, &pad, &dilation, &out}) {
    if (v->size() != 2) throw py::value_error("kernel, stride, pad, dilation and out must have 2 values each");
  }
  return {static_cast<int>(x.shape(0)), static_cast<int>(x.shape(1)), static_cast<int>(x.shape(2)),
          static_cast<int>(x.shape(3)), kernel[0], kernel[1], stride[0], stride[1], pad[0], pad[1],
          dilation[0], dilation[1], out[0], out[1]};
}

py::array pool2d(const py::handle& x_obj, const std::string& method, std::vector<int> kernel,
                 std::vector<int> stride, std::vector<int> pad, std::vector<int> out, int threads,
                 const py::object& into) {
  auto x = checked<float>(x_obj, "x", 4);
  auto g = geometry_2d(x, kernel, stride, pad, {1, 1}, out);
  if (method != "MAX" && method != "AVE") throw py::value_error("method must be 'MAX' or 'AVE'");
  auto y = amct_py::output_into(
      into, {x.shape(0), x.shape(1), static_cast<py::ssize_t>(out[0]), static_cast<py::ssize_t>(out[1])}, {&x});
  auto* yp = y.mutable_data();
  py::gil_scoped_release release;
  if (method == "AVE") amct::ave_pool2d(x.data(), yp, g, threads);
  else amct::max_pool2d(x.data(), yp, g, threads);
  return std::move(y);
}

py::array relu(const py::handle& x_obj, int threads, const py::object& into) {
  auto x = checked<float>(x_obj, "x");
  auto y = amct_py::output_into(into, shape_of(x), {&x});
  auto* yp = y.mutable_data();
  const std::size_t n = size_of(x);
  const float* xp = x.data();
  py::gil_scoped_release release;
  amct::relu(xp, yp, n, threads);
  return std::move(y);
}

void channel_affine(const py::handle& y_obj, const py::object& a_obj, const py::object& b_obj, bool relu,
                    int threads) {
  auto y = checked<float>(y_obj, "y");
  if (y.ndim() < 2) throw py::value_error("y must be (N, C, ...)");
  if (!y.writeable()) throw py::value_error("y must be writeable");
  const std::size_t n = static_cast<std::size_t>(y.shape(0)), c = static_cast<std::size_t>(y.shape(1));
  const std::size_t p = n * c ? size_of(y) / (n * c) : 0;
  py::array_t<float> a, b;
  if (!a_obj.is_none()) {
    a = checked<float>(a_obj, "a", 1);
    if (static_cast<std::size_t>(a.size()) != c) throw py::value_error("a must have one value per channel");
  }
  if (!b_obj.is_none()) {
    b = checked<float>(b_obj, "b", 1);
    if (static_cast<std::size_t>(b.size()) != c) throw py::value_error("b must have one value per channel");
  }
  const float* ap = a_obj.is_none() ? nullptr : a.data();
  const float* bp = b_obj.is_none() ? nullptr : b.data();
  auto* yp = y.mutable_data();
  py::gil_scoped_release release;
  amct::channel_affine(yp, n, c, p, ap, bp, relu, threads);
}

// x_shape: (N, C, H, W) of the input.
amct::WinogradGeometry winograd_geometry(const std::vector<py::ssize_t>& x_shape, int o, std::vector<int> pad, int m) {
  if (x_shape.size() != 4) throw py::value_error("x must be (N, C, H, W)");
  if (pad.size() != 2) throw py::value_error("pad must have 2 values");
  if (m != 2 && m != 4) throw py::value_error("m must be 2 or 4");
  const int h = static_cast<int>(x_shape[2]), w = static_cast<int>(x_shape[3]);
  const int ho = h + 2 * pad[0] - 2, wo = w + 2 * pad[1] - 2;
  if (ho <= 0 || wo <= 0) throw py::value_error("the 3x3 convolution's output is empty");
  return {static_cast<int>(x_shape[0]), static_cast<int>(x_shape[1]), h, w, o, ho, wo, pad[0], pad[1], m,
          (ho + m - 1) / m, (wo + m - 1) / m};
}

void winograd_input(const py::handle& x_obj, const py::handle& v_obj, std::vector<int> pad, int m, int threads) {
  auto x = checked<float>(x_obj, "x", 4);
  auto v = checked<float>(v_obj, "v", 3);
  auto g = winograd_geometry(shape_of(x), 1, pad, m);
  const py::ssize_t a2 = (m + 2) * (m + 2);
  if (v.shape(0) != a2 || v.shape(1) != g.c || v.shape(2) != static_cast<py::ssize_t>(g.n) * g.th * g.tw) {
    throw py::value_error("v must be ((m+2)^2, C, N*th*tw)");
  }
  if (!v.writeable()) throw py::value_error("v must be writeable");
  auto* vp = v.mutable_data();
  py::gil_scoped_release release;
  amct::winograd_input(x.data(), vp, g, threads);
}

py::array winograd_output(const py::handle& mm_obj, const py::handle& x_shape_obj, std::vector<int> pad, int m,
                          const py::object& a_obj, const py::object& b_obj, bool relu, int threads,
                          const py::object& into) {
  auto mm = checked<float>(mm_obj, "mm", 3);
  auto shape = x_shape_obj.cast<std::vector<py::ssize_t>>();
  auto g = winograd_geometry(shape, static_cast<int>(mm.shape(1)), pad, m);
  const py::ssize_t a2 = (m + 2) * (m + 2);
  if (mm.shape(0) != a2 || mm.shape(2) != static_cast<py::ssize_t>(g.n) * g.th * g.tw) {
    throw py::value_error("mm must be ((m+2)^2, O, N*th*tw)");
  }
  py::array_t<float> a, b;
  if (!a_obj.is_none()) a = checked<float>(a_obj, "a", 1);
  if (!b_obj.is_none()) b = checked<float>(b_obj, "b", 1);
  if ((!a_obj.is_none() && a.size() != g.o) || (!b_obj.is_none() && b.size() != g.o)) {
    throw py::value_error("a and b must have one value per output channel");
  }
  const float* ap = a_obj.is_none() ? nullptr : a.data();
  const float* bp = b_obj.is_none() ? nullptr : b.data();
  auto y = amct_py::output_into(into, {static_cast<py::ssize_t>(g.n), static_cast<py::ssize_t>(g.o),
                                       static_cast<py::ssize_t>(g.ho), static_cast<py::ssize_t>(g.wo)}, {&mm});
  auto* yp = y.mutable_data();
  py::gil_scoped_release release;
  amct::winograd_output(mm.data(), yp, g, ap, bp, relu, threads);
  return std::move(y);
}

py::array add_relu(const py::handle& a_obj, const py::handle& b_obj, int threads, const py::object& into) {
  auto a = checked<float>(a_obj, "a");
  auto b = checked<float>(b_obj, "b");
  if (size_of(a) != size_of(b)) throw py::value_error("a and b must have the same size");
  auto y = amct_py::output_into(into, shape_of(a), {&a, &b});
  auto* yp = y.mutable_data();
  py::gil_scoped_release release;
  amct::add_relu(a.data(), b.data(), yp, size_of(a), threads);
  return std::move(y);
}

py::array direct_conv2d(const py::handle& x_obj, const py::handle& w_obj, std::vector<int> stride,
                        std::vector<int> pad, std::vector<int> dilation, std::vector<int> out, int threads,
                        const py::object& bias_obj, const py::object& into) {
  auto x = checked<float>(x_obj, "x", 4);
  auto w = checked<float>(w_obj, "weight", 4);
  if (w.shape(1) != x.shape(1)) throw py::value_error("weight must be (O, C, kh, kw) for x (N, C, H, W)");
  auto g = geometry_2d(x, {static_cast<int>(w.shape(2)), static_cast<int>(w.shape(3))}, stride, pad, dilation, out);
  const int o = static_cast<int>(w.shape(0));
  py::array_t<float> bias;
  if (!bias_obj.is_none()) {
    bias = checked<float>(bias_obj, "bias", 1);
    if (bias.shape(0) != o) throw py::value_error("bias must have one value per output channel");
  }
  const float* bp = bias_obj.is_none() ? nullptr : bias.data();
  const std::vector<py::ssize_t> shape{x.shape(0), static_cast<py::ssize_t>(o), static_cast<py::ssize_t>(out[0]),
                                       static_cast<py::ssize_t>(out[1])};
  auto y = amct_py::output_into(into, shape, {&x, &w});
  auto* yp = y.mutable_data();
  py::gil_scoped_release release;
  amct::direct_conv2d(x.data(), w.data(), yp, g, o, threads, bp);
  return std::move(y);
}

// x (N, K, ...) by weight (O, K, 1...) -> y (N, O, ...), with a folded chain's epilogue (pointwise_conv.h).
py::array pointwise_conv(const py::handle& x_obj, const py::handle& w_obj, const py::object& scale_obj,
                         const py::object& bias_obj, bool relu, int threads, const py::object& into) {
  auto x = checked<float>(x_obj, "x");
  auto w = checked<float>(w_obj, "weight");
  if (x.ndim() < 3 || w.ndim() < 2) throw py::value_error("x must be (N, K, ...) and weight (O, K, ...)");
  const py::ssize_t n = x.shape(0), k = x.shape(1), o = w.shape(0);
  if (k == 0 || w.shape(1) != k || w.size() != o * k) throw py::value_error("weight must be (O, K) or (O, K, 1, 1)");
  auto shape = shape_of(x);
  shape[1] = o;
  py::array_t<float> scale, bias;
  amct::PointwiseEpilogue ep;
  if (!scale_obj.is_none()) scale = checked<float>(scale_obj, "scale", 1), ep.scale = scale.data();
  if (!bias_obj.is_none()) bias = checked<float>(bias_obj, "bias", 1), ep.bias = bias.data();
  if ((ep.scale && scale.size() != o) || (ep.bias && bias.size() != o)) {
    throw py::value_error("scale and bias must have one value per output channel");
  }
  ep.relu = relu;
  auto y = amct_py::output_into(into, shape, {&x, &w, &scale, &bias});
  const std::size_t p = n ? size_of(x) / static_cast<std::size_t>(n * k) : 0;
  auto* yp = y.mutable_data();
  if (n > 0 && p > 0 && o > 0) {
    py::gil_scoped_release release;
    amct::pointwise_conv(x.data(), w.data(), yp, static_cast<int>(n), static_cast<int>(k), p, static_cast<int>(o), ep,
                         threads);
  }
  return std::move(y);
}

py::array affine_add_relu(const py::handle& y_obj, const py::handle& a_obj, const py::handle& b_obj,
                          const py::handle& other_obj, int threads, const py::object& into) {
  auto y = checked<float>(y_obj, "y");
  auto other = checked<float>(other_obj, "other");
  auto a = checked<float>(a_obj, "a", 1);
  auto b = checked<float>(b_obj, "b", 1);
  if (y.ndim() < 2 || size_of(other) != size_of(y)) throw py::value_error("y (N, C, ...) and other must have one size");
  if (!y.writeable()) throw py::value_error("y must be writeable");
  const std::size_t n = static_cast<std::size_t>(y.shape(0)), c = static_cast<std::size_t>(y.shape(1));
  if (static_cast<std::size_t>(a.size()) != c || static_cast<std::size_t>(b.size()) != c) {
    throw py::value_error("a and b must have one value per channel");
  }
  const std::size_t p = n * c ? size_of(y) / (n * c) : 0;
  auto s = amct_py::output_into(into, shape_of(y), {&y, &other});
  auto* sp = s.mutable_data();
  auto* yp = y.mutable_data();
  py::gil_scoped_release release;
  amct::affine_add_relu(yp, other.data(), sp, n, c, p, a.data(), b.data(), threads);
  return std::move(s);
}

py::array softmax(const py::handle& x_obj, int axis, int threads) {
  auto x = checked<float>(x_obj, "x");
  if (axis < 0 || axis >= x.ndim()) throw py::value_error("axis out of range");
  std::size_t outer = 1, inner = 1;
  for (int d = 0; d < axis; ++d) outer *= static_cast<std::size_t>(x.shape(d));
  for (int d = axis + 1; d < x.ndim(); ++d) inner *= static_cast<std::size_t>(x.shape(d));
  const auto channels = static_cast<std::size_t>(x.shape(axis));
  py::array_t<float> y(shape_of(x));
  auto* yp = y.mutable_data();
  py::gil_scoped_release release;
  amct::softmax_channels(x.data(), yp, outer, channels, inner, threads);
  return std::move(y);
}

}  // namespace

PYBIND11_MODULE(_kernels, m) {
  register_quant(m);
  register_small_conv(m);
  register_elementwise(m);
  m.doc() = "amct_caffe C++ kernels; amct_caffe/quant holds the NumPy references and the public API";
  m.def("depthwise_conv2d", &depthwise_conv2d, py::arg("x"), py::arg("weight"), py::arg("stride"), py::arg("pad"),
        py::arg("dilation"), py::arg("out"), py::arg("threads"), py::arg("bias") = py::none(),
        py::arg("into") = py::none());
  m.def("depthwise_has_fma", &amct::depthwise_has_fma);
  m.def("im2col_2d", &im2col_2d, py::arg("x"), py::arg("cols"), py::arg("kernel"), py::arg("stride"), py::arg("pad"),
        py::arg("dilation"), py::arg("out"), py::arg("batch_last"), py::arg("threads"));
  m.def("col2im_2d", &col2im_2d, py::arg("cols"), py::arg("x"), py::arg("kernel"), py::arg("stride"), py::arg("pad"),
        py::arg("dilation"), py::arg("out"), py::arg("batch_last"), py::arg("threads"));
  m.def("max_pool2d_argmax", &max_pool2d_argmax, py::arg("x"), py::arg("kernel"), py::arg("stride"), py::arg("pad"),
        py::arg("out"), py::arg("threads"));
  m.def("max_pool2d_backward", &max_pool2d_backward, py::arg("dy"), py::arg("mask"), py::arg("in_hw"),
        py::arg("kernel"), py::arg("stride"), py::arg("pad"), py::arg("threads"));
  m.def("channel_sums", &channel_sums, py::arg("a"), py::arg("b"), py::arg("threads"));
  m.def("blob_stats", &blob_stats, py::arg("a"), py::arg("b"), py::arg("rows"), py::arg("threads"));
  m.def("batch_norm_backward", &batch_norm_backward, py::arg("dy"), py::arg("x_norm"), py::arg("std"),
        py::arg("sum_dy"), py::arg("sum_dyx"), py::arg("inv_m"), py::arg("threads"));
  m.def("sgd_update", &sgd_update, py::arg("weight"), py::arg("diff"), py::arg("history"), py::arg("decay"),
        py::arg("momentum"), py::arg("rate"), py::arg("threads"));
  m.def("direct_conv2d", &direct_conv2d, py::arg("x"), py::arg("weight"), py::arg("stride"), py::arg("pad"),
        py::arg("dilation"), py::arg("out"), py::arg("threads"), py::arg("bias") = py::none(),
        py::arg("into") = py::none());
  m.def("direct_conv_available", &amct::direct_conv_available);
  m.def("direct_conv_max_k", []() { return amct::kDirectMaxK; });
  m.def("pool2d", &pool2d, py::arg("x"), py::arg("method"), py::arg("kernel"), py::arg("stride"), py::arg("pad"),
        py::arg("out"), py::arg("threads"), py::arg("into") = py::none());
  m.def("winograd_input", &winograd_input, py::arg("x"), py::arg("v"), py::arg("pad"), py::arg("m"),
        py::arg("threads"));
  m.def("winograd_simd_level", &amct::winograd_simd_level);
  m.def("simd_level", &amct::simd_level);
  m.def("set_simd_limit", &amct::set_simd_limit, py::arg("level"));
  m.def("winograd_output", &winograd_output, py::arg("mm"), py::arg("x_shape"), py::arg("pad"), py::arg("m"),
        py::arg("a"), py::arg("b"), py::arg("relu"), py::arg("threads"), py::arg("into") = py::none());
  m.def("affine_add_relu", &affine_add_relu, py::arg("y"), py::arg("a"), py::arg("b"), py::arg("other"),
        py::arg("threads"), py::arg("into") = py::none());
  m.def("pointwise_conv", &pointwise_conv, py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("bias"),
        py::arg("relu"), py::arg("threads"), py::arg("into") = py::none());
  m.def("pointwise_conv_available", &amct::pointwise_conv_available);
  m.def("add_relu", &add_relu, py::arg("a"), py::arg("b"), py::arg("threads"), py::arg("into") = py::none());
  m.def("softmax", &softmax, py::arg("x"), py::arg("axis"), py::arg("threads"));
  m.def("relu", &relu, py::arg("x"), py::arg("threads"), py::arg("into") = py::none());
  m.def("channel_affine", &channel_affine, py::arg("y"), py::arg("a"), py::arg("b"), py::arg("relu"),
        py::arg("threads"));
  m.def("prelu", [](const py::handle& x_obj, const py::handle& a_obj, int threads) {
    auto x = checked<float>(x_obj, "x");
    auto a = checked<float>(a_obj, "slope");
    if (x.ndim() < 2) throw py::value_error("x must be (N, C, ...)");
    const std::size_t n = static_cast<std::size_t>(x.shape(0)), c = static_cast<std::size_t>(x.shape(1));
    const bool shared = a.size() == 1;
    if (!shared && static_cast<std::size_t>(a.size()) != c) {
      throw py::value_error("slope must have one value per channel, or one for all");
    }
    const std::size_t p = n * c ? size_of(x) / (n * c) : 0;
    py::array_t<float> y(shape_of(x));
    auto* yp = y.mutable_data();
    py::gil_scoped_release release;
    amct::prelu(x.data(), a.data(), yp, n, c, p, shared, threads);
    return y;
  }, py::arg("x"), py::arg("slope"), py::arg("threads"));
  // A convolution's bias and the in-place PReLU after it, in place on its GEMM result (a folded chain,
  // runtime/fold.py): channel_affine's float32 add, then prelu's select (which reads each value before it
  // writes it), so the bytes of `y += b` followed by the PReLU layer, in one call instead of two.
  m.def("bias_prelu", [](const py::handle& y_obj, const py::object& b_obj, const py::handle& a_obj, int threads) {
    auto y = checked<float>(y_obj, "y");
    auto a = checked<float>(a_obj, "slope");
    if (y.ndim() < 2) throw py::value_error("y must be (N, C, ...)");
    if (!y.writeable()) throw py::value_error("y must be writeable");
    const std::size_t n = static_cast<std::size_t>(y.shape(0)), c = static_cast<std::size_t>(y.shape(1));
    const bool shared = a.size() == 1;
    if (!shared && static_cast<std::size_t>(a.size()) != c) {
      throw py::value_error("slope must have one value per channel, or one for all");
    }
    py::array_t<float> b;
    if (!b_obj.is_none()) {
      b = checked<float>(b_obj, "b", 1);
      if (static_cast<std::size_t>(b.size()) != c) throw py::value_error("b must have one value per channel");
    }
    const float* bp = b_obj.is_none() ? nullptr : b.data();
    const std::size_t p = n * c ? size_of(y) / (n * c) : 0;
    auto* yp = y.mutable_data();
    py::gil_scoped_release release;
    if (bp) amct::channel_affine(yp, n, c, p, nullptr, bp, false, threads);
    amct::prelu(yp, a.data(), yp, n, c, p, shared, threads);
  }, py::arg("y"), py::arg("b"), py::arg("slope"), py::arg("threads"));
  m.def("direct_conv2d_affine", [](const py::handle& x_obj, const py::handle& w_obj, std::vector<int> stride,
                                   std::vector<int> pad, std::vector<int> dilation, std::vector<int> out, int threads,
                                   const py::object& scale_obj, const py::object& bias_obj, bool relu,
                                   const py::object& into) {
    auto x = checked<float>(x_obj, "x", 4);
    auto w = checked<float>(w_obj, "weight", 4);
    if (w.shape(1) != x.shape(1)) throw py::value_error("weight must be (O, C, kh, kw) for x (N, C, H, W)");
    auto g = geometry_2d(x, {static_cast<int>(w.shape(2)), static_cast<int>(w.shape(3))}, stride, pad, dilation, out);
    const int o = static_cast<int>(w.shape(0));
    py::array_t<float> scale, bias;
    for (auto [obj, arr, name] : {std::tuple{&scale_obj, &scale, "scale"}, std::tuple{&bias_obj, &bias, "bias"}}) {
      if (obj->is_none()) continue;
      *arr = checked<float>(*obj, name, 1);
      if (arr->shape(0) != o) throw py::value_error(std::string(name) + " must have one value per output channel");
    }
    const float* sp = scale_obj.is_none() ? nullptr : scale.data();
    const float* bp = bias_obj.is_none() ? nullptr : bias.data();
    auto y = amct_py::output_into(into, {x.shape(0), static_cast<py::ssize_t>(o), static_cast<py::ssize_t>(out[0]),
                                         static_cast<py::ssize_t>(out[1])}, {&x, &w});
    auto* yp = y.mutable_data();
    py::gil_scoped_release release;
    amct::direct_conv2d(x.data(), w.data(), yp, g, o, threads, sp, bp, relu);
    return y;
  }, py::arg("x"), py::arg("weight"), py::arg("stride"), py::arg("pad"), py::arg("dilation"), py::arg("out"),
     py::arg("threads"), py::arg("scale"), py::arg("bias"), py::arg("relu"), py::arg("into") = py::none());
}
