"""BatchNorm on batch statistics (TRAIN) as Caffe's CPU code sums: its BLAS calls, made on numpy's OpenBLAS.

``BatchNormLayer<float>::Forward_cpu`` / ``Backward_cpu`` with ``use_global_stats`` false take every
per-channel sum by two ``caffe_cpu_gemv`` calls against vectors of ones (over the spatial axis, then over the
batch), broadcast per-channel values back by ``caffe_cpu_gemm`` with K = 1, and update the moving averages
by ``caffe_cpu_axpby`` (``cblas_sscal`` then ``cblas_saxpy``, whose kernel fuses the multiply-add). The sums
of an sgemv follow its kernel's blocking, not the values in turn, so float64 sums (or NumPy's pairwise ones)
round otherwise: about 1e-7 of a channel's values, which on a deep net flips a ReLU's mask here and there and
moves its gradients by up to 1e-2..0.5 relative. Here each call is Caffe's, in Caffe's order, through
:mod:`.cblas`; ``caffe_powx`` is glibc's powf (:mod:`.libm_float`).

The sgemv calls are split as Caffe's multi-threaded OpenBLAS splits them (:func:`.cblas.caffe_cpu_gemv`), so
the result does not depend on this process's thread count.

Checked against real Caffe (one BatchNorm in TRAIN, 2-D / 4-D / 5-D inputs, N = 1, 1x1 maps, channel means
up to 1e6 times their spread): top, the three blobs and the bottom diff bit for bit in 560 of 560 cases with
the matching thread count. Where numpy's OpenBLAS is not reachable, :func:`available` is False and the layer
keeps its float64 sums.
"""

from __future__ import annotations

import numpy as np

from amct_caffe.runtime.layers import caffe_gemm, cblas
from amct_caffe.runtime.layers.libm_float import powf

_F32 = np.float32
_ROW_MAJOR, _NO_TRANS = cblas._ROW_MAJOR, cblas._NO_TRANS  # noqa: SLF001 - the CBLAS enums cblas.py calls with


