"""How the executor computes a convolution (:func:`.conv.Convolution`): a :class:`ConvPlan` per input shape
and geometry, its choices made once and kept (:func:`conv_plan`).

Execution strategy (speed matters: calibration runs models many times). Everything is float32;
the columns (im2col) are built in cache-sized chunks (``COLS_BUDGET`` floats) inside reused
scratch buffers, one strided copy per kernel tap:

* 1x1 kernels without padding: the (strided) input already is the column matrix; one GEMM per
  (image, group) through ``np.matmul``, or for maps under ``WIDE_1X1_PIXELS`` pixels one wide GEMM
  per group on the images side by side (the input and output transposed);
* depthwise (``group == C == O``): columns per chunk of images x channels, contracted per
  channel as a stack of ``(1 x prod(k)) @ (prod(k) x P)`` products (Caffe runs C tiny GEMMs
  here). Against a loop over the taps with one vectorised multiply-add each, this is as fast
  on large stride-1 maps of one image and up to 2.7x faster on small maps (call overhead),
  strided taps (slow gathers) and batches (the tap loop streams the blob ``2*prod(k)`` times);
* other convolutions: ``(C/g*prod(k), P)`` columns and one GEMM per (image, group); maps under
  ``WIDE_GEMM_PIXELS`` pixels put the images of a batch side by side instead, one wide GEMM
  ``(O/g x K) @ (K x N*P)`` per group, as narrow GEMMs run far below peak;
* narrow stride-1 2-D maps (``Wo < ROW_COLUMNS_WIDTH``) with few outputs per group (depthwise,
  detection heads) gather whole padded rows per tap (:func:`conv_cols.im2row`, one long copy instead of
  ``Ho`` short ones) and crop the extra columns after the GEMM.

The GEMMs are made by :class:`caffe_gemm.ConvGemms` (one :func:`caffe_gemm.conv_gemms` per
convolution), which sums them in the order Caffe's OpenBLAS does, so that the float32 outputs are
Caffe's bit for bit where the two OpenBLAS builds share their kernels (AVX-512), and says which of
the layouts above keep Caffe's sums (the wide GEMMs and row grids do unless Caffe's call runs in a
small-matrix kernel) and how the depthwise products are made.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np

from amct_caffe.runtime import threads
from amct_caffe.runtime.layers import caffe_gemm
from amct_caffe.runtime.layers.conv_cols import IM2COL_KERNEL, im2col, im2col_2d, im2row, padded, scratch

try:  # the C++ depthwise loops (csrc/src/depthwise.cpp); the NumPy path below is their reference
    from amct_caffe._kernels import depthwise_conv2d as DEPTHWISE_KERNEL
except ImportError:
    DEPTHWISE_KERNEL = None
try:  # csrc/src/direct_conv.cpp: short contractions without columns, the bytes of numpy's GEMM (see _direct)
    from amct_caffe._kernels import direct_conv2d as DIRECT_KERNEL
    from amct_caffe._kernels import direct_conv_max_k, simd_level
    DIRECT_MAX_K = direct_conv_max_k()
except ImportError:
    DIRECT_KERNEL, DIRECT_MAX_K = None, 0

    def simd_level() -> int:
        return 0
# AMCT_SIMD caps the vector kernels every C++ loop may use (csrc/include/amct/cpu.h); it ignores other values
SIMD_VARIABLE_VALUES = ("avx512", "avx2", "portable")
if os.environ.get("AMCT_SIMD", "") not in ("",) + SIMD_VARIABLE_VALUES:
    logging.getLogger(__name__).warning("AMCT_SIMD=%r is not one of %s; the CPU's own vector kernels are used",
                                        os.environ["AMCT_SIMD"], ", ".join(SIMD_VARIABLE_VALUES))
try:  # ... with a folded chain's epilogue applied as it stores (see ConvPlan.fused)
    from amct_caffe._kernels import direct_conv2d_affine as DIRECT_AFFINE_KERNEL
except ImportError:
    DIRECT_AFFINE_KERNEL = None
try:  # csrc/python/small_conv.cpp: a small convolution in one call, its GEMMs numpy's own sgemm calls
    from amct_caffe._kernels import SmallConv as SMALL_CONV_KERNEL
    from amct_caffe._kernels import bind_numpy_sgemm, numpy_sgemm
except ImportError:
    SMALL_CONV_KERNEL = None
_SGEMM_BOUND: bool | None = None  # whether numpy's sgemm is bound, once tried (numpy_sgemm_bound)
# (K, outputs) bounds under which the direct kernel beats the column GEMM (see _direct)
DIRECT_SHAPES = ((64, 64),)
# ... for kernels of more than one tap (see _direct_args)
DIRECT_SPATIAL_SHAPES = ((256, 64),)
# Builds before the bias argument took none (y += bias then runs in NumPy: the same bytes).
DEPTHWISE_BIAS = DEPTHWISE_KERNEL is not None and "bias" in (DEPTHWISE_KERNEL.__doc__ or "")
# Below this many multiply-adds a depthwise convolution runs on one thread (starting more costs more).
DEPTHWISE_THREADED_MACS = 1 << 21

# ------------------------------------------------------------------------ pure kernels
# im2col is done for as many images at once as fit in this many floats (4 MB): large enough
# for few Python-level calls, small enough to stay in the last-level cache until the GEMM.
COLS_BUDGET = 1 << 20
# Below this many output pixels per image, a batch is convolved by one wide GEMM.
WIDE_GEMM_PIXELS = 1024
# ... for 1x1 kernels, whose per-image GEMMs need no columns (the wide one needs the input and the
# output transposed): measured on ResNet-50's 1x1 layers (batch 8), wide pays at 7x7 (-20..-27%), not at 14x14.
WIDE_1X1_PIXELS = 128
# Stride-1 2-D maps narrower than this, with at most ROW_COLUMNS_MAX_OUT outputs per group,
# gather whole padded rows per tap (see _im2row).
ROW_COLUMNS_WIDTH = 32
ROW_COLUMNS_MAX_OUT = 16
# Up to this many column values (and output values) a plan's prepared call (ConvPlan.unbiased) keeps its own
# columns: on such inputs (MTCNN's 12x12 P-Net) the Python around the kernels is most of the time.
SMALL_COLS = 1 << 14
# (its products' single rows / columns are padded to sgemms by caffe_gemm where numpy's BLAS is unknown)
assert SMALL_COLS <= caffe_gemm.PADDED_SINGLE_MAX_MN


def conv_out_size(size: int, k: int, stride: int, pad: int, dilation: int) -> int:
    """base_conv_layer.cpp's compute_output_shape, in C++ int arithmetic (truncating division)."""
    num = size + 2 * pad - (dilation * (k - 1) + 1)
    q = abs(num) // stride
    return (q if num >= 0 else -q) + 1


