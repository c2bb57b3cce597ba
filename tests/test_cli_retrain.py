"""amct-caffe retrain: its options reach label_free_retrain, and bad input is one line and exit status 2.

The API is faked except in the last test, which trains LeNet for a few iterations through the command.
"""

import re
import sys
import types

import pytest

from amct_caffe import cli

from .test_cli import LENET, LENET_WEIGHTS, MNIST_SAMPLE

MNIST_500 = MNIST_SAMPLE / "mnist_500.npz"
RETRAIN = ["retrain", "--model", str(LENET), "--weights", str(LENET_WEIGHTS), "--data", str(MNIST_500),
           "--scale", "0.00390625", "--output", "out/lenet", "--no-progress"]


pytestmark = pytest.mark.usefixtures("cli_scratch_dir")
RUN: dict = {}  # what the fake API's training ran (test_training_that_diverged_is_counted_as_it_ran)


@pytest.fixture
def fake_retrain(monkeypatch):
    calls = []

    def label_free_retrain(model_file, weights_file, data, save_path, **kwargs):
        calls.append(dict(model=model_file, weights=weights_file, data=data, save_path=save_path, **kwargs))
        run = RUN.get("iterations", 7)  # the iterations that ran: fewer than the 7 asked when training diverged
        return types.SimpleNamespace(outputs={"deploy_model": f"{save_path}_deploy_model.prototxt"}, iterations=7,
                                     batch_size=kwargs["batch_size"] or 64, loss_start=0.5, loss_end=0.1,
                                     losses=[0.5] * run, kept="rounded", data_loss_ptq=0.2, data_loss_before=0.05,
                                     data_loss_after=0.06, targets=["prob"])

    module = types.ModuleType("amct_caffe.api.label_free")
    module.label_free_retrain = label_free_retrain
    monkeypatch.setitem(sys.modules, "amct_caffe.api.label_free", module)
    return calls


def test_options_reach_the_api(fake_retrain, capsys):
    assert cli.main([*RETRAIN, "--iterations", "7", "--batch-size", "32", "--clip-lr", "0.01", "--weight-lr", "0",
                     "--select", ":256", "--no-rounding", "--no-equalize", "--no-per-sample-loss"]) == 0
    (call,) = fake_retrain
    assert call["save_path"] == "out/lenet" and call["iterations"] == 7 and call["batch_size"] == 32
    assert call["clip_lr"] == 0.01 and call["weight_lr"] == 0.0 and call["progress"] is False
    assert call["rounding"] is False and call["equalize"] is False and call["per_sample_loss"] is False
    assert call["data"].num_samples == 256
    out = capsys.readouterr().out
    assert "deploy_model: out/lenet_deploy_model.prototxt" in out
    assert "5.0000e-01 -> 1.0000e-01" in out and "7 iterations of 32 sample(s)" in out
    assert "saved: the rounded model" in out and "PTQ 2.0000e-01, training start 5.0000e-02" in out


@pytest.mark.parametrize("run, said", [(3, "mean of the first / last tenth of the 3 iteration(s) before training "
                                              "diverged (of 7) of 64 sample(s): 5.0000e-01"),
                                       (0, "distillation loss: training diverged at its first iteration (of 7)")])
def test_training_that_diverged_is_counted_as_it_ran(fake_retrain, capsys, monkeypatch, run, said):
    monkeypatch.setitem(RUN, "iterations", run)
    assert cli.main(RETRAIN) == 0
    out = capsys.readouterr().out
    assert said in out and "7 iterations" not in out


def test_defaults(fake_retrain):
    assert cli.main(RETRAIN) == 0
    (call,) = fake_retrain
    assert call["iterations"] is None and call["batch_size"] == 0
    assert call["rounding"] is True and call["equalize"] is True and call["per_sample_loss"] is True
    # weight_lr None: the API's own default (0 after the learned rounding, WEIGHT_LR without it)
    assert (call["clip_lr"], call["weight_lr"]) == (cli.retrain.CLIP_LR, None)


def test_few_samples_warn(fake_retrain, caplog):
    assert cli.main([*RETRAIN, "--select", ":16", "--input-shape", "8,1,28,28"]) == 0
    assert any("retraining on 16 samples" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


@pytest.mark.parametrize(("flags", "message"), [
    (["--iterations", "0"], "--iterations: expected a positive integer"),
    (["--clip-lr", "-1"], "--clip-lr: expected a number >= 0"),
    (["--weight-lr", "nan"], "--weight-lr: expected a finite number"),
])
def test_bad_option_values(fake_retrain, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        cli.main([*RETRAIN, *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err and not fake_retrain


@pytest.mark.parametrize(("change", "message"), [
    ({"--model": "missing.prototxt"}, "model file missing.prototxt does not exist"),
    ({"--data": "missing_dir"}, "calibration data missing_dir does not exist"),
    ({"--output": "out/"}, "--output out/: end it with a file name prefix"),
])
def test_bad_inputs_are_one_line(fake_retrain, capsys, change, message):
    argv = list(RETRAIN)
    for flag, value in change.items():
        argv[argv.index(flag) + 1] = value
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("amct-caffe: error: ") and message in err and "Traceback" not in err
    assert not fake_retrain


def test_batch_larger_than_the_data(fake_retrain, capsys):
    assert cli.main([*RETRAIN, "--select", ":128", "--batch-size", "200"]) == 2
    assert "--batch-size 200 is larger than the 128 sample(s)" in capsys.readouterr().err


def test_fewer_samples_than_a_model_batch(fake_retrain, capsys):
    assert cli.main([*RETRAIN, "--select", ":16"]) == 2
    assert "holds 500 sample(s), 16 of them selected, fewer than one batch of the model's 64" in capsys.readouterr().err


def test_help_lists_the_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "retrain" in capsys.readouterr().out


def test_trains_lenet(capsys, tmp_path):
    """The real thing, briefly: the files appear, the loss line is printed, the one bar ends at 100 %."""
    assert cli.main([*[a for a in RETRAIN if a != "--no-progress"], "--select", ":128", "--iterations", "6"]) == 0
    captured = capsys.readouterr()
    out, last_bar = captured.out, [x for x in re.split(r"[\r\n]", captured.err) if "%|" in x][-1]
    assert "100%|" in last_bar and "/" in last_bar, captured.err
    assert "distillation loss" in out and "6 iterations of 64 sample(s)" in out
    assert "distilled: prob\n" in out
    for suffix in ("_fake_quant_model.prototxt", "_deploy_weights.caffemodel", "_quant_param_record.txt"):
        assert (tmp_path / f"out/lenet{suffix}").is_file()
