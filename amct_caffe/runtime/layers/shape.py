"""Layers that move data without arithmetic (plus Reduction and ArgMax).

Each op is a pure function named after its Caffe type whose keyword defaults are caffe.proto's;
``<op>_shape`` gives the top shape from the bottom shape. Both raise ValueError on bad
parameters, which the layer classes report as GraphError naming the layer. Semantics follow
the SSD fork's ``src/caffe/layers/*.cpp``; ShuffleChannel, Reorg and Reverse, which the fork
lacks, follow the forks ATC takes them from (see each). Results may be views of the input.
(Pad and PixelShuffle live in resize.py.)
"""

from __future__ import annotations

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.runtime.layer import Layer
from amct_caffe.ops import register


def _axis(axis: int, ndim: int, what: str = "axis") -> int:
    """Caffe's CanonicalAxisIndex, raising ValueError."""
    if not -ndim <= axis < max(ndim, 1):
        raise ValueError(f"{what} {axis} is out of range for a {ndim}-D blob")
    return axis + ndim if axis < 0 else axis


def _count(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


# ------------------------------------------------------------------------ pure ops
def concat_shape(shapes, axis=1):
    a = _axis(axis, len(shapes[0]))
    for s in shapes[1:]:
        if len(s) != len(shapes[0]) or any(x != y for i, (x, y) in enumerate(zip(s, shapes[0], strict=True))
                                           if i != a):
            raise ValueError(f"bottom shapes {[list(b) for b in shapes]} differ off axis {a}")
    top = list(shapes[0])
    top[a] = sum(s[a] for s in shapes)
    return tuple(top)


def Concat(*xs, axis=1):  # noqa: N802 - Caffe type name
    """Joins the inputs along ``axis``; the other dims must agree."""
    concat_shape([x.shape for x in xs], axis)
    return xs[0] if len(xs) == 1 else np.concatenate(xs, axis=axis)


def slice_bounds(shape, axis=1, slice_point=(), num_tops=1):
    """[(start, stop)] of each top along the canonical axis."""
    a = _axis(axis, len(shape))
    dim, points = shape[a], list(slice_point)
    if points:
        if len(points) != num_tops - 1 or num_tops > dim:
            raise ValueError(f"{len(points)} slice points for {num_tops} tops of an axis of {dim}")
        if any(q <= p for p, q in zip([0] + points[:-1], points, strict=True)) or points[-1] > dim:
            raise ValueError(f"slice points {points} must increase strictly within (0, {dim}]")
    elif dim % num_tops:
        raise ValueError(f"{num_tops} tops do not divide the slice axis of {dim} evenly")
    else:
        points = [dim // num_tops * i for i in range(1, num_tops)]
    bounds = [0] + points + [dim]
    return a, list(zip(bounds[:-1], bounds[1:], strict=True))


def Slice(x, *, axis=1, slice_point=(), num_tops=1):  # noqa: N802
    """Cuts ``x`` along ``axis`` at ``slice_point`` (strictly increasing, one fewer than the
    tops) or, without points, into ``num_tops`` equal parts."""
    a, bounds = slice_bounds(x.shape, axis, slice_point, num_tops)
    return [x[(slice(None),) * a + (slice(lo, hi),)] for lo, hi in bounds]


def flatten_shape(shape, axis=1, end_axis=-1):
    a, e = _axis(axis, len(shape)), _axis(end_axis, len(shape), "end_axis")
    return tuple(shape[:a]) + (_count(shape[a:e + 1]),) + tuple(shape[e + 1:])


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
    count = _count(shape)
    if -1 in dims:
        known = _count([d for d in top if d != -1])
        if known == 0 or count % known:
            raise ValueError(f"bottom count {count} is not divisible by the given dims ({known})")
        top[top.index(-1)] = count // known
    if _count(top) != count:
        raise ValueError(f"cannot reshape {list(shape)} to {top}")
    return tuple(top)


def Reshape(x, *, shape=(), axis=0, num_axes=-1):  # noqa: N802
    """Replaces axes ``[axis, axis + num_axes)`` (num_axes -1: to the end; negative axis counts
    from the end, -1 = after the last) by ``shape``; a 0 copies the bottom dim at the same
    position, one -1 is inferred from the count."""
    return x.reshape(reshape_shape(x.shape, shape, axis, num_axes))


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


def crop_slices(shape, ref_shape, axis=2, offset=()):
    a, off = _axis(axis, len(shape)), list(offset)
    if len(off) > 1 and a + len(off) != len(shape):
        raise ValueError(f"{len(off)} offsets for the {len(shape) - a} axes from axis {a}")
    if len(ref_shape) != len(shape):
        raise ValueError(f"bottoms {list(shape)} and {list(ref_shape)} differ in rank")
    slices = []
    for i, d in enumerate(shape):
        o = 0 if i < a or not off else off[0] if len(off) == 1 else off[i - a]
        size = d if i < a else ref_shape[i]
        if o + size > d:
            raise ValueError(f"crop of {size} at offset {o} is out of bounds on axis {i} (size {d})")
        slices.append(slice(o, o + size))
    return tuple(slices)


def Crop(x, ref, *, axis=2, offset=()):  # noqa: N802
    """Crops ``x`` to ``ref``'s dims on axes >= ``axis``, starting at ``offset`` (none: 0;
    one value: every cropped axis; else one per cropped axis)."""
    return x[crop_slices(x.shape, ref.shape, axis, offset)]


def tile_shape(shape, axis=1, tiles=None):
    if tiles is None or tiles <= 0:
        raise ValueError("tiles must be given and positive")
    a = _axis(axis, len(shape))
    return tuple(shape[:a]) + (shape[a] * tiles,) + tuple(shape[a + 1:])


def Tile(x, *, axis=1, tiles=None):  # noqa: N802
    """Repeats the block of axes >= ``axis`` ``tiles`` times: top[..., t*d + i, ...] = x[..., i, ...]."""
    top = tile_shape(x.shape, axis, tiles)
    a = _axis(axis, x.ndim)
    outer, inner = _count(x.shape[:a]), _count(x.shape[a:])
    return np.broadcast_to(x.reshape(outer, 1, inner), (outer, tiles, inner)).reshape(top)


def Reduction(x, *, operation="SUM", axis=0, coeff=1.0):  # noqa: N802
    """Reduces all axes >= ``axis`` (0: everything, top shape ``()``) to one number per leading
    index: SUM, ASUM (sum |x|), SUMSQ (sum x^2) or MEAN, times ``coeff`` (for MEAN the float32
    ``coeff / count`` as Caffe folds it). Sums accumulate in float64."""
    a = _axis(axis, x.ndim)
    v = x.reshape(x.shape[:a] + (-1,)).astype(np.float64)
    if operation not in ("SUM", "ASUM", "SUMSQ", "MEAN"):
        raise ValueError(f"unknown reduction operation {operation!r}")
    v = np.abs(v) if operation == "ASUM" else v * v if operation == "SUMSQ" else v
    total = v.sum(-1).astype(np.float32)
    c = np.float32(coeff)
    if operation == "MEAN":
        c = c / np.float32(v.shape[-1])
    return np.asarray(total * c if c != 1 else total, np.float32)


def argmax_shape(shape, out_max_val=False, top_k=1, axis=None):
    if top_k < 1:
        raise ValueError("top_k must be >= 1")
    if axis is not None:
        a = _axis(axis, len(shape))
        if top_k > shape[a]:
            raise ValueError(f"top_k {top_k} exceeds the axis size {shape[a]}")
        return tuple(shape[:a]) + (top_k,) + tuple(shape[a + 1:])
    if top_k > _count(shape[1:]):
        raise ValueError(f"top_k {top_k} exceeds the {_count(shape[1:])} values per item")
    top = [1] * max(len(shape), 3)
    top[0], top[1], top[2] = shape[0], 2 if out_max_val else 1, top_k
    return tuple(top)


def ArgMax(x, *, out_max_val=False, top_k=1, axis=None):  # noqa: N802
    """Top-k indices (or values) along ``axis``, or over each item's flattened data.

    Without axis the top is ``(N, 1 or 2, top_k)`` padded with 1s to the bottom's rank, with
    ``out_max_val`` row 0 holding indices and row 1 values; with axis it is ``x`` with that
    axis resized to top_k, holding values if ``out_max_val`` else indices. Ties rank the higher
    index first (Caffe partial-sorts (value, index) pairs with std::greater).
    """
    top = argmax_shape(x.shape, out_max_val, top_k, axis)
    v, a = (x.reshape(x.shape[0], -1), 1) if axis is None else (x, _axis(axis, x.ndim))
    pos = np.argsort(-np.flip(v, a), axis=a, kind="stable").take(np.arange(top_k), axis=a)
    idx = v.shape[a] - 1 - pos  # a stable sort of the flipped data puts higher indices first
    val = np.take_along_axis(v, idx, axis=a)
    if axis is not None:
        out = val if out_max_val else idx
    else:
        out = np.stack([idx, val], axis=1) if out_max_val else idx
    return out.astype(np.float32).reshape(top)


def ShuffleChannel(x, *, group=1):  # noqa: N802
    """ShuffleNet's channel shuffle: channels viewed as (group, C/group) and transposed, so top
    channel ``j*group + i`` is bottom channel ``i*(C/group) + j`` (the ShuffleNet Caffe forks)."""
    if group < 1 or x.ndim < 2 or x.shape[1] % group:
        raise ValueError(f"group {group} must divide the channels of a {list(x.shape)} blob")
    y = x.reshape((x.shape[0], group, x.shape[1] // group, -1)).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(y).reshape(x.shape)


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
    n, c, h, w = x.shape
    tc = c // (stride * stride)
    if reverse:
        y = x.reshape(n, stride, stride, tc, h, w).transpose(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, tc, h, stride, w, stride).transpose(0, 3, 5, 1, 2, 4)
    return np.ascontiguousarray(y).reshape(top)


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


def Reverse(x, *, axis=()):  # noqa: N802
    """ATC's Reverse: flips the element order along each listed axis."""
    axes = tuple(sorted({_axis(a, x.ndim) for a in axis}))
    return np.flip(x, axes) if axes else x


def BatchReindex(x, index):  # noqa: N802
    """``top[i] = x[index[i]]`` for a 1-D index blob."""
    if index.ndim != 1:
        raise ValueError(f"the index bottom must be 1-D, got {list(index.shape)}")
    idx = index.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= x.shape[0]):
        raise ValueError(f"index {int(idx.max())} is outside the batch of {x.shape[0]}")
    return x[idx]


# ------------------------------------------------------------------------ layers
class _ShapeLayer(Layer):
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


def _repeated(fd) -> bool:
    # protobuf >= 6 drops FieldDescriptor.label in favour of is_repeated
    return fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED


def _fields(msg, *names) -> dict:
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


def _legacy_axis(p, legacy: str, ndim: int) -> int:
    """``axis`` or the deprecated unsigned ``concat_dim``/``slice_dim`` (never both)."""
    if not p.HasField(legacy):
        return p.axis
    if p.HasField("axis"):
        raise ValueError(f"give either axis or {legacy}, not both")
    if getattr(p, legacy) >= ndim:
        raise ValueError(f"{legacy} {getattr(p, legacy)} is out of range for a {ndim}-D blob")
    return getattr(p, legacy)


@register("Concat")
class ConcatLayer(_ShapeLayer):
    num_bottoms = (1, None)
    op = staticmethod(Concat)

    def shapes(self, s):
        self._kw = {"axis": _legacy_axis(self.lp.concat_param, "concat_dim", len(s[0]))}
        return [concat_shape(s, **self._kw)]


@register("Slice")
class SliceLayer(_ShapeLayer):
    num_tops = (1, None)
    op = staticmethod(Slice)

    def shapes(self, s):
        p = self.lp.slice_param
        self._kw = {"axis": _legacy_axis(p, "slice_dim", len(s[0])), "slice_point": tuple(p.slice_point),
                    "num_tops": len(self.lp.top)}
        a, bounds = slice_bounds(s[0], **self._kw)
        return [s[0][:a] + (hi - lo,) + s[0][a + 1:] for lo, hi in bounds]


@register("Split")
class SplitLayer(_ShapeLayer):
    """Hands the bottom to every top (Caffe shares the data; so do we)."""

    num_tops = (1, None)
    in_place_ok = False

    def shapes(self, s):
        return [s[0]] * len(self.lp.top)

    def forward(self, bottoms):
        return [bottoms[0]] * len(self.lp.top)


@register("Flatten")
class FlattenLayer(_ShapeLayer):
    in_place_ok = False
    op = staticmethod(Flatten)

    def kwargs(self):
        return _fields(self.lp.flatten_param, "axis", "end_axis")

    def shapes(self, s):
        return [flatten_shape(s[0], **self._kw)]


@register("Reshape")
class ReshapeLayer(_ShapeLayer):
    in_place_ok = False
    op = staticmethod(Reshape)

    def kwargs(self):
        p = self.lp.reshape_param
        return {"shape": tuple(p.shape.dim), "axis": p.axis, "num_axes": p.num_axes}

    def shapes(self, s):
        return [reshape_shape(s[0], self._kw["shape"], self._kw["axis"], self._kw["num_axes"])]


@register("Permute")
class PermuteLayer(_ShapeLayer):
    op = staticmethod(Permute)

    def kwargs(self):
        return _fields(self._param("permute_param"), "order")

    def shapes(self, s):
        return [tuple(s[0][i] for i in permute_order(len(s[0]), **self._kw))]


@register("Crop")
class CropLayer(_ShapeLayer):
    num_bottoms = 2
    op = staticmethod(Crop)

    def kwargs(self):
        return _fields(self.lp.crop_param, "axis", "offset")

    def shapes(self, s):
        return [tuple(sl.stop - sl.start for sl in crop_slices(s[0], s[1], **self._kw))]


@register("Tile")
class TileLayer(_ShapeLayer):
    op = staticmethod(Tile)

    def kwargs(self):
        p = self.lp.tile_param
        return {"axis": p.axis, "tiles": p.tiles if p.HasField("tiles") else None}

    def shapes(self, s):
        return [tile_shape(s[0], **self._kw)]


@register("Reduction")
class ReductionLayer(_ShapeLayer):
    op = staticmethod(Reduction)

    def kwargs(self):
        return _fields(self.lp.reduction_param, "operation", "axis", "coeff")

    def shapes(self, s):
        return [s[0][:_axis(self._kw["axis"], len(s[0]))]]


@register("ArgMax")
class ArgMaxLayer(_ShapeLayer):
    op = staticmethod(ArgMax)

    def kwargs(self):
        p = self.lp.argmax_param
        axis = p.axis if p.HasField("axis") else None
        return {"out_max_val": p.out_max_val, "top_k": p.top_k, "axis": axis}

    def shapes(self, s):
        return [argmax_shape(s[0], **self._kw)]


@register("Silence")
class SilenceLayer(_ShapeLayer):
    """Consumes its bottoms and produces nothing."""

    num_bottoms = (1, None)
    num_tops = 0

    def shapes(self, s):
        return []

    def forward(self, bottoms):
        return []


@register("ShuffleChannel")
class ShuffleChannelLayer(_ShapeLayer):
    op = staticmethod(ShuffleChannel)

    def kwargs(self):
        return _fields(self._param("shuffle_channel_param"), "group")

    def shapes(self, s):
        g = self._kw["group"]
        if g < 1 or len(s[0]) < 2 or s[0][1] % g:
            raise ValueError(f"group {g} must divide the channels of a {list(s[0])} blob")
        return [s[0]]


@register("Reorg")
class ReorgLayer(_ShapeLayer):
    in_place_ok = False
    op = staticmethod(Reorg)

    def kwargs(self):
        return _fields(self._param("reorg_param"), "stride", "reverse")

    def shapes(self, s):
        return [reorg_shape(s[0], **self._kw)]


@register("Unsqueeze")
class UnsqueezeLayer(_ShapeLayer):
    """The fork fixes the top shape at setup; we recompute it on every reshape."""

    op = staticmethod(Unsqueeze)

    def kwargs(self):
        p = self._param("unsqueeze_param")
        return {"dim": p.dim if p.HasField("dim") else None}

    def shapes(self, s):
        return [unsqueeze_shape(s[0], **self._kw)]


@register("Reverse")
class ReverseLayer(_ShapeLayer):
    op = staticmethod(Reverse)

    def kwargs(self):
        return _fields(self._param("reverse_param"), "axis")

    def shapes(self, s):
        for a in self._kw["axis"]:
            _axis(a, len(s[0]))
        return [s[0]]


@register("BatchReindex")
class BatchReindexLayer(_ShapeLayer):
    num_bottoms = 2
    op = staticmethod(BatchReindex)

    def shapes(self, s):
        if len(s[1]) != 1:
            raise ValueError(f"the index bottom must be 1-D, got {list(s[1])}")
        return [(s[1][0],) + s[0][1:]]
