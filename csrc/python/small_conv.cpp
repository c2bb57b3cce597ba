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
#include "amct/softmax.h"

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

// The data of `obj` if it is a C-contiguous float32 array of `size` values (any size if size < 0), else
// nullptr: a few loads when its descriptor is numpy's float32 singleton (nearly every float32 array),
// pybind11's full dtype check otherwise. A prepared step checks its 20-odd arrays on every call.
const float* f32_data(PyObject* obj, py::ssize_t size) {
  static PyObject* const float32 = py::dtype::of<float>().release().ptr();
  const auto& api = py::detail::npy_api::get();
  if (!api.PyArray_Check_(obj)) return nullptr;
  const auto* a = py::detail::array_proxy(obj);
  if (a->descr != float32 && !py::isinstance<py::array_t<float>>(obj)) return nullptr;
  if (!(a->flags & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_)) return nullptr;
  if (size >= 0) {
    py::ssize_t n = 1;
    for (int d = 0; d < a->nd; ++d) n *= a->dimensions[d];
    if (n != size) return nullptr;
  }
  return reinterpret_cast<const float*>(a->data);
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

// The learned arrays of one call, checked; whoever fills it keeps the arrays referenced until the ops ran.
struct ConvArgs {
  const float* w = nullptr;
  const float* b = nullptr;      // no bias: nullptr
  const float* slope = nullptr;  // not a PReLU: nullptr
  bool shared_slope = false;     // one slope for every channel
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

  // The arrays' data, or false when one is not a C-contiguous float32 array of the expected size (bias or
  // slope None: none).
  bool args(PyObject* w, PyObject* b, PyObject* slope, ConvArgs& a) const {
    a = ConvArgs{};
    a.w = f32_data(w, static_cast<py::ssize_t>(s_.o) * s_.g.c * s_.g.kh * s_.g.kw);
    if (!a.w) return false;
    if (b != Py_None && !(a.b = f32_data(b, s_.o))) return false;
    if (prelu()) {
      a.slope = f32_data(slope, s_.o);
      if (!a.slope && s_.o != 1) a.slope = f32_data(slope, 1), a.shared_slope = true;
      if (!a.slope) return false;
    }
    return true;
  }

  // Needs no GIL: raw buffers only (this object's scratch: one forward of a net runs at a time).
  void compute(const float* x, float* y, const ConvArgs& a) {
    amct::small_conv2d(x, a.w, y, s_, bound, cols_.data(), apad_.data(), bpad_.data(), cpad_.data(), a.b, act_,
                       a.slope, a.shared_slope);
  }

  py::array_t<float> run(const py::handle& x_obj, const py::handle& w_obj, const py::handle& b_obj,
                         const py::handle& slope_obj) {
    if (!bound) throw py::value_error("numpy's sgemm is not bound (bind_numpy_sgemm)");
    auto x = f32(x_obj, "x", -1);
    if (shape4(x, "x") != in_shape()) throw py::value_error("x has not the shape this convolution was made for");
    f32(w_obj, "weight", -1);  // (the type errors of the arrays; args checks their sizes)
    if (!b_obj.is_none()) f32(b_obj, "bias", -1);
    if (prelu()) f32(slope_obj, "slope", -1);
    ConvArgs a;
    if (!args(w_obj.ptr(), b_obj.ptr(), slope_obj.ptr(), a)) {
      throw py::value_error("weight, bias or slope has the wrong size (slope: one per channel, or one)");
    }
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

// Softmax over one axis of one 4-D input shape (runtime/layers/softmax.py's kernel, one thread), for SmallRun.
class SmallSoftmax {
 public:
  SmallSoftmax(std::vector<int> x_shape, int axis) {
    if (x_shape.size() != 4 || axis < 0 || axis > 3) throw py::value_error("x_shape takes 4 values, 0 <= axis < 4");
    for (int d = 0; d < 4; ++d) {
      if (x_shape[d] <= 0) throw py::value_error("an empty shape");
      shape_[d] = x_shape[d];
      (d < axis ? outer_ : d > axis ? inner_ : channels_) *= static_cast<std::size_t>(x_shape[d]);
    }
  }
  Shape4 in_shape() const { return shape_; }
  Shape4 out_shape() const { return shape_; }
  void compute(const float* x, float* y) const { amct::softmax_channels(x, y, outer_, channels_, inner_, 1); }

 private:
  Shape4 shape_{};
  std::size_t outer_ = 1, channels_ = 1, inner_ = 1;
};

// Ops i = 0, 1, ... (SmallConv, SmallPool or SmallSoftmax) run in order, op i reading x (inputs[i] == -1) or
// op inputs[i]'s output. The ops are cast and their shapes checked once, here. The learned arrays (`params`)
// are each SmallConv's weight, then its bias if `biased[i]`, then its slope if it ends in a PReLU.
//
// `step()` is a Net's prepared step (runtime/forward.py) once `bind` gave it the Blob objects: it reads their `data` and writes op i's
// output into top i's array of the last step when nothing else holds that array (what forward.py's
// _into_step does for one layer: a caller keeping a result, or a view of it, holds a reference, and gets
// fresh memory next time; the reused arrays also save a numpy allocation and a Blob.data store each).
// It checks every array before the first op runs, then runs the ops with the GIL released; it returns
// false, having done nothing, when it refuses one.
class SmallRun {
 public:
  SmallRun(const py::list& ops, std::vector<int> inputs, std::vector<bool> biased)
      : keep_(ops), inputs_(std::move(inputs)), biased_(std::move(biased)) {
    const std::size_t n = ops.size();
    if (inputs_.size() != n || biased_.size() != n) throw py::value_error("one input index and bias flag per op");
    convs_.assign(n, nullptr);
    pools_.assign(n, nullptr);
    softmaxes_.assign(n, nullptr);
    for (std::size_t i = 0; i < n; ++i) {
      Shape4 in;
      if (py::isinstance<SmallConv>(ops[i])) {
        convs_[i] = &ops[i].cast<SmallConv&>();
        in = convs_[i]->in_shape();
        outs_.push_back(convs_[i]->out_shape());
        nparams_ += 1 + (biased_[i] ? 1 : 0) + (convs_[i]->prelu() ? 1 : 0);
      } else if (py::isinstance<SmallSoftmax>(ops[i])) {
        softmaxes_[i] = &ops[i].cast<const SmallSoftmax&>();
        in = softmaxes_[i]->in_shape();
        outs_.push_back(softmaxes_[i]->out_shape());
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
    held_.resize(nparams_);
  }

  void bind(py::object x_blob, const py::list& param_blobs, const py::list& top_blobs) {
    if (param_blobs.size() != nparams_ || top_blobs.size() != convs_.size()) {
      throw py::value_error("one Blob per learned array and one top Blob per op");
    }
    x_blob_ = std::move(x_blob);
    param_blobs_.clear();
    top_blobs_.clear();
    for (const auto& b : param_blobs) param_blobs_.push_back(py::reinterpret_borrow<py::object>(b));
    for (const auto& b : top_blobs) top_blobs_.push_back(py::reinterpret_borrow<py::object>(b));
    cache_.assign(convs_.size(), py::object());
  }

  // False, having done nothing, when an array is refused (the caller runs the layers' own steps).
  bool step() {
    if (!x_blob_) throw py::value_error("step() before bind()");
    if (!bound) return false;
    static PyObject* const data_attr = PyUnicode_InternFromString("data");  // (never freed: no teardown order)
    const py::handle data(data_attr);
    const py::object x = py::getattr(x_blob_, data);
    const float* xp = f32_data(x.ptr(), -1);
    if (xp) {  // (not shape4: a step refuses an array by returning false, it does not raise)
      const auto* a = py::detail::array_proxy(x.ptr());
      bool same = a->nd == 4;
      for (int d = 0; same && d < 4; ++d) same = a->dimensions[d] == x_shape_[d];
      if (!same) xp = nullptr;
    }
    for (std::size_t j = 0; j < nparams_; ++j) held_[j] = py::getattr(param_blobs_[j], data);
    if (!xp || !gather_args()) {
      release_args();
      return false;
    }
    const std::size_t n = convs_.size();
    std::vector<py::object> fresh(n);
    for (std::size_t i = 0; i < n; ++i) {
      ptr_[i] = reusable(i, py::getattr(top_blobs_[i], data));
      if (!ptr_[i]) {
        py::array_t<float> y(std::vector<py::ssize_t>(outs_[i].begin(), outs_[i].end()));
        ptr_[i] = y.mutable_data();
        fresh[i] = std::move(y);
      }
    }
    execute(xp);
    release_args();
    for (std::size_t i = 0; i < n; ++i) {
      if (!fresh[i]) continue;
      top_blobs_[i].attr(data) = fresh[i];
      cache_[i] = std::move(fresh[i]);
    }
    return true;
  }

 private:
  // The learned arrays in held_ as each conv's ConvArgs; false if one is refused.
  bool gather_args() {
    std::size_t next = 0;
    for (std::size_t i = 0; i < convs_.size(); ++i) {
      if (!convs_[i]) continue;
      PyObject* w = held_[next++].ptr();
      PyObject* b = biased_[i] ? held_[next++].ptr() : Py_None;
      PyObject* slope = convs_[i]->prelu() ? held_[next++].ptr() : Py_None;
      if (!convs_[i]->args(w, b, slope, args_[i])) return false;
    }
    return true;
  }

  void release_args() {
    for (auto& h : held_) h = py::object();  // (the arrays are not kept past the call)
  }

  // Top i's array `cur` when this object made it in an earlier step, it still has op i's shape and layout,
  // and only top i's blob, cache_[i] and `cur` reference it (so no one can see it rewritten); else nullptr.
  float* reusable(std::size_t i, const py::object& cur) const {
    constexpr Py_ssize_t kOnlyOurs = 3;  // the blob's slot, cache_[i], cur
    if (!cache_[i] || cur.ptr() != cache_[i].ptr() || Py_REFCNT(cur.ptr()) != kOnlyOurs) return nullptr;
    const auto* a = py::detail::array_proxy(cur.ptr());
    constexpr int need = py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_ | py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
    if (!f32_data(cur.ptr(), -1) || (a->flags & need) != need || a->base || a->nd != 4) return nullptr;
    for (int d = 0; d < 4; ++d) {
      if (a->dimensions[d] != outs_[i][d]) return nullptr;
    }
    return reinterpret_cast<float*>(a->data);
  }

  void execute(const float* x) {
    py::gil_scoped_release release;
    for (std::size_t i = 0; i < convs_.size(); ++i) {
      const float* in = inputs_[i] < 0 ? x : ptr_[inputs_[i]];
      if (convs_[i]) {
        convs_[i]->compute(in, ptr_[i], args_[i]);
      } else if (softmaxes_[i]) {
        softmaxes_[i]->compute(in, ptr_[i]);
      } else {
        pools_[i]->compute(in, ptr_[i]);
      }
    }
  }

  py::list keep_;  // the ops, alive as long as this
  std::vector<int> inputs_;
  std::vector<bool> biased_;
  std::vector<SmallConv*> convs_;
  std::vector<const SmallPool*> pools_;
  std::vector<const SmallSoftmax*> softmaxes_;
  std::vector<Shape4> outs_;
  Shape4 x_shape_{};
  std::size_t nparams_ = 0;
  std::vector<ConvArgs> args_;
  std::vector<float*> ptr_;
  std::vector<py::object> held_;  // the learned arrays of the call under way
  // bind's
  py::object x_blob_;
  std::vector<py::object> param_blobs_, top_blobs_;
  std::vector<py::object> cache_;  // top i's array as the last step that made one left it
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
  py::class_<SmallSoftmax>(m, "SmallSoftmax")
      .def(py::init<std::vector<int>, int>(), py::arg("x_shape"), py::arg("axis"));
  py::class_<SmallRun>(m, "SmallRun")
      .def(py::init<const py::list&, std::vector<int>, std::vector<bool>>(), py::arg("ops"), py::arg("inputs"),
           py::arg("biased"))
      .def("bind", &SmallRun::bind, py::arg("x_blob"), py::arg("param_blobs"), py::arg("top_blobs"))
      .def("step", &SmallRun::step);
}