_PLANS: dict = {}
_MAX_PLANS = 512


def conv_plan(x_shape, w_shape, stride, pad, dilation, group) -> "ConvPlan":
    """The :class:`ConvPlan` of these shapes and this geometry (tuples), made once and kept.

    The key holds what the choices depend on besides the shapes: the GEMM configuration
    (``caffe_gemm.configure`` replaces it) and this module's tunables and kernels (tests change them).
    """
    key = (x_shape, w_shape, stride, pad, dilation, group, caffe_gemm.gemm_config(), COLS_BUDGET, WIDE_GEMM_PIXELS,
           WIDE_1X1_PIXELS, ROW_COLUMNS_WIDTH, ROW_COLUMNS_MAX_OUT, DEPTHWISE_KERNEL, DEPTHWISE_BIAS, DIRECT_KERNEL,
           DIRECT_MAX_K, DIRECT_SHAPES, DIRECT_SPATIAL_SHAPES, simd_level())
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = ConvPlan(x_shape, w_shape, stride, pad, dilation, group)
    return plan


class ConvPlan:
    """How :func:`Convolution` computes one input shape: the strategy of the module doc, chosen once.

    The choices (layout, GEMM shapes, whether a GEMM needs Caffe's K blocks, the C++ kernels'
    arguments) depend only on the shapes and the geometry; calling the plan runs the same NumPy and
    C++ calls, in the same order, as deciding afresh would, so the bytes are the same. A plan is
    made by :func:`conv_plan`, which keeps it: a net calls each of its convolutions with the same
    shapes on every forward.
    """

    def __init__(self, x_shape, w_shape, stride, pad, dilation, group: int):
        n, c = x_shape[:2]
        nsp = len(x_shape) - 2
        o = w_shape[0]
        ksz = tuple(w_shape[2:])
        if c % group or o % group or w_shape[1] * group != c:
            raise ValueError(f"weight {tuple(w_shape)} does not fit {c} input channels in {group} group(s)")
        out = tuple(conv_out_size(s, k, st, p, d)
                    for s, k, st, p, d in zip(x_shape[2:], ksz, stride, pad, dilation, strict=True))
        if min(out, default=1) < 0:
            raise ValueError(f"convolution output size {list(out)} is negative: input {x_shape[2:]}, kernel {ksz}")
        self.n, self.o, self.nsp, self.out, self.x_shape = n, o, nsp, out, tuple(x_shape)
        self.stride, self.pad, self.dilation, self.group, self.ksz = stride, pad, dilation, group, ksz
        self.empty = 0 in out or n == 0  # an empty top, as Caffe's Blob::Reshape allows (see _BaseConv.reshape)
        # No input values (no channels, or a zero spatial size) under windows the padding still fills: every
        # tap reads padding, as Caffe's im2col writes zeros for it, so each output is its bias alone.
        self.blank = not self.empty and math.prod(x_shape) == 0
        if self.empty or self.blank:
            return
        # With C's truncating division the last window may reach past the padded input (a kernel
        # wider than it, an odd stride): im2col reads zeros there, so extend the input with zeros.
        tail = tuple(max(0, (o_ - 1) * st + d * (k - 1) + 1 - (s + 2 * p))
                     for s, k, st, p, d, o_ in zip(x_shape[2:], ksz, stride, pad, dilation, out, strict=True))
        self.tail = ((0, 0), (0, 0)) + tuple((0, t) for t in tail) if any(tail) else None
        xs = tuple(x_shape[:2]) + tuple(s + t for s, t in zip(x_shape[2:], tail, strict=True))
        self.cg = cg = c // group
        self.kk = kk = math.prod(ksz)
        self.depthwise = depthwise = group == c == o
        # Caffe's GEMM per image and group, C (O/g x P) = W (O/g x K) @ cols (K x P): `gemm` makes the
        # products below sum like it and says which of the layouts keep its sums (caffe_gemm.ConvGemms).
        self.gemm = gemm = caffe_gemm.conv_gemms(o // group, math.prod(out), cg * kk, depthwise=depthwise)
        self.direct = _direct_args(xs, w_shape, stride, pad, dilation, out, group, gemm)
        self.rows, self.grid = False, out
        og = o // group
        if self.direct is not None:
            self.kind = "direct"
        elif all(k == 1 for k in ksz) and not any(pad) and group != c:
            # 1x1: the (strided) input already is the column matrix; one GEMM per (image, group)
            self.strided = (slice(None), slice(None)) + tuple(
                slice(None, (e - 1) * st + 1, st) for e, st in zip(out, stride, strict=True))
            npix = math.prod(out)
            self.kind = "1x1 wide" if npix < WIDE_1X1_PIXELS and n > 1 and gemm.wide else "1x1"
            self.mm = self._matmul(og, cg, n * npix if self.kind == "1x1 wide" else npix)
        else:
            # Narrow stride-1 2-D maps: whole-row columns (see _im2row); the GEMMs then run on a
            # (Ho, Wp) grid whose extra columns are dropped at the end. That extra GEMM work only
            # pays off when each column feeds few outputs (depthwise, small O/g), and not on inputs
            # small enough for the one-call path (unbiased / native: MTCNN's P-Net on 12 x 12 took
            # 0.10 ms through rows where numpy's BLAS does not round like Caffe's, 0.015 ms in one call).
            tiny = not depthwise and _one_call_sized(n, o, c * kk, out)
            self.rows = (nsp == 2 and stride == (1, 1) and out[1] < ROW_COLUMNS_WIDTH and kk > 1
                         and og <= ROW_COLUMNS_MAX_OUT and gemm.row_grid and not tiny)
            self.grid = (out[0], xs[3] + 2 * pad[1]) if self.rows else out
            npix = math.prod(self.grid)
            if depthwise and nsp == 2 and DEPTHWISE_KERNEL is not None:
                self.kind, self.grid, self.rows = "depthwise kernel", out, False
                self.dw_args = (list(stride), list(pad), list(dilation), list(out))
                self.dw_threaded = n * c * kk * math.prod(out) >= DEPTHWISE_THREADED_MACS
            elif depthwise:
                self.kind = "depthwise"
                self.nb = max(1, min(n, COLS_BUDGET // (c * kk * npix)))
                self.cb = c if self.nb > 1 else max(1, min(c, COLS_BUDGET // (kk * npix)))
            else:
                self.kind = "wide" if npix < WIDE_GEMM_PIXELS and n > 1 and gemm.wide else "gemm"
                self.chunk = max(1, min(n, COLS_BUDGET // (c * kk * npix)))
                self.mm = self._matmul(og, cg * kk, (min(self.chunk, n) if self.kind == "wide" else 1) * npix)

    def _matmul(self, m: int, k: int, n: int):
        """The GEMMs' matmul for (m x k) @ (k x n) products, prepared once (caffe_gemm.prepared): np.matmul
        itself where Caffe's sums need nothing more. (A batch of wide GEMMs whose last chunk is narrower
        keeps the general one.)"""
        if self.kind == "wide" and self.n % self.chunk:
            return self.gemm.matmul
        return caffe_gemm.prepared(m, k, n, self.gemm.caffe_mnk)

    def columns(self, xb, batch_last=False):
        if self.rows:
            return im2row(xb, self.ksz, self.pad, self.dilation, self.out[0], batch_last)
        if self.nsp == 2:
            return im2col_2d(xb, self.ksz, self.stride, self.pad, self.dilation, self.out, batch_last)
        return im2col(padded(xb, self.pad), self.ksz, self.stride, self.dilation, self.out, batch_last)

    def __call__(self, x: np.ndarray, weight: np.ndarray, bias=None, into: np.ndarray | None = None) -> np.ndarray:
        """The convolution of ``x`` (of the plan's input shape) by ``weight``, plus ``bias`` if given.

        ``into``: an array of the result's shape the result may be written into instead of fresh memory (a
        blob's array of the last forward that no one else holds: runtime/forward.py); the same bytes either way.
        Only a float32 C-contiguous array of exactly that shape sharing no memory with ``x`` or ``weight`` is used.
        """
        into = into if _fits(into, (self.n, self.o) + self.out, x, weight) else None
        n, o, out, group = self.n, self.o, self.out, self.group
        if self.empty or self.blank:
            y = np.zeros((n, o) + out, np.float32)
            if bias is not None and self.blank:
                y += np.asarray(bias, np.float32).reshape((o,) + (1,) * self.nsp)
            return y
        if self.tail is not None:
            x = np.pad(x, self.tail)
        kind = self.kind
        if kind == "direct":
            y, bias = _direct(x, weight, self.direct, out, bias, into), None
        elif kind.startswith("1x1"):
            cg, npix = self.cg, math.prod(out)
            w = weight.reshape(group, o // group, -1)
            xs = x[self.strided]
            if kind == "1x1 wide":
                # small maps: the images side by side, (g, C/g, N*P), one wide GEMM per group
                cols = scratch("cols", (group, cg, n, npix))
                np.copyto(cols, xs.reshape(n, group, cg, npix).transpose(1, 2, 0, 3))
                yb = self.mm(w, cols.reshape(group, cg, n * npix)).reshape(group, o // group, n, npix)
                shape = (n, group, o // group, npix)
                y = np.empty(shape, np.float32) if into is None else into.reshape(shape)
                np.copyto(y, yb.transpose(2, 0, 1, 3))
                y = y.reshape((n, o) + out)
            else:
                if any(st > 1 for st in self.stride):
                    cols = scratch("cols", xs.shape)
                    np.copyto(cols, xs)
                else:
                    cols = np.ascontiguousarray(x)
                # (into an array of the top's shape, not a view of the GEMM's: see runtime/forward.py's _sole_array)
                y = np.empty((n, o) + out, np.float32) if into is None else into
                self.mm(w, cols.reshape(n, group, cg, -1), out=y.reshape(n, group, o // group, -1))
        elif kind == "depthwise kernel":
            # One fused multiply-add per tap in tap order, as Caffe's (1 x T) @ (T x P) small-kernel sgemm
            # sums: the same bytes as the products below, 4-6x faster (no columns, no GIL).
            args = (np.ascontiguousarray(x), np.ascontiguousarray(weight.reshape((o,) + self.ksz)), *self.dw_args,
                    threads.workers() if self.dw_threaded else 1)
            if bias is not None and DEPTHWISE_BIAS:  # the bias added to each sum in the same pass
                y = DEPTHWISE_KERNEL(*args, np.ascontiguousarray(bias, np.float32).reshape(-1), into)
                bias = None
            else:
                y = DEPTHWISE_KERNEL(*args, None, into)
            y = y.reshape((n, o) + out)
        else:
            y = self._columns_conv(x, weight, kind, None if self.rows else into).reshape((n, o) + self.grid)
            if self.rows:
                y = np.ascontiguousarray(y[..., :out[1]])
        if bias is not None:
            y += np.asarray(bias, np.float32).reshape((o,) + (1,) * self.nsp)
        return y

    def fused(self, x: np.ndarray, weight: np.ndarray, scale, bias, relu: bool,
              into: np.ndarray | None = None) -> np.ndarray | None:
        """The convolution (no bias) followed by a folded chain's epilogue, ``y * scale[o] + bias[o]`` and
        NumPy's ReLU (each if given), where this plan runs the direct kernel: it maps each value as it
        stores it, one pass less over the output than ``fold._affine`` after :meth:`__call__`, the same
        float32 roundings. None elsewhere (the caller then makes the two passes). ``into``: as
        :meth:`__call__`'s."""
        if self.empty or self.blank or self.kind != "direct" or DIRECT_AFFINE_KERNEL is None:
            return None
        if self.tail is not None:
            x = np.pad(x, self.tail)
        flat, stride, pad, dilation, grid, macs = self.direct
        x = np.ascontiguousarray(x)
        into = _flat(into, flat) if _fits(into, (self.n, self.o) + self.out, x, weight) else None
        y = DIRECT_AFFINE_KERNEL(x if flat is None else x.reshape(flat), np.ascontiguousarray(weight), stride, pad,
                                 dilation, grid, _workers(macs), _vector(scale), _vector(bias), relu, into)
        return y if flat is None else y.reshape((x.shape[0], self.o) + self.out)

    def unbiased(self):
        """None, or a callable ``(x, w) -> y``: :meth:`__call__` without the bias for a small input, ``w`` the
        weight viewed as ``(group, O/g, K)``. The same kernel and GEMM calls on the same shapes (so the same
        bytes), minus the per-call work: for a one-chunk column GEMM (``gemm``: im2col into columns of its
        own, made once, then the GEMM into a fresh top) and a stride-1 ``1x1`` (the input is the columns).
        Columns and output stay under :data:`SMALL_COLS` values, below every threading threshold, so it
        runs on one thread as ``__call__`` does there."""
        if not self._small():
            return None
        n, o, group, out = self.n, self.o, self.group, self.out
        npix = math.prod(out)
        top, mm, gemm_shape = (n, o) + out, self.mm, (n, group, o // group, npix)
        if self.kind == "1x1":
            cshape = (n, group, self.cg, npix)

            def run_1x1(x, w):  # (into a fresh C-contiguous top: a padded GEMM's result is a slice)
                y = np.empty(top, np.float32)
                mm(w, np.ascontiguousarray(x).reshape(cshape), out=y.reshape(gemm_shape))
                return y
            return run_1x1
        cols = np.empty((n, group * self.cg) + self.ksz + out, np.float32)
        cols4 = cols.reshape(n, group, self.cg * self.kk, npix)
        args = (list(self.ksz), list(self.stride), list(self.pad), list(self.dilation), list(out), False, 1)

        def run(x, w):
            IM2COL_KERNEL(np.ascontiguousarray(x), cols, *args)
            y = np.empty(top, np.float32)
            mm(w, cols4, out=y.reshape(gemm_shape))
            return y
        return run

    @property
    def column_gemm(self) -> bool:
        """Whether this plan runs a column GEMM (im2col or a 1x1's input, not the one-call path of small inputs):
        where a calibration net's fast kernels take over (runtime/fold.py, CALIBRATION)."""
        return (not (self.empty or self.blank) and getattr(self, "kind", None) in ("gemm", "wide", "1x1", "1x1 wide")
                and not self._small())

    def _small(self) -> bool:
        """Whether :meth:`unbiased` applies (its docstring)."""
        if self.empty or self.blank or self.tail is not None or self.nsp != 2 \
                or self.n * self.o * math.prod(self.out) > SMALL_COLS:
            return False
        if self.kind == "1x1":
            return self.stride == (1, 1)
        return (self.kind == "gemm" and not self.rows and self.chunk >= self.n and IM2COL_KERNEL is not None
                and _one_call_sized(self.n, self.o, self.cg * self.group * self.kk, self.out))

    def native(self, act: int):
        """None, or a ``SmallConv`` of the extension: ``(x, weight, bias, slope) -> y``, the convolution of
        :meth:`unbiased` (one group) with the bias and an activation (``act``: 0 none, 1 ReLU, 2 PReLU by
        ``slope``) in one C++ call. Its GEMMs are the calls ``np.matmul`` makes in :meth:`unbiased` (numpy's
        sgemm on the same call shape, :func:`caffe_gemm.single_call`), the bias and activation those of
        channel_affine / bias_prelu: the same bytes."""
        if self.group != 1 or not self._small() or not numpy_sgemm_bound():
            return None
        shape = caffe_gemm.single_call(self.o, self.cg * self.kk, math.prod(self.out), self.gemm.caffe_mnk)
        if shape is None:
            return None
        im2col = self.kind == "gemm"
        return SMALL_CONV_KERNEL(list(self.x_shape), self.o, list(self.ksz), list(self.stride), list(self.pad),
                                 list(self.dilation), list(self.out), shape[0], shape[1], im2col, act)

    def _columns_conv(self, x, weight, kind, into=None):
        n, o, group, cg, kk = self.n, self.o, self.group, self.cg, self.kk
        npix = math.prod(self.grid)
        if kind == "depthwise":
            # Depthwise: Caffe runs C tiny GEMMs (1 x T) @ (T x P) here. Channels are independent: the
            # taps are gathered in cache-sized (images x channels) chunks and contracted per channel,
            # y[n, c, p] = sum_t w[c, t] * cols[n, c, t, p], as a stack of products.
            c = o
            wc = self.gemm.channel_weights(weight.reshape(c, kk), npix)
            y = np.empty((n, c, npix), np.float32) if into is None else into.reshape(n, c, npix)
            nb, cb = self.nb, self.cb
            for n0 in range(0, n, nb):
                for c0 in range(0, c, cb):
                    xb = x[n0:n0 + nb, c0:c0 + cb]
                    cols = self.columns(xb).reshape(xb.shape[0], xb.shape[1], kk, npix)
                    self.gemm.channelwise(wc[c0:c0 + cb], cols, out=y[n0:n0 + nb, c0:c0 + cb])
            return y
        w = weight.reshape(group, o // group, -1)
        shape = (n, group, o // group, npix)
        y = np.empty(shape, np.float32) if into is None else into.reshape(shape)
        chunk = self.chunk
        if kind == "wide":
            # Small maps: per-image GEMMs would be narrow, so lay the images side by side,
            # (g, K, N*P) columns -> one (Og x K) @ (K x N*P) GEMM per group, then reorder to NCHW.
            for n0 in range(0, n, chunk):
                xb = x[n0:n0 + chunk]
                nb = len(xb)
                yb = self.mm(w, self.columns(xb, batch_last=True).reshape(group, cg * kk, nb * npix))
                y[n0:n0 + nb] = yb.reshape(group, o // group, nb, npix).transpose(2, 0, 1, 3)
        else:
            for n0 in range(0, n, chunk):
                xb = x[n0:n0 + chunk]
                self.mm(w, self.columns(xb).reshape(len(xb), group, cg * kk, npix),
                        out=y[n0:n0 + chunk], part=scratch("part", y[n0:n0 + chunk].shape))
        return y


def numpy_sgemm_bound() -> bool:
    """Whether the extension calls numpy's own BLAS sgemm (``bind_numpy_sgemm``), bound on first use: the
    cblas_sgemm of the OpenBLAS numpy loaded (threadpoolctl names it), checked on products that run in both
    of OpenBLAS's kernels (small-matrix and blocked) to give ``np.matmul``'s bytes."""
    global _SGEMM_BOUND
    if _SGEMM_BOUND is None:
        _SGEMM_BOUND = SMALL_CONV_KERNEL is not None and _bind_numpy_sgemm()
    return _SGEMM_BOUND


def _bind_numpy_sgemm() -> bool:
    from threadpoolctl import ThreadpoolController

    libs = threads.numpy_blas_controllers(ThreadpoolController())
    if len(libs) != 1 or libs[0].internal_api != "openblas":
        return False
    path = str(libs[0].filepath)
    name = os.path.basename(path)
    ilp64 = "openblas64_" in name  # OpenBLAS's 64-bit-integer builds suffix their symbols with 64_
    symbol = ("scipy_" if name.startswith("libscipy_openblas") else "") + "cblas_sgemm" + ("64_" if ilp64 else "")
    if not bind_numpy_sgemm(path, symbol, ilp64):
        return False
    rng = np.random.default_rng(0)
    for m, k, n in ((2, 2, 2), (10, 27, 100), (16, 90, 9), (32, 144, 2), (3, 40, 7), (64, 300, 200)):
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        if not np.array_equal(numpy_sgemm(a, b).view(np.uint32), np.matmul(a, b).view(np.uint32)):
            return False
    return True


def _one_call_sized(n: int, o: int, k: int, out) -> bool:
    """Whether a convolution of ``n`` images, ``o`` outputs and ``k = C * prod(kernel)`` columns per output
    pixel keeps its columns and output within :data:`SMALL_COLS` values (the one-call path's bound,
    :meth:`ConvPlan._small`)."""
    return n * max(o, k) * math.prod(out) <= SMALL_COLS


def _direct_args(x_shape, w_shape, stride, pad, dilation, out, group, gemm):
    """The direct C++ kernel's arguments where it keeps numpy's GEMM bytes (or there are none to keep) and
    pays, else None.

    The kernel sums each output in one pass of fused multiply-adds over K = C*prod(k) in column order, with
    AVX-512 or AVX2 alike, which is how numpy's (and Caffe's) AVX-512 OpenBLAS sums a GEMM it does not split in
    K and does not run in a small-matrix kernel (:attr:`caffe_gemm.ConvGemms.same_shape`). Where numpy's BLAS
    rounds like Caffe's (``gemm.exact``) it is taken only where those sums agree; elsewhere (OpenBLAS's Haswell
    kernels on a CPU without AVX-512) no GEMM here has Caffe's bytes, and it is taken wherever it pays but on
    inputs small enough for the one-call path (:meth:`ConvPlan.native`; MTCNN's P-Net on 12 x 12: 0.04 ms
    with its 1x1 heads direct, 0.015 ms in one call). It pays
    for short K (reading the input in place beats packing it) unless many outputs share each column (then the
    GEMM's blocking wins): :data:`DIRECT_SHAPES`, K <= 64 with at most 64 outputs, measured in the nets (CPU
    time of alternating forwards): UltraFace 9.8 ms with it, 10.9 without; on open_nsfw's 1x1 layers of K = 32 /
    128 outputs and K = 128 / 32 outputs, which looked faster alone, the net was 2-10% slower with them. A
    kernel of several taps reads each input value several times from cache, and pays up to K = 256 with at most
    64 outputs (:data:`DIRECT_SPATIAL_SHAPES`): open_nsfw's 7x7/2 conv_1 (K = 147, O = 64) 29 -> 17.5 ms alone,
    the net (batch 8) 253 -> 231 ms; MTCNN P-Net on 240x320 (conv2, K = 90) 11.3 -> 7.7 ms; the others 0.94-1.01
    (alternating forwards, CPU time, load 1.5-2.7). Maps narrower than 16 pixels waste its 16-wide vectors (1x1
    stride-1 maps are flattened into one row first). The bias is added in the kernel's stores.
    """
    o, ksz = w_shape[0], tuple(w_shape[2:])
    k = x_shape[1] * math.prod(ksz)
    if (DIRECT_KERNEL is None or simd_level() < 1 or len(x_shape) != 4 or group != 1 or gemm.same_shape
            or (not gemm.exact and _one_call_sized(x_shape[0], o, k, out)) or k > DIRECT_MAX_K
            or not any(k <= kk and o <= oo for kk, oo in (DIRECT_SHAPES if ksz == (1, 1) else DIRECT_SPATIAL_SHAPES))):
        return None
    n, c, h, w = x_shape
    if ksz == (1, 1) and stride == (1, 1) and not any(pad):  # flattened into one row
        return (n, c, 1, h * w), [1, 1], [0, 0], [1, 1], [1, h * w], n * o * k * h * w
    if out[1] < 16:
        return None
    return None, list(stride), list(pad), list(dilation), list(out), n * o * k * math.prod(out)


def _direct(x, weight, args, out, bias, into=None):
    """The convolution by the direct kernel with :func:`_direct_args`' ``args``, the bias added; ``into`` as
    :meth:`ConvPlan.__call__` passes it (already checked by :func:`_fits`)."""
    flat, stride, pad, dilation, grid, macs = args
    w4 = np.ascontiguousarray(weight)
    b = None if bias is None else np.ascontiguousarray(bias, np.float32).reshape(-1)
    x = np.ascontiguousarray(x)
    y = DIRECT_KERNEL(x if flat is None else x.reshape(flat), w4, stride, pad, dilation, grid, _workers(macs), b,
                      _flat(into, flat))
    return y if flat is None else y.reshape((x.shape[0], weight.shape[0]) + tuple(out))


def _fits(into, shape: tuple, *inputs) -> bool:
    """Whether ``into`` may take a convolution's result of ``shape`` (:meth:`ConvPlan.__call__`)."""
    return (into is not None and into.shape == shape and into.dtype == np.float32 and into.flags.c_contiguous
            and into.flags.writeable and not any(np.may_share_memory(into, a) for a in inputs))


def _flat(into, flat):
    """``into`` (None, or an array of the top's shape) as the direct kernel's output: viewed as one row a map
    when ``flat`` (a 1x1 stride-1 convolution flattened, see :func:`_direct_args`)."""
    return into if into is None or flat is None else into.reshape(into.shape[0], into.shape[1], 1, -1)


def _vector(v):
    return None if v is None else np.ascontiguousarray(v, np.float32).reshape(-1)


def _workers(macs: int) -> int:
    return threads.workers() if macs >= DEPTHWISE_THREADED_MACS else 1


# ------------------------------------------------------------------------ layers
