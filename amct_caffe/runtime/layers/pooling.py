"""Pooling, SPP and MaxUnPool (``src/caffe/layers/{pooling,spp,maxunpool}_layer.cpp``).

Pooling of x ``(N, C, H, W)`` with kernel ``k``, stride ``s``, pad ``p`` (per axis) gives
``(N, C, Ho, Wo)`` where Caffe's size rule is

    Ho = ceil((H + 2p - k) / s) + 1          (floor instead of ceil when ceil_mode is false
                                               or round_mode is FLOOR)
    if any pad > 0 and (Ho - 1) * s >= H + p:  Ho -= 1   (the last window must start
                                 inside the image or its top/left padding; Caffe applies this
                                 to both axes when either one is padded)

An output size of 0 gives an empty top, a negative one is refused (Caffe's Blob::Reshape,
``CHECK_GE(dim, 0)``; a freshly built net refuses the empty top too: see
``blob.check_not_empty_at_build``).

Window ``(i, j)`` covers rows ``hs = i*s - p .. hs + k`` (same for columns):

* MAX: max over the window clipped to the image (so padding never wins; an empty window, possible
  only when stride > kernel, gives -FLT_MAX); optional second top is the argmax as a flat index
  ``h*W + w`` within the plane (first maximum in row-major order, -1 for an empty window).
* AVE: sum over the clipped window divided by ``(min(hs+k, H+p) - hs) * (...)``, i.e. padded
  cells inside the padded image count in the divisor, cells beyond it do not.
* STOCHASTIC: only Caffe's test-phase rule is implemented (``sum x^2 / sum x`` over the
  window, as the GPU kernel does; CPU Caffe has no STOCHASTIC forward at all); in the TRAIN
  phase it is rejected because it samples randomly.

Global pooling uses ``k = (H, W)``, ``s = 1``, ``p = 0``. MAX without the mask top and AVE run in C++
where the extension is built (``csrc/src/conv_cols.cpp``: the same compares, the same sums in the same
order as the NumPy path: the same bytes). The NumPy path, the reference and the fallback, runs MAX's
reductions separably (along W, then along H) on strided views, without a padded copy; AVE sums each
window tap by tap in Caffe's order (row-major, from +0), so its bytes are Caffe's.
"""

from __future__ import annotations

import math

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.runtime import threads
from amct_caffe.runtime.blob import WINDOW_LIMIT, clamped_strides
from amct_caffe.runtime.layer import EmptyBackward, Layer
from amct_caffe.runtime.layers import pooling_grad
from amct_caffe.ops import register

try:  # csrc/src/conv_cols.cpp (max_pool2d); Pooling(..., native=False) is the reference
    from amct_caffe._kernels import pool2d as POOL_KERNEL
except ImportError:
    POOL_KERNEL = None
try:
    from amct_caffe._kernels import SmallPool as SMALL_POOL
except ImportError:
    SMALL_POOL = None
# Below this many input floats a pooling runs on one thread.
THREADED_POOL = 1 << 18

MAX, AVE, STOCHASTIC = "MAX", "AVE", "STOCHASTIC"
_FLT_MIN = np.float32(np.finfo(np.float32).tiny)
_FLT_MAX = np.float32(np.finfo(np.float32).max)


