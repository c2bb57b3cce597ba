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
