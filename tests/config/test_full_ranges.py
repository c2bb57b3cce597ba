"""The JSON and .cfg readers' own failures (deep nesting, huge integers, text that is not UTF-8), found by
tests/io/test_fuzz_readers.py, are ConfigErrors naming the file or field."""

import json
import re

import pytest

from amct_caffe.config import parse_simple_cfg
from amct_caffe.config.quant_config import QuantConfig, read_quant_config
from amct_caffe.errors import ConfigError


def _acts(**params):
    return json.dumps({"conv1": {"activation_quant_params": params}})


def _fails(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        QuantConfig.from_json(text, "q.json")


# ------------------------------------------------------------------------------------------ JSON
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
    with pytest.raises(ConfigError, match=r"q.json: not valid JSON: not UTF-8 text \(byte 7\)"):
        read_quant_config(path)  # was UnicodeDecodeError


def test_long_values_are_cut_in_messages():
    with pytest.raises(ConfigError) as e:
        QuantConfig.from_json(json.dumps({"batch_num": "x" * 10_000}))
    assert len(str(e.value)) < 300 and str(e.value).endswith("...")


# ------------------------------------------------------------------------------------------ .cfg
def test_cfg_file_not_utf8(tmp_path):
    path = tmp_path / "q.cfg"
    path.write_bytes(b'skip_layers: "conv\xff"')
    with pytest.raises(ConfigError, match=r"q.cfg: cannot parse simple config: not UTF-8 text \(byte 18\)"):
        parse_simple_cfg(path)  # was UnicodeDecodeError
