"""Models Caffe refuses are refused when they are loaded, naming the layer, before anything is written.

Each case is a small prototxt with a caffemodel whose blobs fit its prototxt, so that the error is
about the model itself; create_quant_config and convert_model must both stop with the library's
error and leave no file behind (convert_model used to write models that could not be loaded).
"""

from __future__ import annotations

import numpy as np
import pytest

import amct_caffe as amct
from amct_caffe import GraphError, WeightsError
from amct_caffe import io as amct_io

INPUT = 'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: {dims} }} }} }}\n'
CONV = ('layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv" '
        'convolution_param {{ {conv} }} }}\n')
RELU = 'layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }\n'
RECORD = ('record { key: "conv" value { scale_w: 0.01 offset_w: 0 num_bits_w: 8 '
          'record_d { scale_d: 0.02 offset_d: 0 index: 0 num_bits_d: 8 } } }\n')


def _write(tmp_path, text: str, blobs: dict[str, list[np.ndarray]]):
    proto = tmp_path / "m.prototxt"
    proto.write_text(text)
    net = amct_io.parse_prototxt_text(text, str(proto))
    weights = tmp_path / "m.caffemodel"
    weights.write_bytes(amct_io.net_to_caffemodel(net, blobs).SerializeToString())
    return proto, weights


def _conv_w(o, c, k):
    return [np.full((o, c, k, k), 0.1, np.float32), np.zeros(o, np.float32)]


