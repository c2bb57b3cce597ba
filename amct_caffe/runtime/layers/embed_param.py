"""Embed, Parameter and DummyData (``src/caffe/layers/{embed,dummy_data}_layer.cpp``, ``parameter_layer.hpp``).

* Embed: a lookup table. x holds integer indices in [0, input_dim), any shape S; weight
  ``(input_dim, num_output)``, bias ``(num_output,)`` -> y ``S + (num_output,)`` with
  ``y[s] = W[x[s]] + b``. Backward: ``dW[x[s]] += dy[s]`` in the order of s (Caffe's axpy per
  index), ``db += sum_s dy[s]``; no gradient reaches the indices (Caffe refuses to give one).
* Parameter: a learned blob of ``parameter_param.shape`` as its only top. Caffe shares the top's data
  and diff with the blob, so the top's gradient is the blob's: each backward replaces it (it does not
  add up over an ``iter_size`` > 1 iteration, unlike other learned blobs'). Caffe starts the blob at
  zeros (no filler); a Net whose caffemodel has no blob for it does the same here (quantization refuses
  such a model, naming the layer, as for any layer without its weights). An in-place layer after it
  would change the learned blob in Caffe (they share memory); here it changes only the top.
* DummyData: tops of fixed shapes (``shape``, or the deprecated num / channels / height / width), each
  filled by its ``data_filler`` (none: zeros; one: all tops; else one per top). A constant filler fills
  once, as Caffe's; any other refills at every forward, from a generator seeded by the layer's name
  (not Caffe's, so those values differ from Caffe's run; two nets of one prototxt draw the same). An
  in-place layer over a constant top rewrites Caffe's top for good (it is never refilled), so its
  effect compounds from one forward to the next there; here every forward starts from the filler.
"""

from __future__ import annotations

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.ops import register
from amct_caffe.runtime.fillers import fill
from amct_caffe.runtime.layer import Layer
from amct_caffe.runtime.layers.data_transform import layer_rng

_F32 = np.float32


@register("Embed")
class EmbedLayer(Layer):
    """Caffe's Embed (module doc); learned blobs [weight (input_dim, num_output), bias (num_output,)]."""

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        p = lp.embed_param
        if p.num_output <= 0 or p.input_dim <= 0:
            raise GraphError(f"layer '{self.name}' (Embed): embed_param.num_output ({p.num_output}) and input_dim "
                             f"({p.input_dim}) must both be > 0")
        self.num_output, self.input_dim, self.bias_term = int(p.num_output), int(p.input_dim), p.bias_term

    def param_shapes(self, bottom_shapes):
        return [(self.input_dim, self.num_output)] + ([(self.num_output,)] if self.bias_term else [])

    def param_fillers(self):
        return [self.lp.embed_param.weight_filler, self.lp.embed_param.bias_filler]

    def reshape(self, bottom_shapes):
        return [tuple(bottom_shapes[0]) + (self.num_output,)]

    def _indices(self, x: np.ndarray) -> np.ndarray:
        flat = np.asarray(x, _F32).reshape(-1)
        index = flat.astype(np.int64)  # C's (int) cast: toward zero
        bad = (index != flat) | (index < 0) | (index >= self.input_dim)
        if bad.any():
            value = flat[np.flatnonzero(bad)[0]]
            raise GraphError(f"layer '{self.name}' (Embed): input value {value} is not an index in [0, "
                             f"{self.input_dim}) (embed_param.input_dim); Embed takes integer indices")
        return index

    def forward(self, bottoms):
        x = bottoms[0]
        y = self.blobs[0].data[self._indices(x)]
        if self.bias_term:
            y = y + self.blobs[1].data.reshape(1, -1)
        return [np.ascontiguousarray(y, _F32).reshape(x.shape + (self.num_output,))]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        if propagate_down[0]:
            raise GraphError(f"layer '{self.name}' (Embed): no gradient reaches its input indices (Caffe: \"Can't "
                             "backpropagate to EmbedLayer input.\"); set propagate_down: false for it, without "
                             "force_backward (which overrides it)")
        dy = np.asarray(top_diffs[0], _F32).reshape(-1, self.num_output)
        if self.param_propagate_down[0]:  # (Caffe reads the indices from the bottom at backward time too)
            np.add.at(self.blobs[0].diff, self._indices(bottoms[0]), dy)  # row by row, in order: Caffe's axpy per index
        if self.bias_term and self.param_propagate_down[1]:
            self.blobs[1].diff += dy.sum(axis=0, dtype=_F32)
        return [None]


@register("Parameter")
class ParameterLayer(Layer):
    """Caffe's Parameter (module doc): its learned blob as its top."""

    num_bottoms = 0
    weights_optional = True  # Caffe keeps the zeros of its LayerSetUp when the caffemodel has no blob for it

    def _shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.lp.parameter_param.shape.dim)

    def param_shapes(self, bottom_shapes):
        return [self._shape()]

    def reshape(self, bottom_shapes):
        return [self._shape()]

    def forward(self, bottoms):
        return [self.blobs[0].data]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        # Caffe's top and blob share one diff, which the layers reading the top write (not add to): each
        # backward replaces the blob's gradient, also within an iter_size > 1 iteration, as there
        if self.param_propagate_down[0]:
            self.blobs[0].diff = np.array(top_diffs[0], _F32).reshape(self.blobs[0].data.shape)
        return []


@register("DummyData")
class DummyDataLayer(Layer):
    """Caffe's DummyData (module doc)."""

    num_bottoms = 0
    num_tops = (1, None)

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        p = lp.dummy_data_param
        n = len(lp.top)
        where = f"layer '{self.name}' (DummyData)"
        one_or_n = "1" if n == 1 else f"1 or {n}"
        if len(p.data_filler) not in (0, 1, n):
            raise GraphError(f"{where}: {len(p.data_filler)} data_filler(s) for {n} top(s); give 0 or {one_or_n}")
        legacy = [list(p.num), list(p.channels), list(p.height), list(p.width)]
        if any(legacy):
            if len(p.shape):
                raise GraphError(f"{where}: give shape or num / channels / height / width, not both")
            for field, values in zip(("num", "channels", "height", "width"), legacy, strict=True):
                if len(values) not in (1, n):
                    raise GraphError(f"{where}: {len(values)} {field} value(s) for {n} top(s); give {one_or_n}")
            self.shapes = [tuple(int(v[i if len(v) > 1 else 0]) for v in legacy) for i in range(n)]
        else:
            if len(p.shape) not in (1, n):
                raise GraphError(f"{where}: {len(p.shape)} shape(s) for {n} top(s); give {one_or_n}")
            self.shapes = [tuple(int(d) for d in p.shape[i if len(p.shape) > 1 else 0].dim) for i in range(n)]
        fillers = list(p.data_filler)
        self.fillers = [fillers[i if len(fillers) > 1 else 0] if fillers else None for i in range(n)]
        self._rng = layer_rng(self.name, 0)
        self._fixed = [fill(f, s, self._rng) if f is None or f.type == "constant" else None
                       for f, s in zip(self.fillers, self.shapes, strict=True)]

    def reshape(self, bottom_shapes):
        return list(self.shapes)

    def forward(self, bottoms):
        return [fixed if fixed is not None else fill(f, s, self._rng)
                for fixed, f, s in zip(self._fixed, self.fillers, self.shapes, strict=True)]
