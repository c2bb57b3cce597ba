"""NetParameter <-> Graph. The IR never sees protobuf except as each node's opaque layer_param."""

from __future__ import annotations

from collections.abc import Collection

from amct_caffe.io.schema import caffe_pb
from amct_caffe.ir import Graph, Node, ssa_rename


def graph_from_net(net, weights=None) -> Graph:
    """Build an SSA graph from an upgraded, phase-filtered NetParameter and its weights."""
    weights = weights or {}
    layers = [(lp.name, list(lp.bottom), list(lp.top)) for lp in net.layer]
    inputs = [t for lp in net.layer if lp.type == "Input" for t in lp.top]
    nodes = []
    for lp, (bottoms, tops) in zip(net.layer, ssa_rename(layers, inputs), strict=False):
        param = type(lp)()
        param.CopyFrom(lp)
        del param.blobs[:]
        nodes.append(Node(lp.name, lp.type, bottoms, tops, [a.copy() for a in weights.get(lp.name, ())], param))
    graph = Graph(net.name, nodes)
    graph.check()
    return graph


def layer_graph(net, weights=None) -> Graph:
    """The layers of an upgraded, *unfiltered* NetParameter (all phases) as a graph, names unchanged.

    Not SSA, and not checked: blob names are Caffe's (in-place layers write their bottom again) and
    two phases may each write a blob (a TRAIN and a TEST Data layer), even under one layer name. It
    is for passes that edit a TRAIN/TEST model in place and keep the rest as written
    (create_quant_retrain_model); :func:`graph_to_net` writes it back.
    """
    weights = weights or {}
    nodes = []
    for lp in net.layer:
        param = type(lp)()
        param.CopyFrom(lp)
        del param.blobs[:]
        nodes.append(Node(lp.name, lp.type, list(lp.bottom), list(lp.top),
                          [a.copy() for a in weights.get(lp.name, ())], param))
    return Graph(net.name, nodes)


def graph_to_net(graph: Graph, in_place: bool = False, keep: Collection[str] = ()):
    """(NetParameter without blobs, weights by layer name) for a graph.

    ``in_place``: write the layers the source model computed in place (one bottom, one top, the
    same name in their layer_param) in place again wherever that is safe (:func:`in_place_names`),
    so that Caffe, or the executor, runs the model in the source's memory and folds its chains;
    the values named in ``keep`` are not written over. Otherwise every blob keeps its SSA name.
    """
    names = in_place_names(graph, keep) if in_place else {}
    net = caffe_pb().NetParameter()
    net.name = graph.name
    weights = {}
    for node in graph.nodes:
        lp = net.layer.add()
        if node.layer_param is not None:
            lp.CopyFrom(node.layer_param)
        lp.name = node.name
        lp.type = node.type
        del lp.bottom[:]
        lp.bottom.extend(names.get(b, b) for b in node.bottoms)
        del lp.top[:]
        lp.top.extend(names.get(t, t) for t in node.tops)
        del lp.blobs[:]
        if node.params:
            weights[node.name] = node.params
    return net, weights


def in_place_names(graph: Graph, keep: Collection[str] = ()) -> dict[str, str]:
    """{SSA name: written name} that makes the source's in-place layers in place again.

    A node writes its top into its bottom's memory when its layer_param was in place (bottom ==
    top, one of each), the bottom has a producer, and the node is the bottom's only reader: Caffe
    refuses an in-place layer on a blob that another layer reads too (its automatic Split would
    give the blob two producers), and then no layer can tell the two values apart. A chain of
    such writes takes the name of its last value (the one ssa_rename gave the source's name, when
    nothing moved), so its readers keep their names; a chain on a network input takes the input's
    name (which ssa_rename kept), so the model is fed as the source is.

    A value named in ``keep`` is not written over: the layer reading it writes a blob of its own, so
    the value is still there after a forward (the accuracy report's compared blobs). Such a value
    may itself be written into its producer's input; it then lends that chain its name.
    """
    keep = set(keep)
    produced = {t for node in graph.nodes for t in node.tops}
    readers: dict[str, int] = {}
    for node in graph.nodes:
        for b in node.bottoms:
            readers[b] = readers.get(b, 0) + 1
    parent: dict[str, str] = {}  # bottom value -> the value written over it
    for node in graph.nodes:
        lp = node.layer_param
        if (lp is None or len(node.bottoms) != 1 or len(node.tops) != 1 or len(lp.bottom) != 1
                or list(lp.bottom) != list(lp.top)):
            continue
        b = node.bottoms[0]
        if b in produced and readers[b] == 1 and b not in keep:
            parent[b] = node.tops[0]
    inputs = set(graph.inputs)
    names = {}
    for start in set(parent) - set(parent.values()):  # each chain from its first value
        chain = [start]
        while chain[-1] in parent:
            chain.append(parent[chain[-1]])
        written = start if start in inputs else chain[-1]
        names.update((v, written) for v in chain if v != written)
    return names
