"""Structural checks run after every pass (compare onnx's checker).

* node names are unique;
* SSA: each blob is written by exactly one node;
* topological order: a node reads only blobs written by earlier nodes;
* every node writes at least one blob unless its type legitimately has none (an observer: Silence,
  the calibration layers).
"""

from __future__ import annotations

from amct_caffe.errors import GraphError
from amct_caffe.ops import layer_type


def check_graph(graph) -> None:
    names: set[str] = set()
    written: dict[str, str] = {}
    for node in graph.nodes:
        if node.name in names:
            raise GraphError(f"graph '{graph.name}': two layers are named '{node.name}'")
        names.add(node.name)
        for b in node.bottoms:
            if b not in written:
                raise GraphError(f"graph '{graph.name}': layer '{node.name}' reads blob '{b}', which no "
                                 "earlier layer writes (graph not topologically sorted, or a dangling input)")
        if not node.tops and not layer_type(node.type).observer:
            raise GraphError(f"graph '{graph.name}': layer '{node.name}' ({node.type}) writes no blob")
        for t in node.tops:
            if t in written:
                raise GraphError(f"graph '{graph.name}': blob '{t}' is written by both '{written[t]}' and "
                                 f"'{node.name}'; the IR must be in SSA form (rename in-place tops)")
            written[t] = node.name
