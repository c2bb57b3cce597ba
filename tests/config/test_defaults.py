"""create_default_config: the guide's default entries for every quantizable layer of real models."""

import logging
import re

import numpy as np
import pytest

from amct_caffe.config import ActivationQuantParams, ArqParams, create_default_config
from amct_caffe.errors import ConfigError
from tests.config.nets import (MODELS, RESNET_LIKE, graph_of, guide_json_samples, json_relaxed, load_graph,
                               needs_guide, needs_models)

LENET = (MODELS / "lenet_mnist/lenet.prototxt", MODELS / "lenet_mnist/lenet_iter_10000.caffemodel")
NSFW = (MODELS / "open_nsfw/deploy.prototxt", MODELS / "open_nsfw/resnet_50_1by2_nsfw.caffemodel")
SLIM = (MODELS / "ultraface_slim320/slim-320.prototxt", MODELS / "ultraface_slim320/slim-320.caffemodel")

ACTS = {"num_bits": 8, "max_percentile": 0.999999, "min_percentile": 0.999999, "search_range": [0.7, 1.3],
        "search_step": 0.01}


def _entry(enable=True, channel_wise=None):
    d = {"quant_enable": enable, "activation_quant_params": dict(ACTS)}
    if channel_wise is not None:
        d["weight_quant_params"] = {"wts_algo": "arq_quantize", "channel_wise": channel_wise, "num_bits": 8}
    return d


@needs_models
def test_lenet_default_config_exactly():
    config = create_default_config(load_graph(*LENET), batch_num=2)
    assert config.to_dict() == {
        "version": 1, "batch_num": 2, "activation_offset": True, "joint_quant": False, "do_fusion": True,
        "skip_fusion_layers": [],
        "conv1": _entry(channel_wise=True), "pool1": _entry(), "conv2": _entry(channel_wise=True),
        "pool2": _entry(), "ip1": _entry(channel_wise=False), "relu1": _entry(enable=False),
        "ip2": _entry(channel_wise=False), "prob": _entry(),
    }
    assert list(config.to_dict())[:6] == ["version", "batch_num", "activation_offset", "joint_quant",
                                          "do_fusion", "skip_fusion_layers"]
    assert config.quantized_layers() == ["conv1", "pool1", "conv2", "pool2", "ip1", "ip2", "prob"]
    assert config.with_offset("conv1") is True


@needs_guide
def test_default_entries_equal_create_quant_config_sample():
    """The sample of create_quant_config: conv1 per channel; its globals are the defaults but batch_num."""
    sample = json_relaxed(next(b for line, b in guide_json_samples() if '"joint_quant"' in b))
    assert sample["conv1"] == _entry(channel_wise=True)
    config = create_default_config(graph_of(RESNET_LIKE), batch_num=2).to_dict()
    assert {k: config[k] for k in list(sample)[:6]} == {k: sample[k] for k in list(sample)[:6]}
    assert config["conv1"] == sample["conv1"]


@needs_models
def test_open_nsfw_defaults():
    g = load_graph(*NSFW)
    config = create_default_config(g, activation_offset=False)
    types = {n.name: n.type for n in g.nodes}
    assert "data" not in config.layers and set(config.layers) == {n for n, t in types.items() if t != "Input"}
    by_type = {}
    for name, layer in config.layers.items():
        wts = layer.weight_quant_params
        by_type.setdefault(types[name], set()).add((layer.quant_enable, wts and wts.channel_wise))
    assert by_type == {"Convolution": {(True, True)}, "InnerProduct": {(True, False)},
                       "BatchNorm": {(False, None)}, "Scale": {(False, None)}, "ReLU": {(False, None)},
                       "Eltwise": {(True, None)}, "Pooling": {(True, None)}, "Softmax": {(True, None)}}
    assert sum(t == "Convolution" for t in types.values()) == 53
    assert config.activation_offset is False and config.with_offset("conv_1") is False


