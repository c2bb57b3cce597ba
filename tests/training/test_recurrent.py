"""RNN, LSTM and LSTMUnit: forward and backward of the executor against official Caffe, blob by blob.

Every case runs in real Caffe (its unrolled internal net), which fills the learned blobs and saves
the caffemodel the executor then loads: the blob layout and gate order are checked by the param
data and diffs agreeing. ``cont`` is always an Input of 0/1 values set here.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.real_caffe import pycaffe_dir
from tests.training.gradcheck import (assert_matches_caffe, caffe_grads, cont_indicators, executor_grads, grad_problems,
                                      input_layer as _input, run_in_caffe)

FORCE = "force_backward: true\n"


def _recurrent(kind, t, n, xdims, hidden, *, static=None, expose=False, force=True, params="", after=""):
    """A net of Inputs and one ``kind`` layer named "rnn" (top "y"), plus ``after`` text."""
    text = (FORCE if force else "") + _input("x", t, n, *xdims) + _input("cont", t, n)
    bottoms = ["x", "cont"]
    tops = ["y"]
    if static is not None:
        text += _input("xs", n, *static)
        bottoms.append("xs")
    if expose:
        states = ["h0", "c0"] if kind == "LSTM" else ["h0"]
        for s in states:
            text += _input(s, 1, n, hidden)
        bottoms += states
        tops += ["hT", "cT"] if kind == "LSTM" else ["hT"]
    rp = f"num_output: {hidden}" + (" expose_hidden: true" if expose else "")
    rp += ' weight_filler { type: "uniform" min: -0.3 max: 0.3 } bias_filler { type: "constant" value: 0.1 }'
    text += (f'layer {{ name: "rnn" type: "{kind}" ' + " ".join(f'bottom: "{b}"' for b in bottoms) + " "
             + " ".join(f'top: "{tp}"' for tp in tops) + f" recurrent_param {{ {rp} }} {params} }}\n")
    return text + after


# name -> (prototxt, {input: shape}, cont pattern, phase, options)
def _cases():
    cases = {}
    for kind in ("LSTM", "RNN"):
        k = kind.lower()
        cases.update({
            f"{k}_basic": (_recurrent(kind, 3, 2, (4,), 5), "first", "TRAIN", {}),
            f"{k}_one_step": (_recurrent(kind, 1, 3, (2,), 3), "first", "TRAIN", {}),
            f"{k}_x4d_restart": (_recurrent(kind, 5, 4, (2, 3), 4), "restart", "TRAIN", {}),
            f"{k}_static": (_recurrent(kind, 4, 3, (3,), 4, static=(2, 3)), "restart", "TRAIN", {}),
            f"{k}_expose": (_recurrent(kind, 4, 2, (3,), 3, expose=True), "ones", "TRAIN", {}),
            f"{k}_expose_static_restart": (_recurrent(kind, 4, 3, (2,), 3, static=(5,), expose=True), "restart",
                                           "TRAIN", {}),
            f"{k}_test_phase": (_recurrent(kind, 3, 2, (4,), 3, static=(3,), expose=True), "ones", "TEST", {}),
            # an in-place layer on the final state: Caffe's last step reads that memory in backward
            f"{k}_expose_in_place": (_recurrent(kind, 3, 2, (3,), 3, expose=True, after=(
                'layer { name: "s" type: "Sigmoid" bottom: "hT" top: "hT" }\n' + (
                    'layer { name: "s2" type: "Sigmoid" bottom: "cT" top: "cT" }\n' if kind == "LSTM" else ""))),
                "restart", "TRAIN", {}),
            # GEMMs of some size: K = 60 for the inputs, M = T * N = 48
            f"{k}_wide": (_recurrent(kind, 6, 8, (60,), 24, static=(40,)), "restart", "TRAIN", {}),
            # the final state of forward 0 is forward 1's initial state (cont = 1 at t = 0 there)
            f"{k}_state_carried": (_recurrent(kind, 3, 2, (3,), 4), "first", "TRAIN",
                                   {"forwards": 2, "cont#1": "ones"}),
            # no force_backward, a loss below: Caffe still writes x's diff
            f"{k}_loss_no_force": (_recurrent(kind, 3, 2, (3,), 4, force=False, after=(
                _input("target", 3, 2, 4) + 'layer { name: "loss" type: "EuclideanLoss" bottom: "y" '
                'bottom: "target" top: "loss" }\n')), "restart", "TRAIN", {}),
            # lr_mult 0: the unrolled net accumulates the parameter diffs regardless
            f"{k}_lr_mult_zero": (_recurrent(kind, 3, 2, (3,), 3, params=" ".join(
                ["param { lr_mult: 0 }"] * (3 if kind == "LSTM" else 5))), "first", "TRAIN", {}),
        })
    cases["lstm_unit"] = (FORCE + _input("c", 1, 3, 4) + _input("g", 1, 3, 16) + _input("cont", 1, 3)
                          + 'layer { name: "u" type: "LSTMUnit" bottom: "c" bottom: "g" bottom: "cont" '
                          'top: "c1" top: "h1" }\n', "unit", "TRAIN", {})
    return cases


CASES = _cases()


def _inputs(text: str, pattern: str, options: dict, rng) -> dict:
    """Random inputs for every Input of ``text``; ``cont`` from ``pattern``."""
    import re  # noqa: PLC0415

    arrays = {}
    for name, dims in re.findall(r'top: "(\w+)" input_param \{ shape \{ ([^}]*) \}', text):
        shape = tuple(int(d) for d in re.findall(r"\d+", dims))
        if name == "cont":
            arrays[name] = (np.array([[0, 1, 1]], np.float32) if pattern == "unit"
                            else cont_indicators(pattern, *shape))
        else:
            arrays[name] = rng.standard_normal(shape).astype(np.float32)
    for key, value in options.items():
        if key == "cont#1":
            arrays[key] = cont_indicators(value, *arrays["cont"].shape)
            arrays["x#1"] = rng.standard_normal(arrays["x"].shape).astype(np.float32)
    return arrays


@pytest.fixture(scope="module")
def caffe_results(tmp_path_factory):
    if pycaffe_dir() is None:
        pytest.skip("AMCT_REAL_CAFFE is not set")
    workdir = tmp_path_factory.mktemp("recurrent")
    rng = np.random.default_rng(5)
    cases = []
    for name, (text, pattern, phase, options) in CASES.items():
        arrays = _inputs(text, pattern, options, rng)
        runner_options = {k: v for k, v in options.items() if k == "forwards"}
        cases.append((name, f'name: "{name}"\n' + text, arrays, phase, runner_options))
    return workdir, run_in_caffe(workdir, cases)


@pytest.mark.real_caffe
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_caffe(caffe_results, case):
    workdir, results = caffe_results
    assert_matches_caffe(workdir, results, case, CASES[case][2])


@pytest.mark.real_caffe
@pytest.mark.parametrize("case", ["lstm_basic", "lstm_x4d_restart", "lstm_unit", "lstm_wide", "rnn_basic",
                                  "rnn_static", "rnn_wide"])
def test_matches_caffe_closely(caffe_results, case):
    """The unrolled net's float32 arithmetic is reproduced, not only approximated: 1e-6 of each blob's scale
    (most of them bit for bit; an RNN with NumPy's tanh instead of glibc's tanhf is off by 5e-7)."""
    workdir, _ = caffe_results
    ours = executor_grads(workdir, case, CASES[case][2])
    assert grad_problems(caffe_grads(workdir, case), ours, rtol=1e-6) == []


@pytest.mark.real_caffe
@pytest.mark.parametrize("kind,expected", [
    ("lstm", [(16, 3), (16,), (16, 6), (16, 4)]),
    ("rnn", [(4, 3), (4,), (4, 6), (4, 4), (4, 4), (4,)]),
])
def test_caffemodel_blob_layout(caffe_results, kind, expected):
    """A caffemodel Caffe wrote loads with Caffe's blob order and shapes (x_static flattened from axis 1)."""
    from amct_caffe.runtime import TRAIN, Net  # noqa: PLC0415

    workdir, _ = caffe_results
    name = f"{kind}_static"
    ref = caffe_grads(workdir, name)
    net = Net(str(workdir / f"{name}.prototxt"), str(workdir / f"{name}.caffemodel"), TRAIN)
    assert [b.data.shape for b in net.params["rnn"]] == expected
    for i, blob in enumerate(net.params["rnn"]):
        np.testing.assert_array_equal(blob.data, ref[f"pdata/rnn/{i}"])


