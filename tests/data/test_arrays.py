""".npy / .npz sources: the real MNIST subset, naming rules, normalisation, batching."""

from pathlib import Path

import numpy as np
import pytest

from amct_caffe.data import ArrayData, DataError, Preprocess, model_inputs, open_source
from tests.data.common import MNIST, needs_mnist

LENET = Path(__file__).resolve().parents[2] / "samples/mnist/lenet.prototxt"


@needs_mnist
def test_mnist_npz_gets_channel_axis_scale_and_order():
    inputs = {"data": (64, 1, 28, 28)}
    src = ArrayData(MNIST, inputs, scale=0.00390625, batch_size=64)
    with np.load(MNIST) as z:
        images, labels = z["images"], z["labels"]
    assert src.num_samples == 5000 and len(src) == 78  # 5000 = 78 * 64 + 8: the tail is not served
    np.testing.assert_array_equal(src.labels, labels)
    batches = list(src.batches(2))
    assert [b["data"].shape for b in batches] == [(64, 1, 28, 28)] * 2
    assert batches[0]["data"].dtype == np.float32
    np.testing.assert_array_equal(batches[1]["data"][:, 0], images[64:128] / np.float32(256))
    every_tenth = src.select(step=10)
    assert every_tenth.num_samples == 500
    np.testing.assert_array_equal(every_tenth.batch(0)["data"][:, 0], images[0:640:10] / np.float32(256))


@needs_mnist
def test_open_source_on_mnist_with_lenet_inputs():
    src = open_source(MNIST, model_inputs(LENET), batch_size=10)
    assert src.inputs == ("data",) and src.batch(0)["data"].shape == (10, 1, 28, 28)
    assert src.batch(0)["data"].max() == 255  # no scale given: raw bytes as float


def test_npy_and_named_npz_and_mean_std_per_channel(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 3, 2, 2)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    src = ArrayData(tmp_path / "x.npy", {"data": (1, 3, 2, 2)}, mean=(1, 2, 3), std=(1, 2, 4), scale=3,
                    batch_size=3)
    assert len(src) == 2
    want = (x[3:6] - np.array([1, 2, 3]).reshape(1, 3, 1, 1)) / np.array([1, 2, 4]).reshape(1, 3, 1, 1) * 3
    np.testing.assert_allclose(src.batch(1)["data"], want, rtol=1e-6)

    y = rng.normal(size=(7, 5)).astype(np.float64)
    np.savez(tmp_path / "two.npz", im_info=y, data=x, labels=np.arange(7))
    two = ArrayData(tmp_path / "two.npz", {"data": (1, 3, 2, 2), "im_info": (1, 5)}, batch_size=7)
    batch = two.batch(0)
    assert list(batch) == ["data", "im_info"] and batch["im_info"].dtype == np.float32
    np.testing.assert_array_equal(batch["im_info"], y.astype(np.float32))
    in_memory = ArrayData({"data": x}, ["data"], batch_size=2).select(1, None, 3)
    np.testing.assert_array_equal(in_memory.batch(0)["data"], x[[1, 4]])


def test_array_errors(tmp_path):
    x = np.zeros((4, 3, 2, 2), np.float32)
    np.savez(tmp_path / "a.npz", a=x, b=x)
    with pytest.raises(DataError, match="no array named 'data'.*'a', 'b'"):
        ArrayData(tmp_path / "a.npz", ["data"])
    np.savez(tmp_path / "c.npz", data=x, info=np.zeros((3, 5)))
    with pytest.raises(DataError, match="different numbers of samples"):
        ArrayData(tmp_path / "c.npz", ["data", "info"])
    with pytest.raises(DataError, match=r"samples of shape \(3, 2, 2\) do not fit input 'data'"):
        ArrayData(tmp_path / "c.npz", {"data": (1, 3, 4, 4)})
    with pytest.raises(DataError, match="does not exist"):
        ArrayData(tmp_path / "nope.npz", ["data"])
    (tmp_path / "x.txt").write_text("1 2 3")
    with pytest.raises(DataError, match="expected .npy or .npz"):
        ArrayData(tmp_path / "x.txt", ["data"])
    with pytest.raises(DataError, match="2 mean values given, but the data has 3 channels"):
        ArrayData({"data": x}, ["data"], mean=(1, 2)).batch(0)
    with pytest.raises(DataError, match="4 sample"):
        list(ArrayData({"data": x}, ["data"], batch_size=3).batches(2))
    with pytest.raises(DataError, match="batch_size"):
        ArrayData({"data": x}, ["data"], batch_size=0)
    with pytest.raises(DataError, match="resize, crop and channel order apply to images"):
        open_source(tmp_path / "c.npz", {"data": None}, preprocess=Preprocess(crop=2))


def test_too_few_selected_samples_say_how_many_the_file_holds(tmp_path):
    """With --select the message said the file held the selected count ('mn.npz holds 13 sample(s)')."""
    np.savez(tmp_path / "mn.npz", data=np.zeros((128, 1, 28, 28), np.float32))
    source = open_source(str(tmp_path / "mn.npz"), {"data": (64, 1, 28, 28)}, batch_size=64).select(None, None, 10)
    with pytest.raises(DataError, match=r"array file .*mn.npz holds 128 sample\(s\), 13 of them selected: 1 "
                                        r"batches of 64 need 64"):
        list(source.batches(1))


def test_a_npy_for_a_net_of_two_inputs_says_to_give_a_npz(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 3), np.float32))
    with pytest.raises(DataError, match=r"x.npy: a .npy holds one array, and the net takes 2 inputs \('x', 'cont'\): "
                                        "give a .npz with one array named after each input"):
        open_source(str(tmp_path / "x.npy"), {"x": (4, 3), "cont": (4,)})
