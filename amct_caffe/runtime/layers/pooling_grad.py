"""Gradients of Pooling (``pooling_layer.cpp``'s ``Backward_cpu``), for (N, C, H, W) blobs.

* MAX: each output's diff goes to the input cell its window picked, ``mask`` (the flat index
  ``h*W + w`` in the plane, Caffe's ``max_idx_`` or the mask top), and adds up where windows
  overlap: ``dx[n, c].flat[mask[n, c, i]] += dy[n, c, i]``. Caffe keeps the first maximum of its
  row-major scan, so ties go to the first cell. A window that picked nothing (mask -1: every
  cell NaN or <= -FLT_MAX, or a window wholly past the input) makes Caffe write at plane index
  -1, i.e. the last cell of the previous plane; that is reproduced, except on the very first
  plane, where Caffe writes before its buffer (dropped here).
* AVE: ``dx[h, w] = sum over the windows covering (h, w) of dy / pool_size``, where
  ``pool_size`` counts the window clipped to the padded input (the forward's divisor) while
  the sum runs over the window clipped to the input.

In a net that runs MAX pooling backward, the forward keeps the argmax as Caffe keeps ``max_idx_``:
:func:`max_pool_argmax` (C++, ``csrc/src/max_pool.cpp``: Caffe's forward loop, one pass) gives the
pooled maxima and the flat plane indices, and :func:`argmax_backward` scatters the diffs along
them in Caffe's order (its previous-plane writes included). Without the extension, the argmax is
recomputed at backward time from the input (:func:`max_pool_backward`, their reference).

Caffe reads the mask top's *data* at backward time, as an index (``static_cast<int>``, toward
zero) from the start of each plane into the whole bottom diff. An in-place layer on the mask top
(a Scale, an activation) therefore moves where the diffs go, even into another plane:
:func:`rewritten_mask_backward` follows it.
"""

from __future__ import annotations

import math

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.runtime import threads

try:  # Caffe's MAX loops in C++ (csrc/src/max_pool.cpp); the NumPy functions below are their reference
    from amct_caffe._kernels import max_pool2d_argmax as MAX_POOL_KERNEL
    from amct_caffe._kernels import max_pool2d_backward as MAX_POOL_BACKWARD_KERNEL
except ImportError:
    MAX_POOL_KERNEL = MAX_POOL_BACKWARD_KERNEL = None

_FLT_MAX = np.float32(np.finfo(np.float32).max)
# Below this many values per pass the C++ loops run on one thread (starting more costs more).
THREADED_VALUES = 1 << 18


def _workers(values: int) -> int:
    return threads.workers() if values >= THREADED_VALUES else 1


def max_pool_argmax(x, k, s, p, out) -> tuple[np.ndarray, np.ndarray]:
    """MAX pooling of ``x`` (N, C, H, W) into ``out`` = (Ho, Wo) by Caffe's Forward_cpu loop (C++):
    the maxima (N, C, Ho, Wo) and the argmax as int32 flat plane indices (-1: the window picked
    nothing). Needs :data:`MAX_POOL_KERNEL`."""
    x = np.ascontiguousarray(x, np.float32)
    return MAX_POOL_KERNEL(x, list(k), list(s), list(p), list(out), _workers(x.size))


def argmax_backward(dy, argmax, in_hw, k, s, p) -> np.ndarray:
    """MAX pooling's bottom diff (N, C, *in_hw) from the forward's ``argmax`` (:func:`max_pool_argmax`):
    ``dx[n, c].flat[argmax] += dy`` in output order, empty windows on the previous plane's last cell."""
    dy = np.ascontiguousarray(dy, np.float32)
    return MAX_POOL_BACKWARD_KERNEL(dy, argmax, list(in_hw), list(k), list(s), list(p),
                                    _workers(dy.size + math.prod(dy.shape[:2]) * math.prod(in_hw)))


