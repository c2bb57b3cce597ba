"""glibc's float math as Caffe's CPU layers get it: ``libm_f32`` (expf, logf, powf), ``expf`` and ``tanhf``.

``tanhf`` (and the ``expm1f`` it calls) is vectorised, rounding step for step.

Caffe's TanH layer calls ``tanh(float)``, glibc's ``tanhf``. Up to glibc 2.40 that is the Sun
fdlibm algorithm (``sysdeps/ieee754/flt-32/s_tanhf.c`` on ``s_expm1f.c``) in float arithmetic,
which is not correctly rounded: NumPy's ``tanh`` (and ``tanh`` in double rounded to float) differs
from it by an ulp in a good part of the values. The recurrent layers chain a TanH per time step, so
those ulps would spread; here the same float32 operations run in the same order (no FMA: glibc's
generic x86-64 build has no FMA variant of these two).

    expm1f(x): x = k ln2 + r (hi - lo, Cody-Waite with ln2_hi, ln2_lo), then the rational
               approximation of fdlibm with Q1..Q5 and the reconstruction by 2^k
    tanhf(x) = sign(x) * (1 - 2 / (expm1f(2|x|) + 2))   |x| >= 1
               sign(x) * (-t / (t + 2)), t = expm1f(-2|x|)  |x| < 1
               sign(x) * 1 (rounded)                     |x| >= 22

``expf`` is glibc's own (``sysdeps/ieee754/flt-32/e_expf.c``, since glibc 2.27), for the one place
where :func:`libm_f32`'s near-half-ulp cases compound: the LSTM's gates, whose sigmoid takes
``expf`` at every time step (an ulp at step 3 of a 28-step LSTM grew to 1e-6 by the last step).
In double: ``k = rint(x 32 / ln 2)``, ``r = x 32 / ln 2 - k``, ``2^(k/32)`` from a table of
``2^(j/32)`` (j = 0..31, correctly rounded) scaled by ``2^(k // 32)``, times the cubic
``C0 r^3 + C1 r^2 + C2 r + 1`` evaluated as glibc does, rounded once to float. glibc's x86-64
FMA variant contracts the cubic's multiply-adds; the double results differ by an ulp at most, which
the rounding to float hides but at two of the 2^32 float32 inputs (0x1.04845ep+5 and -0x1.f8cbb2p+5,
an ulp below glibc 2.36's FMA build). The C++ port (``csrc/src/libm_float.cpp``) fuses the steps as that
build does (read from its disassembly: the reduction and the three polynomial steps) and equals it on all
2^32 inputs; :func:`expf` runs it (a few ns a value), :func:`expf_reference` is the NumPy steps.
"""

from __future__ import annotations

from decimal import Decimal, localcontext

import numpy as np

from amct_caffe.runtime import threads

try:
    from amct_caffe import _kernels
except ImportError:  # a checkout without the compiled module: the NumPy steps below
    _kernels = None
# (each looked up on its own: a module built from older sources lacks the newer ones)
SIGMOID_KERNEL, BNLL_KERNEL, EXPF_KERNEL, LOGF_KERNEL, POWF_KERNEL, TANHF_KERNEL = (
    getattr(_kernels, name, None) for name in ("caffe_sigmoid", "caffe_bnll", "expf", "logf", "powf", "tanhf"))

_F32 = np.float32
_LN2_HI = _F32(6.9313812256e-01)   # 0x3f317180
_LN2_LO = _F32(9.0580006145e-06)   # 0x3717f7d1
_INVLN2 = _F32(1.4426950216e+00)   # 0x3fb8aa3b
_Q = [_F32(v) for v in (-3.3333335072e-02, 1.5873016091e-03, -7.9365076090e-05, 4.0082177293e-06,
                        -2.0109921195e-07)]
_ONE, _TWO, _HALF = _F32(1), _F32(2), _F32(0.5)
_QUIET = {"over": "ignore", "under": "ignore", "invalid": "ignore", "divide": "ignore"}

