"""The guide's QAT flow trained by real Caffe (patched by caffe_patch/install.py) and by the runtime.

``samples/mnist/src/mnist_retrain.py`` runs twice on the bundled digits, once with
``--caffe_dir`` (real Caffe's SGDSolver on the retrain model, its RetrainDataQuant /
RetrainWeightQuant layers from caffe_patch) and once in the embedded runtime. Both must end with
the same record (scale_d / offset_d from the learned clips, scale_w of the trained weights)
within float noise, and the same fake-quant accuracy.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.caffe_patch.patched_caffe import REPO, patched_caffe

pytestmark = [pytest.mark.real_caffe, pytest.mark.slow]

SAMPLE = REPO / "samples" / "mnist" / "src" / "mnist_retrain.py"
ITERS = 40


def _run(workdir, *args, pythonpath: str):
    workdir.mkdir()
    env = dict(os.environ, PYTHONPATH=pythonpath, GLOG_minloglevel="2", AMCT_LOG_LEVEL="WARNING")
    res = subprocess.run([sys.executable, str(SAMPLE), "--train_iter", str(ITERS), *args], cwd=workdir, env=env,
                         capture_output=True, text=True, timeout=1800, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout


def _record(path) -> dict[str, list[float]]:
    """{layer/field: values} of the scale fields of a record text file."""
    out: dict[str, list[float]] = {}
    layer = None
    for line in path.read_text().splitlines():
        m = re.match(r'\s*key: "([^"]+)"', line)
        if m:
            layer = m.group(1)
        m = re.match(r"\s*(scale_d|offset_d|scale_w|offset_w): (\S+)", line)
        if m:
            out.setdefault(f"{layer}/{m.group(1)}", []).append(float(m.group(2)))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pycaffe = patched_caffe()
    base = tmp_path_factory.mktemp("qat_real")
    caffe_out = _run(base / "caffe", "--caffe_dir", str(pycaffe.parent),
                     pythonpath=os.pathsep.join([str(pycaffe), str(REPO)]))
    ours_out = _run(base / "ours", pythonpath=str(REPO))
    return base, caffe_out, ours_out


def test_both_runtimes_write_the_guide_files(runs):
    base, _, _ = runs
    for who in ("caffe", "ours"):
        results = base / who / "results" / "retrain_results"
        for name in ("retrain_fake_quant_model.prototxt", "retrain_fake_quant_weights.caffemodel",
                     "retrain_deploy_model.prototxt", "retrain_deploy_weights.caffemodel"):
            assert (results / name).is_file(), (who, name)
        assert (base / who / "tmp" / f"solver_iter_{ITERS}.caffemodel").is_file()


def test_records_agree_within_float_noise(runs):
    base, _, _ = runs
    ref = _record(base / "caffe" / "tmp" / "record.txt")
    ours = _record(base / "ours" / "tmp" / "record.txt")
    assert ref.keys() == ours.keys() and any(k.endswith("scale_d") for k in ref)
    for key, want in ref.items():
        np.testing.assert_allclose(ours[key], want, rtol=1e-4, atol=0, err_msg=key)


def test_fake_quant_accuracy_is_the_same(runs):
    _, caffe_out, ours_out = runs

    def acc(text):
        return float(re.search(r"retrained fake-quant model ([\d.]+)%", text).group(1))

    assert acc(ours_out) == pytest.approx(acc(caffe_out), abs=1.0)
