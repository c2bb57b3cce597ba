"""The guide's file flow on a recurrent model, with the calibration and fake-quant models run in
patched real Caffe and in the executor.

Opt-in (AMCT_REAL_CAFFE; the patched build is patched_caffe.py's cache). A small sequence model
(LSTM -> RNN -> per-step InnerProduct, random weights) goes through create_quant_config, init,
weights_quantize_model and activation_quantize_model; its calibration model (IFMR layers on x and
on the LSTM's output, LSTMCalibration, RNNCalibration) runs batch_num times on each side, each
writing its own copy of the record: the records agree (scale_h / scale_d within 1e-6 relative,
the weight factors equal). save_model's fake-quant model (Quant layers, LSTMQuant, RNNQuant) then
gives the same blobs on both sides (within 1e-5 of each blob's scale).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import amct_caffe as amct
from amct_caffe.io.record import read_record
from amct_caffe.runtime import TEST, Net
from tests.api.flow import calibration_model
from tests.caffe_patch.patched_caffe import REPO, patched_caffe

pytestmark = [pytest.mark.real_caffe, pytest.mark.slow]

_LOG = logging.getLogger(__name__)
F32 = np.float32
T, N, D = 6, 4, 5
SCALE_RTOL = 1e-6
OUTPUT_TOL = 1e-5

MODEL = f"""name: "seq"
layer {{ name: "data" type: "Input" top: "x" top: "cont"
  input_param {{ shape {{ dim: {T} dim: {N} dim: {D} }} shape {{ dim: {T} dim: {N} }} }} }}
layer {{ name: "lstm1" type: "LSTM" bottom: "x" bottom: "cont" top: "h1"
  recurrent_param {{ num_output: 8 weight_filler {{ type: "uniform" min: -0.5 max: 0.5 }}
                    bias_filler {{ type: "uniform" min: -0.2 max: 0.2 }} }} }}
layer {{ name: "rnn2" type: "RNN" bottom: "h1" bottom: "cont" top: "h2"
  recurrent_param {{ num_output: 6 weight_filler {{ type: "uniform" min: -0.6 max: 0.6 }}
                    bias_filler {{ type: "uniform" min: -0.2 max: 0.2 }} }} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "h2" top: "y"
  inner_product_param {{ num_output: 3 axis: 2 weight_filler {{ type: "gaussian" std: 0.5 }} }} }}
