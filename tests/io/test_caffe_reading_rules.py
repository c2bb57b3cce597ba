"""Blobs and caffemodels read as Caffe reads them (src/caffe/blob.cpp ``Blob::FromProto``), and the
inputs Caffe would take but quantization cannot (non-UTF-8 text, NaN / Inf weights) refused by name."""

import numpy as np
import pytest

from amct_caffe import WeightsError, io
from amct_caffe.io.schema import caffe_pb
from amct_caffe.runtime import TEST, Net
from tests.golden import MODELS

LENET = MODELS / "lenet_mnist/lenet.prototxt"
LENET_W = MODELS / "lenet_mnist/lenet_iter_10000.caffemodel"
needs_models = pytest.mark.skipif(not LENET_W.exists(), reason="../shared/models not beside the repository")


def _blob(**fields):
    blob = caffe_pb().BlobProto()
    for name, value in fields.items():
        if name == "dims":
            blob.shape.dim.extend(value)
        elif name in ("data", "double_data"):
            getattr(blob, name).extend(value)
        else:
            setattr(blob, name, value)
    return blob


def _model(tmp_path, *blobs, name="model.caffemodel", layer="conv"):
    net = caffe_pb().NetParameter()
    net.layer.add(name=layer, type="Convolution").blobs.extend(blobs)
    path = tmp_path / name
    path.write_bytes(net.SerializeToString())
    return path


# ------------------------------------------------------------------------------------------ values
def test_double_data_wins_over_data_as_in_caffe(tmp_path):
    """Caffe's FromProto copies double_data when it is non-empty, whatever data holds."""
    blob = _blob(dims=[2], data=[1.0, 2.0], double_data=[3.0, 4.0])
    assert io.blob_to_array(blob, "b").tolist() == [3.0, 4.0]
    weights = io.load_weights(_model(tmp_path, blob))
    assert weights["conv"][0].tolist() == [3.0, 4.0] and weights["conv"][0].dtype == np.float32


def test_double_data_is_counted_even_when_data_has_the_right_count():
    blob = _blob(dims=[2], data=[1.0, 2.0], double_data=[3.0])
    with pytest.raises(WeightsError, match=r"needs 2 values but the file holds 1"):
        io.blob_to_array(blob, "b")


# ------------------------------------------------------------------------------------------ shapes
def test_blob_without_shape_or_legacy_dims_is_a_scalar(tmp_path):
    """No shape and no num/channels/height/width: Caffe reshapes to a 0-axis blob of count 1."""
    blob = _blob(data=[0.25])
    assert io.blob_shape(blob) == ()
    arr = io.load_weights(_model(tmp_path, blob))["conv"][0]
    assert arr.shape == () and float(arr) == 0.25


def test_scalar_blob_with_several_values_is_refused_naming_layer_and_blob(tmp_path):
    path = _model(tmp_path, _blob(dims=[1], data=[1.0]), _blob(data=[1.0, 2.0, 3.0]), layer="scale1")
    with pytest.raises(WeightsError) as e:
        io.load_weights(path)
    msg = str(e.value)
    assert str(path) in msg and "layer 'scale1' blob 1" in msg and "needs 1 values but the file holds 3" in msg


def test_empty_shape_message_is_a_scalar_too():
    assert io.blob_shape(_blob(dims=[], data=[5.0])) == ()
    blob = caffe_pb().BlobProto()
    blob.shape.SetInParent()
    blob.data.append(5.0)
    assert io.blob_to_array(blob, "b").shape == ()


def test_any_legacy_dim_makes_a_4d_blob_and_wins_over_shape():
    """Caffe: if any of num/channels/height/width is set, the shape is (num, channels, height, width),
    unset ones 0, and shape.dim is not looked at."""
    assert io.blob_shape(_blob(num=2, channels=3, height=1, width=1)) == (2, 3, 1, 1)
    assert io.blob_shape(_blob(width=4)) == (0, 0, 0, 4)
    both = _blob(dims=[6], num=1, channels=1, height=2, width=3, data=[0, 1, 2, 3, 4, 5])
    assert io.blob_to_array(both, "b").shape == (1, 1, 2, 3)


def test_negative_dimensions_are_refused():
    with pytest.raises(WeightsError, match=r"b: blob shape \[-1, -2\] has a negative dimension"):
        io.blob_to_array(_blob(dims=[-1, -2], data=[1.0, 2.0]), "b")
    with pytest.raises(WeightsError, match="negative dimension"):
        io.blob_to_array(_blob(num=-1, channels=-1, height=1, width=1, data=[1.0]), "b")