_EXP2F_BITS = 5                                                      # EXP2F_TABLE_BITS: N = 32
_EXPF_INVLN2N = float.fromhex("0x1.71547652b82fep+0") * 32
_EXPF_C = (float.fromhex("0x1.c6af84b912394p-5") / 32 ** 3, float.fromhex("0x1.ebfce50fac4f3p-3") / 32 ** 2,
           float.fromhex("0x1.62e42ff0c52d6p-1") / 32)
_EXPF_OVERFLOW = float.fromhex("0x1.62e42ep6")                      # above: inf
_EXPF_UNDERFLOW = -float.fromhex("0x1.9fe368p6")                    # below: 0


def _exp2_table() -> np.ndarray:
    """glibc's ``__exp2f_data.tab``: the bits of ``2^(j/32)`` (correctly rounded), less ``j << 47``,
    j = 0..31, so that adding ``k << 47`` gives the bits of ``2^(k/32)``."""
    with localcontext() as ctx:
        ctx.prec = 40
        powers = np.array([float(Decimal(2) ** (Decimal(j) / 32)) for j in range(1 << _EXP2F_BITS)])
    return powers.view(np.int64) - (np.arange(1 << _EXP2F_BITS, dtype=np.int64) << (52 - _EXP2F_BITS))


_EXP2_TABLE = _exp2_table()


def libm_f32(fn, *args) -> np.ndarray:
    """``fn`` (np.exp, np.log, np.power) of float32 ``args`` as glibc's expf / logf / powf give it.

    Caffe's caffe_exp / caffe_log and its scalar exp(), log(), pow() of a float call glibc's
    float functions, which evaluate in double and round once: evaluating in float64 and
    rounding to float32 gives the same value but in near-half-ulp cases (about 6 in 1e4 random
    values for exp, 5 in 1e3 for log, an ulp apart). numpy's own float32 exp and log are SIMD
    approximations that differ from glibc by an ulp in about 40% and 15-20% of values; an ulp
    matters downstream of an ill-conditioned layer (a log near 1, then its in-place backward
    squaring 1 / log).
    """
    with np.errstate(**_QUIET):
        return np.asarray(fn(*(np.asarray(a, np.float64) for a in args))).astype(_F32)


def expf(x: np.ndarray) -> np.ndarray:
    """glibc's ``expf`` of a float32 array, bit for bit (see the module doc): the C++ port, else
    :func:`expf_reference`."""
    if EXPF_KERNEL is None:
        return expf_reference(x)
    shape = np.shape(x)  # (ascontiguousarray makes a 0-d input 1-d)
    x = np.ascontiguousarray(x, _F32)
    return EXPF_KERNEL(x, threads.workers()).reshape(shape)  # (the kernel splits from 2^16 values on)


def powf(x: np.ndarray, exponent) -> np.ndarray:
    """glibc's ``powf(x, exponent)`` of a float32 array, as Caffe's ``caffe_powx`` calls it (the machine's
    libm through the C++ module; without it :func:`libm_f32`, an ulp off in rare near-half-ulp cases)."""
    x = np.asarray(x, _F32)
    if POWF_KERNEL is None:
        return libm_f32(np.power, x, np.full(x.shape, exponent, _F32))
    return POWF_KERNEL(np.ascontiguousarray(x), float(_F32(exponent)), threads.workers()).reshape(x.shape)


def logf(x: np.ndarray) -> np.ndarray:
    """glibc's ``logf`` of a float32 array, as Caffe's ``caffe_log`` calls it (see :func:`powf`)."""
    x = np.asarray(x, _F32)
    if LOGF_KERNEL is None:
        return libm_f32(np.log, x)
    return LOGF_KERNEL(np.ascontiguousarray(x), threads.workers()).reshape(x.shape)


