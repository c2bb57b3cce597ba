// amct_caffe._kernels.SmallConv and the numpy sgemm it calls (csrc/include/amct/small_conv.h).
//
// numpy's matmul multiplies C-contiguous 2-D float32 operands of at least two rows, columns and terms with
// one cblas_sgemm(RowMajor, NoTrans, NoTrans, M, N, K, 1, A, K, B, N, 0, C, N) of the BLAS numpy loaded.
// bind_numpy_sgemm looks that function up in that library (already loaded: RTLD_NOLOAD) so that a small
// convolution can make those calls itself, with the same arguments: the same code, the same bytes.
#include <dlfcn.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "amct/conv_cols.h"
#include "amct/small_conv.h"

namespace py = pybind11;

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111;  // CBLAS_ORDER / CBLAS_TRANSPOSE values
using Lp64Sgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*,
                           int);
using Ilp64Sgemm = void (*)(int, int, int, std::int64_t, std::int64_t, std::int64_t, float, const float*,
                            std::int64_t, const float*, std::int64_t, float, float*, std::int64_t);
Lp64Sgemm lp64 = nullptr;
Ilp64Sgemm ilp64 = nullptr;
amct::Sgemm bound = nullptr;

void lp64_sgemm(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c, int ldc) {
  lp64(kRowMajor, kNoTrans, kNoTrans, m, n, k, 1.0f, a, lda, b, ldb, 0.0f, c, ldc);
}

void ilp64_sgemm(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c, int ldc) {
  ilp64(kRowMajor, kNoTrans, kNoTrans, m, n, k, 1.0f, a, lda, b, ldb, 0.0f, c, ldc);
}

py::array_t<float> f32(const py::handle& obj, const char* name, py::ssize_t size) {
  if (!py::isinstance<py::array_t<float>>(obj)) throw py::type_error(std::string(name) + " must be float32");
  auto a = py::reinterpret_borrow<py::array_t<float>>(obj);
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + " must be C-contiguous");
  if (size >= 0 && a.size() != size) throw py::value_error(std::string(name) + " has the wrong size");
  return a;
}

// `library`: the path of the BLAS numpy loaded; `symbol`: its cblas_sgemm, 64-bit integers if `ilp64`.
bool bind_numpy_sgemm(const std::string& library, const std::string& symbol, bool is_ilp64) {
  void* handle = dlopen(library.c_str(), RTLD_NOW | RTLD_NOLOAD);
  void* f = handle ? dlsym(handle, symbol.c_str()) : nullptr;
  if (!f) return false;
  if (is_ilp64) {
    ilp64 = reinterpret_cast<Ilp64Sgemm>(f);
    bound = ilp64_sgemm;
  } else {
    lp64 = reinterpret_cast<Lp64Sgemm>(f);
    bound = lp64_sgemm;
  }
  return true;
}

using Shape4 = std::array<py::ssize_t, 4>;

Shape4 shape4(const py::array& a, const char* name) {
  if (a.ndim() != 4) throw py::value_error(std::string(name) + " must be 4-D");
  return {a.shape(0), a.shape(1), a.shape(2), a.shape(3)};
}

// The learned arrays of one call, checked, kept referenced while the GIL is released. (A default
// py::array_t is an empty array, not a null handle: whether there is a bias is kept apart.)
struct ConvArgs {
  py::array_t<float> w, b, slope;
  bool has_bias = false;
  const float* bias() const { return has_bias ? b.data() : nullptr; }
};

class SmallConv {
 public:
  SmallConv(std::vector<int> x_shape, int o, std::vector<int> kernel, std::vector<int> stride, std::vector<int> pad,
            std::vector<int> dilation, std::vector<int> out, int rows, int cols, bool im2col, int act) {
    for (const auto* v : {&kernel, &stride, &pad, &dilation, &out}) {
      if (v->size() != 2) throw py::value_error("kernel, stride, pad, dilation and out take 2 values");
    }
    if (x_shape.size() != 4) throw py::value_error("x_shape must have 4 values");
    if (act < 0 || act > 2) throw py::value_error("act must be 0 (none), 1 (ReLU) or 2 (PReLU)");
    s_ = {{x_shape[0], x_shape[1], x_shape[2], x_shape[3], kernel[0], kernel[1], stride[0], stride[1], pad[0],
           pad[1], dilation[0], dilation[1], out[0], out[1]}, o, rows, cols, im2col};
    const int k = x_shape[1] * kernel[0] * kernel[1], p = out[0] * out[1];
    if (rows < o || cols < p || k < 2 || rows < 2 || cols < 2) throw py::value_error("bad GEMM call shape");
    if (!im2col && (kernel != std::vector<int>{1, 1} || stride != std::vector<int>{1, 1} ||
                    pad != std::vector<int>{0, 0} || out != std::vector<int>{x_shape[2], x_shape[3]})) {
      throw py::value_error("without im2col the convolution must be 1x1, stride 1, no pad");
    }
    act_ = static_cast<amct::SmallConvAct>(act);
    if (im2col) cols_.assign(static_cast<std::size_t>(x_shape[0]) * k * p, 0.0f);
    if (rows != o) apad_.assign(static_cast<std::size_t>(rows) * k, 0.0f);
    if (cols != p) bpad_.assign(static_cast<std::size_t>(k) * cols, 0.0f);
    if (rows != o || cols != p) cpad_.assign(static_cast<std::size_t>(rows) * cols, 0.0f);
  }

