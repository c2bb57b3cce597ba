"""Fusion and acceleration on the shared models: same blobs, same outputs, every BN chain accounted for."""

from collections import Counter

import pytest

from amct_caffe import io
from amct_caffe.io.graph_io import graph_from_net
from amct_caffe.passes import accelerate_bn_scale_bias, fuse_bn_scale
from tests.golden import CASES_BY_NAME
from tests.passes.helpers import assert_same_numbers


def load(case_name: str, hw: int | None = None):
    """(graph, pristine copy) of a shared model; ``hw`` shrinks the input images to keep the test fast."""
    case = CASES_BY_NAME[case_name]
    if not (case.prototxt.exists() and case.weights.exists()):
        pytest.skip(f"{case.prototxt} or {case.weights} missing (../shared not beside the repo?)")
    net, weights = io.load_model(case.prototxt, case.weights)
    if hw is not None:
        dims = net.layer[0].input_param.shape[0].dim
        dims[2:] = [hw, hw]
    return graph_from_net(net, weights), graph_from_net(net, weights)


def test_open_nsfw_real_weights():
    graph, before = load("open_nsfw")  # 224x224: the final 7x7 average pooling needs it
    assert fuse_bn_scale(graph)
    graph.check()
    counts = Counter(n.type for n in graph.nodes)
    assert counts["BatchNorm"] == counts["Scale"] == 0 and counts["Convolution"] == 53
    assert len(graph.nodes) == len(before.nodes) - 2 * 53
    assert graph.node("conv_1").origin == ["conv_1", "bn_1", "scale_1"]
    assert all(len(n.origin) == 3 for n in graph.nodes if n.type == "Convolution")
    assert_same_numbers(before, graph)


def test_mobilenet_v2_random_weights():
    graph, before = load("mobilenet_v2_random", hw=64)  # global pooling: any input size works
    assert fuse_bn_scale(graph, skip_fusion_layers=["conv1"])
    counts = Counter(n.type for n in graph.nodes)
    assert counts["BatchNorm"] == counts["Scale"] == 1  # conv1's, skipped
    depthwise = [n for n in graph.nodes
                 if n.type == "Convolution" and n.layer_param.convolution_param.group > 1]
    assert depthwise and all(len(n.origin) == 3 for n in depthwise)
    assert graph.node("conv1").origin == ["conv1"]
    assert_same_numbers(before, graph)


def test_mobilenet_v2_acceleration_without_fusion():
    """do_fusion off and every BatchNorm enabled: each BN + Scale becomes a DepthwiseConv."""
    graph, before = load("mobilenet_v2_random", hw=32)
    assert not fuse_bn_scale(graph, do_fusion=False)
    bns = [n.name for n in graph.nodes if n.type == "BatchNorm"]
    assert accelerate_bn_scale_bias(graph, bns)
    counts = Counter(n.type for n in graph.nodes)
    assert counts["BatchNorm"] == counts["Scale"] == 0
    assert counts["Convolution"] == 2 * len(bns) + 1
    assert_same_numbers(before, graph)