def gemv(trans: bool, m: int, n: int, alpha: float, a: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """``caffe_cpu_gemv`` on the thread count Caffe's GEMMs are taken to run on (caffe_gemm.py)."""
    cblas.caffe_cpu_gemv(trans, m, n, alpha, a, x, y, caffe_gemm.gemm_config().threads)


def _routines():
    return (cblas._cblas("sgemv", "eeiifpipifpi"), cblas._cblas("sgemm", "eeeiiifpipifpi"),  # noqa: SLF001
            cblas._cblas("sscal", "ifpi"), cblas._cblas("saxpy", "ifpipi"))  # noqa: SLF001


def available() -> bool:
    """Whether numpy's OpenBLAS routines can be called (cblas.py)."""
    return all(fn is not None for fn in _routines())


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _gemm_k1(m: int, n: int, alpha: float, a: np.ndarray, b: np.ndarray, beta: float, c: np.ndarray) -> None:
    """``caffe_cpu_gemm(NoTrans, NoTrans, m, n, 1, alpha, a, b, beta, c)``: the outer product a b^T into c."""
    _routines()[1](_ROW_MAJOR, _NO_TRANS, _NO_TRANS, m, n, 1, float(_F32(alpha)), _ptr(a), 1, _ptr(b), n,
                   float(_F32(beta)), _ptr(c), n)


def _axpby(alpha, x: np.ndarray, beta, y: np.ndarray) -> None:
    """``caffe_cpu_axpby``: y = beta * y (sscal), then y += alpha * x (saxpy), in place."""
    _, _, sscal, saxpy = _routines()
    sscal(y.size, float(_F32(beta)), _ptr(y), 1)
    saxpy(y.size, float(_F32(alpha)), _ptr(x), 1, _ptr(y), 1)


def _dims(shape) -> tuple[int, int, int]:
    num = int(shape[0])
    channels = 1 if len(shape) == 1 else int(shape[1])
    return num, channels, int(np.prod(shape)) // (num * channels)


def _channel_means(values: np.ndarray, num: int, channels: int, spatial: int, scale: float,
                   ones_spatial: np.ndarray, ones_num: np.ndarray) -> np.ndarray:
    """Caffe's two gemv calls: per (image, channel) sums over the map times ``scale``, then over the batch."""
    per_image = np.zeros(num * channels, _F32)  # (zeros: a kernel's beta of 0 may scale what it finds)
    gemv(False, num * channels, spatial, scale, values, ones_spatial, per_image)
    out = np.zeros(channels, _F32)
    gemv(True, num, channels, 1.0, per_image, ones_num, out)
    return out


def _broadcast(values: np.ndarray, num: int, channels: int, spatial: int, alpha: float, beta: float,
               ones_spatial: np.ndarray, ones_num: np.ndarray, into: np.ndarray) -> None:
    """into = beta * into + alpha * (the per-channel ``values`` repeated over images and maps), by Caffe's two
    K = 1 GEMMs."""
    per_image = np.zeros(num * channels, _F32)
    _gemm_k1(num, channels, 1.0, ones_num, values, 0.0, per_image)
    _gemm_k1(num * channels, spatial, alpha, per_image, ones_spatial, beta, into)


def forward(x: np.ndarray, mean_acc: np.ndarray, var_acc: np.ndarray, factor: np.ndarray, fraction, eps):
    """Forward_cpu on batch statistics: ``(top, temp, std)``, temp the (x-shaped) sqrt(var + eps) the backward
    divides by, std its (C,) values. ``mean_acc``, ``var_acc`` (C,) and ``factor`` (1,) float32 are updated in
    place as Caffe's blobs: factor = factor * f + 1, mean_acc = f * mean_acc + batch mean, var_acc = f * var_acc
    + m / (m - 1) * batch variance, m = count / C."""
    x = np.ascontiguousarray(x, _F32)
    num, channels, spatial = _dims(x.shape)
    ones_spatial, ones_num = np.ones(spatial, _F32), np.ones(num, _F32)
    scale = 1.0 / (num * spatial)
    top = x.copy().reshape(-1)
    mean = _channel_means(x, num, channels, spatial, scale, ones_spatial, ones_num)
    _broadcast(mean, num, channels, spatial, -1.0, 1.0, ones_spatial, ones_num, top)  # top = x - mean
    temp = np.ascontiguousarray(powf(top, 2), _F32)
    variance = _channel_means(temp, num, channels, spatial, scale, ones_spatial, ones_num)
    f = _F32(fraction)
    factor[0] = _F32(_F32(factor[0] * f) + _F32(1))
    _axpby(1.0, mean, f, mean_acc)
    m = x.size // channels
    _axpby(_F32(m) / _F32(m - 1) if m > 1 else _F32(1), variance, f, var_acc)
    variance += _F32(eps)
    std = np.ascontiguousarray(powf(variance, 0.5), _F32)
    _broadcast(std, num, channels, spatial, 1.0, 0.0, ones_spatial, ones_num, temp)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        np.divide(top, temp, out=top)
    return top.reshape(x.shape), temp.reshape(x.shape), std


def backward(dy: np.ndarray, x_norm: np.ndarray, temp: np.ndarray) -> np.ndarray:
    """Backward_cpu on batch statistics: dx = (dy - mean(dy) - y * mean(dy * y)) / temp, in Caffe's calls."""
    dy = np.ascontiguousarray(dy, _F32)
    num, channels, spatial = _dims(dy.shape)
    ones_spatial, ones_num = np.ones(spatial, _F32), np.ones(num, _F32)
    y = np.ascontiguousarray(x_norm, _F32).reshape(-1)
    dx = np.multiply(y, dy.reshape(-1))
    sums = _channel_means(dx, num, channels, spatial, 1.0, ones_spatial, ones_num)  # sum(dy * y)
    _broadcast(sums, num, channels, spatial, 1.0, 0.0, ones_spatial, ones_num, dx)
    np.multiply(y, dx, out=dx)
    sums = _channel_means(dy, num, channels, spatial, 1.0, ones_spatial, ones_num)  # sum(dy)
    _broadcast(sums, num, channels, spatial, 1.0, 1.0, ones_spatial, ones_num, dx)
    _axpby(_F32(1), dy.reshape(-1), _F32(-1.0 / (num * spatial)), dx)  # dy - dx / M
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        np.divide(dx, np.ascontiguousarray(temp, _F32).reshape(-1), out=dx)
    return dx.reshape(dy.shape)
