"""Element-wise combination of several blobs: Eltwise (PROD / SUM / MAX) and Axpy.

Reference functions are named after the layer types, keyword defaults as in caffe.proto; they
never modify their inputs.
"""

from __future__ import annotations

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.io import TEST
from amct_caffe.runtime.layer import Layer
from amct_caffe.ops import register

_F32 = np.float32
PROD, SUM, MAX = 0, 1, 2  # EltwiseParameter.EltwiseOp numbers
_OPS = {"PROD": PROD, "SUM": SUM, "MAX": MAX}


def _check_eltwise(n_bottoms: int, operation, coeff) -> int:
    op = _OPS.get(operation, operation)
    if op not in (PROD, SUM, MAX):
        raise ValueError(f"unknown Eltwise operation {operation!r}")
    if len(coeff) not in (0, n_bottoms):
        raise ValueError(f"Eltwise takes one coefficient per bottom blob: {len(coeff)} coefficients "
                         f"for {n_bottoms} bottoms")
    if op == PROD and len(coeff):
        raise ValueError("Eltwise takes coefficients only for SUM")
    return op


def Eltwise(*xs, operation=SUM, coeff=()):
    """Element-wise PROD (y = x0 * x1 * ...), SUM (y = sum_i coeff_i * x_i, coeff default 1) or
    MAX (y = max_i x_i) of two or more blobs with the same element count; y has x0's shape.

    MAX keeps Caffe's comparison order (x0 > x1 ? x0 : x1, then x_i > y ? x_i : y), which
    decides which operand a NaN comes from. The fork dropped Caffe's equal-shape check, so
    blobs of equal count but different shapes combine element by element in memory order.
    """
    op = _check_eltwise(len(xs), operation, coeff)
    if len(xs) < 2:
        raise ValueError(f"Eltwise needs at least 2 bottoms, got {len(xs)}")
    shape = xs[0].shape
    if any(x.size != xs[0].size for x in xs):
        raise ValueError(f"Eltwise bottoms differ in element count: {[list(x.shape) for x in xs]}")
    xs = [x if x.shape == shape else x.reshape(shape) for x in xs]
    if op == PROD:
        out = np.multiply(xs[0], xs[1])
        for x in xs[2:]:
            out *= x
        return out
    if op == MAX:
        out = np.array(xs[1], _F32, copy=True)
        np.copyto(out, xs[0], where=xs[0] > xs[1])
        for x in xs[2:]:
            np.copyto(out, x, where=x > out)
        return out
    c = [float(v) for v in coeff] or [1.0] * len(xs)
    if c[0] == 1 and c[1] == 1:  # the common residual sum: one pass
        out, start = np.add(xs[0], xs[1]), 2
    else:
        out, start = (np.multiply(xs[0], _F32(c[0])) if c[0] != 1 else np.array(xs[0], _F32, copy=True)), 1
    for x, ci in zip(xs[start:], c[start:], strict=True):
        if ci == 1:
            out += x
        elif ci == -1:
            out -= x
        else:
            out += _F32(ci) * x
    return out


def Axpy(a, x, y):
    """F = a * X + Y (SENet's Axpy): a (N, C) or (N, C, 1, 1), X and Y (N, C, ...)."""
    if x.ndim < 2 or x.shape != y.shape:
        raise ValueError(f"Axpy needs X and Y of one shape with >= 2 axes, got {list(x.shape)} and "
                         f"{list(y.shape)}")
    n, c = x.shape[:2]
    if (a.ndim < 2 or a.shape[:2] != (n, c) or a.size != n * c):
        raise ValueError(f"Axpy's scale must be (N, C) or (N, C, 1, 1) = ({n}, {c}), got {list(a.shape)}")
    out = np.multiply(x, np.asarray(a, _F32).reshape((n, c) + (1,) * (x.ndim - 2)))
    out += y
    return out


@register("Eltwise")
class EltwiseLayer(Layer):
    """Caffe's Eltwise layer (see :func:`Eltwise`); 2 or more bottoms, one top."""

    num_bottoms = (2, None)

    def __init__(self, lp, phase: int = TEST):
        super().__init__(lp, phase)
        p = lp.eltwise_param
        self.coeff = tuple(p.coeff)
        try:
            self.operation = _check_eltwise(len(lp.bottom), p.operation, self.coeff)
        except ValueError as e:
            raise GraphError(f"layer '{self.name}' (Eltwise): {e}") from None

    def reshape(self, bottom_shapes):
        counts = [int(np.prod(s, dtype=np.int64)) for s in bottom_shapes]
        if len(set(counts)) != 1:
            raise GraphError(f"layer '{self.name}' (Eltwise): bottoms of different sizes "
                             f"{[list(s) for s in bottom_shapes]}")
        return [tuple(bottom_shapes[0])]

    def forward(self, bottoms):
        return [Eltwise(*bottoms, operation=self.operation, coeff=self.coeff)]


@register("Axpy")
class AxpyLayer(Layer):
    """SENet's Axpy layer: bottoms (a, X, Y) -> a * X + Y (see :func:`Axpy`)."""

    num_bottoms = 3

    def reshape(self, bottom_shapes):
        a, x, y = (tuple(s) for s in bottom_shapes)
        ok = len(x) >= 2 and x == y and len(a) >= 2 and a[:2] == x[:2] and int(np.prod(a)) == x[0] * x[1]
        if not ok:
            raise GraphError(f"layer '{self.name}' (Axpy): needs a (N, C) or (N, C, 1, 1), X and Y "
                             f"(N, C, ...) of one shape; got {[list(s) for s in bottom_shapes]}")
        return [x]

    def forward(self, bottoms):
        return [Axpy(*bottoms)]
