"""Column (im2col) helpers shared by the convolution forward (conv.py) and its gradients (conv_grad.py).

2-D columns are gathered in C++ where the extension is built (:func:`im2col_2d`: straight from the
unpadded input, zeros where a tap reads the padding, the (image, channel) planes split between the
executor's threads); it only copies, so the columns are the same bytes as the NumPy path's.

Scratch memory: columns are ``prod(k)`` times the activation size, and fresh memory is expensive
(the kernel maps and zeroes every new page on first touch), so the temporaries come from one
growing buffer per role and thread (:func:`scratch`).
"""

from __future__ import annotations

import itertools
import math
import threading

import numpy as np

from amct_caffe.runtime import threads

try:  # csrc/src/conv_backward.cpp; padded() + im2col() below are its reference
    from amct_caffe._kernels import im2col_2d as IM2COL_KERNEL
except ImportError:
    IM2COL_KERNEL = None
# Below this many column floats the gather runs on one thread (starting more costs more).
THREADED_COLS = 1 << 18


def tap_slices(tap, stride, dilation, out) -> tuple[slice, ...]:
    """Slices of the padded input that kernel tap ``tap`` reads for every output position."""
    return tuple(slice(t * d, t * d + s * (o - 1) + 1, s)
                 for t, s, d, o in zip(tap, stride, dilation, out, strict=True))


def per_axis(v, n: int, default: int) -> tuple[int, ...]:
    """``v`` (None, one int, or 1 or ``n`` ints) as ``n`` ints, one per spatial axis (``default`` for None)."""
    if v is None:
        return (default,) * n
    if isinstance(v, (int, np.integer)):
        return (int(v),) * n
    v = tuple(int(e) for e in v)
    if len(v) == 1:
        return v * n
    if len(v) != n:
        raise ValueError(f"expected 1 or {n} values, got {len(v)}")
    return v


_SCRATCH = threading.local()


def scratch(role: str, shape) -> np.ndarray:
    """A float32 array of ``shape`` carved from a per-thread buffer that is reused across calls.

    Fresh memory is expensive here: the kernel maps and zeroes every new page on first touch,
    and im2col buffers are ``prod(k)`` times the activation size. So scratch arrays (padded
    input, columns, temporaries) come from one growing buffer per role. The contents are stale
    and valid only until the next request for the same role; never return one to the caller.
    """
    size = math.prod(shape)
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    buf = bufs.get(role)
    if buf is None or buf.size < size:
        buf = bufs[role] = np.empty(size, np.float32)
    return buf[:size].reshape(shape)


def release_scratch() -> None:
    """Free this thread's scratch buffers (they are rebuilt on demand)."""
    _SCRATCH.bufs = {}


def padded(x: np.ndarray, pad) -> np.ndarray:
    """``x`` (N, C, *sp) with ``pad`` zeros before and after each spatial axis (a scratch array)."""
    if not any(pad):
        return x
    sp = x.shape[2:]
    xp = scratch("pad", x.shape[:2] + tuple(n + 2 * p for n, p in zip(sp, pad, strict=True)))
    for a, (n, p) in enumerate(zip(sp, pad, strict=True)):  # zero only the borders; the interior is copied
        if p:
            lead = (slice(None),) * (2 + a)
            xp[lead + (slice(0, p),)] = 0.0
            xp[lead + (slice(p + n, None),)] = 0.0
    xp[(slice(None), slice(None)) + tuple(slice(p, p + n) for n, p in zip(sp, pad, strict=True))] = x
    return xp


