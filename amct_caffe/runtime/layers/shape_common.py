"""What the data-movement layers share (reshape.py, join_split.py, reduction.py).

Each of those layers wraps a pure function named after its Caffe type whose keyword defaults
are caffe.proto's; ``<op>_shape`` gives the top shape from the bottom shape. Both raise
ValueError on bad parameters, which :class:`ShapeLayer` reports as GraphError naming the layer.
Semantics follow the SSD fork's ``src/caffe/layers/*.cpp`` unless a layer says otherwise.
Results may be views of the input.

Backward: these layers only move data, so each bottom diff is the adjoint of the move applied
to the top diffs (a gather's adjoint scatters and adds); :func:`transpose_adjoint` undoes the
reshape-transpose-reshape form most of them take.
"""

from __future__ import annotations


import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.runtime.layer import Layer



def check_axis(axis: int, ndim: int, what: str = "axis") -> int:
    """Caffe's CanonicalAxisIndex, raising ValueError."""
    if not -ndim <= axis < ndim:  # a 0-D blob has no axis (Caffe: "axis 0 out of range for 0-D Blob")
        raise ValueError(f"{what} {axis} is out of range for a {ndim}-D blob")
    return axis + ndim if axis < 0 else axis


def element_count(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


class ShapeLayer(Layer):
    """Layer over a pure op: ``kwargs()`` reads the params once; ``shapes()`` gives top shapes."""

    in_place_ok = True

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        if not self.in_place_ok and set(lp.top) & set(lp.bottom):
            self._fail("does not allow in-place computation (top == bottom)")
        self._kw = self._guard(self.kwargs)

    def _fail(self, msg: str):
        raise GraphError(f"layer '{self.name}' ({self.type}): {msg}")

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except ValueError as e:
            self._fail(str(e))

    def kwargs(self) -> dict:
        return {}

    def _param(self, field: str):
        """``self.lp.<field>``; a user's caffe.proto may lack the fields of non-BVLC layers."""
        if field not in self.lp.DESCRIPTOR.fields_by_name:
            raise ValueError(f"the caffe.proto in use has no {field}")
        return getattr(self.lp, field)

    def reshape(self, bottom_shapes):
        return self._guard(self.shapes, [tuple(s) for s in bottom_shapes])

    def forward(self, bottoms):
        out = self._guard(lambda: type(self).op(*bottoms, **self._kw))
        return out if isinstance(out, list) else [out]


def transpose_adjoint(dy, view_shape, perm, bottom_shape):
    """Adjoint of ``y = x.reshape(view_shape).transpose(perm).reshape(top)``: the bottom diff.

    The move is a permutation of the elements, so its adjoint is its inverse.
    """
    moved = tuple(view_shape[p] for p in perm)
    dx = dy.reshape(moved).transpose(np.argsort(perm))
    return np.ascontiguousarray(dx).reshape(bottom_shape)


def _repeated(fd) -> bool:
    # protobuf >= 6 drops FieldDescriptor.label in favour of is_repeated
    return fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED


def proto_fields(msg, *names) -> dict:
    """Proto fields as keyword arguments (repeated ones as tuples, enums by name)."""
    out = {}
    for n in names:
        fd = msg.DESCRIPTOR.fields_by_name[n]
        v = getattr(msg, n)
        if _repeated(fd):
            v = tuple(v)
        elif fd.enum_type is not None:
            v = fd.enum_type.values_by_number[v].name
        out[n] = v
    return out
