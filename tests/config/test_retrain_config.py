"""The retrain (QAT) config: generated defaults, every field's range, the .cfg, model checks."""

import json

import pytest

from amct_caffe.config import (RetrainConfig, bind_retrain_config, create_retrain_config, read_retrain_config,
                               write_retrain_config)
from amct_caffe.errors import ConfigError
from amct_caffe.io import load_model
from amct_caffe.io.graph_io import graph_from_net
from tests.golden import MODELS

LENET = MODELS / "lenet_mnist/lenet_train_test.prototxt"
LENET_W = MODELS / "lenet_mnist/lenet_iter_10000.caffemodel"
pytestmark = pytest.mark.skipif(not LENET.exists(), reason="../shared not beside the repository")


@pytest.fixture(scope="module")
def graph():
    return graph_from_net(*load_model(LENET, LENET_W))


def _layer(**over):
    entry = {"retrain_enable": True, "retrain_data_config": {"algo": "ulq_quantize", "num_bits": 8},
             "retrain_weight_config": {"algo": "arq_retrain", "channel_wise": True, "num_bits": 8}}
    for key, value in over.items():
        if isinstance(value, dict):
            entry[key].update(value)
        else:
            entry[key] = value
    return entry


def test_defaults_are_the_guides_sample(graph):
    d = create_retrain_config(graph).to_dict()
    assert list(d) == ["version", "conv1", "conv2", "ip1", "ip2"]
    assert d["version"] == 1
    assert d["conv1"] == _layer()
    assert d["ip1"] == _layer(retrain_weight_config={"channel_wise": False})  # InnerProduct: per tensor


def test_json_round_trip(tmp_path, graph):
    config = create_retrain_config(graph)
    path = tmp_path / "c.json"
    write_retrain_config(config, path)
    assert read_retrain_config(path) == config
    assert json.loads(path.read_text()) == config.to_dict()


GOOD = [
    {"retrain_data_config": {"clip_max": 3.0, "clip_min": -3.0}},
    {"retrain_data_config": {"clip_max": 2, "fixed_min": True}},
    {"retrain_data_config": {"fixed_min": False, "num_bits": 16}},
    {"retrain_data_config": {"num_bits": 12}},
    {"retrain_enable": False},
]


@pytest.mark.parametrize("over", GOOD)
def test_valid_entries(over):
    config = RetrainConfig.from_dict({"version": 1, "conv1": _layer(**over)})
    assert config.layers["conv1"].to_dict()["retrain_data_config"]["algo"] == "ulq_quantize"


BAD = [
    ({"version": 2}, "version 2 is not one of: 1"),
    ({"version": "1"}, "version must be an integer"),
    ({"conv1": _layer(retrain_enable=1)}, "layer 'conv1': retrain_enable must be true or false"),
    ({"conv1": _layer(retrain_data_config={"algo": "ifmr"})}, "retrain_data_config.algo \"ifmr\" is not one of"),
    ({"conv1": _layer(retrain_data_config={"clip_max": 0.0, "clip_min": -1.0})},
     "retrain_data_config.clip_max 0.0 is out of range clip_max > 0"),
    ({"conv1": _layer(retrain_data_config={"clip_max": 1.0, "clip_min": 0.5})},
     "retrain_data_config.clip_min 0.5 is out of range clip_min < 0"),
    ({"conv1": _layer(retrain_data_config={"clip_max": 1e39, "clip_min": -1.0})}, "finite float32"),
    ({"conv1": _layer(retrain_data_config={"clip_max": 3e38, "clip_min": -3e38})},
     "clip_max - clip_min (3e+38 - -3e+38) overflows float32"),
    ({"conv1": _layer(retrain_data_config={"clip_max": 1.0, "fixed_min": False})},
     "clip_max is given without clip_min"),
    ({"conv1": _layer(retrain_data_config={"clip_min": -1.0})}, "clip_min is given without clip_max"),
    ({"conv1": _layer(retrain_data_config={"clip_max": 1.0, "clip_min": -1.0, "fixed_min": True})},
     "contradicts fixed_min true"),
    ({"conv1": _layer(retrain_data_config={"fixed_min": "yes"})}, "fixed_min must be true or false"),
    ({"conv1": _layer(retrain_data_config={"num_bits": 7})}, "retrain_data_config.num_bits 7 is out of range [8, 16]"),
    ({"conv1": _layer(retrain_data_config={"num_bits": 17})}, "out of range [8, 16]"),
    ({"conv1": _layer(retrain_data_config={"num_bits": 8.0})}, "num_bits must be an integer"),
    ({"conv1": _layer(retrain_data_config={"with_offset": True})}, "unknown field(s) 'with_offset'"),
    ({"conv1": _layer(retrain_weight_config={"algo": "arq_quantize"})}, "retrain_weight_config.algo"),
    ({"conv1": _layer(retrain_weight_config={"num_bits": 4})},
     "retrain_weight_config.num_bits 4 is out of range: weight quantization supports only 8"),
    ({"conv1": _layer(retrain_weight_config={"channel_wise": "true"})}, "channel_wise must be true or false"),
    ({"conv1": _layer(quant_enable=True)}, "unknown field(s) 'quant_enable'"),
    ({"conv1": 3}, "unknown field 'conv1'"),
]


