"""Scale and Bias (``scale_layer.cpp``, ``bias_layer.cpp``): a parameter broadcast over a bottom.

The bottom is viewed as (outer, dim, inner): ``outer = prod(shape[:axis])``, ``dim`` = the
parameter's element count, ``inner`` = the rest. The parameter is a learned blob or bottom 1.
"""

from __future__ import annotations

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.runtime.layer import Layer, canonical_axis
from amct_caffe.runtime.layers.channel_sums import channel_sums
from amct_caffe.ops import register

_F32 = np.float32


def _split(shape, pshape, axis: int, who: str, exact: bool):
    """Caffe's (outer, dim, inner) view of ``shape`` for a parameter of shape ``pshape``.

    The parameter covers axes axis..axis+len(pshape)-1 (axis is taken as 0 for a scalar).
    Bias checks those axes' sizes; the fork's Scale only needs the element counts to agree
    (its shape check is commented out), i.e. the data is read as (outer, dim, inner).
    """
    shape, pshape = tuple(shape), tuple(pshape)
    if len(pshape) == 0:
        axis = 0
    else:
        axis = canonical_axis(axis, len(shape), "", where=who)
    if len(shape) < axis + len(pshape):
        raise GraphError(f"{who}: a parameter of shape {list(pshape)} applied from axis {axis} extends "
                         f"past the bottom's shape {list(shape)}")
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    dim = int(np.prod(pshape, dtype=np.int64))
    inner = int(np.prod(shape[axis + len(pshape):], dtype=np.int64))
    if (exact and shape[axis:axis + len(pshape)] != pshape) or outer * dim * inner != int(np.prod(shape)):
        raise GraphError(f"{who}: parameter shape {list(pshape)} does not match the bottom's shape "
                         f"{list(shape)} from axis {axis}")
    return outer, dim, inner


def _covered(shape, axis: int, num_axes: int, who: str) -> tuple[int, ...]:
    """bottom shape[axis : axis + num_axes] (num_axes -1: to the end): a learned parameter's shape."""
    axis = canonical_axis(axis, len(shape), "", where=who)
    if num_axes < -1:
        raise GraphError(f"{who}: num_axes must be >= 0, or -1 to extend to the end, got {num_axes}")
    if num_axes >= 0 and len(shape) < axis + num_axes:
        raise GraphError(f"{who}: axis {axis} + num_axes {num_axes} extends past the bottom's shape "
                         f"{list(shape)}")
    return tuple(shape[axis:]) if num_axes == -1 else tuple(shape[axis:axis + num_axes])


def Scale(x, scale, bias=None, axis=1):
    """y = x * scale (+ bias), the parameters broadcast over x's axes from ``axis`` on.

    x: any shape; scale: x.shape[axis : axis + scale.ndim] (a scalar for shape ());
    bias: same rule, applied independently.
    """
    scale = np.asarray(scale, _F32)
    o, d, i = _split(x.shape, scale.shape, axis, "Scale", exact=False)
    out = np.multiply(x.reshape(o, d, i), scale.reshape(1, d, 1))
    zero = scale.reshape(d) == 0
    if zero.any():  # Caffe scales with BLAS sscal, which writes 0 for a factor of 0 even on inf / NaN
        out[:, zero, :] = 0
    if bias is not None:
        _add_bias(out.reshape(x.shape), bias, axis)
    return out.reshape(x.shape)


def _add_bias(out, bias, axis):
    bias = np.asarray(bias, _F32)
    o, d, i = _split(out.shape, bias.shape, axis, "Bias", exact=True)
    view = out.reshape(o, d, i)  # out is freshly allocated and contiguous: a view
    view += bias.reshape(1, d, 1)


def Bias(x, bias, axis=1):
    """y = x + bias, bias of shape x.shape[axis : axis + bias.ndim] (a scalar for shape ())."""
    bias = np.asarray(bias, _F32)
    o, d, i = _split(x.shape, bias.shape, axis, "Bias", exact=True)
    return np.add(x.reshape(o, d, i), bias.reshape(1, d, 1)).reshape(x.shape)


