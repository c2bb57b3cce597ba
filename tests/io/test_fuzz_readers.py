"""Fuzzing the readers: whatever the input, a reader returns a result or raises an AmctError.

Never another exception, and never a hang. Targets:

* prototxt: ``io.parse_prototxt_text`` (text), ``io.load_prototxt`` (a temporary file; legacy upgrade and
  phase filtering) followed by ``graph_from_net``;
* caffemodel: ``io.read_caffemodel``, ``io.load_weights`` and ``io.load_model`` (temporary files);
* record: ``record.parse_record_text`` (text) and ``record.read_record`` (a temporary file);
* JSON config: ``QuantConfig.from_json``; an accepted config must also be written and read back unchanged
  and give calibration layers the runtime accepts (values that pass validation and fail later);
* simple .cfg: ``parse_simple_cfg`` and ``config_from_simple_cfg`` (a temporary file, a small ResNet-like
  graph), with the same "accepted means usable" check.

Inputs are arbitrary bytes or text, and mutations of valid seeds (the shared LeNet prototxt and
caffemodel, small V0 / V1 nets, a record in the legacy layout, a JSON config, a .cfg): byte flips and
sets, truncations, deletions, insertions of random bytes or of tokens that matter to these formats
(braces, NaN, huge numbers, invalid UTF-8...). Blobs and config values are also drawn field by field.
Every example runs under an alarm of ``HANG_SECONDS``: a reader that loops fails the test. Inputs are
kept small (a few KiB, a handful of mutations), so each example is quick. Plain tests at the end feed
every text reader nesting bombs (30000 open braces or brackets) and long repetitions.

The default run is derandomized, ``DEFAULT_EXAMPLES`` examples per test (a few seconds in all). A longer,
random run, by hand::

    AMCT_FUZZ_EXAMPLES=20000 python -m pytest -q tests/io/test_fuzz_readers.py

A failure prints the falsifying input; add it as an ``@example`` of its test with the fix.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from amct_caffe import io
from amct_caffe.config.checks import MAX_SEARCH_CANDIDATES
from amct_caffe.config.quant_config import QuantConfig
from amct_caffe.config.simple_cfg import config_from_simple_cfg, parse_simple_cfg
from amct_caffe.errors import AmctError
from amct_caffe.io import record
from amct_caffe.io.graph_io import graph_from_net
from amct_caffe.io.schema import caffe_pb
from amct_caffe.passes.calibration import ActivationSpec, _ifmr_param
from amct_caffe.quant.ifmr import ifmr_ratios
from amct_caffe.runtime.layers.calibration import IfmrLayer
from tests.config.nets import RESNET_LIKE, graph_of
from tests.golden import MODELS

DEFAULT_EXAMPLES = 200
EXAMPLES = int(os.environ.get("AMCT_FUZZ_EXAMPLES", DEFAULT_EXAMPLES))
HANG_SECONDS = 10
FUZZ = settings(max_examples=EXAMPLES, derandomize="AMCT_FUZZ_EXAMPLES" not in os.environ, database=None,
                deadline=timedelta(seconds=5),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much, HealthCheck.large_base_example])

LENET = MODELS / "lenet_mnist/lenet.prototxt"
LENET_TRAIN = MODELS / "lenet_mnist/lenet_train_test.prototxt"
LENET_W = MODELS / "lenet_mnist/lenet_iter_10000.caffemodel"
needs_models = pytest.mark.skipif(not LENET_W.exists(), reason="../shared/models not beside the repository")


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


class Hang(Exception):
    """A reader ran longer than HANG_SECONDS on one small input."""


@contextlib.contextmanager
def _alarm(seconds: float = HANG_SECONDS):
    def ring(signum, frame):
        raise Hang(f"no answer after {seconds} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def result_or_amct_error(fn, *args):
    """``fn(*args)``, or None when it raises an AmctError; any other exception fails the test."""
    with _alarm():
        try:
            return fn(*args)
        except AmctError:
            return None


@contextlib.contextmanager
def _temp_file(data: bytes, suffix: str):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"fuzz{suffix}"
        path.write_bytes(data)
        yield path


# ------------------------------------------------------------------------------------------------ seeds
V1_PROTOTXT = b"""name: "v1"
input: "data"
input_dim: 1 input_dim: 1 input_dim: 8 input_dim: 8
layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv" blobs_lr: 1 blobs_lr: 2 weight_decay: 1
         convolution_param { num_output: 2 kernel_size: 3 } }