@pytest.mark.parametrize("d,message", BAD)
def test_invalid_fields_name_layer_and_field(d, message):
    with pytest.raises(ConfigError) as e:
        RetrainConfig.from_dict({"version": 1, **d}, "c.json")
    assert message in str(e.value)
    assert str(e.value).startswith("c.json")


def test_duplicate_layer_and_bad_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"version": 1, "conv1": {}, "conv1": {}}')
    with pytest.raises(ConfigError, match="key 'conv1' appears twice"):
        read_retrain_config(path)
    path.write_text('{"version": 1,')
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_retrain_config(path)


def test_bind_checks_against_the_model(graph):
    with pytest.raises(ConfigError, match="layer 'nope' is in the retrain config but not in the model"):
        bind_retrain_config(RetrainConfig.from_dict({"nope": _layer()}), graph)
    with pytest.raises(ConfigError, match="layer 'pool1': cannot be retrained: Pooling"):
        bind_retrain_config(RetrainConfig.from_dict({"pool1": _layer()}), graph)
    with pytest.raises(ConfigError, match=r"layer 'ip1' \(InnerProduct\): retrain_weight_config.channel_wise true is "
                                          "not supported"):
        bind_retrain_config(RetrainConfig.from_dict({"ip1": _layer()}), graph)
    bound = bind_retrain_config(RetrainConfig.from_dict({"conv2": _layer(), "conv1": _layer()}), graph)
    assert list(bound.layers) == ["conv1", "conv2"]  # model order


def test_simple_cfg_overrides_named_layers(tmp_path, graph):
    cfg = tmp_path / "retrain.cfg"
    cfg.write_text('version: 1\n'
                   'layers { key: "conv2" value { retrain_data_config {\n'
                   '  clip_max: 3.3 clip_min: -0.7 num_bits: 12 } } }\n'
                   'layers { key: "ip2" value { retrain_enable: false } }\n')
    d = create_retrain_config(graph, cfg).to_dict()
    assert d["conv1"] == _layer()
    assert d["conv2"]["retrain_data_config"] == {"algo": "ulq_quantize", "clip_max": 3.3, "clip_min": -0.7,
                                                 "num_bits": 12}
    assert d["ip2"]["retrain_enable"] is False
    assert d["ip2"]["retrain_weight_config"]["channel_wise"] is False


@pytest.mark.parametrize("text,message", [
    ('layers { key: "pool1" value { retrain_enable: false } }', "layer 'pool1' is not a retrainable layer"),
    ('layers { key: "ip1" value { retrain_weight_config { channel_wise: true } } }', "channel_wise true is not"),
    ('layers { key: "conv1" value { retrain_data_config { num_bits: 4 } } }', "num_bits 4 is out of range [8, 16]"),
    ('layers { key: "conv1" value { retrain_data_config { clip_min: 1 clip_max: 2 } } }', "clip_min 1.0 is out of"),
    ("version: 2", "version 2 is not one of"),
    ("layers { key: ", "cannot parse retrain simple config"),
])
def test_simple_cfg_errors(tmp_path, graph, text, message):
    cfg = tmp_path / "retrain.cfg"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as e:
        create_retrain_config(graph, cfg)
    assert message in str(e.value) and str(cfg) in str(e.value)


NARROW_OUTPUT = '''
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 5 } } }
layer { name: "ipa" type: "InnerProduct" bottom: "data" top: "ipa" inner_product_param { num_output: 6 axis: 2
  weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu" type: "ReLU" bottom: "ipa" top: "ipa" }
layer { name: "ip0" type: "InnerProduct" bottom: "ipa" top: "ip0" inner_product_param { num_output: 4 axis: 0
  weight_filler { type: "gaussian" std: 0.3 } } }
'''


def test_layers_ptq_cannot_quantize_for_their_shapes_are_not_retrained(tmp_path):
    """An InnerProduct on axis 0 writes a blob of one axis, which no DeQuant takes: PTQ keeps it float, and
    the retrain config left it in, so save_quant_retrain_model wrote models that did not load."""
    from amct_caffe.api.retrain import _test_graph
    from amct_caffe.runtime import TEST, Net
    model, weights = tmp_path / "m.prototxt", tmp_path / "m.caffemodel"
    model.write_text(NARROW_OUTPUT)
    Net(str(model), TEST).save(str(weights))
    graph = _test_graph(str(model), str(weights))  # the shapes inferred, as create_quant_retrain_config has them
    assert list(create_retrain_config(graph).layers) == ["ipa"]
    with pytest.raises(ConfigError, match=r"layer 'ip0': cannot be retrained: its output ip0 has shape \[4\]; "
                                          "quantization needs at least 2 axes"):
        bind_retrain_config(RetrainConfig.from_dict({"ip0": _layer(retrain_weight_config={"channel_wise": False})}),
                            graph)


def test_nothing_to_retrain_names_the_model_file(tmp_path, caplog):
    import amct_caffe as amct
    from amct_caffe.runtime import TEST, Net
    model, weights = tmp_path / "m.prototxt", tmp_path / "m.caffemodel"
    model.write_text(NARROW_OUTPUT.replace('"ipa" inner_product_param { num_output: 6 axis: 2',
                                           '"ipa" inner_product_param { num_output: 6 axis: 0'))
    Net(str(model), TEST).save(str(weights))
    with caplog.at_level("WARNING"):
        amct.create_quant_retrain_config(str(tmp_path / "c.json"), str(model), str(weights))
    assert f"no layer of {model} will be retrained" in caplog.text
