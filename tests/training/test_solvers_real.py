"""The solvers against real Caffe: the same nets, initial weights and data, every solver type and lr
policy, weight decay (L2, L1, lr_mult / decay_mult), clip_gradients, iter_size, shared params and the
legacy solver_type; the learned blobs and the test nets' outputs are compared after every iteration.

Snapshots cross over: Caffe resumes from our .solverstate + .caffemodel, we resume from Caffe's, and
both continue as the uninterrupted run does.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import amct_caffe.runtime as ours
from amct_caffe import io
from amct_caffe.io.schema import caffe_pb
from tests.real_caffe import pycaffe_dir, run_with_pycaffe
from tests.training import solver_runner

pytestmark = pytest.mark.real_caffe

ITERS, SNAPSHOT_AT = 6, 3
RTOL = 1e-5  # measured: at most 2.1e-7 (a few float32 ulps)

_FILL = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'
NET = (
    'name: "solver_net"\n'
    'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 } } }\n'
    'layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" PARAM1 '
    'inner_product_param { num_output: 3 ' + _FILL + ' } }\n'
    'EXTRA'
    'layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" '
    'inner_product_param { num_output: 2 ' + _FILL + ' } loss_weight: LOSS_WEIGHT }\n'
    # only in the test nets: its own (constant) weights, reading the shared ip1
    'layer { name: "probe" type: "InnerProduct" bottom: "ip1" top: "probe" include { phase: TEST } '
    'inner_product_param { num_output: 2 weight_filler { type: "constant" value: 0.1 } } }\n'
)
# a second reader of the data sharing ip1's weights (param name), its output a loss too
SHARED = ('layer { name: "ip1b" type: "InnerProduct" bottom: "data" top: "ip1b" param { name: "w1" } '
          'param { name: "b1" } inner_product_param { num_output: 3 } loss_weight: 0.25 }\n')

# a 1x1 convolution sharing ip1's (3, 3) weight as (3, 3, 1, 1): share_mode PERMISSIVE (same count), each layer
# seeing the one memory in its own shape
PERMISSIVE = ('layer { name: "as4d" type: "Reshape" bottom: "data" top: "data4" reshape_param { shape { dim: 0 '
              'dim: 3 dim: 1 dim: 1 } } }\n'
              'layer { name: "conv1b" type: "Convolution" bottom: "data4" top: "conv1b" param { name: "w1" '
              'share_mode: PERMISSIVE } param { name: "b1" } convolution_param { num_output: 3 kernel_size: 1 } '
              'loss_weight: 0.25 }\n')

BATCHNORM = ('layer { name: "bn" type: "BatchNorm" bottom: "ip1" top: "ip1" ' +
             "param { lr_mult: 0 decay_mult: 0 } " * 3 + "}\n")

CASES = {
    # name: (solver fields, net substitutions)
    "sgd_fixed_l2": ('type: "SGD" base_lr: 0.05 lr_policy: "fixed" momentum: 0.9 weight_decay: 0.01', {}),
    "sgd_lr_decay_mult": ('type: "SGD" base_lr: 0.05 lr_policy: "fixed" momentum: 0.8 weight_decay: 0.1',
                          {"PARAM1": "param { lr_mult: 2 decay_mult: 0 } param { lr_mult: 0.5 decay_mult: 3 }"}),
    "sgd_step": ('type: "SGD" base_lr: 0.05 lr_policy: "step" gamma: 0.5 stepsize: 2 momentum: 0.9', {}),
    "sgd_exp": ('type: "SGD" base_lr: 0.05 lr_policy: "exp" gamma: 0.8 momentum: 0.5', {}),
    "sgd_inv": ('type: "SGD" base_lr: 0.05 lr_policy: "inv" gamma: 0.3 power: 0.75 momentum: 0.9', {}),
    "sgd_multistep": ('type: "SGD" base_lr: 0.05 lr_policy: "multistep" gamma: 0.3 stepvalue: 1 stepvalue: 4 '
                      'momentum: 0.9', {}),
    "sgd_poly": ('type: "SGD" base_lr: 0.05 lr_policy: "poly" power: 1.5 momentum: 0.9', {}),
    "sgd_sigmoid": ('type: "SGD" base_lr: 0.05 lr_policy: "sigmoid" gamma: -0.7 stepsize: 3 momentum: 0.9', {}),
    "sgd_clip": ('type: "SGD" base_lr: 0.05 lr_policy: "fixed" momentum: 0.9 clip_gradients: 0.5', {}),
    "sgd_iter_size": ('type: "SGD" base_lr: 0.05 lr_policy: "fixed" momentum: 0.9 iter_size: 2 weight_decay: 0.01',
                      {}),
    "sgd_shared": ('type: "SGD" base_lr: 0.05 lr_policy: "fixed" momentum: 0.9 weight_decay: 0.01',
                   {"PARAM1": 'param { name: "w1" } param { name: "b1" }', "EXTRA": SHARED}),
    "sgd_shared_permissive": ('type: "SGD" base_lr: 0.05 lr_policy: "fixed" momentum: 0.9 weight_decay: 0.01',
                              {"PARAM1": 'param { name: "w1" } param { name: "b1" }', "EXTRA": PERMISSIVE}),
    "nesterov_l1": ('type: "Nesterov" base_lr: 0.05 lr_policy: "step" gamma: 0.5 stepsize: 4 momentum: 0.9 '
                    'weight_decay: 0.05 regularization_type: "L1"', {}),
    "adagrad": ('type: "AdaGrad" base_lr: 0.1 lr_policy: "fixed" weight_decay: 0.01 delta: 1e-6', {}),
    "rmsprop": ('type: "RMSProp" base_lr: 0.01 lr_policy: "inv" gamma: 0.1 power: 0.5 rms_decay: 0.95', {}),
    "adadelta": ('type: "AdaDelta" base_lr: 1 lr_policy: "fixed" momentum: 0.95 delta: 1e-6 weight_decay: 0.01',
                 {}),
    "adam": ('type: "Adam" base_lr: 0.01 lr_policy: "fixed" momentum: 0.9 momentum2: 0.999 delta: 1e-8 '
             'clip_gradients: 2', {}),
    "adam_legacy_enum": ('solver_type: ADAM base_lr: 0.02 lr_policy: "exp" gamma: 0.9 momentum: 0.8', {}),
    # the old BatchNorm idiom, three lr_mult 0 specs in a net file: Caffe's UpgradeNetBatchNorm clears them, so
    # weight decay moves the statistics
    "sgd_batchnorm_param_specs": ('type: "SGD" base_lr: 0.05 lr_policy: "fixed" momentum: 0.9 weight_decay: 0.2',
                                  {"EXTRA": BATCHNORM}),
}


def _write_case(root, name: str, seed: int, max_iter: int = ITERS) -> dict:
    fields, subs = CASES[name] if name in CASES else (SOLVE_CASE[1], {})
    case_dir = os.path.join(str(root), name)
    net = NET
    for key, default in (("PARAM1", ""), ("EXTRA", ""), ("LOSS_WEIGHT", "0.5")):
        net = net.replace(key, subs.get(key, default))
    for sub in ("caffe", "caffe_resumed", "ours", "ours_resumed"):
        os.makedirs(os.path.join(case_dir, sub))
        with open(os.path.join(case_dir, sub, "net.prototxt"), "w") as f:
            f.write(net)
        with open(os.path.join(case_dir, sub, "solver.prototxt"), "w") as f:
            f.write(f'net: "net.prototxt"\ntest_iter: 2\ntest_interval: 2\nmax_iter: {max_iter}\ndisplay: 1\n'
                    f'snapshot_prefix: "{os.path.join(case_dir, sub, "snap")}"\n{fields}\n')
    rng = np.random.default_rng(seed)
    ours.Net(os.path.join(case_dir, "ours", "net.prototxt"), ours.TRAIN, seed=seed).save(
        os.path.join(case_dir, "init.caffemodel"))
    np.savez(os.path.join(case_dir, "data.npz"), x=rng.standard_normal((ITERS, 4, 3)).astype(np.float32),
             t=rng.standard_normal((4, 3)).astype(np.float32))
    return {"name": name, "dir": case_dir, "iters": ITERS, "snapshot_at": SNAPSHOT_AT,
            "resume_from": os.path.join(case_dir, "ours", f"snap_iter_{SNAPSHOT_AT}.solverstate")}


# solve(): snapshots every 2 iterations up to max_iter 5, then snapshot_after_train writes iteration 5's
SOLVE_CASE = ("solve", 'type: "Adam" base_lr: 0.01 lr_policy: "multistep" gamma: 0.5 stepvalue: 1 stepvalue: 3 '
              'momentum: 0.9 snapshot: 2')


def _write_solve_case(root) -> dict:
    case = _write_case(root, SOLVE_CASE[0], 99, max_iter=5)
    return {"name": SOLVE_CASE[0], "dir": case["dir"], "mode": "solve"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Ours first (its snapshots are Caffe's resume points), then Caffe, then ours resuming from Caffe's."""
    if pycaffe_dir() is None:
        pytest.skip("AMCT_REAL_CAFFE is not set")
    root = tmp_path_factory.mktemp("solvers")
    cwd = os.getcwd()
    try:
        manifest = [_write_case(root, name, seed) for seed, name in enumerate(sorted(CASES))]
        for case in manifest:
            solver_runner._run(ours, case["dir"], "ours", 0, ITERS, SNAPSHOT_AT, None)
        manifest.append(_write_solve_case(root))
        solver_runner.solve(ours, manifest[-1]["dir"], "ours")
        with open(os.path.join(root, "manifest.json"), "w") as f:
            json.dump(manifest, f)
        proc = run_with_pycaffe(f"from tests.training.solver_runner import main; main({str(root)!r})")
        assert proc.returncode == 0, proc.stderr[-4000:]
        with open(os.path.join(root, "results.json")) as f:
            results = json.load(f)
        for case in manifest:
            if results[case["name"]]["status"] == "ok" and case.get("mode") != "solve":
                caffe_state = os.path.join(case["dir"], "caffe", f"snap_iter_{SNAPSHOT_AT}.solverstate")
                solver_runner._run(ours, case["dir"], "ours_resumed", SNAPSHOT_AT, ITERS, None, caffe_state)
    finally:
        os.chdir(cwd)
    return root, results


