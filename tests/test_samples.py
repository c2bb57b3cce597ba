"""The bundled samples run as the README says."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def test_mnist_sample_prints_accuracy_before_and_after(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), AMCT_LOG_LEVEL="WARNING")
    res = subprocess.run([sys.executable, str(REPO / "samples/mnist/src/mnist_sample.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    line = next(x for x in res.stdout.splitlines() if "before quantize is" in x)
    before = float(line.split("before quantize is ")[1].split(",")[0])
    after = float(line.split("after quantize is ")[1].split()[0])
    assert before > 0.99 and after >= before - 0.005
    assert (tmp_path / "results/mnist_deploy_weights.caffemodel").is_file()
    assert (tmp_path / "amct_log/amct_caffe.log").is_file()
    # run from the repository, as the README says, it leaves no untracked file: .gitignore lists what it writes
    ignored = set((REPO / ".gitignore").read_text().splitlines())
    assert {f"/{p.name}/" if p.is_dir() else f"/{p.name}" for p in tmp_path.iterdir()} <= ignored


def test_template_is_valid_python_and_uses_the_public_api():
    text = (REPO / "samples/amct_caffe_calibration_template.py").read_text()
    compile(text, "template", "exec")
    for name in ("create_quant_config", "init", "weights_quantize_model", "activation_quantize_model",
                 "save_model"):
        assert f"amct.{name}(" in text


def test_training_sample_trains_lenet_from_scratch(tmp_path):
    """The README's pycaffe training script: LeNet from Caffe's random initialisation on 400 digits."""
    env = dict(os.environ, PYTHONPATH=str(REPO), AMCT_LOG_LEVEL="WARNING")
    res = subprocess.run([sys.executable, str(REPO / "samples/mnist/src/train_lenet.py"), "--iterations", "200"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    line = next(x for x in res.stdout.splitlines() if "test accuracy before training" in x)
    before = float(line.split("before training ")[1].split("%")[0])
    after = float(line.split("iterations ")[1].split("%")[0])
    assert before < 40 and after >= 85
    assert (tmp_path / "results/lenet_iter_200.caffemodel").is_file()
    assert (tmp_path / "results/lenet_iter_200.solverstate").is_file()
    ignored = set((REPO / ".gitignore").read_text().splitlines())
    assert {f"/{p.name}/" if p.is_dir() else f"/{p.name}" for p in tmp_path.iterdir()} <= ignored


def test_qat_sample_keeps_the_float_accuracy(tmp_path, monkeypatch):
    """The guide's QAT flow (ResNet50_retrain.py's) on LeNet, trained by the embedded runtime."""
    env = dict(os.environ, PYTHONPATH=str(REPO), AMCT_LOG_LEVEL="WARNING")
    res = subprocess.run([sys.executable, str(REPO / "samples/mnist/src/mnist_retrain.py"), "--train_iter", "30"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    line = next(x for x in res.stdout.splitlines() if "Top 1 accuracy of the float model" in x)
    float_acc, fake, deploy = (float(v) for v in re.findall(r"([\d.]+)%", line))
    assert fake >= float_acc - 1.0 and deploy >= float_acc - 1.0
    results = tmp_path / "results" / "retrain_results"
    for name in ("retrain_fake_quant_model.prototxt", "retrain_deploy_weights.caffemodel",
                 "retrain_quant_param_record.txt"):
        assert (results / name).is_file()
    # the guide's retrain_atc_model.prototxt: the deploy model on an Input, without the label readers,
    # computing the deploy model's outputs
    from amct_caffe.runtime import TEST, Net
    weights = str(results / "retrain_deploy_weights.caffemodel")
    monkeypatch.chdir(tmp_path)  # the deploy model's Data layer names the sample's tmp/ LMDB
    deploy = Net(str(results / "retrain_deploy_model.prototxt"), weights, TEST)
    atc = Net(str(results / "retrain_atc_model.prototxt"), weights, TEST)
    assert atc.inputs == ["data"] and not {"Data", "Accuracy", "SoftmaxWithLoss"} & {lay.type for lay in atc.layers}
    deploy.forward()
    atc.forward(data=deploy.blobs["data"].data)
    np.testing.assert_array_equal(atc.blobs["ip2"].data, deploy.blobs["ip2"].data)
    for name in ("config.json", "modified_model.prototxt", "modified_model.caffemodel", "record.txt",
                 "solver.prototxt", "solver_iter_30.caffemodel"):
        assert (tmp_path / "tmp" / name).is_file()
    ignored = set((REPO / ".gitignore").read_text().splitlines())
    assert {f"/{p.name}/" if p.is_dir() else f"/{p.name}" for p in tmp_path.iterdir()} <= ignored


def test_recurrent_training_script_runs_in_the_executor(tmp_path):
    """samples/recurrent/src/train_recurrent.py without --caffe: the CRNN trains in the embedded runtime
    (Input layers fed from NumPy before each solver.step) and reads held-out digits above chance."""
    env = dict(os.environ, PYTHONPATH=str(REPO), AMCT_LOG_LEVEL="WARNING")
    res = subprocess.run([sys.executable, str(REPO / "samples/recurrent/src/train_recurrent.py"), "--model",
                          "crnn_mnist", "--iterations", "15"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("crnn_mnist: trained"))
    correct, total = (int(v) for v in re.search(r"held-out digits (\d+)/(\d+)", line).groups())
    assert total == 1000 and correct > 150  # chance: 100
    assert (tmp_path / "results/crnn_mnist.caffemodel").is_file()
    ignored = set((REPO / ".gitignore").read_text().splitlines())
    assert {f"/{p.name}/" if p.is_dir() else f"/{p.name}" for p in tmp_path.iterdir()} <= ignored
