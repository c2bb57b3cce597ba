// The argument checks every pybind11 file of amct_caffe._kernels shares: a numpy array of one dtype,
// C-contiguous (no silent conversion: the Python wrappers in amct_caffe/quant convert), of a given rank.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstddef>
#include <initializer_list>
#include <string>
#include <vector>

namespace amct_py {

namespace py = pybind11;

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

inline std::vector<py::ssize_t> shape_of(const py::array& a) { return {a.shape(), a.shape() + a.ndim()}; }

inline std::size_t size_of(const py::array& a) { return static_cast<std::size_t>(a.size()); }

// The float32 array a kernel writes its result of `shape` into: `into` when it is a writeable, C-contiguous
// float32 array of exactly that shape sharing no memory with `inputs`, else a fresh one. The executor hands
// a blob's array of the last forward back to the kernel that made it when no one else holds that array
// (runtime/forward.py): rewriting it costs no page faults, where fresh memory costs one per 4 KB.
inline py::array_t<float> output_into(const py::object& into, const std::vector<py::ssize_t>& shape,
                                      std::initializer_list<const py::array*> inputs) {
  if (!into.is_none() && py::isinstance<py::array>(into)) {
    auto a = py::reinterpret_borrow<py::array>(into);
    const bool fits = a.dtype().is(py::dtype::of<float>()) && (a.flags() & py::array::c_style) && a.writeable() &&
                      shape_of(a) == shape;
    if (fits) {
      const auto* lo = static_cast<const char*>(a.data());
      const auto* hi = lo + a.nbytes();
      const bool overlaps = std::any_of(inputs.begin(), inputs.end(), [&](const py::array* in) {
        const auto* in_lo = static_cast<const char*>(in->data());
        return in->nbytes() > 0 && in_lo < hi && lo < in_lo + in->nbytes();
      });
      if (!overlaps) return py::reinterpret_borrow<py::array_t<float>>(a);
    }
  }
  return py::array_t<float>(shape);
}

template <class T>
py::array_t<T> to_array(const std::vector<T>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

}  // namespace amct_py
