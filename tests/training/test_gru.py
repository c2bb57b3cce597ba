"""GRU (synopsys-caffe's definition): the executor against two independent references.

* Always: the published equations in float64 (``gru_reference.gru_forward64``) for the forward and
  central differences of them for every diff (x, x_static and each learned blob).
* With ``AMCT_REAL_CAFFE``: official Caffe running the fork's unrolled net written out of its own
  layers (``gru_reference.unrolled_gru``), compared blob by blob: output, last state, x and x_static
  diffs and every parameter diff.
"""

from __future__ import annotations

import numpy as np
import pytest

from amct_caffe.errors import AmctError
from tests.real_caffe import pycaffe_dir
from tests.training.gradcheck import caffe_grads, cont_indicators, grad_problems, input_layer, run_in_caffe
from tests.training.gru_reference import gru_forward64, numeric_grads, params_from_unrolled, unrolled_gru


def gru_net(t, n, xdims, hidden, *, static=None, expose=False, reset_after=False, extra="") -> str:
    """Inputs and one GRU layer "gru" (top "y", with expose_hidden also "hT")."""
    text = "force_backward: true\n" + input_layer("x", t, n, *xdims) + input_layer("cont", t, n)
    bottoms, tops = ["x", "cont"], ["y"]
    if static is not None:
        text += input_layer("xs", n, *static)
        bottoms.append("xs")
    if expose:
        text += input_layer("h0", 1, n, hidden)
        bottoms.append("h0")
        tops.append("hT")
    rp = (f"num_output: {hidden} expose_hidden: {str(expose).lower()} linear_before_reset: {int(reset_after)} "
          'weight_filler { type: "uniform" min: -0.5 max: 0.5 } bias_filler { type: "constant" value: 0.1 } ' + extra)
    return (text + 'layer { name: "gru" type: "GRU" ' + " ".join(f'bottom: "{b}"' for b in bottoms) + " "
            + " ".join(f'top: "{tp}"' for tp in tops) + f" recurrent_param {{ {rp} }} }}\n")


# name -> (T, N, x dims, H, static dims, expose, reset_after, cont pattern)
CASES = {
    "basic": (3, 2, (4,), 5, None, False, False, "first"),
    "one_step": (1, 3, (2,), 3, None, False, False, "first"),
    "x4d_restart": (5, 4, (2, 3), 4, None, False, False, "restart"),
    "static": (4, 3, (3,), 4, (2, 3), False, False, "restart"),
    "expose": (4, 2, (3,), 3, None, True, False, "ones"),
    "reset_after": (4, 3, (3,), 4, None, False, True, "restart"),
    "reset_after_static_expose": (3, 2, (2,), 3, (5,), True, True, "restart"),
    "wide": (6, 8, (60,), 24, (40,), False, False, "restart"),
}


def _inputs(case, rng) -> dict:
    t, n, xdims, hidden, static, _expose, _after, pattern = CASES[case]
    arrays = {"x": rng.standard_normal((t, n) + xdims).astype(np.float32), "cont": cont_indicators(pattern, t, n),
              "h0": (0.5 * rng.standard_normal((1, n, hidden))).astype(np.float32)}
    if static is not None:
        arrays["xs"] = rng.standard_normal((n,) + static).astype(np.float32)
    return arrays


def _run_executor(tmp_path, case, params, inputs, seed):
    """Forward + backward of the GRU net with ``params``: ``{"y", "hT", "diff/x", "diff/xs", "pdiff/i"}``."""
    from amct_caffe.runtime import TRAIN, Net  # noqa: PLC0415

    t, n, xdims, hidden, static, expose, after, _ = CASES[case]
    path = tmp_path / f"{case}.prototxt"
    path.write_text(gru_net(t, n, xdims, hidden, static=static, expose=True, reset_after=after))
    net = Net(str(path), TRAIN)
    for blob, value in zip(net.params["gru"], params, strict=True):
        blob.data[...] = value
    feed = {k: v for k, v in inputs.items() if k != "h0"}
    # without expose_hidden the state starts at zero: the same as an exposed h0 of zeros
    feed["h0"] = inputs["h0"] if expose else np.zeros_like(inputs["h0"])
    out = {k: np.array(v) for k, v in net.forward(**feed).items()}
    # hT's diff is ignored, as the fork's RecurrentLayer does: a non-zero one must change nothing
    net.backward(y=seed, hT=np.ones_like(out["hT"]))
    res = {"y": out["y"], "hT": out["hT"], "diff/x": np.array(net.blobs["x"].diff)}
    if static is not None:
        res["diff/xs"] = np.array(net.blobs["xs"].diff)
    res.update({f"pdiff/{i}": np.array(b.diff) for i, b in enumerate(net.params["gru"])})
    return res