def global_max_mask(x) -> np.ndarray:
    """Caffe's argmax of a global MAX pooling, (N, C, 1, 1) flat plane indices.

    The first maximum of each plane; NaN never wins and a plane with no value above -FLT_MAX
    keeps -1, as Caffe's strict ``>`` against its -FLT_MAX start.
    """
    n, c = x.shape[:2]
    planes = x.reshape(n * c, -1)
    if np.isnan(planes).any():
        planes = np.where(np.isnan(planes), -np.inf, planes)
    idx = planes.argmax(axis=1)
    best = planes[np.arange(n * c), idx]
    return np.where(best > -_FLT_MAX, idx, -1).reshape(n, c, 1, 1)


def _previous_plane_writes(dx, dy, empty) -> None:
    """Caffe's write at plane index -1 for windows that picked nothing (see the module doc)."""
    n, c = dy.shape[:2]
    per_plane = np.where(empty, dy, np.float32(0)).reshape(n * c, -1).sum(axis=1, dtype=np.float32)
    flat = dx.reshape(n * c, -1)
    flat[:-1, -1] += per_plane[1:]


def global_max_backward(dy, mask, in_hw) -> np.ndarray:
    """Global MAX pooling's bottom diff: ``dy`` (N, C, 1, 1) at the flat plane index ``mask``."""
    n, c = dy.shape[:2]
    idx = np.asarray(mask).reshape(n * c).astype(np.int64)
    dyf = np.asarray(dy, np.float32).reshape(n * c)
    dx = np.zeros((n, c) + tuple(in_hw), np.float32)
    flat = dx.reshape(n * c, -1)
    ok = idx >= 0
    flat[np.flatnonzero(ok), idx[ok]] = dyf[ok]
    if not ok.all():
        _previous_plane_writes(dx, dy, ~ok.reshape(dy.shape))
    return dx


