"""The amct-caffe command line: `run` on the bundled MNIST sample; calibrate / convert with the API faked.

The calibrate and convert commands call ``amct_caffe.api.workflow.calibrate`` and
``amct_caffe.api.convert.convert_model``; here fake modules stand in for them, so these tests check
exactly what the command line passes (and prints), independently of the quantization pipeline.
"""

import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from amct_caffe import cli
from tests.data.common import IMAGENET, MNIST, needs_imagenet, needs_mnist

ROOT = Path(__file__).resolve().parents[1]
MNIST_SAMPLE = ROOT / "samples/mnist"
LENET = MNIST_SAMPLE / "lenet.prototxt"
LENET_WEIGHTS = MNIST_SAMPLE / "lenet_iter_10000.caffemodel"

IMAGE_NET_PROTOTXT = """name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 224 dim: 224 } } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool"
        pooling_param { pool: AVE global_pooling: true } }
"""


pytestmark = pytest.mark.usefixtures("cli_scratch_dir")


def _fake_module(monkeypatch, name: str, function: str, impl) -> None:
    module = types.ModuleType(name)
    setattr(module, function, impl)
    monkeypatch.setitem(sys.modules, name, module)


@pytest.fixture
def fake_calibrate(monkeypatch):
    calls = []

    def calibrate(model_file, weights_file, batches, save_path, batch_num, config_file=None,
                  config_defination=None, activation_offset=True, progress=True):
        fed = [dict(b) for b in batches]
        calls.append(dict(model_file=model_file, weights_file=weights_file, batches=fed, save_path=save_path,
                          batch_num=batch_num, config_file=config_file, config_defination=config_defination,
                          activation_offset=activation_offset, progress=progress))
        return {"fake_quant_model": f"{save_path}_fake_quant_model.prototxt",
                "deploy_model": f"{save_path}_deploy_model.prototxt"}

    _fake_module(monkeypatch, "amct_caffe.api.workflow", "calibrate", calibrate)
    return calls


def _tiny_imagenet_model(tmp_path):
    model = tmp_path / "tiny.prototxt"
    model.write_text(IMAGE_NET_PROTOTXT)
    weights = tmp_path / "tiny.caffemodel"
    weights.write_bytes(b"")
    return model, weights


