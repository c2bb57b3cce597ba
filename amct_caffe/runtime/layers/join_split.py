"""Layers that join, cut, copy or drop blobs, without arithmetic.

Concat and Slice (along an axis), Split (one bottom to several tops), Crop (to a reference
blob), Tile (repeats), BatchReindex (picks items) and Silence (consumes its bottoms). The op /
layer conventions are shape_common's; results may be views of the input.

Backward (each layer's ``Backward_cpu``): Concat cuts the top diff back into the bottoms', Slice
joins its tops' diffs, Split and Tile add the copies' diffs up, Crop pads with zeros,
BatchReindex scatter-adds (its index gets no gradient) and Silence writes zeros.
"""

from __future__ import annotations

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.ops import register
from amct_caffe.runtime.layers.shape_common import ShapeLayer, check_axis, element_count, proto_fields


# ------------------------------------------------------------------------ pure ops
def concat_shape(shapes, axis=1):
    a = check_axis(axis, len(shapes[0]))
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
    a = check_axis(axis, len(shape))
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


def crop_slices(shape, ref_shape, axis=2, offset=()):
    a, off = check_axis(axis, len(shape)), list(offset)
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
    a = check_axis(axis, len(shape))
    return tuple(shape[:a]) + (shape[a] * tiles,) + tuple(shape[a + 1:])


def Tile(x, *, axis=1, tiles=None):  # noqa: N802
    """Repeats the block of axes >= ``axis`` ``tiles`` times: top[..., t*d + i, ...] = x[..., i, ...]."""
    top = tile_shape(x.shape, axis, tiles)
    a = check_axis(axis, x.ndim)
    outer, inner = element_count(x.shape[:a]), element_count(x.shape[a:])
    return np.broadcast_to(x.reshape(outer, 1, inner), (outer, tiles, inner)).reshape(top)


def BatchReindex(x, index):  # noqa: N802
    """``top[i] = x[index[i]]`` for a 1-D index blob."""
    if index.ndim != 1:
        raise ValueError(f"the index bottom must be 1-D, got {list(index.shape)}")
    idx = index.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= x.shape[0]):
        raise ValueError(f"index {int(idx.max())} is outside the batch of {x.shape[0]}")
    return x[idx]


# ------------------------------------------------------------------------ layers
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
class ConcatLayer(ShapeLayer):
    num_bottoms = (1, None)
    op = staticmethod(Concat)

    @classmethod
    def in_place_fault(cls, lp) -> str:  # (one bottom: Caffe shares it, as in place)
        return "Caffe's Concat resizes its first input to the joined shape (its memory breaks)" \
            if len(lp.bottom) > 1 else ""

    def shares_bottom_data(self, bottom_shapes):
        return len(bottom_shapes) == 1  # Caffe's ConcatLayer::Reshape: one bottom is shared

    def diff_sharing(self, bottom_shapes):
        return "reshape" if len(bottom_shapes) == 1 else None  # ... data and diff

    def shapes(self, s):
        self._kw = {"axis": _legacy_axis(self.lp.concat_param, "concat_dim", len(s[0]))}
        return [concat_shape(s, **self._kw)]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """dx_i = the part of dy along the axis that bottom i filled (one bottom: dy itself)."""
        dy = top_diffs[0]
        if len(bottoms) == 1:  # Caffe shares the diff
            return [dy if propagate_down[0] else None]
        a = check_axis(self._kw["axis"], dy.ndim)
        out, start = [], 0
        for b, pd in zip(bottoms, propagate_down, strict=True):
            stop = start + b.shape[a]
            out.append(np.ascontiguousarray(dy[(slice(None),) * a + (slice(start, stop),)]) if pd else None)
            start = stop
        return out


@register("Slice")
class SliceLayer(ShapeLayer):
    num_tops = (1, None)
    op = staticmethod(Slice)

    @classmethod
    def in_place_fault(cls, lp) -> str:  # (one top: Caffe shares it, as in place)
        return "Caffe's Slice refuses to reshape its input to a part of it (Check failed)" if len(lp.top) > 1 else ""

    def shares_bottom_data(self, bottom_shapes):
        return len(self.lp.top) == 1  # Caffe's SliceLayer::Reshape: one top is shared

    def diff_sharing(self, bottom_shapes):
        return "reshape" if len(self.lp.top) == 1 else None  # ... data and diff

    def shapes(self, s):
        p = self.lp.slice_param
        self._kw = {"axis": _legacy_axis(p, "slice_dim", len(s[0])), "slice_point": tuple(p.slice_point),
                    "num_tops": len(self.lp.top)}
        a, bounds = slice_bounds(s[0], **self._kw)
        return [s[0][:a] + (hi - lo,) + s[0][a + 1:] for lo, hi in bounds]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """dx = the tops' diffs joined along the slice axis (one top: its diff itself)."""
        if not propagate_down[0]:
            return [None]
        if len(top_diffs) == 1:  # Caffe shares the diff
            return [top_diffs[0]]
        return [np.concatenate(top_diffs, axis=check_axis(self._kw["axis"], bottoms[0].ndim))]


