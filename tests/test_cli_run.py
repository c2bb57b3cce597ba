"""amct-caffe run on every kind of data calibrate reads (images, LMDB, arrays), and --save."""

import re

import numpy as np
import pytest

from amct_caffe import cli
from amct_caffe.data import ImageFolder, Preprocess
from tests.data.common import IMAGENET, needs_imagenet

from .test_cli import LENET, LENET_WEIGHTS, MNIST_SAMPLE, _tiny_imagenet_model

MNIST_500 = MNIST_SAMPLE / "mnist_500.npz"
LENET_RUN = ["run", "--model", str(LENET), "--weights", str(LENET_WEIGHTS), "--no-progress"]


pytestmark = pytest.mark.usefixtures("cli_scratch_dir")


@needs_imagenet
def test_run_on_an_image_folder_with_calibrates_preprocessing(capsys, tmp_path):
    """--resize / --crop / per-channel --mean as calibrate applies them; the last, smaller batch runs too."""
    model, weights = _tiny_imagenet_model(tmp_path)  # global average pooling: the mean of each channel
    code = cli.main(["run", "--model", str(model), "--weights", str(weights), "--input", str(IMAGENET),
                     "--resize", "256", "--crop", "224", "--mean", "104", "117", "123", "--select", "::100",
                     "--batch-size", "3", "--save", "out/pool.npz", "--show", "2", "--no-progress"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert [line.split(":")[0] for line in out] == ["sample 0", "sample 1", "saved pool for 10 samples"]
    with np.load(tmp_path / "out/pool.npz") as z:
        assert list(z) == ["pool"]
        saved = z["pool"]
    assert saved.shape == (10, 3, 1, 1)
    spec = Preprocess(short_side=256, crop=(224, 224), mean=(104, 117, 123))
    images = ImageFolder(IMAGENET, {"data": (1, 3, 224, 224)}, spec, batch_size=10).select(step=100).batch(0)["data"]
    np.testing.assert_allclose(saved[:, :, 0, 0], images.mean(axis=(2, 3)), rtol=1e-5, atol=1e-4)
    first = re.match(r"sample 0: top-3 \[(\d):(\S+),", out[0])
    assert int(first.group(1)) == int(np.argmax(saved[0, :, 0, 0]))


def _mnist_lmdb(path, images, labels) -> None:
    lmdb = pytest.importorskip("lmdb")
    from amct_caffe.io.schema import caffe_pb

    with lmdb.open(str(path), map_size=1 << 24) as env, env.begin(write=True) as txn:
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            d = caffe_pb().Datum()
            d.channels, d.height, d.width = 1, *image.shape
            d.data = image.tobytes()
            d.label = int(label)
            txn.put(b"%08d" % i, d.SerializeToString())


def test_run_on_an_lmdb_uses_its_labels_and_matches_the_arrays(capsys, tmp_path):
    with np.load(MNIST_500) as z:
        images, labels = z["images"][:50], z["labels"][:50]
    _mnist_lmdb(tmp_path / "db", images, labels)
    np.savez(tmp_path / "digits.npz", images=images, labels=labels)
    args = ["--scale", "0.00390625", "--batch-size", "16", "--show", "1"]
    assert cli.main(LENET_RUN + ["--input", "db", "--save", "lmdb.npz", *args]) == 0
    from_lmdb = capsys.readouterr().out
    assert cli.main(LENET_RUN + ["--input", "digits.npz", "--save", "arrays.npz", *args]) == 0
    from_arrays = capsys.readouterr().out
    assert re.search(r"^top-1 accuracy on 50 samples: 100.00%$", from_lmdb, re.M), from_lmdb
    assert from_lmdb.replace("lmdb.npz", "") == from_arrays.replace("arrays.npz", "")
    assert f"label {labels[0]}" in from_lmdb
    with np.load("lmdb.npz") as a, np.load("arrays.npz") as b:
        assert list(a) == ["prob"] and a["prob"].shape == (50, 10)
        np.testing.assert_array_equal(a["prob"], b["prob"])


def test_no_accuracy_is_computed_on_a_feature_map(capsys, tmp_path):
    """--output conv1 on labelled digits printed 'top-1 accuracy on 4 samples: 0.00%': the argmax of 11,520
    feature values taken for a class."""
    assert cli.main(LENET_RUN + ["--input", str(MNIST_500), "--scale", "0.00390625", "--limit", "4",
                                 "--output", "conv1", "--show", "0"]) == 0
    out = capsys.readouterr().out
    assert "top-1 accuracy on" not in out
    assert "blob 'conv1' holds [20, 24, 24] values per sample, not one score per class: no top-1 accuracy" in out


def test_run_select_limit_and_save_of_one_blob(capsys, tmp_path):
    assert cli.main(LENET_RUN + ["--input", str(MNIST_500), "--scale", "0.00390625", "--select", "1::2",
                                 "--limit", "7", "--batch-size", "3", "--output", "ip2", "--save", "ip2.npz",
                                 "--show", "0"]) == 0
    assert capsys.readouterr().out.splitlines() == ["top-1 accuracy on 7 samples: 100.00%",
                                                    "saved ip2 for 7 samples: ip2.npz"]
    with np.load("ip2.npz") as z, np.load(MNIST_500) as digits:
        assert list(z) == ["ip2"] and z["ip2"].shape == (7, 10)
        assert list(z["ip2"].argmax(axis=1)) == list(digits["labels"][1:15:2])


def test_run_save_and_input_errors(capsys, tmp_path):
    from .test_cli_errors import fails

    (tmp_path / "dir.npz").mkdir()
    data = LENET_RUN + ["--input", str(MNIST_500)]
    fails(capsys, data + ["--save", "out.txt"], "--save out.txt: expected a .npz file name")
    fails(capsys, data + ["--save", "dir.npz"], "--save dir.npz is a directory")
    fails(capsys, LENET_RUN + ["--input", "no_folder"], "--input no_folder does not exist")
    fails(capsys, data + ["--select", "600:"], "--select 600: leaves none of the 500 sample")
    fails(capsys, data + ["--crop", "20"], "apply to images")
    assert not (tmp_path / "out.txt").exists()
    # --save onto the input (or into an input folder) is refused before any forward
    copy = tmp_path / "digits.npz"
    copy.write_bytes(MNIST_500.read_bytes())
    fails(capsys, LENET_RUN + ["--input", str(copy), "--save", str(copy)],
          "output .*digits.npz is the same file as the input --input")
    assert copy.read_bytes() == MNIST_500.read_bytes()
    (tmp_path / "rec").mkdir()
    fails(capsys, LENET_RUN + ["--input", str(tmp_path / "rec"), "--save", str(tmp_path / "rec/batch_000003.npz")],
          "output .*batch_000003.npz is inside the input folder --input")


def test_run_prints_and_saves_a_detection_list(capsys, tmp_path):
    """A DetectionOutput top is a list of boxes per batch: run prints each sample's count and best box, and
    --save keeps one (1, 1, K, 7) list whose column 0 numbers the samples over the whole run."""
    from amct_caffe.api.outputs import write_graph
    from amct_caffe.runtime import TEST, Net
    from tests.api.test_compared_outputs import SSD
    from tests.passes.helpers import model

    graph, _ = model(SSD, seed=3)
    proto, weights = tmp_path / "ssd.prototxt", tmp_path / "ssd.caffemodel"
    write_graph(graph, str(proto), str(weights))
    x = np.random.default_rng(0).uniform(-1, 1, (5, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "x.npz", data=x)
    net = Net(str(proto), str(weights), TEST)
    want = []
    for i in range(5):
        rows = np.array(net.forward(data=x[i:i + 1])["detection_out"]).reshape(-1, 7)
        rows = rows[rows[:, 0] >= 0]
        rows[:, 0] = i
        want.append(rows)
    code = cli.main(["run", "--model", str(proto), "--weights", str(weights), "--input", str(tmp_path / "x.npz"),
                     "--batch-size", "2", "--save", str(tmp_path / "out.npz"), "--show", "2", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    for i in range(2):
        best = want[i][np.argmax(want[i][:, 2])]
        assert f"sample {i}: {len(want[i])} detection(s) in 'detection_out', best: label {int(best[1])} " \
               f"score {best[2]:.4f}" in out
    saved = np.load(tmp_path / "out.npz")["detection_out"]
    assert saved.shape == (1, 1, sum(len(w) for w in want), 7)
    np.testing.assert_allclose(saved.reshape(-1, 7), np.concatenate(want), rtol=1e-5, atol=1e-6)


def _fc_model(tmp_path, outputs: int, last: str, samples: int):
    """An InnerProduct of ``outputs`` values then the layer text ``last``, with random weights, and a .npz of
    ``samples`` inputs: (prototxt, caffemodel)."""
    from amct_caffe.api.outputs import write_graph
    from tests.passes.helpers import model

    text = ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 } } }\n'
            'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" '
            f'inner_product_param {{ num_output: {outputs} }} }}\n' + last)
    graph, _ = model(text)
    proto, weights = tmp_path / "m.prototxt", tmp_path / "m.caffemodel"
    write_graph(graph, str(proto), str(weights))
    np.savez(tmp_path / "x.npz", data=np.ones((samples, 4), np.float32))
    return proto, weights


def test_run_default_top_k_shows_every_class_of_a_two_class_output(capsys, tmp_path):
    proto, weights = _fc_model(tmp_path, 2, 'layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }\n', 2)
    base = ["run", "--model", str(proto), "--weights", str(weights), "--input", str(tmp_path / "x.npz"),
            "--no-progress"]
    assert cli.main(base) == 0
    assert re.search(r"sample 0: top-2 \[\d:\d\.\d{4}, \d:\d\.\d{4}\]", capsys.readouterr().out)
    assert cli.main([*base, "--top-k", "3"]) == 2
    assert "--top-k 3: blob 'prob' has 2 value(s) per sample; give a smaller --top-k" in capsys.readouterr().err


def test_run_on_an_output_without_a_row_per_sample(capsys, tmp_path):
    """A scalar output (a Reduction over everything) is not ranked, and --save keeps it batch by batch."""
    proto, weights = _fc_model(tmp_path, 3, 'layer { name: "total" type: "Reduction" bottom: "fc" top: "total" '
                                            'reduction_param { axis: 0 } }\n', 5)
    code = cli.main(["run", "--model", str(proto), "--weights", str(weights), "--input", str(tmp_path / "x.npz"),
                     "--batch-size", "2", "--save", str(tmp_path / "out.npz"), "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "blob 'total' has shape [] for a batch of 2, not one row per sample: nothing to rank" in out
    assert np.load(tmp_path / "out.npz")["total"].shape == (3,)  # batches of 2, 2 and 1


def test_labels_that_are_not_class_numbers_are_named(capsys, tmp_path, caplog):
    with np.load(MNIST_500) as digits:
        labels = digits["labels"][:6].astype(np.float32)
        labels[[1, 4]] = [np.nan, 12]  # LeNet has classes 0..9
        np.savez(tmp_path / "x.npz", data=digits["images"][:6, None].astype(np.float32), labels=labels)
    with caplog.at_level("WARNING", logger="amct_caffe"):
        assert cli.main(LENET_RUN + ["--input", str(tmp_path / "x.npz"), "--scale", "0.00390625", "--show", "0"]) == 0
    assert capsys.readouterr().out.splitlines() == ["top-1 accuracy on 6 samples: 66.67%"]
    assert "2 of 6 labels are not class numbers of the output (0 to 9): nan, 12.0; they count as misses" in caplog.text
