"""Element-wise combination of several blobs: Eltwise (PROD / SUM / MAX) and Axpy.

Reference functions are named after the layer types, keyword defaults as in caffe.proto; they
never modify their inputs. Backward follows eltwise_layer.cpp and SENet's axpy_layer.cpp.
"""

from __future__ import annotations

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.io import TEST
from amct_caffe.ops import register
from amct_caffe.runtime import threads
from amct_caffe.runtime.layer import Layer

try:
    from amct_caffe import _kernels
except ImportError:  # a checkout without the compiled module: NumPy's masked copies and float64 sums
    _kernels = None
GREATER_SELECT_KERNEL = getattr(_kernels, "greater_select", None)
FUSED_AXPY_KERNEL = getattr(_kernels, "fused_axpy", None)

_F32 = np.float32
PROD, SUM, MAX = 0, 1, 2  # EltwiseParameter.EltwiseOp numbers
_OPS = {"PROD": PROD, "SUM": SUM, "MAX": MAX}
_THREADED_SELECT = 1 << 18  # values from which MAX's select runs on the free cores


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
        if GREATER_SELECT_KERNEL is not None and all(x.dtype == _F32 for x in xs):
            workers = threads.workers() if xs[0].size >= _THREADED_SELECT else 1
            out = GREATER_SELECT_KERNEL(np.ascontiguousarray(xs[0]), np.ascontiguousarray(xs[1]), workers)
            for x in xs[2:]:
                GREATER_SELECT_KERNEL(np.ascontiguousarray(x), out, workers, out)
            return out.reshape(shape)  # (ascontiguousarray makes 0-d blobs 1-d)
        out = np.array(xs[1], _F32, copy=True)
        np.copyto(out, xs[0], where=xs[0] > xs[1])
        for x in xs[2:]:
            np.copyto(out, x, where=x > out)
        return out
    c = [float(_F32(v)) for v in coeff] or [1.0] * len(xs)
    general = any(ci not in (0.0, 1.0, -1.0) for ci in c)
    if general and FUSED_AXPY_KERNEL is not None:  # Caffe's saxpy steps themselves, one fused pass per term
        return _weighted_sum(xs, c, shape, fused=True)
    out = _weighted_sum(xs, c, shape, fused=False)
    if general and not np.isfinite(out).all():
        out = _weighted_sum(xs, c, shape, fused=True)  # an overflow: its infinities as Caffe's FMAs give them
    return out


def _weighted_sum(xs, c, shape, fused: bool) -> np.ndarray:
    """sum_i c_i * x_i as Caffe's saxpy calls add it: a coefficient 0 skips the term (inf / NaN included), 1 and
    -1 add and subtract. With ``fused`` each other term is a fused multiply-add, one rounding per term (exact in
    float64, a float32 product fitting its 53 bits, then rounded: 2 * 3e38 - 2 * 3e38 is inf, not NaN; the C++
    kernel's fused multiply-adds, where it is built, round exactly as Caffe's saxpy does); else
    the product is rounded first (a pass less; an ulp apart, or where terms cancel the product's rounding error,
    about 1e-8, which Caffe's FMA keeps)."""
    if fused and FUSED_AXPY_KERNEL is not None:  # zeros, then one saxpy per term: Caffe's steps and roundings
        out = np.zeros(shape, _F32)
        workers = threads.workers() if out.size >= _THREADED_SELECT else 1
        for x, ci in zip(xs, c, strict=True):
            if ci != 0:
                FUSED_AXPY_KERNEL(ci, np.ascontiguousarray(x, _F32).reshape(shape), out, workers)
        return out
    if c[0] == 1 and c[1] == 1:  # the common residual sum: one pass
        out, start = np.add(xs[0], xs[1]), 2
    elif c[0] == 0:
        out, start = np.zeros(shape, _F32), 1
    else:  # Caffe's first saxpy onto zeros: the product rounded once
        out, start = (np.multiply(xs[0], _F32(c[0])) if c[0] != 1 else np.array(xs[0], _F32, copy=True)), 1
    for x, ci in zip(xs[start:], c[start:], strict=True):
        if ci == 1:
            out += x
        elif ci == -1:
            out -= x
        elif ci != 0 and not fused:
            out += _F32(ci) * x
        elif ci != 0:
            total = x.astype(np.float64)
            total *= ci
            total += out
            with np.errstate(over="ignore"):
                out[...] = total
    return out


