"""Convolution and Deconvolution (``src/caffe/layers/{base_conv,conv,deconv}_layer.cpp``).

Shapes, for ``S`` spatial axes after the channel axis (2-D is the common case, any ``S >= 1``
works):

* Convolution: x ``(N, C, *in)``, weight ``(O, C/g, *k)``, bias ``(O,)`` ->
  ``(N, O, *out)`` with ``out = (in + 2*pad - (dilation*(k-1)+1)) / stride + 1`` in C++ int
  division, which truncates toward zero: a kernel up to ``stride - 1`` wider than the padded
  input still gives one output (its taps past the border read the zero padding);
  ``y[n, o, p] = b[o] + sum_{c in group(o), t} w[o, c, t] * xpad[n, c, p*stride + t*dilation]``.
* Deconvolution (the transpose of the above): x ``(N, C, *in)``, weight ``(C, O/g, *k)`` ->
  ``(N, O, *out)`` with ``out = stride*(in-1) + dilation*(k-1)+1 - 2*pad``;
  ``ypad[n, o, i*stride + t*dilation] += w[c, o, t] * x[n, c, i]``, then the border ``pad``
  is cropped.

An output size of 0 gives an empty top (count 0), as Caffe's Blob::Reshape allows
(``CHECK_GE(dim, 0)``); a negative one is refused, as there. Caffe can run an empty top only in
a net whose blobs held data before (see ``blob.check_not_empty_at_build``, which the Net applies
when it is built). An empty bottom under windows its padding still fills gives a top of the bias
alone (Caffe's im2col reads zeros for every tap), and no gradient reaches the weights.

How a convolution is computed (its layout, GEMMs and C++ kernels, chosen once per shape) is
:mod:`.conv_plan`'s.
"""

from __future__ import annotations

import math

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.runtime.blob import WINDOW_LIMIT, clamped_strides
from amct_caffe.runtime.layers import caffe_gemm, conv_grad
from amct_caffe.runtime.layers.activation import PReLU
from amct_caffe.runtime.layers.conv_cols import per_axis
from amct_caffe.runtime.layers.conv_plan import conv_out_size, conv_plan
from amct_caffe.runtime.layers.deconv import Deconvolution, deconv_out_size
from amct_caffe.runtime.layers.integer_ops import conv2d_exact
from amct_caffe.runtime.layer import Layer, canonical_axis
from amct_caffe.ops import register

try:  # csrc/src/conv_cols.cpp: a bias add in C++, the float32 adds of NumPy's `y += b` (prepared_small)
    from amct_caffe._kernels import bias_prelu as BIAS_PRELU_KERNEL
    from amct_caffe._kernels import channel_affine as AFFINE_KERNEL
except ImportError:
    AFFINE_KERNEL = BIAS_PRELU_KERNEL = None

__all__ = ["Convolution", "ConvolutionLayer", "Deconvolution", "DeconvolutionLayer", "conv_out_size", "deconv_out_size"]


def Convolution(x, weight, bias=None, *, stride=1, pad=0, dilation=1, group=1, into=None):  # noqa: N802 - Caffe type name
    """Caffe convolution of ``x`` (N, C, *in) by ``weight`` (O, C/group, *k); see the module doc. ``into``: an
    array the result may be written into (:meth:`.conv_plan.ConvPlan.__call__`)."""
    x = np.asarray(x, np.float32)
    weight = np.asarray(weight, np.float32)
    nsp = x.ndim - 2
    geometry = (per_axis(stride, nsp, 1), per_axis(pad, nsp, 0), per_axis(dilation, nsp, 1), int(group))
    return conv_plan(x.shape, weight.shape, *geometry)(x, weight, bias, into)


