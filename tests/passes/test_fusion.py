"""BN fusion on tiny graphs: structure (what was fused, names, origin) and numbers (executor, same blobs)."""

import logging

import numpy as np
import pytest

from amct_caffe.passes import fuse_bn_scale
from amct_caffe.passes.fusion import check_fusions, find_fusions
from tests.passes.helpers import INPUT, assert_same_numbers, model, types

BN = 'layer { name: "%s" type: "BatchNorm" bottom: "%s" top: "%s" %s}\n'
SCALE = 'layer { name: "%s" type: "Scale" bottom: "%s" top: "%s" scale_param { %s } }\n'
BIAS = 'layer { name: "%s" type: "Bias" bottom: "%s" top: "%s" %s}\n'
RELU = 'layer { name: "%s" type: "ReLU" bottom: "%s" top: "%s" }\n'


def conv(name, bottom, top, params="num_output: 4 kernel_size: 3 pad: 1", kind="Convolution"):
    return f'layer {{ name: "{name}" type: "{kind}" bottom: "{bottom}" top: "{top}" ' \
           f'convolution_param {{ {params} }} }}\n'


def ip(name, bottom, top, params="num_output: 5"):
    return f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{top}" ' \
           f'inner_product_param {{ {params} }} }}\n'


def bn_scale_bias(src, prefix="", scale="bias_term: true", bias=True, inplace=True):
    """BatchNorm -> Scale (-> Bias) after blob ``src``, in place or each writing its own blob."""
    names = [f"{prefix}bn", f"{prefix}scale", f"{prefix}bias"][:3 if bias else 2]
    tops = [src] * len(names) if inplace else names
    text = BN % (names[0], src, tops[0], "")
    text += SCALE % (names[1], tops[0], tops[1], scale)
    if bias:
        text += BIAS % (names[2], tops[1], tops[2], "")
    return text


def fuse(text, bn_factor=1.0, **kw):
    graph, before = model(text, bn_factor=bn_factor)
    changed = fuse_bn_scale(graph, **kw)
    graph.check()
    assert_same_numbers(before, graph)
    return graph, before, changed


def test_conv_without_bias_batchnorm_scale_bias_in_place():
    text = INPUT % "3 dim: 6 dim: 6"
    text += conv("conv1", "data", "conv1", "num_output: 4 kernel_size: 3 bias_term: false")
    text += bn_scale_bias("conv1") + RELU % ("relu1", "conv1", "conv1")
    graph, before, changed = fuse(text)
    assert changed
    assert types(graph) == ["Input", "Convolution", "ReLU"]
    conv1 = graph.node("conv1")
    assert conv1.origin == ["conv1", "bn", "scale", "bias"]
    assert conv1.layer_param.convolution_param.bias_term
    assert [p.shape for p in conv1.params] == [(4, 3, 3, 3), (4,)]
    # The fused layer writes the Bias's (SSA) blob; the ReLU still reads it.
    assert conv1.tops == before.node("bias").tops == graph.node("relu1").bottoms
    assert not before.node("conv1").layer_param.convolution_param.bias_term  # the copy was edited


def test_depthwise_conv_not_in_place_keeps_last_blob_name_as_net_output():
    text = INPUT % "4 dim: 5 dim: 5"
    text += conv("dw", "data", "dw", "num_output: 4 group: 4 kernel_size: 3 pad: 1")
    text += bn_scale_bias("dw", scale="", bias=False, inplace=False)
    graph, before, _ = fuse(text)
    assert types(graph) == ["Input", "Convolution"]
    assert graph.node("dw").tops == ["scale"] and graph.outputs == before.outputs == ["scale"]


