"""The recurrent samples (samples/recurrent: LSTM and RNN over MNIST rows, a CRNN over strips of four
digits, trained in official Caffe) quantized by the guide's file flow, with the calibration and
fake-quant models run in patched real Caffe and in the executor.

Opt-in (AMCT_REAL_CAFFE; the patched build is patched_caffe.py's cache). Each model: create_quant_config
-> init -> weights_quantize_model -> activation_quantize_model; the calibration model runs batch_num = 2
times on training digits (indices that are multiples of 10, never held out) on each side, each writing
its own copy of the record; save_model builds the fake-quant model from the executor's record. Then:

- the records agree: scale_d and scale_h within 1e-6 relative, offsets and weight factors equal;
- Caffe's fake-quant model reads the held-out digits within 0.3 points of the FP32 model (the issue's
  target) and its outputs stay close to FP32's (cosine >= 0.999 over the held-out set);
- the executor's fake-quant outputs are Caffe's, within FAKE_QUANT_TOL of their scale.

Measured (held-out digits, FP32 -> INT8 in Caffe): lstm_mnist 95.7% -> 95.7% (cosine 0.99994),
rnn_mnist 94.6% -> 94.7% (0.99983), crnn_mnist 98.4% -> 98.4% (0.99998); the records equal.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import amct_caffe as amct
from amct_caffe.io.record import read_record
from amct_caffe.runtime import TEST, Net
from amct_caffe.runtime.layers import caffe_gemm
from tests.api.flow import calibration_model
from tests.caffe_patch.patched_caffe import REPO, patched_caffe
from tests.golden import SHARED

pytestmark = [pytest.mark.real_caffe, pytest.mark.slow,
              pytest.mark.skipif(not (SHARED / "data/mnist_5k.npz").exists(),
                                 reason="../shared not beside the repository")]

_LOG = logging.getLogger(__name__)
SAMPLE = REPO / "samples" / "recurrent"
MODELS = ("lstm_mnist", "rnn_mnist", "crnn_mnist")
SCALE_RTOL = 1e-6
MAX_DROP = 0.003  # accuracy points, as a fraction
MIN_COSINE = 0.999
# Float noise: Caffe's float layers (OpenBLAS) and the executor's differ by float32 ulps, and a value
# that such noise moved across a rounding boundary of a Quant step would differ by a whole step.
# Measured: 2.4e-7 of prob's scale for all three models (the FP32 models differ as much), no such flip.
FAKE_QUANT_TOL = 1e-5


def _sequences():
    spec = importlib.util.spec_from_file_location("mnist_sequences", SAMPLE / "src" / "mnist_sequences.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Runs a deploy-shaped model over batches (argv: prototxt, caffemodel, batches.npz holding
# "<input>/<i>" arrays, out.npz): saves prob of every batch.
FORWARD = r'''
import sys
import numpy as np

def run(caffe, proto, weights, batches, out):
    net = caffe.Net(proto, weights, caffe.TEST)
    z = np.load(batches)
    count = len({k.split("/")[1] for k in z.files})
    probs = {}
    for i in range(count):
        for name in {k.split("/")[0] for k in z.files}:
            net.blobs[name].data[...] = z[f"{name}/{i}"]
        net.forward()
        probs[str(i)] = np.array(net.blobs["prob"].data)
    np.savez(out, **probs)
'''
CAFFE_FORWARD = FORWARD + r'''
import caffe
caffe.set_mode_cpu()
run(caffe, *sys.argv[1:])
'''


def _batches(ms, model: str, indices: np.ndarray, images, labels) -> tuple[dict, np.ndarray]:
    """({"<input>/<i>": array}, labels per batch) for the deploy nets' batch sizes."""
    out, truth = {}, []
    if model == "crnn_mnist":
        order = ms.heldout_order(indices) if len(indices) == 1000 else indices.reshape(-1, ms.DIGITS)
        data, digits = ms.strips(images, labels, order)
        for i in range(0, len(data), 50):
            out[f"data/{i // 50}"], out[f"cont/{i // 50}"] = data[i:i + 50], ms.cont(8, 50)
            truth.append(digits[i:i + 50])
        return out, np.stack(truth)
    for i in range(0, len(indices), 100):
        rows = indices[i:i + 100]
        out[f"x/{i // 100}"], out[f"cont/{i // 100}"] = ms.rows(images[rows]), ms.cont(28, 100)
        truth.append(labels[rows])
    return out, np.stack(truth)


