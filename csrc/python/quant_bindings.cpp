// amct_caffe._kernels: the quantization algorithms (uniform quantize / fake-quant, the deploy
// scale packing, IFMR, ARQ, SNQ, ULQ, SearchN). Each function checks its arrays (array_args.h),
// allocates the outputs, then releases the GIL around the C++ loop, which touches only raw buffers of
// arrays this frame keeps referenced. Bad data in the core throws std::invalid_argument (a ValueError).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "amct/arq.h"
#include "amct/fake_quant.h"
#include "amct/ifmr.h"
#include "amct/ifmr_stream.h"
#include "amct/search_n.h"
#include "amct/snq.h"
#include "amct/ulq.h"
#include "array_args.h"

namespace py = pybind11;
using amct_py::checked;
using amct_py::shape_of;
using amct_py::size_of;
using amct_py::to_array;

namespace {

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

py::array_t<float> fake_quant(const py::handle& x_obj, float scale, int offset, int num_bits, const py::object& into) {
  auto x = checked<float>(x_obj, "x");
  auto out = amct_py::output_into(into, shape_of(x), {&x});
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

}  // namespace

void register_quant(py::module_& m) {
  m.def("quantize", &quantize, py::arg("x"), py::arg("scale"), py::arg("offset"), py::arg("num_bits"));
  m.def("fake_quant", &fake_quant, py::arg("x"), py::arg("scale"), py::arg("offset"), py::arg("num_bits"),
        py::arg("into") = py::none());
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
}