def im2col(xp: np.ndarray, ksz, stride, dilation, out, batch_last: bool = False) -> np.ndarray:
    """``xp`` (N, C, *sp) padded -> columns (scratch), one strided copy per kernel tap.

    Layout (N, C, *k, *out), or (C, *k, N, *out) with ``batch_last`` so that the images of
    the batch sit side by side in one wide matrix (a single GEMM for all of them).
    """
    n, c = xp.shape[:2]
    ksz, out = tuple(ksz), tuple(out)
    if batch_last:
        cols = scratch("cols", (c,) + ksz + (n,) + out)
        dst = np.moveaxis(cols, len(ksz) + 1, 0)  # (N, C, *k, *out) view of the same memory
    else:
        cols = dst = scratch("cols", (n, c) + ksz + out)
    for tap in itertools.product(*map(range, ksz)):
        src = xp[(slice(None), slice(None)) + tap_slices(tap, stride, dilation, out)]
        dst[(slice(None), slice(None)) + tap] = src
    return cols


def im2col_2d(x: np.ndarray, ksz, stride, pad, dilation, out, batch_last: bool = False) -> np.ndarray:
    """``im2col(padded(x, pad), ...)`` for 2-D ``x`` (N, C, H, W) in one C++ pass (same layout, same bytes):
    ``cols[n, c, i, j, oy, ox] = x[n, c, oy*sh - ph + i*dh, ox*sw - pw + j*dw]``, 0 outside ``x``."""
    if IM2COL_KERNEL is None or x.ndim != 4:
        return im2col(padded(x, pad), ksz, stride, dilation, out, batch_last)
    n, c = x.shape[:2]
    ksz, out = tuple(ksz), tuple(out)
    cols = scratch("cols", ((c,) + ksz + (n,) + out) if batch_last else ((n, c) + ksz + out))
    workers = threads.workers() if cols.size >= THREADED_COLS else 1
    IM2COL_KERNEL(np.ascontiguousarray(x), cols, list(ksz), list(stride), list(pad), list(dilation), list(out),
                  batch_last, workers)
    return cols


def im2row(x: np.ndarray, ksz, pad, dilation, out_h: int, batch_last: bool = False) -> np.ndarray:
    """Columns of a stride-1 2-D convolution computed on whole padded rows.

    Output pixel ``(h, w)`` reads padded cell ``(h + i*d, w + j*d)``, i.e. flat index
    ``h*Wp + w + (i*Wp + j)*d``; so with outputs laid out on a ``(Ho, Wp)`` grid, tap ``(i, j)``
    is the contiguous run ``xpad.flat[(i*Wp + j)*d : ... + Ho*Wp]``: one long copy per tap instead
    of ``Ho`` short rows. Grid columns ``w >= Wo`` are garbage, cropped after the GEMM.
    Layout (N, C, kh, kw, Ho*Wp) (or (C, kh, kw, N, Ho*Wp) with ``batch_last``).
    """
    n, c, h, w = x.shape
    hp, wp = h + 2 * pad[0], w + 2 * pad[1]
    tail = (ksz[1] - 1) * dilation[1]  # the last tap's run ends this far past the padded image
    flat = scratch("pad", (n, c, hp * wp + tail))
    flat[:, :, hp * wp:] = 0.0
    grid = flat[:, :, :hp * wp].reshape(n, c, hp, wp)
    if pad[0]:
        grid[:, :, :pad[0]] = 0.0
        grid[:, :, pad[0] + h:] = 0.0
    if pad[1]:
        grid[:, :, pad[0]:pad[0] + h, :pad[1]] = 0.0
        grid[:, :, pad[0]:pad[0] + h, pad[1] + w:] = 0.0
    grid[:, :, pad[0]:pad[0] + h, pad[1]:pad[1] + w] = x
    run = out_h * wp
    if batch_last:
        cols = scratch("cols", (c,) + tuple(ksz) + (n, run))
        dst = np.moveaxis(cols, 3, 0)
    else:
        cols = dst = scratch("cols", (n, c) + tuple(ksz) + (run,))
    for i in range(ksz[0]):
        for j in range(ksz[1]):
            off = i * dilation[0] * wp + j * dilation[1]
            dst[:, :, i, j] = flat[:, :, off:off + run]
    return cols
