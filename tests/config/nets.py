"""Small models and guide samples shared by the config tests."""

from __future__ import annotations

import json
import re

import pytest

from amct_caffe import io
from amct_caffe.io.graph_io import graph_from_net
from tests.golden import MODELS, SHARED

GUIDE = SHARED / "spec/amct_caffe_user_guide.md"
needs_guide = pytest.mark.skipif(not GUIDE.exists(), reason="../shared/spec user guide is absent")
needs_models = pytest.mark.skipif(not MODELS.exists(), reason="../shared/models not beside the repository")

# Layer names of the guide's ResNet-50 samples (conv1, pool1, res2a_branch1, fc1000), plus a depthwise
# convolution, an Eltwise, the off-by-default ReLU / BatchNorm / Scale and a Softmax.
RESNET_LIKE = """
name: "resnet_like"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "bn_conv1" type: "BatchNorm" bottom: "conv1" top: "conv1"
        batch_norm_param { use_global_stats: true } }
layer { name: "scale_conv1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "conv1_relu" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "res2a_branch1" type: "Convolution" bottom: "pool1" top: "res2a_branch1"
        convolution_param { num_output: 8 kernel_size: 1 } }
layer { name: "res2a_branch2a" type: "Convolution" bottom: "pool1" top: "res2a_branch2a"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 group: 8 } }
layer { name: "res2a" type: "Eltwise" bottom: "res2a_branch1" bottom: "res2a_branch2a" top: "res2a" }
layer { name: "res2a_scale" type: "Scale" bottom: "res2a" top: "res2a_scaled" scale_param { axis: 0 } }
layer { name: "fc1000" type: "InnerProduct" bottom: "res2a_scaled" top: "fc1000"
        inner_product_param { num_output: 10 } }
layer { name: "prob" type: "Softmax" bottom: "fc1000" top: "prob" }
"""


LSTM_LAYERS = """
layer { name: "cont" type: "Input" top: "cont" input_param { shape { dim: 1 dim: 1 } } }
layer { name: "lstm" type: "LSTM" bottom: "fc1000" bottom: "cont" top: "lstm"
        recurrent_param { num_output: 4 } }
"""


def graph_of(text: str):
    return graph_from_net(io.parse_prototxt_text(text, "<test>"))


def load_graph(prototxt, caffemodel=None):
    net, weights = io.load_model(prototxt, caffemodel) if caffemodel else (io.load_prototxt(prototxt), None)
    return graph_from_net(net, weights)


def guide_blocks() -> list[tuple[int, str]]:
    """(line number, text) of every fenced code block of the guide."""
    text = GUIDE.read_text(encoding="utf-8")
    return [(text[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"```[^\n]*\n(.*?)```", text, re.S)]


def guide_cfg_samples() -> list[tuple[int, str]]:
    """The code blocks that are simple .cfg text (AMCTConfig), with their line numbers."""
    keys = r"(common_config|override_layer_types|override_layer_configs|skip_layers|update_bn)\s*:"
    return [(line, b) for line, b in guide_blocks() if re.search(rf"^\s*{keys}", b, re.M)]


def guide_json_samples() -> list[tuple[int, str]]:
    """The post-training JSON config samples (not the retrain ones)."""
    return [(line, b) for line, b in guide_blocks()
            if '"version"' in b and '"batch_num"' in b and "retrain" not in b]


def json_relaxed(text: str):
    """The guide's SNQ JSON sample opens with a doubled '{'; drop it before parsing."""
    fixed = re.sub(r"^\s*\{\s*\{", "{", text, count=1)
    return json.loads(fixed)
