"""The quantized and calibration forms of LSTM and RNN against independent references.

* LSTMQuant / RNNQuant (fake-quant): a float64 NumPy cell written from docs/recurrent.md with the
  hidden state fake-quantized before its products.
* LSTMCalibration / RNNCalibration: the tops equal the float layer's bit for bit, and scale_h /
  offset_h are IFMR's on the hidden inputs rebuilt from the float layer's tops.
* the deploy form (int8 weights, int32 biases, integer x codes) against the fake-quant form.
"""

from __future__ import annotations

import numpy as np
import pytest

from amct_caffe.errors import GraphError
from amct_caffe.io.record import read_record
from amct_caffe.quant import IfmrParams, ifmr_search
from amct_caffe.runtime import Net

T, N, D, DS, H = 5, 3, 4, 3, 6
RNG = np.random.default_rng(7)


def _type(kind: str) -> str:
    return kind.split("_")[0]   # "GRU_after": a GRU with linear_before_reset


def _prototxt(kind: str, layer_type: str, extra: str = "", static: bool = False, expose: bool = False) -> str:
    states = (2 if kind == "LSTM" else 1) if expose else 0
    reset = " linear_before_reset: 1" if kind == "GRU_after" else ""
    inputs = [("x", (T, N, D)), ("cont", (T, N))] + ([("s", (N, DS))] if static else [])
    inputs += [(f"h{k}", (1, N, H)) for k in range(states)]
    text = "".join(f'layer {{ name: "{b}" type: "Input" top: "{b}" input_param {{ shape {{ '
                   + " ".join(f"dim: {d}" for d in shape) + " } } }\n" for b, shape in inputs)
    tops = ['top: "y"'] + [f'top: "hT{k}"' for k in range(states)]
    bottoms = " ".join(f'bottom: "{b}"' for b, _ in inputs)
    return text + (f'layer {{ name: "r" type: "{layer_type}" {bottoms} {" ".join(tops)} recurrent_param {{ '
                   f"num_output: {H} expose_hidden: {str(expose).lower()}{reset} }} {extra} }}\n")


def _weights(kind: str, static: bool) -> list[np.ndarray]:
    rows = {"LSTM": 4 * H, "RNN": H}.get(kind, 3 * H)
    w = [RNG.uniform(-0.6, 0.6, (rows, D)), RNG.uniform(-0.3, 0.3, rows)]
    if static:
        w.append(RNG.uniform(-0.6, 0.6, (rows, DS)))
    if kind.startswith("GRU"):   # R_z, R_r, R_h [, Rb_h]
        w += [RNG.uniform(-0.6, 0.6, (H, H)) for _ in range(3)]
        return [a.astype(np.float32) for a in w + ([RNG.uniform(-0.3, 0.3, H)] if kind == "GRU_after" else [])]
    w.append(RNG.uniform(-0.6, 0.6, (rows, H)))
    if kind == "RNN":
        w += [RNG.uniform(-0.6, 0.6, (H, H)), RNG.uniform(-0.3, 0.3, H)]
    return [a.astype(np.float32) for a in w]


def _inputs(static: bool, expose: bool, kind: str) -> dict[str, np.ndarray]:
    cont = np.ones((T, N), np.float32)
    cont[0] = 0
    cont[3, 1] = 0  # a new sequence mid-batch in stream 1
    feed = {"x": RNG.normal(0, 1, (T, N, D)).astype(np.float32), "cont": cont}
    if static:
        feed["s"] = RNG.normal(0, 1, (N, DS)).astype(np.float32)
    for k in range((2 if kind == "LSTM" else 1) if expose else 0):
        feed[f"h{k}"] = RNG.uniform(-0.5, 0.5, (1, N, H)).astype(np.float32)
    return feed


def _net(tmp_path, text: str, weights: list[np.ndarray], name: str) -> Net:
    path = tmp_path / f"{name}.prototxt"
    path.write_text(text)
    net = Net(str(path), phase=1)
    for blob, w in zip(net.params["r"], weights, strict=True):
        blob.data[...] = w
    return net


def _run(net: Net, feed: dict) -> dict[str, np.ndarray]:
    for k, v in feed.items():
        net.blobs[k].data[...] = v
    net.forward()
    return {k: net.blobs[k].data.copy() for k in net.blobs}


def _fq(v, scale_h: float, offset_h: int, bits: int = 8):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = np.trunc(v / scale_h + np.copysign(0.5, v))  # round half away from zero
    return (np.clip(q + offset_h, lo, hi) - offset_h) * scale_h


def _reference(kind: str, feed: dict, w: list[np.ndarray], static: bool, expose: bool, quant):
    """float64 cell of docs/recurrent.md; ``quant`` applied to every hidden-state product input."""
    w = [a.astype(np.float64) for a in w]
    x, cont = feed["x"].astype(np.float64), feed["cont"].astype(np.float64)
    k = 3 if static else 2
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    h = feed["h0"][0].astype(np.float64) if expose else np.zeros((N, H))
    c = (feed["h1"][0].astype(np.float64) if expose else np.zeros((N, H))) if kind == "LSTM" else None
    extra = feed["s"].astype(np.float64) @ w[2].T if static else 0
    outs = []
    for t in range(T):
        if kind.startswith("GRU"):
            hc = cont[t][:, None] * h
            g = x[t] @ w[0].T + w[1] + extra
            z = sig(quant(hc) @ w[k].T + g[:, :H])
            r = sig(quant(hc) @ w[k + 1].T + g[:, H:2 * H])
            a = r * (quant(hc) @ w[k + 2].T + w[k + 3]) if kind == "GRU_after" else quant(r * hc) @ w[k + 2].T
            n = np.tanh(a + g[:, 2 * H:])
            h = n + z * (hc - n)
            outs.append(h)
            continue
        z = quant(cont[t][:, None] * h) @ w[k].T + x[t] @ w[0].T + w[1] + extra
        if kind == "LSTM":
            i, f, o, g = sig(z[:, :H]), sig(z[:, H:2 * H]) * cont[t][:, None], sig(z[:, 2 * H:3 * H]), \
                np.tanh(z[:, 3 * H:])
            c = f * c + i * g
            h = o * np.tanh(c)
            outs.append(h)
        else:
            h = np.tanh(z)
            outs.append(np.tanh(quant(h) @ w[k + 1].T + w[k + 2]))
    return np.stack(outs)


