"""The solvers without Caffe: lr policies and update rules against independent float64 formulas,
smoothing of the displayed loss, test nets, iter_size, solver prototxt errors, snapshots round trip,
a diverging loss, solve()'s progress bar."""

from __future__ import annotations

import logging
import math
import os
import re

import numpy as np
import pytest

import amct_caffe.runtime as caffe
from amct_caffe.errors import AmctError, ModelFormatError, TrainingError
from amct_caffe.io.schema import caffe_pb
from amct_caffe.runtime.solver_param import learning_rate

NET = """name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: BATCH dim: 3 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" PARAM1
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.5 }
  bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 } } loss_weight: LW }
layer { name: "probe" type: "InnerProduct" bottom: "ip1" top: "probe" include { phase: TEST }
  inner_product_param { num_output: 1 weight_filler { type: "constant" value: 1 } } }
"""


def _setup(tmp_path, solver_fields: str, batch: int = 4, loss_weight: float = 0.5, param1: str = "") -> str:
    (tmp_path / "net.prototxt").write_text(NET.replace("BATCH", str(batch)).replace("LW", repr(loss_weight))
                                           .replace("PARAM1", param1))
    path = tmp_path / "solver.prototxt"
    path.write_text(f'net: "{tmp_path / "net.prototxt"}"\n{solver_fields}\n')
    return str(path)


def _params(solver) -> dict[str, np.ndarray]:
    return {f"{name}/{k}": b.data.copy() for name, blobs in solver.net.params.items() for k, b in enumerate(blobs)}


# ---------------------------------------------------------------- lr policies
def _param(**fields):
    p = caffe_pb().SolverParameter()
    for k, v in fields.items():
        if k == "stepvalue":
            p.stepvalue.extend(v)
        else:
            setattr(p, k, v)
    return p


