"""LSTMUnit (``src/caffe/layers/lstm_unit_layer.cpp``): one time step of Caffe's LSTM.

Bottoms ``c_prev (1, N, H)``, ``X (1, N, 4H)`` (the gate inputs, laid out ``[i', f', o', g']``
along the last axis) and ``cont (1, N)``; tops ``c (1, N, H)`` and ``h (1, N, H)``::

    i = sigmoid(i')       f = cont == 0 ? 0 : cont * sigmoid(f')
    o = sigmoid(o')       g = tanh(g')
    c = f * c_prev + i * g
    h = o * tanh(c)

Backward (``dc``, ``dh`` the top diffs; nothing flows into ``cont``)::

    dc~      = dc + dh * o * (1 - tanh(c)^2)
    dc_prev  = dc~ * f
    di'      = dc~ * g * i * (1 - i)
    df'      = dc~ * c_prev * f * (1 - f)
    do'      = dh * tanh(c) * o * (1 - o)
    dg'      = dc~ * i * (1 - g^2)

Rounding. lstm_unit_layer.cpp defines its own ``sigmoid`` and ``tanh``: ``sigmoid(x) = 1. / (1. +
exp(-x))`` takes glibc's float ``expf`` and then divides in double (the literals are doubles), and
``tanh(x) = 2. * sigmoid(2. * x) - 1.`` instantiates that sigmoid for a *double* argument, so the
whole tanh is evaluated in double and rounded once. Both are reproduced here: ``expf`` by glibc's
algorithm (:func:`.libm_float.expf`; float64 ``exp`` rounded to float32 differs from it in about 6 of
1e4 values, and an LSTM compounds those over its time steps), the double ``exp`` by NumPy's (an ulp of
double from glibc's at most, which the rounding to float hides but in very rare cases); everything
else is float32 arithmetic in the C++ order (the build has no FMA contraction).

This Caffe's LSTMUnit has no ``clipping_threshold`` (LSTMUnit of other forks clips the cell diff):
its proto has no such field.
"""

from __future__ import annotations

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.ops import register
from amct_caffe.runtime.layer import Layer
from amct_caffe.runtime.layers.libm_float import caffe_sigmoid

_F32 = np.float32
_QUIET = {"over": "ignore", "under": "ignore"}


def caffe_tanh(x: np.ndarray) -> np.ndarray:
    """lstm_unit_layer.cpp's ``tanh<float>``: ``2. * sigmoid<double>(2. * x) - 1.`` in double."""
    with np.errstate(**_QUIET):
        s = 1.0 / (1.0 + np.exp(-2.0 * np.asarray(x, np.float64)))
        return (2.0 * s - 1.0).astype(_F32)


def _gates(x: np.ndarray, cont: np.ndarray, hidden: int):
    """(i, f, o, g) of the gate inputs ``x (N, 4H)`` and ``cont (N,)``."""
    i = caffe_sigmoid(x[:, :hidden])
    k = cont[:, None]
    # (cont == 0) ? 0 : cont * sigmoid(f'): an exact 0 even where sigmoid is NaN
    f = np.where(k == 0, _F32(0), k * caffe_sigmoid(x[:, hidden:2 * hidden])).astype(_F32)
    o = caffe_sigmoid(x[:, 2 * hidden:3 * hidden])
    g = caffe_tanh(x[:, 3 * hidden:])
    return i, f, o, g


def lstm_unit_forward(c_prev: np.ndarray, x: np.ndarray, cont: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One step on ``c_prev (N, H)``, ``x (N, 4H)``, ``cont (N,)``: ``(c, h)``, see the module doc."""
    i, f, o, g = _gates(x, cont, c_prev.shape[1])
    c = f * c_prev
    c += i * g
    h = o * caffe_tanh(c)
    return c, h


def lstm_unit_backward(c_prev, x, cont, c, dc, dh) -> tuple[np.ndarray, np.ndarray]:
    """``(dc_prev (N, H), dx (N, 4H))`` of one step; the gates are recomputed from ``x`` as Caffe does."""
    i, f, o, g = _gates(x, cont, c_prev.shape[1])
    tc = caffe_tanh(c)
    one = _F32(1)
    # each product left to right, as the C++ expressions associate
    dct = dc + dh * o * (one - tc * tc)
    dx = np.empty(x.shape, _F32)
    hidden = c_prev.shape[1]
    dx[:, :hidden] = dct * g * i * (one - i)
    dx[:, hidden:2 * hidden] = dct * c_prev * f * (one - f)
    dx[:, 2 * hidden:3 * hidden] = dh * tc * o * (one - o)
    dx[:, 3 * hidden:] = dct * i * (one - g * g)
    return dct * f, dx


@register("LSTMUnit")
class LSTMUnitLayer(Layer):
    """Caffe's LSTMUnit: see the module doc. No learned blobs."""

    num_bottoms = 3
    num_tops = 2
    # Backward_cpu writes both C_prev's and X's diff as soon as either needs one
    writes_unpropagated_diffs = True

    def reshape(self, bottom_shapes):
        c_shape, x_shape, cont_shape = (tuple(s) for s in bottom_shapes)
        if len(c_shape) != 3 or len(x_shape) != 3 or len(cont_shape) != 2:
            raise GraphError(f"layer '{self.name}' (LSTMUnit): bottoms must be (1, N, H), (1, N, 4H), (1, N); "
                             f"got {list(c_shape)}, {list(x_shape)}, {list(cont_shape)}")
        n = c_shape[1]
        if any(s[0] != 1 or s[1] != n for s in (c_shape, x_shape, cont_shape)) or x_shape[2] != 4 * c_shape[2]:
            raise GraphError(f"layer '{self.name}' (LSTMUnit): bottoms must be (1, N, H), (1, N, 4H), (1, N); "
                             f"got {list(c_shape)}, {list(x_shape)}, {list(cont_shape)}")
        return [c_shape, c_shape]

    def forward(self, bottoms):
        c_prev, x, cont = bottoms
        c, h = lstm_unit_forward(c_prev[0], x[0], cont[0])
        return [c[None], h[None]]

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 2  # lstm_layer.hpp: no gradient for the sequence indicators

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        if propagate_down[2]:
            raise GraphError(f"layer '{self.name}' (LSTMUnit): cannot back-propagate to the sequence indicators")
        if not (propagate_down[0] or propagate_down[1]):
            return [None, None, None]
        c_prev, x, cont = bottoms
        dc_prev, dx = lstm_unit_backward(c_prev[0], x[0], cont[0], tops[0][0], top_diffs[0][0], top_diffs[1][0])
        return [dc_prev[None], dx[None], None]
