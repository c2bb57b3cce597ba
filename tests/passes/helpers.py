"""Tiny models with random weights, and the check every pass test makes: same numbers before and after."""

from __future__ import annotations

import numpy as np

from amct_caffe import io
from amct_caffe.io.graph_io import graph_from_net, graph_to_net
from amct_caffe.runtime import TEST, Net

INPUT = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: %s } } }\n'


def net_of(text: str):
    net = io.parse_prototxt_text(text, "<test>")
    io.upgrade_net(net, "<test>")
    return net


def random_weights(net, seed: int = 0, bn_factor: float = 1.0) -> dict[str, list[np.ndarray]]:
    """Random blobs of the shapes the executor gives each layer; BatchNorm statistics are stored as
    Caffe keeps them (mean * f, var * f, [f]) with f = ``bn_factor``, variances positive."""
    rng = np.random.default_rng(seed)
    shaped = Net(net, TEST)
    weights = {}
    for name, blobs in shaped.params.items():
        arrays = [rng.standard_normal(b.data.shape).astype(np.float32) for b in blobs]
        if shaped.layer_dict[name].type == "BatchNorm":
            c = arrays[0].shape
            arrays = [(rng.standard_normal(c) * bn_factor).astype(np.float32),
                      (rng.uniform(0.3, 2.0, c) * bn_factor).astype(np.float32),
                      np.array([bn_factor], np.float32)]
        weights[name] = arrays
    return weights


def model(text: str, seed: int = 0, bn_factor: float = 1.0):
    """(graph, pristine copy of the graph) of a prototxt text with random weights."""
    net = net_of(text)
    weights = random_weights(net, seed, bn_factor)
    return graph_from_net(net, weights), graph_from_net(net, weights)


def run(graph, inputs: dict[str, np.ndarray]):
    """(every blob of the graph after a forward in the executor, the net's output names)."""
    net_param, weights = graph_to_net(graph)
    net = Net(net_param, TEST, weights=weights)
    net.forward(**inputs)
    return {name: blob.data.copy() for name, blob in net.blobs.items()}, net.outputs


def random_inputs(graph, seed: int = 1) -> dict[str, np.ndarray]:
    net_param, weights = graph_to_net(graph)
    net = Net(net_param, TEST, weights=weights)
    rng = np.random.default_rng(seed)
    return {name: rng.uniform(-1, 1, net.blobs[name].data.shape).astype(np.float32) for name in net.inputs}


def assert_same_numbers(before, after, inputs=None) -> None:
    """The rewritten graph has the same outputs, and every blob name both graphs have holds the
    same values: max |after - before| <= 1e-5 * max(1, max |before|), blob by blob."""
    inputs = inputs if inputs is not None else random_inputs(before)
    ref, ref_outputs = run(before, inputs)
    got, got_outputs = run(after, inputs)
    assert got_outputs == ref_outputs
    common = [name for name in ref if name in got]
    assert set(ref_outputs) <= set(common)
    bad = []
    for name in common:
        err = float(np.max(np.abs(got[name] - ref[name]), initial=0.0))
        allowed = 1e-5 * max(1.0, float(np.max(np.abs(ref[name]), initial=0.0)))
        if not err <= allowed:
            bad.append(f"{name}: max abs diff {err:.3g} > {allowed:.3g}")
    assert not bad, "\n".join(bad)


def types(graph) -> list[str]:
    return [n.type for n in graph.nodes]
