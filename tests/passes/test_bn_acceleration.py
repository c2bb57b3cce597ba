"""BN+Scale+Bias acceleration: enabled leftover chains become one 1x1 depthwise Convolution."""

import logging

import pytest

from amct_caffe.passes import accelerate_bn_scale_bias, fuse_bn_scale
from amct_caffe.passes.bn_acceleration import blob_rank
from tests.passes.helpers import INPUT, assert_same_numbers, model, types
from tests.passes.test_fusion import BIAS, BN, SCALE, bn_scale_bias, conv, ip

POOL = 'layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param { kernel_size: 2 } }\n'


def accelerate(text, enabled, bn_factor=1.0):
    graph, before = model(text, bn_factor=bn_factor)
    changed = accelerate_bn_scale_bias(graph, enabled)
    graph.check()
    assert_same_numbers(before, graph)
    return graph, before, changed


def test_chain_after_pooling_becomes_a_depthwise_conv():
    text = INPUT % "3 dim: 4 dim: 4" + POOL + bn_scale_bias("pool")
    graph, before, changed = accelerate(text, {"bn"}, bn_factor=3.0)
    assert changed and types(graph) == ["Input", "Pooling", "Convolution"]
    dw = graph.nodes[2]
    assert dw.name == "bn" and dw.origin == ["bn", "scale", "bias"]
    assert dw.bottoms == before.node("pool").tops and dw.tops == before.node("bias").tops
    cp = dw.layer_param.convolution_param
    assert (cp.num_output, cp.group, list(cp.kernel_size), cp.bias_term) == (3, 3, [1], True)
    assert [p.shape for p in dw.params] == [(3, 1, 1, 1), (3,)]


def test_nothing_enabled_nothing_changes():
    text = INPUT % "3 dim: 4 dim: 4" + POOL + bn_scale_bias("pool")
    graph, before, changed = accelerate(text, {"pool"})
    assert not changed and types(graph) == types(before)


def test_chain_starts_at_the_enabled_layer():
    """BN not enabled, Scale enabled: the BN stays, Scale + Bias fold into a DepthwiseConv named 'scale'."""
    text = INPUT % "3 dim: 4 dim: 4" + POOL + bn_scale_bias("pool", inplace=False)
    graph, _, _ = accelerate(text, {"scale", "bias"})
    assert [(n.name, n.type) for n in graph.nodes[2:]] == [("bn", "BatchNorm"), ("scale", "Convolution")]
    assert graph.node("scale").origin == ["scale", "bias"]


def test_lone_bias_and_lone_scale():
    text = INPUT % "3 dim: 4 dim: 4" + POOL + BIAS % ("b", "pool", "b", "")
    text += 'layer { name: "relu" type: "ReLU" bottom: "b" top: "relu" }\n' + SCALE % ("s", "relu", "s", "")
    graph, _, _ = accelerate(text, {"b", "s"})
    assert types(graph) == ["Input", "Pooling", "Convolution", "ReLU", "Convolution"]


def test_shared_intermediate_blob_ends_the_chain():
    text = INPUT % "3 dim: 4 dim: 4" + POOL + bn_scale_bias("pool", inplace=False, bias=False)
    text += 'layer { name: "relu" type: "ReLU" bottom: "bn" top: "relu" }\n'
    graph, _, _ = accelerate(text, {"bn"})
    assert types(graph) == ["Input", "Pooling", "Convolution", "Scale", "ReLU"]


def test_what_cannot_be_accelerated_is_reported(caplog):
    """Scale off the channel axis, and a BatchNorm on a 2-D blob (a 1x1 2-D convolution needs 4-D)."""
    text = INPUT % "3 dim: 4 dim: 4" + POOL + SCALE % ("s", "pool", "s", "axis: 2")
    text += ip("fc", "s", "fc") + BN % ("bn", "fc", "bn", "")
    with caplog.at_level(logging.WARNING, logger="amct_caffe.passes"):
        graph, before, changed = accelerate(text, {"s", "bn"})
    assert not changed and types(graph) == types(before)
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "'s' (Scale) has quantization enabled but cannot" in warnings
    assert "not the channel axis" in warnings
    assert "'bn' (BatchNorm)" in warnings and "not known to be 4-D (N, C, H, W) (rank 2)" in warnings


def test_after_fusion_only_skipped_or_unfusable_chains_are_left():
    """conv1 is kept out of fusion, so its BatchNorm (enabled) gets its own DepthwiseConv."""
    text = INPUT % "2 dim: 4 dim: 4" + conv("conv1", "data", "conv1") + bn_scale_bias("conv1", "a_")
    text += conv("conv2", "conv1", "conv2") + bn_scale_bias("conv2", "b_")
    graph, before = model(text)
    assert fuse_bn_scale(graph, skip_fusion_layers=["conv1"])
    assert accelerate_bn_scale_bias(graph, {"a_bn", "a_scale", "a_bias", "b_bn"})
    assert [(n.name, n.origin) for n in graph.nodes[1:]] == [
        ("conv1", ["conv1"]), ("a_bn", ["a_bn", "a_scale", "a_bias"]),
        ("conv2", ["conv2", "b_bn", "b_scale", "b_bias"])]
    assert_same_numbers(before, graph)


@pytest.mark.parametrize("text, blob, rank", [
    (INPUT % "3 dim: 4 dim: 4" + POOL, "pool", 4),
    (INPUT % "3 dim: 4 dim: 4" + ip("fc", "data", "fc"), "fc", 2),
    (INPUT % "3 dim: 4 dim: 4" + 'layer { name: "r" type: "Reshape" bottom: "data" top: "r" '
     'reshape_param { shape { dim: 0 dim: -1 } } }\n', "r", None),
])
def test_blob_rank(text, blob, rank):
    graph, _ = model(text)
    assert blob_rank(graph, blob) == rank
