"""LeNet on MNIST trained by the embedded runtime and by official Caffe, from the same weights.

The data are LMDBs written from ../shared/data/mnist_5k.npz (4000 train, 1000 test digits); the
net is Caffe's own ``lenet_train_test.prototxt``; the solver is lenet_solver's (SGD, momentum 0.9,
weight decay 5e-4, ``inv`` policy). Caffe initialises the weights (xavier) and both runs start from
that caffemodel. Checked: the parameters after 20/40/60 SGD iterations (1e-3 of each blob's
scale), a few iterations of every other solver type, Caffe resuming from our snapshot, and the
test accuracy after 300 iterations.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from amct_caffe.runtime.layers import caffe_gemm
from tests.real_caffe import pycaffe_dir, run_with_pycaffe
from tests.training.mnist import mnist_lenet

pytestmark = pytest.mark.real_caffe

CHECKPOINTS = (20, 40, 60)
# Where numpy's BLAS is not OpenBLAS's AVX-512 build, every GEMM rounds apart from Caffe's (whose own gradients
# with OpenBLAS's AVX2 kernels differ from its AVX-512 build's by up to 0.2 % on open_nsfw): the trajectories
# part beyond the tolerances below within 40 iterations; test_training_reaches_caffe_accuracy still holds.
INEXACT = "numpy's BLAS does not round like Caffe's here: the SGD trajectories part (see INEXACT)"
ACCURACY_ITERS = 300
OTHER_SOLVERS = {
    "Nesterov": "",
    "AdaGrad": "momentum: 0\nlr_policy: \"fixed\"",
    "RMSProp": "momentum: 0\nrms_decay: 0.98\nbase_lr: 0.001\nlr_policy: \"fixed\"",
    "AdaDelta": "momentum: 0.95\ndelta: 1e-6\nbase_lr: 1.0\nlr_policy: \"fixed\"",
    "Adam": "momentum: 0.9\nmomentum2: 0.999\ndelta: 1e-8\nbase_lr: 0.001\nlr_policy: \"fixed\"",
}
OTHER_ITERS = 5

_CAFFE = r'''
import json, os
import numpy as np
import caffe
caffe.set_mode_cpu()
cfg = json.loads(CFG)

def params(net):
    return {f"{k}/{i}": np.array(b.data) for k, bl in net.params.items() for i, b in enumerate(bl)}

out = {}
s = caffe.get_solver(cfg["solver"])
if cfg["job"] == "sgd":
    s.net.save(cfg["init"])
    for it in cfg["checkpoints"]:
        s.step(it - s.iter)
        out.update({f"sgd@{it}/{k}": v for k, v in params(s.net).items()})
else:
    s.net.copy_from(cfg["init"])
    s.step(cfg["iters"])
    out.update({f"{cfg['job']}@{cfg['iters']}/{k}": v for k, v in params(s.net).items()})
    if cfg["job"] == "accuracy":
        s.test_nets[0].share_with(s.net)  # no test ran (test_interval is huge): share the weights now
        out["accuracy"] = np.array(np.mean([float(s.test_nets[0].forward()["accuracy"]) for _ in range(10)]))
np.savez(cfg["out"], **out)
os._exit(0)  # pycaffe's teardown of a solver with Data layers may abort ("double free")
'''


def _run_caffe(code: str, cfg: dict):
    proc = run_with_pycaffe(code.replace("CFG", repr(json.dumps(cfg))), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if pycaffe_dir() is None:
        pytest.skip("AMCT_REAL_CAFFE is not set")
    workdir = tmp_path_factory.mktemp("lenet")
    sgd = mnist_lenet(workdir)
    others = {}
    for name, extra in OTHER_SOLVERS.items():
        d = workdir / name
        d.mkdir()
        others[name] = str(mnist_lenet(d, solver=f'type: "{name}"\n{extra}'))
    cfg = {"sgd": str(sgd), "init": str(workdir / "init.caffemodel"), "others": others}
    # one solver per process: pycaffe cannot free a solver with Data layers, nor open one LMDB twice
    jobs = [("sgd", str(sgd), 0)] + [(name, path, OTHER_ITERS) for name, path in others.items()]
    jobs.append(("accuracy", str(sgd), ACCURACY_ITERS))
    ref = {}
    for job, solver, iters in jobs:
        out = workdir / f"caffe_{job}.npz"
        _run_caffe(_CAFFE, {"job": job, "solver": solver, "init": cfg["init"], "iters": iters,
                            "checkpoints": list(CHECKPOINTS), "out": str(out)})
        with np.load(out) as z:
            ref.update({k: z[k] for k in z.files})
    return workdir, cfg, ref


def _ours(solver_path, init):
    from amct_caffe import runtime as caffe  # noqa: PLC0415

    s = caffe.get_solver(str(solver_path))
    s.net.copy_from(init)
    return s


def _params(net) -> dict:
    return {f"{k}/{i}": np.array(b.data) for k, bl in net.params.items() for i, b in enumerate(bl)}


def _problems(ref: dict, prefix: str, ours: dict, rtol: float, outliers: float = 0.0, bound: float = 0.0,
              outlier_rtol: float = 0.0) -> list[str]:
    """Blobs under ``prefix`` differing beyond ``rtol`` x the blob's scale.

    ``outliers``: the fraction of elements allowed beyond that, each within ``bound``
    (absolute) or ``outlier_rtol`` x the blob's scale. The adaptive solvers divide each gradient by
    its own running magnitude, so an element whose gradient is at rounding-noise level moves by up
    to the learning rate either way.
    """
    out = []
    for key, want in ref.items():
        if not key.startswith(prefix):
            continue
        got = ours[key[len(prefix):]]
        scale = float(np.abs(want).max()) or 1.0
        err = np.abs(got.astype(np.float64) - want)
        beyond = err > rtol * scale
        allowed = max(bound, (outlier_rtol or rtol) * scale)
        if beyond.mean() > outliers or (beyond.any() and float(err.max()) > allowed):
            out.append(f"{key}: {int(beyond.sum())}/{err.size} beyond {rtol:g} x scale {scale:.3g}, "
                       f"max |diff| {float(err.max()):.3g}")
    return out


def test_sgd_trajectory_matches_caffe(runs):
    workdir, cfg, ref = runs
    """Within 1e-3 of each blob's scale; at the last checkpoint a few elements may stray further.

    The two runs sum in the same order, but inside a GEMM the rounding depends on the BLAS build
    and its thread count (Caffe's OpenBLAS with 1 thread: one ip1 bias of 500 at 1.1e-3 x scale
    after 60 iterations). Such differences grow along the trajectory, as a ReLU or a max pooling
    picks the other side, so the last checkpoint allows 1 % of the elements within 1e-2 x scale.
    """
    if not caffe_gemm.exact():
        pytest.skip(INEXACT)
    s = _ours(cfg["sgd"], cfg["init"])
    problems = []
    for it in CHECKPOINTS:
        s.step(it - s.iter)
        last = it == CHECKPOINTS[-1]
        problems += _problems(ref, f"sgd@{it}/", _params(s.net), 1e-3, outliers=0.01 if last else 0.0,
                              outlier_rtol=1e-2 if last else 0.0)
    assert problems == []


@pytest.mark.parametrize("solver", sorted(OTHER_SOLVERS))
def test_other_solvers_match_caffe(runs, solver):
    _, cfg, ref = runs
    s = _ours(cfg["others"][solver], cfg["init"])
    s.step(OTHER_ITERS)
    lr = {"Nesterov": 0.01, "AdaGrad": 0.01, "RMSProp": 0.001, "AdaDelta": 1.0, "Adam": 0.001}[solver]
    adaptive = solver != "Nesterov"
    # (an adaptive step divides by the gradients' own size, so where they are near 0 their rounding noise moves
    # a parameter by up to lr a step; where numpy's BLAS does not round like Caffe's every gradient carries
    # such noise: measured 0.12 % of conv2's weights with RMSProp and OpenBLAS's Sandybridge kernels)
    strays = (1e-3 if caffe_gemm.exact() else 5e-3) if adaptive else 0.0
    assert _problems(ref, f"{solver}@{OTHER_ITERS}/", _params(s.net), 1e-3, outliers=strays,
                     bound=2 * lr * OTHER_ITERS if adaptive else 0.0) == []


def test_caffe_resumes_our_snapshot(runs):
    """Ours runs 30 iterations and snapshots; Caffe and ours each restore it and run 10 more.

    A restored solver reads its Data layers from the start again (Caffe's snapshot holds no data
    cursor), so the reference is Caffe's run from our files, not its uninterrupted run. Ten steps:
    further on, a MAX-pooling near tie flipped by float noise (our convolution sums in another
    order than OpenBLAS) routes one gradient elsewhere and the runs drift apart by 1e-4 per step.
    """
    workdir, cfg, _ = runs
    s = _ours(cfg["sgd"], cfg["init"])
    s.step(30)
    s.snapshot()
    state = workdir / "lenet_iter_30.solverstate"
    assert state.is_file() and (workdir / "lenet_iter_30.caffemodel").is_file()
    code = r'''
import json, os
import numpy as np
import caffe
caffe.set_mode_cpu()
cfg = json.loads(CFG)
s = caffe.get_solver(cfg["sgd"])
s.restore(cfg["state"])
assert s.iter == 30, s.iter
s.step(10)
np.savez(cfg["out"], **{f"{k}/{i}": np.array(b.data) for k, bl in s.net.params.items() for i, b in enumerate(bl)})
os._exit(0)
'''
    out = workdir / "resumed.npz"
    _run_caffe(code, {"sgd": cfg["sgd"], "state": str(state), "out": str(out)})
    with np.load(out) as z:
        caffe_resumed = {"resumed/" + k: z[k] for k in z.files}
    from amct_caffe import runtime as caffe  # noqa: PLC0415

    ours = caffe.get_solver(cfg["sgd"])
    ours.restore(str(state))
    assert ours.iter == 30
    ours.step(10)
    assert _problems(caffe_resumed, "resumed/", _params(ours.net), 1e-3) == []


def test_training_reaches_caffe_accuracy(runs):
    _, cfg, ref = runs
    s = _ours(cfg["sgd"], cfg["init"])
    s.step(ACCURACY_ITERS)
    s.test_nets[0].share_with(s.net)
    acc = float(np.mean([float(s.test_nets[0].forward()["accuracy"]) for _ in range(10)]))
    assert acc > 0.9
    assert abs(acc - float(ref["accuracy"])) <= 0.01
