"""The graph IR: nodes (layers) reading and writing named blobs, in SSA form, topologically ordered.

SSA: every blob name is written exactly once, by one node or as a graph input. Caffe's
in-place layers (top == bottom) are renamed on import (see :func:`ssa_rename`). The IR
holds weights as numpy arrays and keeps each layer's original LayerParameter as an opaque
object (``Node.layer_param``), so fields the tool does not interpret survive unchanged; this
package never imports protobuf.
"""

from __future__ import annotations

import copy

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from amct_caffe.errors import GraphError


@dataclass
class Blob:
    """A named tensor edge; ``shape`` is known once shapes are inferred."""

    name: str
    shape: tuple[int, ...] | None = None


@dataclass(eq=False)
class Node:
    """One layer: ``type`` is the Caffe type string, ``params`` its learned blobs.

    ``origin`` lists the original model's layer names this node stands for (a fused
    Conv+BN+Scale node has three), used for the quant.json mapping.
    """

    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    params: list[np.ndarray] = field(default_factory=list)
    layer_param: Any = None
    origin: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.origin:
            self.origin = [self.name]

    def __repr__(self) -> str:
        return f"Node({self.name!r}, {self.type}, {self.bottoms} -> {self.tops})"


class Graph:
    """Nodes in execution order plus blob metadata. Mutate through the methods, then ``check()``."""

    def __init__(self, name: str = "", nodes: Iterable[Node] = (), blobs: dict[str, Blob] | None = None):
        self.name = name
        # the layer names of the model's TRAIN phase, where this is the TEST phase of a TRAIN/TEST model (QAT:
        # a layer only in the TEST phase is never trained); None otherwise
        self.train_layers: frozenset[str] | None = None
        # names the prototxt gives two layers (a copy per phase, include { phase }): such a layer cannot be retrained
        self.phase_twins: frozenset[str] = frozenset()
        self.nodes: list[Node] = list(nodes)
        self.blobs: dict[str, Blob] = dict(blobs or {})
        for n in self.nodes:
            for b in (*n.bottoms, *n.tops):
                self.blobs.setdefault(b, Blob(b))

    # ---------------------------------------------------------------- queries
    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise GraphError(f"graph '{self.name}' has no layer named '{name}'")

    def has_node(self, name: str) -> bool:
        return any(n.name == name for n in self.nodes)

    def producer(self, blob: str) -> Node | None:
        for n in self.nodes:
            if blob in n.tops:
                return n
        return None

    def consumers(self, blob: str) -> list[Node]:
        return [n for n in self.nodes if blob in n.bottoms]

    @property
    def inputs(self) -> list[str]:
        """Blobs produced by Input layers (the net's inputs)."""
        return [t for n in self.nodes if n.type == "Input" for t in n.tops]

    @property
    def outputs(self) -> list[str]:
        """Blobs no node reads, sorted by name as Caffe lists them."""
        read = {b for n in self.nodes for b in n.bottoms}
        return sorted(t for n in self.nodes for t in n.tops if t not in read)

    def unique_blob_name(self, base: str) -> str:
        name, i = base, 1
        while name in self.blobs:
            name, i = f"{base}_{i}", i + 1
        return name

    def unique_node_name(self, base: str, taken: set[str] | None = None) -> str:
        """``base``, or ``base_1``, ``base_2``... that no node has. ``taken``: the node names, kept by a caller that
        adds many nodes (the chosen name is added to it), instead of a scan of every node per call."""
        names = {n.name for n in self.nodes} if taken is None else taken
        name, i = base, 1
        while name in names:
            name, i = f"{base}_{i}", i + 1
        if taken is not None:
            taken.add(name)
        return name

    # ---------------------------------------------------------------- edits
    def insert(self, index: int, node: Node) -> None:
        self.nodes.insert(index, node)
        for b in (*node.bottoms, *node.tops):
            self.blobs.setdefault(b, Blob(b))

    def index(self, node: Node) -> int:
        for i, n in enumerate(self.nodes):
            if n is node:
                return i
        raise GraphError(f"layer '{node.name}' is not in graph '{self.name}'")

    def remove(self, node: Node) -> None:
        del self.nodes[self.index(node)]

    def rename_blob_uses(self, old: str, new: str, after: Node | None = None) -> None:
        """Make every reader of ``old`` (after ``after`` if given) read ``new`` instead."""
        start = self.index(after) + 1 if after is not None else 0
        for n in self.nodes[start:]:
            n.bottoms = [new if b == old else b for b in n.bottoms]
        self.blobs.setdefault(new, Blob(new))

    def prune_blobs(self) -> None:
        used = {b for n in self.nodes for b in (*n.bottoms, *n.tops)}
        self.blobs = {k: v for k, v in self.blobs.items() if k in used}

    def copy(self) -> "Graph":
        """A structural copy: new nodes, lists and layer_params; weight arrays are shared (treat them
        as immutable: passes assign new arrays instead of writing into old ones)."""
        nodes = [Node(n.name, n.type, list(n.bottoms), list(n.tops), list(n.params), copy.deepcopy(n.layer_param),
                      list(n.origin)) for n in self.nodes]
        out = Graph(self.name, nodes, {k: Blob(v.name, v.shape) for k, v in self.blobs.items()})
        out.train_layers, out.phase_twins = self.train_layers, self.phase_twins
        return out

    def check(self) -> None:
        from amct_caffe.ir.checker import check_graph

        check_graph(self)

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, {len(self.nodes)} nodes)"


