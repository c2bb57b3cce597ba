"""Caffe's Deconvolution (``src/caffe/layers/deconv_layer.cpp``), the transpose of a convolution.

x ``(N, C, *in)``, weight ``(C, O/g, *k)`` -> ``(N, O, *out)`` with
``out = stride*(in-1) + dilation*(k-1)+1 - 2*pad``; ``ypad[n, o, i*stride + t*dilation] += w[c, o, t] * x[n, c, i]``,
then the border ``pad`` is cropped. The layer class is :class:`.conv.DeconvolutionLayer`.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from amct_caffe.runtime import threads
from amct_caffe.runtime.layers import caffe_gemm
from amct_caffe.runtime.layers.conv_cols import per_axis, scratch, tap_slices

try:  # Caffe's col2im_cpu in one C++ pass (a 2-D deconvolution's forward is a convolution's input gradient)
    from amct_caffe._kernels import col2im_2d as COL2IM_KERNEL
except ImportError:  # a checkout without the compiled module: one strided NumPy add per tap
    COL2IM_KERNEL = None


THREADED_COL2IM = 1 << 16  # column values from which col2im runs on the free cores


def deconv_out_size(size: int, k: int, stride: int, pad: int, dilation: int) -> int:
    return stride * (size - 1) + dilation * (k - 1) + 1 - 2 * pad


def Deconvolution(x, weight, bias=None, *, stride=1, pad=0, dilation=1, group=1):  # noqa: N802
    """Caffe deconvolution of ``x`` (N, C, *in) by ``weight`` (C, O/group, *k); see the module doc."""
    x = np.asarray(x, np.float32)
    weight = np.asarray(weight, np.float32)
    n, c = x.shape[:2]
    sp = x.shape[2:]
    nsp = len(sp)
    ksz = weight.shape[2:]
    o = weight.shape[1] * group
    stride, pad, dilation = per_axis(stride, nsp, 1), per_axis(pad, nsp, 0), per_axis(dilation, nsp, 1)
    if weight.shape[0] != c or c % group:
        raise ValueError(f"weight {weight.shape} does not fit {c} input channels in {group} group(s)")
    out = tuple(deconv_out_size(s, k, st, p, d)
                for s, k, st, p, d in zip(sp, ksz, stride, pad, dilation, strict=True))
    if min(out, default=1) < 0:
        raise ValueError(f"deconvolution output size {list(out)} is negative: input {sp}, kernel {ksz}")
    if 0 in out or 0 in sp:  # an empty top, or an empty bottom (nothing to scatter)
        y = np.zeros((n, o) + out, np.float32)
        if bias is not None:
            y += np.asarray(bias, np.float32).reshape((o,) + (1,) * nsp)
        return y
    cg, og = c // group, o // group
    # cols[n, g, (o', t), i] = sum_c w[g, c, (o', t)] * x[n, g, c, i]  (col2im input)
    wt = np.ascontiguousarray(weight.reshape(group, cg, og * math.prod(ksz)).transpose(0, 2, 1))
    xg = np.ascontiguousarray(x).reshape(n, group, cg, -1)
    direct = all(k == 1 for k in ksz) and stride == (1,) * nsp and not any(pad)
    # Caffe: cblas_sgemm(Trans, NoTrans, og * prod(k), prod(in), cg) per image and group; summed
    # through caffe_gemm so that the result does not depend on the BLAS thread count.
    caffe_mnk = (og * math.prod(ksz), xg.shape[-1], cg)
    if direct:  # 1x1, stride 1, no crop: the GEMM result is the output
        y = caffe_gemm.matmul(wt, xg, caffe_mnk).reshape((n, o) + tuple(sp))
    else:
        cols = scratch("cols", (n, group, og * math.prod(ksz), xg.shape[-1]))
        caffe_gemm.matmul(wt, xg, caffe_mnk, out=cols)
        if COL2IM_KERNEL is not None and nsp == 2:  # the same sums, in the same order (tap by tap per cell)
            y = np.empty((n, o) + out, np.float32)
            COL2IM_KERNEL(cols, y, list(ksz), list(stride), list(pad), list(dilation), list(sp), False,
                          threads.workers() if cols.size >= THREADED_COL2IM else 1)
        else:
            y = _col2im(cols, n, o, ksz, sp, out, stride, pad, dilation)
    if bias is not None:
        y += np.asarray(bias, np.float32).reshape((o,) + (1,) * nsp)
    return y


def _col2im(cols, n: int, o: int, ksz, sp, out, stride, pad, dilation) -> np.ndarray:
    """The output (N, O, *out) from the columns (N, O * prod(k), prod(in)): one strided add per tap."""
    cols = cols.reshape((n, o) + tuple(ksz) + tuple(sp))
    full = tuple(e + 2 * p for e, p in zip(out, pad, strict=True))
    yp = np.zeros((n, o) + full, np.float32) if not any(pad) else scratch("pad", (n, o) + full)
    if any(pad):
        yp.fill(0.0)
    for tap in itertools.product(*map(range, ksz)):
        yp[(slice(None), slice(None)) + tap_slices(tap, stride, dilation, sp)] += cols[
            (slice(None), slice(None)) + tap]
    if not any(pad):
        return yp
    return yp[(slice(None), slice(None)) + tuple(slice(p, p + e) for p, e in zip(pad, out, strict=True))].copy()
