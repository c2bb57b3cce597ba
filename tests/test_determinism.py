"""Same inputs, same bytes: the quantized outputs do not depend on the BLAS thread count or on the
working directory.

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


def _run(tmp: Path, threads: int) -> dict[str, bytes]:
    work = tmp / f"threads{threads}"
    work.mkdir()
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), AMCT_LOG_LEVEL="ERROR")
    flow = subprocess.run([sys.executable, "-c", FLOW], cwd=work, env=env, capture_output=True, text=True,
                          check=False, timeout=600)
    assert flow.returncode == 0, flow.stderr[-3000:]
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
