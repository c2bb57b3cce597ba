"""Weight math of BN fusion: pure NumPy functions, no graph, no protobuf.

Every folder rewrites a layer ``y = W * x + b`` (a convolution, deconvolution or inner
product whose output channel ``o`` is produced by the weights ``W[o]``) followed by a per-channel
affine map ``z[o] = a[o] * y[o] + c[o]`` into one layer with

    W'[o] = a[o] * W[o]        b'[o] = a[o] * b[o] + c[o]

Which axis of ``W`` holds the output channel depends on the layer (``out_axis``):

=============================  =====================  ========  ==============================
layer                          weight shape           out_axis  output channel of W[i, j, ...]
=============================  =====================  ========  ==============================
Convolution (any group)        (O, C/g, *kernel)      0         i
Deconvolution, group g         (C, O/g, *kernel)      1         (i // (C/g)) * (O/g) + j
InnerProduct                   (O, K)                 0         i
InnerProduct, transpose: true  (K, O)                 1         j
=============================  =====================  ========  ==============================

Deconvolution with ``g > 1``: input channels are split into g blocks of C/g, and block ``k`` of
the weight produces output channels ``k*(O/g) .. (k+1)*(O/g) - 1``; ``group`` tells the folder so.

The arithmetic runs in float64 and the results are cast back to the weight's dtype.
"""

from __future__ import annotations

import numpy as np

from amct_caffe.ops import WeightLayout


def _vector(a, name: str, size: int | None = None) -> np.ndarray:
    """A flat float64 copy of a per-channel blob (legacy 4-D blobs such as (1, 1, 1, C) included)."""
    v = np.asarray(a, dtype=np.float64).ravel()
    if size is not None and v.size != size:
        raise ValueError(f"{name} has {v.size} values but the layer has {size} output channels")
    return v


def out_channels(w_shape, out_axis: int, group: int = 1) -> int:
    """Number of output channels of a weight of shape ``w_shape`` (see the module table)."""
    if out_axis not in (0, 1):
        raise ValueError(f"out_axis must be 0 or 1, got {out_axis}")
    return WeightLayout(out_axis, int(group)).out_channels(w_shape)


def scale_out_channels(w: np.ndarray, a, out_axis: int, group: int = 1) -> np.ndarray:
    """``W'`` with every output channel ``o`` multiplied by ``a[o]`` (float64 result).

    ``w``: weight as in the module table; ``a``: (O,). With ``out_axis == 1`` and ``group > 1``
    (grouped Deconvolution) the weight is viewed as (g, C/g, O/g, *kernel) and ``a`` as
    (g, 1, O/g, 1, ...).
    """
    w = np.asarray(w, dtype=np.float64)
    n_out = out_channels(w.shape, out_axis, group)
    a = _vector(a, "the per-channel factor", n_out)
    tail = (1,) * (w.ndim - out_axis - 1)
    if out_axis == 0:
        return w * a.reshape((n_out, *tail))
    if group == 1:
        return w * a.reshape((1, n_out, *tail))
    if w.shape[0] % group:
        raise ValueError(f"weight axis 0 ({w.shape[0]}) is not a multiple of group {group}")
    blocks = w.reshape((group, w.shape[0] // group, *w.shape[1:]))
    return (blocks * a.reshape((group, 1, n_out // group, *tail))).reshape(w.shape)


def fold_affine(w: np.ndarray, b, a, c, out_axis: int, group: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``z = a * y + c`` (per output channel) into ``y = W * x + b``.

    Returns ``(a[o] * W[o], a * b + c)`` with W's dtype and layout; ``b`` None means zeros,
    ``c`` None means zeros. ``a``, ``b``, ``c``: (O,).
    """
    n_out = out_channels(np.shape(w), out_axis, group)
    a = _vector(a, "the per-channel factor", n_out)
    b = np.zeros(n_out) if b is None else _vector(b, "the bias", n_out)
    c = np.zeros(n_out) if c is None else _vector(c, "the per-channel offset", n_out)
    dtype = np.asarray(w).dtype
    return scale_out_channels(w, a, out_axis, group).astype(dtype), (a * b + c).astype(dtype)


def batchnorm_affine(mean, var, scale_factor, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Caffe BatchNorm (use_global_stats) as ``z = a * y + c``.

    Caffe stores the *sums* of the moving averages: blob 0 = mean * f, blob 1 = var * f and
    blob 2 = [f], the moving-average factor. Forward divides blobs 0 and 1 by f, and a factor of 0
    makes the statistics 0, not NaN (``batch_norm_layer.cpp``: ``scale_factor = blobs_[2] == 0 ?
    0 : 1 / blobs_[2]``). Then ``z = (y - m) / sqrt(v + eps)``, so

        s = 0 if f == 0 else 1 / f;   m = mean * s;   v = var * s
        a = 1 / sqrt(v + eps);        c = -m * a

    ``mean``, ``var``: (C,); ``scale_factor``: f, the raw value of blob 2 (a scalar or (1,)).
    """
    f = float(np.asarray(scale_factor, dtype=np.float64).ravel()[0])
    s = 0.0 if f == 0 else 1.0 / f
    mean = _vector(mean, "the BatchNorm mean") * s
    var = _vector(var, "the BatchNorm variance", mean.size) * s
    denominator = var + float(eps)
    bad = np.flatnonzero(~(denominator > 0))
    if bad.size:  # Caffe would compute NaN / inf outputs; folded, they would be NaN / inf weights
        c = int(bad[0])
        raise ValueError(f"its variance + eps is {denominator[c]:g} in channel {c} ({bad.size} channel(s) not "
                         f"positive: variance blob {var[c] / s if s else var[c]:g}, moving-average factor {f:g}, "
                         f"eps {float(eps):g}); its statistics are corrupt")
    a = 1.0 / np.sqrt(denominator)
    return a, -mean * a


def fold_batchnorm(w, b, mean, var, scale_factor, eps: float, out_axis: int,
                   group: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Fold a following Caffe BatchNorm into ``(w, b)``; see :func:`batchnorm_affine` for the math.

    ``w``: weight (module table); ``b``: (O,) or None (no bias yet); ``mean``, ``var``: (O,);
    ``scale_factor``: BatchNorm blob 2 (the moving-average factor f, not 1/f); ``eps``:
    ``batch_norm_param.eps``. Returns ``(w', b')``: ``w' = w * a`` per output channel and
    ``b' = (b - m) * a`` with ``a = 1 / sqrt(v + eps)``.
    """
    a, c = batchnorm_affine(mean, var, scale_factor, eps)
    return fold_affine(w, b, a, c, out_axis, group)


def fold_scale(w, b, gamma, beta, out_axis: int, group: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Fold a following channel-axis Scale ``z = gamma * y (+ beta)`` into ``(w, b)``.

    ``gamma``: (O,); ``beta``: (O,) or None (Scale without bias_term). Returns
    ``(w * gamma per output channel, b * gamma + beta)``.
    """
    return fold_affine(w, b, gamma, beta, out_axis, group)


def fold_bias(b, beta) -> np.ndarray:
    """Fold a following channel-axis Bias ``z = y + beta`` into the bias: ``b + beta`` (b None = 0).

    ``b``, ``beta``: (O,). The weights do not change.
    """
    beta_v = _vector(beta, "the Bias layer's bias")
    b_v = np.zeros(beta_v.size) if b is None else _vector(b, "the bias", beta_v.size)
    dtype = np.asarray(beta).dtype if b is None else np.asarray(b).dtype
    return (b_v + beta_v).astype(dtype)