"""

# Runs a model on batches of (x, cont), saving every blob after each forward (argv: prototxt,
# caffemodel, batches.npz with x0, cont0, x1, ..., out.npz).
FORWARD = r'''
import json, sys
import numpy as np

def run(caffe, proto, weights, batches, out):
    net = caffe.Net(proto, weights, caffe.TEST)
    z = np.load(batches)
    saved = {}
    for b in range(len(z.files) // 2):
        net.blobs["x"].data[...] = z[f"x{b}"]
        net.blobs["cont"].data[...] = z[f"cont{b}"]
        net.forward()
        for name, blob in net.blobs.items():
            saved[f"{b}/{name}"] = np.array(blob.data)
    np.savez(out, **saved)
'''
CAFFE_FORWARD = FORWARD + r'''
import caffe
caffe.set_mode_cpu()
run(caffe, *sys.argv[1:])
'''


def _batches(rng, count: int) -> dict[str, np.ndarray]:
    out = {}
    for b in range(count):
        out[f"x{b}"] = (rng.standard_normal((T, N, D)) * 1.3).astype(F32)
        cont = np.ones((T, N), F32)
        cont[0] = 0
        cont[T // 2, b % N] = 0  # a sequence restarting mid-batch
        out[f"cont{b}"] = cont
    return out


def _run_both(pycaffe, proto, weights, batches: dict, work, tag: str) -> tuple[dict, dict]:
    """({batch/blob: array} of Caffe, of the executor) for ``proto`` on ``batches``."""
    np.savez(work / f"{tag}_batches.npz", **batches)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pycaffe), str(REPO)]), GLOG_minloglevel="2",
               GLOG_logtostderr="1")
    res = subprocess.run([sys.executable, "-c", CAFFE_FORWARD, str(proto), str(weights),
                          str(work / f"{tag}_batches.npz"), str(work / f"{tag}_caffe.npz")],
                         env=env, capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    scope: dict = {}
    exec(compile(FORWARD, "FORWARD", "exec"), scope)  # noqa: S102 - the very script Caffe ran
    import amct_caffe.runtime as executor  # noqa: PLC0415
    scope["run"](executor, str(proto), str(weights), str(work / f"{tag}_batches.npz"), str(work / f"{tag}_ours.npz"))
    with np.load(work / f"{tag}_caffe.npz") as c, np.load(work / f"{tag}_ours.npz") as o:
        return {k: c[k] for k in c.files}, {k: o[k] for k in o.files}


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    pycaffe = patched_caffe()
    work = tmp_path_factory.mktemp("recurrent_flow")
    (work / "model.prototxt").write_text(MODEL)
    Net(str(work / "model.prototxt"), TEST).save(str(work / "model.caffemodel"))  # the fillers' weights
    graph, cal_proto, cal_weights = calibration_model(work, work / "model.prototxt", work / "model.caffemodel", 2,
                                                      name="calibration")
    record = work / "record.txt"
    caffe_record, caffe_proto = work / "record_caffe.txt", work / "calibration_caffe.prototxt"
    shutil.copy(record, caffe_record)
    text = (work / "calibration.prototxt").read_text()
    assert 'type: "LSTMCalibration"' in text and 'type: "RNNCalibration"' in text
    caffe_proto.write_text(text.replace(f'"{record}"', f'"{caffe_record}"'))
    rng = np.random.default_rng(1414)
    batches = _batches(rng, 2)
    np.savez(work / "cal_batches.npz", **batches)
    # Each side runs its own copy of the calibration model (they differ in the record path only).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pycaffe), str(REPO)]), GLOG_minloglevel="2",
               GLOG_logtostderr="1")
    res = subprocess.run([sys.executable, "-c", CAFFE_FORWARD, str(caffe_proto), str(cal_weights),
                          str(work / "cal_batches.npz"), str(work / "cal_caffe.npz")],
                         env=env, capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    net = Net(cal_proto, cal_weights, TEST, ifmr="exact")
    for b in range(2):
        net.forward(x=batches[f"x{b}"], cont=batches[f"cont{b}"])
    amct.save_model(graph, "Both", str(work / "out/seq"))
    fake = (work / "out/seq_fake_quant_model.prototxt", work / "out/seq_fake_quant_weights.caffemodel")
    assert 'type: "LSTMQuant"' in fake[0].read_text() and 'type: "RNNQuant"' in fake[0].read_text()
    held_out = _batches(rng, 2)
    blobs = _run_both(pycaffe, *fake, held_out, work, "fake")
    return dict(record=read_record(record), caffe_record=read_record(caffe_record), blobs=blobs)


def test_the_calibration_records_agree(flow):
    ours, caffe = flow["record"], flow["caffe_record"]
    assert ours.layers.keys() == caffe.layers.keys() == {"lstm1", "rnn2", "fc"}
    worst = 0.0
    for name, e in ours.layers.items():
        c = caffe.layer(name)
        assert (c.scale_w, c.offset_w, c.scale_r, c.offset_r) == (e.scale_w, e.offset_w, e.scale_r, e.offset_r)
        assert [a.index for a in c.record_d] == [a.index for a in e.record_d] and e.record_d
        for a, b in zip(e.record_d, c.record_d, strict=True):
            assert (b.offset_d, b.num_bits_d) == (a.offset_d, a.num_bits_d), name
            worst = max(worst, abs(b.scale_d - a.scale_d) / a.scale_d)
        if name != "fc":
            assert c.offset_h == e.offset_h, name
            worst = max(worst, abs(c.scale_h - e.scale_h) / e.scale_h)
        else:
            assert c.scale_h is None and e.scale_h is None
    assert worst <= SCALE_RTOL, worst
    _LOG.info("recurrent flow: worst scale_d / scale_h relative difference %.3g", worst)


def test_the_fake_quant_models_agree(flow):
    caffe, ours = flow["blobs"]
    # Caffe also lists the Split layers' tops it inserts (cont feeds both recurrent layers).
    assert set(ours) <= set(caffe) and all("_split_" in k for k in set(caffe) - set(ours))
    worst = {}
    for key in ours:
        want = caffe[key]
        scale = max(float(np.max(np.abs(want))), 1e-3)
        err = float(np.max(np.abs(ours[key].astype(np.float64) - want))) / scale
        worst[key] = err
        assert err <= OUTPUT_TOL, (key, err)
    _LOG.info("recurrent flow: fake-quant blobs, worst relative difference %s",
              json.dumps({k: f"{v:.3g}" for k, v in worst.items() if v}))
