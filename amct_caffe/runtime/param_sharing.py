"""The learnable blobs of a Net and Caffe's param sharing (``param { name: ... }``), as Net::AppendParam does.

A layer's ParamSpec naming a param no earlier layer named makes that layer its owner; a later layer naming
it (a sharer) uses the owner's blob instead of its own: same shape (``share_mode`` STRICT) or same count
(PERMISSIVE: the sharer sees the owner's memory in its own shape, :class:`SharedView`). The learnable list
holds each blob once, with its ``lr_mult`` / ``decay_mult``: an owner's, or,
where the owner gave none, the first sharer's that gives one (the owner's unset value counts as unset, not as
its default 1); two that differ are refused, as Caffe aborts on "Shared param has mismatched lr_mult".
"""

from __future__ import annotations

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.runtime.blob import Blob


def shares_every_blob(specs, count: int, owned) -> bool:
    """Whether each of a layer's ``count`` learned blobs names (``specs``: its ParamSpecs) a param in ``owned`` (the
    names earlier layers own): then it needs no weights of its own in the caffemodel (Caffe loads such a net; the
    blobs are the owner's)."""
    specs = list(specs)
    return len(specs) >= count and all(spec.name and spec.name in owned for spec in specs[:count])


class ParamSharing:
    """The learnable blobs of one Net, in the order Caffe lists them, with the owners of named params."""

    def __init__(self, source: str):
        self.source = source  # names the model in messages
        self.learnable: list[tuple[Blob, float, float]] = []  # (blob, lr_mult, decay_mult)
        self._owners: dict[str, tuple[str, Blob]] = {}  # param name -> (owner layer, blob)
        # param name -> (its index in learnable, whether an lr_mult / a decay_mult was given)
        self._given: dict[str, tuple[int, bool, bool]] = {}

    def all_shared(self, specs, count: int) -> bool:
        """:func:`shares_every_blob` with the params the layers so far own."""
        return shares_every_blob(specs, count, self._owners)

    def add(self, layer, loaded: bool = False) -> None:
        """Register ``layer``'s blobs: learnable, or the owner's for a param named before (``layer.blobs`` then
        holds the owner's Blob).

        ``loaded``: the blobs hold this layer's caffemodel arrays. Caffe copies them into the layer's blob after
        ShareData, i.e. into the owner's memory, so they are written there (a RetrainWeightQuant owns the weight
        of the Convolution after it, and starts from the Convolution's trained weight).
        """
        specs = list(layer.lp.param)
        for k, blob in enumerate(layer.blobs):
            spec = specs[k] if k < len(specs) else None
            lr_mult = spec.lr_mult if spec is not None else 1.0
            decay_mult = spec.decay_mult if spec is not None else 1.0
            if spec is None or not spec.name:
                self.learnable.append((blob, lr_mult, decay_mult))
                continue
            owner = self._owners.get(spec.name)
            if owner is None:
                self._owners[spec.name] = (layer.name, blob)
                self._given[spec.name] = (len(self.learnable), spec.HasField("lr_mult"), spec.HasField("decay_mult"))
                self.learnable.append((blob, lr_mult, decay_mult))
                continue
            self._merge_mults(layer.name, spec)
            owner_layer, owner_blob = owner
            strict = spec.share_mode == 0  # STRICT: same shape; PERMISSIVE: same count
            if (owner_blob.shape != blob.shape) if strict else (owner_blob.count != blob.count):
                what = "shape" if strict else "count (share_mode PERMISSIVE)"
                mine, theirs = (list(blob.shape), list(owner_blob.shape)) if strict else (blob.count, owner_blob.count)
                raise GraphError(f"{self.source}: layer '{layer.name}' shares param '{spec.name}' of layer "
                                 f"'{owner_layer}' but its {what} {mine} differs from {theirs}")
            if loaded:
                owner_blob.data.reshape(-1)[...] = blob.data.reshape(-1)
            layer.blobs[k] = owner_blob if owner_blob.shape == blob.shape else SharedView(owner_blob, blob.shape)

    def _merge_mults(self, layer_name: str, spec) -> None:
        """A sharer's lr_mult / decay_mult (module doc)."""
        index, has_lr, has_decay = self._given[spec.name]
        blob, lr_mult, decay_mult = self.learnable[index]
        for field, has, current in (("lr_mult", has_lr, lr_mult), ("decay_mult", has_decay, decay_mult)):
            if not spec.HasField(field):
                continue
            value = getattr(spec, field)
            if has and value != current:
                raise GraphError(f"{self.source}: layer '{layer_name}': shared param '{spec.name}' has mismatched "
                                 f"{field} ({value} here, {current} before); Caffe refuses this: give one value")
            if field == "lr_mult":
                lr_mult, has_lr = value, True
            else:
                decay_mult, has_decay = value, True
        self.learnable[index] = (blob, lr_mult, decay_mult)
        self._given[spec.name] = (index, has_lr, has_decay)


