"""The guide's table of quantizable layers is what the registry holds; depthwise and Scale/Bias rules."""

import re

import numpy as np
import pytest

import amct_caffe.config  # noqa: F401  (declares the table)
from amct_caffe.config import layer_types as T
from amct_caffe.ops import DATA_ONLY, WEIGHTS_AND_DATA, layer_type, quantizable_rows
from tests.config.nets import GUIDE, MODELS, RESNET_LIKE, graph_of, load_graph, needs_guide, needs_models


def _guide_table():
    """{type: (kind, quantized by default)} from the guide's 支持量化的算子列表."""
    text = GUIDE.read_text(encoding="utf-8")
    start = text.index("## 支持量化的算子列表")
    table = text[start:text.index("\n## ", start + 5)]
    rows, kind = {}, None
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or cells[0] == "量化类型":
            continue
        if len(cells) == 4:
            kind = WEIGHTS_AND_DATA if cells[0].startswith("支持权重") else DATA_ONLY
            cells = cells[1:]
        for name in re.split(r"[,，]", cells[0]):
            rows[name.strip()] = (kind, "默认不量化" not in cells[1])
    return rows


@needs_guide
def test_registry_holds_every_row_of_the_guide_table():
    rows = _guide_table()
    assert len(rows) == 78 and rows["LSTM"] == (WEIGHTS_AND_DATA, True) and rows["Erf"] == (DATA_ONLY, False)
    declared = {n: (i.quant, i.quant_by_default) for n, i in quantizable_rows().items()}
    assert declared == rows
    assert T.quantizable_types() == list(rows)


def test_lookups():
    assert T.has_weights("DepthwiseConv") and not T.has_weights("Pooling")
    assert T.on_by_default("Pooling") and not T.on_by_default("ReLU") and not T.on_by_default("Input")
    assert not T.is_quantizable_type("Input") and not T.is_quantizable_type("NoSuchType")
    assert layer_type("ReLU6").quant == DATA_ONLY
    per_tensor = [t for t in T.quantizable_types() if T.has_weights(t) and not T.default_channel_wise(t)]
    assert per_tensor == ["InnerProduct", "LSTM", "RNN", "GRU"]


def test_depthwise_is_found_from_weights_shapes_or_group():
    g = graph_of(RESNET_LIKE)
    dw = g.node("res2a_branch2a")
    assert T.is_depthwise(dw, g) and T.config_type(dw, g) == "DepthwiseConv"
    assert T.matching_type_names(dw, g) == ("Convolution", "DepthwiseConv")
    assert T.config_type(g.node("conv1"), g) == "Convolution"
    # weights (8, 2, 3, 3) with group 8: 16 input channels, a grouped convolution, not depthwise
    dw.params = [np.zeros((8, 2, 3, 3), np.float32)]
    assert not T.is_depthwise(dw, g)
    dw.params = [np.zeros((8, 1, 3, 3), np.float32)]
    assert T.is_depthwise(dw, g)
    dw.params = []
    g.blobs[dw.bottoms[0]].shape = (1, 16, 16, 16)
    assert not T.is_depthwise(dw, g)


def test_grouped_convolution_is_not_depthwise():
    g = graph_of(RESNET_LIKE.replace("num_output: 8 kernel_size: 3 pad: 1 group: 8",
                                     "num_output: 8 kernel_size: 3 pad: 1 group: 2"))
    assert T.config_type(g.node("res2a_branch2a"), g) == "Convolution"


@needs_models
def test_slim320_depthwise_layers():
    slim = MODELS / "ultraface_slim320"
    g = load_graph(slim / "slim-320.prototxt", slim / "slim-320.caffemodel")
    dw = [n.name for n in g.nodes if T.config_type(n, g) == "DepthwiseConv"]
    assert len(dw) == 19 and dw[0] == "188"
    for name in dw:
        weight, group = g.node(name).params[0], g.node(name).layer_param.convolution_param.group
        assert weight.shape[1] == 1 and group == weight.shape[0]


def test_scale_and_bias_limits():
    g = graph_of(RESNET_LIKE)
    assert T.cannot_quantize_reason(g.node("scale_conv1"), g) is None
    assert "channel axis" in T.cannot_quantize_reason(g.node("res2a_scale"), g)
    assert T.cannot_quantize_reason(g.node("pool1"), g) is None
    two = graph_of(RESNET_LIKE.replace('bottom: "res2a" top: "res2a_scaled" scale_param { axis: 0 }',
                                       'bottom: "res2a" bottom: "res2a_branch1" top: "res2a_scaled"'))
    assert "second bottom" in T.cannot_quantize_reason(two.node("res2a_scale"), two)


@pytest.mark.parametrize("axis, num_axes, ok", [(1, 1, True), (-3, 1, True), (2, 1, False), (1, 2, False)])
def test_bias_axes(axis, num_axes, ok):
    scale = 'type: "Scale" bottom: "res2a" top: "res2a_scaled" scale_param { axis: 0 }'
    bias = (f'type: "Bias" bottom: "res2a" top: "res2a_scaled" '
            f'bias_param {{ axis: {axis} num_axes: {num_axes} }}')
    g = graph_of(RESNET_LIKE.replace(scale, bias))
    assert (T.cannot_quantize_reason(g.node("res2a_scale"), g) is None) == ok
