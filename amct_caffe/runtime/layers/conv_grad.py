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

Speed and rounding. The weight gradient makes Caffe's products, one ``(Ob/g x P) @ (P x K)`` per
image and group rounded as Caffe's call (:func:`caffe_gemm.matmul`) and added in image order, so
it is Caffe's sum wherever that call is one block (``P`` up to OpenBLAS's K block, or a small-matrix
call) and the diff starts at zero; with many groups (depthwise) the images are laid side by side
(``(g, K, n*P)`` columns, the ``batch_last`` layout of :func:`conv_cols.im2col`), one GEMM per group.
The input gradient lays the images side by side for small maps (``P < WIDE_GRAD_PIXELS``), else
keeps Caffe's per-image ``(K x P)`` matrices as one stacked product. Columns are built in chunks of
about ``GRAD_COLS_BUDGET`` floats. 2-D im2col / col2im run in C++ (``csrc/src/conv_backward.cpp``: one
pass, no GIL, the planes split between threads; col2im adds in Caffe's order); the NumPy path (one
strided copy / add per kernel tap) is their fallback and reference. Every GEMM sums its contraction
in blocks numpy's BLAS does not split again, so the gradients are the same bytes with any BLAS
thread count.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from amct_caffe.runtime import threads
from amct_caffe.runtime.layers import caffe_gemm
from amct_caffe.runtime.layers.conv_cols import im2col, scratch, tap_slices

try:  # the C++ column kernels (csrc/src/conv_backward.cpp); the NumPy paths below are their reference
    from amct_caffe._kernels import col2im_2d as COL2IM_KERNEL
    from amct_caffe._kernels import im2col_2d as IM2COL_KERNEL
except ImportError:
    COL2IM_KERNEL = IM2COL_KERNEL = None

# Columns of this many floats (1 MB; at least one image) at most are built at once: they are still
# in the cache when the GEMMs read them (with 32 MB, conv_1 of ResNet-50 took twice as long).
GRAD_COLS_BUDGET = 1 << 18
# Below this many output pixels per image the input gradient lays the images side by side too.
WIDE_GRAD_PIXELS = 1024
# Up to this many (image, group) products the weight gradient makes Caffe's per-image GEMMs.
PER_IMAGE_GEMMS_MAX = 512


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


def _columns(ab, ksz, stride, pad, dilation, sb, ext, batch_last: bool) -> np.ndarray:
    """im2col of the images ``ab`` (n, C, *sa): (C*prod(k), n*P) with ``batch_last``, else (n, C*prod(k), P)
    (scratch; ``ab`` itself for a 1x1 kernel without stride or pad, as Caffe's ``is_1x1_``)."""
    n, c = ab.shape[:2]
    npix = math.prod(sb)
    if not batch_last and all(k == 1 for k in ksz) and not any(pad) and all(st == 1 for st in stride):
        return np.ascontiguousarray(ab).reshape(n, c, npix)
    rows = c * math.prod(ksz)
    if IM2COL_KERNEL is not None and len(ksz) == 2:
        cols = scratch("cols", (rows, n * npix) if batch_last else (n, rows, npix))
        IM2COL_KERNEL(np.ascontiguousarray(ab), cols, list(ksz), list(stride), list(pad), list(dilation), list(sb),
                      batch_last, threads.workers())
        return cols
    cols = im2col(_padded_input(ab, pad, ext), ksz, stride, dilation, sb, batch_last=batch_last)
    return cols.reshape((rows, n * npix) if batch_last else (n, rows, npix))