def caffe_sigmoid(x: np.ndarray) -> np.ndarray:
    """Caffe's CPU ``sigmoid<float>`` (sigmoid_layer.cpp, lstm_unit_layer.cpp): ``1. / (1. + expf(-x))``, glibc's
    expf rounded to float, the sum and the division in double, one rounding to float at the end."""
    x = np.asarray(x, _F32)
    if SIGMOID_KERNEL is not None:  # the same steps in one C++ pass
        return SIGMOID_KERNEL(np.ascontiguousarray(x), threads.workers()).reshape(x.shape)
    with np.errstate(**_QUIET):
        e = expf(-x)  # float inf beyond 88.7: the quotient is then 0
        return (1.0 / (1.0 + e.astype(np.float64))).astype(_F32)


def caffe_bnll(x: np.ndarray) -> np.ndarray:
    """Caffe's BNLL (bnll_layer.cpp): ``x > 0 ? x + log(1. + expf(-x)) : log(1. + expf(x))``, glibc's expf
    rounded to float, the rest in double (its literal is a double), rounded once."""
    x = np.asarray(x, _F32)
    if BNLL_KERNEL is not None:  # the same steps in one C++ pass
        return BNLL_KERNEL(np.ascontiguousarray(x), threads.workers()).reshape(x.shape)
    with np.errstate(**_QUIET):
        out = np.log(1.0 + expf(-np.abs(x)).astype(np.float64))
        out = np.where(x > 0, x.astype(np.float64) + out, out)
    return np.asarray(out.astype(_F32)).reshape(x.shape)


def expf_reference(x: np.ndarray) -> np.ndarray:
    """glibc's ``expf`` of a float32 array in NumPy (see the module doc)."""
    x = np.asarray(x, _F32)
    c0, c1, c2 = _EXPF_C
    with np.errstate(**_QUIET):
        xd = np.clip(x, _EXPF_UNDERFLOW - 1, _EXPF_OVERFLOW + 1, dtype=np.float64)  # NaN stays NaN
        z = xd * _EXPF_INVLN2N
        kd = np.rint(z)                  # glibc: (z + 0x1.8p52) - 0x1.8p52, ties to even
        r = z - kd
        k = kd.astype(np.int64)
        s = (np.take(_EXP2_TABLE, k & 31) + (k << (52 - _EXP2F_BITS))).view(np.float64)   # 2^(k/32)
        y = (c0 * r + c1) * (r * r) + (c2 * r + 1.0)
        out = np.asarray((y * s).astype(_F32))
    out[x > _EXPF_OVERFLOW] = np.inf
    out[x < _EXPF_UNDERFLOW] = 0
    nan = np.isnan(x)
    out[nan] = x[nan]
    return out


def _bits(x: np.ndarray) -> np.ndarray:
    return x.view(np.int32)


def _scale_exp(y: np.ndarray, k: np.ndarray) -> np.ndarray:
    """SET_FLOAT_WORD(y, GET_FLOAT_WORD(y) + (k << 23)): add k to y's exponent."""
    return (_bits(y) + (k.astype(np.int32) << 23)).view(_F32)


