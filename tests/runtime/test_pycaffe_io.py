"""pycaffe's caffe.io as amct_caffe.runtime.io (runtime/io.py): the protobuf conversions, Transformer and
oversample against official pycaffe's on the same arrays; load_image / resize_image against scikit-image, which
pycaffe's call."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import amct_caffe.runtime as caffe
from amct_caffe.errors import AmctError
from tests.real_caffe import pycaffe_dir, run_with_pycaffe

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
MEAN = SHARED / "data" / "ilsvrc_2012_mean.npy"
PHOTO = sorted((SHARED / "data" / "imagenet_samples").iterdir())[0]

# The same calls in official pycaffe and here; each result is saved by name. (pycaffe's array_to_datum of a uint8
# array calls ndarray.tostring, which numpy 2 removed: that case is checked by the round trip below.)
SCRIPT = """
import numpy as np
rng = np.random.default_rng(3)
image = rng.random((227, 227, 3)).astype(np.float32)
mean = np.load({mean!r})[:, :227, :227]
out = {{}}
t = caffe.io.Transformer({{"data": (1, 3, 227, 227)}})
t.set_transpose("data", (2, 0, 1))
t.set_channel_swap("data", (2, 1, 0))
t.set_raw_scale("data", 255)
t.set_mean("data", mean)
t.set_input_scale("data", 0.017)
out["pre"] = t.preprocess("data", image)
out["de"] = t.deprocess("data", out["pre"][np.newaxis])
t2 = caffe.io.Transformer({{"data": (1, 3, 227, 227)}})
t2.set_mean("data", np.array([104.0, 117.0, 123.0]))
t2.set_transpose("data", (2, 0, 1))
out["pre_channel_mean"] = t2.preprocess("data", image * 255)
out["crops"] = caffe.io.oversample([image, image[::-1]], (201, 200))
arr = rng.standard_normal((2, 3, 4)).astype(np.float32)
out["blob_bytes"] = np.frombuffer(caffe.io.array_to_blobproto(arr, arr * 2).SerializeToString(), np.uint8)
out["vector_bytes"] = np.frombuffer(caffe.io.arraylist_to_blobprotovector_str([arr, arr[0]]), np.uint8)
out["datum_f"] = np.frombuffer(caffe.io.array_to_datum(arr.astype(np.float64), 3).SerializeToString(), np.uint8)
np.savez({path!r}, **out)
"""


def _run_here(path: Path) -> None:
    exec(SCRIPT.format(mean=str(MEAN), path=str(path)), {"caffe": caffe})  # noqa: S102 - the test's own script


@pytest.mark.real_caffe
def test_the_same_calls_give_pycaffes_results(tmp_path):
    if pycaffe_dir() is None:
        pytest.skip("AMCT_REAL_CAFFE is not set")
    code = "import caffe\n" + SCRIPT.format(mean=str(MEAN), path=str(tmp_path / "theirs.npz"))
    proc = run_with_pycaffe(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _run_here(tmp_path / "ours.npz")
    with np.load(tmp_path / "theirs.npz") as theirs, np.load(tmp_path / "ours.npz") as ours:
        assert sorted(theirs.files) == sorted(ours.files)
        for key in theirs.files:
            assert ours[key].dtype == theirs[key].dtype, key
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_protobuf_conversions_round_trip():
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    blob = caffe.io.array_to_blobproto(arr, -arr)
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(blob), arr)
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(blob, return_diff=True), -arr)
    legacy = caffe.io.array_to_blobproto(arr)
    legacy.ClearField("shape")
    legacy.num, legacy.channels, legacy.height, legacy.width = 1, 2, 3, 4  # the 4-D fields win when set
    assert caffe.io.blobproto_to_array(legacy).shape == (1, 2, 3, 4)
    back = caffe.io.blobprotovector_str_to_arraylist(caffe.io.arraylist_to_blobprotovector_str([arr, arr[1]]))
    assert [a.shape for a in back] == [(2, 3, 4), (3, 4)]
    u8 = (arr * 20).astype(np.uint8)
    datum = caffe.io.array_to_datum(u8, label=4)
    assert datum.label == 4 and datum.data == u8.tobytes()
    np.testing.assert_array_equal(caffe.io.datum_to_array(datum), u8)
    np.testing.assert_array_equal(caffe.io.datum_to_array(caffe.io.array_to_datum(arr)), arr.astype(float))
    with pytest.raises(ValueError, match="Incorrect array shape"):
        caffe.io.array_to_datum(arr[0])


def test_preprocess_leaves_the_callers_image_alone():
    image = np.full((4, 5, 3), 0.5, np.float32)
    t = caffe.io.Transformer({"data": (1, 3, 4, 5)})
    t.set_transpose("data", (2, 0, 1))
    t.set_raw_scale("data", 255)
    assert t.preprocess("data", image).max() == pytest.approx(127.5)
    assert image.max() == 0.5


def test_load_image_is_scikit_images_reading(tmp_path):
    skimage_io = pytest.importorskip("skimage.io")
    from PIL import Image  # noqa: PLC0415

    rgb = caffe.io.load_image(str(PHOTO))
    want = skimage_io.imread(str(PHOTO)).astype(np.float64) / 255
    assert rgb.dtype == np.float32 and rgb.shape == want.shape
    np.testing.assert_allclose(rgb, want, atol=1e-7)
    grey = caffe.io.load_image(str(PHOTO), color=False)
    assert grey.shape == want.shape[:2] + (1,)
    weights = np.array([0.2125, 0.7154, 0.0721])  # scikit-image's rgb2gray
    np.testing.assert_allclose(grey[:, :, 0], want @ weights, atol=1e-6)
    rgba = np.dstack([np.uint8(np.arange(12).reshape(3, 4) * 20)] * 3 + [np.full((3, 4), 9, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_allclose(caffe.io.load_image(str(tmp_path / "a.png")), rgba[:, :, :3] / 255, atol=1e-7)
    Image.fromarray(rgba[:, :, 0], "L").save(tmp_path / "g.png")
    np.testing.assert_allclose(caffe.io.load_image(str(tmp_path / "g.png")), np.dstack([rgba[:, :, :1] / 255] * 3),
                               atol=1e-7)


def test_resize_image_on_the_images_range_and_other_channel_counts():
    transform = pytest.importorskip("skimage.transform")
    ndimage = pytest.importorskip("scipy.ndimage")
    image = np.random.default_rng(0).random((6, 8, 3)).astype(np.float32) * 200 - 50
    lo, hi = image.min(), image.max()
    want = transform.resize((image - lo) / (hi - lo), (9, 5), order=1, mode="constant") * (hi - lo) + lo
    got = caffe.io.resize_image(image, (9, 5))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(caffe.io.resize_image(np.full((3, 3, 1), 2.5), (4, 6)), np.full((4, 6, 1), 2.5))
    four = np.random.default_rng(1).random((6, 8, 4))
    np.testing.assert_allclose(caffe.io.resize_image(four, (12, 16)),
                               ndimage.zoom(four, (2.0, 2.0, 1), order=1).astype(np.float32))


def test_the_transformer_resizes_an_image_of_another_size():
    pytest.importorskip("skimage.transform")
    t = caffe.io.Transformer({"data": (1, 3, 10, 12)})
    t.set_transpose("data", (2, 0, 1))
    assert t.preprocess("data", np.random.default_rng(2).random((20, 24, 3))).shape == (3, 10, 12)


def test_a_missing_scikit_image_says_what_to_install(monkeypatch):
    for name in ("skimage", "skimage.io"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of it fails, as where it is not installed
    with pytest.raises(AmctError, match=r"caffe.io.load_image uses skimage, as pycaffe's does: pip install "
                                        r"\"amct_caffe\[pycaffe\]\""):
        caffe.io.load_image(str(PHOTO))


def test_a_transformer_checks_its_arguments_as_pycaffes():
    t = caffe.io.Transformer({"data": (1, 3, 4, 4)})
    with pytest.raises(Exception, match="other is not one of the net inputs"):
        t.set_raw_scale("other", 2)
    with pytest.raises(Exception, match="Transpose order needs"):
        t.set_transpose("data", (1, 0))
    with pytest.raises(ValueError, match="Mean channels incompatible"):
        t.set_mean("data", np.zeros(4))
    assert json.dumps(t.inputs)  # plain data, as pycaffe keeps it


def test_caffe_pb2_is_reachable_as_in_pycaffe():
    from amct_caffe.runtime.io import Transformer  # noqa: PLC0415 - importable as a module, as caffe.io is
    from amct_caffe.runtime.proto import caffe_pb2  # noqa: PLC0415

    assert Transformer is caffe.io.Transformer
    mean = caffe_pb2.BlobProto.FromString(caffe.io.array_to_blobproto(np.ones((1, 3, 2, 2))).SerializeToString())
    assert caffe.io.blobproto_to_array(mean).shape == (1, 3, 2, 2)  # a mean file's usual reading
    assert caffe.io.caffe_pb2.Datum is caffe_pb2.Datum


def test_caffe_pb2_has_the_top_level_enums_and_imports_as_a_module():
    """pycaffe scripts write caffe_pb2.TRAIN / TEST / Phase.Name(...) and ``import caffe.proto.caffe_pb2``."""
    import amct_caffe.runtime.proto.caffe_pb2 as as_module  # noqa: PLC0415
    from amct_caffe.runtime.proto import caffe_pb2  # noqa: PLC0415

    for pb2 in (caffe_pb2, as_module):
        assert (pb2.TRAIN, pb2.TEST) == (0, 1) == (caffe.TRAIN, caffe.TEST)
        assert pb2.Phase.Name(1) == "TEST" and pb2.Phase.Value("TRAIN") == 0
        assert pb2.NetState(phase=pb2.TEST).phase == 1
    with pytest.raises(AttributeError, match="'NoSuchThing' is not defined"):
        caffe_pb2.NoSuchThing  # noqa: B018


def test_net_takes_pycaffes_level_and_stages(tmp_path):
    """pycaffe's Net(file, phase, level=0, stages=None, weights=None): the level and stages choose the layers."""
    model = tmp_path / "m.prototxt"
    model.write_text(
        'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } }\n'
        'layer { name: "always" type: "ReLU" bottom: "x" top: "a" }\n'
        'layer { name: "staged" type: "ReLU" bottom: "x" top: "s" include { stage: "extra" } }\n'
        'layer { name: "high" type: "ReLU" bottom: "x" top: "h" include { min_level: 2 } }\n')
    assert caffe.Net(str(model), caffe.TEST)._layer_names == ["x", "always"]
    assert caffe.Net(str(model), caffe.TEST, stages=["extra"])._layer_names == ["x", "always", "staged"]
    assert caffe.Net(str(model), caffe.TEST, level=3)._layer_names == ["x", "always", "high"]
    with pytest.raises(AmctError, match="level must be an integer and stages strings"):
        caffe.Net(str(model), caffe.TEST, stages=[1])


