// The one pybind11 file of amct_caffe._kernels. Each function checks dtype, C-contiguity and
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

#include "amct/arq.h"
#include "amct/channel_ops.h"
#include "amct/conv_backward.h"
#include "amct/conv_cols.h"
#include "amct/depthwise.h"
#include "amct/direct_conv.h"
#include "amct/fake_quant.h"
#include "amct/ifmr.h"
#include "amct/ifmr_stream.h"
#include "amct/libm_float.h"
#include "amct/softmax.h"
#include "amct/max_pool.h"
#include "amct/search_n.h"
#include "amct/sgd.h"
#include "amct/snq.h"
#include "amct/ulq.h"
#include "amct/winograd.h"

namespace py = pybind11;

void register_small_conv(py::module_& m);  // small_conv.cpp

namespace {

template <class T>
py::array_t<T> checked(const py::handle& obj, const char* name, int ndim = -1) {
  if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string(name) + " must be a numpy array");
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(py::dtype::of<T>())) {
    throw py::type_error(std::string(name) + " must have dtype " + std::string(py::str(py::dtype::of<T>())) +
                         ", got " + std::string(py::str(a.dtype())));
  }
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + " must be C-contiguous");
  if (ndim >= 0 && a.ndim() != ndim) {
    throw py::value_error(std::string(name) + " must be " + std::to_string(ndim) + "-D, got " +
                          std::to_string(a.ndim()) + "-D");
  }
  return py::reinterpret_borrow<py::array_t<T>>(a);
}

std::vector<py::ssize_t> shape_of(const py::array& a) { return {a.shape(), a.shape() + a.ndim()}; }

std::size_t size_of(const py::array& a) { return static_cast<std::size_t>(a.size()); }

py::array quantize(const py::handle& x_obj, float scale, int offset, int num_bits) {
  auto x = checked<float>(x_obj, "x");
  amct::check_uniform_args(scale, offset, num_bits);
  if (num_bits <= 8) {
    py::array_t<std::int8_t> q(shape_of(x));
    auto* qp = q.mutable_data();
    py::gil_scoped_release release;
    amct::quantize(x.data(), qp, size_of(x), scale, offset, num_bits);
    return std::move(q);
  }
  py::array_t<std::int16_t> q(shape_of(x));
  auto* qp = q.mutable_data();
  py::gil_scoped_release release;
  amct::quantize(x.data(), qp, size_of(x), scale, offset, num_bits);
  return std::move(q);
}

py::array_t<float> fake_quant(const py::handle& x_obj, float scale, int offset, int num_bits) {
  auto x = checked<float>(x_obj, "x");
  py::array_t<float> out(shape_of(x));
  auto* op = out.mutable_data();
  py::gil_scoped_release release;
  amct::fake_quant(x.data(), op, size_of(x), scale, offset, num_bits);
  return out;
}

py::array_t<std::uint64_t> pack_deq_scale(const py::handle& sw_obj, float scale_d, const py::handle& ow_obj) {
  auto sw = checked<float>(sw_obj, "scale_w", 1);
  auto ow = checked<std::int8_t>(ow_obj, "offset_w", 1);
  if (ow.size() != sw.size()) throw py::value_error("offset_w and scale_w must have the same length");
  py::array_t<std::uint64_t> out(sw.size());
  auto* op = out.mutable_data();
  py::gil_scoped_release release;
  amct::pack_deq_scale(sw.data(), scale_d, ow.data(), op, size_of(sw));
  return out;
}

py::tuple unpack_deq_scale(const py::handle& p_obj) {
  auto p = checked<std::uint64_t>(p_obj, "param", 1);
  py::array_t<float> deq(p.size());
  py::array_t<std::int8_t> ow(p.size());
  auto* dp = deq.mutable_data();
  auto* wp = ow.mutable_data();
  {
    py::gil_scoped_release release;
    amct::unpack_deq_scale(p.data(), dp, wp, size_of(p));
  }
  return py::make_tuple(deq, ow);
}