def conv_geometry(lp, shape, fail) -> tuple:
    """(channel axis, kernel, stride, pad, dilation) of ``lp``'s convolution_param for a bottom of ``shape``,
    checked as base_conv_layer.cpp's LayerSetUp checks them (``fail(message)`` raises)."""
    cp = lp.convolution_param
    axis = canonical_axis(cp.axis, len(shape), lp.name)
    nsp = len(shape) - axis - 1
    if nsp < 1:
        fail(f"a {len(shape)}-D bottom has no spatial axis after channel axis {axis}: the executor runs "
             "convolutions over one spatial axis or more (Caffe computes this one as a product over the channel "
             f"axis: an InnerProduct with axis: {axis} gives the same numbers)")

    def given(values, h_field, w_field, what, default):
        if cp.HasField(h_field) or cp.HasField(w_field):
            if nsp != 2:
                fail(f"{h_field} & {w_field} can only be used for 2-D convolution")
            if len(values):
                fail(f"either {what} or {h_field}/{w_field} should be given, not both")
            return (getattr(cp, h_field), getattr(cp, w_field))
        if len(values) not in ((1, nsp) if default is None else (0, 1, nsp)):
            fail(f"{what} must be given once or once per spatial axis ({nsp}), got {len(values)}")
        return per_axis(list(values) or None, nsp, default)

    kernel = given(cp.kernel_size, "kernel_h", "kernel_w", "kernel_size", None)
    stride = given(cp.stride, "stride_h", "stride_w", "stride", 1)
    pad = given(cp.pad, "pad_h", "pad_w", "pad", 0)
    if len(cp.dilation) not in (0, 1, nsp):
        fail(f"dilation must be given once or once per spatial axis ({nsp})")
    dilation = per_axis(list(cp.dilation) or None, nsp, 1)
    if min(kernel) <= 0 or min(stride) <= 0 or min(dilation) <= 0:
        fail(f"kernel {kernel}, stride {stride} and dilation {dilation} must be positive")
    return axis, kernel, stride, pad, dilation