@pytest.mark.parametrize("fields, formula", [
    ({"lr_policy": "fixed"}, lambda b, it: b),
    ({"lr_policy": "step", "gamma": 0.5, "stepsize": 3}, lambda b, it: b * 0.5 ** (it // 3)),
    ({"lr_policy": "exp", "gamma": 0.9}, lambda b, it: b * 0.9 ** it),
    ({"lr_policy": "inv", "gamma": 1e-2, "power": 0.75}, lambda b, it: b * (1 + 1e-2 * it) ** -0.75),
    ({"lr_policy": "multistep", "gamma": 0.1, "stepvalue": [2, 5, 6]},
     lambda b, it: b * 0.1 ** sum(it >= s for s in (2, 5, 6))),
    ({"lr_policy": "poly", "power": 2.0, "max_iter": 10}, lambda b, it: b * (1 - it / 10) ** 2),
    ({"lr_policy": "sigmoid", "gamma": -0.5, "stepsize": 4}, lambda b, it: b / (1 + math.exp(0.5 * (it - 4)))),
])
def test_lr_policies_follow_their_formulas(fields, formula):
    param = _param(base_lr=0.01, **fields)
    step = 0
    for it in range(10):
        rate, step = learning_rate(param, it, step)
        assert rate.dtype == np.float32
        assert float(rate) == pytest.approx(formula(0.01, it), rel=2e-6), it


def test_multistep_advances_one_step_per_iteration_as_caffe():
    # two stepvalues already passed when the schedule starts late: Caffe catches up one per call
    param = _param(base_lr=1.0, lr_policy="multistep", gamma=0.5, stepvalue=[1, 2])
    rate, step = learning_rate(param, 5, 0)
    assert (float(rate), step) == (0.5, 1)
    rate, step = learning_rate(param, 6, step)
    assert (float(rate), step) == (0.25, 2)


def test_sigmoid_far_out_gives_zero_without_warnings():
    rate, _ = learning_rate(_param(base_lr=1.0, lr_policy="sigmoid", gamma=10.0, stepsize=0), -1000, 0)
    assert float(rate) == 0.0


# ---------------------------------------------------------------- update rules, independently
def _reference_update(kind: str, p: dict, g: np.ndarray, w: np.ndarray, state: dict, key: str, it: int,
                      rate: float) -> np.ndarray:
    """One blob's update ``u`` (w -= u) in float64, from each solver's published rule."""
    g = g + p.get("weight_decay", 0.0) * w
    h = state.setdefault(key, np.zeros_like(g))
    m = p.get("momentum", 0.0)
    if kind in ("SGD", "Nesterov"):
        new_h = m * h + rate * g
        state[key] = new_h
        return new_h if kind == "SGD" else (1 + m) * new_h - m * h
    if kind == "AdaGrad":
        state[key] = h + g * g
        return rate * g / (np.sqrt(state[key]) + p["delta"])
    if kind == "RMSProp":
        state[key] = p["rms_decay"] * h + (1 - p["rms_decay"]) * g * g
        return rate * g / (np.sqrt(state[key]) + p["delta"])
    s = state.setdefault(key + "/2", np.zeros_like(g))
    if kind == "AdaDelta":
        state[key] = m * h + (1 - m) * g * g
        d = g * np.sqrt((s + p["delta"]) / (state[key] + p["delta"]))
        state[key + "/2"] = m * s + (1 - m) * d * d
        return rate * d
    b2 = p["momentum2"]
    state[key] = m * h + (1 - m) * g
    state[key + "/2"] = b2 * s + (1 - b2) * g * g
    t = it + 1
    return rate * math.sqrt(1 - b2 ** t) / (1 - m ** t) * state[key] / (np.sqrt(state[key + "/2"]) + p["delta"])


RULES = {
    "SGD": {"momentum": 0.9, "weight_decay": 0.01},
    "Nesterov": {"momentum": 0.9, "weight_decay": 0.01},
    "AdaGrad": {"delta": 1e-6, "weight_decay": 0.01},
    "RMSProp": {"delta": 1e-6, "rms_decay": 0.9},
    "AdaDelta": {"delta": 1e-6, "momentum": 0.95},
    "Adam": {"delta": 1e-8, "momentum": 0.9, "momentum2": 0.999},
}


@pytest.mark.parametrize("kind", sorted(RULES))
def test_update_rules_follow_their_formulas(tmp_path, kind):
    p = RULES[kind]
    fields = " ".join(f"{k}: {v}" for k, v in p.items())
    solver = caffe.get_solver(_setup(tmp_path, f'type: "{kind}" base_lr: 0.1 lr_policy: "fixed" {fields}'))
    assert type(solver).__name__ == f"{kind}Solver"
    rng = np.random.default_rng(0)
    grads: dict[str, np.ndarray] = {}
    solver.add_callback(lambda: None, lambda: grads.update(
        {f"{n}/{k}": b.diff.astype(np.float64) for n, bs in solver.net.params.items() for k, b in enumerate(bs)}))
    state: dict = {}
    for it in range(4):
        solver.net.blobs["data"].data[...] = rng.standard_normal((4, 3))
        before = _params(solver)
        solver.step(1)
        after = _params(solver)
        for key, w in before.items():
            want = w - _reference_update(kind, p, grads[key], w.astype(np.float64), state, key, it, 0.1)
            np.testing.assert_allclose(after[key], want, rtol=1e-5, atol=1e-6, err_msg=f"{kind} {key} iter {it}")


@pytest.mark.parametrize("kind, extra", [(kind, "") for kind in sorted(RULES)]
                         + [("SGD", 'weight_decay: 0.01 regularization_type: "L1"')])
def test_a_kept_diff_array_stays_the_blobs_diff(tmp_path, kind, extra):
    """pycaffe's params[layer][i].diff is the blob's memory for the blob's life: a callback (or a Python
    layer) that keeps the array and zeroes it freezes the weights, on every iteration and every solver,
    as zeroing the diff read afresh does (the update used to rebind the diff to a new array)."""
    fields = extra or " ".join(f"{k}: {v}" for k, v in RULES[kind].items())
    runs = []
    for keep in (True, False):
        (tmp_path / str(keep)).mkdir()
        solver = caffe.get_solver(_setup(tmp_path / str(keep), f'type: "{kind}" base_lr: 0.1 lr_policy: "fixed" '
                                                               f"{fields}"))
        kept = solver.net.params["ip1"][0].diff
        solver.add_callback(lambda: None, lambda s=solver, k=kept, keep=keep: (
            k if keep else s.net.params["ip1"][0].diff).__setitem__(..., 0))
        rng = np.random.default_rng(0)
        start = solver.net.params["ip1"][0].data.copy()
        for _ in range(3):
            solver.net.blobs["data"].data[...] = rng.standard_normal((4, 3))
            solver.step(1)
        assert solver.net.params["ip1"][0].diff is kept
        runs.append(_params(solver))
    for key in runs[0]:
        np.testing.assert_array_equal(runs[0][key], runs[1][key], err_msg=key)
    if "weight_decay" not in fields:  # zero gradients (and histories of zeros) leave the weights be
        np.testing.assert_array_equal(runs[0]["ip1/0"], start)


def test_lr_and_decay_mult_and_l1(tmp_path):
    solver = caffe.SGDSolver(_setup(tmp_path, 'base_lr: 0.1 lr_policy: "fixed" weight_decay: 0.5 '
                                              'regularization_type: "L1"',
                                    param1="param { lr_mult: 2 decay_mult: 0 } param { lr_mult: 0 decay_mult: 1 }"))
    solver.net.blobs["data"].data[...] = 1.0
    before = _params(solver)
    grads = {}
    solver.add_callback(lambda: None, lambda: grads.update(
        {f"{n}/{k}": b.diff.copy() for n, bs in solver.net.params.items() for k, b in enumerate(bs)}))
    solver.step(1)
    after = _params(solver)
    np.testing.assert_allclose(after["ip1/0"], before["ip1/0"] - 0.2 * grads["ip1/0"], rtol=1e-6)  # lr 2x, no decay
    np.testing.assert_array_equal(after["ip1/1"], before["ip1/1"])  # lr_mult 0: even the decay moves nothing
    w = before["ip2/0"]
    np.testing.assert_allclose(after["ip2/0"], w - 0.1 * (grads["ip2/0"] + 0.5 * np.sign(w)), rtol=1e-6)


def test_clip_gradients_scales_to_the_global_norm(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="amct_caffe")
    solver = caffe.SGDSolver(_setup(tmp_path, 'base_lr: 1 lr_policy: "fixed" clip_gradients: 0.1'))
    solver.net.blobs["data"].data[...] = 1.0
    before = _params(solver)
    solver.step(1)
    steps = [before[k] - v for k, v in _params(solver).items()]
    assert math.sqrt(sum(float(np.sum(s.astype(np.float64) ** 2)) for s in steps)) == pytest.approx(0.1, rel=1e-5)
    assert "Gradient clipping" in caplog.text


def test_iter_size_2_equals_the_doubled_batch(tmp_path):
    x = np.random.default_rng(3).standard_normal((4, 3)).astype(np.float32)
    runs = []
    # with Input layers both passes of iter_size 2 see the same batch: it equals the batch twice over
    cases = (("a", "iter_size: 2", 4, 0.25, x), ("b", "", 8, 0.125, np.concatenate([x, x])))
    for sub, fields, batch, lw, data in cases:
        (tmp_path / sub).mkdir()
        solver = caffe.SGDSolver(_setup(tmp_path / sub, f'base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 '
                                                        f'weight_decay: 0.01 random_seed: 5 {fields}', batch, lw))
        for _ in range(3):
            solver.net.blobs["data"].data[...] = data
            solver.step(1)
        runs.append(_params(solver))
    for key, value in runs[0].items():
        np.testing.assert_allclose(value, runs[1][key], rtol=1e-5, atol=1e-7)


def test_average_loss_smooths_the_displayed_loss(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="amct_caffe")
    solver = caffe.SGDSolver(_setup(tmp_path, 'base_lr: 0.01 lr_policy: "fixed" display: 1 average_loss: 3'))
    losses = []
    solver.add_callback(lambda: None, lambda: losses.append(solver.net.loss))
    rng = np.random.default_rng(1)
    solver.add_callback(lambda: solver.net.blobs["data"].data.__setitem__(..., rng.standard_normal((4, 3))),
                        lambda: None)
    solver.step(6)
    shown = [float(v) for v in re.findall(r"Iteration \d+, loss = (\S+)", caplog.text)]
    want = [np.mean(losses[max(0, i - 2):i + 1]) for i in range(6)]
    np.testing.assert_allclose(shown, want, rtol=1e-4, atol=1e-6)


def test_test_nets_share_the_trained_weights_and_average(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="amct_caffe")
    solver = caffe.SGDSolver(_setup(tmp_path, 'base_lr: 0.1 lr_policy: "fixed" test_iter: 3 test_interval: 2'))
    test_net = solver.test_nets[0]
    assert "probe" in test_net.params and "probe" not in solver.net.params  # TEST-phase layer
    test_net.blobs["data"].data[...] = 1.0
    solver.net.blobs["data"].data[...] = 1.0
    solver.step(3)  # tests at iterations 0 and 2
    assert "Iteration 2, Testing net (#0)" in caplog.text
    w = solver.net.params["ip1"][0].data
    assert test_net.params["ip1"][0].data is w  # the same array: the updates are seen
    out = test_net.forward()
    scores = solver.test_all()[0]
    assert [n for n, _ in scores] == ["ip2"] * 8 + ["probe"] * 4
    np.testing.assert_allclose([v for _, v in scores], np.concatenate([out["ip2"].ravel(), out["probe"].ravel()]),
                               rtol=1e-6)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("text, message", [
    ('base_lr: 0.1 lr_policy: "fixed"', "exactly one of net"),
    ('net: "N" train_net: "N" base_lr: 0.1 lr_policy: "fixed"', "exactly one of net"),
    ('net: "N" base_lr: 0.1', 'unknown lr_policy ""'),
    ('net: "N" lr_policy: "cosine"', 'unknown lr_policy "cosine"'),
    ('net: "N" lr_policy: "step"', "stepsize > 0"),
    ('net: "N" lr_policy: "fixed" type: "LBFGS"', 'unknown solver type "LBFGS"'),
    ('net: "N" lr_policy: "fixed" type: "SGD" solver_type: NESTEROV', "both the old solver_type"),
    ('net: "N" lr_policy: "fixed" weight_decay: 0.1 regularization_type: "L3"', 'regularization_type "L3"'),
    ('net: "N" lr_policy: "fixed" test_iter: 1', "test_interval must be > 0"),
    ('train_net: "N" test_net: "N" lr_policy: "fixed"', "test_iter must be given once per test net"),
    ('net: "N" lr_policy: "fixed" snapshot: 10', "snapshot_prefix is not"),
    ('net: "N" lr_policy: "fixed" snapshot: 10 snapshot_prefix: "/nonexistent/dir/s"', "/nonexistent/dir"),
    ('net: "N" lr_policy: "fixed" snapshot_format: HDF5', "HDF5"),
    ('net: "N" lr_policy: "fixed" iter_size: 0', "iter_size"),
    ('net: "N" lr_policy: "fixed" average_loss: 0', "average_loss"),
    ('net: "N" lr_policy: "fixed" eval_type: "detection"', "eval_type"),
    ('net: "N" lr_policy: "fixed" type: "AdaGrad" momentum: 0.9', "momentum cannot be used with AdaGrad"),
    ('net: "N" lr_policy: "fixed" type: "RMSProp" rms_decay: 1', "rms_decay"),
])
def test_solver_settings_caffe_refuses_are_training_errors(tmp_path, text, message):
    (tmp_path / "net.prototxt").write_text(NET.replace("BATCH", "2").replace("LW", "1").replace("PARAM1", ""))
    path = tmp_path / "solver.prototxt"
    path.write_text(text.replace('"N"', f'"{tmp_path / "net.prototxt"}"'))
    with pytest.raises(TrainingError, match=re.escape(message)) as e:
        caffe.get_solver(str(path))
    assert str(path) in str(e.value)


def test_an_unknown_regularization_type_matters_only_where_a_blob_decays(tmp_path):
    """Caffe reads regularization_type only for a learned blob with a weight decay: with every decay_mult 0 an
    unknown type trains as weight_decay 0 does (the same bytes); with one blob decaying it is refused."""
    frozen = 'param { decay_mult: 0 } param { decay_mult: 0 }'
    runs = []
    for k, fields in enumerate(('weight_decay: 0.1 regularization_type: "l2"', "weight_decay: 0")):
        folder = tmp_path / str(k)
        folder.mkdir()
        path = _setup(folder, f'type: "SGD" base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 {fields}', param1=frozen)
        text = (folder / "net.prototxt").read_text()
        (folder / "net.prototxt").write_text(text.replace('top: "ip2"', f'top: "ip2" {frozen}', 1))
        solver = caffe.get_solver(path)
        solver.net.params["ip1"][0].data[...] = 0.25  # the same start in both runs
        solver.net.params["ip2"][0].data[...] = -0.5
        solver.net.blobs["data"].data[...] = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
        solver.step(2)
        runs.append(_params(solver))
    for key, value in runs[1].items():
        np.testing.assert_array_equal(runs[0][key], value)
    path = _setup(tmp_path, 'type: "SGD" base_lr: 0.1 lr_policy: "fixed" weight_decay: 0.1 regularization_type: "l2"',
                  param1=frozen)
    with pytest.raises(TrainingError, match='unknown regularization_type "l2"; use L2 or L1'):
        caffe.get_solver(path)


def test_unreadable_files_name_the_file(tmp_path):
    bad = tmp_path / "solver.prototxt"
    bad.write_text('net: "x.prototxt"\nbase_lr: oops\n')
    with pytest.raises(ModelFormatError, match=re.escape(str(bad))):
        caffe.SGDSolver(str(bad))
    bad.write_text('net: "missing.prototxt"\nlr_policy: "fixed"\n')
    with pytest.raises(AmctError, match="missing.prototxt"):
        caffe.SGDSolver(str(bad))
    with pytest.raises(AmctError, match="does not exist"):
        caffe.SGDSolver(str(tmp_path / "nope.prototxt"))


def test_legacy_solver_type_chooses_the_class(tmp_path):
    solver = caffe.get_solver(_setup(tmp_path, 'lr_policy: "fixed" solver_type: RMSPROP'))
    assert isinstance(solver, caffe.RMSPropSolver) and solver.param.type == "RMSProp"


def test_a_diverging_loss_stops_training(tmp_path):
    solver = caffe.SGDSolver(_setup(tmp_path, 'base_lr: 0.1 lr_policy: "fixed"'))
    solver.net.blobs["data"].data[...] = 1.0
    solver.step(2)
    solver.net.blobs["data"].data[0, 0] = np.inf
    before = _params(solver)
    with pytest.raises(TrainingError, match="at iteration 2"):
        solver.step(1)
    assert solver.iter == 2
    for key, value in _params(solver).items():
        np.testing.assert_array_equal(value, before[key])


# ---------------------------------------------------------------- snapshots
def _train(solver, start: int, stop: int) -> None:
    rng = np.random.default_rng(11)
    data = rng.standard_normal((stop, 4, 3))
    for i in range(start, stop):
        solver.net.blobs["data"].data[...] = data[i]
        solver.step(1)


@pytest.mark.parametrize("kind", ["Adam", "SGD"])
def test_snapshot_restore_continues_identically(tmp_path, kind):
    fields = (f'type: "{kind}" base_lr: 0.05 lr_policy: "multistep" gamma: 0.5 stepvalue: 2 stepvalue: 4 '
              f'momentum: 0.9 snapshot: 3 snapshot_prefix: "{tmp_path / "snap"}"')
    path = _setup(tmp_path, fields)
    full = caffe.get_solver(path)
    init = str(tmp_path / "init.caffemodel")
    full.net.save(init)
    _train(full, 0, 6)
    assert sorted(os.listdir(tmp_path)) == ["init.caffemodel", "net.prototxt", "snap_iter_3.caffemodel",
                                            "snap_iter_3.solverstate", "snap_iter_6.caffemodel",
                                            "snap_iter_6.solverstate", "solver.prototxt"]  # nothing temporary left
    state = caffe_pb().SolverState.FromString((tmp_path / "snap_iter_3.solverstate").read_bytes())
    assert (state.iter, state.current_step, state.learned_net) == (3, 1, f"{tmp_path / 'snap'}_iter_3.caffemodel")
    assert len(state.history) == (8 if kind == "Adam" else 4)
    resumed = caffe.get_solver(path)
    resumed.restore(str(tmp_path / "snap_iter_3.solverstate"))
    assert resumed.iter == 3
    _train(resumed, 3, 6)
    for key, value in _params(full).items():
        np.testing.assert_array_equal(_params(resumed)[key], value)


def test_restore_refuses_what_it_cannot_use(tmp_path):
    path = _setup(tmp_path, f'base_lr: 0.05 lr_policy: "fixed" snapshot_prefix: "{tmp_path / "s"}"')
    sgd = caffe.SGDSolver(path)
    model, state = sgd.snapshot()
    assert os.path.exists(model) and state.endswith("s_iter_0.solverstate")
    with pytest.raises(TrainingError, match="history blob"):
        caffe.AdamSolver(path).restore(state)  # Adam keeps two histories per blob
    with pytest.raises(TrainingError, match="HDF5"):
        sgd.restore(str(tmp_path / "x.solverstate.h5"))
    (tmp_path / "junk.solverstate").write_bytes(b"\xff\xff\xff")
    with pytest.raises(TrainingError, match="junk.solverstate"):
        sgd.restore(str(tmp_path / "junk.solverstate"))
    with pytest.raises(TrainingError, match="does not exist"):
        sgd.restore(str(tmp_path / "absent.solverstate"))


def test_solve_runs_to_max_iter_with_a_progress_bar(tmp_path, capsys):
    path = _setup(tmp_path, f'base_lr: 0.01 lr_policy: "fixed" max_iter: 5 snapshot_prefix: "{tmp_path / "s"}"')
    solver = caffe.SGDSolver(path)
    solver.net.blobs["data"].data[...] = 1.0
    solver.solve(progress=True)
    assert solver.iter == 5
    assert "100%" in capsys.readouterr().err
    assert (tmp_path / "s_iter_5.caffemodel").exists()  # snapshot_after_train
    again = caffe.SGDSolver(path)
    again.progress = False
    again.solve(str(tmp_path / "s_iter_5.solverstate"))  # resumes at max_iter: nothing left to do
    assert again.iter == 5
    assert capsys.readouterr().err == ""


def test_step_takes_an_integer(tmp_path):
    from amct_caffe import AmctError

    solver = caffe.get_solver(_setup(tmp_path, 'base_lr: 0.1 lr_policy: "fixed"'))
    for bad in (None, 1.5, "2", True):
        with pytest.raises(AmctError, match=r"step\(iters\): iters must be an integer"):
            solver.step(bad)
    solver.step(np.int64(1))
    assert solver.iter == 1


def test_a_nan_label_is_named_as_nan():
    from amct_caffe import GraphError
    from amct_caffe.runtime import Net

    text = ('layer { name: "d" type: "Input" top: "x" top: "y" input_param { shape { dim: 2 dim: 3 } '
            'shape { dim: 2 } } }\nlayer { name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "l" }\n')
    from google.protobuf import text_format

    from amct_caffe.io.schema import caffe_pb
    net = Net(text_format.Parse(text, caffe_pb().NetParameter()), caffe.TEST)
    with pytest.raises(GraphError, match=r"layer 'loss' \(SoftmaxWithLoss\): label NaN is not a class number"):
        net.forward(x=np.zeros((2, 3), np.float32), y=np.array([0, np.nan], np.float32))


def test_a_test_net_whose_weights_do_not_fit_names_the_solver_and_the_test_net(tmp_path):
    """The TEST phase's input is smaller, so its InnerProduct's weight has another shape than the train net's."""
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 4 } } include { phase: TRAIN } }\n'
        'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } include { phase: TEST } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip" '
        'inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.1 } } }\n')
    path = tmp_path / "solver.prototxt"
    path.write_text(f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.1\nlr_policy: "fixed"\ntest_iter: 1\n'
                    'test_interval: 1\ntest_initialization: true\n')
    from amct_caffe import AmctError

    solver = caffe.get_solver(str(path))
    with pytest.raises(AmctError, match=r"solver.prototxt: test net #0: share_with: layer 'ip' blob shapes differ"):
        solver.step(1)