@needs_models
def test_slim320_depthwise_defaults():
    config = create_default_config(load_graph(*SLIM))
    dw = config.layers["188"]
    assert dw.quant_enable and dw.weight_quant_params == ArqParams(channel_wise=True, num_bits=8)
    assert dw.activation_quant_params == ActivationQuantParams()
    assert sum(layer.weight_quant_params is not None for layer in config.layers.values()) == 42
    assert not config.layers["187"].quant_enable  # ReLU stays off


def test_unquantizable_scale_is_left_out_with_a_log_line(caplog):
    caplog.set_level(logging.INFO, logger="amct_caffe")
    config = create_default_config(graph_of(RESNET_LIKE))
    assert "res2a_scale" not in config.layers and "scale_conv1" in config.layers
    logged = [r.getMessage() for r in caplog.records]
    assert any("res2a_scale" in m and "cannot be quantized" in m for m in logged)
    assert config.layers["res2a_branch2a"].weight_quant_params.channel_wise is True  # depthwise
    assert config.layers["fc1000"].weight_quant_params.channel_wise is False


@pytest.mark.parametrize("batch_num, message", [
    (0, "batch_num 0 is out of range (0, +inf)"), (-3, "batch_num -3 is out of range"),
    (1.5, "batch_num must be an integer greater than 0, got 1.5"),
    (True, "batch_num must be an integer greater than 0, got true")])
def test_batch_num_argument_range(batch_num, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        create_default_config(graph_of(RESNET_LIKE), batch_num=batch_num)


def test_numpy_integers_and_bools_are_arguments_as_pythons():
    """batch_num=np.int64(2) was refused as 'must be an integer ... got 2'; a script's counts are often NumPy's."""
    config = create_default_config(graph_of(RESNET_LIKE), batch_num=np.int64(2), activation_offset=np.bool_(False))
    assert config.batch_num == 2 and type(config.batch_num) is int and config.activation_offset is False


def test_activation_offset_argument_type():
    with pytest.raises(ConfigError, match="activation_offset must be true or false, got 1"):
        create_default_config(graph_of(RESNET_LIKE), activation_offset=1)


def test_layer_named_like_a_global_option_is_refused():
    with pytest.raises(ConfigError, match="layer 'version' has the name of a global config option"):
        create_default_config(graph_of(RESNET_LIKE.replace('name: "pool1"', 'name: "version"')))


def test_inner_product_with_a_one_axis_output_is_left_out(tmp_path, caplog):
    """axis 0 flattens the whole blob into one vector: no channel axis for the DeQuant after it."""
    import amct_caffe as amct
    from amct_caffe.runtime import Net

    proto = tmp_path / "m.prototxt"
    proto.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }\n'
                     'layer { name: "flat" type: "InnerProduct" bottom: "data" top: "v" '
                     'inner_product_param { num_output: 4 axis: 0 } }\n'
                     'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "y" '
                     'inner_product_param { num_output: 4 } }\n')
    Net(str(proto), phase=1).save(str(tmp_path / "m.caffemodel"))
    caplog.set_level(logging.INFO, logger="amct_caffe")
    amct.create_quant_config(str(tmp_path / "c.json"), str(proto), str(tmp_path / "m.caffemodel"))
    text = (tmp_path / "c.json").read_text()
    assert '"fc"' in text and '"flat"' not in text
    assert any("'flat'" in r.getMessage() and "at least 2 axes" in r.getMessage() for r in caplog.records)


def test_a_layer_reading_a_one_axis_blob_is_left_out(tmp_path, caplog):
    import amct_caffe as amct
    from amct_caffe.runtime import Net

    proto = tmp_path / "m.prototxt"
    proto.write_text('layer { name: "v" type: "Input" top: "v" input_param { shape { dim: 6 } } }\n'
                     'layer { name: "sig" type: "Sigmoid" bottom: "v" top: "s" }\n')
    Net(str(proto), phase=1).save(str(tmp_path / "m.caffemodel"))
    caplog.set_level(logging.INFO, logger="amct_caffe")
    amct.create_quant_config(str(tmp_path / "c.json"), str(proto), str(tmp_path / "m.caffemodel"))
    assert '"sig"' not in (tmp_path / "c.json").read_text()
    assert any("'sig'" in r.getMessage() and "input v has shape [6]" in r.getMessage() for r in caplog.records)