X8 = INPUT.format(dims="1 dim: 4 dim: 8 dim: 8")
CASES = {
    "zero num_output": (INPUT.format(dims="1 dim: 4 dim: 8 dim: 8") + CONV.format(conv="num_output: 0 kernel_size: 3"),
                        {"conv": _conv_w(0, 4, 3)}, GraphError, r"layer 'conv'.*num_output must be > 0"),
    "kernel larger than the padded input": (
        INPUT.format(dims="1 dim: 4 dim: 8 dim: 8") + CONV.format(conv="num_output: 4 kernel_size: 11 pad: 1"),
        {"conv": _conv_w(4, 4, 11)}, GraphError, r"layer 'conv'"),
    "kernel one wider than the input (an empty top)": (
        X8 + CONV.format(conv="num_output: 4 kernel_size: 9"),
        {"conv": _conv_w(4, 4, 9)}, GraphError, r"layer 'conv'.*top 'conv' would be empty \(shape \[1, 4, 0, 0\]\)"),
    "group not dividing the channels": (
        INPUT.format(dims="1 dim: 4 dim: 8 dim: 8") + CONV.format(conv="num_output: 6 kernel_size: 3 group: 3"),
        {"conv": [np.zeros((6, 1, 3, 3), np.float32), np.zeros(6, np.float32)]}, GraphError, r"layer 'conv'"),
    "stride 0": (X8 + CONV.format(conv="num_output: 4 kernel_size: 3 stride: 0"),
                 {"conv": _conv_w(4, 4, 3)}, GraphError, r"layer 'conv'.*stride"),
    "no weights for a layer": (X8 + CONV.format(conv="num_output: 4 kernel_size: 3"),
                               {"other": _conv_w(4, 4, 3)}, WeightsError,
                               r"layer 'conv' \(Convolution\): the caffemodel has no weights for this layer"),
    "three blobs for a convolution": (
        INPUT.format(dims="1 dim: 4 dim: 8 dim: 8") + CONV.format(conv="num_output: 4 kernel_size: 3"),
        {"conv": [*_conv_w(4, 4, 3), np.zeros(4, np.float32)]}, WeightsError,
        r"layer 'conv' \(Convolution\): the caffemodel has 3 blob\(s\), the layer needs 2"),
    "negative input dimension": (
        INPUT.format(dims="1 dim: -4 dim: 8 dim: 8") + CONV.format(conv="num_output: 4 kernel_size: 3"),
        {"conv": _conv_w(4, 4, 3)}, GraphError,
        r"layer 'data'.*top 'data' of shape \[1, -4, 8, 8\] has a negative dimension"),
    "absurd input dimensions": (
        INPUT.format(dims="100000 dim: 4 dim: 100000 dim: 100000") + CONV.format(conv="num_output: 4 kernel_size: 3"),
        {"conv": _conv_w(4, 4, 3)}, GraphError, r"more than 2147483647 elements"),
    "a pad whose padded input overflows int index arithmetic": (
        X8 + CONV.format(conv="num_output: 4 kernel_size: 3 pad: 1073741824 stride: 2147483647"),
        {"conv": _conv_w(4, 4, 3)}, GraphError, r"layer 'conv'.*padded input \[2147483656, 2147483656\].*exceeds"),
    "an in-place layer on a blob another layer read": (
        X8 + CONV.format(conv="num_output: 4 kernel_size: 3")
        + 'layer { name: "t" type: "TanH" bottom: "conv" top: "t" }\n' + RELU,
        {"conv": _conv_w(4, 4, 3)}, GraphError, r"layer 'relu' computes blob 'conv' in place, but layer 't' already"),
    "a blob with two producers": (
        INPUT.format(dims="1 dim: 4 dim: 8 dim: 8") + CONV.format(conv="num_output: 4 kernel_size: 3") + RELU
        + 'layer { name: "other" type: "ReLU" bottom: "data" top: "conv" }\n',
        {"conv": _conv_w(4, 4, 3)}, GraphError, r"layer 'other' writes blob 'conv', which layer 'relu' already"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_create_quant_config_and_convert_model_refuse_the_model(case, tmp_path):
    text, blobs, error, message = CASES[case]
    proto, weights = _write(tmp_path, text, blobs)
    with pytest.raises(error, match=message):
        amct.create_quant_config(str(tmp_path / "config.json"), str(proto), str(weights))
    record = tmp_path / "record.txt"
    record.write_text(RECORD)
    with pytest.raises(error, match=message):
        amct.convert_model(str(proto), str(weights), str(record), str(tmp_path / "out/m"))
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "out").exists()


def test_a_valid_model_of_the_same_kind_is_accepted(tmp_path):
    text = INPUT.format(dims="1 dim: 4 dim: 8 dim: 8") + CONV.format(conv="num_output: 4 kernel_size: 3") + RELU
    proto, weights = _write(tmp_path, text, {"conv": _conv_w(4, 4, 3)})
    amct.create_quant_config(str(tmp_path / "config.json"), str(proto), str(weights))
    record = tmp_path / "record.txt"
    record.write_text(RECORD)
    paths = amct.convert_model(str(proto), str(weights), str(record), str(tmp_path / "out/m"))
    assert amct_io.load_weights(paths["deploy_weights"])["conv"][0].dtype == np.int8


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_embedded_runtime_refuses_the_model_with_the_librarys_error(case, tmp_path):
    """Net(prototxt, caffemodel), which `amct-caffe run` and a user's calibration script build, refuses the same
    models with an AmctError (a negative or absurd input dimension used to reach numpy's ValueError)."""
    from amct_caffe import AmctError
    from amct_caffe.runtime import TEST, Net

    text, blobs, _, message = CASES[case]
    proto, weights = _write(tmp_path, text, blobs)
    with pytest.raises(AmctError) as caught:
        Net(str(proto), str(weights), TEST)
    if "input dimension" in case:
        assert caught.match(message)


def test_a_forward_input_beyond_int_max_elements_is_refused(tmp_path):
    from amct_caffe.runtime import TEST, Net

    text = X8 + CONV.format(conv="num_output: 4 kernel_size: 3")
    proto, weights = _write(tmp_path, text, {"conv": _conv_w(4, 4, 3)})
    net = Net(str(proto), str(weights), TEST)
    with pytest.raises(GraphError, match=r"Blob.reshape: the shape \[1, 4, 65536, 65536\] has more than 2147483647"):
        net.blobs["data"].reshape(1, 4, 65536, 65536)


@pytest.mark.parametrize("algo", ["arq", "snq"])
def test_weights_that_cannot_be_quantized_are_refused_naming_the_layer(tmp_path, algo):
    """A weight near float32's maximum gives an illegal ARQ scale (its INT8 step would exceed 2^23 steps of the
    range); the error names the layer, which the algorithm itself does not know."""
    from amct_caffe.quant import QuantizationError

    weight = _conv_w(4, 4, 3)
    weight[0][1, 2, 0, 0] = 1e38
    proto, weights = _write(tmp_path, X8 + CONV.format(conv="num_output: 4 kernel_size: 3"), {"conv": weight})
    config = tmp_path / "config.json"
    cfg = tmp_path / "snq.cfg"
    cfg.write_text('override_layer_configs { layer_name: "conv" calibration_config {\n'
                   '  snq_quantize { channel_wise: true }\n'
                   '  ifmr_quantize { search_range_start: 0.7 search_range_end: 1.3 search_step: 0.01\n'
                   '                  max_percentile: 0.999999 min_percentile: 0.999999 num_bits: 8 } } }\n')
    amct.create_quant_config(str(config), str(proto), str(weights),
                             config_defination=str(cfg) if algo == "snq" else None)
    graph = amct.init(str(config), str(proto), str(weights), str(tmp_path / "record.txt"))
    with pytest.raises(QuantizationError, match=r"layer 'conv' \(Convolution\), its weights: .*scale is illegal"):
        amct.weights_quantize_model(graph, str(tmp_path / "mod.prototxt"), str(tmp_path / "mod.caffemodel"))
    assert not (tmp_path / "mod.prototxt").exists() and not (tmp_path / "mod.caffemodel").exists()


@pytest.mark.parametrize(("variance", "factor", "message"), [
    (-1.0, 1.0, r"variance \+ eps is -0.99999 in channel 1 \(1 channel\(s\) not positive: variance blob -1"),
    (2.0, -1.0, r"variance \+ eps is -1.99999 in channel 0 \(4 channel\(s\) not positive: .*moving-average factor -1"),
])
def test_a_batchnorm_with_corrupt_statistics_is_refused_before_its_fusion(tmp_path, variance, factor, message):
    """Folded, a BatchNorm whose variance + eps is not positive gives NaN / inf weights (Caffe computes NaN
    outputs); it is refused naming the layer, without numpy's RuntimeWarning (sqrt of a negative)."""
    import warnings

    from amct_caffe.api.workflow import calibrate

    bn = 'layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }\n'
    var = np.full(4, 2.0, np.float32)
    if factor > 0:
        var[1] = variance
    blobs = {"conv": _conv_w(4, 4, 3), "bn": [np.zeros(4, np.float32), var, np.array([factor], np.float32)]}
    proto, weights = _write(tmp_path, X8 + CONV.format(conv="num_output: 4 kernel_size: 3") + bn, blobs)
    x = np.random.default_rng(0).random((1, 4, 8, 8)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(WeightsError, match=r"layer 'bn' \(BatchNorm\): its " + message):
            calibrate(str(proto), str(weights), [{"data": x}], str(tmp_path / "q" / "m"), 1, progress=False)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("layer", [CONV.format(conv="num_output: 2147483647 kernel_size: 3"),
                                   'layer { name: "conv" type: "InnerProduct" bottom: "data" top: "conv" '
                                   'inner_product_param { num_output: 2000000000 } }\n'])
def test_a_learned_blob_beyond_int_max_elements_is_refused_before_it_is_allocated(layer):
    """A num_output near 2^31 without weights (a net to train, its blobs filled): Caffe's Blob::Reshape refuses
    the weight blob; numpy was asked for terabytes and raised MemoryError, naming nothing."""
    from amct_caffe.io.graph_io import graph_from_net
    from amct_caffe.runtime import TEST, Net
    from amct_caffe.runtime.shapes import infer_shapes

    net = amct_io.parse_prototxt_text('name: "z"\n' + X8 + layer, "z.prototxt")
    message = r"layer 'conv' \((Convolution|InnerProduct)\): its learned blob 0 of shape \[\d+, .*more than 2147483647"
    with pytest.raises(GraphError, match=message):
        Net(net, phase=TEST)
    with pytest.raises(GraphError, match=message):
        infer_shapes(graph_from_net(net, {}), strict=True, have_weights=False)


def test_a_float_model_overflowing_on_the_data_is_refused_naming_its_blob(tmp_path):
    """An Exp of inputs near 100 is infinite in float32: the IFMR layer that meets those values is amct_caffe's,
    so the error also names the user's blob and the layer whose input it is."""
    from amct_caffe.api.workflow import calibrate
    from amct_caffe.errors import AmctError

    text = (X8 + 'layer { name: "exp" type: "Exp" bottom: "data" top: "e" }\n'
            + CONV.format(conv="num_output: 4 kernel_size: 3").replace('bottom: "data"', 'bottom: "e"'))
    proto, weights = _write(tmp_path, text, {"conv": _conv_w(4, 4, 3)})
    x = np.full((1, 4, 8, 8), 100.0, np.float32)
    with pytest.raises(AmctError, match=r"inf or NaN: blob 'e', the input of 'conv', holds infinite or NaN values "
                                        r"in the float model on this data"):
        calibrate(str(proto), str(weights), [{"data": x}], str(tmp_path / "q" / "m"), 1, progress=False)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("ltype, param", [("Scale", "scale_param { axis: 5 }"), ("Bias", "bias_param { axis: 5 }")])
def test_an_axis_out_of_range_names_the_layer_once(ltype, param):
    from amct_caffe.runtime import TEST, Net

    text = ('name: "z"\n' + INPUT.format(dims="2 dim: 3") +
            f'layer {{ name: "sc" type: "{ltype}" bottom: "data" top: "sc" {param} }}\n')
    with pytest.raises(GraphError, match=rf"^layer 'sc' \({ltype}\): axis 5 is out of range for a 2-D blob$"):
        Net(amct_io.parse_prototxt_text(text, "z.prototxt"), phase=TEST)


def test_a_layer_without_a_type_is_told_to_give_one():
    from amct_caffe import UnsupportedLayerError
    from amct_caffe.runtime import TEST, Net

    text = 'name: "z"\n' + INPUT.format(dims="2 dim: 3") + 'layer { name: "r" type: "" bottom: "data" top: "r" }\n'
    with pytest.raises(UnsupportedLayerError, match=r"^layer 'r' gives no type: set its type \(type: \"ReLU\", say\)"):
        Net(amct_io.parse_prototxt_text(text, "z.prototxt"), phase=TEST)
