"""Which layers run backward, and where each gradient goes: Caffe's ``Net::Init`` rules.

The executor inserts no Split layers: a blob read by several layers is simply read several
times. Caffe inserts one (``InsertSplits``) and that matters for gradients: every reader writes
its own copy of the diff and the Split adds them up. :func:`plan_backward` rebuilds Caffe's
view — the layer list with a *virtual split* after each blob version read by more than one
layer (or read once and also weighted as a loss) — and then applies ``Net::Init``'s three
passes over it, in Caffe's order:

1. forward: a layer needs backward when a bottom needs it or a learned blob has ``lr_mult != 0``;
   ``propagate_down`` overrides a bottom's flag;
2. backward from the losses: a layer that contributes to no loss, or whose every top is a blob
   no one back-propagates into, does not run backward;
3. ``force_backward``: every layer runs backward, into every bottom its type allows.

Diff keys are blob names, except a virtual split's tops: ``"<blob>@split<version>/<k>"``,
whose diffs the Net keeps privately (pycaffe lists Caffe's split blobs; nobody reads them).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from amct_caffe.errors import GraphError


@dataclass
class Step:
    """One entry of Caffe's layer list: a real layer (``layer`` index) or a virtual split."""

    layer: int | None  # index in Net.layers, None for a virtual split
    bottom_keys: list[str]
    top_keys: list[str]
    need_backward: bool = False
    bottom_need_backward: list[bool] = field(default_factory=list)
    # a virtual split carrying a loss: the constant loss weight added to the sum
    split_loss_weight: float = 0.0


@dataclass
class BackwardPlan:
    steps: list[Step]
    step_of_layer: list[int]  # Net.layers index -> index in steps
    param_propagate_down: list[list[bool]]
    # per layer, per top: the forward's loss is sum(weight * top data), with Caffe's weights after InsertSplits
    # (a split carrying a loss adds its weight to its blob's; a layer losing its loss_weight list to one keeps none,
    # or a LossLayer's default 1 on top 0)
    loss_weights: list[list[float]]
    # per layer, per top: the constant a loss top's diff holds (0 where a virtual split took the
    # loss over: the split then adds the weight to its readers' diffs)
    diff_seeds: list[list[float]]
    # (layer, top) of a loss layer's top 0 that got its default weight back after its split (InsertSplits): Caffe's
    # forward weights it by its diff, which the split's backward overwrites, so from the second forward on the
    # loss counts what the backward left there; ``loss_weights`` hold only the split's part for it
    diff_weighted: set = field(default_factory=set)


def loss_weights_of(layer, num_tops: int) -> list[float]:
    """Caffe's SetLossWeights (LossLayer adds loss_weight 1 when the prototxt gives none)."""
    given = list(layer.lp.loss_weight)
    if not given and layer.is_loss:
        given = [1.0]
    if not given:
        return [0.0] * num_tops
    if len(given) != num_tops:
        raise GraphError(f"layer '{layer.name}' ({layer.type}): loss_weight must be given once per top "
                         f"blob or not at all ({len(given)} for {num_tops} top(s))")
    return [float(w) for w in given]