@pytest.mark.parametrize("probe", [
    'layer { name: "probe" type: "InnerProduct" bottom: "data" top: "probe" param { name: "w" } '
    'include { phase: TEST } inner_product_param { num_output: 3 bias_term: false } }\n',
    # share_mode PERMISSIVE, the (3, 3) weight seen as (3, 3, 1, 1): share_with had moved the sharer with its owner
    'layer { name: "as4d" type: "Reshape" bottom: "data" top: "data4" reshape_param { shape { dim: 0 dim: 3 dim: 1 '
    'dim: 1 } } include { phase: TEST } }\n'
    'layer { name: "probe" type: "Convolution" bottom: "data4" top: "probe" param { name: "w" share_mode: PERMISSIVE '
    '} include { phase: TEST } convolution_param { num_output: 3 kernel_size: 1 bias_term: false } }\n',
])
def test_a_test_only_layer_sharing_a_trained_param_keeps_the_test_nets_weights(tmp_path, probe):
    """Caffe's ShareTrainedLayersWith re-points the layers the train net has; a TEST-only layer naming the
    same param keeps the memory it shared at the test net's build (official Caffe: its weights stay the
    filler's 0.1 while ip1 trains, also for a PERMISSIVE sharer of another shape)."""
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 } } }\n'
        'layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 4 } } }\n'
        'layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" param { name: "w" } '
        'inner_product_param { num_output: 3 bias_term: false weight_filler { type: "constant" value: 0.1 } } }\n'
        + probe +
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }\n')
    (tmp_path / "solver.prototxt").write_text(f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.5\n'
                                              'lr_policy: "fixed"\ntest_iter: 1\ntest_interval: 1\n')
    solver = caffe.get_solver(str(tmp_path / "solver.prototxt"))
    for net in [solver.net, *solver.test_nets]:
        net.blobs["data"].data[...] = np.arange(12, dtype=np.float32).reshape(4, 3) / 5
        net.blobs["label"].data[...] = [0, 1, 2, 1]
    solver.step(3)
    test = solver.test_nets[0]
    np.testing.assert_array_equal(test.params["ip1"][0].data, solver.net.params["ip1"][0].data)
    assert not np.allclose(solver.net.params["ip1"][0].data, 0.1)
    np.testing.assert_array_equal(test.params["probe"][0].data.reshape(3, 3), np.full((3, 3), 0.1, np.float32))
    test.forward()
    np.testing.assert_allclose(test.blobs["probe"].data.reshape(4, 3), test.blobs["data"].data.sum(1, keepdims=True)
                               * 0.1 * np.ones((1, 3)), rtol=1e-6)


