"""The simple .cfg: the guide's samples, precedence layer > type > common, name and range checks."""

import logging
import re

import pytest
from google.protobuf import text_format

from amct_caffe.config import (ActivationQuantParams, ArqParams, BnUpdateConfig, SnqParams, bind_to_graph,
                               config_from_simple_cfg, create_default_config, parse_simple_cfg)
from amct_caffe.config.quant_config import QuantConfig
from amct_caffe.errors import ConfigError
from amct_caffe.io.schema import records
from tests.config.nets import LSTM_LAYERS, RESNET_LIKE, graph_of, guide_cfg_samples, needs_guide

SNQ_GAUSSIAN = SnqParams(channel_wise=True, num_bits=4, max_iteration=1000, min_distance=1e-10,
                         init_algo="gaussian")


def _cfg(tmp_path, text, name="quant.cfg"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _build(tmp_path, text, net=RESNET_LIKE):
    return config_from_simple_cfg(_cfg(tmp_path, text), graph_of(net))


def _fails(tmp_path, text, message, net=RESNET_LIKE):
    path = _cfg(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_simple_cfg(path, graph_of(net))
    return path


# ------------------------------------------------------------------------------------------ guide samples
@needs_guide
def test_every_guide_sample_parses():
    samples = guide_cfg_samples()
    assert [line for line, _ in samples][-1] > 3000 and len(samples) == 4
    for line, text in samples:
        msg = text_format.Parse(text, records().AMCTConfig())
        assert msg.ListFields(), f"guide line {line}"


@needs_guide
def test_snq_walkthrough_blocks_add_up_to_the_full_sample():
    *parts, full = [text_format.Parse(t, records().AMCTConfig()) for _, t in guide_cfg_samples()]
    merged = records().AMCTConfig()
    for p in parts:
        merged.MergeFrom(p)
    for field in ("update_bn", "bn_update_config", "common_config", "override_layer_types",
                  "override_layer_configs"):
        assert getattr(merged, field) == getattr(full, field), field


@needs_guide
def test_full_guide_sample_gives_the_expected_config(tmp_path):
    text = guide_cfg_samples()[-1][1]
    config = create_default_config(graph_of(RESNET_LIKE), config_defination=_cfg(tmp_path, text))
    layers = config.layers
    # skip_layers "pool1", skip_layer_types "Softmax"; res2a_scale (Scale on axis 0) cannot be quantized
    assert list(layers) == ["conv1", "bn_conv1", "scale_conv1", "conv1_relu", "res2a_branch1",
                            "res2a_branch2a", "res2a", "fc1000"]
    conv1 = layers["conv1"]
    assert conv1.weight_quant_params == ArqParams(channel_wise=True, num_bits=8)
    assert conv1.activation_quant_params == ActivationQuantParams(8, 0.999999, 0.999999, (0.8, 1.2), 0.02)
    for name in ("res2a_branch1", "res2a_branch2a"):  # common_config: SNQ
        assert layers[name].weight_quant_params == SNQ_GAUSSIAN
        assert layers[name].activation_quant_params == ActivationQuantParams()
    assert layers["fc1000"].weight_quant_params == ArqParams(channel_wise=False, num_bits=8)
    assert layers["res2a"].quant_enable and layers["res2a"].weight_quant_params is None
    assert [n for n, v in layers.items() if not v.quant_enable] == ["bn_conv1", "scale_conv1", "conv1_relu"]
    assert (config.batch_num, config.activation_offset, config.do_fusion) == (1, True, True)
    assert config.skip_fusion_layers == ["conv1"] and config.update_bn
    assert config.bn_update_config == BnUpdateConfig(0.5, 30, "tmp/bn_data")
    # written as the guide's SNQ JSON sample writes it, and readable again
    d = config.to_dict()
    assert d["bn_update_config"] == {"bn_moving_average_fraction": 0.5, "bn_update_iterations": 30,
                                     "bn_dump_dir": "tmp/bn_data"}
    assert d["res2a_branch1"]["weight_quant_params"] == {"wts_algo": "snq_quantize", "channel_wise": True,
                                                         "num_bits": 4, "max_iteration": 1000,
                                                         "min_distance": 1e-10, "init_algo": "gaussian"}
    assert d["conv1"]["activation_quant_params"]["search_range"] == [0.8, 1.2]
    assert bind_to_graph(QuantConfig.from_json(config.to_json()), graph_of(RESNET_LIKE)) == config


# ------------------------------------------------------------------------------------------ precedence
def test_layer_beats_type_beats_common(tmp_path):
    config = _build(tmp_path, """
        common_config { ifmr_quantize { search_range_start: 0.6 num_bits: 10 } }
        override_layer_types { layer_type: "Convolution"
            calibration_config { ifmr_quantize { search_range_start: 0.75 max_percentile: 0.99 } } }
        override_layer_configs { layer_name: "conv1"
            calibration_config { ifmr_quantize { max_percentile: 0.9 }
                                 arq_quantize { channel_wise: false } } }
    """)
    conv1 = config.layers["conv1"].activation_quant_params
    assert (conv1.num_bits, conv1.search_range, conv1.max_percentile) == (10, (0.75, 1.3), 0.9)
    assert config.layers["conv1"].weight_quant_params == ArqParams(channel_wise=False)
    other = config.layers["res2a_branch1"].activation_quant_params
    assert (other.num_bits, other.search_range, other.max_percentile) == (10, (0.75, 1.3), 0.99)
    pool = config.layers["pool1"].activation_quant_params
    assert (pool.num_bits, pool.search_range, pool.max_percentile) == (10, (0.6, 1.3), 0.999999)


def test_switching_weight_algorithm_starts_from_its_defaults(tmp_path):
    config = _build(tmp_path, """
        common_config { snq_quantize { init_algo: "gaussian" max_iteration: 600 channel_wise: false } }
        override_layer_configs { layer_name: "conv1" calibration_config { arq_quantize { } } }
        override_layer_configs { layer_name: "res2a_branch1"
            calibration_config { snq_quantize { max_iteration: 700 } } }
        override_layer_types { layer_type: "InnerProduct" calibration_config { arq_quantize { } } }
    """)
    assert config.layers["conv1"].weight_quant_params == ArqParams(channel_wise=True)
    assert config.layers["res2a_branch1"].weight_quant_params == SnqParams(False, 4, 700, 1e-10, "gaussian")
    assert config.layers["fc1000"].weight_quant_params == ArqParams(channel_wise=False)


def test_depthwise_matches_convolution_and_depthwiseconv(tmp_path):
    config = _build(tmp_path, """
        override_layer_types { layer_type: "DepthwiseConv"
            calibration_config { ifmr_quantize { num_bits: 12 } } }
        override_layer_types { layer_type: "Convolution"
            calibration_config { ifmr_quantize { num_bits: 10 search_step: 0.05 } } }
    """)
    dw = config.layers["res2a_branch2a"].activation_quant_params
    assert (dw.num_bits, dw.search_step) == (12, 0.05)
    assert config.layers["conv1"].activation_quant_params.num_bits == 10
    skipped = _build(tmp_path, 'skip_layer_types: "Convolution"')
    assert not {"conv1", "res2a_branch1", "res2a_branch2a"} & set(skipped.layers)
    only_dw = _build(tmp_path, 'skip_layer_types: "DepthwiseConv"')
    assert "res2a_branch2a" not in only_dw.layers and "conv1" in only_dw.layers


def test_skips_and_switching_on_default_off_types(tmp_path):
    config = _build(tmp_path, """
        skip_layers: "res2a_branch1"
        skip_layer_types: "Pooling"
        skip_layer_types: "Eltwise"
        override_layer_types { layer_type: "ReLU" calibration_config { } }
        override_layer_configs { layer_name: "res2a" calibration_config { ifmr_quantize { num_bits: 16 } } }
    """)
    assert "res2a_branch1" not in config.layers and "pool1" not in config.layers
    # a layer override beats its type's skip
    assert config.layers["res2a"].activation_quant_params.num_bits == 16
    assert config.layers["conv1_relu"].quant_enable and not config.layers["bn_conv1"].quant_enable


def test_cfg_globals_win_over_the_arguments(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="amct_caffe")
    path = _cfg(tmp_path, "batch_num: 4\nactivation_offset: false\ndo_fusion: false\nupdate_bn: true")
    config = create_default_config(graph_of(RESNET_LIKE), batch_num=8, config_defination=path)
    assert (config.batch_num, config.activation_offset, config.do_fusion) == (4, False, False)
    assert config.update_bn and config.bn_update_config == BnUpdateConfig()
    assert any("are ignored" in r.getMessage() for r in caplog.records)
    defaults = create_default_config(graph_of(RESNET_LIKE), batch_num=8, config_defination=_cfg(tmp_path, ""))
    assert (defaults.batch_num, defaults.activation_offset) == (1, True)


def test_float32_values_read_as_written(tmp_path):
    config = _build(tmp_path, """
        common_config { ifmr_quantize { search_range_start: 0.7 search_range_end: 1.3 search_step: 0.6
                                        max_percentile: 0.9 } }
        override_layer_configs { layer_name: "conv1"
            calibration_config { snq_quantize { min_distance: 1e-3 } } }
    """)
    acts = config.layers["pool1"].activation_quant_params
    assert (acts.search_range, acts.search_step, acts.max_percentile) == ((0.7, 1.3), 0.6, 0.9)
    assert config.layers["conv1"].weight_quant_params.min_distance == 0.001


# ------------------------------------------------------------------------------------------ errors
def test_parse_errors_name_file_and_line(tmp_path):
    path = _fails(tmp_path, 'skip_layers: "pool1"\ncommon_config {\n  ifmr_quantize { search_rang: 1 }\n}',
                  "quant.cfg:3:19: cannot parse simple config")
    assert str(path) in str(pytest.raises(ConfigError, parse_simple_cfg, path).value)
    _fails(tmp_path, 'common_config { arq_quantize { } snq_quantize { } }', "quant.cfg:1:")
    _fails(tmp_path, 'override_layer_types { calibration_config { } }',
           "quant.cfg: required field(s) missing: override_layer_types[0].layer_type")
    with pytest.raises(ConfigError, match="cannot read simple config"):
        parse_simple_cfg(tmp_path / "absent.cfg")


@pytest.mark.parametrize("text, message", [
    ('skip_layers: "pool9"', "quant.cfg: skip_layers: layer 'pool9' is not in the model"),
    ('skip_layers: "pool1" skip_layers: "pool1"', "skip_layers: 'pool1' is listed twice"),
    ('skip_layer_types: "Innerproduct"', "skip_layer_types: 'Innerproduct' is not a layer type that supports "
                                         "quantization (did you mean 'InnerProduct'?)"),
    ('override_layer_types { layer_type: "Input" calibration_config { } }',
     "override_layer_types[0].layer_type: 'Input' is not a layer type that supports quantization"),
    ('override_layer_types { layer_type: "Pooling" calibration_config { } }\n'
     'override_layer_types { layer_type: "Pooling" calibration_config { } }',
     "override_layer_types: type 'Pooling' is overridden twice"),
    ('skip_layer_types: "Pooling" override_layer_types { layer_type: "Pooling" calibration_config { } }',
     "override_layer_types: type 'Pooling' is also in skip_layer_types"),
    ('override_layer_configs { layer_name: "conv9" calibration_config { } }',
     "override_layer_configs: layer 'conv9' is not in the model"),
    ('override_layer_configs { layer_name: "data" calibration_config { } }',
     "override_layer_configs: layer 'data' (Input) cannot be quantized"),
    ('override_layer_configs { layer_name: "res2a_scale" calibration_config { } }',
     "override_layer_configs: layer 'res2a_scale' (Scale) cannot be quantized"),
    ('override_layer_configs { layer_name: "conv1" calibration_config { } }\n'
     'override_layer_configs { layer_name: "conv1" calibration_config { } }',
     "override_layer_configs: layer 'conv1' is overridden twice"),
    ('skip_layers: "conv1" override_layer_configs { layer_name: "conv1" calibration_config { } }',
     "override_layer_configs: layer 'conv1' is also in skip_layers"),
    ('override_layer_types { layer_type: "Pooling" calibration_config { arq_quantize { } } }',
     "override_layer_types[Pooling].arq_quantize is not allowed: Pooling layers have no weights"),
    ('override_layer_configs { layer_name: "res2a" calibration_config { snq_quantize { } } }',
     "override_layer_configs[res2a].snq_quantize is not allowed: Eltwise layers have no weights"),
    ('skip_fusion_layers: "conv8"', "skip_fusion_layers: layer 'conv8' is not in the model"),
    ('skip_fusion_layers: "prob"', "skip_fusion_layers: layer 'prob' (Softmax) is not a fusable layer"),
    ('batch_num: 0', "quant.cfg: batch_num 0 is out of range (0, +inf)"),
    ('bn_update_config { bn_moving_average_fraction: 1.5 }',
     "bn_update_config.bn_moving_average_fraction 1.5 is out of range (0, 1.0)"),
    ('bn_update_config { bn_update_iterations: 1000 }',
     "bn_update_config.bn_update_iterations 1000 is out of range (0, 1000)"),
    ('common_config { ifmr_quantize { max_percentile: 1.5 } }',
     "quant.cfg: common_config.ifmr_quantize.max_percentile 1.5 is out of range (0.5, 1.0]"),
    ('common_config { ifmr_quantize { min_percentile: 0.5 } }',
     "common_config.ifmr_quantize.min_percentile 0.5 is out of range (0.5, 1.0]"),
    ('override_layer_types { layer_type: "Pooling" calibration_config { ifmr_quantize { num_bits: 4 } } }',
     "override_layer_types[Pooling].ifmr_quantize.num_bits 4 is out of range [8, 16]"),
    ('common_config { ifmr_quantize { search_step: 0 } }',
     "common_config.ifmr_quantize.search_step 0.0 is out of range (0, +inf)"),
    ('override_layer_configs { layer_name: "conv1" calibration_config { arq_quantize { num_bits: 4 } } }',
     "override_layer_configs[conv1].arq_quantize.num_bits 4 is out of range for arq_quantize"),
    ('common_config { snq_quantize { max_iteration: 100 } }',
     "common_config.snq_quantize.max_iteration 100 is out of range [500, 2000]"),
    ('common_config { snq_quantize { min_distance: 0.1 } }',
     "common_config.snq_quantize.min_distance 0.1 is out of range [1e-10, 1e-3]"),
    ('common_config { snq_quantize { init_algo: "random" } }',
     'common_config.snq_quantize.init_algo "random" is not one of: "uniform", "gaussian", "d2sampling"'),
    # after merging, per layer
    ('common_config { ifmr_quantize { search_range_start: 1.4 } }',
     "quant.cfg: layer 'conv1' (Convolution): ifmr_quantize.search_range [1.4, 1.3] is out of range"),
    ('override_layer_configs { layer_name: "pool1" '
     'calibration_config { ifmr_quantize { search_step: 0.7 } } }',
     "layer 'pool1' (Pooling): ifmr_quantize.search_step 0.7 is out of range "
     "(0, search_range_end - search_range_start] = (0, 0.6]"),
    ('common_config { arq_quantize { channel_wise: true } }',
     "quant.cfg: layer 'fc1000' (InnerProduct): arq_quantize.channel_wise true is not supported: "
     "InnerProduct supports only channel_wise false"),
])
def test_errors(tmp_path, text, message):
    _fails(tmp_path, text, message)


def test_snq_on_lstm_is_refused(tmp_path):
    text = ('override_layer_types { layer_type: "InnerProduct" calibration_config { arq_quantize { } } }\n'
            'common_config { snq_quantize { channel_wise: false } }')
    message = "layer 'lstm' (LSTM): snq_quantize is not supported for LSTM"
    _fails(tmp_path, text, message, RESNET_LIKE + LSTM_LAYERS)


def test_snq_without_bn_update_warns_where_there_is_a_batchnorm(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="amct_caffe")
    cfg = _cfg(tmp_path, 'override_layer_configs { layer_name: "conv1" calibration_config { snq_quantize { } } }')
    create_default_config(graph_of(RESNET_LIKE), config_defination=cfg)
    assert any("update_bn is false" in r.getMessage() for r in caplog.records)
    caplog.clear()  # no BatchNorm whose statistics update_bn could refresh: nothing to say
    no_bn = "\n".join(line for line in RESNET_LIKE.splitlines() if '"bn_conv1"' not in line
                      and "use_global_stats" not in line)
    create_default_config(graph_of(no_bn), config_defination=cfg)
    assert not any("update_bn is false" in r.getMessage() for r in caplog.records)