layers { name: "relu" type: RELU bottom: "conv" top: "conv" }
layers { name: "ip" type: INNER_PRODUCT bottom: "conv" top: "ip" inner_product_param { num_output: 3 }
         include { phase: TEST } }
"""

V0_PROTOTXT = b"""name: "v0"
input: "data"
input_dim: 1 input_dim: 1 input_dim: 8 input_dim: 8
layers { layer { name: "pad" type: "padding" pad: 1 } bottom: "data" top: "pad" }
layers { layer { name: "conv" type: "conv" num_output: 2 kernelsize: 3 } bottom: "pad" top: "conv" }
layers { layer { name: "pool" type: "pool" pool: MAX kernelsize: 2 stride: 2 } bottom: "conv" top: "pool" }
layers { layer { name: "ip" type: "innerproduct" num_output: 3 } bottom: "pool" top: "ip" }
"""

SHAPED_PROTOTXT = b"""name: "shaped"
input: "data"
input_shape { dim: 1 dim: 2 }
layer { name: "scale" type: "Scale" bottom: "data" top: "scale" scale_param { axis: 0 }
        include { phase: TEST stage: "deploy" } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 2 }
        exclude { phase: TRAIN min_level: 1 } }
state { level: 1 stage: "deploy" }
"""

PROTOTXT_SEEDS = [_read(LENET), _read(LENET_TRAIN), V1_PROTOTXT, V0_PROTOTXT, SHAPED_PROTOTXT]
PROTOTXT_TOKENS = [b"{", b"}", b"layer {", b"layers {", b'input: "x"', b"input_dim: 2", b"input_shape { dim: 1 }",
                   b'"\\377\\376"', b'"\\300"', b"nan", b"-inf", b"1e39", b"-1", b"4294967296",
                   b"9" * 30, b"include { phase: TRAIN }", b"exclude { phase: TEST }", b'type: "padding"',
                   b"type: NONE", b'top: "data"', b'bottom: "nowhere"', b"#", b"\x00", b"\xff", b":", b'"']


def _small_blobs_model() -> bytes:
    """A caffemodel of blobs in every layout: legacy dims, shape, scalar, double_data, integer fields."""
    pb = caffe_pb()
    net = pb.NetParameter(name="blobs")
    layer = net.layer.add(name="conv", type="Convolution")
    layer.blobs.add(num=2, channels=1, height=2, width=2).data.extend(np.arange(8, dtype=np.float32).tolist())
    layer.blobs.add(num=1, channels=1, height=1, width=2).data.extend([0.5, -0.5])
    layer = net.layer.add(name="scale", type="Scale")
    blob = layer.blobs.add()
    blob.shape.dim.extend([3])
    blob.double_data.extend([1.0, 2.0, 3.0])
    layer.blobs.add().data.append(7.0)  # a scalar: no shape, no legacy dims
    layer = net.layer.add(name="deploy", type="Convolution")
    blob = layer.blobs.add()
    blob.shape.dim.extend([2, 2])
    blob.int8_data = bytes([1, 2, 255, 128])
    blob = layer.blobs.add()
    blob.shape.dim.extend([2])
    blob.int32_data.extend([-3, 4])
    blob = layer.blobs.add()
    blob.shape.dim.extend([1])
    blob.uint64_data.append(2**63 + 5)
    return net.SerializeToString()


def _v1_model() -> bytes:
    pb = caffe_pb()
    net = pb.NetParameter(name="v1")
    net.input.append("data")
    enum = net.layers.add().DESCRIPTOR.fields_by_name["type"].enum_type
    del net.layers[:]
    v1 = net.layers.add(name="conv", type=enum.values_by_name["CONVOLUTION"].number, bottom=["data"], top=["conv"])
    v1.blobs.add(num=1, channels=1, height=1, width=3).data.extend([1.0, 2.0, 3.0])
    v1.blobs_lr.extend([1, 2])
    net.layers.add(name="relu", type=enum.values_by_name["RELU"].number, bottom=["conv"], top=["conv"])
    return net.SerializeToString()


def _opencv_model() -> bytes:
    from amct_caffe.io.opencv_blobs import _variant_net_class

    schema = caffe_pb()
    base_file = schema.pool.FindMessageTypeByName(f"{schema.package}.NetParameter").file.name
    msg = _variant_net_class(schema.package, base_file)()
    blob = msg.layer.add(name="ip", type="InnerProduct").blobs.add()
    blob.shape.dim.extend([2, 2])
    blob.raw_data_type = 2  # FLOAT16
    blob.raw_data = np.arange(4, dtype="<f2").tobytes()
    return msg.SerializeToString()


CAFFEMODEL_SEEDS = [_small_blobs_model(), _v1_model(), _opencv_model()]
LENET_WEIGHTS = _read(LENET_W)
CAFFEMODEL_TOKENS = [b"\x00", b"\xff" * 10, b"\x0a\x00", b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x02\xff\xfe",
                     b"\x3a\x02\x08\x80", b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x2d\x00\x00\xc0\x7f"]

RECORD_SEED = b"""record {
  key: "conv1"
  value {
    scale_w: 0.5 scale_w: 0.25 offset_w: 0 offset_w: 0 shift_bit: 1 shift_bit: 2
    skip_fusion: false object_layer: "conv1" num_bits_w: 8
    record_d { index: 0 scale_d: 0.0123 offset_d: -128 channels: 3 height: 4 width: 4 num_bits_d: 8 }
  }
}
"""
# The user guide's hand-written layout: activation fields directly in value, a closing brace lost.
LEGACY_RECORD_SEED = b"""record {
  key: "conv1"
  value {
    scale_w: 0.43213
    offset_w: 0
    scale_d: 1.554879
    offset_d: -49
    channels: 3
    height: 224
    width: 224
    shift_bit: 1
  }
record {
  key: "fc1000"
  value { scale_w: 0.1 offset_w: 0 scale_d: 0.5 offset_d: -128 shift_bit: 2 }
}
"""
RECORD_TOKENS = [b"{", b"}", b"record {", b"value {", b"record_d {", b"scale_d: ", b"offset_d: ", b"channels: ",
                 b"index: ", b"1e", b"3-1", b"-", b".", b"nan", b"inf", b"1e400", b"99999999999", b"-2147483649",
                 b"4294967296", b'"\\377"', b"\xff", b"\x00", b'key: "conv1"']

JSON_SEED = json.dumps({
    "version": 1, "batch_num": 2, "activation_offset": True, "joint_quant": False, "do_fusion": True,
    "skip_fusion_layers": ["conv1"], "update_bn": True,
    "bn_update_config": {"bn_moving_average_fraction": 0.5, "bn_update_iterations": 30, "bn_dump_dir": "bn"},
    "conv1": {"quant_enable": True,
              "activation_quant_params": {"num_bits": 8, "max_percentile": 0.999999, "min_percentile": 0.999999,
                                          "search_range": [0.7, 1.3], "search_step": 0.01, "with_offset": True},
              "weight_quant_params": {"wts_algo": "snq_quantize", "channel_wise": True, "num_bits": 4,
                                      "max_iteration": 1000, "min_distance": 1e-10, "init_algo": "uniform"}},
    "fc": {"activation_quant_params": [{"num_bits": 16}],
           "weight_quant_params": {"wts_algo": "arq_quantize", "channel_wise": False, "num_bits": 8}},
}, indent=1).encode()
JSON_TOKENS = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"1e-400", b"9" * 30, b"4294967296", b"-1", b"0",
               b"[", b"]", b"{", b"}", b'"', b",", b'"\\ud800"', b"\xff", b"true", b"null", b"[" * 50]

CFG_SEED = b"""batch_num: 2
activation_offset: true
skip_layers: "res2a_branch1"
skip_layer_types: "Eltwise"
skip_fusion_layers: "conv1"
update_bn: true
bn_update_config { bn_moving_average_fraction: 0.3 bn_update_iterations: 10 bn_dump_dir: "bn" }
common_config {
  arq_quantize { channel_wise: true }
  ifmr_quantize { search_range_start: 0.7 search_range_end: 1.3 search_step: 0.01 max_percentile: 0.999 }
}
override_layer_types { layer_type: "Convolution"
  calibration_config { snq_quantize { max_iteration: 600 min_distance: 1e-6 init_algo: "gaussian" } } }
override_layer_configs { layer_name: "conv1"
  calibration_config { ifmr_quantize { num_bits: 12 min_percentile: 0.9 } } }
"""
CFG_TOKENS = [b"nan", b"inf", b"-inf", b"1e39", b"1e-45", b"4294967296", b"-1", b"0", b"{", b"}", b'"\\377"',
              b"\xff", b"search_step: ", b"search_range_end: ", b"bn_update_iterations: ", b"batch_num: ",
              b"max_percentile: ", b"num_bits: "]


# ------------------------------------------------------------------------------------------- strategies
@st.composite
def mutations(draw, seeds: list[bytes], tokens: list[bytes], max_ops: int = 4) -> bytes:
    """A seed with a few byte flips, sets, cuts, deletions, and insertions of bytes or tokens."""
    data = bytearray(draw(st.sampled_from([s for s in seeds if s])))
    for _ in range(draw(st.integers(1, max_ops))):
        i = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "set", "truncate", "delete", "insert", "token"]))
        if op == "flip" and i < len(data):
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and i < len(data):
            data[i] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[i:]
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "token":
            data[i:i] = draw(st.sampled_from(tokens))
    return bytes(data)


def _lenet_edits() -> st.SearchStrategy[list]:
    """A few edits of the LeNet caffemodel, mostly in its first bytes (headers, where structure is).

    Drawn as (operation, offset, argument) so that a failure prints the edits, not 1.7 MB of bytes.
    """
    n = max(len(LENET_WEIGHTS), 1)
    edit = st.tuples(st.sampled_from(["flip", "set", "truncate", "token"]), st.integers(0, 512) | st.integers(0, n - 1),
                     st.integers(0, 255) | st.sampled_from(CAFFEMODEL_TOKENS))
    return st.lists(edit, min_size=1, max_size=3)


def _apply_edits(seed: bytes, edits) -> bytes:
    data = bytearray(seed)
    for op, i, arg in edits:
        if op == "flip" and i < len(data) and isinstance(arg, int):
            data[i] ^= 1 << (arg % 8)
        elif op == "set" and i < len(data) and isinstance(arg, int):
            data[i] = arg
        elif op == "truncate":
            del data[i:]
        elif op == "token" and isinstance(arg, bytes):
            data[i:i] = arg
    return bytes(data)


_DIMS = st.integers(-2, 5) | st.sampled_from([2**31 - 1, -(2**31), 2**40, 2**62])
_VALUES = st.lists(st.floats(width=32), max_size=10)


@st.composite
def blob_nets(draw) -> bytes:
    """A caffemodel of one layer whose blobs are drawn field by field (shapes, legacy dims, value fields)."""
    net = caffe_pb().NetParameter()
    layer = net.layer.add(name="layer", type="InnerProduct")
    for _ in range(draw(st.integers(1, 3))):
        blob = layer.blobs.add()
        if draw(st.booleans()):
            blob.shape.dim.extend(draw(st.lists(_DIMS, max_size=5)))
        for name in ("num", "channels", "height", "width"):
            if draw(st.integers(0, 3)) == 0:
                setattr(blob, name, draw(_DIMS.filter(lambda d: -(2**31) <= d < 2**31)))
        for name in draw(st.sets(st.sampled_from(["data", "double_data", "int8_data", "int32_data", "uint64_data"]),
                                 max_size=2)):
            values = draw(_VALUES)
            if name == "int8_data":
                blob.int8_data = bytes(int(v) & 0xFF for v in values if math.isfinite(v))
            elif name == "int32_data":
                blob.int32_data.extend(int(v) % 2**31 for v in values if math.isfinite(v))
            elif name == "uint64_data":
                blob.uint64_data.extend(int(abs(v)) % 2**64 for v in values if math.isfinite(v))
            else:
                getattr(blob, name).extend(values)
    return net.SerializeToString()


_JSON_NUMBERS = (st.integers(-(2**70), 2**70) | st.floats() | st.sampled_from([0, 1, 8, 16, 500, 2000, 0.5, 1.0]))
_JSON_LEAVES = st.none() | st.booleans() | _JSON_NUMBERS | st.text(max_size=8) | st.sampled_from(
    ["arq_quantize", "snq_quantize", "uniform", "gaussian", "d2sampling", "conv1"])
_JSON_KEYS = st.sampled_from(["version", "batch_num", "activation_offset", "joint_quant", "do_fusion",
                              "skip_fusion_layers", "update_bn", "bn_update_config", "bn_moving_average_fraction",
                              "bn_update_iterations", "bn_dump_dir", "quant_enable", "activation_quant_params",
                              "weight_quant_params", "num_bits", "max_percentile", "min_percentile", "search_range",
                              "search_step", "with_offset", "wts_algo", "channel_wise", "max_iteration",
                              "min_distance", "init_algo", "conv1", "fc"]) | st.text(max_size=6)
_JSON_VALUES = st.recursive(_JSON_LEAVES, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(_JSON_KEYS, inner, max_size=6), max_leaves=25)


@st.composite
def json_configs(draw) -> str:
    """A config drawn field by field: the seed with some values replaced by arbitrary JSON values."""
    config = json.loads(JSON_SEED)

    def replace(node):
        if isinstance(node, dict):
            for key in list(node):
                choice = draw(st.integers(0, 5))
                if choice == 0:
                    node[key] = draw(_JSON_VALUES)
                elif choice == 1:
                    node[key] = draw(_JSON_NUMBERS)
                elif choice == 2:
                    del node[key]
                else:
                    replace(node[key])
        elif isinstance(node, list):
            for i in range(len(node)):
                if draw(st.integers(0, 3)) == 0:
                    node[i] = draw(_JSON_NUMBERS)

    replace(config)
    return json.dumps(config)


_CFG_FLOATS = st.floats(width=32) | st.sampled_from([0.0, 0.5, 0.7, 1.0, 1.3, 1e-45, 3.4e38]) | st.floats(0, 2)
_CFG_INTS = st.integers(0, 2**32 - 1) | st.integers(0, 2100)


@st.composite
def cfg_texts(draw) -> str:
    """A .cfg whose numbers are drawn: every float and integer field of the common config and overrides."""
    def f() -> str:
        return repr(float(draw(_CFG_FLOATS)))

    def i() -> int:
        return draw(_CFG_INTS)

    return (f"batch_num: {i()}\nupdate_bn: {draw(st.sampled_from(['true', 'false']))}\n"
            f"bn_update_config {{ bn_moving_average_fraction: {f()} bn_update_iterations: {i()} }}\n"
            f"common_config {{ ifmr_quantize {{ search_range_start: {f()} search_range_end: {f()} "
            f"search_step: {f()} max_percentile: {f()} min_percentile: {f()} num_bits: {i()} }} }}\n"
            f'override_layer_types {{ layer_type: "Convolution" calibration_config {{ snq_quantize {{ '
            f"max_iteration: {i()} min_distance: {f()} }} }} }}\n"
            f'override_layer_configs {{ layer_name: "fc1000" calibration_config {{ ifmr_quantize {{ '
            f"search_step: {f()} }} }} }}\n")


# ------------------------------------------------------------------------------------------- properties
def check_usable(config: QuantConfig) -> None:
    """An accepted config must be written and read back unchanged, and make calibration layers that build."""
    text = config.to_json()
    text.encode("utf-8")  # what write_quant_config writes
    assert QuantConfig.from_json(text).to_dict() == config.to_dict()
    for name, layer in config.layers.items():
        act = layer.activation_quant_params
        spec = ActivationSpec(name, 0, act.num_bits, True, act.max_percentile, act.min_percentile,
                              act.search_range, act.search_step)
        lp = _ifmr_param(spec, config.batch_num, "record.txt", [spec])
        lp.name, lp.type = f"{name}_ifmr", "IFMR"
        ifmr = IfmrLayer(lp)
        p = ifmr.params
        assert ifmr_ratios(p.search_range_start, p.search_range_end, p.search_step).size <= MAX_SEARCH_CANDIDATES


@functools.lru_cache(maxsize=1)
def _graph():
    return graph_of(RESNET_LIKE)


# ------------------------------------------------------------------------------------------- prototxt
@FUZZ
@given(st.text(max_size=2000) | mutations(PROTOTXT_SEEDS, PROTOTXT_TOKENS).map(
    lambda b: b.decode("utf-8", "surrogateescape")))
@example('layer { name: "pool1" type: "Pooling" pooling_param { pool:\udc80 MAX } }')  # SystemError
def test_prototxt_text(text):
    result_or_amct_error(io.parse_prototxt_text, text, "fuzz.prototxt")


@FUZZ
@given(st.binary(max_size=2000) | mutations(PROTOTXT_SEEDS, PROTOTXT_TOKENS))
@example(V0_PROTOTXT.split(b"\nlayers")[0] + b'\nlayers { layer { name: "pad" type: "padding" } bottom: "data" }')
@example(b'name: "v0"\ninput: "data"\ninput_dim: 1 input_dim: 1 input_dim: 8 input_dim: 8\n'
         b'layers { layer { name: "pad" type: "padding" pad: 1 } bottom: "data" top: "pad" }')  # IndexError
def test_prototxt_file_and_graph(data):
    with _temp_file(data, ".prototxt") as path:
        for phase in (io.TEST, io.TRAIN):
            net = result_or_amct_error(io.load_prototxt, path, phase)
            if net is not None:
                result_or_amct_error(graph_from_net, net)


# ------------------------------------------------------------------------------------------- caffemodel
def _read_weights(data: bytes) -> None:
    with _temp_file(data, ".caffemodel") as path:
        result_or_amct_error(io.read_caffemodel, path)
        result_or_amct_error(io.load_weights, path)
        if LENET.exists():
            loaded = result_or_amct_error(io.load_model, LENET, path)
            if loaded is not None:
                result_or_amct_error(graph_from_net, *loaded)


@FUZZ
@given(st.binary(max_size=4000) | mutations(CAFFEMODEL_SEEDS, CAFFEMODEL_TOKENS))
def test_caffemodel_bytes(data):
    _read_weights(data)


@FUZZ
@given(blob_nets())
@example(b'\xa2\x06"\n\x05layer\x12\x0cInnerProduct:\x0b\x10\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01')  # reshape
@example(b'\xa2\x06#\n\x05layer\x12\x0cInnerProduct:\x0c\x10\xff\xff\xff\xff\x07\x18\xff\xff\xff\xff\x07')  # too big
def test_caffemodel_blob_fields(data):
    _read_weights(data)


@needs_models
@FUZZ
@given(_lenet_edits())
def test_lenet_caffemodel_mutations(edits):
    _read_weights(_apply_edits(LENET_WEIGHTS, edits))


# ------------------------------------------------------------------------------------------- record
@FUZZ
@given(st.text(max_size=2000) | mutations([RECORD_SEED, LEGACY_RECORD_SEED], RECORD_TOKENS).map(
    lambda b: b.decode("utf-8", "replace")))
@example('record { key: "a" value { scale_d: 3-1 } }')  # ValueError
@example('record { key: "a" value { offset_d: 1e400 } }')  # OverflowError
@example('record { key: "a" value { channels: -1 }')  # protobuf ValueError
def test_record_text(text):
    result_or_amct_error(record.parse_record_text, text, "fuzz_record.txt")


@FUZZ
@given(st.binary(max_size=1000) | mutations([RECORD_SEED, LEGACY_RECORD_SEED], RECORD_TOKENS))
@example(b"\x80")  # UnicodeDecodeError
def test_record_file(data):
    with _temp_file(data, ".txt") as path:
        result_or_amct_error(record.read_record, path)


# ------------------------------------------------------------------------------------------- JSON config
@FUZZ
@given(st.text(max_size=1000) | json_configs() | mutations([JSON_SEED], JSON_TOKENS).map(
    lambda b: b.decode("utf-8", "replace")))
@example("[" * 100_000)  # RecursionError
@example('{"batch_num": 1' + "0" * 5000 + "}")  # ValueError: too many digits
@example('{"l": {"activation_quant_params": {"search_range": [0.7, ' + "9" * 400 + "]}}}")  # OverflowError
@example('{"l": {"activation_quant_params": {"search_range": [0.7, Infinity]}}}')  # OverflowError, later
@example('{"l": {"activation_quant_params": {"search_range": [0.1, 0.3], "search_step": 0.2}}}')  # later
@example('{"l": {"activation_quant_params": {"search_step": 1e-9}}}')  # out of memory, later
@example('{"batch_num": 4294967296, "l": {}}')  # protobuf ValueError, later
@example('{"\\ud800": {}}')  # could not be written back
def test_json_config(text):
    config = result_or_amct_error(QuantConfig.from_json, text, "fuzz.json")
    if config is not None:
        check_usable(config)


# ------------------------------------------------------------------------------------------- simple .cfg
@FUZZ
@given(st.binary(max_size=1000) | mutations([CFG_SEED], CFG_TOKENS) | cfg_texts().map(str.encode))
@example(b"\x80")  # UnicodeDecodeError
@example(b"common_config { ifmr_quantize { search_range_end: inf } }")  # OverflowError, later
@example(b"common_config { ifmr_quantize { search_step: 1e-45 } }")  # out of memory, later
def test_simple_cfg(data):
    with _temp_file(data, ".cfg") as path:
        result_or_amct_error(parse_simple_cfg, path)
        config = result_or_amct_error(config_from_simple_cfg, path, _graph())
        if config is not None:
            check_usable(config)


# ------------------------------------------------------------------------------------------- bombs
NEST = 30_000  # far beyond Python's recursion limit and protobuf's nesting limit (100)


def _bomb_id(text: str) -> str:
    return f"{text[:24]}...[{len(text)}]"


@pytest.mark.parametrize("text", [
    "layer { " * NEST,
    'layer { name: "a" convolution_param { weight_filler { ' + "{ " * NEST,
    "layers { layer { " * NEST,
    "name: " + '"' * NEST,
    'layer { name: "x" } ' * 5_000,
], ids=_bomb_id)
def test_prototxt_bombs(text):
    result_or_amct_error(io.parse_prototxt_text, text, "bomb.prototxt")


@pytest.mark.parametrize("text", [
    "record { " * NEST,
    'record { key: "a" value { ' + "record_d { " * NEST,
    'record { key: "a" value { scale_d: 1 ' + "{ " * NEST,
    'record { key: "a" value { scale_d: 1 ' + "} " * NEST,
    'record { key: "a" value { scale_w: 1 } }\n' * 5_000,
], ids=_bomb_id)
def test_record_bombs(text):
    result_or_amct_error(record.parse_record_text, text, "bomb.txt")


@pytest.mark.parametrize("text", [
    "common_config { " * NEST,
    "common_config { ifmr_quantize { " + "{ " * NEST,
    "[" * NEST, '{"a": ' * NEST, '{"conv1": {"activation_quant_params": ' + "[" * NEST,
], ids=_bomb_id)
def test_config_bombs(tmp_path, text):
    path = tmp_path / "bomb.cfg"
    path.write_text(text)
    result_or_amct_error(config_from_simple_cfg, path, _graph())
    result_or_amct_error(QuantConfig.from_json, text, "bomb.json")
