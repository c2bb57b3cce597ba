"""A prototxt text parsed or printed before is read back from the message it stands for: the same
message as text_format's parser gives, never one a caller changed since."""

import pytest
from google.protobuf import text_format

from amct_caffe import io
from amct_caffe.errors import ModelFormatError
from amct_caffe.io import files
from amct_caffe.io.schema import caffe_pb
from tests.golden import MODELS

TEXT = """name: "n"
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
"""


def _parsed(text):
    msg = caffe_pb().NetParameter()
    text_format.Parse(text, msg)
    return msg


def test_a_text_parsed_again_is_the_same_fresh_message(tmp_path):
    path = tmp_path / "a.prototxt"
    path.write_text(TEXT)
    first = io.read_prototxt(path)
    first.layer[0].name = "changed"  # a caller's change (upgrade, phase filtering) is not remembered
    second = io.read_prototxt(path)
    assert second == _parsed(TEXT)
    assert second.layer[0].name == "conv"


def test_a_printed_text_reads_back_as_the_printed_message(tmp_path):
    net = _parsed(TEXT)
    net.layer[0].convolution_param.weight_filler.std = 1e-7
    path = tmp_path / "b.prototxt"
    io.write_prototxt(net, path)
    assert (type(net), path.read_text()) in files._TEXTS
    assert io.read_prototxt(path) == net == _parsed(path.read_text())


def test_unknown_fields_are_not_read_back(tmp_path):
    """text_format does not print them, so the text does not stand for them."""
    layer = caffe_pb().LayerParameter()
    layer.MergeFromString(_parsed(TEXT).layer[1].SerializeToString() + bytes([0xF8, 0xFF, 0x7F, 0x01]))
    net = caffe_pb().NetParameter()
    net.layer.add().CopyFrom(layer)
    path = tmp_path / "c.prototxt"
    io.write_prototxt(net, path)
    again = io.read_prototxt(path)
    assert again == _parsed(path.read_text())
    assert again.SerializeToString() != net.SerializeToString()


def test_a_text_with_nan_is_parsed(tmp_path):
    """A NaN's payload is not in its text: the parser's NaN is the one the file stands for."""
    net = _parsed(TEXT)
    net.layer[0].convolution_param.weight_filler.std = float("nan")
    path = tmp_path / "d.prototxt"
    io.write_prototxt(net, path)
    assert (type(net), path.read_text()) not in files._TEXTS


def test_parsing_into_a_message_with_fields_parses_the_text():
    """Not a copy of the remembered message: the parser refuses a second `name`."""
    io.parse_prototxt_text(TEXT, "<t>")
    target = caffe_pb().NetParameter()
    target.name = "other"
    with pytest.raises(ModelFormatError, match="name"):
        io.parse_prototxt_text(TEXT, "<t>", target)


@pytest.mark.skipif(not MODELS.exists(), reason="../shared/models not beside the repository")
def test_models_print_as_text_format_prints_them():
    """Layer by layer, the layers printed before from the cache, a NetParameter with blobs too."""
    paths = sorted(MODELS.glob("*/*.prototxt"))
    for path in paths + paths:  # the second time from the cache
        net = io.read_prototxt(path)
        assert files.message_text(net) == text_format.MessageToString(net), path
    net, weights = io.load_model(MODELS / "lenet_mnist/lenet.prototxt",
                                 MODELS / "lenet_mnist/lenet_iter_10000.caffemodel")
    full = io.net_to_caffemodel(net, weights)
    full.input.append("x")
    assert files.message_text(full) == text_format.MessageToString(full)
