"""Local response normalization (``src/caffe/layers/lrn_layer.cpp``): forward and backward.

For x (N, C, H, W), ``n = local_size`` (odd) and a centred, zero-padded window ``W``:

* ACROSS_CHANNELS: ``s = k + alpha/n * sum_{c' in W(c)} x_c'^2`` (a window of n channels);
* WITHIN_CHANNEL: ``s = 1 + alpha/n^2 * sum_{n x n window W(h, w)} x^2`` (Caffe's AVE pooling of x^2
  with pad (n-1)/2 and stride 1, whose divisor is always n^2; ``k`` is unused);

and ``y = x * s^-beta``. The window is symmetric, so its transpose is itself, and

    dx = dy * s^-beta - (2 * alpha * beta / m) * x * sum_W(dy * y / s)      (m = n, or n^2 within)

ACROSS is Caffe's CrossChannelBackward_cpu; WITHIN is what its chain of internal layers
(Split, Power 2, AVE Pooling, Power, Eltwise PROD) back-propagates.
"""

from __future__ import annotations

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.io import TEST
from amct_caffe.ops import register
from amct_caffe.runtime import threads
from amct_caffe.runtime.layer import Layer

try:  # csrc/src/lrn.cpp: ACROSS_CHANNELS in Caffe's running-sum arithmetic (fused saxpy steps, glibc's powf)
    from amct_caffe._kernels import lrn_across as LRN_ACROSS_KERNEL
except ImportError:  # a checkout without the compiled module: window sums, an ulp or so off Caffe's
    LRN_ACROSS_KERNEL = None

_F32 = np.float32
_THREADED_LRN = 1 << 16  # values from which the images are split between the free cores
_QUIET = {"over": "ignore", "invalid": "ignore", "divide": "ignore"}


def _window_sum(a, size: int, axis: int):
    """Sum of ``a`` over a centred window of ``size`` along ``axis``, zero padded (size odd)."""
    pad = (size - 1) // 2
    n = a.shape[axis]
    widths = [(0, 0)] * a.ndim
    widths[axis] = (pad, pad)
    padded = np.pad(a, widths)

    def tap(k):
        index = [slice(None)] * a.ndim
        index[axis] = slice(k, k + n)
        return padded[tuple(index)]

    out = tap(0).copy()
    for k in range(1, size):  # one add per tap, like a small convolution
        out += tap(k)
    return out


def _within(norm_region) -> bool:
    return norm_region in (1, "WITHIN_CHANNEL")


def _region_sum(a, local_size: int, norm_region):
    """``sum_W a``: over n channels (ACROSS) or an n x n spatial window (WITHIN)."""
    if _within(norm_region):
        return _window_sum(_window_sum(a, local_size, 2), local_size, 3)
    return _window_sum(a, local_size, 1)


def lrn_scale(x, local_size=5, alpha=1.0, norm_region=0, k=1.0):
    """The denominator base ``s`` of the module doc (Caffe's ``scale_`` for ACROSS)."""
    if local_size % 2 != 1:
        raise ValueError(f"LRN only supports odd values for local_size, got {local_size}")
    if x.ndim != 4:
        raise ValueError(f"LRN needs a 4-D (num, channels, height, width) bottom, got shape {list(x.shape)}")
    s = _region_sum(np.square(x), local_size, norm_region)
    if _within(norm_region):
        s *= _F32(alpha) / _F32(local_size * local_size)
        s += _F32(1)
    else:
        s *= _F32(alpha) / _F32(local_size)
        s += _F32(k)
    return s


def within_channel(x, local_size: int, alpha: float, beta: float):
    """WITHIN_CHANNEL as Caffe's LRN layer runs it, through its internal layers: Power 2 (glibc's powf), AVE
    pooling with pad (n-1)/2 and stride 1 (taps summed in order, divided by n^2), Power with scale alpha and
    shift 1 then powf(., -beta), Eltwise PROD with x. Returns (y, s), s = 1 + alpha * the average (for the
    backward)."""
    from amct_caffe.runtime.layers.activation import Power
    from amct_caffe.runtime.layers.pooling import AVE, Pooling

    pre = (local_size - 1) // 2
    pooled = Pooling(Power(np.asarray(x, _F32), 2.0), pool=AVE, kernel=(local_size, local_size), stride=(1, 1),
                     pad=(pre, pre))
    with np.errstate(**_QUIET):
        s = np.multiply(pooled, _F32(alpha))
        s += _F32(1)
    return np.multiply(x, Power(s, -beta)), s


