"""The recurrent samples (``samples/recurrent``: LSTM and RNN over MNIST rows, a CRNN over strips of
four digits), trained in official Caffe: the executor computes every blob of their deploy nets (and
the gradients of their train nets) as Caffe does, and reads the held-out digits exactly as well as
``SOURCES.md`` says Caffe does."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.golden import SHARED
from tests.training.gradcheck import grad_problems

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "recurrent"
MODELS = ("lstm_mnist", "rnn_mnist", "crnn_mnist")

pytestmark = pytest.mark.skipif(not (SHARED / "data/mnist_5k.npz").exists(),
                                reason="../shared not beside the repository")


def _sequences():
    spec = importlib.util.spec_from_file_location("mnist_sequences", SAMPLE / "src" / "mnist_sequences.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stated_accuracy(model: str) -> dict[str, int]:
    """The counts SOURCES.md states for ``model``: its table row ``| model | a/b ... | [c/d ...] |``."""
    row = next(line for line in (SAMPLE / "SOURCES.md").read_text().splitlines()
               if line.startswith(f"| `{model}` |"))
    counts = [tuple(map(int, m)) for m in re.findall(r"(\d+)/(\d+) ", row)]
    out = {"correct": counts[0][0], "digits": counts[0][1]}
    if len(counts) > 1:
        out.update(strips_correct=counts[1][0], strips=counts[1][1])
    return out


def _files(model: str) -> tuple[str, str]:
    return str(SAMPLE / f"{model}_deploy.prototxt"), str(SAMPLE / f"{model}.caffemodel")


@pytest.mark.parametrize("model", MODELS)
def test_executor_reads_the_heldout_digits_as_sources_states(model):
    import amct_caffe.runtime as caffe

    deploy, weights = _files(model)
    assert Path(weights).stat().st_size < 2_000_000
    assert _sequences().heldout_accuracy(caffe, model, deploy, weights) == stated_accuracy(model)


_CAFFE_FORWARD = """
import json
import sys
import numpy as np
import caffe
sys.path.insert(0, {src!r})
import mnist_sequences as ms
caffe.set_mode_cpu()
inputs = dict(np.load({inputs!r}))
net = caffe.Net({deploy!r}, {weights!r}, caffe.TEST)
for name, value in inputs.items():
    net.blobs[name].data[...] = value
net.forward()
np.savez({out!r}, **{{k: b.data for k, b in net.blobs.items() if "_split_" not in k}})
print(json.dumps(ms.heldout_accuracy(caffe, {model!r}, {deploy!r}, {weights!r})))
"""


def _first_batch(ms, model: str) -> dict[str, np.ndarray]:
    """The deploy net's inputs for its first batch of held-out digits."""
    images, labels = ms.load()
    heldout = ms.split(len(labels))[1]
    if model == "crnn_mnist":
        data, _ = ms.strips(images, labels, ms.heldout_order(heldout)[:50])
        return {"data": data, "cont": ms.cont(8, 50)}
    return {"x": ms.rows(images[heldout[:100]]), "cont": ms.cont(28, 100)}


