"""Layers that give one blob a new shape or a new element order, without arithmetic.

Flatten, Reshape, Unsqueeze (new shape, same order: views of the bottom), Permute,
ShuffleChannel, Reorg (transposes) and Reverse (flips). ShuffleChannel, Reorg and Reverse,
which the SSD fork lacks, follow the forks ATC takes them from (see each). The op / layer
conventions are shape_common's.

Backward: Flatten and Reshape share the diff with the bottom in Caffe (ShareDiff), so the
bottom diff is the top diff reshaped; the transposes and flips apply their inverse to the top
diff. The fork's Unsqueeze has an empty backward (no gradient crosses it).
"""

from __future__ import annotations

import numpy as np

from amct_caffe.ops import register
from amct_caffe.runtime.layer import EmptyBackward
from amct_caffe.runtime.layers.shape_common import (ShapeLayer, check_axis, element_count,
                                                    proto_fields, transpose_adjoint)


# ------------------------------------------------------------------------ pure ops
def flatten_shape(shape, axis=1, end_axis=-1):
    a, e = check_axis(axis, len(shape)), check_axis(end_axis, len(shape), "end_axis")
    if a > e + 1:  # Caffe: count(start_axis, end_axis + 1) checks start_axis <= end_axis + 1
        raise ValueError(f"axis {axis} (axis {a} of {len(shape)}) comes after end_axis {end_axis} (axis {e}) "
                         "+ 1: nothing to flatten; give axis <= end_axis")
    return tuple(shape[:a]) + (element_count(shape[a:e + 1]),) + tuple(shape[e + 1:])


def Flatten(x, *, axis=1, end_axis=-1):  # noqa: N802
    """Merges axes ``axis``..``end_axis`` into one."""
    return x.reshape(flatten_shape(x.shape, axis, end_axis))


def reshape_shape(shape, dims=(), axis=0, num_axes=-1):
    dims = list(dims)
    if dims.count(-1) > 1 or any(d < -1 for d in dims):
        raise ValueError(f"shape {dims} may hold dims >= 0 and at most one -1")
    start = axis if axis >= 0 else len(shape) + axis + 1
    if not 0 <= start <= len(shape):
        raise ValueError(f"axis {axis} is out of range for a {len(shape)}-D bottom")
    if num_axes < -1:
        raise ValueError("num_axes must be >= 0, or -1 for all")
    end = len(shape) if num_axes == -1 else start + num_axes
    if end > len(shape):
        raise ValueError(f"axis + num_axes = {end} is beyond the {len(shape)} axes of the bottom")
    for i, d in enumerate(dims):
        if d == 0:
            if start + i >= len(shape):
                raise ValueError("the new shape has a 0 with no bottom axis to copy")
            dims[i] = shape[start + i]
    top = list(shape[:start]) + dims + list(shape[end:])
    count = element_count(shape)
    if -1 in dims:
        known = element_count([d for d in top if d != -1])
        if known == 0 or count % known:
            raise ValueError(f"bottom count {count} is not divisible by the given dims ({known})")
        top[top.index(-1)] = count // known
    if element_count(top) != count:
        raise ValueError(f"cannot reshape {list(shape)} to {top}")
    return tuple(top)


def Reshape(x, *, shape=(), axis=0, num_axes=-1):  # noqa: N802
    """Replaces axes ``[axis, axis + num_axes)`` (num_axes -1: to the end; negative axis counts
    from the end, -1 = after the last) by ``shape``; a 0 copies the bottom dim at the same
    position, one -1 is inferred from the count."""
    return x.reshape(reshape_shape(x.shape, shape, axis, num_axes))


def unsqueeze_shape(shape, dim=None):
    if dim is None:
        raise ValueError("unsqueeze_param.dim must be set")
    d = dim + len(shape) + 1 if dim < 0 else dim
    if not 0 <= d <= len(shape):
        raise ValueError(f"dim {dim} is out of range for a {len(shape)}-D bottom")
    return tuple(shape[:d]) + (1,) + tuple(shape[d:])


def Unsqueeze(x, *, dim=None):  # noqa: N802
    """Inserts a size-1 axis at ``dim`` (negative counts from the end: -1 appends)."""
    return x.reshape(unsqueeze_shape(x.shape, dim))


def permute_order(ndim, order=()):
    order = list(order)
    if any(o >= ndim for o in order) or len(set(order)) != len(order):
        raise ValueError(f"order {order} must be distinct axes of the {ndim}-D bottom")
    return tuple(order + [i for i in range(ndim) if i not in order])


