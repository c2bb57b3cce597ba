"""Backward of the element-wise activations (Caffe's ``NeuronLayer::Backward_cpu`` family).

One function per layer type, ``<Type>_grad(dy, x, y, **params) -> dx``, with the parameters
of the forward function of :mod:`.activation`. ``x`` and ``y`` are the bottom and top data as
Caffe holds them at backward time: for an in-place layer ``x`` *is* ``y`` (the input was
overwritten), and each formula reads the array Caffe's does, so in-place results agree with
Caffe's even where Caffe's in-place gradient is not the derivative (Power with a shift, ReLU
with a negative slope < 0). Nothing is modified in place; every result is a new float32 array.
Masks multiply as 0/1 factors, as Caffe's bool-to-float terms do (``np.where`` is several
times slower).
"""

from __future__ import annotations

import numpy as np
from amct_caffe.runtime.layers.libm_float import expf, logf, powf

_F32 = np.float32
_QUIET = {"over": "ignore", "under": "ignore", "invalid": "ignore", "divide": "ignore"}
# bnll_layer.cpp's kBNLL_THRESHOLD: exp is evaluated at min(x, 50)
_BNLL_THRESHOLD = _F32(50)


def ReLU_grad(dy, x, y, negative_slope=0.0):  # noqa: N802, ARG001 - Caffe type name; y unused
    """dx = dy * ((x > 0) + negative_slope * (x <= 0))."""
    pos = np.greater(x, _F32(0))
    if negative_slope == 0:
        return np.multiply(dy, pos)
    factor = np.multiply(~pos, _F32(negative_slope))
    factor += pos
    factor *= dy
    return factor


def ReLU6_grad(dy, x, y, negative_slope=0.0, threshold=6.0):  # noqa: N802, ARG001
    """dx = dy * ((x > 0) + negative_slope * (x <= 0)) * (x < threshold)."""
    dx = ReLU_grad(dy, x, y, negative_slope)
    dx *= np.less(x, _F32(threshold))
    return dx


def Clip_grad(dy, x, y, min, max):  # noqa: N802, A002, ARG001 - ClipParameter field names
    """dx = dy * (min <= x <= max)  (BVLC master's clip_layer).

    In place x is the clipped top, always within the bounds: Caffe then passes dy through.
    """
    inside = np.greater_equal(x, _F32(min))
    inside &= np.less_equal(x, _F32(max))
    return np.multiply(dy, inside)


def Sigmoid_grad(dy, x, y):  # noqa: N802, ARG001
    """dx = dy * y * (1 - y), from the top alone, as sigmoid_layer.cpp rounds it: ``dy * y`` in float, then
    times ``1. - y`` in double (a double literal), rounded once."""
    dx = np.multiply(dy, y).astype(np.float64)
    dx *= 1.0 - np.asarray(y, np.float64)
    return dx.astype(_F32)


def TanH_grad(dy, x, y):  # noqa: N802, ARG001
    """dx = dy * (1 - y^2), from the top alone."""
    dx = np.square(y)
    np.subtract(_F32(1), dx, out=dx)
    dx *= dy
    return dx


def Swish_grad(dy, x, y, beta=1.0):  # noqa: N802
    """dx = dy * (beta * y + s * (1 - beta * y)), s = sigmoid(beta * x)  (BVLC master).

    ``x`` must be the forward's input (Caffe keeps ``s`` from the forward for in-place use);
    s is evaluated as 0.5 * tanh(0.5 * beta * x) + 0.5, as the forward does.
    """
    s = np.multiply(x, _F32(0.5 * beta))
    np.tanh(s, out=s)
    s *= _F32(0.5)
    s += _F32(0.5)
    by = np.multiply(y, _F32(beta))
    dx = np.subtract(_F32(1), by)
    dx *= s
    dx += by
    dx *= dy
    return dx


def ELU_grad(dy, x, y, alpha=1.0):  # noqa: N802
    """dx = dy * ((x > 0) + (alpha + y) * (x <= 0))."""
    pos = np.greater(x, _F32(0))
    factor = np.add(y, _F32(alpha))
    factor *= ~pos
    factor += pos
    factor *= dy
    return factor


def AbsVal_grad(dy, x, y):  # noqa: N802, ARG001
    """dx = dy * sign(x)  (caffe_cpu_sign: sign(0) = 0)."""
    return np.multiply(np.sign(x), dy)


