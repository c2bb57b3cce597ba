"""Loading and saving an unchanged model reproduces it; legacy formats upgrade on load."""

import numpy as np
import pytest

from amct_caffe import io
from amct_caffe.io.schema import caffe_pb
from tests.golden import MODELS, SHARED
from tests.io.legacy import to_v1

PROTOTXTS = sorted(MODELS.glob("*/*.prototxt")) if MODELS.exists() else []
CAFFEMODELS = sorted([*MODELS.glob("*/*.caffemodel"), *(SHARED / "golden").glob("*.caffemodel")]) \
    if MODELS.exists() else []
LENET = MODELS / "lenet_mnist/lenet.prototxt"
LENET_W = MODELS / "lenet_mnist/lenet_iter_10000.caffemodel"
needs_shared = pytest.mark.skipif(not MODELS.exists(), reason="../shared/models not beside the repository")


@needs_shared
@pytest.mark.parametrize("path", PROTOTXTS, ids=lambda p: p.parent.name + "/" + p.name)
def test_prototxt_round_trip(path, tmp_path):
    net = io.read_prototxt(path)
    out = tmp_path / "out.prototxt"
    io.write_prototxt(net, out)
    assert io.read_prototxt(out) == net


@needs_shared
@pytest.mark.parametrize("path", CAFFEMODELS, ids=lambda p: p.parent.name + "/" + p.name)
def test_caffemodel_round_trip_is_byte_exact(path, tmp_path):
    """Unknown fields (some files come from other Caffe forks) survive too."""
    net = io.read_caffemodel(path)
    out = tmp_path / "out.caffemodel"
    io.write_caffemodel(net, out)
    assert out.read_bytes() == path.read_bytes()


@needs_shared
def test_weights_survive_array_round_trip_bit_exact(tmp_path):
    net, weights = io.load_model(LENET, LENET_W)
    out = tmp_path / "w.caffemodel"
    io.write_caffemodel(io.net_to_caffemodel(net, weights), out)
    again = io.load_weights(out)
    assert list(again) == list(weights)
    for name in weights:
        for a, b in zip(weights[name], again[name], strict=False):
            assert a.dtype == b.dtype == np.float32
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_integer_and_double_blobs_round_trip():
    arrays = [np.arange(-5, 5, dtype=np.int8).reshape(2, 5), np.array([1, -2**31, 2**31 - 1], np.int32),
              np.array([2**64 - 1, 0, 12345678901234], np.uint64), np.linspace(0, 1, 7),
              np.float32([[1.5, -2.25]])]
    for arr in arrays:
        blob = caffe_pb().BlobProto()
        io.array_to_blob(arr, blob)
        parsed = caffe_pb().BlobProto.FromString(blob.SerializeToString())
        back = io.blob_to_array(parsed, "test")
        assert back.shape == arr.shape
        expect = arr.astype(np.float32) if arr.dtype == np.float64 else arr
        assert back.dtype == expect.dtype and np.array_equal(back, expect)


@pytest.mark.parametrize("arr", [np.zeros(0, np.float32), np.float32([np.nan, -0.0, 1e-45, 3.4e38]),
                                 np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32),
                                 np.linspace(-1, 1, 200), np.arange(40000, dtype=np.float32)])
def test_float_blobs_are_written_as_field_by_field_extends_would(arr):
    """array_to_blob parses the packed bytes; the message equals (and serializes as) extend()'s."""
    fast, slow = caffe_pb().BlobProto(), caffe_pb().BlobProto()
    io.array_to_blob(arr, fast)
    slow.shape.dim.extend(arr.shape)
    (slow.double_data if arr.dtype == np.float64 else slow.data).extend(arr.ravel().tolist())
    assert fast.SerializeToString() == slow.SerializeToString()


@needs_shared
def test_v1_model_upgrades_to_the_same_network(tmp_path):
    current = io.read_prototxt(LENET)
    weights_msg = io.read_caffemodel(LENET_W)
    v1_proto, v1_weights = tmp_path / "v1.prototxt", tmp_path / "v1.caffemodel"
    io.write_prototxt(to_v1(current), v1_proto)
    io.write_caffemodel(to_v1(weights_msg), v1_weights)
    assert "layers {" in v1_proto.read_text() and "type: CONVOLUTION" in v1_proto.read_text()

    net_new, w_new = io.load_model(LENET, LENET_W)
    net_old, w_old = io.load_model(v1_proto, v1_weights)
    # Caffe names the layer made from the legacy input fields "input"
    assert net_old.layer[0].name == "input" and net_new.layer[0].name == "data"
    net_old.layer[0].name = "data"
    assert [(lp.name, lp.type, list(lp.bottom), list(lp.top)) for lp in net_old.layer] == \
           [(lp.name, lp.type, list(lp.bottom), list(lp.top)) for lp in net_new.layer]
    for a, b in zip(net_old.layer, net_new.layer, strict=False):
        for field in ("convolution_param", "pooling_param", "inner_product_param", "input_param"):
            assert getattr(a, field) == getattr(b, field), (a.name, field)
    assert list(w_old) == list(w_new)
    for name in w_new:
        for a, b in zip(w_old[name], w_new[name], strict=False):
            assert np.array_equal(a, b)