def _tap_ranges(k, s, p, size, n_out):
    """Per tap ``t < k``: (output slice, input slice) of the outputs whose window cell ``o*s - p + t``
    lies in ``[0, size)``, or None when there is none (the window clipped to the input)."""
    ranges = []
    for t in range(k):
        lo = max(0, -((t - p) // s))  # first o with o*s - p + t >= 0
        hi = min(n_out, (size - 1 + p - t) // s + 1)  # past the last o with o*s - p + t < size
        start = lo * s - p + t
        ranges.append((slice(lo, hi), slice(start, start + (hi - lo - 1) * s + 1, s)) if hi > lo else None)
    return ranges


def max_pool_backward(dy, x, y, k, s, p, mask=None) -> np.ndarray:
    """MAX pooling's bottom diff for ``dy`` (N, C, Ho, Wo) of the pooling of ``x`` (N, C, H, W).

    ``y``: the pooled maxima (the forward's top, -FLT_MAX for a window that picked nothing);
    ``mask``: Caffe's mask top (flat plane indices), when the layer has one. Each kernel tap, in
    Caffe's row-major scan order, takes the outputs it won: with a mask, those whose index is the
    tap's cell; without, those whose maximum it equals and no earlier tap took (Caffe keeps the
    first maximum). Its diffs are added onto the tap's strided view of the input (taps off the
    input are skipped per axis, so no padded copy and no index arrays are made).
    """
    dy = np.asarray(dy, np.float32)
    n, c, h, w = x.shape
    ho, wo = dy.shape[2:]
    dx = np.zeros(x.shape, np.float32)
    # Branch-free updates: numpy's masked (where=) operations are several times slower than plain
    # arithmetic on the unpredictable masks of real data.
    won = np.empty(dy.shape, bool)
    part = np.empty(dy.shape, np.float32)
    if mask is None:
        empty = ~(y > -_FLT_MAX)
        taken = empty.copy()  # a window that picked nothing gives no tap its diff
    else:
        mask = np.asarray(mask).astype(np.int64)
        empty = mask < 0
    all_ = (slice(None), slice(None))
    for i, ri in enumerate(_tap_ranges(k[0], s[0], p[0], h, ho)):
        for j, rj in enumerate(_tap_ranges(k[1], s[1], p[1], w, wo)):
            if ri is None or rj is None:
                continue
            out_sl, in_sl = all_ + (ri[0], rj[0]), all_ + (ri[1], rj[1])
            hit = won[out_sl]
            if mask is None:
                np.equal(x[in_sl], y[out_sl], out=hit)
                np.greater(hit, taken[out_sl], out=hit)  # equal and not taken by an earlier tap
                np.logical_or(taken[out_sl], hit, out=taken[out_sl])
            else:
                rows = (np.arange(ri[0].start, ri[0].stop) * s[0] - p[0] + i)[:, None]
                np.equal(mask[out_sl], rows * w + np.arange(rj[0].start, rj[0].stop) * s[1] - p[1] + j, out=hit)
            contrib = np.multiply(dy[out_sl], hit, out=part[out_sl])
            dst = dx[in_sl]
            np.add(dst, contrib, out=dst)
    if empty.any():
        _previous_plane_writes(dx, dy, empty)
    return dx


def _scatter_axis(g, axis, k, s, p, size) -> np.ndarray:
    """The transpose of pooling's clipped window sum along ``axis``: output ``o`` adds its value
    to inputs ``o*s - p + t`` (``t < k``) that lie in ``[0, size)``."""
    pre = (slice(None),) * axis
    out = np.zeros(g.shape[:axis] + (size,) + g.shape[axis + 1:], np.float32)
    for r in _tap_ranges(k, s, p, size, g.shape[axis]):
        if r is not None:
            out[pre + (r[1],)] += g[pre + (r[0],)]
    return out


def _divisor(size, k, s, p, n_out) -> np.ndarray:
    starts = np.arange(n_out) * s - p
    return (np.minimum(starts + k, size + p) - starts).astype(np.float32)


def ave_pool_backward(dy, in_hw, k, s, p) -> np.ndarray:
    """AVE pooling's bottom diff (see the module doc), separably: along H, then along W."""
    dy = np.asarray(dy, np.float32)
    ho, wo = dy.shape[2:]
    div = np.outer(_divisor(in_hw[0], k[0], s[0], p[0], ho), _divisor(in_hw[1], k[1], s[1], p[1], wo))
    with np.errstate(divide="ignore", invalid="ignore"):  # an empty window reaches no input cell
        g = dy / div
    g = _scatter_axis(g, 2, k[0], s[0], p[0], in_hw[0])
    return _scatter_axis(g, 3, k[1], s[1], p[1], in_hw[1])


def rewritten_mask_backward(dy, mask, x_shape, where: str) -> np.ndarray:
    """MAX pooling's bottom diff when its mask top no longer holds the forward's argmax.

    Caffe's loop, in its order (planes, then rows, then columns):
    ``dx.flat[plane * H * W + int(mask[plane, i])] += dy[plane, i]``. An index outside the bottom
    is a write out of Caffe's buffer, refused with a GraphError. That includes -1 on the first plane
    (a rewritten value in (-2, -1], e.g. an in-place MVN on the mask): the float lands on the high
    half of the malloc chunk's size field just before the buffer, and glibc aborts when the blob is
    freed ("double free or corruption (out)"; -2 hits the low half: "munmap_chunk(): invalid
    pointer"). Only the unrewritten mask's empty windows are dropped (:func:`max_pool_backward`).
    """
    n, c = dy.shape[:2]
    plane = int(x_shape[2]) * int(x_shape[3])
    m = np.asarray(mask, np.float64).reshape(n * c, -1)
    if not np.isfinite(m).all() or np.abs(m).max(initial=0) >= 2.0 ** 31:
        raise GraphError(f"{where}: its mask top, rewritten after the forward, holds a value that is no index "
                         "(NaN, infinite or beyond int range); Caffe's backward would write at an undefined place")
    idx = np.trunc(m).astype(np.int64) + (np.arange(n * c, dtype=np.int64) * plane)[:, None]
    idx = idx.ravel()
    dyf = np.asarray(dy, np.float32).ravel()
    total = n * c * plane
    if idx.size and (idx.min() < 0 or idx.max() >= total):
        bad = int(idx[(idx < 0) | (idx >= total)][0])
        raise GraphError(f"{where}: its mask top, rewritten after the forward, sends a diff to flat index {bad} "
                         f"of a bottom of {total} values; Caffe's backward writes out of its buffer there "
                         "(undefined behaviour)")
    dx = np.zeros(x_shape, np.float32)
    np.add.at(dx.reshape(-1), idx, dyf)  # float32 adds in Caffe's order
    return dx
