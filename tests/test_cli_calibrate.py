"""amct-caffe calibrate: which batch_num applies with a config file, and the warnings where users go wrong."""

import sys
import types

import numpy as np
import pytest

from amct_caffe import cli

from .test_cli import LENET, LENET_WEIGHTS, MNIST_SAMPLE

MNIST_500 = MNIST_SAMPLE / "mnist_500.npz"
CALIBRATE = ["calibrate", "--model", str(LENET), "--weights", str(LENET_WEIGHTS), "--data", str(MNIST_500),
             "--scale", "0.00390625", "--output", "out/lenet", "--no-progress", "--no-summary"]


pytestmark = pytest.mark.usefixtures("cli_scratch_dir")


@pytest.fixture
def fake_calibrate(monkeypatch):
    calls = []

    def calibrate(model_file, weights_file, batches, save_path, batch_num, **kwargs):
        calls.append(dict(batches=[dict(b) for b in batches], batch_num=batch_num, **kwargs))
        return {"deploy_model": f"{save_path}_deploy_model.prototxt"}

    module = types.ModuleType("amct_caffe.api.workflow")
    module.calibrate = calibrate
    monkeypatch.setitem(sys.modules, "amct_caffe.api.workflow", module)
    return calls


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize(("name", "text", "flags", "fed", "message"), [
    ("q.cfg", "batch_num: 3\n", ["--batch-num", "2"], 3,
     "--batch-num 2 is ignored: the fields of q.cfg win over the command line, and q.cfg sets batch_num: 3 "
     "(change it there instead)"),
    ("q.cfg", "activation_offset: false\n", ["--batch-num", "2"], 1,
     "--batch-num 2 is ignored: the fields of q.cfg win over the command line, and q.cfg does not set batch_num, "
     "so its default 1 applies (write batch_num: 2 there)"),
    ("c.json", '{"batch_num": 2, "activation_offset": true}', ["--no-activation-offset"], 2,
     '--no-activation-offset is ignored: the fields of c.json win over the command line, and c.json sets '
     '"activation_offset": true (change it there instead)'),
    ("c.json", "{}", ["--batch-num", "4"], 1,
     "--batch-num 4 is ignored: the fields of c.json win over the command line, and c.json does not set batch_num, "
     'so its default 1 applies (write "batch_num": 4 there)'),
    ("c.json", '{"batch_num": 3}', [], 3, None),
])
def test_a_config_files_batch_num_wins_and_the_flag_it_overrides_is_named(fake_calibrate, caplog, tmp_path, name,
                                                                         text, flags, fed, message):
    """The calibration runs the config's batch_num forwards: the command line reads that many batches."""
    (tmp_path / name).write_text(text)
    option = "--cfg" if name.endswith(".cfg") else "--config"
    with caplog.at_level("WARNING", logger="amct_caffe"):
        assert cli.main(CALIBRATE + ["--batch-size", "32", option, name, *flags]) == 0
    (call,) = fake_calibrate
    assert len(call["batches"]) == fed
    assert [w for w in _warnings(caplog) if "ignored" in w] == ([message] if message else [])


def test_calibrating_on_fewer_than_32_samples_warns(fake_calibrate, caplog):
    with caplog.at_level("WARNING", logger="amct_caffe"):
        assert cli.main(CALIBRATE + ["--batch-size", "8", "--batch-num", "3"]) == 0
    assert _warnings(caplog) == [
        "calibrating on 24 samples (3 batch(es) of 8): activation ranges from fewer than 32 samples are unreliable; "
        "give more with --batch-num or --batch-size"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="amct_caffe"):
        assert cli.main(CALIBRATE + ["--batch-size", "16", "--batch-num", "2"]) == 0
    assert _warnings(caplog) == []
    assert [len(c["batches"]) for c in fake_calibrate] == [3, 2]
    np.testing.assert_array_equal(fake_calibrate[1]["batches"][0]["data"][:8], fake_calibrate[0]["batches"][0]["data"])


def test_calibrate_ends_with_fp32_vs_int8_on_the_first_calibration_batch(capsys, tmp_path):
    """The real pipeline: the summary is compare_batches on the first batch the calibration read (read again from
    the source after the calibration consumed its iterator), and --no-summary drops it."""
    from amct_caffe.api.compare import compare_batches
    from amct_caffe.data import ArrayData

    args = CALIBRATE[:-1] + ["--select", "100:", "--batch-size", "16", "--batch-num", "2"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    source = ArrayData(MNIST_500, {"data": (16, 1, 28, 28)}, scale=0.00390625, batch_size=16).select(100)
    fake_quant = ("out/lenet_fake_quant_model.prototxt", "out/lenet_fake_quant_weights.caffemodel")
    _, want, _ = compare_batches(str(LENET), str(LENET_WEIGHTS), *fake_quant, [source.batch(0)])
    prob, worst = want["outputs"]["prob"], want["most_sensitive_layers"][:3]
    assert out[-4:] == [
        "FP32 vs INT8 on the first calibration batch (16 samples):",
        f"  output prob: cosine {prob['cosine']:.10f}, top-1 agreement {100 * prob['top1_agreement']:.2f}%",
        "  layers adding the most error (rise in 1 - cosine): " + ", ".join(f"{w['layer']} {w['error_added']:.3e}"
                                                                   for w in worst),
        "  every layer, on more data: amct-caffe compare (see its --help)"]
    _, second, _ = compare_batches(str(LENET), str(LENET_WEIGHTS), *fake_quant, [source.batch(1)])
    assert second["most_sensitive_layers"][0]["error_added"] != worst[0]["error_added"]  # the batch matters
    assert cli.main(args + ["--no-summary"]) == 0
    assert "FP32 vs INT8" not in capsys.readouterr().out