def BNLL_grad(dy, x, y):  # noqa: N802, ARG001
    """dx = dy * e / (e + 1), e = expf(min(x, 50)), as bnll_layer.cpp rounds it: ``dy * e`` in float, the
    division by ``e + 1.`` in double (a double literal), rounded once."""
    e = expf(np.minimum(x, _BNLL_THRESHOLD))
    with np.errstate(invalid="ignore"):
        dx = np.multiply(dy, e).astype(np.float64)
        dx /= e.astype(np.float64) + 1.0
    return dx.astype(_F32)


def Power_grad(dy, x, y, power=1.0, scale=1.0, shift=0.0):  # noqa: N802
    """dx = dy * power * scale * (shift + scale * x)^(power - 1), in Caffe's forms.

    With d = power * scale: d == 0 gives 0 everywhere and power == 1 gives dy * d; power 2
    gives dy * (d * scale * x + d * shift); no shift gives dy * power * y / x; otherwise
    dy * d * y / (shift + scale * x). The forms using y read the top, so an in-place Power
    reproduces Caffe's (then inexact) gradient.
    """
    power, scale, shift = _F32(power), _F32(scale), _F32(shift)
    d = power * scale
    if d == 0:
        return np.zeros(dy.shape, _F32)
    if power == 1:
        return np.multiply(dy, d)
    with np.errstate(**_QUIET):
        if power == 2:
            dx = np.multiply(x, d * scale)
            if shift != 0:
                dx += d * shift
        elif shift == 0:
            dx = np.divide(y, x)
            dx *= power
        else:
            dx = np.multiply(x, scale) if scale != 1 else np.array(x, _F32, copy=True)
            dx += shift
            np.divide(y, dx, out=dx)
            if d != 1:
                dx *= d
        dx *= dy
    return dx


def _log_base(base) -> np.float32:
    return _F32(1) if base == -1 else logf(np.asarray(_F32(base)))[()]  # Caffe's log(Dtype): logf


def Exp_grad(dy, x, y, base=-1.0, scale=1.0, shift=0.0):  # noqa: N802, ARG001
    """dx = dy * y * ln(base) * scale, from the top alone."""
    inner = _log_base(base) * _F32(scale)
    dx = np.multiply(y, dy)
    if inner != 1:
        dx *= inner
    return dx


def Log_grad(dy, x, y, base=-1.0, scale=1.0, shift=0.0):  # noqa: N802, ARG001
    """dx = dy * (scale / ln(base)) / (shift + scale * x)."""
    with np.errstate(**_QUIET):
        dx = np.multiply(x, _F32(scale)) if scale != 1 else np.array(x, _F32, copy=True)
        if shift != 0:
            dx += _F32(shift)
        dx = powf(dx, -1.0)  # caffe_powx(x, -1): glibc's powf, not always the correctly rounded reciprocal
        num = _F32(scale) / _log_base(base)
        if num != 1:
            dx *= num
        dx *= dy
    return dx


def PReLU_grads(dy, x, slope, channel_shared, want_x=True, want_slope=True):
    """(dx, dslope) of y = max(x, 0) + a_c * min(x, 0), x (N, C, ...), a (C,) or shared.

    dx = dy * ((x > 0) + a_c * (x <= 0)); dslope_c = sum over N and the spatial axes of
    dy * x * (x <= 0) (summed over C too when the slope is shared). ``x`` is the forward's
    input: Caffe's PReLU keeps a copy for in-place use.
    """
    neg = np.less_equal(x, _F32(0))
    dx = dslope = None
    if want_slope:
        t = np.multiply(dy, x)
        t *= neg
        if channel_shared:
            dslope = np.sum(t, dtype=_F32).reshape(np.shape(slope))
        else:
            t = t.reshape(t.shape[0], t.shape[1], -1)
            dslope = t.sum(axis=(0, 2), dtype=_F32)
    if want_x:
        a = np.asarray(slope, _F32)
        a = a.reshape(()) if channel_shared else a.reshape((-1,) + (1,) * (x.ndim - 2))
        dx = np.multiply(neg, a)
        dx += ~neg
        dx *= dy
    return dx, dslope


def Dropout_grad(dy, keep, scale):  # noqa: N802
    """dx = dy * mask * scale with the forward's mask (TRAIN); in TEST the mask is None: dx = dy."""
    if keep is None:
        return dy if scale == 1 else np.multiply(dy, _F32(scale))
    dx = np.multiply(dy, keep)  # Caffe's order: top_diff * mask * scale
    if scale != 1:
        dx *= _F32(scale)
    return dx
