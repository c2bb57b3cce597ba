"""Exact integer arithmetic for a deploy model's INT8 layers (the executor's integer simulation).

A deploy model's Convolution / InnerProduct hold int8 weights and int32 biases and read
activation codes of up to 16 bits. Their int32 accumulators exceed 2**24, where float32 stops
being exact, so these layers compute in float64 (exact below 2**53) on a plain im2col path.
Speed matters less here than exactness: it is the reference the SoC's results are compared with.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def conv2d_exact(x: np.ndarray, weight: np.ndarray, bias, stride, pad, dilation, group: int) -> np.ndarray:
    """Caffe 2-D convolution of ``x`` (N, C, H, W) by ``weight`` (O, C/group, kh, kw) in float64.

    Returns float64 (N, O, Ho, Wo) holding the exact integer sums for integer inputs.
    """
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilation
    o, cg, kh, kw = weight.shape
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    # Caffe's output size divides with C's truncation toward zero, so a kernel longer than the padded
    # input still gives one output row (im2col reads the missing rows as zeros): pad up to it.
    h, w_ = x.shape[2] + 2 * ph, x.shape[3] + 2 * pw
    ho, wo = int((h - eh) / sh) + 1, int((w_ - ew) / sw) + 1
    extra_h, extra_w = max(0, (ho - 1) * sh + eh - h), max(0, (wo - 1) * sw + ew - w_)
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (ph, ph + extra_h), (pw, pw + extra_w)))
    n, c = x.shape[:2]
    win = sliding_window_view(x, (eh, ew), axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]  # N C Ho Wo kh kw
    ho, wo = win.shape[2:4]
    w = np.asarray(weight, np.float64).reshape(group, o // group, cg, kh, kw)
    win = win.reshape(n, group, cg, ho, wo, kh, kw)
    y = np.einsum("ngchwij,gocij->ngohw", win, w, optimize=True).reshape(n, o, ho, wo)
    if bias is not None:
        y += np.asarray(bias, np.float64).reshape(1, o, 1, 1)
    return y


def inner_product_exact(x: np.ndarray, weight: np.ndarray, bias, axis: int, transpose: bool) -> np.ndarray:
    """Caffe InnerProduct in float64: ``x`` flattened from ``axis`` times ``weight`` (O, K) or (K, O)."""
    lead = x.shape[:axis]
    flat = np.asarray(x, np.float64).reshape(int(np.prod(lead, dtype=np.int64)), -1)
    w = np.asarray(weight, np.float64)
    y = flat @ (w if transpose else w.T)
    if bias is not None:
        y += np.asarray(bias, np.float64).reshape(1, -1)
    return y.reshape(lead + (y.shape[1],))