def test_count_beyond_caffes_int_limit_is_refused():
    with pytest.raises(WeightsError, match=r"b: blob shape \[2147483648, 2147483648\] is too large"):
        io.blob_to_array(_blob(dims=[2**31, 2**31], data=[1.0]), "b")
    # Caffe takes an empty blob of huge other dims; numpy cannot shape it, so it is refused too
    with pytest.raises(WeightsError, match="is too large"):
        io.blob_to_array(_blob(num=0, channels=2**31 - 1, height=2**31 - 1, width=1), "b")
    assert io.blob_to_array(_blob(dims=[0, 2**20, 2**10]), "b").shape == (0, 2**20, 2**10)


def test_opencv_raw_data_of_a_partial_value_is_refused():
    from amct_caffe.io.opencv_blobs import _variant_net_class

    schema = caffe_pb()
    base_file = schema.pool.FindMessageTypeByName(f"{schema.package}.NetParameter").file.name
    blob = _variant_net_class(schema.package, base_file)().layer.add().blobs.add()
    blob.shape.dim.append(2)
    blob.raw_data_type = 2  # FLOAT16
    blob.raw_data = b"\x00\x3c\x00"
    with pytest.raises(WeightsError, match="b: raw_data of type FLOAT16 holds 3 bytes"):
        io.blob_to_array(blob, "b")


# ------------------------------------------------------------------------------------------ text
def _renamed(tmp_path, old: bytes, new: bytes):
    net = caffe_pb().NetParameter()
    net.layer.add(name="ok", type="ReLU")
    layer = net.layer.add(name="conv", type="Convolution", bottom=["data"])
    layer.blobs.append(_blob(dims=[1], data=[1.0]))
    path = tmp_path / "text.caffemodel"
    data = net.SerializeToString()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))
    return path


@pytest.mark.parametrize("old, new, field", [
    (b"\x04conv", b"\x04\xffonv", "name"),
    (b"\x0bConvolution", b"\x0bConv\xc0lution", "type"),
    (b"\x04data", b"\x04d\xe2\x82a", "bottom[0]"),
])
def test_string_field_not_utf8_names_file_and_layer(tmp_path, old, new, field):
    path = _renamed(tmp_path, old, new)
    for read in (io.read_caffemodel, io.load_weights):
        with pytest.raises(WeightsError) as e:
            read(path)
        msg = str(e.value)
        assert str(path) in msg and f"layer #1 (counting from 0): its {field} is not valid UTF-8" in msg


def test_net_name_not_utf8_is_named(tmp_path):
    net = caffe_pb().NetParameter(name="lenet")
    net.layer.add(name="conv", type="Convolution").blobs.append(_blob(dims=[1], data=[1.0]))
    path = tmp_path / "name.caffemodel"
    path.write_bytes(net.SerializeToString().replace(b"lenet", b"len\xfft"))
    with pytest.raises(WeightsError, match=r"name.caffemodel: name is not valid UTF-8 text \(b'len\\xfft'\)"):
        io.load_weights(path)


# ------------------------------------------------------------------------------------------ NaN / Inf
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_weights_are_refused_naming_layer_and_blob(tmp_path, bad):
    path = _model(tmp_path, _blob(dims=[2], data=[1.0, 2.0]), _blob(dims=[2, 2], data=[0.0, 1.0, bad, 3.0]))
    with pytest.raises(WeightsError) as e:
        io.load_weights(path)
    msg = str(e.value)
    assert f"{path}: layer 'conv' blob 1 holds NaN/Inf: 1 of its 4 values" in msg and "index [1, 0]" in msg


def test_double_beyond_float32_range_is_refused(tmp_path):
    path = _model(tmp_path, _blob(dims=[1], double_data=[1e300]))
    with pytest.raises(WeightsError, match="blob 0 holds NaN/Inf"):
        io.load_weights(path)


def _lenet_with_nan(tmp_path):
    net = io.read_caffemodel(LENET_W)
    layer = next(layer for layer in net.layer if layer.name == "ip1")
    layer.blobs[1].data[7] = float("nan")
    path = tmp_path / "nan.caffemodel"
    path.write_bytes(net.SerializeToString())
    return path


