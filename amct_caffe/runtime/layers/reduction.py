"""Layers that reduce the trailing axes of a blob: Reduction and ArgMax.

The op / layer conventions are shape_common's.
"""

from __future__ import annotations

import numpy as np

from amct_caffe.ops import register
from amct_caffe.runtime.layers.shape_common import ShapeLayer, check_axis, element_count, proto_fields


# ------------------------------------------------------------------------ pure ops
def Reduction(x, *, operation="SUM", axis=0, coeff=1.0):  # noqa: N802
    """Reduces all axes >= ``axis`` (0: everything, top shape ``()``) to one number per leading
    index: SUM, ASUM (sum |x|), SUMSQ (sum x^2) or MEAN, times ``coeff`` (for MEAN the float32
    ``coeff / count`` as Caffe folds it). Sums accumulate in float64."""
    a = check_axis(axis, x.ndim)
    v = x.reshape(x.shape[:a] + (-1,)).astype(np.float64)
    if operation not in ("SUM", "ASUM", "SUMSQ", "MEAN"):
        raise ValueError(f"unknown reduction operation {operation!r}")
    v = np.abs(v) if operation == "ASUM" else v * v if operation == "SUMSQ" else v
    total = v.sum(-1).astype(np.float32)
    c = np.float32(coeff)
    if operation == "MEAN":
        c = c / np.float32(v.shape[-1])
    if c == 0:  # Caffe's caffe_scal (BLAS sscal) writes 0 for a factor of 0, even over inf / NaN sums
        return np.zeros(total.shape, np.float32)
    return np.asarray(total * c if c != 1 else total, np.float32)


def argmax_shape(shape, out_max_val=False, top_k=1, axis=None):
    if top_k < 1:
        raise ValueError("top_k must be >= 1")
    if axis is not None:
        a = check_axis(axis, len(shape))
        if top_k > shape[a]:
            raise ValueError(f"top_k {top_k} exceeds the axis size {shape[a]}")
        return tuple(shape[:a]) + (top_k,) + tuple(shape[a + 1:])
    if not shape:  # Caffe's count(1) of a 0-D blob: CHECK(start_axis <= end_axis) fails
        raise ValueError("without an axis ArgMax takes each item of axis 0, which a 0-D blob does not have")
    if top_k > element_count(shape[1:]):
        raise ValueError(f"top_k {top_k} exceeds the {element_count(shape[1:])} values per item")
    top = [1] * max(len(shape), 3)
    top[0], top[1], top[2] = shape[0], 2 if out_max_val else 1, top_k
    return tuple(top)


def ArgMax(x, *, out_max_val=False, top_k=1, axis=None):  # noqa: N802
    """Top-k indices (or values) along ``axis``, or over each item's flattened data.

    Without axis the top is ``(N, 1 or 2, top_k)`` padded with 1s to the bottom's rank, with
    ``out_max_val`` row 0 holding indices and row 1 values; with axis it is ``x`` with that
    axis resized to top_k, holding values if ``out_max_val`` else indices. Ties rank the higher
    index first (Caffe partial-sorts (value, index) pairs with std::greater).
    """
    top = argmax_shape(x.shape, out_max_val, top_k, axis)
    v, a = (x.reshape(x.shape[0], -1), 1) if axis is None else (x, check_axis(axis, x.ndim))
    pos = np.argsort(-np.flip(v, a), axis=a, kind="stable").take(np.arange(top_k), axis=a)
    idx = v.shape[a] - 1 - pos  # a stable sort of the flipped data puts higher indices first
    val = np.take_along_axis(v, idx, axis=a)
    if axis is not None:
        out = val if out_max_val else idx
    else:
        out = np.stack([idx, val], axis=1) if out_max_val else idx
    return out.astype(np.float32).reshape(top)


# ------------------------------------------------------------------------ layers
@register("Reduction")
class ReductionLayer(ShapeLayer):
    op = staticmethod(Reduction)
    in_place_differs = "Caffe's Reduction reshapes its top, the input it then reads, to the reduced shape"

    def kwargs(self):
        return proto_fields(self.lp.reduction_param, "operation", "axis", "coeff")

    def shapes(self, s):
        return [s[0][:check_axis(self._kw["axis"], len(s[0]))]]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """With c = coeff (coeff / count for MEAN) and dy one value per leading index:
        SUM, MEAN: dx = c * dy; ASUM: dx = c * dy * sign(x); SUMSQ: dx = 2 * c * dy * x."""
        if not propagate_down[0]:
            return [None]
        x = bottoms[0]
        op = self._kw["operation"]
        a = check_axis(self._kw["axis"], x.ndim)
        dim = element_count(x.shape[a:])
        c = np.float32(self._kw["coeff"])
        if op == "MEAN":
            c = c / np.float32(dim)
        # Caffe's bottom_coeff = top_diff * coeff_, one float per leading index
        g = (top_diffs[0].reshape(-1, 1) * c).astype(np.float32)
        if op in ("SUM", "MEAN"):
            dx = np.empty((g.shape[0], dim), np.float32)
            dx[...] = g  # a writable array, as Caffe's caffe_set
            return [dx.reshape(x.shape)]
        v = x.reshape(g.shape[0], dim)
        if op == "ASUM":
            return [np.multiply(np.sign(v), g).reshape(x.shape)]
        return [np.multiply(v, g * np.float32(2)).reshape(x.shape)]


@register("ArgMax")
class ArgMaxLayer(ShapeLayer):
    op = staticmethod(ArgMax)

    def kwargs(self):
        p = self.lp.argmax_param
        axis = p.axis if p.HasField("axis") else None
        return {"out_max_val": p.out_max_val, "top_k": p.top_k, "axis": axis}

    def shapes(self, s):
        return [argmax_shape(s[0], **self._kw)]