class SharedView(Blob):
    """A PERMISSIVE sharer's blob: the owner's memory (data and diff) seen in the sharer's own shape, as Caffe's
    ShareData / ShareDiff give a Blob of its own shape over the owner's memory (same count). Whatever replaces
    the owner's arrays (a solver's update, another net's weights) shows here; an array written to this blob
    becomes the owner's, reshaped to the owner's shape."""

    __slots__ = ("_owner", "_view_shape")

    def __init__(self, owner: Blob, shape) -> None:  # noqa: D107 - no Blob.__init__: the arrays are the owner's
        self._owner, self._view_shape = owner, tuple(shape)

    def _own_shape(self, value):
        return None if value is None else value.reshape(self._view_shape)

    def _to_owner(self, value):
        return None if value is None else np.asarray(value).reshape(self._owner.shape)

    _data = property(lambda self: self._own_shape(self._owner.data),
                     lambda self, value: setattr(self._owner, "data", self._to_owner(value)))
    _diff = property(lambda self: self._own_shape(self._owner._diff),  # noqa: SLF001 - None until a backward
                     lambda self, value: setattr(self._owner, "diff", self._to_owner(value)))


def share_trained_layers(layers, others: dict) -> None:
    """Net.share_with's work: ``layers`` (a Net's) take the data of ``others``' blobs (another net's params, by
    layer name). Only the layers ``others`` has are re-pointed: a layer it lacks that shares one of their blobs
    by param name keeps the memory it had (Caffe's sharers are Blobs of their own over one memory, and
    ShareData moves one Blob), e.g. a TEST-only layer keeps the test net's weights."""
    pairs = []  # (layer, index, its blob, the other net's)
    for layer in layers:
        theirs = others.get(layer.name)
        if theirs is None or not layer.blobs:
            continue
        if len(theirs) != len(layer.blobs):
            raise GraphError(f"share_with: layer '{layer.name}' has {len(layer.blobs)} learned blob(s) here "
                             f"and {len(theirs)} in the other net")
        for k, (mine, src) in enumerate(zip(layer.blobs, theirs, strict=True)):
            if mine.shape != src.shape:
                raise GraphError(f"share_with: layer '{layer.name}' blob shapes differ: {list(mine.shape)} "
                                 f"vs {list(src.shape)}")
            pairs.append((layer, k, mine, src))
    moved = {id(mine) for _, _, mine, _ in pairs}
    for layer in layers:
        if layer.name not in others:
            for k, blob in enumerate(layer.blobs):
                owner = blob._owner if isinstance(blob, SharedView) else blob  # noqa: SLF001 - this module's class
                if id(blob) in moved or id(owner) in moved:  # keeps the memory it had (a view of it)
                    layer.blobs[k] = Blob(data=blob.data)
    taken: dict[int, object] = {}  # id of a blob moved -> the other net's blob it took
    for layer, k, mine, src in pairs:
        if isinstance(mine, SharedView) or taken.get(id(mine), src) is not src:
            # only this layer's blob moves: not a PERMISSIVE owner's memory, nor a STRICT sharer's Blob, which its
            # owner holds too (the other net may give the two layers weights of their own)
            layer.blobs[k] = Blob(data=src.data)
        else:
            mine.data = src.data
            taken[id(mine)] = src