@register("Split")
class SplitLayer(ShapeLayer):
    """Hands the bottom to every top (Caffe shares the data; so do we)."""

    num_tops = (1, None)
    in_place_ok = False
    shares_data = True

    def shapes(self, s):
        return [s[0]] * len(self.lp.top)

    def forward(self, bottoms):
        return [bottoms[0]] * len(self.lp.top)

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """dx = sum of the tops' diffs (in top order, as Caffe's caffe_add then axpy)."""
        if not propagate_down[0]:
            return [None]
        if len(top_diffs) == 1:
            return [top_diffs[0]]
        dx = np.add(top_diffs[0], top_diffs[1])
        for d in top_diffs[2:]:
            dx += d
        return [dx]


@register("Crop")
class CropLayer(ShapeLayer):
    num_bottoms = 2
    op = staticmethod(Crop)

    def kwargs(self):
        return proto_fields(self.lp.crop_param, "axis", "offset")

    def shapes(self, s):
        out = tuple(sl.stop - sl.start for sl in crop_slices(s[0], s[1], **self._kw))
        if self.in_place and out != tuple(s[0]):  # Caffe reshapes its input to the crop, then reads past it: abort
            self._fail(f"works in place (top == bottom) while cropping {list(s[0])} to {list(out)}, which Caffe "
                       "refuses (Check failed: indices[i] < shape(i)); give it a top of its own")
        return [out]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """dx = zeros with dy at the cropped window; the reference bottom's diff is left as is."""
        if not propagate_down[0]:
            return [None, None]
        if self.in_place:
            return [self.in_place_zero_diff(bottoms[0], "clears the diff it shares with the top first"), None]
        x = bottoms[0]
        dx = np.zeros(x.shape, np.float32)
        dx[crop_slices(x.shape, bottoms[1].shape, **self._kw)] = top_diffs[0]
        return [dx, None]


@register("Tile")
class TileLayer(ShapeLayer):
    op = staticmethod(Tile)

    def kwargs(self):
        p = self.lp.tile_param
        return {"axis": p.axis, "tiles": p.tiles if p.HasField("tiles") else None}

    def shapes(self, s):
        return [tile_shape(s[0], **self._kw)]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """dx[..., i, ...] = sum over the tiles t of dy[..., t*d + i, ...]."""
        if not propagate_down[0]:
            return [None]
        x = bottoms[0]
        a = check_axis(self._kw["axis"], x.ndim)
        outer, inner = element_count(x.shape[:a]), element_count(x.shape[a:])
        dy = top_diffs[0].reshape(outer, self._kw["tiles"], inner)
        return [dy.sum(axis=1, dtype=np.float32).reshape(x.shape)]


@register("BatchReindex")
class BatchReindexLayer(ShapeLayer):
    num_bottoms = 2
    op = staticmethod(BatchReindex)

    def shapes(self, s):
        if len(s[1]) != 1:
            raise ValueError(f"the index bottom must be 1-D, got {list(s[1])}")
        return [(s[1][0],) + s[0][1:]]

    def allow_force_backward(self, bottom_index):
        # Caffe allows it and then fails its CHECK(!propagate_down[1]); we fail in backward too
        return True

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """dx[index[i]] += dy[i] (items picked twice add up); no gradient for the index."""
        if propagate_down[1]:
            raise GraphError(f"layer '{self.name}' (BatchReindex): cannot back-propagate to the index "
                             "bottom (Caffe CHECK-fails); set propagate_down: [true, false] and no "
                             "force_backward")
        if not propagate_down[0]:
            return [None, None]
        x = bottoms[0]
        dx = np.zeros((x.shape[0], element_count(x.shape[1:])), np.float32)
        np.add.at(dx, bottoms[1].astype(np.int64), top_diffs[0].reshape(len(bottoms[1]), -1))
        return [dx.reshape(x.shape), None]


@register("Silence")
class SilenceLayer(ShapeLayer):
    """Consumes its bottoms and produces nothing."""

    num_bottoms = (1, None)
    num_tops = 0

    def shapes(self, s):
        return []

    def forward(self, bottoms):
        return []

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """Zero diffs for the bottoms asked for (Caffe's caffe_set 0)."""
        return [np.zeros(b.shape, np.float32) if pd else None for b, pd in zip(bottoms, propagate_down, strict=True)]