@pytest.mark.parametrize("group", [1, 2])
def test_deconvolution(group):
    text = INPUT % "4 dim: 3 dim: 3"
    params = f"num_output: 6 group: {group} kernel_size: 2 stride: 2"
    text += conv("up", "data", "up", params, kind="Deconvolution")
    text += bn_scale_bias("up")
    graph, _, _ = fuse(text)
    assert types(graph) == ["Input", "Deconvolution"]
    assert graph.node("up").params[0].shape == (4, 6 // group, 2, 2)


@pytest.mark.parametrize("transpose", [False, True])
def test_inner_product(transpose):
    text = INPUT % "3 dim: 2 dim: 2"
    text += ip("fc", "data", "fc", f"num_output: 5 transpose: {str(transpose).lower()}")
    text += bn_scale_bias("fc", inplace=False)
    graph, _, _ = fuse(text)
    assert types(graph) == ["Input", "InnerProduct"]
    assert graph.node("fc").origin == ["fc", "bn", "scale", "bias"]
    assert graph.node("fc").params[0].shape == ((12, 5) if transpose else (5, 12))


@pytest.mark.parametrize("factor", [0.25, 7.0, 0.0])
def test_batchnorm_moving_average_factor(factor):
    text = INPUT % "2 dim: 4 dim: 4" + conv("conv", "data", "conv") + BN % ("bn", "conv", "conv", "")
    graph, _, _ = fuse(text, bn_factor=factor)
    assert graph.node("conv").origin == ["conv", "bn"]


def test_batchnorm_then_bias_without_scale_and_scale_axis_minus_3():
    text = INPUT % "2 dim: 4 dim: 4" + conv("c1", "data", "c1") + BN % ("bn", "c1", "c1", "")
    text += BIAS % ("bias", "c1", "c1", "")
    text += conv("c2", "c1", "c2") + BN % ("bn2", "c2", "c2", "") + SCALE % ("s2", "c2", "c2", "axis: -3")
    graph, _, _ = fuse(text)
    assert [n.origin for n in graph.nodes[1:]] == [["c1", "bn", "bias"], ["c2", "bn2", "s2"]]


def test_skip_fusion_layers_and_do_fusion():
    text = INPUT % "2 dim: 4 dim: 4" + conv("conv1", "data", "conv1") + bn_scale_bias("conv1", "a_")
    text += conv("conv2", "conv1", "conv2") + bn_scale_bias("conv2", "b_")
    graph, _, changed = fuse(text, skip_fusion_layers=["conv1"])
    assert changed
    assert [n.name for n in graph.nodes] == ["data", "conv1", "a_bn", "a_scale", "a_bias", "conv2"]
    graph, _, _ = fuse(text, skip_fusion_layers="conv1")  # one name given as a bare string
    assert graph.has_node("a_bn") and not graph.has_node("b_bn")
    graph, before, changed = fuse(text, do_fusion=False)
    assert not changed and [n.name for n in graph.nodes] == [n.name for n in before.nodes]
    assert all(np.array_equal(a, b) for n, m in zip(graph.nodes, before.nodes, strict=True)
               for a, b in zip(n.params, m.params, strict=True))


def test_shared_conv_output_is_not_fused():
    text = INPUT % "2 dim: 4 dim: 4" + conv("conv", "data", "conv") + bn_scale_bias("conv", inplace=False)
    text += 'layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" ' \
            'pooling_param { kernel_size: 2 } }\n'
    graph, before, changed = fuse(text)
    assert not changed and types(graph) == types(before)


def test_shared_intermediate_blob_ends_the_chain():
    """BN's output is also read by a ReLU: Conv + BN fuse (the BN blob survives), the Scale does not."""
    text = INPUT % "2 dim: 4 dim: 4" + conv("conv", "data", "conv") + bn_scale_bias("conv", inplace=False)
    text += RELU % ("relu", "bn", "relu")
    graph, _, _ = fuse(text)
    assert types(graph) == ["Input", "Convolution", "Scale", "Bias", "ReLU"]
    assert graph.node("conv").tops == ["bn"] and graph.node("conv").origin == ["conv", "bn"]


@pytest.mark.parametrize("scale", ["axis: 0", "axis: 1 num_axes: 2", "axis: 2"])
def test_scale_off_the_channel_axis_is_not_fused(scale):
    text = INPUT % "4 dim: 4 dim: 4" + conv("conv", "data", "conv")
    text += BN % ("bn", "conv", "conv", "") + SCALE % ("scale", "conv", "conv", scale)
    graph, _, _ = fuse(text)
    assert types(graph) == ["Input", "Convolution", "Scale"]


def test_scale_with_second_bottom_is_not_fused():
    text = INPUT % "4 dim: 4 dim: 4" + conv("conv", "data", "conv") + BN % ("bn", "conv", "bn", "")
    text += 'layer { name: "g" type: "Input" top: "g" input_param { shape { dim: 4 } } }\n'
    text += 'layer { name: "scale" type: "Scale" bottom: "bn" bottom: "g" top: "scale" }\n'
    graph, _, _ = fuse(text)
    assert types(graph) == ["Input", "Convolution", "Input", "Scale"]


def test_chains_that_do_not_start_with_batchnorm_are_left_alone():
    text = INPUT % "4 dim: 4 dim: 4" + conv("conv", "data", "conv") + SCALE % ("scale", "conv", "conv", "")
    text += BN % ("bn", "conv", "conv", "")
    graph, _, changed = fuse(text)
    assert not changed


def test_batchnorm_with_batch_statistics_is_not_fused():
    text = INPUT % "2 dim: 4 dim: 4" + conv("conv", "data", "conv")
    text += BN % ("bn", "conv", "conv", "batch_norm_param { use_global_stats: false } ")
    graph, _, changed = fuse(text)
    assert not changed


def test_shared_parameters_are_not_folded():
    text = INPUT % "2 dim: 4 dim: 4" + conv("conv", "data", "conv").replace(
        "convolution_param", 'param { name: "shared_w" } convolution_param') + BN % ("bn", "conv", "conv", "")
    graph, _, changed = fuse(text)
    assert not changed


def test_second_run_changes_nothing_and_logs(caplog):
    text = INPUT % "2 dim: 4 dim: 4" + conv("conv", "data", "conv") + bn_scale_bias("conv")
    graph, _ = model(text)
    with caplog.at_level(logging.DEBUG, logger="amct_caffe.passes"):
        assert fuse_bn_scale(graph)
        assert not fuse_bn_scale(graph)
    messages = [r.getMessage() for r in caplog.records]
    # in-place chain: the last writer keeps the blob's name, so the fused conv writes 'conv'
    assert "BN fusion: conv + bn + scale + bias -> 'conv' (writes 'conv')" in messages
    assert "BN fusion: 1 layer chain(s) fused, 3 layer(s) removed" in messages


def test_plan_check_refuses_a_removed_blob_with_another_reader():
    text = INPUT % "2 dim: 4 dim: 4" + conv("conv", "data", "conv") + BN % ("bn", "conv", "bn", "")
    graph, _ = model(text)
    (plan,) = find_fusions(graph)
    graph.insert(len(graph.nodes), type(plan.target)("late", "ReLU", ["conv"], ["late"]))
    with pytest.raises(Exception, match="blob 'conv' would be removed but is read by"):
        check_fusions(graph, [plan])