def conv_weight_grad(a, b_diff, ksz, *, stride, pad, dilation, group) -> np.ndarray:
    """sum_n weight_cpu_gemm(a[n], b_diff[n]): the gradient (Ob, Ca/g, *k) of the weight of a
    convolution ``a`` (N, Ca, *sa) -> ``b`` (N, Ob, *sb) whose output gradient is ``b_diff``.

    As Caffe: one ``(Ob/g x P) @ (P x K)`` product per image and group, each rounded as Caffe's call
    (:func:`caffe_gemm.matmul`), added in image order; many groups (depthwise) instead lay the
    images side by side, one GEMM per group (:func:`caffe_gemm.stable_matmul`).
    """
    a = np.asarray(a, np.float32)
    b_diff = np.asarray(b_diff, np.float32)
    n, ca = a.shape[:2]
    ob = b_diff.shape[1]
    sb = b_diff.shape[2:]
    npix = math.prod(sb)
    ksz = tuple(ksz)
    kk = math.prod(ksz)
    cg, og = ca // group, ob // group
    dw = np.zeros((group, og, cg * kk), np.float32)
    if a.size == 0 or b_diff.size == 0:  # no input values (every column reads padding), or no output position
        return dw.reshape((ob, cg) + ksz)
    ext = _extent(a.shape[2:], ksz, stride, pad, dilation, sb)
    chunk = _chunk(n, ca * kk * npix)
    part = scratch("part", dw.shape[1:])
    per_image = n * group <= PER_IMAGE_GEMMS_MAX
    for n0 in range(0, n, chunk):
        ab = a[n0:n0 + chunk]
        nb = len(ab)
        if per_image:
            cols = _columns(ab, ksz, stride, pad, dilation, sb, ext, False).reshape(nb, group, cg * kk, npix)
            dy = b_diff[n0:n0 + nb].reshape(nb, group, og, npix)
            for i in range(nb):
                for g in range(group):
                    dw[g] += caffe_gemm.matmul(dy[i, g], cols[i, g].T, (og, cg * kk, npix), trans_b=True, out=part)
            continue
        cols = _columns(ab, ksz, stride, pad, dilation, sb, ext, True).reshape(group, cg * kk, nb * npix)
        dyg = _side_by_side(b_diff[n0:n0 + nb], group)
        for g in range(group):  # 2-D products: numpy's stacked matmul skips BLAS for a transposed operand
            dw[g] += caffe_gemm.stable_matmul(dyg[g], cols[g].T, part=part)
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
    if math.prod(in_shape) == 0 or math.prod(sb) == 0:  # no input cell, or no window: a zero gradient
        return np.zeros(tuple(in_shape), np.float32)
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
    if COL2IM_KERNEL is not None and len(ksz) == 2:
        wide = npix < WIDE_GRAD_PIXELS and n > 1
        for n0 in range(0, n, chunk):
            db = b_diff[n0:n0 + chunk]
            nb = len(db)
            if wide:  # dcols (g, K, nb*P): one GEMM per group
                dcols = scratch("cols", (group, cg * kk, nb * npix))
                dyg = _side_by_side(db, group)
                for g in range(group):
                    caffe_gemm.stable_matmul(wt[g], dyg[g], out=dcols[g], part=scratch("part", dcols.shape[1:]))
            else:  # dcols (nb, g, K, P): Caffe's per-image matrices
                dcols = scratch("cols", (nb, group, cg * kk, npix))
                caffe_gemm.stable_matmul(wt, np.ascontiguousarray(db).reshape(nb, group, og, npix), out=dcols,
                              part=scratch("part", dcols.shape))
            COL2IM_KERNEL(dcols, out[n0:n0 + nb], list(ksz), list(stride), list(pad), list(dilation), list(sb),
                          wide, threads.workers())
        return out
    for n0 in range(0, n, chunk):
        db = b_diff[n0:n0 + chunk]
        nb = len(db)
        dcols = scratch("cols", (group, cg * kk, nb * npix))
        dyg = _side_by_side(db, group)
        for g in range(group):
            caffe_gemm.stable_matmul(wt[g], dyg[g], out=dcols[g])
        # col2im: the (C, *k, nb, *sb) columns added onto the padded input
        acc = scratch("colgrad", (nb, ca) + ext)
        _add_columns(acc, np.moveaxis(dcols.reshape((ca,) + ksz + (nb,) + sb), len(ksz) + 1, 0), stride, dilation)
        out[n0:n0 + nb] = acc[inner]
    return out


def bias_grad(b_diff) -> np.ndarray:
    """backward_cpu_bias summed over the images: (O,) = sum over images and positions of ``b_diff``."""
    b_diff = np.asarray(b_diff, np.float32)
    return b_diff.reshape(b_diff.shape[0], b_diff.shape[1], -1).sum(axis=(0, 2), dtype=np.float32)



def col2im(dcols, in_shape, ksz, *, stride, pad, dilation) -> np.ndarray:
    """Caffe's col2im per image: columns ``dcols`` (N, C * prod(k), *sb) back to an input (N, C, *sa) of
    ``in_shape``, every entry added onto the cell it was read from, taps in Caffe's order (zero start; the
    cells of the padding dropped): the gradient of :func:`conv_cols.im2col`."""
    in_shape = tuple(in_shape)
    n, c = in_shape[:2]
    sa, sb, ksz = in_shape[2:], tuple(dcols.shape[2:]), tuple(ksz)
    if math.prod(in_shape) == 0 or dcols.size == 0:  # no input cell, or no window: a zero gradient
        return np.zeros(in_shape, np.float32)
    dcols = np.ascontiguousarray(dcols, np.float32)
    if COL2IM_KERNEL is not None and len(ksz) == 2:
        out = np.empty(in_shape, np.float32)
        COL2IM_KERNEL(dcols.reshape(n, 1, c * math.prod(ksz), math.prod(sb)), out, list(ksz), list(stride),
                      list(pad), list(dilation), list(sb), False, threads.workers())
        return out
    acc = np.empty((n, c) + _extent(sa, ksz, stride, pad, dilation, sb), np.float32)
    _add_columns(acc, dcols.reshape((n, c) + ksz + sb), stride, dilation)
    return np.array(acc[(slice(None), slice(None)) + tuple(slice(p, p + s) for p, s in zip(pad, sa, strict=True))])


def _add_columns(acc: np.ndarray, taps: np.ndarray, stride, dilation) -> None:
    """The NumPy col2im: ``acc`` (n, C, *padded extent) set to zero, then each column entry of ``taps``
    (n, C, *k, *sb) added onto the cell it was read from, one strided add per tap in order (Caffe's order)."""
    both = (slice(None), slice(None))
    spatial = (taps.ndim - 2) // 2
    ksz, sb = taps.shape[2:2 + spatial], taps.shape[2 + spatial:]
    acc.fill(0.0)
    for tap in itertools.product(*map(range, ksz)):
        acc[both + tap_slices(tap, stride, dilation, sb)] += taps[both + tap]