def Permute(x, *, order=()):  # noqa: N802
    """SSD's transpose: top axis i is bottom axis ``order[i]``; axes left out of ``order``
    follow in increasing order (the fork's rule): ``order: [0, 2]`` on 4-D is (0, 2, 1, 3)."""
    full = permute_order(x.ndim, order)
    return x if full == tuple(range(x.ndim)) else np.ascontiguousarray(x.transpose(full))


def ShuffleChannel(x, *, group=1):  # noqa: N802
    """ShuffleNet's channel shuffle: channels viewed as (group, C/group) and transposed, so top
    channel ``j*group + i`` is bottom channel ``i*(C/group) + j`` (the ShuffleNet Caffe forks)."""
    view, perm = shuffle_plan(x.shape, group)
    return np.ascontiguousarray(x.reshape(view).transpose(perm)).reshape(x.shape)


def shuffle_plan(shape, group=1):
    """(view, perm) of ShuffleChannel as a reshape-transpose."""
    if group < 1 or len(shape) < 2 or shape[1] % group:
        raise ValueError(f"group {group} must divide the channels of a {list(shape)} blob")
    return (shape[0], group, shape[1] // group, element_count(shape[2:])), (0, 2, 1, 3)


def reorg_shape(shape, stride=2, reverse=False):
    if len(shape) != 4 or stride < 1 or shape[1] % (stride * stride) or \
            (not reverse and (shape[2] % stride or shape[3] % stride)):
        raise ValueError(f"stride {stride} does not fit a bottom of shape {list(shape)} (needs 4-D, C "
                         "divisible by stride^2 and, unless reverse, H and W by stride)")
    n, c, h, w = shape
    s2 = stride * stride
    return (n, c // s2, h * stride, w * stride) if reverse else (n, c * s2, h // stride, w // stride)


def Reorg(x, *, stride=2, reverse=False):  # noqa: N802
    """YOLOv2's reorg (ATC: PassThrough) with darknet's index mapping, as the Caffe-YOLO ports
    (``reorg_cpu`` of caffe-yolov2 / Atlas Caffe) keep it.

    ``reverse=False`` (YOLOv2's use): top ``(N, C*s*s, H/s, W/s)``. Darknet reads the bottom
    *as* ``(C/s^2, H*s, W*s)``: with k = c // (C/s^2), top[c, h, w] (indexed as (C, H, W)) =
    bottom_view[c % (C/s^2), h*s + k // s, w*s + k % s]; the buffer is then relabelled to
    the top shape. ``reverse=True``: top ``(N, C/s^2, H*s, W*s)``,
    top[c2, h*s + k // s, w*s + k % s] = bottom[k*(C/s^2) + c2, h, w] (depth to space).
    """
    top = reorg_shape(x.shape, stride, reverse)
    view, perm = reorg_plan(x.shape, stride, reverse)
    return np.ascontiguousarray(x.reshape(view).transpose(perm)).reshape(top)


def reorg_plan(shape, stride=2, reverse=False):
    """(view, perm) of Reorg as a reshape-transpose (see :func:`Reorg`)."""
    n, c, h, w = shape
    tc = c // (stride * stride)
    if reverse:
        return (n, stride, stride, tc, h, w), (0, 3, 4, 1, 5, 2)
    return (n, tc, h, stride, w, stride), (0, 3, 5, 1, 2, 4)


def Reverse(x, *, axis=()):  # noqa: N802
    """ATC's Reverse: flips the element order along each listed axis."""
    axes = tuple(sorted({check_axis(a, x.ndim) for a in axis}))
    return np.flip(x, axes) if axes else x


# ------------------------------------------------------------------------ layers
@register("Flatten")
class FlattenLayer(ShapeLayer):
    in_place_ok = False
    shares_data = True
    op = staticmethod(Flatten)

    def kwargs(self):
        return proto_fields(self.lp.flatten_param, "axis", "end_axis")

    def shapes(self, s):
        return [flatten_shape(s[0], **self._kw)]

    def diff_sharing(self, bottom_shapes):
        return "backward"  # FlattenLayer::Backward_cpu: bottom[0]->ShareDiff(*top[0])

    def prepared_forward(self, bottom_shapes):
        shape = self.shapes([tuple(bottom_shapes[0])])[0]  # Flatten's top shape, computed once
        return lambda bottoms: [bottoms[0].reshape(shape)]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """dx = dy reshaped (Caffe: bottom ShareDiff top)."""
        return [top_diffs[0].reshape(bottoms[0].shape) if propagate_down[0] else None]


@register("Reshape")
class ReshapeLayer(ShapeLayer):
    in_place_ok = False
    shares_data = True
    op = staticmethod(Reshape)

    def kwargs(self):
        p = self.lp.reshape_param
        return {"shape": tuple(p.shape.dim), "axis": p.axis, "num_axes": p.num_axes}

    def shapes(self, s):
        return [reshape_shape(s[0], self._kw["shape"], self._kw["axis"], self._kw["num_axes"])]

    def diff_sharing(self, bottom_shapes):
        return "reshape"  # ReshapeLayer::Reshape: top[0]->ShareDiff(*bottom[0])

    def prepared_forward(self, bottom_shapes):
        shape = self.shapes([tuple(bottom_shapes[0])])[0]  # Reshape's top shape, computed once
        return lambda bottoms: [bottoms[0].reshape(shape)]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """dx = dy reshaped (Caffe: top ShareDiff bottom, an empty backward)."""
        return [top_diffs[0].reshape(bottoms[0].shape) if propagate_down[0] else None]


@register("Unsqueeze")
class UnsqueezeLayer(EmptyBackward, ShapeLayer):
    """The fork fixes the top shape at setup; we recompute it on every reshape. Its backward is
    empty (see :class:`EmptyBackward`)."""

    op = staticmethod(Unsqueeze)

    def kwargs(self):
        p = self._param("unsqueeze_param")
        return {"dim": p.dim if p.HasField("dim") else None}

    def shapes(self, s):
        return [unsqueeze_shape(s[0], **self._kw)]


@register("Permute")
class PermuteLayer(ShapeLayer):
    op = staticmethod(Permute)

    @classmethod
    def in_place_fault(cls, lp) -> str:
        order = list(lp.permute_param.order)
        if order == list(range(len(order))):  # no axis moves: the top is the bottom's data anyway
            return ""
        return "Caffe's Permute writes each value over the input it has yet to read"

    def shares_bottom_data(self, bottom_shapes):
        # the SSD fork's PermuteLayer copies only when the order moves an axis
        ndim = len(bottom_shapes[0])
        return tuple(permute_order(ndim, **self._kw)) == tuple(range(ndim))

    def diff_sharing(self, bottom_shapes):
        # PermuteLayer::Backward_cpu without a permutation: bottom[0]->ShareDiff(*top[0])
        return "backward" if self.shares_bottom_data(bottom_shapes) else None

    def kwargs(self):
        return proto_fields(self._param("permute_param"), "order")

    def shapes(self, s):
        return [tuple(s[0][i] for i in permute_order(len(s[0]), **self._kw))]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """dx = dy transposed back (the identity order shares the diff, as Caffe)."""
        if not propagate_down[0]:
            return [None]
        x = bottoms[0]
        full = permute_order(x.ndim, **self._kw)
        return [transpose_adjoint(top_diffs[0], x.shape, full, x.shape)]


@register("ShuffleChannel")
class ShuffleChannelLayer(ShapeLayer):
    op = staticmethod(ShuffleChannel)

    def kwargs(self):
        return proto_fields(self._param("shuffle_channel_param"), "group")

    def shapes(self, s):
        g = self._kw["group"]
        if g < 1 or len(s[0]) < 2 or s[0][1] % g:
            raise ValueError(f"group {g} must divide the channels of a {list(s[0])} blob")
        return [s[0]]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """dx = the inverse shuffle of dy (channels viewed as (C/group, group), transposed)."""
        if not propagate_down[0]:
            return [None]
        shape = bottoms[0].shape
        view, perm = shuffle_plan(shape, **self._kw)
        return [transpose_adjoint(top_diffs[0], view, perm, shape)]


@register("Reorg")
class ReorgLayer(ShapeLayer):
    in_place_ok = False
    op = staticmethod(Reorg)

    def kwargs(self):
        return proto_fields(self._param("reorg_param"), "stride", "reverse")

    def shapes(self, s):
        return [reorg_shape(s[0], **self._kw)]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """dx = the inverse element move of dy (Reorg is a permutation of the elements)."""
        if not propagate_down[0]:
            return [None]
        shape = bottoms[0].shape
        view, perm = reorg_plan(shape, **self._kw)
        return [transpose_adjoint(top_diffs[0], view, perm, shape)]


@register("Reverse")
class ReverseLayer(ShapeLayer):
    op = staticmethod(Reverse)

    def kwargs(self):
        return proto_fields(self._param("reverse_param"), "axis")

    def shapes(self, s):
        for a in self._kw["axis"]:
            check_axis(a, len(s[0]))
        return [s[0]]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """dx = dy flipped back along the same axes."""
        return [np.ascontiguousarray(Reverse(top_diffs[0], **self._kw)) if propagate_down[0] else None]