  Shape4 in_shape() const { return {s_.g.n, s_.g.c, s_.g.h, s_.g.w}; }
  Shape4 out_shape() const { return {s_.g.n, s_.o, s_.g.ho, s_.g.wo}; }
  bool prelu() const { return act_ == amct::SmallConvAct::kPrelu; }

  ConvArgs args(const py::handle& w_obj, const py::handle& b_obj, const py::handle& slope_obj) const {
    ConvArgs a;
    a.w = f32(w_obj, "weight", static_cast<py::ssize_t>(s_.o) * s_.g.c * s_.g.kh * s_.g.kw);
    if (!b_obj.is_none()) {
      a.b = f32(b_obj, "bias", s_.o);
      a.has_bias = true;
    }
    if (prelu()) {
      a.slope = f32(slope_obj, "slope", -1);
      if (a.slope.size() != 1 && a.slope.size() != s_.o) throw py::value_error("slope: one per channel, or one");
    }
    return a;
  }

  // Needs no GIL: raw buffers only (this object's scratch: one forward of a net runs at a time).
  void compute(const float* x, float* y, const ConvArgs& a) {
    amct::small_conv2d(x, a.w.data(), y, s_, bound, cols_.data(), apad_.data(), bpad_.data(), cpad_.data(), a.bias(),
                       act_, prelu() ? a.slope.data() : nullptr, prelu() && a.slope.size() == 1);
  }

  py::array_t<float> run(const py::handle& x_obj, const py::handle& w_obj, const py::handle& b_obj,
                         const py::handle& slope_obj) {
    if (!bound) throw py::value_error("numpy's sgemm is not bound (bind_numpy_sgemm)");
    auto x = f32(x_obj, "x", -1);
    if (shape4(x, "x") != in_shape()) throw py::value_error("x has not the shape this convolution was made for");
    const ConvArgs a = args(w_obj, b_obj, slope_obj);
    const Shape4 os = out_shape();
    py::array_t<float> y(std::vector<py::ssize_t>(os.begin(), os.end()));
    auto* yp = y.mutable_data();
    py::gil_scoped_release release;
    compute(x.data(), yp, a);
    return y;
  }

 private:
  amct::SmallConvShape s_{};
  amct::SmallConvAct act_ = amct::SmallConvAct::kNone;
  std::vector<float> cols_, apad_, bpad_, cpad_;
};

// MAX pooling of one input shape (bindings.cpp's pool2d, one thread), for SmallRun.
class SmallPool {
 public:
  SmallPool(std::vector<int> x_shape, std::vector<int> kernel, std::vector<int> stride, std::vector<int> pad,
            std::vector<int> out) {
    for (const auto* v : {&x_shape, &kernel, &stride, &pad, &out}) {
      if (v->size() != (v == &x_shape ? 4u : 2u)) throw py::value_error("x_shape takes 4 values, the others 2");
    }
    g_ = {x_shape[0], x_shape[1], x_shape[2], x_shape[3], kernel[0], kernel[1], stride[0], stride[1], pad[0], pad[1],
          1, 1, out[0], out[1]};
  }
  Shape4 in_shape() const { return {g_.n, g_.c, g_.h, g_.w}; }
  Shape4 out_shape() const { return {g_.n, g_.c, g_.ho, g_.wo}; }
  void compute(const float* x, float* y) const { amct::max_pool2d(x, y, g_, 1); }

 private:
  amct::Conv2dGeometry g_{};
};

// Ops i = 0, 1, ... (SmallConv or SmallPool) run in order, op i reading x (inputs[i] == -1) or op
// inputs[i]'s output. The ops are cast and their shapes checked once, here; a call takes x and `params`:
// each SmallConv's weight, then its bias if `biased[i]`, then its slope if it ends in a PReLU. A call checks
// and allocates everything before the first op runs (a ValueError / TypeError leaves nothing done), then
// runs the ops with the GIL released, and returns their outputs, fresh arrays.
class SmallRun {
 public:
  SmallRun(const py::list& ops, std::vector<int> inputs, std::vector<bool> biased)
      : keep_(ops), inputs_(std::move(inputs)), biased_(std::move(biased)) {
    const std::size_t n = ops.size();
    if (inputs_.size() != n || biased_.size() != n) throw py::value_error("one input index and bias flag per op");
    convs_.assign(n, nullptr);
    pools_.assign(n, nullptr);
    for (std::size_t i = 0; i < n; ++i) {
      Shape4 in;
      if (py::isinstance<SmallConv>(ops[i])) {
        convs_[i] = &ops[i].cast<SmallConv&>();
        in = convs_[i]->in_shape();
        outs_.push_back(convs_[i]->out_shape());
        nparams_ += 1 + (biased_[i] ? 1 : 0) + (convs_[i]->prelu() ? 1 : 0);
      } else {
        pools_[i] = &ops[i].cast<const SmallPool&>();
        in = pools_[i]->in_shape();
        outs_.push_back(pools_[i]->out_shape());
      }
      const int src = inputs_[i];
      if (src < -1 || src >= static_cast<int>(i)) throw py::value_error("an op reads x or an earlier op");
      if (src < 0) {
        if (i == 0) x_shape_ = in;
        if (in != x_shape_) throw py::value_error("the ops reading x expect different shapes");
      } else if (outs_[src] != in) {
        throw py::value_error("an op's input has not the shape the op before it gives");
      }
    }
    args_.resize(n);
    ptr_.resize(n);
  }

