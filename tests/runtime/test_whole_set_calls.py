"""pycaffe's forward_all / forward_backward_all (runtime/batches.py) against official pycaffe on LeNet, and
caffe.Classifier (runtime/classifier.py) on MNIST digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import amct_caffe.runtime as caffe
from tests.real_caffe import pycaffe_dir, run_with_pycaffe

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
LENET = SHARED / "models" / "lenet_mnist" / "lenet.prototxt"
WEIGHTS = SHARED / "models" / "lenet_mnist" / "lenet_iter_10000.caffemodel"


def _digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(SHARED / "data" / "mnist_5k.npz") as z:
        return z["images"][:n].astype(np.float32) * np.float32(0.00390625), z["labels"][:n]


# LeNet's batch is 64: 150 samples are two whole batches and one of 22 completed with zeros
SCRIPT = """
import numpy as np
net = caffe.Net({model!r}, {weights!r}, caffe.TEST)
x = np.load({inputs!r})["x"]
dy = np.load({inputs!r})["dy"]
out = net.forward_all(blobs=["ip1"], data=x)
outs, diffs = net.forward_backward_all(data=x, prob=dy)
np.savez({path!r}, prob=out["prob"], ip1=out["ip1"], fb_prob=outs["prob"], fb_data=diffs["data"])
"""


def _script(tmp_path, name) -> str:
    return SCRIPT.format(model=str(LENET), weights=str(WEIGHTS), inputs=str(tmp_path / "inputs.npz"),
                         path=str(tmp_path / name))


@pytest.mark.real_caffe
def test_forward_all_and_forward_backward_all_match_pycaffe(tmp_path):
    if pycaffe_dir() is None:
        pytest.skip("AMCT_REAL_CAFFE is not set")
    x, _ = _digits(150)
    x = x[:, np.newaxis]
    dy = np.random.default_rng(0).standard_normal((150, 10)).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", x=x, dy=dy)
    proc = run_with_pycaffe("import caffe\n" + _script(tmp_path, "theirs.npz"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    exec(_script(tmp_path, "ours.npz"), {"caffe": caffe})  # noqa: S102 - the test's own script
    with np.load(tmp_path / "theirs.npz") as theirs, np.load(tmp_path / "ours.npz") as ours:
        for key in theirs.files:
            assert ours[key].shape == theirs[key].shape, key
            scale = float(np.abs(theirs[key]).max())
            np.testing.assert_allclose(ours[key], theirs[key], rtol=0, atol=1e-5 * scale, err_msg=key)
        assert ours["prob"].shape == (150, 10) and ours["fb_data"].shape == (150, 1, 28, 28)


def test_forward_all_drops_the_padding_and_keeps_the_order():
    net = caffe.Net(str(LENET), str(WEIGHTS), caffe.TEST)
    x, _ = _digits(70)
    x = x[:, np.newaxis]
    whole = net.forward_all(data=x)["prob"]
    assert whole.shape == (70, 10)
    np.testing.assert_array_equal(whole[:64], net.forward(data=x[:64])["prob"])
    assert net.forward_all()["prob"].shape == (64, 10)  # no arrays: one forward of the blobs as they are


def test_classifier_predicts_digits():
    pytest.importorskip("skimage.transform")
    x, labels = _digits(200)
    images = [im[:, :, np.newaxis] for im in x]
    classifier = caffe.Classifier(str(LENET), str(WEIGHTS))  # image_dims: the input's 28 x 28
    plain = classifier.predict(images, oversample=False)
    assert plain.shape == (200, 10)
    direct = caffe.Net(str(LENET), str(WEIGHTS), caffe.TEST).forward_all(data=x[:, np.newaxis])["prob"]
    np.testing.assert_allclose(plain, direct, atol=1e-5)  # the same digits (the resize to 28 x 28 keeps them)
    assert np.mean(np.argmax(plain, axis=1) == labels) > 0.97
    # resized to 32 x 32, ten 28 x 28 crops each, averaged: (N, classes), still the digits
    ten = caffe.Classifier(str(LENET), str(WEIGHTS), image_dims=(32, 32)).predict(images[:50])
    assert ten.shape == (50, 10)
    np.testing.assert_allclose(ten.sum(axis=1), 1.0, atol=1e-5)
    assert np.mean(np.argmax(ten, axis=1) == labels[:50]) > 0.9