py::tuple ifmr_search(const py::list& chunk_objs, int num_bits, bool with_offset, double max_percentile,
                      double min_percentile, const py::handle& ratios_obj, std::size_t zeros, int threads) {
  auto ratios_arr = checked<double>(ratios_obj, "ratios", 1);
  std::vector<py::array_t<float>> keep;
  std::vector<amct::FloatSpan> chunks;
  for (const auto& obj : chunk_objs) {
    keep.push_back(checked<float>(obj, "chunk"));
    chunks.push_back({keep.back().data(), size_of(keep.back())});
  }
  std::vector<double> ratios(ratios_arr.data(), ratios_arr.data() + ratios_arr.size());
  amct::IfmrConfig cfg;
  cfg.num_bits = num_bits;
  cfg.with_offset = with_offset;
  cfg.max_percentile = max_percentile;
  cfg.min_percentile = min_percentile;
  amct::IfmrResult r;
  {
    py::gil_scoped_release release;
    r = amct::ifmr_search(chunks, cfg, ratios, zeros, threads);
  }
  py::array_t<double> losses(static_cast<py::ssize_t>(r.losses.size()));
  std::copy(r.losses.begin(), r.losses.end(), losses.mutable_data());
  return py::make_tuple(r.best_index, r.scale, r.offset, r.clip_max, r.clip_min, losses);
}

template <class T>
py::array_t<T> to_array(const std::vector<T>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

void histogram_update(amct::IfmrHistogram& h, const py::handle& x_obj, const std::string& what, int threads) {
  auto x = checked<float>(x_obj, "x");
  py::gil_scoped_release release;
  h.update(x.data(), size_of(x), what.c_str(), threads);
}

py::array histogram_losses(const amct::IfmrHistogram& h, const py::handle& clip_obj, const py::handle& lo_obj,
                           const py::handle& scale_obj, int threads) {
  auto clip = checked<float>(clip_obj, "clip", 1), lo = checked<float>(lo_obj, "lo", 1);
  auto scale = checked<float>(scale_obj, "scale", 1);
  if (lo.size() != clip.size() || scale.size() != clip.size()) {
    throw py::value_error("clip, lo and scale must have the same size");
  }
  std::vector<double> sums;
  {
    py::gil_scoped_release release;
    sums = h.losses(clip.data(), lo.data(), scale.data(), size_of(clip), threads);
  }
  return to_array(sums);
}

amct::ArqLayout layout_of(const py::handle& w, const std::vector<std::size_t>& dims) {
  if (dims.size() != 4) throw py::value_error("layout must be (groups, rows, channels, inner)");
  amct::ArqLayout L{dims[0], dims[1], dims[2], dims[3]};
  if (L.size() != static_cast<std::size_t>(py::reinterpret_borrow<py::array>(w).size())) {
    throw py::value_error("layout does not match the weight size");
  }
  return L;
}

py::tuple arq_scales(const py::handle& w_obj, const std::vector<std::size_t>& dims, bool channel_wise,
                     int num_bits) {
  auto w = checked<float>(w_obj, "weight");
  const auto L = layout_of(w, dims);
  const auto n = static_cast<py::ssize_t>(channel_wise ? L.out_channels() : 1);
  py::array_t<float> scale(n);
  py::array_t<int> offset(n);
  auto* sp = scale.mutable_data();
  auto* op = offset.mutable_data();
  {
    py::gil_scoped_release release;
    amct::arq_scales(w.data(), L, channel_wise, num_bits, sp, op);
  }
  return py::make_tuple(scale, offset);
}

py::tuple arq_quantize(const py::handle& w_obj, const std::vector<std::size_t>& dims, bool channel_wise,
                       int num_bits, const py::handle& s_obj, const py::handle& o_obj) {
  auto w = checked<float>(w_obj, "weight");
  auto s = checked<float>(s_obj, "scale", 1);
  auto o = checked<int>(o_obj, "offset", 1);
  const auto L = layout_of(w, dims);
  const auto n = static_cast<py::ssize_t>(channel_wise ? L.out_channels() : 1);
  if (s.size() != n || o.size() != n) throw py::value_error("scale/offset length does not match the channels");
  py::array_t<std::int8_t> q(shape_of(w));
  py::array_t<float> fake(shape_of(w));
  auto* qp = q.mutable_data();
  auto* fp = fake.mutable_data();
  {
    py::gil_scoped_release release;
    amct::arq_quantize(w.data(), L, channel_wise, num_bits, s.data(), o.data(), qp, fp);
  }
  return py::make_tuple(q, fake);
}

py::array_t<std::int32_t> quantize_bias(const py::handle& b_obj, const py::handle& sw_obj, float scale_d) {
  auto b = checked<float>(b_obj, "bias", 1);
  auto sw = checked<float>(sw_obj, "scale_w", 1);
  py::array_t<std::int32_t> out(b.size());
  auto* op = out.mutable_data();
  py::gil_scoped_release release;
  amct::quantize_bias(b.data(), size_of(b), sw.data(), size_of(sw), scale_d, op);
  return out;
}

py::tuple search_n_errors(const py::handle& x_obj, const py::handle& deq_obj) {
  auto x = checked<float>(x_obj, "x", 3);
  auto deq = checked<float>(deq_obj, "deq_scale", 1);
  const auto channels = static_cast<std::size_t>(x.shape(1));
  if (static_cast<std::size_t>(deq.size()) != channels) throw py::value_error("deq_scale length != channels");
  std::vector<amct::U128> err(channels * amct::kNumShiftBits);
  {
    py::gil_scoped_release release;
    amct::search_n_accumulate(x.data(), static_cast<std::size_t>(x.shape(0)), channels,
                              static_cast<std::size_t>(x.shape(2)), deq.data(), err.data());
  }
  const std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(channels), amct::kNumShiftBits};
  py::array_t<std::uint64_t> hi(shape), lo(shape);
  auto* hp = hi.mutable_data();
  auto* lp = lo.mutable_data();
  for (std::size_t i = 0; i < err.size(); ++i) {
    hp[i] = err[i].hi;
    lp[i] = err[i].lo;
  }
  return py::make_tuple(hi, lo);
}

