"""Compare the executor's forward + backward with official Caffe's on the same nets.

``run_in_caffe(workdir, cases)`` runs ``[(name, prototxt_text, inputs, phase[, options])]`` through
:mod:`tests.training.grad_runner` in one pycaffe process; ``executor_grads`` repeats one case
with :class:`amct_caffe.runtime.Net` (same weights, same inputs, same top diffs) and returns the
same keys; ``grad_problems`` lists every array that differs by more than the tolerance.

``options`` (optional, so four-item cases keep working): ``{"forwards": k}`` runs the forward k
times before the one backward (BatchNorm's moving averages in TRAIN); an input named ``"B#i"``
replaces blob ``B`` on forward ``i`` (0-based), ``"B"`` being used on the others.
"""

from __future__ import annotations

import json
import os

import numpy as np

from tests.real_caffe import run_with_pycaffe


def run_in_caffe(workdir, cases, seed: int = 0, weights: dict | None = None) -> dict:
    """{name: {"status", "log"}} after running every case in real Caffe.

    ``weights``: {case name: caffemodel path} for cases that run a real model's weights.
    """
    manifest = []
    for case in cases:
        name, prototxt, inputs, phase = case[:4]
        options = case[4] if len(case) > 4 else {}
        with open(os.path.join(workdir, name + ".prototxt"), "w") as f:
            f.write(prototxt)
        entry = {"name": name, "prototxt": name + ".prototxt", "phase": phase, "seed": seed,
                 "forwards": int(options.get("forwards", 1))}
        if weights and name in weights:
            entry["weights"] = str(os.path.abspath(weights[name]))
        if inputs:
            np.savez(os.path.join(workdir, name + ".inputs.npz"), **inputs)
            entry["inputs"] = name + ".inputs.npz"
        manifest.append(entry)
    with open(os.path.join(workdir, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    proc = run_with_pycaffe(f"from tests.training.grad_runner import main; main({str(workdir)!r})", timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"grad_runner failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def caffe_grads(workdir, name) -> dict[str, np.ndarray]:
    with np.load(os.path.join(workdir, name + ".grad.npz")) as z:
        return {k: z[k] for k in z.files}


def inputs_for_forward(inputs: dict, i: int) -> dict:
    """The inputs of forward ``i``: ``"B#i"`` overrides ``"B"`` (see the module docstring)."""
    out = {k: v for k, v in inputs.items() if "#" not in k}
    for k, v in inputs.items():
        if "#" in k and k.rsplit("#", 1)[1] == str(i):
            out[k.rsplit("#", 1)[0]] = v
    return out


def _forwards(workdir, name) -> int:
    path = os.path.join(workdir, "manifest.json")
    if not os.path.exists(path):
        return 1
    with open(path) as f:
        return next((int(e.get("forwards", 1)) for e in json.load(f) if e["name"] == name), 1)


def executor_grads(workdir, name, phase: str = "TRAIN") -> dict[str, np.ndarray]:
    """The executor's counterpart of ``caffe_grads`` for case ``name``."""
    from amct_caffe.runtime import TEST, TRAIN, Net  # noqa: PLC0415

    have_ref = os.path.exists(os.path.join(workdir, name + ".grad.npz"))
    ref = caffe_grads(workdir, name) if have_ref else {}  # {} when Caffe could not back-propagate
    net = Net(os.path.join(workdir, name + ".prototxt"), os.path.join(workdir, name + ".caffemodel"),
              TRAIN if phase == "TRAIN" else TEST)
    inputs = {}
    path = os.path.join(workdir, name + ".inputs.npz")
    if os.path.exists(path):
        with np.load(path) as z:
            inputs = {k: z[k] for k in z.files}
    for i in range(_forwards(workdir, name)):
        net.forward(**inputs_for_forward(inputs, i))
    diffs = {}
    for o in net.outputs:
        key = f"topdiff/{o}"
        seed = np.array(net.blobs[o].diff)
        diffs[o] = ref[key] if key in ref else (seed if np.any(seed) else np.ones_like(seed))
    net.backward(**diffs)
    out = {"loss": np.array(net.loss, dtype=np.float64)}
    for k, b in net.blobs.items():
        out[f"data/{k}"] = np.array(b.data, dtype=np.float32)
        out[f"diff/{k}"] = np.array(b.diff, dtype=np.float32)
    for k, blobs in net.params.items():
        for i, b in enumerate(blobs):
            out[f"pdata/{k}/{i}"] = np.array(b.data, dtype=np.float32)
            out[f"pdiff/{k}/{i}"] = np.array(b.diff, dtype=np.float32)
    return out


TIE_RTOL = 1e-2  # (grad_problems' ``ties``) a gradient a tie sent elsewhere differs by more than this x scale


def grad_problems(ref: dict, ours: dict, rtol: float = 1e-4, skip=(), ties: float | None = None) -> list[str]:
    """Arrays of ``ref`` that ``ours`` lacks or that differ beyond ``rtol`` (relative to the array's scale).

    A value agrees when ``|ours - ref| <= rtol * max(scale, 1e-3)``, ``scale`` the largest finite
    ``|ref|``, or when both are the same infinity or both NaN: Caffe's own formulas give NaN and
    inf (Power's ``power * y / x`` at x = 0 is 0/0), and the executor must give them at the same
    places, as the forward differential test (``test_differential.compare_net``) requires.

    ``ties``: where the two forwards do not round alike (numpy's BLAS is not OpenBLAS's AVX-512 build,
    ``caffe_gemm.exact()`` false), a max pooling's argmax or a ReLU's kink within rounding noise may go
    the other way and send a gradient elsewhere; an array then agrees when at most that fraction of its
    values differ by more than :data:`TIE_RTOL` of its scale.
    """
    problems = []
    for key, want in ref.items():
        if key.startswith("topdiff/") or any(key.startswith(s) for s in skip):
            continue
        if key not in ours:
            problems.append(f"{key}: missing in the executor")
            continue
        got = ours[key]
        if got.shape != want.shape and got.size == want.size:
            got = got.reshape(want.shape)
        if got.shape != want.shape:
            problems.append(f"{key}: shape {got.shape} vs Caffe {want.shape}")
            continue
        if not want.size:
            continue
        finite = np.isfinite(want)
        scale = float(np.max(np.abs(want[finite]))) if finite.any() else 0.0
        with np.errstate(invalid="ignore"):  # inf - inf
            err = np.abs(got.astype(np.float64) - want)
            bad = ~((err <= rtol * max(scale, 1e-3)) | (got == want) | (np.isnan(got) & np.isnan(want)))
        if bad.any() and ties is not None:
            with np.errstate(invalid="ignore"):
                bad &= ~(err <= TIE_RTOL * max(scale, 1e-3))
            if bad.mean() <= ties:
                continue
        if bad.any():
            worst = float(np.nan_to_num(err[bad], nan=np.inf).max())
            problems.append(f"{key}: {int(bad.sum())}/{want.size} values differ, max |diff| {worst:.3g} "
                            f"vs scale {scale:.3g}")
    return problems


def cont_indicators(pattern: str, t: int, n: int) -> np.ndarray:
    """Recurrent layers' 0/1 sequence indicators (T, N): ``first`` (a new sequence at t = 0),
    ``ones`` (continue from the initial state), ``restart`` (new sequences mid-batch in some streams)."""
    cont = np.ones((t, n), np.float32)
    if pattern in ("first", "restart"):
        cont[0] = 0
    if pattern == "restart":
        cont[t // 2, ::2] = 0
        cont[t - 1, n - 1] = 0
    return cont


def input_layer(name: str, *dims: int) -> str:
    """One ``Input`` layer of top ``name`` and shape ``dims`` (prototxt text, one line)."""
    return (f'layer {{ name: "{name}" type: "Input" top: "{name}" '
            f'input_param {{ shape {{ {" ".join(f"dim: {d}" for d in dims)} }} }} }}\n')


def assert_matches_caffe(workdir, results: dict, case: str, phase: str = "TRAIN", check_loss: bool = True) -> dict:
    """Case ``case`` ran in Caffe, and the executor's data, diffs and loss equal Caffe's; returns ours."""
    import pytest  # noqa: PLC0415 - a test helper module, imported by tests only

    assert results[case]["status"] == "ok", results[case]["log"]
    ref = caffe_grads(workdir, case)
    ours = executor_grads(workdir, case, phase)
    assert grad_problems(ref, ours) == []
    if check_loss:
        assert ours["loss"] == pytest.approx(float(ref["loss"]), rel=1e-5, abs=1e-6)
    return ours
