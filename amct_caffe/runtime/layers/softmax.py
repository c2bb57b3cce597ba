"""Softmax (Caffe's softmax_layer.cpp). The fork defines no LogSoftmax layer."""

from __future__ import annotations

import numpy as np

from amct_caffe.runtime.layer import Layer, canonical_axis
from amct_caffe.ops import register


def Softmax(x, *, axis=1):  # noqa: N802 - Caffe type name
    """``y = exp(x - max_axis x) / sum_axis exp(x - max_axis x)`` in float32, as Caffe does it.

    ``axis`` may be negative; every slice along it (the other axes index independent
    softmaxes) is shifted by its maximum before ``exp`` so no term overflows.
    """
    x = np.asarray(x, np.float32)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True, dtype=np.float32)


# numpy reduces a contiguous axis of fewer than 8 values one value after the other (pairwise from 8 on)
SHORT_AXIS = 7


def softmax_short_last_axis(x: np.ndarray) -> np.ndarray:
    """:func:`Softmax` over the last axis of ``x`` when it holds at most :data:`SHORT_AXIS` values: the same
    bytes (the maximum is exact, the sum adds the values in order as numpy's reduction does there), but
    from whole slices (``x[..., j]``) instead of a numpy reduction per row, which is slow on such rows
    (UltraFace's (1, 4420, 2) scores: 0.39 -> 0.11 ms)."""
    m = x[..., 0].copy()
    for j in range(1, x.shape[-1]):
        np.maximum(m, x[..., j], out=m)
    e = np.exp(x - m[..., None])
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
        x = bottoms[0]
        if self._axis == x.ndim - 1 and 1 <= x.shape[-1] <= SHORT_AXIS and x.dtype == np.float32:
            return [softmax_short_last_axis(x)]
        return [Softmax(x, axis=self._axis)]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """dx = (dy - sum_axis(dy * y)) * y, from the top alone (so in place works as in Caffe)."""
        if not propagate_down[0]:
            return [None]
        y, dy = tops[0], top_diffs[0]
        dot = np.multiply(dy, y).sum(axis=self._axis, keepdims=True, dtype=np.float32)
        dx = np.subtract(dy, dot)
        dx *= y
        return [dx]
