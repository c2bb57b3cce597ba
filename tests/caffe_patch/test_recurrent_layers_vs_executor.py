"""The recurrent calibration and fake-quant layers in patched real Caffe and in the executor.

Opt-in (AMCT_REAL_CAFFE; the patched build is patched_caffe.py's cache). One script (SCRIPT) runs
every case on both sides through the pycaffe API: in a subprocess with the patched Caffe as
``caffe``, and in this process with ``amct_caffe.runtime`` as ``caffe``. Each case is a small random
LSTM or RNN (T, N, 3- or 4-axis x, cont restarts mid-batch, x_static, expose_hidden, state carried
between forwards) run as three nets with the same weights and inputs, batch_num + 1 forwards each:

- the plain LSTM / RNN (Caffe's own layer);
- LSTMCalibration / RNNCalibration: its tops equal Caffe's LSTM / RNN bit for bit; after batch_num
  forwards it writes scale_h / offset_h into a record that already holds other entries and fields
  (kept); the executor's layer writes the same values (within 1e-6 relative; measured equal);
- LSTMQuant / RNNQuant with a fixed w_h_quant_param: tops equal the executor's (within 1e-5 of the
  tops' scale) and differ from the float layer's (the quantizer bites).

Measured: the RNN cases and the static LSTM bit-identical on both sides, the other LSTM tops within
6e-8 of their scale (the executor's LSTM differs from Caffe's by float32 ulps, docs/recurrent.md).

Also: what either layer refuses (Caffe aborts with our message).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import amct_caffe.runtime as executor
from amct_caffe.io.record import parse_record_text
from tests.caffe_patch.patched_caffe import REPO, patched_caffe

pytestmark = [pytest.mark.real_caffe, pytest.mark.slow]

F32 = np.float32

# Runs spec.json's cases with whatever module is ``caffe``; returns {key: array}.
SCRIPT = r'''
import json
import numpy as np

def run(caffe, work):
    with open(work + "/spec.json") as f:
        spec = json.load(f)
    load = lambda name: np.load(f"{work}/{name}.npy")
    out = {}
    for case, sc in spec.items():
        for kind, proto in sc["nets"].items():
            net = caffe.Net(proto, caffe.TEST)
            for i, w in enumerate(sc["weights"]):
                net.params["rec"][i].data[...] = load(w)
            for b, feed in enumerate(sc["feeds"]):
                for blob, name in feed.items():
                    net.blobs[blob].data[...] = load(name)
                net.forward()
                for top in sc["tops"]:
                    out[f"{case}/{kind}/{b}/{top}"] = np.array(net.blobs[top].data)
                if kind == "calib":
                    with open(sc["record"], "rb") as f:
                        out[f"{case}/record/{b}"] = np.frombuffer(f.read(), np.uint8)
    return out
'''

CAFFE_MAIN = SCRIPT + r'''
import sys
import caffe
caffe.set_mode_cpu()
np.savez(sys.argv[1] + "/out.npz", **run(caffe, sys.argv[1] + "/caffe"))
'''

# name: (type, T, N, x sample shape, num_output, static input size or 0, expose_hidden,
#        batch_num, hidden-state IFMR settings, w_h_quant_param)
CASES = {
    "lstm": ("LSTM", 5, 3, (4,), 6, 0, False, 2, "with_offset: true", "scale: 120.0 offset: -3"),
    "lstm_static_exposed": ("LSTM", 4, 2, (3, 2), 5, 3, True, 2, "with_offset: false",
                            "scale: 31.75 offset: 0 num_bits_d: 8"),
    "lstm_one_step_12bit": ("LSTM", 1, 4, (3,), 4, 0, False, 3, "with_offset: true num_bits: 12",
                            "scale: 200.0 offset: 17 num_bits_d: 12 with_offset: true"),
    "rnn": ("RNN", 6, 2, (3,), 5, 0, False, 3, "with_offset: true", "scale: 100.0 offset: 2"),
    "rnn_static_exposed": ("RNN", 3, 3, (2, 2), 4, 2, True, 2, "with_offset: false", "scale: 25.0 offset: 0"),
}
IFMR = ("max_percentile: 0.999999 min_percentile: 0.999999 search_range_start: 0.7 search_range_end: 1.3 "
        "search_step: 0.01")
# The record the calibration layer starts from: its layer's entry already holds weight factors and
# an x record, and another layer's entry; both must survive the update.
RECORD = ('record {\n  key: "conv0"\n  value {\n    scale_w: 0.25\n    offset_w: 0\n  }\n}\n'
          'record {\n  key: "rec"\n  value {\n    scale_w: 0.0125\n    offset_w: 0\n    scale_r: 0.02\n'
          '    offset_r: 0\n    record_d {\n      scale_d: 0.03\n      offset_d: -7\n      index: 0\n'
          '      num_bits_d: 8\n    }\n  }\n}\n')


def _blob_shapes(case) -> tuple[list, list[tuple], list[tuple], list[str]]:
    """(bottom names, their shapes, learned blob shapes, top names) of a case's recurrent layer."""
    kind, t, n, xs, h, static, expose = case[:7]
    bottoms, shapes = ["x", "cont"], [(t, n, *xs), (t, n)]
    if static:
        bottoms.append("xs")
        shapes.append((n, static))
    states = ["h0", "c0"] if kind == "LSTM" else ["h0"]
    tops = ["y"]
    if expose:
        bottoms += states
        shapes += [(1, n, h)] * len(states)
        tops += ["hT", "cT"][:len(states)]
    d = int(np.prod(xs))
    if kind == "LSTM":  # W_xc, b_c, [W_xc_static], W_hc
        weights = [(4 * h, d), (4 * h,)] + ([(4 * h, static)] if static else []) + [(4 * h, h)]
    else:  # W_xh, b_h, [W_xh_static], W_hh, W_ho, b_o
        weights = [(h, d), (h,)] + ([(h, static)] if static else []) + [(h, h), (h, h), (h,)]
    return bottoms, shapes, weights, tops


