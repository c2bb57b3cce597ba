"""Same inputs, same bytes: the quantized outputs and the trained weights do not depend on the BLAS
thread count, the quantized outputs not on the working directory either.

The guide's flow (in the executor), convert_model and ``amct-caffe calibrate`` run on LeNet in
fresh processes with ``OPENBLAS_NUM_THREADS`` 1 and 2 (what a user's machine or a CI runner may
set), each in its own working directory; every saved file must be the same bytes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.golden import SHARED

ROOT = Path(__file__).resolve().parents[1]
LENET = ROOT / "samples/mnist/lenet.prototxt"
LENET_W = ROOT / "samples/mnist/lenet_iter_10000.caffemodel"
MNIST = SHARED / "data/mnist_5k.npz"
pytestmark = pytest.mark.skipif(not MNIST.exists(), reason="../shared not beside the repository")

FLOW = f"""
import json, numpy as np
import amct_caffe as amct
from amct_caffe.runtime import Net, TEST
z = np.load({str(MNIST)!r})
x = z["images"][:96, None].astype(np.float32) * np.float32(0.00390625)
amct.create_quant_config("config.json", {str(LENET)!r}, {str(LENET_W)!r}, batch_num=3)
graph = amct.init("config.json", {str(LENET)!r}, {str(LENET_W)!r}, "record.txt")
amct.weights_quantize_model(graph, "modified.prototxt", "modified.caffemodel")
amct.activation_quantize_model(graph, "modified.prototxt", "modified.caffemodel")
net = Net("modified.prototxt", "modified.caffemodel", TEST)
for b in range(3):
    net.forward(data=x[b * 32:(b + 1) * 32])
amct.save_model(graph, "Both", "flow/lenet")
amct.convert_model({str(LENET)!r}, {str(LENET_W)!r}, "flow/lenet_quant_param_record.txt", "convert/lenet")
"""


def _env(threads: int) -> dict[str, str]:
    """A fresh process's environment with ``threads`` BLAS threads and this checkout first on the path."""
    return dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), AMCT_LOG_LEVEL="ERROR")


def _python(script: str, work: Path, threads: int, *args: str) -> str:
    """Run ``script`` in a fresh Python in ``work``; its stdout (the test fails on an error)."""
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=work, env=_env(threads), capture_output=True,
                          text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _run(tmp: Path, threads: int) -> dict[str, bytes]:
    work = tmp / f"threads{threads}"
    work.mkdir()
    env = _env(threads)
    _python(FLOW, work, threads)
    cli = subprocess.run([sys.executable, "-m", "amct_caffe", "calibrate", "--model", str(LENET), "--weights",
                          str(LENET_W), "--data", str(MNIST), "--batch-size", "32", "--batch-num", "3", "--scale",
                          "0.00390625", "--output", "cli/lenet", "--no-progress"],
                         cwd=work, env=env, capture_output=True, text=True, check=False, timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    files = {str(p.relative_to(work)): p.read_bytes() for d in ("flow", "convert", "cli")
             for p in sorted((work / d).iterdir())}
    assert len(files) == 21
    return files


def test_outputs_do_not_depend_on_blas_threads_or_working_directory(tmp_path):
    one, two = _run(tmp_path, 1), _run(tmp_path, 2)
    assert sorted(one) == sorted(two)
    differing = [name for name in one if one[name] != two[name]]
    assert not differing, f"files that differ between 1 and 2 BLAS threads: {differing}"


TRAIN = r"""
import hashlib, re, sys
import numpy as np
import amct_caffe.runtime as caffe
text = open(sys.argv[1]).read()
body = text[text.index('layer {\n  name: "conv1"'):]
body = re.sub(r'layer \{\n  name: "accuracy".*?\n\}\n', "", body, flags=re.S)
# a BatchNorm + Scale on batch statistics after conv1, as in the ResNets one fine-tunes
body = body.replace('layer {\n  name: "pool1"', 'layer { name: "bn" type: "BatchNorm" bottom: "conv1" top: "conv1" }\n'
                    'layer { name: "sc" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }\n'
                    'layer {\n  name: "pool1"', 1)
net = ('name: "LeNet"\nlayer { name: "data" type: "Input" top: "data" input_param { shape { dim: 64 dim: 1 dim: 28 '
       'dim: 28 } } }\nlayer { name: "label" type: "Input" top: "label" input_param { shape { dim: 64 } } }\n' + body)
open("net.prototxt", "w").write(net)
open("solver.prototxt", "w").write('net: "net.prototxt"\nbase_lr: 0.01\nmomentum: 0.9\nweight_decay: 0.0005\n'
                                   'lr_policy: "fixed"\nmax_iter: 100\nsnapshot_after_train: false\n')
solver = caffe.SGDSolver("solver.prototxt")
rng = np.random.default_rng(0)
for _ in range(3):
    solver.net.blobs["data"].data[...] = rng.random((64, 1, 28, 28), np.float32)
    solver.net.blobs["label"].data[...] = rng.integers(0, 10, 64)
    solver.step(1)
h = hashlib.sha256()
for blobs in solver.net.params.values():
    for b in blobs:
        h.update(b.data.tobytes())
        h.update(b.diff.tobytes())
print(h.hexdigest())
"""


def test_training_does_not_depend_on_blas_threads(tmp_path):
    """SGD steps of LeNet (with a batch-statistics BatchNorm and Scale): the weights and the last update
    are the same bytes with 1 and 2 BLAS threads (every backward GEMM sums in fixed blocks, the C++
    loops split work, never sums, between threads)."""
    digests = []
    for threads in (1, 2):
        prototxt = SHARED / "models/lenet_mnist/lenet_train_test.prototxt"
        digests.append(_python(TRAIN, tmp_path, threads, str(prototxt)).strip())
    assert digests[0] == digests[1]


LABEL_FREE = f"""
import numpy as np
import amct_caffe as amct
z = np.load({str(MNIST)!r})
x = z["images"][:192, None].astype(np.float32) * np.float32(0.00390625)
amct.label_free_retrain({str(LENET)!r}, {str(LENET_W)!r}, [{{"data": x[i:i + 64]}} for i in range(0, 192, 64)],
                        "lf/lenet", iterations=12, progress=False)
"""


def test_label_free_retraining_does_not_depend_on_blas_threads(tmp_path):
    """Label-free QAT (equalization, calibration, the level-by-level rounding's staged passes, the
    clips' training) writes the same bytes with 1 and 2 BLAS threads."""
    outputs = []
    for threads in (1, 2):
        work = tmp_path / f"threads{threads}"
        work.mkdir()
        _python(LABEL_FREE, work, threads)
        outputs.append({p.name: p.read_bytes() for p in sorted((work / "lf").iterdir())})
    assert len(outputs[0]) == 7 and outputs[0] == outputs[1]