CASES = [(kind, static, expose) for kind in ("LSTM", "RNN", "GRU", "GRU_after") for static, expose in
         ((False, False), (True, False), (False, True), (True, True))]


@pytest.mark.parametrize("kind,static,expose", CASES)
def test_fake_quant_form_matches_the_reference_cell(kind, static, expose, tmp_path):
    w, feed = _weights(kind, static), _inputs(static, expose, kind)
    scale_h, offset_h = 0.0123, -7
    extra = (f"lstm_quant_param {{ w_h_quant_param {{ scale: {1 / scale_h!r} offset: {offset_h} with_offset: true "
             "num_bits_d: 8 } }")
    net = _net(tmp_path, _prototxt(kind, f"{_type(kind)}Quant", extra, static, expose), w, "q")
    got = _run(net, feed)["y"]
    s = float(np.float32(1) / np.float32(np.float32(1 / scale_h)))
    want = _reference(kind, feed, w, static, expose, lambda v: _fq(v, s, offset_h))
    assert np.abs(got - want).max() < 1e-5
    plain = _reference(kind, feed, w, static, expose, lambda v: v)
    assert np.abs(plain - want).max() > 1e-3  # the quantizer acts: the test would see it missing


@pytest.mark.parametrize("kind,static,expose", CASES)
def test_calibration_form_computes_the_float_layer_and_records_ifmr_of_the_hidden_inputs(kind, static, expose,
                                                                                        tmp_path):
    w = _weights(kind, static)
    record = tmp_path / "record.txt"
    extra = (f'lstm_calibration_param {{ ifmr_param {{ batch_num: 2 with_offset: true search_range_start: 0.7 '
             f'search_range_end: 1.3 search_step: 0.01 max_percentile: 0.999999 min_percentile: 0.999999 '
             f'object_layer: "rec" record_file_path: "{record}" }} }}')
    calib = _net(tmp_path, _prototxt(kind, f"{_type(kind)}Calibration", extra, static, expose), w, "c")
    plain = _net(tmp_path, _prototxt(kind, _type(kind), "", static, expose), w, "p")
    observed = []
    for _ in range(2):
        feed = _inputs(static, expose, kind)
        got, want = _run(calib, feed), _run(plain, feed)
        for blob in want:
            np.testing.assert_array_equal(got[blob], want[blob])
        # the hidden-state inputs of the products, in the order the steps read them, rebuilt
        # from the float layer: LSTM from its output h_1..h_T; RNN and GRU from the states it kept
        if kind == "LSTM":
            h_prev = np.concatenate([feed["h0"] if expose else np.zeros((1, N, H), np.float32), want["y"][:-1]])
            observed.append(h_prev * feed["cont"][..., None])
        elif kind.startswith("GRU"):   # h~ for R_z and R_r, then R_h's input: r * h~ (or h~ after the reset)
            steps = plain.layer_dict["r"]._cache["steps"]   # (h~, z, r, r * h~ | R_h h~ + Rb_h, n, h~ - n)
            observed.append(np.stack([v for hc, _, r, lin, *_ in steps
                                      for v in (hc, hc, hc if kind == "GRU_after" else lin)]))
        else:
            hidden = plain.layer_dict["r"]._cache["hidden"]   # h_1 .. h_T (N, H)
            h_prev = [feed["h0"][0] if expose else np.zeros((N, H), np.float32)] + hidden[:-1]
            steps = [(hp * feed["cont"][t][:, None], hidden[t]) for t, hp in enumerate(h_prev)]
            observed.append(np.stack([v for pair in steps for v in pair]))
    result = ifmr_search([o.ravel() for o in observed], IfmrParams())
    entry = read_record(record).layer("rec")
    assert entry.scale_h == pytest.approx(float(np.float32(result.scale)), rel=0, abs=0)
    assert entry.offset_h == result.offset
    assert not entry.scale_w and not entry.record_d  # it writes only the hidden state's factors


@pytest.mark.parametrize("kind", ["LSTM", "RNN", "GRU"])
def test_quantized_forms_refuse_backward(kind, tmp_path):
    extra = "lstm_quant_param { w_h_quant_param { scale: 100 offset: 0 } }"
    net = _net(tmp_path, _prototxt(kind, f"{kind}Quant", extra), _weights(kind, False), "q")
    _run(net, _inputs(False, False, kind))
    with pytest.raises(GraphError, match="'r' .* has no backward"):
        net.layer_dict["r"].backward([np.ones((T, N, H), np.float32)], [True, False], [], [])


def test_bad_hidden_quant_scale_is_refused_naming_the_layer(tmp_path):
    extra = "lstm_quant_param { w_h_quant_param { scale: 0 offset: 0 } }"
    with pytest.raises(Exception, match="layer 'r' \\(LSTMQuant\\): lstm_quant_param.w_h_quant_param"):
        _net(tmp_path, _prototxt("LSTM", "LSTMQuant", extra), _weights("LSTM", False), "q")
