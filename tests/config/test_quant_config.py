"""The JSON config: guide samples, round trip, atomic save, every range, unknown fields, model checks."""

import copy
import json
import os
import re

import pytest

from amct_caffe.config import (ArqParams, BnUpdateConfig, QuantConfig, SnqParams, bind_to_graph,
                               create_default_config, load_config, read_quant_config, write_quant_config)
from amct_caffe.errors import ConfigError
from tests.config.nets import (LSTM_LAYERS, RESNET_LIKE, graph_of, guide_json_samples, json_relaxed,
                               needs_guide)

LAYER = {"quant_enable": True,
         "activation_quant_params": {"num_bits": 8, "max_percentile": 0.999999, "min_percentile": 0.999999,
                                     "search_range": [0.7, 1.3], "search_step": 0.01},
         "weight_quant_params": {"wts_algo": "arq_quantize", "channel_wise": True, "num_bits": 8}}
SNQ = {"wts_algo": "snq_quantize", "channel_wise": True, "num_bits": 4, "max_iteration": 1000,
       "min_distance": 1e-10, "init_algo": "gaussian"}


def _doc(**layer_changes):
    layer = copy.deepcopy(LAYER)
    layer.update(layer_changes)
    return {"version": 1, "batch_num": 2, "activation_offset": True, "do_fusion": True,
            "skip_fusion_layers": [], "conv1": layer}