def conv_out_shape(shape, geometry, fail, transposed: bool = False) -> tuple[int, ...]:
    """The output spatial sizes of a window of ``geometry`` (conv_geometry's) over a bottom of ``shape``, in C++
    int arithmetic; ``fail`` for windows beyond WINDOW_LIMIT or a negative size (Caffe's Blob::Reshape)."""
    axis, kernel, stride, pad, dilation = geometry
    extents = [(s + 2 * p, d * (k - 1) + 1) for s, k, p, d in zip(shape[axis + 1:], kernel, pad, dilation,
                                                                    strict=True)]
    if max(max(e) for e in extents) > WINDOW_LIMIT:
        fail(f"the padded input {[e[0] for e in extents]} or the kernel extent {[e[1] for e in extents]} "
             f"exceeds {WINDOW_LIMIT}: the sums of such extents overflow the int index arithmetic of "
             "Caffe and of the kernels; give a smaller pad or dilation")
    size = deconv_out_size if transposed else conv_out_size
    out = tuple(size(s, k, st, p, d) for s, k, st, p, d
                in zip(shape[axis + 1:], kernel, stride, pad, dilation, strict=True))
    if min(out) < 0:
        extent = [d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True)]
        fail(f"output spatial size {list(out)} is negative for bottom {list(shape)} (kernel extent "
             f"{extent}, pad {list(pad)}, stride {list(stride)}); Caffe refuses a negative blob "
             "dimension: give a larger input or a smaller kernel, dilation or pad")
    return out


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
        if cp.group <= 0:
            raise GraphError(f"layer '{lp.name}' ({lp.type}): convolution_param.group must be > 0, got {cp.group}")
        if cp.num_output % cp.group:
            raise GraphError(f"layer '{lp.name}' ({lp.type}): num_output {cp.num_output} is not a multiple "
                             f"of group {cp.group}")
        self._geom = None
        self._empty_top = None

    def _fail(self, msg: str):
        raise GraphError(f"layer '{self.name}' ({self.type}): {msg}")

    def _geometry(self, shape) -> tuple:
        """(channel axis, kernel, stride, pad, dilation) for a bottom of this shape."""
        return conv_geometry(self.lp, shape, self._fail)

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
        out = conv_out_shape(first, (axis, kernel, stride, pad, dilation), self._fail, self.transposed)
        if not self.transposed:
            stride = clamped_strides(stride)
        self._geom = (axis, stride, pad, dilation)
        top = first[:axis] + (self.lp.convolution_param.num_output,) + out
        self._empty_top = top if 0 in out else None
        return [top] * len(bottom_shapes)

    def forward(self, bottoms):
        axis, stride, pad, dilation = self._geom
        fn = Deconvolution if self.transposed else Convolution
        weight = self.blobs[0].data
        bias = self.blobs[1].data if len(self.blobs) > 1 else None
        if self._empty_top is not None:  # a zero output size: an empty blob (count 0), as in Caffe
            return [np.zeros(self._empty_top, np.float32) for _ in bottoms]
        if self.integer_params and not self.transposed and weight.ndim == 4 and axis == 1:
            # a deploy model's INT8 convolution: exact integer accumulation (see integer_ops)
            group = self.lp.convolution_param.group
            return [conv2d_exact(x, weight, bias, stride, pad, dilation, group) for x in bottoms]
        tops = []
        for x in bottoms:
            lead = x.shape[:axis]
            x4 = x.reshape((math.prod(lead),) + x.shape[axis:])
            y = fn(x4, weight, bias, stride=stride, pad=pad, dilation=dilation,
                   group=self.lp.convolution_param.group)
            tops.append(y.reshape(lead + y.shape[1:]))
        return tops

    def prepared_forward(self, bottom_shapes):
        """A float Convolution of one 4-D bottom straight to its :class:`ConvPlan` (no field re-reading)."""
        axis, stride, pad, dilation = self._geom
        if (self.transposed or self.integer_params or self._empty_top is not None or len(bottom_shapes) != 1
                or axis != 1 or len(bottom_shapes[0]) != 4):
            return self.forward
        x_shape, group = tuple(bottom_shapes[0]), self.lp.convolution_param.group
        small = self.prepared_small(x_shape)
        if small is not None:
            def forward_small(bottoms):
                return [small(bottoms[0])]
            if hasattr(small, "small_op"):
                forward_small.small_op = small.small_op
            return forward_small

        def forward(bottoms, outs=(None,)):  # outs: see Layer.prepared_forward_into
            blobs = self.blobs
            weight = blobs[0].data
            bias = blobs[1].data if len(blobs) > 1 else None
            plan = conv_plan(x_shape, weight.shape, stride, pad, dilation, group)
            return [plan(bottoms[0], weight, bias, outs[0])]
        forward.takes_outs = True  # writes the top into the array offered (Layer.prepared_forward_into)
        return forward

    def prepared_small(self, x_shape: tuple, act=None):
        """None, or ``forward(x) -> y`` for a float Convolution of a small ``x_shape`` input, followed by
        ``act`` (None, or the in-place ReLU of negative slope 0 or PReLU layer of its fold chain) applied in
        place: the plan's :meth:`~.conv_plan.ConvPlan.native` C++ call where it has one, else its
        :meth:`~.conv_plan.ConvPlan.unbiased` call and the bias and activation in one C++ pass. The
        weight, bias and slope are read at call time as :meth:`forward` reads them (arrays that are not
        C-contiguous float32 and a GEMM configuration changed since, ``caffe_gemm.configure``, take the
        general path)."""
        axis, stride, pad, dilation = self._geom
        weight = self.blobs[0].data
        if (self.transposed or self.integer_params or self._empty_top is not None or axis != 1
                or len(x_shape) != 4 or weight.ndim != 4 or AFFINE_KERNEL is None
                or (act is not None and act.type == "PReLU" and BIAS_PRELU_KERNEL is None)):
            return None
        group, w_shape, config = self.lp.convolution_param.group, weight.shape, caffe_gemm.gemm_config()
        plan = conv_plan(x_shape, w_shape, stride, pad, dilation, group)
        code = 0 if act is None else 1 if act.type == "ReLU" else 2
        native = plan.native(code)
        run = plan.unbiased() if native is None else None
        if native is None and run is None:
            return None
        blobs, empty = self.blobs, ()
        act_blobs = act.blobs if code == 2 else empty

        def epilogue(y, bias):  # the bias and activation in place: channel_affine's / bias_prelu's bytes
            if code == 2:
                slope = act_blobs[0].data
                if slope.dtype == np.float32 and slope.flags.c_contiguous:
                    BIAS_PRELU_KERNEL(y, bias, slope, 1)
                    return
                if bias is not None:
                    AFFINE_KERNEL(y, None, bias, False, 1)
                y[...] = PReLU(y, slope)
            elif code == 1 or bias is not None:
                AFFINE_KERNEL(y, None, bias, code == 1, 1)

        def general(x, weight, bias):
            # (a padded GEMM's result is a slice: the epilogue's C++ pass wants the values C-contiguous)
            y = np.ascontiguousarray(conv_plan(x_shape, weight.shape, stride, pad, dilation, group)(x, weight, None))
            epilogue(y, None if bias is None else np.ascontiguousarray(bias, np.float32).reshape(-1))
            return y

        def usable(a):
            return a.dtype == np.float32 and a.flags.c_contiguous

        if native is not None:
            def forward_native(x):
                weight = blobs[0].data
                bias = blobs[1].data if len(blobs) > 1 else None
                slope = act_blobs[0].data if act_blobs else None
                if caffe_gemm.gemm_config() is not config or not usable(weight) or weight.shape != w_shape \
                        or (bias is not None and not usable(bias)) or (slope is not None and not usable(slope)):
                    return general(x, weight, bias)
                return native(np.ascontiguousarray(x), weight, bias, slope)
            # what forward.py's runner of consecutive native ops needs: the op, its learned blobs in the
            # order SmallRun takes them, whether it has a bias, and the GEMM configuration it was made for
            forward_native.small_op = (native, [blobs[0]] + list(blobs[1:2]) + list(act_blobs[:1]),
                                       len(blobs) > 1, config)
            return forward_native
        views = [None, None, None, None]  # weight, its (g, O/g, K) view, bias, its (O,) view

        def forward(x):
            weight = blobs[0].data
            bias = blobs[1].data if len(blobs) > 1 else None
            if weight is not views[0]:
                if weight.shape != w_shape or not weight.flags.c_contiguous:
                    return general(x, weight, bias)
                views[0], views[1] = weight, weight.reshape(group, w_shape[0] // group, -1)
            if bias is not views[2]:
                if bias is not None and not usable(bias):
                    return general(x, weight, bias)
                views[2], views[3] = bias, None if bias is None else bias.reshape(-1)
            if caffe_gemm.gemm_config() is not config:
                return general(x, weight, bias)
            y = run(x, views[1])
            epilogue(y, views[3])
            return y
        return forward

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """Caffe's Convolution / Deconvolution ``Backward_cpu`` (see :mod:`conv_grad`), per bottom:

        dbias += sum_{n, p} dY;  Convolution: dW += dY (*) x, dx = col2im(W^T dY);
        Deconvolution: dW += x (*) dY (the convolution's weight gradient with the roles swapped),
        dx = Convolution(dY, W). Weight and bias gradients add up over the bottoms, as in Caffe.
        """
        axis, stride, pad, dilation = self._geom
        group = self.lp.convolution_param.group
        weight = self.blobs[0].data
        geom = dict(stride=stride, pad=pad, dilation=dilation, group=group)
        need_w = self.param_propagate_down[0]
        need_b = len(self.blobs) > 1 and self.param_propagate_down[1]
        grads = []
        for x, dy, down in zip(bottoms, top_diffs, propagate_down, strict=True):
            lead = x.shape[:axis]
            x4 = x.reshape((math.prod(lead),) + x.shape[axis:])
            dy4 = np.asarray(dy, np.float32).reshape((x4.shape[0],) + dy.shape[axis:])
            if need_b:
                self.blobs[1].diff += conv_grad.bias_grad(dy4)
            if need_w:
                a, b = (dy4, x4) if self.transposed else (x4, dy4)
                self.blobs[0].diff += conv_grad.conv_weight_grad(a, b, weight.shape[2:], **geom)
            if not down:
                grads.append(None)
            elif self.transposed:
                grads.append(Convolution(dy4, weight, **geom).reshape(x.shape))
            else:
                grads.append(conv_grad.conv_input_grad(dy4, weight, x4.shape, **geom).reshape(x.shape))
        return grads


@register("Convolution")
class ConvolutionLayer(_BaseConv):
    """Caffe's Convolution: see :func:`Convolution`; learned blobs [weight (O, C/g, *k), bias (O,)]."""

    in_place_differs = "Caffe's GEMM would write the output into the input it is still reading"


@register("Deconvolution")
class DeconvolutionLayer(_BaseConv):
    """Caffe's Deconvolution: see :func:`Deconvolution`; learned blobs [weight (C, O/g, *k), bias (O,)]."""

    in_place_differs = "Caffe's GEMM would write the output into the input it is still reading"

    transposed = True