def net_text(name: str, layer_type: str, extra: str) -> str:
    case = CASES[name]
    bottoms, shapes, _, tops = _blob_shapes(case)
    dims = "".join(" shape {" + "".join(f" dim: {d}" for d in s) + " }" for s in shapes)
    inputs = "".join(f' top: "{b}"' for b in bottoms)
    expose = " expose_hidden: true" if case[6] else ""
    return (f'layer {{ name: "data" type: "Input"{inputs} input_param {{{dims} }} }}\n'
            f'layer {{ name: "rec" type: "{layer_type}"' + "".join(f' bottom: "{b}"' for b in bottoms) +
            "".join(f' top: "{t}"' for t in tops) +
            f' recurrent_param {{ num_output: {case[4]}{expose} }} {extra} }}\n')


def _scenarios(work) -> tuple[dict, dict]:
    """(spec per side, inputs): the cases both sides run, with each side's own record file."""
    rng = np.random.default_rng(14)
    inputs: dict[str, np.ndarray] = {}
    specs: dict[str, dict] = {"caffe": {}, "executor": {}}
    for name, case in CASES.items():
        kind, t, n, xs, h, static, expose, batch_num, ifmr, wq = case
        bottoms, shapes, weights, tops = _blob_shapes(case)
        names = []
        for i, shape in enumerate(weights):
            inputs[f"{name}_w{i}"] = rng.uniform(-0.7, 0.7, shape).astype(F32)
            names.append(f"{name}_w{i}")
        feeds = []
        for b in range(batch_num + 1):  # one forward past batch_num: nothing more is recorded
            feed = {}
            for blob, shape in zip(bottoms, shapes, strict=True):
                key = f"{name}_{blob}{b}"
                if blob == "cont":
                    cont = np.ones(shape, F32)
                    cont[0, : 1 + b % 2] = 0  # new sequences at t=0 in some streams
                    if t > 2:
                        cont[t // 2, n - 1] = 0  # a restart mid-batch
                    inputs[key] = cont
                else:
                    inputs[key] = (rng.standard_normal(shape) * (1.5 if blob == "x" else 0.8)).astype(F32)
                feed[blob] = key
            feeds.append(feed)
        for side, spec in specs.items():
            (work / side).mkdir(exist_ok=True)
            record = work / side / f"{name}_record.txt"
            record.write_text(RECORD)
            calib = (f'lstm_calibration_param {{ ifmr_param {{ batch_num: {batch_num} {ifmr} {IFMR} '
                     f'object_layer: "rec" record_file_path: "{record}" }} }}')
            quant = f'lstm_quant_param {{ w_h_quant_param {{ {wq} object_layer: "rec" }} }}'
            nets = {"float": net_text(name, kind, ""), "calib": net_text(name, f"{kind}Calibration", calib),
                    "quant": net_text(name, f"{kind}Quant", quant)}
            paths = {}
            for net, text in nets.items():
                paths[net] = str(work / side / f"{name}_{net}.prototxt")
                (work / side / f"{name}_{net}.prototxt").write_text(text)
            spec[name] = {"nets": paths, "weights": names, "feeds": feeds, "tops": tops, "record": str(record)}
    return specs, inputs


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """(Caffe's outputs, the executor's outputs)."""
    pycaffe = patched_caffe()
    work = tmp_path_factory.mktemp("recurrent_vs_executor")
    specs, inputs = _scenarios(work)
    for key, value in inputs.items():
        for side in specs:
            np.save(work / side / f"{key}.npy", value)
    for side, spec in specs.items():
        (work / side / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pycaffe), str(REPO)]), GLOG_minloglevel="2",
               GLOG_logtostderr="1")
    res = subprocess.run([sys.executable, "-c", CAFFE_MAIN, str(work)], env=env, capture_output=True, text=True,
                         timeout=900, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    with np.load(work / "out.npz") as z:
        caffe_out = {k: z[k] for k in z.files}
    scope: dict = {}
    exec(compile(SCRIPT, "SCRIPT", "exec"), scope)  # noqa: S102 - the very script Caffe ran
    return caffe_out, scope["run"](executor, str(work / "executor"))


def _forwards(name: str) -> range:
    return range(CASES[name][7] + 1)


def _tops(name: str) -> list[str]:
    return _blob_shapes(CASES[name])[3]


def _max_rel_diff(want: np.ndarray, got: np.ndarray) -> float:
    """max |got - want| over the array's largest magnitude (the project's measure for float noise)."""
    scale = max(float(np.max(np.abs(want))), 1e-3)
    return float(np.max(np.abs(got.astype(np.float64) - want))) / scale


@pytest.mark.parametrize("name", list(CASES))
def test_calibration_layer_computes_caffes_lstm_and_rnn_exactly(both, name):
    caffe_out, ours = both
    for b in _forwards(name):
        for top in _tops(name):
            want = caffe_out[f"{name}/float/{b}/{top}"]
            np.testing.assert_array_equal(caffe_out[f"{name}/calib/{b}/{top}"], want, err_msg=f"{name} {b} {top}")
            assert _max_rel_diff(want, ours[f"{name}/calib/{b}/{top}"]) <= 1e-5, (name, b, top)


def _record(out: dict, name: str, b: int):
    return parse_record_text(out[f"{name}/record/{b}"].tobytes().decode())


@pytest.mark.parametrize("name", list(CASES))
def test_calibration_layer_writes_the_executors_scale_h_and_keeps_the_rest(both, name):
    caffe_out, ours = both
    batch_num = CASES[name][7]
    start = parse_record_text(RECORD)
    for b in range(batch_num - 1):  # nothing is written before batch_num forwards
        assert _record(caffe_out, name, b) == start
    theirs, mine = _record(caffe_out, name, batch_num - 1), _record(ours, name, batch_num - 1)
    entry, want = theirs.layer("rec"), mine.layer("rec")
    assert entry.scale_h is not None and entry.scale_h > 0
    assert abs(entry.scale_h - want.scale_h) <= 1e-6 * want.scale_h, (entry.scale_h, want.scale_h)
    assert entry.offset_h == want.offset_h
    if "with_offset: false" in CASES[name][8]:
        assert entry.offset_h == 0
    # Everything else of the record is as it was (the weight factors, x's record_d, the other layer).
    entry.scale_h, entry.offset_h = start.layer("rec").scale_h, start.layer("rec").offset_h
    assert theirs == start
    # The forward past batch_num writes nothing.
    assert caffe_out[f"{name}/record/{batch_num}"].tobytes() == caffe_out[f"{name}/record/{batch_num - 1}"].tobytes()


@pytest.mark.parametrize("name", list(CASES))
def test_quant_layer_equals_the_executors(both, name):
    caffe_out, ours = both
    for b in _forwards(name):
        for top in _tops(name):
            want = ours[f"{name}/quant/{b}/{top}"]
            got = caffe_out[f"{name}/quant/{b}/{top}"]
            assert _max_rel_diff(want, got) <= 1e-5, (name, b, top, _max_rel_diff(want, got))
    # The quantizer bites: the sequence output is not the float layer's (from the first forward
    # that starts from a non-zero state: fq(0) = 0).
    assert max(_max_rel_diff(caffe_out[f"{name}/float/{b}/y"], caffe_out[f"{name}/quant/{b}/y"])
               for b in _forwards(name)) > 1e-4


REFUSALS = {  # name: (layer type, its parameters, extra net text, what Caffe's abort message says)
    "no_quant_param": ("LSTMQuant", "", "",
                       "needs lstm_quant_param.w_h_quant_param"),
    "bad_hidden_bits": ("RNNQuant", "lstm_quant_param { w_h_quant_param { scale: 100 num_bits_d: 4 } }", "",
                        "w_h_quant_param.num_bits_d must be in [8, 16], got 4"),
    "two_object_layers": ("LSTMCalibration", f'lstm_calibration_param {{ ifmr_param {{ batch_num: 1 {IFMR} '
                          'object_layer: "a" object_layer: "b" record_file_path: "r.txt" } }', "",
                          "must name exactly one layer"),
    "backward": ("RNNQuant", "lstm_quant_param { w_h_quant_param { scale: 100 } }",
                 'layer { name: "t" type: "Input" top: "t" input_param { shape { dim: 5 dim: 3 dim: 4 } } }\n'
                 'layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }\n',
                 "has no backward: the fake-quant model is run forward only"),
}
REFUSE_MAIN = r'''
import sys
import caffe
caffe.set_mode_cpu()
net = caffe.Net(sys.argv[1], caffe.TRAIN)
net.forward()
net.backward()
print("no abort")
'''


@pytest.mark.parametrize("name", list(REFUSALS))
def test_what_the_layers_refuse(tmp_path, name):
    layer_type, params, extra, message = REFUSALS[name]
    text = ('layer { name: "data" type: "Input" top: "x" top: "cont" input_param { shape { dim: 5 dim: 3 dim: 2 } '
            'shape { dim: 5 dim: 3 } } }\n'
            f'layer {{ name: "rec" type: "{layer_type}" bottom: "x" bottom: "cont" top: "y" '
            f'recurrent_param {{ num_output: 4 }} {params} }}\n' + extra)
    (tmp_path / "net.prototxt").write_text(text)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(patched_caffe()), str(REPO)]), GLOG_minloglevel="2",
               GLOG_logtostderr="1")
    res = subprocess.run([sys.executable, "-c", REFUSE_MAIN, str(tmp_path / "net.prototxt")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode != 0 and "no abort" not in res.stdout
    assert f"layer 'rec' ({layer_type}): " in res.stderr and message in res.stderr, res.stderr[-2000:]
