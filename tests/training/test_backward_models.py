"""Gradients of the shared real models against official Caffe.

Each deploy prototxt gets ``force_backward: true``; Caffe and the executor run it on the model's
own weights with the same random input and the same random diffs on the outputs, and every blob
diff and learned-blob diff must agree within 1e-4 of the array's scale. An SSD model's
DetectionOutput has no backward in Caffe, so that net is cut before it (the heads become the
outputs).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from amct_caffe.runtime import TEST, Net
from tests.golden import SHARED
from tests.real_caffe import pycaffe_dir
from tests.training.gradcheck import caffe_grads, executor_grads, grad_problems, run_in_caffe

pytestmark = pytest.mark.real_caffe

MODELS = {
    "lenet": ("lenet_mnist/lenet.prototxt", "lenet_mnist/lenet_iter_10000.caffemodel", 4),
    "mtcnn_det1": ("mtcnn/det1.prototxt", "mtcnn/det1.caffemodel", 2),
    "mtcnn_det2": ("mtcnn/det2.prototxt", "mtcnn/det2.caffemodel", 2),
    "mtcnn_det3": ("mtcnn/det3.prototxt", "mtcnn/det3.caffemodel", 2),
    "mtcnn_det4": ("mtcnn/det4.prototxt", "mtcnn/det4.caffemodel", 1),
    "ultraface_slim320": ("ultraface_slim320/slim-320.prototxt", "ultraface_slim320/slim-320.caffemodel", 1),
    "ultraface_rfb320": ("ultraface_rfb320/RFB-320.prototxt", "ultraface_rfb320/RFB-320.caffemodel", 1),
    "open_nsfw": ("open_nsfw/deploy.prototxt", "open_nsfw/resnet_50_1by2_nsfw.caffemodel", 1),
    "mininet_ssd": ("hyperlpr_mininet_ssd/mininet_ssd_v1.prototxt", "hyperlpr_mininet_ssd/mininet_ssd_v1.caffemodel",
                    1),
}


def _prepare(text: str) -> str:
    """force_backward on; DetectionOutput layers (no backward in Caffe) removed."""
    text = re.sub(r'\nlayer\s*\{(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*type:\s*"DetectionOutput"'
                  r'(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*\}', "\n", text)
    return "force_backward: true\n" + text


@pytest.fixture(scope="module")
def model_runs(tmp_path_factory):
    if pycaffe_dir() is None:
        pytest.skip("AMCT_REAL_CAFFE is not set")
    workdir = tmp_path_factory.mktemp("model_grads")
    rng = np.random.default_rng(3)
    cases, weights = [], {}
    for name, (proto, model, batch) in MODELS.items():
        text = _prepare((SHARED / "models" / proto).read_text())
        probe = Net(str(SHARED / "models" / proto), TEST)
        inputs = {k: rng.standard_normal((batch,) + probe.blobs[k].shape[1:]).astype(np.float32)
                  for k in probe.inputs}
        cases.append((name, text, inputs, "TEST"))
        weights[name] = SHARED / "models" / model
    return workdir, run_in_caffe(workdir, cases, weights=weights)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_model_gradients_match_caffe(model_runs, model):
    workdir, results = model_runs
    assert results[model]["status"] == "ok", results[model]["log"]
    ref = caffe_grads(workdir, model)
    ours = executor_grads(workdir, model, phase="TEST")
    assert grad_problems(ref, ours) == []