def plan_backward(layers, bottom_names, top_names, force_backward: bool) -> BackwardPlan:
    """The backward schedule of a net (see the module docstring)."""
    n = len(layers)
    loss_weights = [loss_weights_of(layer, len(top_names[i])) for i, layer in enumerate(layers)]
    seeds = [list(w) for w in loss_weights]
    # InsertSplits sees only the loss_weight fields a prototxt gives (not a LossLayer's default of 1)
    given = [[float(w) for w in layer.lp.loss_weight][:len(top_names[i])] for i, layer in enumerate(layers)]
    # -- InsertSplits: readers of each blob version (a version is (producer layer, top index))
    producer: dict[str, tuple[int, int]] = {}
    readers: dict[tuple[int, int], list[tuple[int, int]]] = {}
    bottom_source: dict[tuple[int, int], tuple[int, int]] = {}
    for i in range(n):
        for j, b in enumerate(bottom_names[i]):
            src = producer[b]
            bottom_source[(i, j)] = src
            readers.setdefault(src, []).append((i, j))
        for j, t in enumerate(top_names[i]):
            producer[t] = (i, j)
    bottom_keys = [list(bottom_names[i]) for i in range(n)]
    splits_after: dict[int, list[Step]] = {}
    split_losses: list[tuple[int, int, float]] = []  # (layer, top, weight) of each split carrying a loss
    diff_weighted: set[tuple[int, int]] = set()
    for (p, j), reads in sorted(readers.items()):
        blob = top_names[p][j]
        weight = given[p][j] if j < len(given[p]) else 0.0
        if len(reads) + (1 if weight else 0) <= 1:
            continue
        keys = [f"{blob}@split{p}/{k}" for k in range(len(reads))]
        for (i, bj), key in zip(reads, keys, strict=True):
            bottom_keys[i][bj] = key
        splits_after.setdefault(p, []).append(Step(None, [blob], keys, split_loss_weight=weight))
        if weight:
            split_losses.append((p, j, weight))
            # Caffe moves the loss onto the split and clears the layer's loss_weight list, every top's: its
            # other tops are no loss any more, and a LossLayer's setup then gives top 0 its default weight of 1
            # again (a diff the split's backward overwrites when it is this top; the forward loss counts it)
            seeds[p] = [0.0] * len(seeds[p])
            if layers[p].is_loss:
                seeds[p][0] = 1.0
                diff_weighted.add((p, 0))
    # the loss the forward reports: each top's weight after the splits, plus the loss of the split carrying it
    forward_weights = [list(w) for w in seeds]
    for p, j in diff_weighted:
        forward_weights[p][j] = 0.0  # (read from the diff each forward)
    for p, j, weight in split_losses:
        forward_weights[p][j] += weight
    steps: list[Step] = []
    step_of_layer = []
    for i in range(n):
        step_of_layer.append(len(steps))
        steps.append(Step(i, bottom_keys[i], list(top_names[i])))
        steps.extend(splits_after.get(i, []))

    # -- pass 1: need_backward forward through the net
    param_propagate_down = []
    blob_need_backward: dict[str, bool] = {}
    for step in steps:
        layer = None if step.layer is None else layers[step.layer]
        need = False
        for b in step.bottom_keys:
            need |= blob_need_backward.get(b, False)
        if layer is not None:
            pd = list(layer.lp.propagate_down)
            if pd and len(pd) != len(step.bottom_keys):
                raise GraphError(f"layer '{layer.name}': propagate_down must be given 0 or {len(step.bottom_keys)} "
                                 f"times (once per bottom), not {len(pd)}")
            step.bottom_need_backward = ([bool(v) for v in pd] if pd else
                                         [blob_need_backward.get(b, False) for b in step.bottom_keys])
            specs = list(layer.lp.param)
            if len(specs) > len(layer.blobs):
                raise GraphError(f"layer '{layer.name}' ({layer.type}): {len(specs)} param specs for "
                                 f"{len(layer.blobs)} learned blob(s)")
            flags = [(specs[k].lr_mult if k < len(specs) else 1.0) != 0 for k in range(len(layer.blobs))]
            need |= any(flags)
            param_propagate_down.append(flags)
        else:
            step.bottom_need_backward = [blob_need_backward.get(b, False) for b in step.bottom_keys]
        step.need_backward = need
        if need:
            for t in step.top_keys:
                blob_need_backward[t] = True

    # -- pass 2: backward from the losses
    step_loss = []
    for step in steps:
        if step.layer is None:
            step_loss.append([0.0] * len(step.top_keys))
        else:
            step_loss.append(seeds[step.layer])
    under_loss: set[str] = set()
    skip_backprop: set[str] = set()
    for s in range(len(steps) - 1, -1, -1):
        step = steps[s]
        contributes = any(step_loss[s][k] or t in under_loss for k, t in enumerate(step.top_keys))
        contributes |= bool(step.split_loss_weight)
        # (a split carrying a loss has a top for it in Caffe, which no layer reads and so none skips)
        skip = not step.split_loss_weight and all(t in skip_backprop for t in step.top_keys)
        if step.need_backward and skip:
            step.need_backward = False
            step.bottom_need_backward = [False] * len(step.bottom_keys)
        if not contributes:
            step.need_backward = False
        for k, b in enumerate(step.bottom_keys):
            if contributes:
                under_loss.add(b)
            else:
                step.bottom_need_backward[k] = False
            if not step.bottom_need_backward[k]:
                skip_backprop.add(b)

    # -- pass 3: force_backward
    if force_backward:
        for step in steps:
            step.need_backward = True
            layer = None if step.layer is None else layers[step.layer]
            step.bottom_need_backward = [
                need or (layer is None or layer.allow_force_backward(k))
                for k, need in enumerate(step.bottom_need_backward)]
        param_propagate_down = [[True] * len(flags) for flags in param_propagate_down]
    return BackwardPlan(steps, step_of_layer, param_propagate_down, forward_weights, seeds, diff_weighted)