def _raises(doc, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        QuantConfig.from_dict(doc)


# ------------------------------------------------------------------------------------------ guide samples
@needs_guide
def test_guide_samples_load():
    samples = [json_relaxed(b) for _, b in guide_json_samples()]
    assert len(samples) == 3
    uniform = QuantConfig.from_dict(samples[0])
    assert uniform.batch_num == 2
    assert uniform.layers["conv2"].weight_quant_params == ArqParams(channel_wise=False)
    assert uniform.to_dict() == {**samples[0], "joint_quant": False}
    snq = QuantConfig.from_dict(samples[1])  # activation_quant_params written as a one-element list
    assert snq.update_bn and snq.bn_update_config == BnUpdateConfig(0.5, 30, "tmp/bn_data")
    assert snq.skip_fusion_layers == ["conv1"]
    assert snq.layers["res2a_branch1"].weight_quant_params == SnqParams(True, 4, 1000, 1e-10, "gaussian")
    assert snq.to_dict()["res2a_branch1"]["activation_quant_params"] == samples[1]["res2a_branch1"][
        "activation_quant_params"][0]
    sample = QuantConfig.from_dict(samples[2])
    assert sample.joint_quant is False and sample.to_dict() == samples[2]


# ------------------------------------------------------------------------------------------ round trip
def test_round_trip_through_a_file(tmp_path):
    graph = graph_of(RESNET_LIKE)
    config = create_default_config(graph, batch_num=3, activation_offset=False)
    config.layers["conv1"].activation_quant_params = type(config.layers["conv1"].activation_quant_params)(
        num_bits=12, search_range=(0.8, 1.2), search_step=0.02, with_offset=True)
    config.layers["res2a_branch1"].weight_quant_params = SnqParams(init_algo="d2sampling")
    config.update_bn, config.bn_update_config = True, BnUpdateConfig(0.25, 10, "bn")
    config.skip_fusion_layers = ["conv1"]
    path = tmp_path / "config.json"
    write_quant_config(config, path)
    assert os.listdir(tmp_path) == ["config.json"]  # the temporary file was renamed into place
    assert path.read_text(encoding="utf-8") == config.to_json()
    again = load_config(path, graph)
    assert again == config and again.to_json() == config.to_json()
    assert again.with_offset("conv1") is True and again.with_offset("res2a_branch1") is False


def test_save_is_atomic(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old", encoding="utf-8")
    bad = QuantConfig(batch_num=0)
    with pytest.raises(ConfigError):
        write_quant_config(bad, path)
    assert path.read_text(encoding="utf-8") == "old" and os.listdir(tmp_path) == ["config.json"]
    write_quant_config(QuantConfig(), path)
    assert json.loads(path.read_text(encoding="utf-8"))["version"] == 1


def test_missing_fields_take_defaults():
    config = QuantConfig.from_dict({"fc1000": {}, "conv1": {WTS: {"wts_algo": "snq_quantize"}}})
    assert config.batch_num == 1 and config.activation_offset and config.do_fusion and not config.update_bn
    assert config.layers["conv1"].weight_quant_params == SnqParams()
    bound = bind_to_graph(config, graph_of(RESNET_LIKE))
    assert bound.layers["fc1000"].weight_quant_params == ArqParams(channel_wise=False)
    assert list(bound.layers) == ["conv1", "fc1000"]  # model order
    assert QuantConfig.from_dict({"update_bn": True}).bn_update_config == BnUpdateConfig()


# ------------------------------------------------------------------------------------------ ranges
ACT = "activation_quant_params"
WTS = "weight_quant_params"


def _act(**kw):
    return {ACT: {**LAYER[ACT], **kw}}


def _wts(**kw):
    return {WTS: {**LAYER[WTS], **kw}}


def _snq(**kw):
    return {WTS: {**SNQ, **kw}}


@pytest.mark.parametrize("changes, message", [
    (_act(max_percentile=1.5),
     "layer 'conv1': activation_quant_params.max_percentile 1.5 is out of range (0.5, 1.0]"),
    (_act(max_percentile=0.5), "activation_quant_params.max_percentile 0.5 is out of range (0.5, 1.0]"),
    (_act(min_percentile=0.2), "activation_quant_params.min_percentile 0.2 is out of range (0.5, 1.0]"),
    (_act(num_bits=7), "activation_quant_params.num_bits 7 is out of range [8, 16]"),
    (_act(num_bits=17), "activation_quant_params.num_bits 17 is out of range [8, 16]"),
    (_act(search_range=[1.3, 0.7]), "activation_quant_params.search_range [1.3, 0.7] is out of range: "
                                    "0 < search_range_start < search_range_end is required"),
    (_act(search_range=[0, 1.3]), "search_range [0.0, 1.3] is out of range"),
    (_act(search_step=0), "activation_quant_params.search_step 0.0 is out of range "
                          "(0, search_range_end - search_range_start] = (0, 0.6]"),
    (_act(search_step=0.7), "activation_quant_params.search_step 0.7 is out of range"),
    (_wts(num_bits=4), "layer 'conv1': weight_quant_params.num_bits 4 is out of range for arq_quantize: "
                       "uniform weight quantization supports only 8"),
    (_snq(num_bits=8), "weight_quant_params.num_bits 8 is out of range for snq_quantize: non-uniform "
                       "weight quantization supports only 4"),
    (_snq(max_iteration=499), "weight_quant_params.max_iteration 499 is out of range [500, 2000]"),
    (_snq(max_iteration=2001), "weight_quant_params.max_iteration 2001 is out of range [500, 2000]"),
    (_snq(min_distance=1e-11), "weight_quant_params.min_distance 1e-11 is out of range [1e-10, 1e-3]"),
    (_snq(min_distance=0.01), "weight_quant_params.min_distance 0.01 is out of range [1e-10, 1e-3]"),
    (_snq(init_algo="kmeans"),
     'weight_quant_params.init_algo "kmeans" is not one of: "uniform", "gaussian", "d2sampling"'),
    (_wts(wts_algo="ulq"),
     'weight_quant_params: wts_algo "ulq" is not one of: "arq_quantize", "snq_quantize"'),
])
def test_layer_ranges(changes, message):
    _raises(_doc(**changes), message)


@pytest.mark.parametrize("changes, message", [
    ({"version": 2}, "version 2 is not one of: 1"),
    ({"batch_num": 0}, "batch_num 0 is out of range (0, +inf)"),
    ({"joint_quant": True}, "joint_quant true is not supported"),
    ({"update_bn": True, "bn_update_config": {"bn_moving_average_fraction": 1.0}},
     "bn_update_config.bn_moving_average_fraction 1.0 is out of range (0, 1.0)"),
    ({"bn_update_config": {"bn_moving_average_fraction": 0}},
     "bn_update_config.bn_moving_average_fraction 0.0 is out of range (0, 1.0)"),
    ({"bn_update_config": {"bn_update_iterations": 1000}},
     "bn_update_config.bn_update_iterations 1000 is out of range (0, 1000)"),
    ({"bn_update_config": {"bn_update_iterations": 0}},
     "bn_update_config.bn_update_iterations 0 is out of range (0, 1000)"),
    ({"bn_update_config": {"bn_dump_dir": ""}}, "bn_update_config.bn_dump_dir must be a directory path"),
    ({"skip_fusion_layers": ["conv1", "conv1"]}, "skip_fusion_layers lists a layer twice"),
])
def test_global_ranges(changes, message):
    _raises({**_doc(), **changes}, message)


@pytest.mark.parametrize("changes, message", [
    ({"batch_num": 1.0}, "batch_num must be an integer, got 1.0"),
    ({"batch_num": True}, "batch_num must be an integer, got true"),
    ({"activation_offset": 1}, "activation_offset must be true or false, got 1"),
    ({"do_fusion": "yes"}, 'do_fusion must be true or false, got "yes"'),
    ({"skip_fusion_layers": "conv1"}, 'skip_fusion_layers must be a list of layer names, got "conv1"'),
    ({"bn_update_config": [1]}, "bn_update_config must be an object, got [1]"),
    ({"conv2": 3}, "unknown field 'conv2': not a global option"),
])
def test_global_types(changes, message):
    _raises({**_doc(), **changes}, message)


@pytest.mark.parametrize("changes, message", [
    ({"quant_enable": "true"}, "layer 'conv1': quant_enable must be true or false, got \"true\""),
    (_act(num_bits=8.0), "layer 'conv1': activation_quant_params: num_bits must be an integer, got 8.0"),
    (_act(search_range=[0.7]), "search_range must be a list of two numbers [start, end], got [0.7]"),
    (_act(search_range=[0.7, "1.3"]), "search_range must be a list of two numbers"),
    (_wts(channel_wise=1), "weight_quant_params: channel_wise must be true or false, got 1"),
    ({ACT: [LAYER[ACT], LAYER[ACT]]}, "activation_quant_params must be an object"),
    ({WTS: "arq_quantize"}, "weight_quant_params must be an object"),
])
def test_layer_types(changes, message):
    _raises(_doc(**changes), message)


@pytest.mark.parametrize("changes, message", [
    ({"quant_enabled": True}, "layer 'conv1': unknown field(s) 'quant_enabled'; allowed: quant_enable, "
                              "activation_quant_params, weight_quant_params"),
    (_act(search_stepp=0.1), "layer 'conv1': activation_quant_params: unknown field(s) 'search_stepp'"),
    (_wts(max_iteration=1000),
     "weight_quant_params: 'max_iteration' apply only to wts_algo \"snq_quantize\""),
    ({WTS: {**SNQ, "clusters": 16}}, "weight_quant_params: unknown field(s) 'clusters'"),
])
def test_unknown_fields(changes, message):
    _raises(_doc(**changes), message)


def test_unknown_bn_field():
    _raises({**_doc(), "bn_update_config": {"bn_iterations": 3}},
            "bn_update_config: unknown field(s) 'bn_iterations'")


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"conv1": {}, "conv1": {}}', encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: key 'conv1' appears twice")):
        read_quant_config(path)
    path.write_text('{"conv1": {', encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: not valid JSON")):
        read_quant_config(path)
    path.write_text(json.dumps(_doc(**_act(max_percentile=2))), encoding="utf-8")
    message = f"{path}: layer 'conv1': activation_quant_params.max_percentile 2.0 is out of range (0.5, 1.0]"
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_quant_config(path)
    with pytest.raises(ConfigError, match="cannot read quantization config"):
        read_quant_config(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------ against the model
LSTM_NET = RESNET_LIKE + LSTM_LAYERS


@pytest.mark.parametrize("doc, message", [
    ({"conv9": {}}, "layer 'conv9' is in the config but not in the model"),
    ({"data": {}},
     "layer 'data' (Input) cannot be quantized: Input is not in the list of layers that support"),
    ({"pool1": {WTS: LAYER[WTS]}},
     "layer 'pool1' (Pooling): weight_quant_params is not allowed: Pooling layers have no weights"),
    ({"fc1000": {WTS: LAYER[WTS]}}, "layer 'fc1000' (InnerProduct): weight_quant_params.channel_wise true is "
                                    "not supported: InnerProduct supports only channel_wise false"),
    ({"lstm": {WTS: LAYER[WTS]}},
     "layer 'lstm' (LSTM): weight_quant_params.channel_wise true is not supported"),
    ({"lstm": {WTS: {**SNQ, "channel_wise": False}}}, "layer 'lstm' (LSTM): weight_quant_params.wts_algo "
                                                      "\"snq_quantize\" is not supported for LSTM"),
    ({"res2a_scale": {}}, "layer 'res2a_scale' (Scale): quant_enable true is not possible: axis 0"),
    ({"skip_fusion_layers": ["conv7"]}, "skip_fusion_layers: layer 'conv7' is not in the model"),
    ({"skip_fusion_layers": ["pool1"]}, "skip_fusion_layers: layer 'pool1' (Pooling) is not a fusable layer"),
])
def test_checks_against_the_model(doc, message):
    config = QuantConfig.from_dict(doc)
    with pytest.raises(ConfigError, match=re.escape(message)):
        bind_to_graph(config, graph_of(LSTM_NET))


def test_model_checks_accept_the_allowed_forms():
    doc = {"skip_fusion_layers": ["conv1", "res2a_branch2a", "fc1000"],
           "res2a_branch2a": {WTS: {**SNQ}}, "fc1000": {WTS: {**SNQ, "channel_wise": False}},
           "res2a_scale": {"quant_enable": False}, "lstm": {}}
    bound = bind_to_graph(QuantConfig.from_dict(doc), graph_of(LSTM_NET))
    assert bound.layers["lstm"].weight_quant_params == ArqParams(channel_wise=False)
    assert bound.layers["res2a_branch2a"].weight_quant_params.init_algo == "gaussian"


def test_load_config_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"conv9": {}}), encoding="utf-8")
    message = f"{path}: layer 'conv9' is in the config but not in the model"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path, graph_of(RESNET_LIKE))