  py::list run(const py::handle& x_obj, const py::list& params) {
    if (!bound) throw py::value_error("numpy's sgemm is not bound (bind_numpy_sgemm)");
    auto x = f32(x_obj, "x", -1);
    if (shape4(x, "x") != x_shape_) throw py::value_error("x has not the shape the ops were made for");
    if (params.size() != nparams_) throw py::value_error("wrong number of params");
    const std::size_t n = convs_.size();
    std::size_t next = 0;
    for (std::size_t i = 0; i < n; ++i) {
      if (!convs_[i]) continue;
      const py::handle w = params[next++];
      const py::handle b = biased_[i] ? params[next++] : py::handle(Py_None);
      const py::handle slope = convs_[i]->prelu() ? params[next++] : py::handle(Py_None);
      args_[i] = convs_[i]->args(w, b, slope);
    }
    py::list result(n);
    for (std::size_t i = 0; i < n; ++i) {
      py::array_t<float> y(std::vector<py::ssize_t>(outs_[i].begin(), outs_[i].end()));
      ptr_[i] = y.mutable_data();
      result[i] = std::move(y);
    }
    {
      py::gil_scoped_release release;
      for (std::size_t i = 0; i < n; ++i) {
        const float* in = inputs_[i] < 0 ? x.data() : ptr_[inputs_[i]];
        if (convs_[i]) {
          convs_[i]->compute(in, ptr_[i], args_[i]);
        } else {
          pools_[i]->compute(in, ptr_[i]);
        }
      }
    }
    for (auto& a : args_) a = ConvArgs{};  // (the arrays are not kept past the call)
    return result;
  }

 private:
  py::list keep_;  // the ops, alive as long as this
  std::vector<int> inputs_;
  std::vector<bool> biased_;
  std::vector<SmallConv*> convs_;
  std::vector<const SmallPool*> pools_;
  std::vector<Shape4> outs_;
  Shape4 x_shape_{};
  std::size_t nparams_ = 0;
  std::vector<ConvArgs> args_;
  std::vector<float*> ptr_;
};

}  // namespace

void register_small_conv(py::module_& m) {
  m.def("bind_numpy_sgemm", &bind_numpy_sgemm, py::arg("library"), py::arg("symbol"), py::arg("ilp64"));
  m.def("numpy_sgemm", [](const py::handle& a_obj, const py::handle& b_obj) {
    if (!bound) throw py::value_error("numpy's sgemm is not bound (bind_numpy_sgemm)");
    auto a = f32(a_obj, "a", -1), b = f32(b_obj, "b", -1);
    if (a.ndim() != 2 || b.ndim() != 2 || a.shape(1) != b.shape(0)) throw py::value_error("a (m, k) @ b (k, n)");
    const int m = static_cast<int>(a.shape(0)), k = static_cast<int>(a.shape(1)), n = static_cast<int>(b.shape(1));
    py::array_t<float> c(std::vector<py::ssize_t>{m, n});
    bound(m, n, k, a.data(), k, b.data(), n, c.mutable_data(), n);
    return c;
  }, py::arg("a"), py::arg("b"));
  py::class_<SmallConv>(m, "SmallConv")
      .def(py::init<std::vector<int>, int, std::vector<int>, std::vector<int>, std::vector<int>, std::vector<int>,
                    std::vector<int>, int, int, bool, int>(),
           py::arg("x_shape"), py::arg("o"), py::arg("kernel"), py::arg("stride"), py::arg("pad"), py::arg("dilation"),
           py::arg("out"), py::arg("rows"), py::arg("cols"), py::arg("im2col"), py::arg("act"))
      .def("__call__", &SmallConv::run, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("slope"));
  py::class_<SmallPool>(m, "SmallPool")
      .def(py::init<std::vector<int>, std::vector<int>, std::vector<int>, std::vector<int>, std::vector<int>>(),
           py::arg("x_shape"), py::arg("kernel"), py::arg("stride"), py::arg("pad"), py::arg("out"));
  py::class_<SmallRun>(m, "SmallRun")
      .def(py::init<const py::list&, std::vector<int>, std::vector<bool>>(), py::arg("ops"), py::arg("inputs"),
           py::arg("biased"))
      .def("__call__", &SmallRun::run, py::arg("x"), py::arg("params"));
}
