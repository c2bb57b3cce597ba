"""Convolution and Deconvolution (``src/caffe/layers/{base_conv,conv,deconv}_layer.cpp``).

Shapes, for ``S`` spatial axes after the channel axis (2-D is the common case, any ``S >= 1``
works):

* Convolution: x ``(N, C, *in)``, weight ``(O, C/g, *k)``, bias ``(O,)`` ->
  ``(N, O, *out)`` with ``out = (in + 2*pad - (dilation*(k-1)+1)) // stride + 1``;
  ``y[n, o, p] = b[o] + sum_{c in group(o), t} w[o, c, t] * xpad[n, c, p*stride + t*dilation]``.
* Deconvolution (the transpose of the above): x ``(N, C, *in)``, weight ``(C, O/g, *k)`` ->
  ``(N, O, *out)`` with ``out = stride*(in-1) + dilation*(k-1)+1 - 2*pad``;
  ``ypad[n, o, i*stride + t*dilation] += w[c, o, t] * x[n, c, i]``, then the border ``pad``
  is cropped.

Execution strategy (speed matters, calibration runs models many times):

* depthwise (``group == C == O``): a loop over the ``prod(k)`` taps, each a vectorised
  multiply-add over the whole batch; no im2col, no BLAS (Caffe runs C tiny GEMMs here);
* 1x1 kernels without padding: the input itself is the im2col matrix (strided for stride > 1),
  so one batched GEMM;
* otherwise im2col by one strided copy per tap into a ``(N, g, C/g*prod(k), prod(out))``
  buffer, then one ``np.matmul`` per (image, group) pair, all BLAS sgemm in float32.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.runtime.layer import Layer, canonical_axis
from amct_caffe.runtime.registry import register


# ------------------------------------------------------------------------ pure kernels
def _tuple(v, n: int, default: int) -> tuple[int, ...]:
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


def _tap_slices(tap, stride, dilation, out) -> tuple[slice, ...]:
    """Slices of the padded input that kernel tap ``tap`` reads for every output position."""
    return tuple(slice(t * d, t * d + s * (o - 1) + 1, s) for t, s, d, o in zip(tap, stride, dilation, out))


def _pad_spatial(x: np.ndarray, pad, value: float = 0.0, extent=None) -> np.ndarray:
    """``x`` (N, C, *sp) with ``pad`` cells of ``value`` before each spatial axis.

    ``extent`` (padded sizes) defaults to ``sp + 2*pad``; cells beyond the input are ``value``.
    Returns ``x`` itself when nothing is added.
    """
    sp = x.shape[2:]
    if extent is None:
        extent = tuple(n + 2 * p for n, p in zip(sp, pad))
    if not any(pad) and tuple(extent) == tuple(sp):
        return x
    out = np.full(x.shape[:2] + tuple(extent), value, dtype=np.float32)
    inner = tuple(slice(p, p + min(n, e - p)) for n, p, e in zip(sp, pad, extent))
    out[(slice(None), slice(None)) + inner] = x[(Ellipsis,) + tuple(slice(0, s.stop - s.start) for s in inner)]
    return out


def conv_out_size(size: int, k: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - (dilation * (k - 1) + 1)) // stride + 1


def deconv_out_size(size: int, k: int, stride: int, pad: int, dilation: int) -> int:
    return stride * (size - 1) + dilation * (k - 1) + 1 - 2 * pad


def _depthwise(xp: np.ndarray, w: np.ndarray, stride, dilation, out) -> np.ndarray:
    """Depthwise convolution of the padded input ``xp`` (N, C, *sp) with ``w`` (C, 1, *k)."""
    n, c = xp.shape[:2]
    ksz = w.shape[2:]
    wt = w.reshape(c, -1)
    bshape = (c,) + (1,) * len(out)  # per-channel weight broadcast over the spatial axes
    y = np.empty((n, c) + tuple(out), np.float32)
    tmp = np.empty_like(y)
    for i, tap in enumerate(itertools.product(*map(range, ksz))):
        src = xp[(slice(None), slice(None)) + _tap_slices(tap, stride, dilation, out)]
        if i == 0:
            np.multiply(src, wt[:, i].reshape(bshape), out=y)
        else:
            np.multiply(src, wt[:, i].reshape(bshape), out=tmp)
            y += tmp
    return y


def _im2col(xp: np.ndarray, ksz, stride, dilation, out) -> np.ndarray:
    """``xp`` (N, C, *sp) -> columns (N, C, *k, *out): one strided copy per kernel tap."""
    n, c = xp.shape[:2]
    cols = np.empty((n, c) + tuple(ksz) + tuple(out), np.float32)
    for tap in itertools.product(*map(range, ksz)):
        cols[(slice(None), slice(None)) + tap] = xp[(slice(None), slice(None))
                                                    + _tap_slices(tap, stride, dilation, out)]
    return cols


def Convolution(x, weight, bias=None, *, stride=1, pad=0, dilation=1, group=1):  # noqa: N802 - Caffe type name
    """Caffe convolution of ``x`` (N, C, *in) by ``weight`` (O, C/group, *k); see the module doc."""
    x = np.asarray(x, np.float32)
    weight = np.asarray(weight, np.float32)
    n, c = x.shape[:2]
    nsp = x.ndim - 2
    o = weight.shape[0]
    ksz = weight.shape[2:]
    stride, pad, dilation = _tuple(stride, nsp, 1), _tuple(pad, nsp, 0), _tuple(dilation, nsp, 1)
    if c % group or o % group or weight.shape[1] * group != c:
        raise ValueError(f"weight {weight.shape} does not fit {c} input channels in {group} group(s)")
    out = tuple(conv_out_size(s, k, st, p, d) for s, k, st, p, d in zip(x.shape[2:], ksz, stride, pad, dilation))
    if min(out, default=1) <= 0:
        raise ValueError(f"convolution output would be empty: input {x.shape[2:]}, kernel {ksz}")
    if group == c == o:
        y = _depthwise(_pad_spatial(x, pad), weight, stride, dilation, out)
    else:
        cg = c // group
        if all(k == 1 for k in ksz) and not any(pad):
            # 1x1: the (strided) input already is the column matrix.
            xs = x[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)]
            cols = np.ascontiguousarray(xs).reshape(n, group, cg, -1)
        else:
            cols = _im2col(_pad_spatial(x, pad), ksz, stride, dilation, out).reshape(n, group, -1, math.prod(out))
        w = weight.reshape(group, o // group, -1)
        y = np.matmul(w, cols).reshape((n, o) + out)
    if bias is not None:
        y += np.asarray(bias, np.float32).reshape((o,) + (1,) * nsp)
    return y


def Deconvolution(x, weight, bias=None, *, stride=1, pad=0, dilation=1, group=1):  # noqa: N802
    """Caffe deconvolution of ``x`` (N, C, *in) by ``weight`` (C, O/group, *k); see the module doc."""
    x = np.asarray(x, np.float32)
    weight = np.asarray(weight, np.float32)
    n, c = x.shape[:2]
    sp = x.shape[2:]
    nsp = len(sp)
    ksz = weight.shape[2:]
    o = weight.shape[1] * group
    stride, pad, dilation = _tuple(stride, nsp, 1), _tuple(pad, nsp, 0), _tuple(dilation, nsp, 1)
    if weight.shape[0] != c or c % group:
        raise ValueError(f"weight {weight.shape} does not fit {c} input channels in {group} group(s)")
    out = tuple(deconv_out_size(s, k, st, p, d) for s, k, st, p, d in zip(sp, ksz, stride, pad, dilation))
    if min(out, default=1) <= 0:
        raise ValueError(f"deconvolution output would be empty: input {sp}, kernel {ksz}")
    cg, og = c // group, o // group
    # cols[n, g, (o', t), i] = sum_c w[g, c, (o', t)] * x[n, g, c, i]  (col2im input)
    wt = np.ascontiguousarray(weight.reshape(group, cg, og * math.prod(ksz)).transpose(0, 2, 1))
    cols = np.matmul(wt, x.reshape(n, group, cg, -1)).reshape((n, o) + tuple(ksz) + tuple(sp))
    full = tuple(e + 2 * p for e, p in zip(out, pad))
    if all(k == 1 for k in ksz) and stride == (1,) * nsp:
        yp = cols.reshape((n, o) + tuple(sp))
    else:
        yp = np.zeros((n, o) + full, np.float32)
        for tap in itertools.product(*map(range, ksz)):
            yp[(slice(None), slice(None)) + _tap_slices(tap, stride, dilation, sp)] += cols[
                (slice(None), slice(None)) + tap]
    y = yp
    if any(pad):
        y = np.ascontiguousarray(yp[(slice(None), slice(None)) + tuple(slice(p, p + e) for p, e in zip(pad, out))])
    if bias is not None:
        y += np.asarray(bias, np.float32).reshape((o,) + (1,) * nsp)
    return y


# ------------------------------------------------------------------------ layers
class _BaseConv(Layer):
    """Field parsing shared by Convolution and Deconvolution (Caffe's BaseConvolutionLayer).

    Several bottoms of one shape are allowed; each gives its own top with the same weights.
    """

    num_bottoms = (1, None)
    num_tops = (1, None)
    transposed = False

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        if len(lp.bottom) != len(lp.top):
            raise GraphError(f"layer '{lp.name}' ({lp.type}) needs as many tops as bottoms "
                             f"({len(lp.bottom)} bottoms, {len(lp.top)} tops)")
        cp = lp.convolution_param
        if cp.num_output <= 0:
            raise GraphError(f"layer '{lp.name}' ({lp.type}): convolution_param.num_output must be > 0")
        if cp.group <= 0 or cp.num_output % cp.group:
            raise GraphError(f"layer '{lp.name}' ({lp.type}): num_output {cp.num_output} is not a multiple "
                             f"of group {cp.group}")
        self._geom = None

    def _fail(self, msg: str):
        raise GraphError(f"layer '{self.name}' ({self.type}): {msg}")

    def _geometry(self, shape) -> tuple:
        """(channel axis, kernel, stride, pad, dilation) for a bottom of this shape."""
        cp = self.lp.convolution_param
        axis = canonical_axis(cp.axis, len(shape), self.name)
        nsp = len(shape) - axis - 1
        if nsp < 1:
            self._fail(f"a {len(shape)}-D bottom has no spatial axis after channel axis {axis}")

        def per_axis(values, h_field, w_field, what, default):
            if cp.HasField(h_field) or cp.HasField(w_field):
                if nsp != 2:
                    self._fail(f"{h_field} & {w_field} can only be used for 2-D convolution")
                if len(values):
                    self._fail(f"either {what} or {h_field}/{w_field} should be given, not both")
                return (getattr(cp, h_field), getattr(cp, w_field))
            if len(values) not in ((1, nsp) if default is None else (0, 1, nsp)):
                self._fail(f"{what} must be given once or once per spatial axis ({nsp}), got {len(values)}")
            return _tuple(list(values) or None, nsp, default)

        kernel = per_axis(cp.kernel_size, "kernel_h", "kernel_w", "kernel_size", None)
        stride = per_axis(cp.stride, "stride_h", "stride_w", "stride", 1)
        pad = per_axis(cp.pad, "pad_h", "pad_w", "pad", 0)
        if len(cp.dilation) not in (0, 1, nsp):
            self._fail(f"dilation must be given once or once per spatial axis ({nsp})")
        dilation = _tuple(list(cp.dilation) or None, nsp, 1)
        if min(kernel) <= 0 or min(stride) <= 0 or min(dilation) <= 0:
            self._fail(f"kernel {kernel}, stride {stride} and dilation {dilation} must be positive")
        return axis, kernel, stride, pad, dilation

    def param_shapes(self, bottom_shapes):
        cp = self.lp.convolution_param
        axis, kernel, *_ = self._geometry(bottom_shapes[0])
        channels = bottom_shapes[0][axis]
        g = cp.group
        if channels % g:
            self._fail(f"{channels} input channels are not a multiple of group {g}")
        if self.transposed:
            shapes = [(channels, cp.num_output // g) + kernel]
        else:
            shapes = [(cp.num_output, channels // g) + kernel]
        if cp.bias_term:
            shapes.append((cp.num_output,))
        return shapes

    def param_fillers(self):
        cp = self.lp.convolution_param
        return [cp.weight_filler, cp.bias_filler]

    def reshape(self, bottom_shapes):
        first = tuple(bottom_shapes[0])
        if any(tuple(s) != first for s in bottom_shapes[1:]):
            self._fail(f"all bottoms must have the same shape, got {[list(s) for s in bottom_shapes]}")
        axis, kernel, stride, pad, dilation = self._geometry(first)
        want = self.param_shapes([first])[0]
        if self.blobs and tuple(self.blobs[0].data.shape) != want:
            self._fail(f"weight shape {list(self.blobs[0].data.shape)} does not fit a bottom of shape "
                       f"{list(first)} (expected {list(want)})")
        size = deconv_out_size if self.transposed else conv_out_size
        out = tuple(size(s, k, st, p, d) for s, k, st, p, d
                    in zip(first[axis + 1:], kernel, stride, pad, dilation))
        if min(out) <= 0:
            self._fail(f"output spatial size {list(out)} is empty for bottom {list(first)}")
        self._geom = (axis, stride, pad, dilation)
        top = first[:axis] + (self.lp.convolution_param.num_output,) + out
        return [top] * len(bottom_shapes)

    def forward(self, bottoms):
        axis, stride, pad, dilation = self._geom
        fn = Deconvolution if self.transposed else Convolution
        weight = self.blobs[0].data
        bias = self.blobs[1].data if len(self.blobs) > 1 else None
        tops = []
        for x in bottoms:
            lead = x.shape[:axis]
            x4 = x.reshape((math.prod(lead),) + x.shape[axis:])
            y = fn(x4, weight, bias, stride=stride, pad=pad, dilation=dilation,
                   group=self.lp.convolution_param.group)
            tops.append(y.reshape(lead + y.shape[1:]))
        return tops


@register("Convolution")
class ConvolutionLayer(_BaseConv):
    """Caffe's Convolution: see :func:`Convolution`; learned blobs [weight (O, C/g, *k), bias (O,)]."""


@register("Deconvolution")
class DeconvolutionLayer(_BaseConv):
    """Caffe's Deconvolution: see :func:`Deconvolution`; learned blobs [weight (C, O/g, *k), bias (O,)]."""

    transposed = True
