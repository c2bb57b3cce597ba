"""Caffe's Im2col (``src/caffe/layers/im2col_layer.cpp``): each output position's receptive field laid out
along the channel axis, the columns a Convolution multiplies by its weights.

A bottom (..., C, *in) with the channel axis ``convolution_param.axis`` and ``S`` spatial axes after it gives
(..., C * prod(k), *out), ``out`` the Convolution's output size (C++ truncating division) and channel
``c * prod(k) + t`` (``t`` the kernel tap in row-major order) holding
``top[..., c*K + t, p] = x[..., c, p*stride - pad + t*dilation]``, 0 where that reads the padding. The kernel,
stride, pad and dilation fields are the Convolution's, checked alike; num_output and the weights play no
part. ``force_nd_im2col`` picks Caffe's N-D routine, which gives the same values.

Backward is Caffe's col2im: every column entry added back onto the input cell it was read from, the taps
in order (so the same sums as Caffe's, added in its order).
"""

from __future__ import annotations

import math

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.ops import register
from amct_caffe.runtime.blob import clamped_strides
from amct_caffe.runtime.layer import Layer
from amct_caffe.runtime.layers.conv import conv_geometry, conv_out_shape
from amct_caffe.runtime.layers.conv_cols import im2col, im2col_2d
from amct_caffe.runtime.layers.conv_grad import _extent, _padded_input, col2im

__all__ = ["Im2colLayer"]


# Values of a padded input the N-D path builds in memory at most (4 GiB of float32).
PADDED_LIMIT = 1 << 30


@register("Im2col")
class Im2colLayer(Layer):
    # Caffe runs Im2col in place on garbage: reshaping the top reallocates the shared blob (zeros out, a zero
    # gradient); refused at the build instead
    in_place_ok = False

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        self._geom = None

    def _fail(self, msg: str):
        raise GraphError(f"layer '{self.name}' ({self.type}): {msg}")

    def reshape(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        axis, kernel, stride, pad, dilation = conv_geometry(self.lp, shape, self._fail)
        out = conv_out_shape(shape, (axis, kernel, stride, pad, dilation), self._fail)
        self._geom = (axis, kernel, clamped_strides(stride), pad, dilation, out)
        return [shape[:axis] + (shape[axis] * math.prod(kernel),) + out]

    def _images(self, x: np.ndarray) -> np.ndarray:
        """``x`` as (num, C, *in): the axes before the channel axis as one."""
        axis = self._geom[0]
        return x.reshape((math.prod(x.shape[:axis]),) + x.shape[axis:])

    def forward(self, bottoms):
        x = bottoms[0]
        axis, kernel, stride, pad, dilation, out = self._geom
        top = x.shape[:axis] + (x.shape[axis] * math.prod(kernel),) + out
        if math.prod(top) == 0 or x.size == 0:  # no window, or windows over padding only: Caffe's zeros
            return [np.zeros(top, np.float32)]
        images = np.ascontiguousarray(self._images(x), np.float32)
        if len(kernel) == 2:
            cols = im2col_2d(images, kernel, stride, pad, dilation, out)
        else:
            ext = _extent(images.shape[2:], kernel, stride, pad, dilation, out)
            padded = images.shape[0] * images.shape[1] * math.prod(ext)
            if padded > PADDED_LIMIT:  # this path pads the input in memory (the 2-D kernel does not)
                self._fail(f"with pad {list(pad)} the padded input holds {padded} values, more than {PADDED_LIMIT} "
                           f"this executor pads in memory for a {len(kernel)}-D window; give a smaller pad")
            cols = im2col(_padded_input(images, pad, ext), kernel, stride, dilation, out)
        return [np.array(cols).reshape(top)]  # a copy: the columns live in a reused scratch buffer

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        if not propagate_down[0]:
            return [None]
        x = bottoms[0]
        axis, kernel, stride, pad, dilation, out = self._geom
        images = self._images(x).shape
        dcols = top_diffs[0].reshape((images[0], images[1] * math.prod(kernel)) + out)
        return [col2im(dcols, images, kernel, stride=stride, pad=pad, dilation=dilation).reshape(x.shape)]