def test_legacy_input_fields_become_one_input_layer():
    net = io.parse_prototxt_text('''
        name: "legacy"
        input: "data"  input_dim: 1 input_dim: 3 input_dim: 12 input_dim: 12
        input: "rois"  input_dim: 5 input_dim: 5 input_dim: 1 input_dim: 1
        layer { name: "relu" type: "ReLU" bottom: "data" top: "data" }''', "legacy.prototxt")
    assert io.upgrade_net(net, "legacy.prototxt")
    first = net.layer[0]
    assert (first.name, first.type, list(first.top)) == ("input", "Input", ["data", "rois"])
    assert [list(s.dim) for s in first.input_param.shape] == [[1, 3, 12, 12], [5, 5, 1, 1]]
    assert not len(net.input) and not len(net.input_dim)
    assert net.layer[1].name == "relu"


@needs_shared
def test_phase_filtering_keeps_test_layers():
    net = io.load_prototxt(MODELS / "lenet_mnist/lenet_train_test.prototxt", io.TEST)
    names = [lp.name for lp in net.layer]
    assert names.count("mnist") == 1
    assert "accuracy" in names
    data = net.layer[names.index("mnist")]
    assert data.include[0].phase == io.TEST
    train = io.load_prototxt(MODELS / "lenet_mnist/lenet_train_test.prototxt", io.TRAIN)
    assert "accuracy" not in [lp.name for lp in train.layer]


def test_stage_and_level_rules():
    net = io.parse_prototxt_text('''
        state { level: 2 stage: "deploy" }
        layer { name: "a" type: "ReLU" include { stage: "deploy" } }
        layer { name: "b" type: "ReLU" include { min_level: 3 } }
        layer { name: "c" type: "ReLU" exclude { not_stage: "deploy" } }
        layer { name: "d" type: "ReLU" exclude { phase: TEST max_level: 2 } }''', "s.prototxt")
    io.filter_phase(net, io.TEST)
    assert [lp.name for lp in net.layer] == ["a", "c"]


def test_a_net_read_from_a_file_takes_level_0_as_pycaffe_does(tmp_path):
    """pycaffe's Net(file, phase, level=0) sets the level over the file's state.level (net.cpp), while the stages
    add up; a solver's net keeps the level its state gives (filter_phase(level=None))."""
    from amct_caffe.runtime import TEST, Net

    text = ('state { level: 2 stage: "deploy" }\n'
            'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } }\n'
            'layer { name: "low" type: "Sigmoid" bottom: "x" top: "y" include { max_level: 1 } }\n'
            'layer { name: "high" type: "TanH" bottom: "x" top: "y" include { min_level: 2 } }\n'
            'layer { name: "staged" type: "ReLU" bottom: "y" top: "y" include { stage: "deploy" } }\n')
    path = tmp_path / "levels.prototxt"
    path.write_text(text)
    assert list(Net(str(path), TEST).layer_dict) == ["x", "low", "staged"]
    solver_view = io.parse_prototxt_text(text, "levels.prototxt")
    io.filter_phase(solver_view, io.TEST)
    assert [lp.name for lp in solver_view.layer] == ["x", "high", "staged"]


@needs_shared
def test_v1_model_runs_identically(tmp_path):
    from amct_caffe.runtime import TEST, Net

    v1_proto, v1_weights = tmp_path / "v1.prototxt", tmp_path / "v1.caffemodel"
    io.write_prototxt(to_v1(io.read_prototxt(LENET)), v1_proto)
    io.write_caffemodel(to_v1(io.read_caffemodel(LENET_W)), v1_weights)
    x = np.random.default_rng(3).random((64, 1, 28, 28), dtype=np.float32)
    new = Net(str(LENET), str(LENET_W), TEST).forward(data=x)["prob"]
    old = Net(str(v1_proto), str(v1_weights), TEST).forward(data=x)["prob"]
    np.testing.assert_array_equal(old, new)


V0_NET = '''
name: "v0"
input: "data"  input_dim: 2 input_dim: 1 input_dim: 8 input_dim: 8
layers { layer { name: "pad1" type: "padding" pad: 1 } bottom: "data" top: "pad1" }
layers { layer { name: "conv1" type: "conv" num_output: 3 kernelsize: 3 stride: 1
                 weight_filler { type: "gaussian" std: 0.1 } biasterm: true } bottom: "pad1" top: "conv1" }
layers { layer { name: "relu1" type: "relu" } bottom: "conv1" top: "conv1" }
layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 2 stride: 2 } bottom: "conv1" top: "pool1" }
layers { layer { name: "ip1" type: "innerproduct" num_output: 4 biasterm: false } bottom: "pool1" top: "ip1" }
layers { layer { name: "prob" type: "softmax" } bottom: "ip1" top: "prob" }
'''


def test_v0_net_upgrades_with_padding_folded_into_the_conv(tmp_path):
    from amct_caffe.runtime import TEST, Net

    path = tmp_path / "v0.prototxt"
    path.write_text(V0_NET)
    net = io.load_prototxt(path)
    types = [(lp.name, lp.type) for lp in net.layer]
    assert types == [("input", "Input"), ("conv1", "Convolution"), ("relu1", "ReLU"), ("pool1", "Pooling"),
                     ("ip1", "InnerProduct"), ("prob", "Softmax")]
    conv = net.layer[1]
    assert list(conv.bottom) == ["data"]  # the padding layer is gone ...
    assert list(conv.convolution_param.pad) == [1]  # ... and its pad moved into the conv
    assert conv.convolution_param.num_output == 3 and list(conv.convolution_param.kernel_size) == [3]
    assert net.layer[3].pooling_param.pool == net.layer[3].pooling_param.AVE
    assert not net.layer[4].inner_product_param.bias_term
    out = Net(str(path), TEST).forward(data=np.ones((2, 1, 8, 8), np.float32))["prob"]
    assert out.shape == (2, 4)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-6)