def _load(root, name: str, sub: str) -> dict:
    with np.load(os.path.join(str(root), name, sub + ".npz")) as z:
        return {k: z[k] for k in z.files}


def _after_first_test(resumed: dict) -> dict:
    """A resumed run's results without the test outputs before its first TestAll: as in Caffe, a test
    net only takes the train net's weights (ShareTrainedLayersWith) when it is first run, so until
    then it holds its own filler-made weights."""
    first_test = -(-SNAPSHOT_AT // 2) * 2 + 1  # the first multiple of test_interval (2), +1: recorded after it
    return {k: v for k, v in resumed.items() if not (k.startswith("t/") and int(k.split("/")[1]) < first_test)}


def _worst(ref: dict, got: dict) -> tuple[float, str]:
    """The largest error relative to each array's scale, and where."""
    worst, where = 0.0, ""
    assert set(ref) == set(got), sorted(set(ref) ^ set(got))
    for key, want in ref.items():
        scale = max(float(np.max(np.abs(want))), 1e-3)
        err = float(np.max(np.abs(got[key].astype(np.float64) - want))) / scale
        if not err <= worst:  # NaN counts as worst
            worst, where = err, key
    return worst, where


@pytest.mark.parametrize("name", sorted(CASES))
def test_training_matches_caffe(runs, name):
    root, results = runs
    assert results[name]["status"] == "ok", results[name]["log"]
    err, where = _worst(_load(root, name, "caffe"), _load(root, name, "ours"))
    assert err <= RTOL, f"{name}: relative error {err:.3g} at {where}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_caffe_resumes_from_our_snapshot(runs, name):
    root, results = runs
    assert results[name]["status"] == "ok", results[name]["log"]
    full = _load(root, name, "caffe")
    resumed = _after_first_test(_load(root, name, "caffe_resumed"))
    err, where = _worst(resumed, {k: full[k] for k in resumed})
    assert err <= RTOL, f"{name}: relative error {err:.3g} at {where}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_we_resume_from_caffe_snapshot(runs, name):
    root, results = runs
    assert results[name]["status"] == "ok", results[name]["log"]
    full = _load(root, name, "caffe")
    resumed = _after_first_test(_load(root, name, "ours_resumed"))
    err, where = _worst({k: full[k] for k in resumed}, resumed)
    assert err <= RTOL, f"{name}: relative error {err:.3g} at {where}"


def _state(path: str) -> tuple:
    with open(path, "rb") as f:
        msg = caffe_pb().SolverState.FromString(f.read())
    return msg.iter, msg.current_step, os.path.basename(msg.learned_net), [np.array(h.data) for h in msg.history]


def test_solve_snapshots_as_caffe(runs):
    """solve(): the same snapshot files (interval and snapshot_after_train), states and weights."""
    root, results = runs
    assert results["solve"]["status"] == "ok", results["solve"]["log"]
    case_dir = os.path.join(str(root), "solve")
    names = {sub: sorted(f for f in os.listdir(os.path.join(case_dir, sub)) if f.startswith("snap"))
             for sub in ("caffe", "ours")}
    assert names["ours"] == names["caffe"] == [f"snap_iter_{i}.{ext}" for i in (2, 4, 5)
                                               for ext in ("caffemodel", "solverstate")]
    for i in (2, 4, 5):
        theirs, mine = (_state(os.path.join(case_dir, sub, f"snap_iter_{i}.solverstate")) for sub in ("caffe", "ours"))
        assert mine[:3] == theirs[:3]
        assert _worst({str(k): h for k, h in enumerate(theirs[3])}, {str(k): h for k, h in enumerate(mine[3])})[0] \
            <= RTOL
        weights = {sub: {f"{n}/{k}": a for n, arrays in io.load_weights(
            os.path.join(case_dir, sub, f"snap_iter_{i}.caffemodel")).items() for k, a in enumerate(arrays)}
            for sub in ("caffe", "ours")}
        assert _worst(weights["caffe"], weights["ours"])[0] <= RTOL