def _scale_error(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / max(np.max(np.abs(want)), 1e-3))


@pytest.mark.parametrize("case", sorted(c for c in CASES if c != "wide"))
def test_matches_float64_equations_and_finite_differences(tmp_path, case):
    """Forward within 2e-6 and every diff within 1e-5 of its scale of the float64 equations (measured:
    2e-7 and 4e-7, float32 rounding)."""
    t, n, xdims, hidden, static, expose, after, _ = CASES[case]
    rng = np.random.default_rng(3)
    inputs = _inputs(case, rng)
    d, ds = int(np.prod(xdims)), int(np.prod(static or (0,)))
    shapes = [(3 * hidden, d), (3 * hidden,)] + ([(3 * hidden, ds)] if static else [])
    shapes += [(hidden, hidden)] * 3 + ([(hidden,)] if after else [])
    params = [(0.5 * rng.standard_normal(s)).astype(np.float32) for s in shapes]
    seed = rng.standard_normal((t, n, hidden)).astype(np.float32)
    ours = _run_executor(tmp_path, case, params, inputs, seed)
    kw = {"x_static": inputs.get("xs"), "h0": inputs["h0"] if expose else None, "reset_after": after}
    y, h_last = gru_forward64(inputs["x"], inputs["cont"], params, **kw)
    assert _scale_error(ours["y"], y) < 2e-6
    assert _scale_error(ours["hT"][0], h_last) < 2e-6
    grads = numeric_grads(inputs["x"], inputs["cont"], params, seed, **kw)
    assert _scale_error(ours["diff/x"], grads["x"]) < 1e-5
    if static is not None:
        assert _scale_error(ours["diff/xs"], grads["x_static"]) < 1e-5
    for j in range(len(params)):
        assert _scale_error(ours[f"pdiff/{j}"], grads[f"p{j}"]) < 1e-5, f"blob {j}"


def test_blob_layout_and_fillers(tmp_path):
    """The fork's blob order and shapes (x_static flattened from axis 1), filled by the recurrent_param fillers."""
    from amct_caffe.runtime import TEST, Net  # noqa: PLC0415

    path = tmp_path / "gru.prototxt"
    path.write_text(gru_net(3, 2, (3, 2), 4, static=(5,), reset_after=True))
    blobs = Net(str(path), TEST).params["gru"]
    assert [b.data.shape for b in blobs] == [(12, 6), (12,), (12, 5), (4, 4), (4, 4), (4, 4), (4,)]
    for i in (0, 2, 3, 4, 5):
        assert np.all(np.abs(blobs[i].data) <= 0.5) and np.ptp(blobs[i].data) > 0
    assert np.all(blobs[1].data == np.float32(0.1)) and np.all(blobs[6].data == np.float32(0.1))
    path.write_text(gru_net(3, 2, (3,), 4))
    assert [b.data.shape for b in Net(str(path), TEST).params["gru"]] == [(12, 3), (12,), (4, 4), (4, 4), (4, 4)]


def test_state_carries_over_between_forwards(tmp_path):
    """Without expose_hidden the next forward starts from the last state (cont = 1 at its t = 0)."""
    from amct_caffe.runtime import TEST, Net  # noqa: PLC0415

    path = tmp_path / "gru.prototxt"
    path.write_text(gru_net(3, 2, (3,), 4))
    net = Net(str(path), TEST)
    params = [np.array(b.data) for b in net.params["gru"]]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 2, 3)).astype(np.float32)
    cont = cont_indicators("first", 6, 2)
    first = np.array(net.forward(x=x[:3], cont=cont[:3])["y"])
    second = np.array(net.forward(x=x[3:], cont=cont[3:])["y"])
    whole, _ = gru_forward64(x, cont, params)
    assert _scale_error(np.concatenate([first, second]), whole) < 2e-6


