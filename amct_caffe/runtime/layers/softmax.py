"""Softmax (Caffe's softmax_layer.cpp). The fork defines no LogSoftmax layer.

Caffe's SoftmaxLayer::Forward_cpu, per index of the axes around ``axis`` (an (outer, channels, inner)
view):

    m = max_c x                      (a loop of std::max)
    e = exp(x - m)                   (a GEMM with a ones vector: x - m rounded once; std::exp of a
                                      float, glibc's expf)
    s = sum_c e                      (a gemv with a ones vector: its BLAS's order)
    y = e / s

Here ``exp`` is glibc's ``expf`` bit for bit (:func:`.libm_float.expf`; NumPy's own float32 exp is an
ulp off it for about a fifth of all inputs), and the sum adds the channels in order, c = 0, 1, ...:
NumPy's order for a float32 sum over a C-contiguous axis when it adds whole slices (inner > 1) or fewer
than 8 values (from 8 on, inner == 1, NumPy sums pairwise, and :func:`softmax_reference` keeps it). With
two channels (MTCNN, UltraFace and most detectors' scores) every order gives the same sum, so the
result is Caffe's bit for bit. With nothing after the axis (inner == 1: a classifier's (N, classes)) and 8
values or more, each row's sum is Caffe's own call, numpy's OpenBLAS ``sgemv`` (:mod:`.cblas`), so the
result is Caffe's there too where the two OpenBLAS builds round alike.
"""

from __future__ import annotations

import math

import numpy as np

from amct_caffe.ops import register
from amct_caffe.runtime import threads
from amct_caffe.runtime.layer import Layer, canonical_axis
from amct_caffe.runtime.layers.caffe_gemm import gemm_config
from amct_caffe.runtime.layers.cblas import row_sums_as_gemv
from amct_caffe.runtime.layers.libm_float import expf

try:  # csrc/src/softmax.cpp: the whole softmax in one pass
    from amct_caffe._kernels import SmallSoftmax as SMALL_SOFTMAX
    from amct_caffe._kernels import softmax as SOFTMAX_KERNEL
except ImportError:
    SMALL_SOFTMAX = SOFTMAX_KERNEL = None

# numpy reduces a contiguous axis of fewer than 8 values one value after the other (pairwise from 8 on)
SHORT_AXIS = 7
# the largest tensor whose softmax may run inside forward.py's one call of native ops (SmallRun)
SMALL_SOFTMAX_SIZE = 1 << 12


def sequential_sum(channels: int, inner: int) -> bool:
    """Whether NumPy's float32 sum over ``channels`` values ``inner`` apart adds them in order."""
    return inner > 1 or channels <= SHORT_AXIS


def Softmax(x, *, axis=1, gemv_sums=True):  # noqa: N802 - Caffe type name
    """``y = exp(x - max_axis x) / sum_axis exp(x - max_axis x)`` in float32, as Caffe does it (module doc).

    ``axis`` may be negative; every slice along it (the other axes index independent
    softmaxes) is shifted by its maximum before ``exp`` so no term overflows. Where the sum is
    sequential, the C++ kernel computes the same bytes as :func:`softmax_reference` in one pass.
    ``gemv_sums``: with nothing after a long axis, Caffe's sgemv sums (a call per row: 2-3 microseconds
    each); False keeps NumPy's (SoftmaxWithLoss, whose loss is summed in float64 anyway).
    """
    x = np.asarray(x, np.float32)
    axis = axis % x.ndim if x.ndim else 0
    if SOFTMAX_KERNEL is not None and x.ndim and x.size \
            and sequential_sum(x.shape[axis], math.prod(x.shape[axis + 1:])):
        # (the kernel splits between the workers from 2^16 values on)
        return SOFTMAX_KERNEL(np.ascontiguousarray(x), axis, threads.workers())
    if gemv_sums and x.ndim and x.size and math.prod(x.shape[axis + 1:]) == 1:
        # nothing after the axis (a classifier's (N, 1000)): Caffe's gemv sums each row in its kernel's order
        rows = x.reshape(-1, x.shape[axis])
        e = expf(rows - rows.max(axis=1, keepdims=True))
        sums = row_sums_as_gemv(e, gemm_config().threads)
        if sums is not None:
            return (e / sums[:, None]).reshape(x.shape)
    return softmax_reference(x, axis=axis)


def softmax_reference(x, *, axis=1):
    """:func:`Softmax` in NumPy ufuncs (the bytes the C++ kernel is tested against)."""
    x = np.asarray(x, np.float32)
    if x.ndim and axis % x.ndim == x.ndim - 1 and 1 <= x.shape[-1] <= SHORT_AXIS:
        return softmax_short_last_axis(x)
    e = expf(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True, dtype=np.float32)


def softmax_short_last_axis(x: np.ndarray) -> np.ndarray:
    """:func:`softmax_reference` over the last axis of ``x`` when it holds at most :data:`SHORT_AXIS`
    values: the same bytes (the maximum is exact, the sum adds the values in order as numpy's reduction
    does there), but from whole slices (``x[..., j]``) instead of a numpy reduction per row, which is
    slow on such rows (UltraFace's (1, 4420, 2) scores: 0.39 -> 0.11 ms)."""
    m = x[..., 0].copy()
    for j in range(1, x.shape[-1]):
        np.maximum(m, x[..., j], out=m)
    e = expf(x - m[..., None])
    s = e[..., 0].copy()
    for j in range(1, x.shape[-1]):
        s += e[..., j]
    return e / s[..., None]


@register("Softmax")
class SoftmaxLayer(Layer):
    """Softmax over ``softmax_param.axis`` (default 1); the top has the bottom's shape."""

    def reshape(self, bottom_shapes):
        self._axis = canonical_axis(self.lp.softmax_param.axis, len(bottom_shapes[0]), self.name)
        return [tuple(bottom_shapes[0])]

    def forward(self, bottoms):
        return [Softmax(bottoms[0], axis=self._axis)]

    def prepared_forward(self, bottom_shapes):
        """:meth:`forward`; on a small 4-D bottom whose sum is sequential, also the op that runs it inside
        forward.py's one call of native ops (``SmallSoftmax``: the same kernel, so the same bytes)."""
        shape = tuple(bottom_shapes[0])
        forward = self.forward
        if SMALL_SOFTMAX is None or len(shape) != 4 or not 0 < math.prod(shape) <= SMALL_SOFTMAX_SIZE \
                or not sequential_sum(shape[self._axis], math.prod(shape[self._axis + 1:])):
            return forward

        def forward_small(bottoms):
            return forward(bottoms)
        forward_small.small_op = (SMALL_SOFTMAX(list(shape), self._axis), [], False, None)
        return forward_small

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """dx = (dy - sum_axis(dy * y)) * y, from the top alone (so in place works as in Caffe)."""
        if not propagate_down[0]:
            return [None]
        y, dy = tops[0], top_diffs[0]
        dot = np.multiply(dy, y).sum(axis=self._axis, keepdims=True, dtype=np.float32)
        dx = np.subtract(dy, dot)
        dx *= y
        return [dx]