@pytest.mark.real_caffe
@pytest.mark.parametrize("model", MODELS)
def test_forward_matches_real_caffe(model, tmp_path):
    """Every blob of the deploy net within 1e-4 of its scale on a held-out batch, and Caffe's held-out
    accuracy with the shipped weights is the one SOURCES.md states."""
    from amct_caffe.runtime import TEST, Net
    from amct_caffe.runtime.layers import caffe_gemm
    from tests.real_caffe import run_with_pycaffe

    ms = _sequences()
    deploy, weights = _files(model)
    inputs = _first_batch(ms, model)
    np.savez(tmp_path / "inputs.npz", **inputs)
    res = run_with_pycaffe(_CAFFE_FORWARD.format(src=str(SAMPLE / "src"), inputs=str(tmp_path / "inputs.npz"),
                                                 deploy=deploy, weights=weights, out=str(tmp_path / "ref.npz"),
                                                 model=model))
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == stated_accuracy(model)
    ref = dict(np.load(tmp_path / "ref.npz"))
    net = Net(deploy, weights, TEST)
    net.forward(**inputs)
    ours = {name: net.blobs[name].data for name in ref}
    recurrent = "rnn" if model == "rnn_mnist" else "lstm"
    assert set(ref) >= {recurrent, "fc", "prob"}
    assert not grad_problems(ref, ours, rtol=1e-4, ties=None if caffe_gemm.exact() else 5e-3)
    if caffe_gemm.exact():  # where numpy's BLAS rounds as Caffe's, the recurrence is Caffe's bit for bit
        np.testing.assert_array_equal(ours[recurrent], ref[recurrent])


_CAFFE_BACKWARD = """
import numpy as np
import caffe
caffe.set_mode_cpu()
net = caffe.Net({train!r}, {weights!r}, caffe.TRAIN)
for name, value in np.load({inputs!r}).items():
    net.blobs[name].data[...] = value
net.forward()
net.backward()
out = {{}}
for name, blob in net.blobs.items():
    if "_split_" not in name:
        out["data/" + name], out["diff/" + name] = blob.data, blob.diff
for name, params in net.params.items():
    for i, p in enumerate(params):
        out[f"pdiff/{{name}}/{{i}}"] = p.diff
np.savez({out!r}, **out)
"""


def _training_batch(ms, model: str) -> dict[str, np.ndarray]:
    """A batch of 50 training digits (strips) with labels, as train_recurrent.py feeds the train net."""
    images, labels = ms.load()
    train, rng = ms.split(len(labels))[0], np.random.default_rng(3)
    if model == "crnn_mnist":
        data, digits = ms.strips(images, labels, rng.choice(train, (50, ms.DIGITS)))
        return {"data": data, "cont": ms.cont(8, 50), "label": ms.step_labels(digits)}
    idx = rng.choice(train, 50)
    return {"x": ms.rows(images[idx]), "cont": ms.cont(28, 50), "label": labels[idx].astype(np.float32)}


@pytest.mark.real_caffe
@pytest.mark.parametrize("model", MODELS)
def test_training_step_matches_real_caffe(model, tmp_path):
    """The train net with the shipped weights on a training batch: every blob's data and diff and every
    parameter's diff within 1e-4 of its scale (the loss is where they part first: Softmax's exp and sum)."""
    from amct_caffe.runtime import TRAIN, Net
    from amct_caffe.runtime.layers import caffe_gemm
    from tests.real_caffe import run_with_pycaffe

    train, weights = str(SAMPLE / f"{model}_train.prototxt"), _files(model)[1]
    inputs = _training_batch(_sequences(), model)
    np.savez(tmp_path / "inputs.npz", **inputs)
    res = run_with_pycaffe(_CAFFE_BACKWARD.format(train=train, weights=weights, inputs=str(tmp_path / "inputs.npz"),
                                                  out=str(tmp_path / "ref.npz")))
    assert res.returncode == 0, res.stderr[-3000:]
    ref = dict(np.load(tmp_path / "ref.npz"))
    net = Net(train, weights, TRAIN)
    for name, value in inputs.items():
        net.blobs[name].data[...] = value
    net.forward()
    net.backward()
    ours = {}
    for name, blob in net.blobs.items():
        ours["data/" + name], ours["diff/" + name] = blob.data, blob.diff
    for name, params in net.params.items():
        for i, p in enumerate(params):
            ours[f"pdiff/{name}/{i}"] = p.diff
    assert any(k.startswith("pdiff/lstm/") or k.startswith("pdiff/rnn/") for k in ref)
    assert not grad_problems(ref, ours, rtol=1e-4, ties=None if caffe_gemm.exact() else 5e-3)