@pytest.mark.parametrize("layer", [
    'layer { name: "x" type: "SoftmaxWithLoss" bottom: "ip" bottom: "lab" top: "x" }',
    'layer { name: "x" type: "Dropout" bottom: "ip" top: "x" }',
    'layer { name: "x" type: "BatchNorm" bottom: "ip" top: "x" }',
    'layer { name: "r" type: "Reshape" bottom: "ip" top: "r" reshape_param { shape { dim: 0 dim: 3 dim: 1 dim: 1 } } }'
    '\nlayer { name: "x" type: "LRN" bottom: "r" top: "x" }',
])
def test_backward_without_a_forward_at_the_current_shapes_says_what_to_do(tmp_path, layer):
    """A backward before any forward, or after a reshape with no forward, reaches layers whose state a forward
    leaves (a mask, the softmax, the batch statistics): they raised AttributeError / ValueError from inside, and
    an LRN after a reshape ran silently on the last forward's scale."""
    from amct_caffe.errors import GraphError
    from amct_caffe.runtime import TRAIN, Net

    model = tmp_path / "n.prototxt"
    model.write_text('force_backward: true\n'
                     'layer { name: "data" type: "Input" top: "data" top: "lab" input_param { shape { dim: 2 dim: 3 } '
                     'shape { dim: 2 } } }\n'
                     'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { '
                     'num_output: 3 weight_filler { type: "constant" value: 0.1 } } }\n' + layer)
    net = Net(str(model), TRAIN)
    net.blobs["x"].diff[...] = 1
    advice = r"backward\(\) needs a forward\(\) at the net's current input shapes first"
    with pytest.raises(GraphError, match=advice):
        net.backward()
    net.forward()
    net.backward()  # after a forward it runs
    net.blobs["data"].reshape(4, 3)
    net.blobs["lab"].reshape(4)
    net.reshape()
    with pytest.raises(GraphError, match=advice):
        net.backward()


