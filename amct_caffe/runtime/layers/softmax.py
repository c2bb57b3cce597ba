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


@register("Softmax")
class SoftmaxLayer(Layer):
    """Softmax over ``softmax_param.axis`` (default 1); the top has the bottom's shape."""

    def reshape(self, bottom_shapes):
        self._axis = canonical_axis(self.lp.softmax_param.axis, len(bottom_shapes[0]), self.name)
        return [tuple(bottom_shapes[0])]

    def forward(self, bottoms):
        return [Softmax(bottoms[0], axis=self._axis)]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """dx = (dy - sum_axis(dy * y)) * y, from the top alone (so in place works as in Caffe)."""
        if not propagate_down[0]:
            return [None]
        y, dy = tops[0], top_diffs[0]
        dot = np.multiply(dy, y).sum(axis=self._axis, keepdims=True, dtype=np.float32)
        dx = np.subtract(dy, dot)
        dx *= y
        return [dx]