def pooled_size(size: int, k: int, s: int, p: int, ceil_mode: bool = True, padded: bool | None = None) -> int:
    """Caffe's pooled output size along one axis (see the module doc).

    ``padded``: whether the layer has any padding (default: ``p > 0``). pooling_layer.cpp clips
    the last window on *both* axes when either one is padded (``if (pad_h_ || pad_w_)``).
    """
    num = size + 2 * p - k
    out = (-(-num // s) if ceil_mode else num // s) + 1
    if (p if padded is None else padded) and (out - 1) * s >= size + p:
        out -= 1
    return out


def pooled_hw(h: int, w: int, k, s, p, ceil_mode: bool = True) -> tuple[int, int]:
    """(Ho, Wo) of Caffe's PoolingLayer::Reshape for an h x w map."""
    padded = bool(p[0] or p[1])
    return (pooled_size(h, k[0], s[0], p[0], ceil_mode, padded), pooled_size(w, k[1], s[1], p[1], ceil_mode, padded))


def _windows(x, k, s, p, out, fill):
    """Yield, for each kernel tap (row-major), the (N, C, Ho, Wo) view of the padded input.

    The input is padded with ``fill`` to the extent the windows reach (used for the mask top).
    """
    h, w = x.shape[2:]
    ext = ((out[0] - 1) * s[0] + k[0], (out[1] - 1) * s[1] + k[1])
    if p == (0, 0) and ext[0] <= h and ext[1] <= w:
        xp = x
    else:
        xp = np.full(x.shape[:2] + (max(ext[0], h + p[0]), max(ext[1], w + p[1])), fill, np.float32)
        xp[:, :, p[0]:p[0] + h, p[1]:p[1] + w] = x
    for i in range(k[0]):
        for j in range(k[1]):
            yield i, j, xp[:, :, i:i + s[0] * (out[0] - 1) + 1:s[0], j:j + s[1] * (out[1] - 1) + 1:s[1]]


def _reduce_axis(x, axis, k, s, p, n_out, op, fill):
    """Reduce ``x`` along ``axis`` over Caffe's windows clipped to the input, with ufunc ``op``.

    Output ``o`` combines inputs ``o*s - p + t`` for taps ``t < k`` that fall inside
    ``[0, size)``; a window with no such input keeps ``fill``. No padded copy is made: each tap
    updates the contiguous range of outputs it reaches, through strided views.
    """
    size = x.shape[axis]
    pre = (slice(None),) * axis
    taps = []
    for t in range(k):
        lo = max(0, -((t - p) // s))  # first o with o*s - p + t >= 0
        hi = min(n_out, (size - 1 + p - t) // s + 1)  # past the last o with o*s - p + t < size
        if hi > lo:
            start = lo * s - p + t
            taps.append((lo, hi, x[pre + (slice(start, start + (hi - lo - 1) * s + 1, s),)]))
    full = next((i for i, (lo, hi, _) in enumerate(taps) if lo == 0 and hi == n_out), None)
    if full is None:
        y = np.full(x.shape[:axis] + (n_out,) + x.shape[axis + 1:], fill, np.float32)
    else:
        y = np.array(taps.pop(full)[2], dtype=np.float32, order="C")
    for lo, hi, src in taps:
        dst = y[pre + (slice(lo, hi),)]
        op(dst, src, out=dst)
    return y


def _pool2d(x, k, s, p, out, op, fill):
    """Separable window reduction: along W first, then along H (a clipped window is a rectangle)."""
    t = _reduce_axis(x, 3, k[1], s[1], p[1], out[1], op, fill)
    return _reduce_axis(t, 2, k[0], s[0], p[0], out[0], op, fill)


def _ave_divisor(size, k, s, p, n_out) -> np.ndarray:
    starts = np.arange(n_out) * s - p
    return (np.minimum(starts + k, size + p) - starts).astype(np.float32)


def Pooling(x, *, pool=MAX, kernel=(1, 1), stride=(1, 1), pad=(0, 0), global_pooling=False,
            ceil_mode=True, return_mask=False, phase_test=True, native=True):  # noqa: N802 - Caffe type name
    """Caffe pooling of ``x`` (N, C, H, W); returns the pooled array (and the MAX mask if asked).

    ``native``: MAX without the mask in C++ when the extension is built (False: the NumPy path).
    """
    x = np.asarray(x, np.float32)
    n, c, h, w = x.shape
    k, s, p = tuple(kernel), tuple(stride), tuple(pad)
    if global_pooling:
        k, s, p = (h, w), (1, 1), (0, 0)
    if min(k) <= 0:
        raise ValueError(f"pooling kernel {k} has a zero side (global pooling of an empty {h}x{w} map?)")
    out = pooled_hw(h, w, k, s, p, ceil_mode)
    if min(out) < 0:
        raise ValueError(f"pooling output size {list(out)} is negative: input {(h, w)}, kernel {k}, stride {s}")
    if 0 in out:  # an empty top (count 0), as Caffe's Blob::Reshape allows; nothing to compute
        y = np.zeros((n, c) + out, np.float32)
        return (y, y.copy()) if pool == MAX and return_mask else y
    if native and POOL_KERNEL is not None and (pool == AVE or (pool == MAX and not return_mask)):
        return POOL_KERNEL(np.ascontiguousarray(x), pool, list(k), list(s), list(p), list(out),
                           threads.workers() if x.size >= THREADED_POOL else 1)
    if pool == MAX:
        # Caffe keeps a tap only where it is strictly greater than the running max, which starts
        # at -FLT_MAX: NaN never wins, and a window of NaN only (or empty) gives -FLT_MAX. fmax
        # skips NaN likewise; a final fmax with -FLT_MAX replaces the NaN of all-NaN windows.
        if out == (1, 1) and k == (h, w) and p == (0, 0) and not return_mask:
            return _global_max(x)
        if not return_mask:
            y = _pool2d(x, k, s, p, out, np.fmax, -_FLT_MAX)
            return np.fmax(y, -_FLT_MAX, out=y)
        # Caffe's loop: top = -FLT_MAX, mask = -1, then each tap in row-major order replaces
        # them where it is strictly greater (padding holds -inf, so it never wins).
        y = np.full((n, c) + out, -_FLT_MAX, np.float32)
        mask = np.full((n, c) + out, -1, np.int64)
        for i, j, win in _windows(x, k, s, p, out, -np.inf):
            better = win > y
            tap = (np.arange(out[0]) * s[0] - p[0] + i)[:, None] * w + (np.arange(out[1]) * s[1] - p[1] + j)
            np.copyto(mask, np.broadcast_to(tap, mask.shape), where=better)
            np.copyto(y, win, where=better)
        return y, mask.astype(np.float32)
    if pool == AVE:
        # Caffe's order: each window summed tap by tap in row-major order from +0, then divided once. A cell
        # outside the image adds +0, which changes no sum (Caffe skips it); float32 sums in another order
        # (NumPy's pairwise sum, rows then columns) differ in the last bits, which a squashing layer after a
        # large-valued pooling can make visible.
        if out == (1, 1) and k == (h, w) and p == (0, 0):  # global: the planes' running sums side by side
            planes = np.ascontiguousarray(x.reshape(n * c, h * w).T)
            total = np.add.reduce(planes, axis=0, initial=np.float32(0))  # row after row: each plane in order
            return (total / np.float32(h * w)).reshape(n, c, 1, 1)
        y = np.zeros((n, c) + out, np.float32)
        for _, _, win in _windows(x, k, s, p, out, 0.0):
            y += win
        div = np.outer(_ave_divisor(h, k[0], s[0], p[0], out[0]), _ave_divisor(w, k[1], s[1], p[1], out[1]))
        with np.errstate(divide="ignore", invalid="ignore"):  # an empty window divides 0 by <= 0, as in C++
            y /= div
        return y
    if pool == STOCHASTIC:
        if not phase_test:
            raise ValueError("STOCHASTIC pooling samples randomly in the TRAIN phase; only the TEST-phase "
                             "rule (sum x^2 / sum x) is implemented")
        if p != (0, 0):
            raise ValueError("STOCHASTIC pooling takes no padding")
        ssum = _pool2d(x, k, s, p, out, np.add, 0.0)
        ssq = _pool2d(x * x, k, s, p, out, np.add, 0.0)
        return ssq / (ssum + _FLT_MIN)
    raise ValueError(f"unknown pooling method {pool!r}")


def pool_backward(layer, dy, x, mask, kernel, stride, pad) -> np.ndarray:
    """Bottom diff of ``layer``'s pooling of ``x`` (``kernel`` None: global) for top diff ``dy``.

    ``mask``: the MAX argmax as flat plane indices when the forward gave it (Caffe's mask top).
    """
    h, w = x.shape[2:]
    k, s, p = ((h, w), (1, 1), (0, 0)) if kernel is None else (kernel, stride, pad)
    if layer.pool == AVE:
        return pooling_grad.ave_pool_backward(dy, (h, w), k, s, p)
    if layer.pool != MAX:
        raise GraphError(f"layer '{layer.name}' ({layer.type}): {layer.pool} pooling has no backward pass (Caffe's "
                         "Backward_cpu is NOT_IMPLEMENTED for it); set propagate_down: false or lr_mult: 0 so no "
                         "gradient has to cross it")
    if kernel is None or (k == (h, w) and p == (0, 0)):  # one window per plane
        return pooling_grad.global_max_backward(dy, pooling_grad.global_max_mask(x) if mask is None else mask, (h, w))
    ceil = getattr(layer, "ceil_mode", True)
    y = Pooling(x, pool=MAX, kernel=k, stride=s, pad=p, ceil_mode=ceil) if mask is None else None
    return pooling_grad.max_pool_backward(dy, x, y, k, s, p, mask)


def _enum_name(msg, field: str) -> str:
    fd = msg.DESCRIPTOR.fields_by_name[field]
    return fd.enum_type.values_by_number[getattr(msg, field)].name


@register("Pooling")
class PoolingLayer(Layer):
    """Caffe's Pooling: see :func:`Pooling`. A second top (MAX only) receives the argmax mask."""

    in_place_differs = "Caffe's Pooling fills its top (-FLT_MAX or 0) before it reads the bottom"

    num_tops = (1, 2)

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        pp = lp.pooling_param
        self.pool = _enum_name(pp, "pool")
        if pp.global_pooling:
            if pp.HasField("kernel_size") or pp.HasField("kernel_h") or pp.HasField("kernel_w"):
                self._fail("with global_pooling the kernel size cannot be given")
            self.kernel = None
        elif pp.HasField("kernel_size") == (pp.HasField("kernel_h") and pp.HasField("kernel_w")):
            self._fail("give kernel_size, or kernel_h and kernel_w (not both)")
        else:
            self.kernel = (pp.kernel_size,) * 2 if pp.HasField("kernel_size") else (pp.kernel_h, pp.kernel_w)
            if min(self.kernel) <= 0:
                self._fail("kernel dimensions must be positive")
        if pp.HasField("pad") and (pp.HasField("pad_h") or pp.HasField("pad_w")):
            self._fail("give pad, or pad_h and pad_w (not both)")
        if pp.HasField("pad_h") != pp.HasField("pad_w"):
            self._fail("pad_h and pad_w must be given together")
        if pp.HasField("stride") and (pp.HasField("stride_h") or pp.HasField("stride_w")):
            self._fail("give stride, or stride_h and stride_w (not both)")
        if pp.HasField("stride_h") != pp.HasField("stride_w"):
            self._fail("stride_h and stride_w must be given together")
        self.pad = (pp.pad_h, pp.pad_w) if pp.HasField("pad_h") else (pp.pad, pp.pad)
        self.stride = (pp.stride_h, pp.stride_w) if pp.HasField("stride_h") else (pp.stride, pp.stride)
        if min(self.stride) <= 0:
            self._fail("stride must be positive")
        self.stride = clamped_strides(self.stride)  # the same windows (blob.py), within the kernels' ints
        if pp.global_pooling and (self.pad != (0, 0) or self.stride != (1, 1)):
            self._fail("with global_pooling only pad 0 and stride 1 are allowed")
        if self.pad != (0, 0):
            if self.pool not in (MAX, AVE):
                self._fail("padding is implemented only for MAX and AVE pooling")
            if self.kernel is not None and (self.pad[0] >= self.kernel[0] or self.pad[1] >= self.kernel[1]):
                self._fail(f"pad {self.pad} must be smaller than the kernel {self.kernel}")
        self.ceil_mode = self._ceil_mode(pp)
        if len(lp.top) > 1 and self.pool != MAX:
            self._fail("only MAX pooling has a second (mask) top")
        if self.pool == STOCHASTIC and phase != 1:
            self._fail("STOCHASTIC pooling samples randomly in the TRAIN phase; only the TEST phase is "
                       "supported")
        self._keep_argmax = False  # set by on_net_built
        self._argmax = None  # (N, C, Ho, Wo) int32 of the last forward, when kept
        self._argmax_in_hw = None

    @staticmethod
    def _ceil_mode(pp) -> bool:
        # The fork's ceil_mode (default true) and BVLC master's round_mode (default CEIL), when
        # the schema has them: either one set to floor rounding gives floor.
        fields = pp.DESCRIPTOR.fields_by_name
        ceil = True
        if "ceil_mode" in fields:
            ceil = ceil and pp.ceil_mode
        if "round_mode" in fields and pp.HasField("round_mode"):
            ceil = ceil and _enum_name(pp, "round_mode") == "CEIL"
        return ceil

    def _fail(self, msg: str):
        raise GraphError(f"layer '{self.name}' (Pooling): {msg}")

    def reshape(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        if len(shape) != 4:
            self._fail(f"input must have 4 axes (N, C, H, W), got shape {list(shape)}")
        n, c, h, w = shape
        if self.kernel is None:
            k, s, p = (h, w), (1, 1), (0, 0)
        else:
            k, s, p = self.kernel, self.stride, self.pad
        if min(k) <= 0:
            # Caffe's LayerSetUp: CHECK_GT(kernel_h_, 0) "Filter dimensions cannot be zero."
            self._fail(f"global pooling of the empty {h}x{w} map of input {list(shape)}: the kernel would be 0")
        if max(h + 2 * p[0], w + 2 * p[1], *k) > WINDOW_LIMIT:
            self._fail(f"the padded input {[h + 2 * p[0], w + 2 * p[1]]} or the kernel {list(k)} exceeds "
                       f"{WINDOW_LIMIT}: the sums of such extents overflow the int index arithmetic of Caffe and of "
                       "the kernels; give a smaller pad or kernel")
        out = pooled_hw(h, w, k, s, p, self.ceil_mode)
        if min(out) < 0:
            self._fail(f"output size {list(out)} is negative for input {list(shape)} (kernel {list(k)}, pad "
                       f"{list(p)}, stride {list(s)}); Caffe refuses a negative blob dimension: give a larger "
                       "input or a smaller kernel")
        return [(n, c) + out] * len(self.lp.top)

    def on_net_built(self, net, index: int) -> None:
        """MAX pooling in a net that runs its backward keeps the forward's argmax (Caffe's max_idx_)."""
        step = net._plan.steps[net._plan.step_of_layer[index]]
        self._keep_argmax = (self.pool == MAX and len(self.lp.top) == 1 and step.need_backward
                             and pooling_grad.MAX_POOL_KERNEL is not None)

    def _window(self, shape):
        """(kernel, stride, pad, output size) for a bottom of ``shape`` (global pooling resolved)."""
        h, w = shape[2:]
        k, s, p = ((h, w), (1, 1), (0, 0)) if self.kernel is None else (self.kernel, self.stride, self.pad)
        return k, s, p, pooled_hw(h, w, k, s, p, self.ceil_mode)

    def forward(self, bottoms):
        # in place, the bottom blob is the top at backward time: keep the input for MAX's argmax
        self._kept_input = bottoms[0] if self.in_place else None
        self._argmax = None
        if self._keep_argmax and bottoms[0].ndim == 4 and bottoms[0].size:
            k, s, p, out = self._window(bottoms[0].shape)
            if min(out) > 0:
                y, self._argmax = pooling_grad.max_pool_argmax(bottoms[0], k, s, p, out)
                self._argmax_in_hw = bottoms[0].shape[2:]
                return [y]
        res = Pooling(bottoms[0], pool=self.pool, kernel=self.kernel or (1, 1), stride=self.stride,
                      pad=self.pad,
                      global_pooling=self.kernel is None, ceil_mode=self.ceil_mode,
                      return_mask=len(self.lp.top) > 1, phase_test=self.phase == 1)
        res = list(res) if isinstance(res, tuple) else [res]
        self._mask_top = res[1] if len(res) > 1 else None
        return res

    def prepared_forward(self, bottom_shapes):
        """MAX pooling without a mask top or a kept argmax: straight to the C++ kernel, as :func:`Pooling`."""
        shape = tuple(bottom_shapes[0])
        if (self.pool != MAX or POOL_KERNEL is None or len(self.lp.top) > 1 or self._keep_argmax or self.in_place
                or len(shape) != 4 or 0 in shape):
            return self.forward
        k, s, p, out = self._window(shape)
        if min(out) <= 0:
            return self.forward
        self._kept_input = self._argmax = self._mask_top = None  # what forward leaves for such a layer
        if tuple(out) == (1, 1) and tuple(k) == tuple(shape[2:]) and not any(p):
            # a whole plane per output: one vectorized reduction (the kernel's taps-outer loops get rows of
            # one output); NaN skipped and all-NaN -FLT_MAX as in Caffe's loop (Pooling's NumPy path)
            return lambda bottoms, outs=(None,): [_global_max(bottoms[0])]
        args = (MAX, list(k), list(s), list(p), list(out))
        threaded = math.prod(shape) >= THREADED_POOL

        def forward(bottoms, outs=(None,)):  # outs: see Layer.prepared_forward_into
            return [POOL_KERNEL(np.ascontiguousarray(bottoms[0]), *args, threads.workers() if threaded else 1, outs[0])]
        if SMALL_POOL is not None and not threaded:  # the same kernel in forward.py's runner of native ops
            forward.small_op = (SMALL_POOL(list(shape), *args[1:]), [], False, None)
        else:
            forward.takes_outs = True  # writes the top into the array offered (Layer.prepared_forward_into)
        return forward

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """Caffe's PoolingLayer::Backward_cpu (see :mod:`pooling_grad`); the mask top's diff is unused.

        MAX routes each output's diff to its argmax (the mask top when there is one, as Caffe
        reads it, else the argmax recomputed from the forward's input); AVE spreads it over the
        window as ``dy / pool_size``. STOCHASTIC has no CPU backward in Caffe and is refused.
        """
        if not propagate_down[0]:
            return [None]
        if self._argmax is not None and top_diffs[0].shape == self._argmax.shape:
            k, s, p, _ = self._window((0, 0) + tuple(self._argmax_in_hw))
            return [pooling_grad.argmax_backward(top_diffs[0], self._argmax, self._argmax_in_hw, k, s, p)]
        x = self._kept_input if self.in_place else bottoms[0]
        mask = tops[1] if len(tops) > 1 else None
        if mask is not None and self.pool == MAX and not (
                mask is self._mask_top or np.array_equal(mask, self._mask_top, equal_nan=True)):
            # an in-place layer rewrote the mask top, whose data Caffe reads as the indices
            return [pooling_grad.rewritten_mask_backward(top_diffs[0], mask, x.shape,
                                                         f"layer '{self.name}' (Pooling)")]
        return [pool_backward(self, top_diffs[0], x, mask, self.kernel, self.stride, self.pad)]


def _global_max(x: np.ndarray) -> np.ndarray:
    """MAX pooling of each whole plane of x (N, C, H, W) -> (N, C, 1, 1): fmax skips NaN as Caffe's strict
    comparison does, and a final fmax with -FLT_MAX (Caffe's start) replaces the NaN of an all-NaN plane."""
    n, c = x.shape[:2]
    y = np.fmax.reduce(x.reshape(n, c, -1), axis=2, keepdims=True).reshape(n, c, 1, 1)
    return np.fmax(y, -_FLT_MAX, out=y)


def MaxUnPool(x, mask, *, out_h, out_w):  # noqa: N802 - Caffe type name
    """Scatter ``x`` (N, C, H, W) to ``(N, C, out_h, out_w)`` zeros at the flat plane indices ``mask``.

    ``y[n, c].flat[mask[n, c, i]] = x[n, c, i]`` (the inverse of MAX pooling's mask top; where
    two entries hit one cell the later one wins, as in Caffe's loop).
    """
    x = np.asarray(x, np.float32)
    n, c = x.shape[:2]
    plane = out_h * out_w
    idx = np.asarray(mask).reshape(n * c, -1).astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= plane):
        raise ValueError(f"unpool index out of range [0, {plane}): min {idx.min()}, max {idx.max()}")
    y = np.zeros((n * c, plane), np.float32)
    rows = np.broadcast_to(np.arange(n * c)[:, None], idx.shape)
    y[rows.ravel(), idx.ravel()] = x.reshape(n * c, -1).ravel()  # later duplicates win, as in the C++ loop
    return y.reshape(n, c, out_h, out_w)


@register("MaxUnPool")
class MaxUnPoolLayer(EmptyBackward, Layer):
    """The fork's MaxUnPool: bottoms [data, mask from a MAX Pooling], ``max_unpool_param.dst_h/dst_w``."""

    num_bottoms = 2

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        mp = lp.max_unpool_param
        if not (mp.HasField("dst_h") and mp.HasField("dst_w")):
            raise GraphError(f"layer '{lp.name}' (MaxUnPool): max_unpool_param.dst_h and dst_w are required")
        self.out = (mp.dst_h, mp.dst_w)

    def reshape(self, bottom_shapes):
        shape, mshape = tuple(bottom_shapes[0]), tuple(bottom_shapes[1])
        if len(shape) != 4 or math.prod(mshape) != math.prod(shape):
            raise GraphError(f"layer '{self.name}' (MaxUnPool): needs a 4-D data bottom and a mask of the "
                             f"same size, got {list(shape)} and {list(mshape)}")
        return [shape[:2] + self.out]

    def forward(self, bottoms):
        try:
            return [MaxUnPool(bottoms[0], bottoms[1], out_h=self.out[0], out_w=self.out[1])]
        except ValueError as e:
            # Caffe writes through such an index (heap corruption); a MAX pooling window lying
            # wholly past the input (ceil mode, no padding) gives the mask -1.
            raise GraphError(f"layer '{self.name}' (MaxUnPool): {e}") from None


def spp_level_params(level: int, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(kernel, pad) of pyramid level ``level`` (2^level bins per side) for an h x w map; the
    stride equals the kernel (spp_layer.cpp's GetPoolingParam)."""
    bins = 2 ** level
    kernel = (-(-h // bins), -(-w // bins))
    pad = ((kernel[0] * bins - h + 1) // 2, (kernel[1] * bins - w + 1) // 2)
    return kernel, pad


@register("SPP")
class SPPLayer(Layer):
    """Caffe's spatial pyramid pooling (``spp_param``: pyramid_height, pool).

    Level ``i`` pools the map into about ``2^i x 2^i`` bins with Caffe's Pooling (kernel
    ``ceil(H / 2^i)``, stride = kernel, pad ``(kernel * 2^i - H + 1) // 2``, its size rule
    included); the levels are flattened and concatenated to ``(N, C * sum_i bins_i)``. With
    ``pyramid_height: 1`` the top is the single pooled ``(N, C, 1, 1)`` blob.
    """

    in_place_differs = "Caffe's SPP pools into its top before it has read all of the bottom"

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        sp = lp.spp_param
        self.pool = _enum_name(sp, "pool")
        if sp.pyramid_height < 1:
            raise GraphError(f"layer '{lp.name}' (SPP): spp_param.pyramid_height must be >= 1")
        if self.pool == STOCHASTIC and phase != 1:
            raise GraphError(f"layer '{lp.name}' (SPP): STOCHASTIC pooling is supported in the TEST phase "
                             "only")

    def _levels(self, shape):
        if len(shape) != 4:
            raise GraphError(f"layer '{self.name}' (SPP): input must have 4 axes, got shape {list(shape)}")
        levels = []
        for i in range(self.lp.spp_param.pyramid_height):
            k, p = spp_level_params(i, shape[2], shape[3])
            if p[0] >= k[0] or p[1] >= k[1] or (self.pool == STOCHASTIC and p != (0, 0)):
                raise GraphError(f"layer '{self.name}' (SPP): level {i} needs pad {p} for kernel {k} on a "
                                 f"{shape[2]}x{shape[3]} map, which Caffe's Pooling rejects")
            levels.append((k, p))
        return levels

    def reshape(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        levels = self._levels(shape)
        if len(levels) == 1:
            return [shape[:2] + (1, 1)]
        size = sum(math.prod(pooled_hw(shape[2], shape[3], k, k, p)) for k, p in levels)
        return [(shape[0], shape[1] * size)]

    def forward(self, bottoms):
        x = bottoms[0]
        outs = [Pooling(x, pool=self.pool, kernel=k, stride=k, pad=p) for k, p in self._levels(x.shape)]
        if len(outs) == 1:
            return outs
        return [np.concatenate([o.reshape(x.shape[0], -1) for o in outs], axis=1)]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """Caffe's SPPLayer::Backward_cpu: each level's slice of the top diff goes back through its
        pooling, and the levels' bottom diffs add up (Caffe's internal Split)."""
        if not propagate_down[0]:
            return [None]
        x = bottoms[0]
        n, c, h, w = x.shape
        dy = top_diffs[0].reshape(n, -1)
        total, at = None, 0
        for k, p in self._levels(x.shape):
            out = pooled_hw(h, w, k, k, p)
            size = c * out[0] * out[1]
            dx = pool_backward(self, dy[:, at:at + size].reshape((n, c) + out), x, None, k, k, p)
            total = dx if total is None else np.add(total, dx, out=total)
            at += size
        return [total]
