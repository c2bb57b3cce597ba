"""amct-caffe compare on the bundled LeNet: exit status, the report's files, printed figures = report.json's."""

import json

import numpy as np
import pytest

from amct_caffe import cli
from amct_caffe.runtime import TEST, Net

from .test_cli import LENET, LENET_WEIGHTS, MNIST_SAMPLE
from .test_cli_errors import fails

MNIST_500 = MNIST_SAMPLE / "mnist_500.npz"


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """LeNet quantized on 2 batches of 32 digits: (fake-quant model, weights)."""
    from amct_caffe.api.workflow import calibrate
    from amct_caffe.data import ArrayData

    out = tmp_path_factory.mktemp("quantized")
    batches = ArrayData(MNIST_500, {"data": (32, 1, 28, 28)}, scale=0.00390625, batch_size=32).batches(2)
    result = calibrate(str(LENET), str(LENET_WEIGHTS), batches, str(out / "lenet"), 2, progress=False)
    return result["fake_quant_model"], result["fake_quant_weights"]


pytestmark = pytest.mark.usefixtures("cli_scratch_dir")


def _compare(quantized, *extra) -> list[str]:
    return ["compare", "--model", str(LENET), "--weights", str(LENET_WEIGHTS), "--quant-model", quantized[0],
            "--quant-weights", quantized[1], "--data", str(MNIST_500), "--scale", "0.00390625", "--no-progress",
            *extra]


def test_compare_prints_the_figures_of_report_json(capsys, tmp_path, quantized):
    """(Plots take seconds: one report, with --dump.)"""
    assert cli.main(_compare(quantized, "--select", "64:", "--batch-size", "50", "--batch-num", "3",
                             "--output", "report", "--dump")) == 0
    out = capsys.readouterr().out.splitlines()
    for name in ("report.json", "report.html", "layer_error.png"):
        assert (tmp_path / "report" / name).is_file(), name
    summary = json.loads((tmp_path / "report/report.json").read_text())["summary"]
    assert summary["samples"] == 150 and set(summary["outputs"]) == {"prob"}
    worst = summary["most_sensitive_layers"][:3]
    assert out == [
        f"FP32 vs quantized on 150 samples, {summary['blobs_compared']} blobs compared",
        f"worst output cosine: {summary['worst_output_cosine']:.10f} (prob)",
        f"top-1 agreement: {100 * summary['top1_agreement']:.2f}%",
        "layers adding the most error (rise in 1 - cosine): " + ", ".join(f"{w['layer']} {w['error_added']:.3e}"
                                                                  for w in worst),
        "blobs of the first sample: report/fp32_blobs.npz, report/quant_blobs.npz",
        "report: report/report.html (figures: report/report.json)"]
    assert 0.999 < summary["worst_output_cosine"] < 1 and summary["top1_agreement"] > 0.99
    assert [w["layer"] for w in worst][0] in {"conv1", "pool1", "conv2", "pool2", "ip1", "ip2", "prob"}
    with np.load(tmp_path / "report/fp32_blobs.npz") as fp32, np.load(MNIST_500) as digits:
        assert fp32["data"].shape == (1, 1, 28, 28)  # the first sample of the selection
        np.testing.assert_allclose(fp32["data"][0, 0], digits["images"][64] * np.float32(0.00390625))


def test_compare_errors_are_one_line(capsys, tmp_path, quantized):
    (tmp_path / "file").write_text("")
    fails(capsys, _compare(quantized, "--output", "file"), "--output file is a file, not a folder")
    fails(capsys, _compare(quantized, "--output", "r", "--batch-num", "20"), "500 sample.*need 1280")
    bad = _compare(quantized, "--output", "r")
    bad[bad.index("--quant-weights") + 1] = "none.caffemodel"
    fails(capsys, bad, "quantized weights file none.caffemodel does not exist")
    (tmp_path / "images").mkdir()  # a report written into the data folder would be read as data next time
    images = _compare(quantized, "--output", "images")
    images[images.index("--data") + 1] = "images"
    fails(capsys, images, "output folder images is the input folder --data [(]images[)]")
    assert not list((tmp_path / "images").iterdir())
    itself = _compare((str(LENET), str(LENET_WEIGHTS)), "--output", "r")
    assert cli.main(itself) == 0  # the float model against itself: every cosine 1
    assert "worst output cosine: 1.0000000000 (prob)" in capsys.readouterr().out
    assert not (tmp_path / "file").read_text()


def test_a_report_into_a_per_input_image_folder_is_refused(capsys, tmp_path):
    """A two-input model's image folder holds one sub-folder per input, each read as data: the report's plots
    there would change the data (the next run finds the sub-folders' counts differ), so it is refused."""
    from PIL import Image

    model = tmp_path / "two.prototxt"
    model.write_text("".join(f'layer {{ name: "{n}" type: "Input" top: "{n}" input_param {{ shape {{ dim: 1 dim: 3 '
                             f'dim: 8 dim: 8 }} }} }}\n' for n in ("a", "b")) +
                     'layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" }\n'
                     'layer { name: "c" type: "Convolution" bottom: "sum" top: "c" convolution_param { num_output: 2 '
                     'kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }\n')
    weights = tmp_path / "two.caffemodel"
    Net(str(model), TEST, seed=1).save(str(weights))
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "data" / name / f"{i}.png")
    args = ["compare", "--model", str(model), "--weights", str(weights), "--quant-model", str(model),
            "--quant-weights", str(weights), "--data", str(tmp_path / "data"), "--output", str(tmp_path / "data/a")]
    fails(capsys, args, "output folder .*data/a is the input folder --data [(]input 'a'[)]")
    assert sorted(p.name for p in (tmp_path / "data" / "a").iterdir()) == ["0.png", "1.png"]
    args[-1] = str(tmp_path / "report")
    assert cli.main(args) == 0