@register("Scale")
class ScaleLayer(Layer):
    """Caffe's Scale layer: top = bottom[0] * scale (+ bias).

    The scale is bottom[1] when given (no learned scale blob), else blob 0 of shape
    bottom[0].shape[axis : axis + num_axes] (filler default: constant 1). With ``bias_term`` the
    next blob is a bias of shape bottom[0].shape[axis : axis + n], n = num_axes (or bottom[1]'s
    number of axes), filled by ``bias_filler`` (default constant 0).
    """

    num_bottoms = (1, 2)
    writes_unpropagated_diffs = True  # the dy * x scratch, see backward

    def param_shapes(self, bottom_shapes):
        p = self.lp.scale_param
        shape0 = bottom_shapes[0]
        who = f"layer '{self.name}' (Scale)"
        shapes = [] if len(bottom_shapes) > 1 else [_covered(shape0, p.axis, p.num_axes, who)]
        if p.bias_term:
            n = len(bottom_shapes[1]) if len(bottom_shapes) > 1 else p.num_axes
            shapes.append(_covered(shape0, p.axis, n, who))
        return shapes

    def param_fillers(self):
        p = self.lp.scale_param
        fillers = []
        if len(self.lp.bottom) == 1:
            fillers.append(p.filler if p.HasField("filler") else type(p.filler)(type="constant", value=1.0))
        return fillers + [p.bias_filler]

    def _params(self, bottoms: list, shapes: bool):
        """(scale, bias or None) as arrays, or as shapes; ``bottoms`` may be bottom shapes."""
        two = len(self.lp.bottom) > 1
        scale = bottoms[1] if two else (self.blobs[0].data.shape if shapes else self.blobs[0].data)
        bias = None
        if self.lp.scale_param.bias_term:
            b = self.blobs[0 if two else 1].data  # the bias blob follows the learned scale, if any
            bias = b.shape if shapes else b
        return scale, bias

    def reshape(self, bottom_shapes):
        who = f"layer '{self.name}' (Scale)"
        scale_shape, bias_shape = self._params(bottom_shapes, shapes=True)
        _split(bottom_shapes[0], scale_shape, self.lp.scale_param.axis, who, exact=False)
        if bias_shape is not None:
            _split(bottom_shapes[0], bias_shape, self.lp.scale_param.axis, who, exact=True)
        return [tuple(bottom_shapes[0])]

    def forward(self, bottoms):
        scale, bias = self._params(bottoms, shapes=False)
        # Caffe keeps the input in temp_ when in place: the backward needs x for the scale's diff
        self._x = bottoms[0] if self.in_place else None
        return [Scale(bottoms[0], scale, bias, self.lp.scale_param.axis)]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """dx = dy * scale; d scale = sum over outer and inner of dy * x; d bias = sum of dy.

        The learned scale's diff is accumulated, except where the fork's Backward_cpu assigns it:
        when scale and bottom have the same count (the product goes straight into the diff) and
        when outer == 1 < inner, dim (a gemv with beta 0). A scale from bottom 1 gets its diff as
        that bottom's. Not in place and not elementwise, Caffe keeps dy * x in bottom 0's diff
        as scratch, which is what that diff holds when propagate_down[0] is False.
        """
        dy = top_diffs[0]
        two = len(bottoms) > 1
        scale = bottoms[1] if two else self.blobs[0].data
        o, d, i = _split(dy.shape, scale.shape, self.lp.scale_param.axis, self.name, exact=False)
        flags = self.param_propagate_down
        want_bias = self.lp.scale_param.bias_term and flags[-1]
        want_scale = (two and propagate_down[1]) or (not two and flags[0])
        x = self._x if self.in_place else bottoms[0]
        eltwise = dy.size == scale.size
        # Not in place and not elementwise, Caffe keeps dy * x in bottom 0's diff as scratch (see below)
        product = np.multiply(dy, x) if want_scale and not eltwise and not self.in_place else None
        s_dy = s_dyx = None
        if product is not None:
            s_dyx = channel_sums(product, None, (o, d, i))[0]
            if want_bias:
                s_dy = channel_sums(dy, None, (o, d, i))[0]
        elif want_bias or want_scale:  # one pass for both sums, the product not kept
            s_dy, s_dyx = channel_sums(dy, x if want_scale else None, (o, d, i))
        if want_bias:
            bias = self.blobs[-1]
            bias.diff += s_dy.astype(_F32).reshape(bias.shape)
        grads: list = [None] * len(bottoms)
        if want_scale:
            diff = s_dyx.astype(_F32).reshape(scale.shape)
            if two:
                grads[1] = diff
            elif eltwise or (o == 1 and i > 1 and d > 1):
                self.blobs[0].diff = diff
            else:
                self.blobs[0].diff += diff
            if not eltwise and not self.in_place:
                grads[0] = product
        if propagate_down[0]:
            grads[0] = np.multiply(dy.reshape(o, d, i), scale.reshape(1, d, 1)).reshape(dy.shape)
        return grads


@register("Bias")
class BiasLayer(Layer):
    """Caffe's Bias layer: top = bottom[0] + bias, the bias being bottom[1] or blob 0 of shape
    bottom[0].shape[axis : axis + num_axes] (filler default: constant 0)."""

    num_bottoms = (1, 2)

    def param_shapes(self, bottom_shapes):
        if len(bottom_shapes) > 1:
            return []
        p = self.lp.bias_param
        return [_covered(bottom_shapes[0], p.axis, p.num_axes, f"layer '{self.name}' (Bias)")]

    def param_fillers(self):
        return [self.lp.bias_param.filler]

    def reshape(self, bottom_shapes):
        bias_shape = bottom_shapes[1] if len(bottom_shapes) > 1 else self.blobs[0].data.shape
        _split(bottom_shapes[0], bias_shape, self.lp.bias_param.axis, f"layer '{self.name}' (Bias)", True)
        return [tuple(bottom_shapes[0])]

    def forward(self, bottoms):
        bias = bottoms[1] if len(bottoms) > 1 else self.blobs[0].data
        return [Bias(bottoms[0], bias, self.lp.bias_param.axis)]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """dx = dy; d bias = sum of dy over outer and inner (accumulated for the learned blob)."""
        dy = top_diffs[0]
        two = len(bottoms) > 1
        bias = bottoms[1] if two else self.blobs[0].data
        o, d, i = _split(dy.shape, bias.shape, self.lp.bias_param.axis, self.name, exact=True)
        grads: list = [dy if propagate_down[0] else None] + [None] * (len(bottoms) - 1)
        if (two and propagate_down[1]) or (not two and self.param_propagate_down[0]):
            diff = channel_sums(dy, None, (o, d, i))[0].astype(_F32).reshape(bias.shape)
            if two:
                grads[1] = diff
            else:
                self.blobs[0].diff += diff
        return grads