def expm1f(x: np.ndarray) -> np.ndarray:
    """glibc's ``expm1f`` for finite ``|x| < 27 ln2`` or negative ``x`` (what :func:`tanhf` passes)."""
    x = np.asarray(x, _F32)
    hx = _bits(x) & 0x7FFFFFFF
    neg = x < 0
    out = np.empty_like(x)
    big_neg = neg & (hx >= 0x4195B844)            # x < -27 ln2: -1
    out[big_neg] = _F32(1e-30) - _ONE
    tiny = hx < 0x33000000                         # |x| < 2^-25: x
    out[tiny] = x[tiny]
    todo = ~(big_neg | tiny)
    xs, negs, hxs_ = x[todo], neg[todo], hx[todo]
    k = np.zeros(xs.shape, np.int32)
    hi = xs.copy()
    lo = np.zeros_like(xs)
    near = (hxs_ > 0x3EB17218) & (hxs_ < 0x3F851592)   # 0.5 ln2 < |x| < 1.5 ln2: k = +-1
    far = hxs_ >= 0x3F851592
    hi[near] = np.where(negs[near], xs[near] + _LN2_HI, xs[near] - _LN2_HI)
    lo[near] = np.where(negs[near], -_LN2_LO, _LN2_LO)
    k[near] = np.where(negs[near], -1, 1)
    kf = (_INVLN2 * xs[far] + np.where(negs[far], _F32(-0.5), _F32(0.5))).astype(np.int32)  # C truncation
    t = kf.astype(_F32)
    hi[far] = xs[far] - t * _LN2_HI
    lo[far] = t * _LN2_LO
    k[far] = kf
    reduced = near | far
    r = np.where(reduced, hi - lo, xs)
    c = np.where(reduced, (hi - r) - lo, _F32(0))
    hfx = _HALF * r
    hxs = r * hfx
    r1 = _ONE + hxs * (_Q[0] + hxs * (_Q[1] + hxs * (_Q[2] + hxs * (_Q[3] + hxs * _Q[4]))))
    t = _F32(3) - r1 * hfx
    e = hxs * ((r1 - t) / (_F32(6) - r * t))
    res = r - (r * e - hxs)                        # k == 0
    e = r * (e - c) - c
    e = e - hxs
    res = np.where(k == -1, _HALF * (r - e) - _HALF, res)
    k1 = np.where(r < _F32(-0.25), -_TWO * (e - (r + _HALF)), _ONE + _TWO * (r - e))
    res = np.where(k == 1, k1, res)
    wide = (k <= -2) | (k > 56)
    y = _ONE - (e - r)
    res = np.where(wide, _scale_exp(y, np.where(wide, k, 0)) - _ONE, res)
    mid = (k >= 2) & (k < 23)
    tk = (np.int32(0x3F800000) - (np.int32(0x1000000) >> np.clip(k, 0, 31))).view(_F32)  # 1 - 2^-k
    y = tk - (e - r)
    res = np.where(mid, _scale_exp(y, np.where(mid, k, 0)), res)
    high = (k >= 23) & (k <= 56)
    tk = ((np.int32(0x7F) - np.clip(k, 0, 127)) << 23).view(_F32)                          # 2^-k
    y = r - (e + tk)
    y = y + _ONE
    res = np.where(high, _scale_exp(y, np.where(high, k, 0)), res)
    out[todo] = res
    return out


def tanhf(x: np.ndarray) -> np.ndarray:
    """glibc's ``tanhf`` of a float32 array (see the module doc): the C++ port of the same
    algorithm (``csrc/src/libm_float.cpp``, about 100 times faster), else :func:`tanhf_reference`."""
    if TANHF_KERNEL is None:
        return tanhf_reference(x)
    return TANHF_KERNEL(np.ascontiguousarray(x, _F32), threads.workers())


def tanhf_reference(x: np.ndarray) -> np.ndarray:
    """glibc's ``tanhf`` of a float32 array in NumPy, step for step (see the module doc)."""
    x = np.asarray(x, _F32)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        ax = np.abs(x)
        hx = _bits(ax)
        ge1 = hx >= 0x3F800000
        t = expm1f(np.where(ge1, _TWO * ax, -_TWO * ax))
        z = np.where(ge1, _ONE - _TWO / (t + _TWO), -t / (t + _TWO))
        z = np.where(hx >= 0x41B00000, _ONE - _F32(1e-30), z)     # |x| >= 22 (and inf)
        out = np.where(x < 0, -z, z).astype(_F32)
        out = np.where(hx < 0x24000000, x * (_ONE + x), out)      # |x| < 2^-55, signed zeros kept
        return np.where(np.isnan(x), x, out)