py::tuple snq(const py::handle& w_obj, int init, int max_iteration, double min_distance, std::uint64_t seed) {
  auto w = checked<float>(w_obj, "weight", 2);
  amct::SnqConfig cfg;
  cfg.init = static_cast<amct::SnqInit>(init);
  cfg.max_iteration = max_iteration;
  cfg.min_distance = min_distance;
  cfg.seed = seed;
  const auto channels = w.shape(0), k = w.shape(1);
  py::array_t<float> centres({channels, static_cast<py::ssize_t>(amct::kSnqCentres)});
  py::array_t<std::uint8_t> codes({channels, k});
  py::array_t<int> iters(channels);
  auto* cp = centres.mutable_data();
  auto* dp = codes.mutable_data();
  auto* ip = iters.mutable_data();
  {
    py::gil_scoped_release release;
    amct::snq(w.data(), static_cast<std::size_t>(channels), static_cast<std::size_t>(k), cfg, cp, dp, ip);
  }
  return py::make_tuple(centres, codes, iters);
}

py::tuple ulq_clip_check(float clip_max, float clip_min, float prev_max, float prev_min) {
  amct::ulq_clip_check(clip_max, clip_min, prev_max, prev_min);
  return py::make_tuple(clip_max, clip_min, prev_max, prev_min);
}

py::tuple ulq_scale_offset(float clip_max, float clip_min, int num_bits) {
  float scale = 1.0f;
  int offset = 0;
  amct::ulq_scale_offset(clip_max, clip_min, num_bits, &scale, &offset);
  return py::make_tuple(scale, offset);
}

py::tuple ulq_backward(const py::handle& x_obj, const py::handle& g_obj, float clip_max, float clip_min,
                       float scale, int offset, int num_bits) {
  auto x = checked<float>(x_obj, "x");
  auto g = checked<float>(g_obj, "grad");
  if (shape_of(x) != shape_of(g)) throw py::value_error("x and grad must have the same shape");
  py::array_t<float> gx(shape_of(x));
  auto* gp = gx.mutable_data();
  double gmax = 0.0, gmin = 0.0;
  {
    py::gil_scoped_release release;
    amct::ulq_backward(x.data(), g.data(), gp, size_of(x), clip_max, clip_min, scale, offset, num_bits, &gmax,
                       &gmin);
  }
  return py::make_tuple(gx, gmax, gmin);
}

