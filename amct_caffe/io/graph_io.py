"""NetParameter <-> Graph. The IR never sees protobuf except as each node's opaque layer_param."""

from __future__ import annotations

from amct_caffe.io.schema import caffe_pb
from amct_caffe.ir import Graph, Node, ssa_rename


def graph_from_net(net, weights=None) -> Graph:
    """Build an SSA graph from an upgraded, phase-filtered NetParameter and its weights."""
    weights = weights or {}
    layers = [(lp.name, list(lp.bottom), list(lp.top)) for lp in net.layer]
    nodes = []
    for lp, (bottoms, tops) in zip(net.layer, ssa_rename(layers), strict=False):
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


def graph_to_net(graph: Graph):
    """(NetParameter without blobs, weights by layer name) for a graph."""
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
        lp.bottom.extend(node.bottoms)
        del lp.top[:]
        lp.top.extend(node.tops)
        del lp.blobs[:]
        if node.params:
            weights[node.name] = node.params
    return net, weights
