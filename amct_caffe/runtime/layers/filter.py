"""Filter (``src/caffe/layers/filter_layer.cpp``): the items (first-axis rows) of its bottoms that a selector keeps.

Bottoms ``x_1 .. x_K`` (each ``(N, ...)``) and a selector ``s`` of shape ``(N, 1, ..., 1)`` last; tops
``y_k = x_k[s != 0]`` in item order, one per filtered bottom. The number of items kept depends on the
selector's values, so the tops' first axis is known only after a forward (``shape_from_forward``; a
freshly built net gives them all ``N`` items, as Caffe's first Reshape does). Backward: ``dx_k`` is the
top's diff on the kept items and 0 on the others; the selector gets no gradient (Caffe aborts when asked
for one, e.g. under ``force_backward``).
"""

from __future__ import annotations

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.ops import register
from amct_caffe.runtime.layer import Layer

_F32 = np.float32


@register("Filter")
class FilterLayer(Layer):
    """Caffe's Filter (module doc)."""

    num_bottoms = (2, None)
    num_tops = (1, None)
    shape_from_forward = True

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        if len(lp.top) != len(lp.bottom) - 1:
            raise GraphError(f"layer '{self.name}' (Filter): {len(lp.bottom)} bottoms need {len(lp.bottom) - 1} "
                             f"top(s) (the last bottom is the selector), the prototxt gives {len(lp.top)}")
        self._kept = None  # the item indices of the last forward

    def reshape(self, bottom_shapes):
        selector = tuple(bottom_shapes[-1])
        where = f"layer '{self.name}' (Filter)"
        if not selector or any(d != 1 for d in selector[1:]):
            raise GraphError(f"{where}: the selector (last bottom) must be of shape (N, 1, ..., 1), got "
                             f"{list(selector)}")
        for shape in bottom_shapes[:-1]:
            if not shape or shape[0] != selector[0]:
                raise GraphError(f"{where}: each bottom must have the selector's {selector[0]} items on axis 0, got "
                                 f"{list(shape)}")
        return [tuple(s) for s in bottom_shapes[:-1]]  # every item until a forward has seen the selector

    def forward(self, bottoms):
        kept = np.flatnonzero(np.asarray(bottoms[-1]).reshape(len(bottoms[-1]), -1)[:, 0] != 0)
        self._kept = kept
        return [np.ascontiguousarray(np.asarray(x, _F32)[kept]) for x in bottoms[:-1]]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        if propagate_down[-1]:
            raise GraphError(f"layer '{self.name}' (Filter): no gradient reaches its selector (Caffe: \"cannot "
                             "backpropagate to filter index inputs\"); set propagate_down: false for it, "
                             "without force_backward (which overrides it)")
        kept = self._kept
        grads = []
        for x, dy, down in zip(bottoms[:-1], top_diffs, propagate_down[:-1], strict=True):
            if not down:
                grads.append(None)
                continue
            dx = np.zeros(np.shape(x), _F32)
            dx[kept] = np.asarray(dy, _F32).reshape((len(kept),) + dx.shape[1:])
            grads.append(dx)
        return grads + [None]
