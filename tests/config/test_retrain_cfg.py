"""The retrain .cfg in the vendor's form (skip lists, common config, type and layer overrides) beside the
``layers`` form: precedence, the pair rule of clip_max_min, dst_type, and the errors naming file and field."""

import pytest

from amct_caffe.config import create_retrain_config
from amct_caffe.errors import ConfigError
from amct_caffe.io import load_model
from amct_caffe.io.graph_io import graph_from_net
from tests.golden import MODELS

LENET = MODELS / "lenet_mnist/lenet_train_test.prototxt"
LENET_W = MODELS / "lenet_mnist/lenet_iter_10000.caffemodel"
SLIM = MODELS / "ultraface_slim320/slim-320.prototxt"
SLIM_W = MODELS / "ultraface_slim320/slim-320.caffemodel"
pytestmark = pytest.mark.skipif(not LENET.exists(), reason="../shared not beside the repository")


@pytest.fixture(scope="module")
def lenet():
    return graph_from_net(*load_model(LENET, LENET_W))


def _config(tmp_path, graph, text):
    cfg = tmp_path / "retrain.cfg"
    cfg.write_text(text)
    return create_retrain_config(graph, cfg).to_dict()


def test_precedence_layer_over_type_over_common_and_skips(tmp_path, lenet):
    d = _config(tmp_path, lenet, '''
        batch_num: 1
        skip_layers: "conv1"
        retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: 4.0 clip_min: -2.0 } dst_type: INT16 } }
        retrain_weight_quant_config { arq_retrain { channel_wise: false } }
        override_layer_types { layer_type: "Convolution"
                               retrain_data_quant_config {
                                   ulq_quantize { clip_max_min { clip_max: 5.0 } fixed_min: true } }
                               retrain_weight_quant_config { arq_retrain { channel_wise: true } } }
        override_layer_configs { layer_name: "ip2" retrain_data_quant_config { ulq_quantize { num_bits: 12 } } }
        layers { key: "ip2" value { retrain_data_config { clip_max: 7.5 clip_min: -1.5 } } }
    ''')
    assert d["conv1"]["retrain_enable"] is False
    # conv2: common, then the Convolution override (the pair clip_max_min drops the common clip_min)
    assert d["conv2"] == {"retrain_enable": True,
                          "retrain_data_config": {"algo": "ulq_quantize", "clip_max": 5.0, "fixed_min": True,
                                                  "num_bits": 16},
                          "retrain_weight_config": {"algo": "arq_retrain", "channel_wise": True, "num_bits": 8}}
    assert d["ip1"]["retrain_data_config"] == {"algo": "ulq_quantize", "clip_max": 4.0, "clip_min": -2.0,
                                               "num_bits": 16}
    assert d["ip1"]["retrain_weight_config"]["channel_wise"] is False
    # ip2: common < its override_layer_configs entry < its layers entry
    assert d["ip2"]["retrain_data_config"] == {"algo": "ulq_quantize", "clip_max": 7.5, "clip_min": -1.5,
                                               "num_bits": 12}


def test_skip_layer_types_unless_the_layer_is_named(tmp_path, lenet):
    d = _config(tmp_path, lenet, 'skip_layer_types: "InnerProduct"\n'
                                 'override_layer_configs { layer_name: "ip2" }\n')
    assert [d[n]["retrain_enable"] for n in ("conv1", "conv2", "ip1", "ip2")] == [True, True, False, True]


@pytest.mark.skipif(not SLIM.exists(), reason="../shared not beside the repository")
def test_depthwise_layers_take_convolution_then_depthwiseconv(tmp_path):
    graph = graph_from_net(*load_model(SLIM, SLIM_W))
    d = _config(tmp_path, graph, '''
        override_layer_types { layer_type: "Convolution" retrain_data_quant_config { ulq_quantize { num_bits: 10 } } }
        override_layer_types { layer_type: "DepthwiseConv"
                               retrain_data_quant_config { ulq_quantize { fixed_min: false } } }
    ''')
    first, depthwise = d["185"], d["188"]  # the first (plain) Convolution and the depthwise one after it
    assert first["retrain_data_config"] == {"algo": "ulq_quantize", "num_bits": 10}
    assert depthwise["retrain_data_config"] == {"algo": "ulq_quantize", "fixed_min": False, "num_bits": 10}