class DiffStore:
    """The diffs of a Net's backward by key — its blobs' and its virtual splits' tops' — with
    Caffe's ``Blob::ShareDiff`` pointers between them, replayed as Caffe makes them.

    ``share(dst, src)`` is ``dst->ShareDiff(*src)``: from then on the two keys hold one diff
    memory (with every key that already pointed at ``src``'s memory), while the memory ``dst``
    held before stays with whoever else still points at it; ``dst`` now shows ``src``'s values.
    Caffe makes these pointers in ``Reshape`` (Reshape, a one-bottom Concat, a one-top Slice: the
    top takes the bottom's memory, again on every forward) and in ``Backward_cpu`` (Flatten, an
    identity Permute: the bottom takes the top's memory). ``set`` stores a diff in every key of
    its memory — e.g. an in-place layer on a reshaped blob writes the diff the Reshape's top shows
    after the backward.
    """

    def __init__(self, blobs) -> None:
        self._blobs = blobs  # the Net's {name: Blob}
        self._split: dict[str, np.ndarray] = {}  # a virtual split's top key -> its diff
        self._memory: dict[str, int] = {}  # key -> memory id; a key absent owns its memory
        self._orphans: dict[int, np.ndarray] = {}  # memory no key points at -> its last diff
        self._next = 0

    def _blob_of(self, key: str):
        return self._blobs[key] if key in self._blobs else self._blobs[key.rsplit("@split", 1)[0]]

    def get(self, key: str) -> np.ndarray:
        if key in self._blobs:
            return self._blobs[key].diff
        blob = self._blob_of(key)
        part = self._split.get(key)
        return part.reshape(blob.shape) if part is not None and part.size == blob.count else np.zeros(
            blob.shape, np.float32)

    def set(self, key: str, value: np.ndarray, alone: bool = False) -> None:
        """Store the diff of ``key`` in every key of its memory (only in ``key`` if ``alone``)."""
        for k in [key] if alone else self.members(key):
            blob = self._blob_of(k)
            v = value.reshape(blob.shape) if value.size == blob.count else value
            if k in self._blobs:
                blob.diff = v
            else:
                self._split[k] = v

    def share(self, dst: str, src: str) -> None:
        src_memory = self.memory_of(src)
        old = self._memory.get(dst)
        if old is not None and old != src_memory and len(self._holders(old)) == 1:
            # dst was the last key on that memory; a layer may still hold it (see ``held``)
            self._orphans[old] = np.array(self.get(dst), np.float32)
        self._memory[dst] = src_memory
        self.set(dst, self.get(src), alone=True)

    def memory_of(self, key: str) -> int:
        """The id of the diff memory ``key`` points at now (given one on first use)."""
        if key not in self._memory:
            self._memory[key] = self._next
            self._next += 1
        return self._memory[key]

    def held(self, memory: int, shape) -> np.ndarray:
        """The diff in ``memory`` as a layer that kept a pointer to it reads it: a key's that still
        points there, else what it held when its last key left it."""
        holders = self._holders(memory)
        if holders:
            return self.get(holders[0])
        value = self._orphans.get(memory)
        return value.reshape(shape) if value is not None and value.size == int(np.prod(shape)) else np.zeros(
            shape, np.float32)

    def _holders(self, memory: int) -> list[str]:
        return [k for k, m in self._memory.items() if m == memory]

    def members(self, key: str) -> list[str]:
        """Every key whose diff is ``key``'s memory (``key`` first)."""
        mem = self._memory.get(key)
        if mem is None:
            return [key]
        return [key] + [k for k, m in self._memory.items() if m == mem and k != key]


def blob_loss_weights(blobs, layers, top_names) -> "OrderedDict[str, float]":
    """pycaffe's Net.blob_loss_weights: {blob: the loss weight a layer gives it as its top}, 0.0 for the others."""
    weights = OrderedDict.fromkeys(blobs, 0.0)
    for layer, tops in zip(layers, top_names, strict=True):
        weights.update((top, w) for top, w in zip(tops, loss_weights_of(layer, len(tops)), strict=True) if w)
    return weights


def as_shape(arr: np.ndarray, shapes, k: int) -> np.ndarray:
    """``arr`` viewed in ``shapes[k]`` where that is another shape of its element count, else as it is: a layer's
    backward sees its blobs in the shapes it gave them, though a later in-place layer reshaped them."""
    if k < len(shapes) and arr.shape != shapes[k] and arr.size == int(np.prod(shapes[k], dtype=np.int64)):
        return arr.reshape(shapes[k])
    return arr


def own_diffs(grads: list, top_diffs: list, bottom_names: list, top_names: list) -> list:
    """``grads`` with a copy wherever one is (a view of) a top's diff or of another bottom's: Caffe's blobs each
    own their diff memory, and a layer passing a gradient through (an Eltwise SUM's coefficient 1) copies it,
    so a script writing one blob's diff changes no other. A bottom computed in place (also a top) keeps it."""
    out, kept = [], [d for d in top_diffs if d is not None]
    for grad, name in zip(grads, bottom_names, strict=True):
        if grad is not None and name not in top_names and any(np.may_share_memory(grad, d) for d in kept):
            grad = np.array(grad, dtype=np.float32, copy=True)
        if grad is not None:
            kept.append(grad)
        out.append(grad)
    return out