def lrn_forward(x, local_size=5, alpha=1.0, beta=0.75, norm_region=0, k=1.0):
    """``(y, s)``: the LRN of x (N, C, H, W) and its base ``s`` (Caffe's ``scale_``, kept for the backward), in
    Caffe's arithmetic: ACROSS by the C++ running sum, WITHIN by Caffe's internal layers (:func:`within_channel`);
    without the compiled module, ACROSS by window sums (an ulp or so off)."""
    x = np.asarray(x, _F32)
    if local_size % 2 != 1:
        raise ValueError(f"LRN only supports odd values for local_size, got {local_size}")
    if x.ndim == 4 and _within(norm_region):
        return within_channel(x, local_size, alpha, beta)
    if x.ndim == 4 and LRN_ACROSS_KERNEL is not None:
        # (alpha_ / size_ in float, as Caffe computes it)
        return LRN_ACROSS_KERNEL(np.ascontiguousarray(x), local_size, _F32(alpha) / _F32(local_size), beta, k,
                                 threads.workers() if x.size >= _THREADED_LRN else 1)
    s = lrn_scale(x, local_size, alpha, norm_region, k)
    with np.errstate(**_QUIET):
        y = np.power(s, _F32(-beta))
    y *= x
    return y, s


def LRN(x, local_size=5, alpha=1.0, beta=0.75, norm_region=0, k=1.0):  # noqa: N802 - Caffe type name
    """Local response normalization of x (N, C, H, W): ``y = x * s^-beta`` (see the module doc)."""
    return lrn_forward(x, local_size, alpha, beta, norm_region, k)[0]


def lrn_backward(dy, x, y, s, local_size=5, alpha=1.0, beta=0.75, norm_region=0):
    """``dx`` of the module doc for top diff ``dy``, bottom ``x``, top ``y`` and base ``s``.

    For ACROSS, Caffe reads ``x`` and ``y`` from the blobs at backward time and ``s`` from the
    forward; WITHIN's internal layers read ``x`` from the blob and ``s^-beta`` from the forward,
    so ``y`` there is ``x * s^-beta`` (the same unless the layer ran in place).
    """
    dy = np.asarray(dy, np.float32)
    with np.errstate(**_QUIET):
        p = np.power(s, _F32(-beta))
        if _within(norm_region):
            y = x * p
        ratio = dy * y / s
    m = local_size * local_size if _within(norm_region) else local_size
    acc = _region_sum(ratio, local_size, norm_region)
    acc *= x
    acc *= _F32(2.0 * alpha * beta / m)
    dx = dy * p
    dx -= acc
    return dx


@register("LRN")
class LRNLayer(Layer):
    """Caffe's LRN layer (see :func:`LRN`)."""

    @classmethod
    def in_place_fault(cls, lp) -> str:
        # ACROSS_CHANNELS writes scale^-beta into the top and then multiplies it by the bottom, the same memory
        if lp.lrn_param.norm_region == lp.lrn_param.ACROSS_CHANNELS:
            return "Caffe's ACROSS_CHANNELS LRN overwrites its input before it multiplies by it (scale^-2beta)"
        return ""

    def __init__(self, lp, phase: int = TEST):
        super().__init__(lp, phase)
        p = lp.lrn_param
        if p.local_size % 2 != 1:
            raise GraphError(f"layer '{self.name}' (LRN): local_size must be odd, got {p.local_size}")
        self.kwargs = dict(local_size=p.local_size, alpha=p.alpha, beta=p.beta, norm_region=p.norm_region,
                           k=p.k)
        self._scale = None

    def reshape(self, bottom_shapes):
        if len(bottom_shapes[0]) != 4:
            raise GraphError(f"layer '{self.name}' (LRN): the bottom must have 4 axes (num, channels, "
                             f"height, width), it has shape {list(bottom_shapes[0])}")
        return [tuple(bottom_shapes[0])]

    def forward(self, bottoms):
        # the base is kept for backward like Caffe's scale_ / internal blobs (in place, the input is gone by then)
        y, self._scale = lrn_forward(bottoms[0], **self.kwargs)
        return [y]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """Caffe's LRNLayer::Backward_cpu (see :func:`lrn_backward`)."""
        if not propagate_down[0]:
            return [None]
        kw = self.kwargs
        return [lrn_backward(top_diffs[0], bottoms[0], tops[0], self._scale, kw["local_size"], kw["alpha"],
                             kw["beta"], kw["norm_region"])]