def test_blob_loss_weights_as_pycaffe_lists_them(tmp_path):
    """pycaffe's Net.blob_loss_weights: every blob, 0.0 unless a layer makes it a loss (a loss layer's default 1,
    a loss_weight given)."""
    model = tmp_path / "m.prototxt"
    model.write_text(
        'layer { name: "x" type: "Input" top: "x" top: "t" input_param { shape { dim: 2 dim: 3 } shape { dim: 2 '
        'dim: 3 } } }\n'
        'layer { name: "p" type: "Power" bottom: "x" top: "p" loss_weight: 0.25 }\n'
        'layer { name: "loss" type: "EuclideanLoss" bottom: "p" bottom: "t" top: "loss" }\n')
    weights = caffe.Net(str(model), caffe.TRAIN).blob_loss_weights
    assert list(weights.items()) == [("x", 0.0), ("t", 0.0), ("p", 0.25), ("loss", 1.0)]


def test_bad_calls_of_the_blob_and_net_api_get_the_librarys_errors(tmp_path):
    model = tmp_path / "m.prototxt"
    model.write_text(
        'layer { name: "x" type: "Input" top: "x" top: "t" input_param { shape { dim: 2 dim: 3 } shape { dim: 2 '
        'dim: 3 } } }\n'
        'layer { name: "p" type: "Power" bottom: "x" top: "p" }\n'
        'layer { name: "loss" type: "EuclideanLoss" bottom: "p" bottom: "t" top: "loss" }\n')
    net = caffe.Net(str(model), caffe.TRAIN)
    for bad in (("a",), (2.5, 3), (True, 3)):
        with pytest.raises(AmctError, match="Blob.reshape: dimensions must be integers"):
            net.blobs["x"].reshape(*bad)
    net.forward()
    with pytest.raises(AmctError, match=r"the diff of 'loss' has shape \[2\], the blob \[\]"):
        net.backward(loss=np.ones(2, np.float32))
    with pytest.raises(AmctError, match=r"backward\(diffs=...\): \['nosuch'\] are not blobs"):
        net.backward(diffs=["nosuch"])
    with pytest.raises(AmctError, match="blob 'loss' holds one value .*not one per sample"):
        net.forward_all(x=np.zeros((5, 3), np.float32), t=np.zeros((5, 3), np.float32))