def test_the_layers_form_alone_changes_only_the_layers_it_names(tmp_path, lenet):
    d = _config(tmp_path, lenet, 'layers { key: "conv2" value { retrain_enable: false } }')
    assert d["conv1"] == create_retrain_config(lenet).to_dict()["conv1"]
    assert d["conv2"]["retrain_enable"] is False


@pytest.mark.parametrize("text,message", [
    ("batch_num: 4", "batch_num 4: the retrain layers start their clips by IFMR on the first batch only"),
    ('skip_layers: "pool1"', "skip_layers: layer 'pool1' is not a retrainable layer of the model"),
    ('skip_layers: "conv1" skip_layers: "conv1"', "skip_layers: 'conv1' is listed twice"),
    # the map field kept the last entry: conv1's retrain_enable false was lost (every other duplicate was refused)
    ('layers { key: "conv1" value { retrain_enable: false } } layers { key: "conv1" value { retrain_data_config { '
     'clip_max: 3.0 clip_min: -3.0 } } }', 'layers { key: "conv1" } is given twice'),
    ('skip_layer_types: "Pooling"', "skip_layer_types: 'Pooling' is not one of the retrainable types"),
    ('override_layer_types { layer_type: "LSTM" }', "'LSTM' is not one of the retrainable types"),
    ('override_layer_types { layer_type: "InnerProduct" } override_layer_types { layer_type: "InnerProduct" }',
     "type 'InnerProduct' is overridden twice"),
    ('skip_layer_types: "InnerProduct" override_layer_types { layer_type: "InnerProduct" }',
     "type 'InnerProduct' is also in skip_layer_types"),
    ('skip_layers: "ip1" override_layer_configs { layer_name: "ip1" }', "layer 'ip1' is also in skip_layers"),
    ('override_layer_configs { layer_name: "ip9" }', "override_layer_configs: layer 'ip9' is not a retrainable"),
    ('retrain_data_quant_config { ulq_quantize { dst_type: INT4 } }',
     "retrain_data_quant_config: ulq_quantize.dst_type INT4: data is quantized to 8 to 16 bits"),
    ('retrain_data_quant_config { ulq_quantize { dst_type: INT8 num_bits: 8 } }', "gives both dst_type and num_bits"),
    ('override_layer_types { layer_type: "Convolution" '
     'retrain_weight_quant_config { arq_retrain { dst_type: INT16 } } }',
     "override_layer_types[Convolution].retrain_weight_quant_config: arq_retrain.dst_type INT16: weights are "
     "retrained in INT8 only"),
    ('retrain_weight_quant_config { arq_retrain { channel_wise: true } }',
     "layer 'ip1' (InnerProduct): retrain_weight_config.channel_wise true is not supported"),
    ('override_layer_configs { layer_name: "ip1" retrain_data_quant_config { ulq_quantize { '
     'clip_max_min { clip_min: -1.0 } } } }', "layer 'ip1': retrain_data_config.clip_min is given without clip_max"),
    ('retrain_data_quant_config { ulq_quantize { fixed_min: true clip_max_min { clip_max: 1 clip_min: -1 } } }',
     "contradicts fixed_min true"),
    ("skip_layer: \"conv1\"", "cannot parse retrain simple config"),
])
def test_vendor_form_errors_name_the_file_and_field(tmp_path, lenet, text, message):
    cfg = tmp_path / "retrain.cfg"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as e:
        create_retrain_config(lenet, cfg)
    assert message in str(e.value) and str(cfg) in str(e.value)


def test_the_docs_example_skipped_layers_take_no_common_setting(tmp_path, lenet):
    """docs/qat.md's example: InnerProduct layers skipped by type, a common channel_wise true (which an
    InnerProduct cannot take) applies to the retrained convolutions only."""
    d = _config(tmp_path, lenet, '''
        batch_num: 1
        skip_layer_types: "InnerProduct"
        retrain_data_quant_config { ulq_quantize { fixed_min: false dst_type: INT8 } }
        retrain_weight_quant_config { arq_retrain { channel_wise: true } }
    ''')
    default = create_retrain_config(lenet).to_dict()
    assert d["ip1"] == {**default["ip1"], "retrain_enable": False}
    assert d["conv2"]["retrain_data_config"] == {"algo": "ulq_quantize", "fixed_min": False, "num_bits": 8}
