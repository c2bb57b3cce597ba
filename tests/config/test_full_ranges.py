"""Config values are checked over their full range where they are read, never failing later.

A value the checks accept must also hold in the proto fields it ends up in (float32, uint32) and in
the IFMR search: Infinity, NaN, float32 overflow or underflow, a step making billions of candidates,
or a batch_num beyond uint32 are ConfigErrors naming the field. Also the JSON and .cfg readers'
own failures (deep nesting, huge integers, text that is not UTF-8) found by tests/io/test_fuzz_readers.py.
"""

import json
import re

import pytest

from amct_caffe.config import config_from_simple_cfg, parse_simple_cfg
from amct_caffe.config.quant_config import QuantConfig, read_quant_config
from amct_caffe.errors import ConfigError
from amct_caffe.passes.calibration import ActivationSpec, _ifmr_param
from amct_caffe.quant.ifmr import ifmr_ratios
from amct_caffe.runtime.layers.calibration import IfmrLayer
from tests.config.nets import RESNET_LIKE, graph_of


def _acts(**params):
    return json.dumps({"conv1": {"activation_quant_params": params}})


def _fails(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        QuantConfig.from_json(text, "q.json")


def _ifmr_layer(config: QuantConfig, name: str) -> IfmrLayer:
    """The calibration layer the config makes for ``name``, as the calibration pass and the runtime build it."""
    act = config.layers[name].activation_quant_params
    spec = ActivationSpec(name, 0, act.num_bits, True, act.max_percentile, act.min_percentile,
                          act.search_range, act.search_step)
    lp = _ifmr_param(spec, config.batch_num, "record.txt", [spec])
    lp.name, lp.type = f"{name}_ifmr", "IFMR"
    return IfmrLayer(lp)


# ------------------------------------------------------------------------------------------ JSON
@pytest.mark.parametrize("params, message", [
    # were accepted, then ifmr_ratios raised OverflowError (int(inf)) in the calibration
    ({"search_range": [0.7, float("inf")]},
     "layer 'conv1': activation_quant_params.search_range [0.7, Infinity] is out of range: it must be finite"),
    ({"search_range": [0.7, 1e39]}, "search_range [0.7, 1e+39] is out of range: it must be finite (a float32"),
    # were accepted, then the IFMR layer refused the float32 values (0 or equal ends)
    ({"search_range": [1e-46, 0.3]}, "search_range [1e-46, 0.3] is out of range once stored as float32s ([0.0, 0.3])"),
    ({"search_range": [0.7, 0.70000000001], "search_step": 1e-12}, "once stored as float32s ([0.7, 0.7])"),
    ({"max_percentile": 0.5000000001},
     "max_percentile 0.5000000001 is out of range (0.5, 1.0] once stored as a float32 (0.5)"),
    # was accepted, then 600 million candidates: out of memory
    ({"search_step": 1e-9}, "search_step 1e-09 is too small for search_range [0.7, 1.3]: it makes 600000001 ratios"),
    ({"max_percentile": float("nan")}, "max_percentile NaN is out of range (0.5, 1.0]"),
])
def test_activation_values_beyond_what_ifmr_takes(params, message):
    _fails(_acts(**params), message)


def test_batch_num_beyond_uint32_is_refused():
    """The calibration layers' batch_num is a uint32: 2**32 raised a protobuf ValueError when building them."""
    _fails(json.dumps({"batch_num": 2**32}), "q.json: batch_num 4294967296 is too large: at most 4294967295")
    config = QuantConfig.from_json(json.dumps({"batch_num": 2**32 - 1, "conv1": {}}))
    assert _ifmr_layer(config, "conv1").batch_num == 2**32 - 1


@pytest.mark.parametrize("bn, message", [
    ({"bn_update_iterations": -1}, "bn_update_config.bn_update_iterations -1 is out of range (0, 1000)"),
    ({"bn_update_iterations": 10**30}, "bn_update_iterations 1000000000000000000000000000000 is out of range"),
    ({"bn_moving_average_fraction": 0.99999999999},
     "bn_moving_average_fraction 0.99999999999 is out of range (0, 1.0) once stored as a float32 (1.0)"),
    ({"bn_moving_average_fraction": float("nan")}, "bn_moving_average_fraction NaN is out of range (0, 1.0)"),
])
def test_bn_update_values(bn, message):
    _fails(json.dumps({"update_bn": True, "bn_update_config": bn}), message)


def test_step_equal_to_the_range_in_decimal_builds_its_ifmr_layer():
    """[0.1, 0.3] step 0.2 is accepted (0.2 == 0.3 - 0.1 at float32 precision); the IFMR layer used to refuse
    it afterwards (0.3 - 0.1 is 0.19999999999999998 in float64)."""
    config = QuantConfig.from_json(_acts(search_range=[0.1, 0.3], search_step=0.2))
    layer = _ifmr_layer(config, "conv1")
    p = layer.params
    assert list(ifmr_ratios(p.search_range_start, p.search_range_end, p.search_step)) == pytest.approx([0.1, 0.3])


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000, "q.json: not valid JSON for a config: arrays or objects nested too deeply"),  # RecursionError
    ('{"batch_num": 1' + "0" * 5000 + "}", "a number has too many digits to be read"),  # ValueError
    (_acts(max_percentile=10**400), "max_percentile 1000000000"),  # OverflowError
    (_acts(search_range=[10**400, 1]), "search_range 1000000000"),  # OverflowError
    ('{"conv\\ud800": {}}', "'conv\\ud800' is not valid Unicode text"),  # accepted, then could not be written
])
def test_json_reader_failures_are_config_errors(text, message):
    _fails(text, message)