py::array depthwise_conv2d(const py::handle& x_obj, const py::handle& w_obj, std::vector<int> stride,
                           std::vector<int> pad, std::vector<int> dilation, std::vector<int> out, int threads,
                           const py::object& bias_obj) {
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
  py::array_t<float> y({x.shape(0), x.shape(1), static_cast<py::ssize_t>(out[0]), static_cast<py::ssize_t>(out[1])});
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
                 std::vector<int> stride, std::vector<int> pad, std::vector<int> out, int threads) {
  auto x = checked<float>(x_obj, "x", 4);
  auto g = geometry_2d(x, kernel, stride, pad, {1, 1}, out);
  if (method != "MAX") throw py::value_error("method must be 'MAX'");
  py::array_t<float> y({x.shape(0), x.shape(1), static_cast<py::ssize_t>(out[0]), static_cast<py::ssize_t>(out[1])});
  auto* yp = y.mutable_data();
  py::gil_scoped_release release;
  amct::max_pool2d(x.data(), yp, g, threads);
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

amct::WinogradGeometry winograd_geometry(const py::array& x, int o, std::vector<int> pad, int m) {
  if (pad.size() != 2) throw py::value_error("pad must have 2 values");
  if (m != 2 && m != 4) throw py::value_error("m must be 2 or 4");
  const int h = static_cast<int>(x.shape(2)), w = static_cast<int>(x.shape(3));
  const int ho = h + 2 * pad[0] - 2, wo = w + 2 * pad[1] - 2;
  if (ho <= 0 || wo <= 0) throw py::value_error("the 3x3 convolution's output is empty");
  return {static_cast<int>(x.shape(0)), static_cast<int>(x.shape(1)), h, w, o, ho, wo, pad[0], pad[1], m,
          (ho + m - 1) / m, (wo + m - 1) / m};
}

void winograd_input(const py::handle& x_obj, const py::handle& v_obj, std::vector<int> pad, int m, int threads) {
  auto x = checked<float>(x_obj, "x", 4);
  auto v = checked<float>(v_obj, "v", 3);
  auto g = winograd_geometry(x, 1, pad, m);
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
                          const py::object& a_obj, const py::object& b_obj, bool relu, int threads) {
  auto mm = checked<float>(mm_obj, "mm", 3);
  auto shape = x_shape_obj.cast<std::vector<py::ssize_t>>();
  if (shape.size() != 4) throw py::value_error("x_shape must be (N, C, H, W)");
  py::array_t<float> probe(shape);
  auto g = winograd_geometry(probe, static_cast<int>(mm.shape(1)), pad, m);
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
  py::array_t<float> y({static_cast<py::ssize_t>(g.n), static_cast<py::ssize_t>(g.o), static_cast<py::ssize_t>(g.ho),
                        static_cast<py::ssize_t>(g.wo)});
  auto* yp = y.mutable_data();
  py::gil_scoped_release release;
  amct::winograd_output(mm.data(), yp, g, ap, bp, relu, threads);
  return std::move(y);
}

py::array add_relu(const py::handle& a_obj, const py::handle& b_obj, int threads) {
  auto a = checked<float>(a_obj, "a");
  auto b = checked<float>(b_obj, "b");
  if (size_of(a) != size_of(b)) throw py::value_error("a and b must have the same size");
  py::array_t<float> y(shape_of(a));
  auto* yp = y.mutable_data();
  py::gil_scoped_release release;
  amct::add_relu(a.data(), b.data(), yp, size_of(a), threads);
  return std::move(y);
}

py::array direct_conv2d(const py::handle& x_obj, const py::handle& w_obj, std::vector<int> stride,
                        std::vector<int> pad, std::vector<int> dilation, std::vector<int> out, int threads,
                        const py::object& bias_obj) {
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
  py::array_t<float> y(shape);
  auto* yp = y.mutable_data();
  py::gil_scoped_release release;
  amct::direct_conv2d(x.data(), w.data(), yp, g, o, threads, bp);
  return std::move(y);
}

py::array affine_add_relu(const py::handle& y_obj, const py::handle& a_obj, const py::handle& b_obj,
                          const py::handle& other_obj, int threads) {
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
  py::array_t<float> s(shape_of(y));
  auto* sp = s.mutable_data();
  auto* yp = y.mutable_data();
  py::gil_scoped_release release;
  amct::affine_add_relu(yp, other.data(), sp, n, c, p, a.data(), b.data(), threads);
  return std::move(s);
}

py::array tanhf_array(const py::handle& x_obj, int threads) {
  auto x = checked<float>(x_obj, "x");
  py::array_t<float> y(shape_of(x));
  auto* yp = y.mutable_data();
  py::gil_scoped_release release;
  amct::tanhf_array(x.data(), yp, size_of(x), threads);
  return std::move(y);
}

py::array expf_array(const py::handle& x_obj, int threads) {
  auto x = checked<float>(x_obj, "x");
  py::array_t<float> y(shape_of(x));
  auto* yp = y.mutable_data();
  py::gil_scoped_release release;
  amct::expf_array(x.data(), yp, size_of(x), threads);
  return std::move(y);
}

// The machine's own libm expf, element by element: what the port is tested against.
py::array libm_expf_array(const py::handle& x_obj) {
  auto x = checked<float>(x_obj, "x");
  py::array_t<float> y(shape_of(x));
  auto* yp = y.mutable_data();
  const float* xp = x.data();
  const std::size_t n = size_of(x);
  py::gil_scoped_release release;
  for (std::size_t i = 0; i < n; ++i) yp[i] = ::expf(xp[i]);
  return std::move(y);
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
  register_small_conv(m);
  m.doc() = "amct_caffe C++ kernels; amct_caffe/quant holds the NumPy references and the public API";
  m.def("depthwise_conv2d", &depthwise_conv2d, py::arg("x"), py::arg("weight"), py::arg("stride"), py::arg("pad"),
        py::arg("dilation"), py::arg("out"), py::arg("threads"), py::arg("bias") = py::none());
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
  m.def("batch_norm_backward", &batch_norm_backward, py::arg("dy"), py::arg("x_norm"), py::arg("std"),
        py::arg("sum_dy"), py::arg("sum_dyx"), py::arg("inv_m"), py::arg("threads"));
  m.def("sgd_update", &sgd_update, py::arg("weight"), py::arg("diff"), py::arg("history"), py::arg("decay"),
        py::arg("momentum"), py::arg("rate"), py::arg("threads"));
  m.def("direct_conv2d", &direct_conv2d, py::arg("x"), py::arg("weight"), py::arg("stride"), py::arg("pad"),
        py::arg("dilation"), py::arg("out"), py::arg("threads"), py::arg("bias") = py::none());
  m.def("direct_conv_available", &amct::direct_conv_available);
  m.def("direct_conv_max_k", []() { return amct::kDirectMaxK; });
  m.def("pool2d", &pool2d, py::arg("x"), py::arg("method"), py::arg("kernel"), py::arg("stride"), py::arg("pad"),
        py::arg("out"), py::arg("threads"));
  m.def("winograd_input", &winograd_input, py::arg("x"), py::arg("v"), py::arg("pad"), py::arg("m"),
        py::arg("threads"));
  m.def("winograd_output", &winograd_output, py::arg("mm"), py::arg("x_shape"), py::arg("pad"), py::arg("m"),
        py::arg("a"), py::arg("b"), py::arg("relu"), py::arg("threads"));
  m.def("affine_add_relu", &affine_add_relu, py::arg("y"), py::arg("a"), py::arg("b"), py::arg("other"),
        py::arg("threads"));
  m.def("add_relu", &add_relu, py::arg("a"), py::arg("b"), py::arg("threads"));
  m.def("tanhf", &tanhf_array, py::arg("x"), py::arg("threads"));
  m.def("expf", &expf_array, py::arg("x"), py::arg("threads"));
  m.def("libm_expf", &libm_expf_array, py::arg("x"));
  m.def("softmax", &softmax, py::arg("x"), py::arg("axis"), py::arg("threads"));
  m.def("softmax_sequential_order", &amct::softmax_sequential_order, py::arg("channels"), py::arg("inner"));
  m.def("channel_affine", &channel_affine, py::arg("y"), py::arg("a"), py::arg("b"), py::arg("relu"),
        py::arg("threads"));
  m.def("quantize", &quantize, py::arg("x"), py::arg("scale"), py::arg("offset"), py::arg("num_bits"));
  m.def("fake_quant", &fake_quant, py::arg("x"), py::arg("scale"), py::arg("offset"), py::arg("num_bits"));
  m.def("pack_deq_scale", &pack_deq_scale, py::arg("scale_w"), py::arg("scale_d"), py::arg("offset_w"));
  m.def("unpack_deq_scale", &unpack_deq_scale, py::arg("param"));
  m.def("ifmr_search", &ifmr_search, py::arg("chunks"), py::arg("num_bits"), py::arg("with_offset"),
        py::arg("max_percentile"), py::arg("min_percentile"), py::arg("ratios"), py::arg("zeros") = 0,
        py::arg("threads") = 1);
  m.def("ifmr_ratios", [](double start, double end, double step) {
    auto r = amct::ifmr_ratios(start, end, step);
    py::array_t<double> out(static_cast<py::ssize_t>(r.size()));
    std::copy(r.begin(), r.end(), out.mutable_data());
    return out;
  }, py::arg("start"), py::arg("end"), py::arg("step"));
  py::class_<amct::IfmrHistogram>(m, "IfmrHistogram")
      .def(py::init<std::size_t, std::size_t>(), py::arg("bins"), py::arg("top_k"))
      .def("update", &histogram_update, py::arg("x"), py::arg("what") = "IfmrQuantWithOffset",
           py::arg("threads") = 1)
      .def("kth", &amct::IfmrHistogram::kth, py::arg("k"), py::arg("largest"))
      .def("losses", &histogram_losses, py::arg("clip"), py::arg("lo"), py::arg("scale"), py::arg("threads") = 1)
      .def_property_readonly("bins", &amct::IfmrHistogram::bins)
      .def_property_readonly("top_k", &amct::IfmrHistogram::top_k)
      .def_property_readonly("exp", [](const amct::IfmrHistogram& h) -> py::object {
        return h.has_grid() ? py::object(py::int_(h.exp())) : py::object(py::none());
      })
      .def_property_readonly("base", &amct::IfmrHistogram::base)
      .def_property_readonly("count", [](const amct::IfmrHistogram& h) { return to_array(h.count()); })
      .def_property_readonly("dev", [](const amct::IfmrHistogram& h) { return to_array(h.dev()); })
      .def_property_readonly("m2", &amct::IfmrHistogram::m2)
      .def_property_readonly("nonzero", &amct::IfmrHistogram::nonzero)
      .def_property_readonly("positive", &amct::IfmrHistogram::positive)
      .def_property_readonly("negative", [](const amct::IfmrHistogram& h) { return h.nonzero() - h.positive(); })
      .def_property_readonly("top", [](const amct::IfmrHistogram& h) { return to_array(h.top()); })
      .def_property_readonly("bottom", [](const amct::IfmrHistogram& h) { return to_array(h.bottom()); });
  m.def("ifmr_simd_level", &amct::ifmr_simd_level);
  m.def("set_ifmr_simd_limit", &amct::set_ifmr_simd_limit, py::arg("level"));
  m.def("arq_scales", &arq_scales, py::arg("weight"), py::arg("layout"), py::arg("channel_wise"),
        py::arg("num_bits"));
  m.def("arq_quantize", &arq_quantize, py::arg("weight"), py::arg("layout"), py::arg("channel_wise"),
        py::arg("num_bits"), py::arg("scale"), py::arg("offset"));
  m.def("quantize_bias", &quantize_bias, py::arg("bias"), py::arg("scale_w"), py::arg("scale_d"));
  m.def("search_n_errors", &search_n_errors, py::arg("x"), py::arg("deq_scale"));
  m.def("snq", &snq, py::arg("weight"), py::arg("init"), py::arg("max_iteration"), py::arg("min_distance"),
        py::arg("seed"));
  m.def("ulq_clip_check", &ulq_clip_check, py::arg("clip_max"), py::arg("clip_min"), py::arg("prev_max"),
        py::arg("prev_min"));
  m.def("ulq_scale_offset", &ulq_scale_offset, py::arg("clip_max"), py::arg("clip_min"), py::arg("num_bits"));
  m.def("ulq_backward", &ulq_backward, py::arg("x"), py::arg("grad"), py::arg("clip_max"), py::arg("clip_min"),
        py::arg("scale"), py::arg("offset"), py::arg("num_bits"));
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
                                   const py::object& scale_obj, const py::object& bias_obj, bool relu) {
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
    py::array_t<float> y(std::vector<py::ssize_t>{x.shape(0), static_cast<py::ssize_t>(o),
                                                  static_cast<py::ssize_t>(out[0]), static_cast<py::ssize_t>(out[1])});
    auto* yp = y.mutable_data();
    py::gil_scoped_release release;
    amct::direct_conv2d(x.data(), w.data(), yp, g, o, threads, sp, bp, relu);
    return y;
  }, py::arg("x"), py::arg("weight"), py::arg("stride"), py::arg("pad"), py::arg("dilation"), py::arg("out"),
     py::arg("threads"), py::arg("scale"), py::arg("bias"), py::arg("relu"));
}