def max_index(xs) -> np.ndarray:
    """Caffe's max_idx_ of an Eltwise MAX: which bottom gave each top element.

    The same comparisons as the forward: 0 where x0 > x1 else 1, then i where x_i > the
    running maximum (so ties and NaNs go where the forward took their value from).
    """
    first = xs[0] > xs[1]
    idx = np.logical_not(first).view(np.int8)  # 0 where x0 won, else 1
    if len(xs) == 2:
        return idx
    idx = idx.astype(np.int32)
    top = np.where(first, xs[0], xs[1])
    for i, x in enumerate(xs[2:], 2):
        later = x > top
        idx[later] = i
        top = np.where(later, x, top)
    return idx


def Eltwise_grad(dy, xs, y, i, operation=SUM, coeff=(), stable_prod_grad=True, max_idx=None,  # noqa: N802
                 aliased=False):
    """d loss / d x_i of :func:`Eltwise` given the top diff ``dy`` (all arrays of one shape).

    SUM: dx_i = coeff_i * dy. PROD: dx_i = dy * g with g = prod_{j != i} x_j
    (``stable_prod_grad``, in bottom order) or g = y / x_i. MAX: dx_i = dy where ``max_idx``
    (:func:`max_index`) is i, else 0. ``xs`` and ``y`` are the data Caffe reads at backward time
    (in place, that bottom's data is y). ``aliased``: bottom i is the top (in place), so its
    diff is the top diff's buffer, which Caffe's PROD fills with g before multiplying by the
    top diff: dx_i = g * g (SUM and MAX read each element before writing it: unaffected).
    """
    if operation == SUM:
        c = _F32(coeff[i]) if len(coeff) else _F32(1)
        return dy if c == 1 else np.multiply(dy, c)
    if operation == MAX:
        return np.multiply(dy, max_idx == i)
    if stable_prod_grad:
        others = [x for j, x in enumerate(xs) if j != i]
        dx = np.array(others[0], _F32, copy=True)
        for x in others[1:]:
            dx *= x
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            dx = np.divide(y, xs[i])
    dx *= dx if aliased else dy
    return dx


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
        # the backward routes MAX by the forward's argmax (Caffe's max_idx_); the bottoms are never
        # modified in place, so keeping them is enough (an in-place top replaces, not overwrites)
        self._inputs = list(bottoms)
        if self.in_place and self.operation != PROD:
            # Caffe's forward first fills the top, which in place is bottom 0, with 0 (SUM) or
            # -FLT_MAX (MAX) and only then reads the bottoms: bottom 0 counts as that value
            # (PROD multiplies bottoms 0 and 1 element by element before writing: unaffected)
            fill = 0 if self.operation == SUM else -np.finfo(_F32).max
            self._inputs[0] = np.full(bottoms[0].shape, fill, _F32)
        return [Eltwise(*self._inputs, operation=self.operation, coeff=self.coeff)]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """See :func:`Eltwise_grad`; each bottom gets its own array (or None when not asked).

        In place (top == bottom 0, the only in-place form Caffe's Net accepts), Caffe's loop over
        the bottoms writes bottom 0's diff into the top diff's buffer: the bottoms after it
        then read that result as their top diff.
        """
        dy = top_diffs[0]
        xs = [b if b.shape == dy.shape else b.reshape(dy.shape) for b in bottoms]
        idx = None
        if self.operation == MAX and any(propagate_down):
            idx = max_index([x.reshape(dy.shape) for x in self._inputs])
        stable = self.lp.eltwise_param.stable_prod_grad
        alias = 0 if self.in_place else None
        out = []
        for i, pd in enumerate(propagate_down):
            if not pd:
                out.append(None)
                continue
            out.append(Eltwise_grad(dy, xs, tops[0], i, self.operation, self.coeff, stable, idx, aliased=i == alias))
            if i == alias:
                dy = out[-1]
        return out


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

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """da_nc = sum_s dF_ncs * X_ncs, dX = a * dF, dY = dF.

        SENet's axpy_layer.cpp computes dX under ``propagate_down[0]`` (a typo for [1]); with
        every bottom propagating, the usual case, this is the same gradient.
        """
        a, x, _ = bottoms
        dy = top_diffs[0]
        n, c = x.shape[:2]
        da = dx = None
        if propagate_down[0]:
            da = np.einsum("ncs,ncs->nc", dy.reshape(n, c, -1), x.reshape(n, c, -1)).reshape(a.shape)
        if propagate_down[1]:
            dx = np.multiply(dy, a.reshape((n, c) + (1,) * (x.ndim - 2)))
        return [da, dx, dy if propagate_down[2] else None]
