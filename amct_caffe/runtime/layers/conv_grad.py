"""Gradients of Convolution and Deconvolution (Caffe's ``BaseConvolutionLayer`` backward GEMMs).

With ``S`` spatial axes, a convolution of ``a`` (N, Ca, *sa) by ``w`` (Ob, Ca/g, *k) gives
``b`` (N, Ob, *sb); per image and group Caffe computes, on the columns ``cols = im2col(a)``
(``K = Ca/g * prod(k)`` rows, ``P = prod(sb)`` columns):

* ``weight_cpu_gemm``:   dW[g] (Ob/g x K)  += db[n, g] (Ob/g x P) @ cols[n, g]^T (P x K)
* ``backward_cpu_gemm``: dcols[n, g] (K x P) = W[g]^T (K x Ob/g) @ db[n, g] (Ob/g x P), then
  ``col2im`` adds every column entry back onto the input cell it was read from (cells of the
  zero padding, and those past the padded input that C's truncating output size lets the last
  window reach, are dropped);
* ``backward_cpu_bias``: dbias[o] += sum_{n, p} db[n, o, p].

Convolution uses them with ``a = x``, ``b = y``; Deconvolution (a transposed convolution: its
forward *is* ``backward_cpu_gemm``) swaps the roles, ``a = dY`` and ``b = x``: its weight gradient
is ``weight_cpu_gemm(dY, x)`` and its bottom gradient the convolution forward of ``dY``.

Speed: the images are laid side by side (``(g, K, n*P)`` columns, the ``batch_last`` layout of
:func:`conv_cols.im2col`) in chunks of about ``GRAD_COLS_BUDGET`` floats, so each chunk is one GEMM
per group instead of one per image; ``col2im`` is one strided add per kernel tap.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from amct_caffe.runtime.layers.conv_cols import im2col, scratch, tap_slices

# Columns of this many floats (32 MB) at most are built at once; a larger block than the
# forward's keeps the (Ob/g x K) weight-gradient GEMMs long in their summed dimension.
GRAD_COLS_BUDGET = 1 << 23


def _extent(sa, ksz, stride, pad, dilation, sb) -> tuple[int, ...]:
    """Size of the padded input each spatial axis needs: ``sa + 2*pad``, or more where the last
    window of C's truncating output size reaches past it (those taps read zeros)."""
    return tuple(max(s + 2 * p, (o - 1) * st + d * (k - 1) + 1)
                 for s, k, st, p, d, o in zip(sa, ksz, stride, pad, dilation, sb, strict=True))


def _padded_input(a, pad, ext) -> np.ndarray:
    """``a`` (n, C, *sa) placed at offset ``pad`` in zeros of spatial size ``ext`` (a scratch array)."""
    sa = a.shape[2:]
    if ext == sa:
        return a
    ap = scratch("pad", a.shape[:2] + tuple(ext))
    ap.fill(0.0)
    ap[(slice(None), slice(None)) + tuple(slice(p, p + s) for p, s in zip(pad, sa, strict=True))] = a
    return ap