def _run(pycaffe, proto, weights, batches: dict, work: Path, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """(Caffe's probs, the executor's probs), stacked over the batches."""
    np.savez(work / f"{tag}_in.npz", **batches)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pycaffe), str(REPO)]), GLOG_minloglevel="2",
               GLOG_logtostderr="1")
    res = subprocess.run([sys.executable, "-c", CAFFE_FORWARD, str(proto), str(weights), str(work / f"{tag}_in.npz"),
                          str(work / f"{tag}_caffe.npz")], env=env, capture_output=True, text=True, timeout=1800,
                         check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    scope: dict = {}
    exec(compile(FORWARD, "FORWARD", "exec"), scope)  # noqa: S102 - the very script Caffe ran
    import amct_caffe.runtime as executor  # noqa: PLC0415
    scope["run"](executor, str(proto), str(weights), str(work / f"{tag}_in.npz"), str(work / f"{tag}_ours.npz"))
    with np.load(work / f"{tag}_caffe.npz") as c, np.load(work / f"{tag}_ours.npz") as o:
        return (np.stack([c[str(i)] for i in range(len(c.files))]),
                np.stack([o[str(i)] for i in range(len(o.files))]))


def _calibrate_in_caffe(pycaffe, work: Path, batches: dict) -> Path:
    """Run the calibration model (the record path replaced by a copy) in Caffe; returns that record."""
    record, caffe_record = work / "record.txt", work / "record_caffe.txt"
    shutil.copy(record, caffe_record)
    text = (work / "calibration.prototxt").read_text()
    assert f'"{record}"' in text
    (work / "calibration_caffe.prototxt").write_text(text.replace(f'"{record}"', f'"{caffe_record}"'))
    np.savez(work / "cal_in.npz", **batches)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pycaffe), str(REPO)]), GLOG_minloglevel="2",
               GLOG_logtostderr="1")
    res = subprocess.run([sys.executable, "-c", CAFFE_FORWARD, str(work / "calibration_caffe.prototxt"),
                          str(work / "calibration.caffemodel"), str(work / "cal_in.npz"), str(work / "cal_out.npz")],
                         env=env, capture_output=True, text=True, timeout=1800, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    return caffe_record


def _accuracy(ms, model: str, probs: np.ndarray, truth: np.ndarray) -> float:
    if model == "crnn_mnist":
        read = np.stack([ms.read_digits(p) for p in probs])
        return float(np.mean(read == truth))
    return float(np.mean(probs.argmax(axis=-1) == truth))


@pytest.fixture(scope="module", params=MODELS)
def quantized(request, tmp_path_factory):
    model = request.param
    pycaffe = patched_caffe()
    ms = _sequences()
    work = tmp_path_factory.mktemp(model)
    deploy, weights = SAMPLE / f"{model}_deploy.prototxt", SAMPLE / f"{model}.caffemodel"
    graph, cal_proto, cal_weights = calibration_model(work, deploy, weights, 2, name="calibration")
    images, labels = ms.load()
    train = np.arange(len(labels))
    calibration = train[train % 10 == 0]  # training digits (i % 5 != 4), every class
    per_batch = 200 if model == "crnn_mnist" else 100
    cal_batches, _ = _batches(ms, model, np.random.default_rng(7).permutation(calibration)[:2 * per_batch],
                              images, labels)
    caffe_record = _calibrate_in_caffe(pycaffe, work, cal_batches)
    net = Net(cal_proto, cal_weights, TEST, ifmr="exact")
    for i in range(2):
        net.forward(**{name: cal_batches[f"{name}/{i}"] for name in {k.split("/")[0] for k in cal_batches}})
    amct.save_model(graph, "Both", str(work / f"out/{model}"))
    heldout = ms.split(len(labels))[1]
    batches, truth = _batches(ms, model, heldout, images, labels)
    fp32, fp32_ours = _run(pycaffe, deploy, weights, batches, work, "fp32")
    fake = _run(pycaffe, work / f"out/{model}_fake_quant_model.prototxt",
                work / f"out/{model}_fake_quant_weights.caffemodel", batches, work, "fake")
    return dict(model=model, ms=ms, record=read_record(work / "record.txt"), caffe_record=read_record(caffe_record),
                fp32=fp32, fp32_ours=fp32_ours, fake=fake, truth=truth, proto=(work / "calibration.prototxt"))


def test_the_calibration_records_agree(quantized):
    ours, caffe = quantized["record"], quantized["caffe_record"]
    assert ours.layers.keys() == caffe.layers.keys()
    recurrent = [n for n, e in ours.layers.items() if e.scale_h is not None]
    assert recurrent == ["rnn" if quantized["model"] == "rnn_mnist" else "lstm"]
    assert 'Calibration"' in quantized["proto"].read_text()
    worst = 0.0
    for name, e in ours.layers.items():
        c = caffe.layer(name)
        assert (c.scale_w, c.offset_w, c.scale_r, c.offset_r) == (e.scale_w, e.offset_w, e.scale_r, e.offset_r)
        assert [(a.index, a.offset_d, a.num_bits_d) for a in c.record_d] == \
            [(a.index, a.offset_d, a.num_bits_d) for a in e.record_d]
        for a, b in zip(e.record_d, c.record_d, strict=True):
            worst = max(worst, abs(b.scale_d - a.scale_d) / a.scale_d)
        assert c.offset_h == e.offset_h
        if e.scale_h is not None:
            worst = max(worst, abs(c.scale_h - e.scale_h) / e.scale_h)
    assert worst <= SCALE_RTOL, worst
    _LOG.info("%s: records, worst scale relative difference %.3g", quantized["model"], worst)


def test_int8_in_caffe_keeps_the_accuracy(quantized):
    ms, model, truth = quantized["ms"], quantized["model"], quantized["truth"]
    fp32, (fake, _) = quantized["fp32"], quantized["fake"]
    acc32, acc8 = _accuracy(ms, model, fp32, truth), _accuracy(ms, model, fake, truth)
    a, b = fp32.reshape(-1).astype(np.float64), fake.reshape(-1).astype(np.float64)
    cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    _LOG.info("%s in Caffe: FP32 %.4f, INT8 %.4f, cosine %.6f", model, acc32, acc8, cosine)
    assert acc32 - acc8 <= MAX_DROP + 1e-9, (acc32, acc8)
    assert cosine >= MIN_COSINE, cosine


def test_the_executors_fake_quant_outputs_are_caffes(quantized):
    caffe, ours = quantized["fake"]
    scale = float(np.max(np.abs(caffe)))
    err = float(np.max(np.abs(ours.astype(np.float64) - caffe))) / scale
    _LOG.info("%s: fake-quant prob, max |executor - Caffe| / scale = %.3g (FP32: %.3g)", quantized["model"], err,
              float(np.max(np.abs(quantized["fp32_ours"].astype(np.float64) - quantized["fp32"]))) / scale)
    if not caffe_gemm.exact():
        # numpy's BLAS does not round like Caffe's here: Quant steps flip and the recurrence carries them on
        # (rnn_mnist: 6.4e-3 of the scale with OpenBLAS's AVX2 kernels); the accuracy test above still holds
        pytest.skip("numpy's BLAS does not round like Caffe's here: quantized recurrences part")
    assert err <= FAKE_QUANT_TOL, err