@pytest.mark.parametrize("extra,match", [
    ('activations: "ReLU"', r"layer 'gru' \(GRU\): recurrent_param.activations \['ReLU'\]"),
    ('direction: "reverse"', r"layer 'gru' \(GRU\): recurrent_param direction 'reverse' is not supported"),
    ("continue_recur: true", r"layer 'gru' \(GRU\): recurrent_param continue_recur is not supported"),
    ("activation_alpha: 0.1", r"recurrent_param activation_alpha is not supported"),
])
def test_unsupported_fields_are_refused(tmp_path, extra, match):
    from amct_caffe.runtime import TEST, Net  # noqa: PLC0415

    path = tmp_path / "gru.prototxt"
    path.write_text(gru_net(3, 2, (3,), 4, extra=extra))
    with pytest.raises(AmctError, match=match):
        Net(str(path), TEST)


def test_default_activations_are_accepted(tmp_path):
    from amct_caffe.runtime import TEST, Net  # noqa: PLC0415

    path = tmp_path / "gru.prototxt"
    path.write_text(gru_net(3, 2, (3,), 4, extra='activations: "Sigmoid" activations: "TanH"'))
    assert Net(str(path), TEST).forward(x=np.ones((3, 2, 3), np.float32), cont=np.ones((3, 2), np.float32))


def test_hidden_state_shape_is_checked(tmp_path):
    from amct_caffe.runtime import TEST, Net  # noqa: PLC0415

    path = tmp_path / "gru.prototxt"
    text = gru_net(3, 2, (3,), 4, expose=True)
    path.write_text(text.replace(input_layer("h0", 1, 2, 4), input_layer("h0", 1, 2, 5)))
    with pytest.raises(AmctError, match=r"layer 'gru' \(GRU\): bottom 2 must be the hidden state \[1, 2, 4\]"):
        Net(str(path), TEST)


# -- official Caffe, running the fork's unrolled net ---------------------------------------------------

@pytest.fixture(scope="module")
def caffe_results(tmp_path_factory):
    if pycaffe_dir() is None:
        pytest.skip("AMCT_REAL_CAFFE is not set: official Caffe runs the unrolled GRU reference")
    workdir = tmp_path_factory.mktemp("gru")
    rng = np.random.default_rng(7)
    cases, inputs = [], {}
    for name, (t, n, xdims, hidden, static, _expose, after, _) in CASES.items():
        inputs[name] = _inputs(name, rng)
        if not CASES[name][5]:
            inputs[name]["h0"] = np.zeros_like(inputs[name]["h0"])
        text = unrolled_gru(t, n, xdims, hidden, static=static, reset_after=after)
        cases.append((name, f'name: "{name}"\n' + text, inputs[name], "TRAIN"))
    return workdir, run_in_caffe(workdir, cases), inputs


@pytest.mark.real_caffe
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_official_caffe_unrolled(caffe_results, tmp_path, case):
    """Output, last state, x / x_static diffs and every parameter diff within 1e-6 of their scale
    (measured: bit for bit on every case)."""
    workdir, results, inputs = caffe_results
    assert results[case]["status"] == "ok", results[case]["log"]
    t, _, _, _, static, _, after, _ = CASES[case]
    ref = caffe_grads(workdir, case)
    params = params_from_unrolled(ref, "pdata", static=static is not None, reset_after=after)
    ours = _run_executor(tmp_path, case, params, inputs[case], ref["topdiff/y"])
    want = {"y": ref["data/y"], "hT": ref[f"data/h_{t}"][None] if ref[f"data/h_{t}"].ndim == 2 else ref[f"data/h_{t}"],
            "diff/x": ref["diff/x"]}
    if static is not None:
        want["diff/xs"] = ref["diff/xs"]
    pdiffs = params_from_unrolled(ref, "pdiff", static=static is not None, reset_after=after)
    want.update({f"pdiff/{i}": d for i, d in enumerate(pdiffs)})
    assert grad_problems(want, ours, rtol=1e-6) == []