def _chunk(n: int, per_image: int) -> int:
    return max(1, min(n, GRAD_COLS_BUDGET // max(per_image, 1)))


def _side_by_side(b, group) -> np.ndarray:
    """``b`` (n, O, *sb) -> (g, O/g, n*P): the images of the chunk side by side, per group."""
    n, o = b.shape[:2]
    t = b.reshape(n, group, o // group, -1).transpose(1, 2, 0, 3)
    return np.ascontiguousarray(t).reshape(group, o // group, -1)


def conv_weight_grad(a, b_diff, ksz, *, stride, pad, dilation, group) -> np.ndarray:
    """sum_n weight_cpu_gemm(a[n], b_diff[n]): the gradient (Ob, Ca/g, *k) of the weight of a
    convolution ``a`` (N, Ca, *sa) -> ``b`` (N, Ob, *sb) whose output gradient is ``b_diff``."""
    a = np.asarray(a, np.float32)
    b_diff = np.asarray(b_diff, np.float32)
    n, ca = a.shape[:2]
    ob = b_diff.shape[1]
    sb = b_diff.shape[2:]
    ksz = tuple(ksz)
    kk = math.prod(ksz)
    cg = ca // group
    ext = _extent(a.shape[2:], ksz, stride, pad, dilation, sb)
    dw = np.zeros((group, ob // group, cg * kk), np.float32)
    chunk = _chunk(n, ca * kk * math.prod(sb))
    for n0 in range(0, n, chunk):
        ab = a[n0:n0 + chunk]
        nb = len(ab)
        cols = im2col(_padded_input(ab, pad, ext), ksz, stride, dilation, sb, batch_last=True)
        dyg = _side_by_side(b_diff[n0:n0 + nb], group)
        cols = cols.reshape(group, cg * kk, nb * math.prod(sb))
        for g in range(group):  # 2-D products: numpy's stacked matmul skips BLAS for a transposed operand
            dw[g] += dyg[g] @ cols[g].T
    return dw.reshape((ob, cg) + ksz)


def conv_input_grad(b_diff, weight, in_shape, *, stride, pad, dilation, group) -> np.ndarray:
    """sum over images of backward_cpu_gemm: the gradient (N, Ca, *sa) of the input of a
    convolution by ``weight`` (Ob, Ca/g, *k) whose output gradient is ``b_diff`` (N, Ob, *sb)."""
    b_diff = np.asarray(b_diff, np.float32)
    weight = np.asarray(weight, np.float32)
    n, ob = b_diff.shape[:2]
    sb = b_diff.shape[2:]
    sa = tuple(in_shape[2:])
    ksz = weight.shape[2:]
    kk = math.prod(ksz)
    ca = weight.shape[1] * group
    cg, og = ca // group, ob // group
    ext = _extent(sa, ksz, stride, pad, dilation, sb)
    inner = (slice(None), slice(None)) + tuple(slice(p, p + s) for p, s in zip(pad, sa, strict=True))
    out = np.empty((n, ca) + sa, np.float32)
    npix = math.prod(sb)
    if og == 1 and cg == 1:
        # depthwise: dcols would be an outer product (K = prod(k), one output per group), so add
        # w[c, t] * dY straight onto each tap's cells instead of building it
        wt = weight.reshape(ca, kk)
        chunk = _chunk(n, ca * (math.prod(ext) + npix))
        for n0 in range(0, n, chunk):
            db = b_diff[n0:n0 + chunk]
            nb = len(db)
            acc = scratch("colgrad", (nb, ca) + ext)
            acc.fill(0.0)
            tmp = scratch("tapgrad", db.shape)
            for t, tap in enumerate(itertools.product(*map(range, ksz))):
                np.multiply(db, wt[:, t].reshape((1, ca) + (1,) * len(sb)), out=tmp)
                acc[(slice(None), slice(None)) + tap_slices(tap, stride, dilation, sb)] += tmp
            out[n0:n0 + nb] = acc[inner]
        return out
    wt = np.ascontiguousarray(weight.reshape(group, og, cg * kk).transpose(0, 2, 1))  # W[g]^T (K x Ob/g)
    chunk = _chunk(n, ca * kk * npix)
    for n0 in range(0, n, chunk):
        db = b_diff[n0:n0 + chunk]
        nb = len(db)
        dcols = scratch("cols", (group, cg * kk, nb * npix))
        dyg = _side_by_side(db, group)
        for g in range(group):
            np.matmul(wt[g], dyg[g], out=dcols[g])
        # col2im: (C, *k, nb, *sb) columns added onto the padded input, one strided add per tap
        dcols = np.moveaxis(dcols.reshape((ca,) + ksz + (nb,) + sb), len(ksz) + 1, 0)
        acc = scratch("colgrad", (nb, ca) + ext)
        acc.fill(0.0)
        for tap in itertools.product(*map(range, ksz)):
            acc[(slice(None), slice(None)) + tap_slices(tap, stride, dilation, sb)] += dcols[
                (slice(None), slice(None)) + tap]
        out[n0:n0 + nb] = acc[inner]
    return out


def bias_grad(b_diff) -> np.ndarray:
    """backward_cpu_bias summed over the images: (O,) = sum over images and positions of ``b_diff``."""
    b_diff = np.asarray(b_diff, np.float32)
    return b_diff.reshape(b_diff.shape[0], b_diff.shape[1], -1).sum(axis=(0, 2), dtype=np.float32)