@pytest.mark.parametrize("field", ["display: -1", "max_iter: -1", "snapshot: -2"])
def test_negative_display_max_iter_or_snapshot_run_as_in_caffe(tmp_path, field):
    """Caffe accepts them (a negative display prints every iteration, `iter % -1 == 0`; step(n) ignores max_iter);
    the solver had refused the file. Checked against pycaffe when the case was added: the same weights."""
    import os

    from amct_caffe.runtime import get_solver

    (tmp_path / "n.prototxt").write_text(
        'layer { name: "data" type: "DummyData" top: "data" top: "label" dummy_data_param { shape { dim: 4 dim: 3 } '
        'shape { dim: 4 } data_filler { type: "constant" value: 0.5 } data_filler { type: "constant" value: 1 } } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 3 '
        'weight_filler { type: "constant" value: 0.02 } } }\n'
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }\n')
    results = []
    for extra in ("", field):
        (tmp_path / "s.prototxt").write_text(f'net: "n.prototxt"\nbase_lr: 0.01\nlr_policy: "fixed"\n'
                                             f'snapshot_prefix: "{tmp_path / "snap"}"\n{extra}\n')
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            solver = get_solver("s.prototxt")
            solver.step(3)
        finally:
            os.chdir(cwd)
        results.append((solver.iter, solver.net.params["ip"][0].data.copy()))
    assert results[1][0] == 3 and (results[0][1] == results[1][1]).all()
    assert abs(float(results[1][1].flat[0]) - 0.0150292488) < 1e-9  # pycaffe's value for this net