def test_net_takes_level_and_stages_positionally_as_pycaffe(tmp_path):
    """pycaffe's Net(file, phase, level, stages, weights) positionally, besides (file, weights, phase): a level
    of 0 was taken for the phase (TRAIN)."""
    model = tmp_path / "m.prototxt"
    model.write_text(
        'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } }\n'
        'layer { name: "tr" type: "ReLU" bottom: "x" top: "t" include { phase: TRAIN } }\n'
        'layer { name: "te" type: "ReLU" bottom: "x" top: "e" include { phase: TEST } }\n'
        'layer { name: "dep" type: "ReLU" bottom: "x" top: "d" include { stage: "deploy" } }\n'
        'layer { name: "lv" type: "ReLU" bottom: "x" top: "l" include { min_level: 1 } }\n')
    assert caffe.Net(str(model), caffe.TEST, 0)._layer_names == ["x", "te"]
    assert caffe.Net(str(model), caffe.TEST, 1)._layer_names == ["x", "te", "lv"]
    assert caffe.Net(str(model), caffe.TEST, 1, ["deploy"])._layer_names == ["x", "te", "dep", "lv"]
    with pytest.raises(AmctError, match="5 positional arguments"):
        caffe.Net(str(model), caffe.TEST, 0, [], None, 1)


def test_a_memory_data_output_stays_a_view_of_the_users_arrays(tmp_path):
    """A MemoryData top that is a net output is a view of the arrays given to set_input_arrays, as in Caffe; the
    next batch must not be written into the previous arrays (the output-memory rule did, for arrays of exactly
    one batch)."""
    model = tmp_path / "m.prototxt"
    model.write_text('layer { name: "m" type: "MemoryData" top: "data" top: "label" '
                     'memory_data_param { batch_size: 2 channels: 3 height: 1 width: 1 } }\n')
    net = caffe.Net(str(model), caffe.TEST)
    first = (np.arange(6, dtype=np.float32).reshape(2, 3, 1, 1), np.array([10, 11], np.float32))
    second = (np.full((2, 3, 1, 1), 7, np.float32), np.array([77, 78], np.float32))
    net.set_input_arrays(*first)
    net.forward()
    net.set_input_arrays(*second)
    net.forward()
    assert first[1].tolist() == [10, 11] and first[0].ravel().tolist() == list(range(6))
    assert net.blobs["label"].data.ravel().tolist() == [77, 78]
