"""Per-channel sums of ``(outer, C, inner)`` float32 arrays, accumulated in float64 (BatchNorm, Scale
and Bias backward), and BatchNorm's batch-statistics backward, in C++ where the extension is built.

``channel_sums(a, b)`` gives ``(sum_a, sum_ab)``, both (C,) float64:

    sum_a[c]  = sum over outer, inner of a[o, c, i]
    sum_ab[c] = sum over outer, inner of fl32(a[o, c, i] * b[o, c, i])

without materialising the product. The C++ loop (``csrc/src/channel_ops.cpp``) adds in a fixed
order (eight partial sums per run), so its bytes do not depend on the thread count; they may
differ from NumPy's pairwise float64 sum in a double's last bits, which the float32 results
almost never show. The NumPy expressions are the fallback and the reference.
"""

from __future__ import annotations

import numpy as np

from amct_caffe.runtime import threads

try:  # csrc/src/channel_ops.cpp
    from amct_caffe._kernels import batch_norm_backward as BN_BACKWARD_KERNEL
    from amct_caffe._kernels import channel_sums as CHANNEL_SUMS_KERNEL
except ImportError:
    BN_BACKWARD_KERNEL = CHANNEL_SUMS_KERNEL = None

# Below this many values the C++ loops run on one thread (starting more costs more).
THREADED_VALUES = 1 << 18


def _workers(values: int) -> int:
    return threads.workers() if values >= THREADED_VALUES else 1


def _as3(a, shape3) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).reshape(shape3)


def channel_sums(a, b=None, shape3=None) -> tuple[np.ndarray, np.ndarray | None]:
    """(sum_a, sum_ab or None) per channel of ``a`` (and ``b``) viewed as ``shape3`` = (outer, C, inner)
    (default: axis 1 of ``a`` is the channel axis)."""
    if shape3 is None:
        shape3 = (a.shape[0], 1 if a.ndim == 1 else a.shape[1], -1)
    a3 = _as3(a, shape3)
    b3 = None if b is None else _as3(b, a3.shape)
    if CHANNEL_SUMS_KERNEL is not None:
        return CHANNEL_SUMS_KERNEL(a3, b3, _workers(a3.size))
    sum_ab = None if b3 is None else np.multiply(a3, b3).sum(axis=(0, 2), dtype=np.float64)
    return a3.sum(axis=(0, 2), dtype=np.float64), sum_ab


def batch_norm_backward_batch_stats(dy, x_norm, std) -> np.ndarray:
    """dL/dx of y = (x - mean) / std with the batch's mean and variance (see batch_norm.py):
    ``dx = (dy - (x_norm * sum(dy * x_norm) + sum(dy)) * (1/M)) / std``, each operation in float32
    as the NumPy expression; the sums per channel (float64, rounded to float32), M = count / C."""
    shape3 = (dy.shape[0], 1 if dy.ndim == 1 else dy.shape[1], -1)
    m = dy.size // std.size
    inv_m = np.float32(1.0 / m)
    s_dy, s_dyx = channel_sums(dy, x_norm, shape3)
    s_dy, s_dyx = s_dy.astype(np.float32), s_dyx.astype(np.float32)
    std = np.ascontiguousarray(std, np.float32).reshape(-1)
    if BN_BACKWARD_KERNEL is not None:
        d3, x3 = _as3(dy, shape3), _as3(x_norm, shape3)
        return BN_BACKWARD_KERNEL(d3, x3, std, s_dy, s_dyx, float(inv_m), _workers(d3.size)).reshape(dy.shape)
    per_channel = (1, -1) + (1,) * max(dy.ndim - 2, 0) if dy.ndim > 1 else (-1,)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        acc = np.multiply(x_norm, s_dyx.reshape(per_channel))
        acc += s_dy.reshape(per_channel)
        dx = dy - acc * inv_m
        dx /= std.reshape(per_channel)
    return dx
