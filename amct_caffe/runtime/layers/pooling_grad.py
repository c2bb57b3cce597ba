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
"""

from __future__ import annotations

import numpy as np

_FLT_MAX = np.float32(np.finfo(np.float32).max)


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


def max_pool_backward(dy, mask, in_hw) -> np.ndarray:
    """Scatter ``dy`` (N, C, Ho, Wo) onto (N, C, *in_hw) at the flat plane indices ``mask``."""
    n, c = dy.shape[:2]
    plane = in_hw[0] * in_hw[1]
    idx = np.asarray(mask).reshape(n * c, -1).astype(np.int64)
    idx += (np.arange(n * c, dtype=np.int64) * plane)[:, None]
    idx = idx.ravel()
    w = np.asarray(dy, np.float32).ravel()
    keep = idx >= 0
    if not keep.all():
        idx, w = idx[keep], w[keep]
    # bincount sums the colliding contributions (overlapping windows) in float64
    return np.bincount(idx, weights=w, minlength=n * c * plane).astype(np.float32).reshape((n, c) + tuple(in_hw))


def _scatter_axis(g, axis, k, s, p, size) -> np.ndarray:
    """The transpose of pooling's clipped window sum along ``axis``: output ``o`` adds its value
    to inputs ``o*s - p + t`` (``t < k``) that lie in ``[0, size)``."""
    n_out = g.shape[axis]
    pre = (slice(None),) * axis
    out = np.zeros(g.shape[:axis] + (size,) + g.shape[axis + 1:], np.float32)
    for t in range(k):
        lo = max(0, -((t - p) // s))  # first o with o*s - p + t >= 0
        hi = min(n_out, (size - 1 + p - t) // s + 1)  # past the last o with o*s - p + t < size
        if hi > lo:
            start = lo * s - p + t
            out[pre + (slice(start, start + (hi - lo - 1) * s + 1, s),)] += g[pre + (slice(lo, hi),)]
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
