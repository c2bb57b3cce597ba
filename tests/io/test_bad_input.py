"""Bad input raises the library's own errors, naming file and layer, and writes nothing."""

import numpy as np
import pytest

import amct_caffe as amct

from amct_caffe import AmctError, ModelFormatError, UnsupportedLayerError, WeightsError, io, uninplace_model
from amct_caffe.runtime import TEST, Net
from tests.golden import MODELS

LENET = MODELS / "lenet_mnist/lenet.prototxt"
LENET_W = MODELS / "lenet_mnist/lenet_iter_10000.caffemodel"
pytestmark = pytest.mark.skipif(not MODELS.exists(), reason="../shared/models not beside the repository")


def test_malformed_prototxt_names_file_line_and_layer(tmp_path):
    bad = tmp_path / "bad.prototxt"
    text = LENET.read_text()
    bad.write_text(text.replace("stride: 1\n    weight_filler", "stride: 1\n    weight_filer", 1))
    out = tmp_path / "out.prototxt"
    with pytest.raises(ModelFormatError) as e:
        uninplace_model(str(bad), str(out))
    msg = str(e.value)
    assert str(bad) in msg and "weight_filer" in msg and "layer 'conv1'" in msg
    assert not out.exists()


def test_unknown_field_suggests_custom_proto(tmp_path):
    bad = tmp_path / "custom.prototxt"
    bad.write_text('layer { name: "x" type: "MyLayer" my_layer_param { k: 1 } }')
    with pytest.raises(ModelFormatError, match="set_caffe_proto"):
        io.read_prototxt(bad)


def test_truncated_caffemodel(tmp_path):
    cut = tmp_path / "cut.caffemodel"
    cut.write_bytes(LENET_W.read_bytes()[: LENET_W.stat().st_size // 2])
    with pytest.raises(WeightsError) as e:
        Net(str(LENET), str(cut), TEST)
    assert str(cut) in str(e.value)


def test_not_a_caffemodel(tmp_path):
    junk = tmp_path / "junk.caffemodel"
    junk.write_bytes(b"\xff\xfe this is not protobuf \x00\x01")
    with pytest.raises(WeightsError, match="junk.caffemodel"):
        io.load_weights(junk)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ModelFormatError, match="nope.prototxt"):
        io.read_prototxt(tmp_path / "nope.prototxt")
    with pytest.raises(WeightsError, match="nope.caffemodel"):
        io.load_weights(tmp_path / "nope.caffemodel")


def test_layer_without_weights_is_named(tmp_path, caplog):
    """A parameterized layer the caffemodel has no blobs for runs on its fillers, as in Caffe (fine-tuning a
    new layer), and a warning names it; the guide's flow refuses it (a quantized model needs its weights)."""
    renamed = tmp_path / "renamed.prototxt"
    renamed.write_text(LENET.read_text().replace('name: "ip2"', 'name: "ip2_new"'))
    caplog.set_level("WARNING", logger="amct_caffe")
    Net(str(renamed), str(LENET_W), TEST)
    assert "'ip2_new' (InnerProduct): the caffemodel has no weights for this layer" in caplog.text
    with pytest.raises(WeightsError) as e:
        amct.create_quant_config(str(tmp_path / "c.json"), str(renamed), str(LENET_W))
    assert "'ip2_new'" in str(e.value) and "no weights" in str(e.value)


def test_weights_of_layers_absent_from_prototxt_are_ignored_like_caffe(tmp_path, caplog):
    """Caffe ignores source layers the target lacks (e.g. loss layers of a train model)."""
    net, weights = io.load_model(MODELS / "lenet_mnist/lenet_train_test.prototxt", LENET_W)
    assert "ip2" in weights


def test_mismatched_blob_shape_names_layer_and_shapes(tmp_path):
    changed = tmp_path / "changed.prototxt"
    changed.write_text(LENET.read_text().replace("num_output: 500", "num_output: 400"))
    with pytest.raises(WeightsError) as e:
        Net(str(changed), str(LENET_W), TEST)
    msg = str(e.value)
    assert "'ip1'" in msg and "[500, 800]" in msg and "[400, 800]" in msg


def test_unknown_layer_type_lists_known_types(tmp_path):
    odd = tmp_path / "odd.prototxt"
    odd.write_text(LENET.read_text().replace('type: "ReLU"', 'type: "FancyReLU"'))
    with pytest.raises(UnsupportedLayerError) as e:
        Net(str(odd), TEST)
    msg = str(e.value)
    assert "'relu1'" in msg and "FancyReLU" in msg and "Convolution" in msg


def test_errors_share_one_base():
    for err in (ModelFormatError, WeightsError, UnsupportedLayerError):
        assert issubclass(err, AmctError)


def test_failed_write_leaves_no_file(tmp_path):
    out = tmp_path / "x.caffemodel"
    with pytest.raises(RuntimeError):
        with io.atomic_output(out) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_fp16_raw_blobs_are_read_as_float32(tmp_path):
    """OpenCV stores halved weights as raw_data + raw_data_type FLOAT16 (field numbers 12 and 10)."""
    from amct_caffe.io.opencv_blobs import _variant_net_class
    from amct_caffe.io.schema import caffe_pb

    schema = caffe_pb()
    base_file = schema.pool.FindMessageTypeByName(f"{schema.package}.NetParameter").file.name
    net_cls = _variant_net_class(schema.package, base_file)
    half = tmp_path / "half.caffemodel"
    msg = net_cls()
    _, weights = io.load_model(LENET, LENET_W)
    for name, arrays in weights.items():
        layer = msg.layer.add(name=name, type="X")
        for arr in arrays:
            blob = layer.blobs.add()
            blob.shape.dim.extend(arr.shape)
            blob.raw_data_type = 2  # FLOAT16
            blob.raw_data = arr.astype("<f2").tobytes()
    half.write_bytes(msg.SerializeToString())
    loaded = io.load_weights(half)
    for name, arrays in weights.items():
        for a, b in zip(arrays, loaded[name], strict=False):
            assert b.dtype == np.float32
            assert np.array_equal(b, a.astype(np.float16).astype(np.float32))