def test_run_on_bundled_mnist_prints_accuracy(capsys):
    code = cli.main(["run", "--model", str(LENET), "--weights", str(LENET_WEIGHTS), "--input",
                     str(MNIST_SAMPLE / "mnist_500.npz"), "--scale", "0.00390625", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    m = re.search(r"^top-1 accuracy on 500 samples: (\d+\.\d\d)%$", out, re.M)
    assert m, out
    assert float(m.group(1)) == pytest.approx(99.80)
    assert out.startswith("sample 0: top-3 [0:")


@needs_mnist
def test_calibrate_npz_passes_batches_and_arguments(fake_calibrate, capsys, tmp_path):
    (tmp_path / "q.cfg").write_text("batch_num: 2\nactivation_offset: false\n")
    code = cli.main(["calibrate", "--model", str(LENET), "--weights", str(LENET_WEIGHTS),
                     "--data", str(MNIST),
                     "--batch-size", "8", "--batch-num", "2", "--scale", "0.00390625", "--select", "::10",
                     "--cfg", "q.cfg", "--no-activation-offset", "--output", "out/lenet", "--no-progress",
                     "--no-summary"])
    assert code == 0
    (call,) = fake_calibrate
    assert call["model_file"] == str(LENET) and call["weights_file"] == str(LENET_WEIGHTS)
    # the .cfg's batch_num and activation_offset apply: the API gets the defaults, which it ignores then
    assert call["save_path"] == "out/lenet" and call["batch_num"] == 1
    assert call["config_file"] is None and call["config_defination"] == "q.cfg"
    assert call["activation_offset"] is True
    assert call["progress"] is False
    assert len(call["batches"]) == 2
    with np.load(MNIST) as z:
        images = z["images"]
    for b, batch in enumerate(call["batches"]):
        assert list(batch) == ["data"] and batch["data"].shape == (8, 1, 28, 28)
        assert batch["data"].dtype == np.float32
        np.testing.assert_array_equal(batch["data"][:, 0], images[80 * b:80 * (b + 1):10] / np.float32(256))
    out = capsys.readouterr().out.splitlines()
    assert out == ["fake_quant_model: out/lenet_fake_quant_model.prototxt",
                   "deploy_model: out/lenet_deploy_model.prototxt"]


@needs_imagenet
def test_calibrate_image_folder_bgr_mean_crop(fake_calibrate, tmp_path):
    model, weights = _tiny_imagenet_model(tmp_path)
    (tmp_path / "c.json").write_text('{"batch_num": 3}')
    code = cli.main(["calibrate", "--model", str(model), "--weights", str(weights), "--data", str(IMAGENET),
                     "--batch-size", "2", "--batch-num", "3", "--resize", "256", "--crop", "224",
                     "--mean", "104", "117", "123", "--config", "c.json", "--output", "q", "--no-progress",
                     "--no-summary"])
    assert code == 0
    (call,) = fake_calibrate
    assert call["config_file"] == "c.json" and call["config_defination"] is None
    assert call["activation_offset"] is True
    batches = call["batches"]
    assert [b["data"].shape for b in batches] == [(2, 3, 224, 224)] * 3
    from PIL import Image

    rgb = np.asarray(Image.open(sorted(IMAGENET.iterdir())[0]).convert("RGB")).astype(np.float64)  # 256x341
    want = rgb[16:240, 58:282, ::-1].transpose(2, 0, 1) - np.array([104, 117, 123]).reshape(3, 1, 1)
    np.testing.assert_allclose(batches[0]["data"][0], want, atol=1e-4)


@needs_imagenet
def test_calibrate_images_default_to_input_size_and_rgb_std(fake_calibrate, tmp_path):
    model, weights = _tiny_imagenet_model(tmp_path)
    assert cli.main(["calibrate", "--model", str(model), "--weights", str(weights), "--data", str(IMAGENET),
                     "--input-shape", "data:1,3,32,48", "--channel-order", "rgb", "--std", "255",
                     "--batch-num", "1", "--output", "q", "--no-progress", "--no-summary"]) == 0
    batch = fake_calibrate[0]["batches"][0]["data"]
    assert batch.shape == (1, 3, 32, 48)  # batch size: the model's; size: the input's HxW
    assert 0 <= batch.min() and batch.max() <= 1


def test_calibrate_errors_exit_2_before_calling_the_api(fake_calibrate, capsys, tmp_path):
    np.savez(tmp_path / "few.npz", data=np.zeros((10, 1, 28, 28), np.uint8))
    base = ["calibrate", "--model", str(LENET), "--weights", str(LENET_WEIGHTS), "--output", "q",
            "--no-progress"]
    cases = [
        (["--data", "few.npz", "--batch-size", "4", "--batch-num", "3"], "10 sample.*need 12"),
        (["--data", "nothing_here", "--batch-num", "1"], "does not exist"),
        (["--data", "few.npz", "--crop", "20"], "apply to images"),
        (["--data", "few.npz", "--input-shape", "img:1,1,28,28"], "no input 'img'"),
        (["--data", "few.npz", "--select", "a:b"], "--select a:b"),
        (["--data", "few.npz", "--config", "missing.json"], "--config missing.json does not exist"),
    ]
    for extra, message in cases:
        assert cli.main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert re.search(r"amct-caffe: error: .*" + message, err), (extra, err)
    assert cli.main(["calibrate", "--model", str(LENET), "--weights", "no.caffemodel", "--data", "few.npz",
                     "--output", "q"]) == 2
    assert "weights file no.caffemodel does not exist" in capsys.readouterr().err
    assert fake_calibrate == []
    with pytest.raises(SystemExit) as exc:
        cli.main(base + ["--data", "few.npz", "--config", "a.json", "--cfg", "b.cfg"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(base + ["--data", "few.npz", "--batch-size", "0"])


def test_calibrate_without_the_api_module_is_a_clear_error(monkeypatch, capsys, tmp_path):
    np.savez(tmp_path / "d.npz", data=np.zeros((2, 1, 28, 28), np.float32))
    monkeypatch.setitem(sys.modules, "amct_caffe.api.workflow", None)
    code = cli.main(["calibrate", "--model", str(LENET), "--weights", str(LENET_WEIGHTS), "--data", "d.npz",
                     "--batch-size", "2", "--output", "q", "--no-progress"])
    assert code == 2
    assert "amct_caffe.api.workflow.calibrate is not available" in capsys.readouterr().err


def test_calibrate_from_a_record_directory(fake_calibrate, tmp_path):
    from amct_caffe.data import Record

    rec = Record("rec")
    for i in range(3):
        rec.add(data=np.full((2, 1, 28, 28), i, np.float32))
    assert cli.main(["calibrate", "--model", str(LENET), "--weights", str(LENET_WEIGHTS), "--data", "rec",
                     "--batch-size", "3", "--batch-num", "2", "--output", "q", "--no-progress", "--no-summary"]) == 0
    fed = np.concatenate([b["data"] for b in fake_calibrate[0]["batches"]])
    np.testing.assert_array_equal(fed[:, 0, 0, 0], [0, 0, 1, 1, 2, 2])


def test_convert_passes_its_arguments(monkeypatch, capsys, tmp_path):
    calls = []

    def convert_model(model_file, weights_file, scale_offset_record_file, save_path):
        calls.append((model_file, weights_file, scale_offset_record_file, save_path))
        Path(f"{save_path}_deploy_model.prototxt").write_text("")  # returns nothing: the CLI lists the files

    _fake_module(monkeypatch, "amct_caffe.api.convert", "convert_model", convert_model)
    (tmp_path / "record.txt").write_text("")
    lenet = ["--model", str(LENET), "--weights", str(LENET_WEIGHTS), "--output", "lenet"]
    assert cli.main(["convert", *lenet, "--record", "record.txt"]) == 0
    assert calls == [(str(LENET), str(LENET_WEIGHTS), "record.txt", "lenet")]
    assert capsys.readouterr().out.strip() == "wrote lenet_deploy_model.prototxt"
    assert cli.main(["convert", *lenet, "--record", "none.txt"]) == 2
    assert "record file none.txt does not exist" in capsys.readouterr().err


def test_calibrate_with_target_cosine_runs_the_fallback_search(capsys, tmp_path):
    """The real pipeline on the bundled MNIST sample: with an unreachable target and a budget of one layer,
    the search ranks the layers and floats the most sensitive; the saved model is the better of the sets the
    guide's flow calibrated (here within 1e-10 of each other: all INT8, or that layer float); what is printed
    matches the written config."""
    import json

    args = ["calibrate", "--model", str(LENET), "--weights", str(LENET_WEIGHTS),
            "--data", str(MNIST_SAMPLE / "mnist_500.npz"), "--batch-size", "16", "--batch-num", "2",
            "--scale", "0.00390625", "--output", "out/lenet", "--no-progress"]
    assert cli.main(args + ["--target-cosine", "1.0", "--max-float-layers", "1"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"^output cosine \(worst_output, FP32 vs INT8 on the calibration data\): all layers quantized (\S+), "
                  r"saved model (\S+), target (\S+) \(NOT met\)$", out, re.M)
    assert m, out
    # 8 decimals, or every digit where those would show the missed target as reached
    assert m.group(3) == ("1" if f"{float(m.group(2)):.8f}" == "1.00000000" else "1.00000000")
    assert 0.999 < float(m.group(1)) <= float(m.group(2)) <= 1.0
    (kept,) = re.findall(r"^layers the search moved to float: (.*)$", out, re.M)
    (ranked,) = re.findall(r"^most sensitive layers \(1 - output cosine with only that layer quantized\): (.*)$",
                           out, re.M)
    losses = [float(item.split()[1]) for item in ranked.split(", ")]
    assert len(losses) == 7 and losses[0] > 0  # LeNet's 7 quantized layers, at least one not lossless
    assert kept in ("none", ranked.split()[0]) and losses == sorted(losses, reverse=True)
    assert "fallback_config: out/lenet_fallback_config.json" in out
    import amct_caffe as amct

    amct.create_quant_config(str(tmp_path / "default.json"), str(LENET), str(LENET_WEIGHTS), batch_num=2)

    def disabled(path):
        config = json.loads(Path(path).read_text())
        return {k for k, v in config.items() if isinstance(v, dict) and v.get("quant_enable") is False}
    assert disabled(tmp_path / "out/lenet_fallback_config.json") - disabled(tmp_path / "default.json") == (
        set() if kept == "none" else {kept})
    for bad in (["--target-cosine", "1.5"], ["--target-cosine", "x"], ["--max-float-layers", "-1"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(args + bad)
        assert exc.value.code == 2


@needs_mnist
def test_calibrate_shows_one_progress_bar_that_ends_at_100_percent(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["calibrate", "--model", str(LENET), "--weights", str(LENET_WEIGHTS), "--data", str(MNIST),
                     "--batch-size", "8", "--batch-num", "3", "--scale", "0.00390625", "--output", "out/lenet"])
    assert code == 0
    err = capsys.readouterr().err
    bars = {line.split(":")[0] for line in re.split(r"[\r\n]", err) if "batch" in line and "%|" in line}
    assert bars == {"calibration"}, err
    assert "100%|" in err and "3/3" in err, err
    assert (tmp_path / "out/lenet_deploy_weights.caffemodel").is_file()
    code = cli.main(["calibrate", "--model", str(LENET), "--weights", str(LENET_WEIGHTS), "--data", str(MNIST),
                     "--batch-size", "8", "--batch-num", "1", "--scale", "0.00390625", "--output", "out/q",
                     "--no-progress"])
    assert code == 0 and "%|" not in capsys.readouterr().err