@needs_models
def test_nan_weights_are_refused_by_quantization_and_run_by_the_executor(tmp_path, caplog):
    """io.load_model (behind the quantization API) refuses, by name; the executor's Net loads the model, as
    pycaffe does, with a warning naming the blob, and its outputs are NaN as Caffe's (a diverged model can
    still be run to find the layer that went wrong)."""
    import numpy as np

    from amct_caffe.api.session import load_float_graph

    path = _lenet_with_nan(tmp_path)
    for load in (lambda: io.load_model(LENET, path), lambda: load_float_graph(LENET, path)):
        with pytest.raises(WeightsError, match=r"nan.caffemodel: layer 'ip1' blob 1 holds NaN/Inf: 1 of its 500"):
            load()
    net = Net(str(LENET), str(path), TEST)
    assert any("layer 'ip1' blob 1 holds NaN/Inf" in r.getMessage() for r in caplog.records)
    assert np.isnan(net.params["ip1"][1].data[7])
    x = np.random.default_rng(0).uniform(0, 1, net.blobs["data"].data.shape).astype(np.float32)
    assert np.isnan(net.forward(data=x)["prob"]).all()  # the NaN bias reaches every class through ip2


@needs_models
def test_a_layer_the_caffemodel_lists_without_its_blobs_is_refused(tmp_path):
    """Caffe's CopyTrainedLayersFrom aborts ("Incompatible number of blobs for layer ip2") on a caffemodel entry
    with no blob for a layer that has parameters; the executor had run ip2 on filler weights. Parameter-free
    layers listed without blobs (as Caffe saves every ReLU) stay fine."""
    net = io.read_caffemodel(LENET_W)
    layer = next(layer for layer in net.layer if layer.name == "ip2")
    del layer.blobs[:]
    assert any(not len(other.blobs) for other in net.layer)  # e.g. relu1, as Caffe saves it
    path = tmp_path / "empty.caffemodel"
    path.write_bytes(net.SerializeToString())
    with pytest.raises(WeightsError, match=r"layer 'ip2' \(InnerProduct\): the caffemodel has 0 blob\(s\) but the "
                                           r"prototxt needs 2 \(Caffe: Incompatible number of blobs\)"):
        Net(str(LENET), str(path), TEST)
    reference = Net(str(LENET), str(LENET_W), TEST)
    reference.copy_from(str(LENET_W))
    with pytest.raises(WeightsError, match="Incompatible number of blobs"):
        reference.copy_from(str(path))


def test_a_caffemodel_naming_a_layer_twice_gives_the_last_weights(tmp_path, caplog):
    """A layer a prototxt defines once per phase is saved twice with the same blobs (a retrain model of such a
    prototxt): read as one, with no word; different blobs under one name warn, and the last ones count, as
    Caffe's CopyTrainedLayersFrom copies each in turn."""
    import numpy as np

    from amct_caffe import io as amct_io

    def model(second):
        net = amct_io.parse_prototxt_text('layer { name: "bn" type: "BatchNorm" } layer { name: "bn" type: '
                                          '"BatchNorm" }', "m.prototxt")
        first = [np.array([1.0, 2.0], np.float32), np.array([3.0, 4.0], np.float32), np.array([1.0], np.float32)]
        msg = amct_io.net_to_caffemodel(net, {"bn": first})
        for blob, value in zip(msg.layer[1].blobs, second, strict=False):
            del blob.data[:]
            blob.data.extend(value)
        if not len(msg.layer[1].blobs):
            msg.layer[1].blobs.extend(msg.layer[0].blobs)
            for blob, value in zip(msg.layer[1].blobs, second, strict=True):
                del blob.data[:]
                blob.data.extend(value)
        path = tmp_path / "m.caffemodel"
        path.write_bytes(msg.SerializeToString())
        return path

    with caplog.at_level("WARNING", logger="amct_caffe"):
        same = amct_io.load_weights(model([[1.0, 2.0], [3.0, 4.0], [1.0]]))
    assert list(same) == ["bn"] and "carry different weights" not in caplog.text
    with caplog.at_level("WARNING", logger="amct_caffe"):
        other = amct_io.load_weights(model([[5.0, 6.0], [7.0, 8.0], [2.0]]))
    assert other["bn"][0].tolist() == [5.0, 6.0] and "two layers named 'bn' carry different weights" in caplog.text


def test_an_hdf5_snapshot_is_named_as_such(tmp_path):
    """Caffe's snapshot_format HDF5 writes .caffemodel.h5 files; given as a caffemodel, the error says so."""
    from amct_caffe import io as amct_io
    from amct_caffe.errors import WeightsError

    path = tmp_path / "snap_iter_3.caffemodel.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(WeightsError, match=r"an HDF5 file \(Caffe's snapshot_format: HDF5\), which is not read"):
        amct_io.load_weights(path)