def check_producers(layers: list[tuple], where: str = "") -> None:
    """Caffe's rules for a top naming an existing blob (net.cpp AppendTop, insert_splits.cpp).

    ``layers``: (name, bottoms, tops[, the loss_weight fields given]) per layer. It is an in-place write only
    where the layer's bottom at the same position is that blob; otherwise the blob would have two producers
    ("Top blob produced by multiple sources"). And an in-place write is refused when another layer already
    read the blob's current value, or its producer gave it a loss_weight (a loss counts as a reader there):
    Caffe's automatic Split then gives the in-place layer a split copy as its bottom, and its top becomes a
    second producer of the blob. Raises GraphError naming the layers.
    """
    producer: dict[str, str] = {}
    readers: dict[str, list[str]] = {}  # readers of each blob's current value ("layer 'x'", or its loss)
    for name, bottoms, tops, *weights in layers:
        in_place = {t for j, t in enumerate(tops) if j < len(bottoms) and bottoms[j] == t}
        for j, t in enumerate(tops):
            if j < len(bottoms) and bottoms[j] == t:  # (Caffe's AppendTop asks the bottom at the top's position)
                pass
            elif t in tops[:j]:
                raise GraphError(f"{where}layer '{name}' writes blob '{t}' twice (tops {tops.index(t)} and {j}); "
                                 "give each top its own name (Caffe: 'produced by multiple sources')")
            elif t in producer:
                raise GraphError(f"{where}layer '{name}' writes blob '{t}', which layer '{producer[t]}' already "
                                 f"produces; only an in-place layer (top {j} = bottom {j}) may write an existing "
                                 "blob (Caffe: 'produced by multiple sources')")
            if t in in_place and readers.get(t):
                raise GraphError(f"{where}layer '{name}' computes blob '{t}' in place, but {readers[t][0]} already "
                                 f"read it; Caffe refuses this (its automatic Split gives '{name}' a copy, and '{t}' "
                                 f"then has two producers): give '{name}' a top of its own")
        for b in bottoms:
            if b not in in_place:
                readers.setdefault(b, []).append(f"layer '{name}'")
        given = list(weights[0]) if weights else []
        for j, t in enumerate(tops):
            producer[t] = name
            readers[t] = [f"the loss (loss_weight {given[j]:g} of layer '{name}')"] if j < len(given) and given[j] \
                else []


def ssa_rename(layers: list[tuple[str, list[str], list[str]]],
               inputs: Iterable[str] = ()) -> list[tuple[list[str], list[str]]]:
    """SSA names for Caffe's sequential blob semantics.

    ``layers`` is [(layer name, bottoms, tops)] in file order, where a top may repeat an existing
    blob name (Caffe's in-place computation). The *last* write of a blob keeps the original name,
    so it means what pycaffe shows under that name (the value after the whole in-place chain) and
    the net's outputs keep their names, except for the network's ``inputs`` (the Input layers'
    tops): their *first* write keeps the name, so that the models written from the graph are fed
    as the source is. Every other write gets a fresh name: the writing layer's name when free, else
    ``<blob>_<layer>`` (made unique). Returns the renamed (bottoms, tops) per layer.
    """
    check_producers(layers)
    inputs = set(inputs)
    writes: dict[str, int] = {}
    for _, _, tops in layers:
        for t in tops:
            writes[t] = writes.get(t, 0) + 1
    taken = set(writes)
    seen: dict[str, int] = {}
    current: dict[str, str] = {}  # Caffe name -> the SSA name readers see now
    out = []
    for name, bottoms, tops in layers:
        new_bottoms = [current.get(b, b) for b in bottoms]
        new_tops = []
        for t in tops:
            seen[t] = seen.get(t, 0) + 1
            if seen[t] == (1 if t in inputs else writes[t]):
                fresh = t  # the final value keeps the original name (an input: the value fed)
            else:
                base = name if name not in taken else f"{t}_{name}"
                fresh, i = base, 1
                while fresh in taken:
                    fresh, i = f"{base}_{i}", i + 1
                taken.add(fresh)
            current[t] = fresh
            new_tops.append(fresh)
        out.append((new_bottoms, new_tops))
    return out