def test_json_file_not_utf8(tmp_path):
    path = tmp_path / "q.json"
    path.write_bytes(b'{"conv1\xff": {}}')
    with pytest.raises(ConfigError, match=r"quantization config file .*q.json is not UTF-8 text \(byte 7"):
        read_quant_config(path)  # was UnicodeDecodeError


def test_long_values_are_cut_in_messages():
    with pytest.raises(ConfigError) as e:
        QuantConfig.from_json(json.dumps({"batch_num": "x" * 10_000}))
    assert len(str(e.value)) < 300 and str(e.value).endswith('...')


# ------------------------------------------------------------------------------------------ .cfg
def _cfg(tmp_path, text):
    path = tmp_path / "q.cfg"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("text, message", [
    ("common_config { ifmr_quantize { search_range_end: inf } }",
     "q.cfg: common_config.ifmr_quantize.search_range_end Infinity is out of range (0, +inf)"),
    ("common_config { ifmr_quantize { search_range_end: 1e39 } }",
     "common_config.ifmr_quantize.search_range_end Infinity is out of range"),  # float32 overflow
    ("common_config { ifmr_quantize { search_step: 1e-45 } }", "ifmr_quantize.search_step 1e-45 is too small"),
    ('override_layer_configs { layer_name: "conv1" calibration_config { ifmr_quantize { search_range_end: nan } } }',
     "override_layer_configs[conv1].ifmr_quantize.search_range_end NaN is out of range"),
    ("update_bn: true bn_update_config { bn_update_iterations: 4294967295 }",
     "bn_update_config.bn_update_iterations 4294967295 is out of range (0, 1000)"),
])
def test_cfg_values_beyond_what_ifmr_takes(tmp_path, text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_simple_cfg(_cfg(tmp_path, text), graph_of(RESNET_LIKE))


def test_cfg_file_not_utf8(tmp_path):
    path = tmp_path / "q.cfg"
    path.write_bytes(b'skip_layers: "conv\xff"')
    with pytest.raises(ConfigError, match=r"simple config file .*q.cfg is not UTF-8 text \(byte 18"):
        parse_simple_cfg(path)  # was UnicodeDecodeError