@pytest.mark.real_caffe
def test_hidden_state_diffs_stay_zero(caffe_results):
    """Caffe shares h0 / c0's data with its unrolled net, not their diffs: no gradient reaches them."""
    workdir, _ = caffe_results
    ref = caffe_grads(workdir, "lstm_expose")
    assert not ref["diff/h0"].any() and not ref["diff/c0"].any()
    assert ref["diff/x"].any()


@pytest.mark.parametrize("kind", ["LSTM", "RNN", "GRU"])
def test_expose_hidden_splits_a_sequence(tmp_path, kind):
    """Two halves chained through hT / cT -> h0 / c0 give the whole sequence's output (no Caffe needed)."""
    from amct_caffe.runtime import TEST, Net  # noqa: PLC0415

    t, n, d, hidden = 6, 3, 4, 5
    whole = tmp_path / "whole.prototxt"
    whole.write_text(_recurrent(kind, t, n, (d,), hidden, expose=True))
    half = tmp_path / "half.prototxt"
    half.write_text(_recurrent(kind, t // 2, n, (d,), hidden, expose=True))
    net = Net(str(whole), TEST)
    weights = tmp_path / "w.caffemodel"
    net.save(str(weights))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((t, n, d)).astype(np.float32)
    cont = cont_indicators("restart", t, n)
    states = {s: rng.standard_normal((1, n, hidden)).astype(np.float32)
              for s in (["h0", "c0"] if kind == "LSTM" else ["h0"])}
    full = {k: np.array(v) for k, v in net.forward(x=x, cont=cont, **states).items()}
    part = Net(str(half), str(weights), TEST)
    first = {k: np.array(v) for k, v in part.forward(x=x[:t // 2], cont=cont[:t // 2], **states).items()}
    nxt = {"h0": first["hT"]} | ({"c0": first["cT"]} if kind == "LSTM" else {})
    second = part.forward(x=x[t // 2:], cont=cont[t // 2:], **nxt)
    np.testing.assert_allclose(np.concatenate([first["y"], second["y"]]), full["y"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(second["hT"], full["hT"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["LSTM", "RNN", "GRU"])
def test_flatten_above_reaches_the_recurrent_layer_from_the_second_backward(tmp_path, kind):
    """Caffe's recurrent layer reads the top diff memory it saw at its last forward. A Flatten above
    points that top at its own diff only in its first backward, so that backward leaves every diff
    below zero (pinned against Caffe in test_backward_pinned); from the next forward on the gradient
    is the same as without the Flatten."""
    from amct_caffe.runtime import TEST, Net  # noqa: PLC0415

    t, n, d, hidden = 4, 3, 5, 6
    flatten = 'layer { name: "f" type: "Flatten" bottom: "y" top: "f" flatten_param { axis: 0 end_axis: 0 } }\n'
    plain, flat = tmp_path / "plain.prototxt", tmp_path / "flat.prototxt"
    plain.write_text(_recurrent(kind, t, n, (d,), hidden))
    flat.write_text(_recurrent(kind, t, n, (d,), hidden, after=flatten))
    weights = tmp_path / "w.caffemodel"
    Net(str(plain), TEST).save(str(weights))
    rng = np.random.default_rng(5)
    x = rng.standard_normal((t, n, d)).astype(np.float32)
    dy = rng.standard_normal((t, n, hidden)).astype(np.float32)
    feed = {"x": x, "cont": cont_indicators("restart", t, n)}
    ref = Net(str(plain), str(weights), TEST)
    ref.forward(**feed)
    want = np.array(ref.backward(y=dy)["x"])
    assert np.abs(want).max() > 0.01
    net = Net(str(flat), str(weights), TEST)
    for backward in range(2):
        net.forward(**feed)
        got = np.array(net.backward(f=dy)["x"])
        np.testing.assert_array_equal(got, np.zeros_like(want) if backward == 0 else want)


@pytest.mark.parametrize("kind,field,match", [
    ("RNN", "tf_rnn: true", "tf_rnn"),
    ("LSTM", 'direction: "reverse"', "direction 'reverse'"),
    ("LSTM", 'activations: "Sigmoid"', "activations"),
    ("RNN", "default_initial: true", "default_initial"),
])
def test_unimplemented_fork_fields_are_refused(tmp_path, kind, field, match):
    """synopsys-caffe's recurrent_param extensions parse, and a layer using one is refused by name."""
    from amct_caffe.errors import GraphError  # noqa: PLC0415
    from amct_caffe.runtime import TEST, Net  # noqa: PLC0415

    path = tmp_path / "net.prototxt"
    path.write_text(_recurrent(kind, 3, 2, (3,), 4).replace("num_output: 4", f"num_output: 4 {field}"))
    with pytest.raises(GraphError, match=rf"layer 'rnn' \({kind}\): recurrent_param {match}.* is not supported"):
        Net(str(path), TEST)


_STREAMS = (3, 2, 3, 4)  # fewer streams, as many as the first forward again, more than ever


@pytest.mark.real_caffe
@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_state_carried_when_the_number_of_streams_changes(tmp_path, kind):
    """Without expose_hidden each forward starts from the last one's final state, as Caffe's blob memory
    holds it: with fewer streams, streams 0..N-1 go on from theirs; back to a count the memory held
    before, the streams past the last forward's take what they had then; past it, all start from zero."""
    import json  # noqa: PLC0415

    from amct_caffe.runtime import TEST, Net  # noqa: PLC0415
    from tests.real_caffe import run_with_pycaffe  # noqa: PLC0415

    text = _recurrent(kind, 2, 3, (2,), 3)
    proto = tmp_path / "net.prototxt"
    proto.write_text(text)
    weights = tmp_path / "w.caffemodel"
    Net(str(proto), TEST).save(str(weights))
    script = f"""
import json, numpy as np, caffe
net = caffe.Net({str(proto)!r}, {str(weights)!r}, caffe.TEST)
out = []
for n in {_STREAMS!r}:
    net.blobs["x"].reshape(2, n, 2); net.blobs["cont"].reshape(2, n)
    net.blobs["x"].data[...] = np.arange(4 * n, dtype=np.float32).reshape(2, n, 2) / 10
    net.blobs["cont"].data[...] = 1
    net.reshape(); net.forward()
    out.append(net.blobs["y"].data.tolist())
print(json.dumps(out))
"""
    done = run_with_pycaffe(script)
    assert done.returncode == 0, done.stderr
    want = json.loads(done.stdout.strip().splitlines()[-1])
    net = Net(str(proto), str(weights), TEST)
    for n, expected in zip(_STREAMS, want, strict=True):
        x = np.arange(4 * n, dtype=np.float32).reshape(2, n, 2) / 10
        got = net.forward(x=x, cont=np.ones((2, n), np.float32))["y"]
        np.testing.assert_allclose(got, np.array(expected, np.float32), rtol=0, atol=1e-6)


def test_one_axis_static_input_is_refused(tmp_path):
    """Caffe's unrolled InnerProduct on x_static aborts on a 1-axis blob ("axis 1 out of range"): refused by name."""
    from amct_caffe.errors import GraphError  # noqa: PLC0415
    from amct_caffe.runtime import TEST, Net  # noqa: PLC0415

    path = tmp_path / "net.prototxt"
    path.write_text(_input("xs", 2) + _recurrent("LSTM", 3, 2, (3,), 4).replace('bottom: "cont"',
                                                                              'bottom: "cont" bottom: "xs"'))
    with pytest.raises(GraphError, match=r"layer 'rnn' \(LSTM\): x_static must be .* at least 2 axes, got \[2\]"):
        Net(str(path), TEST)
