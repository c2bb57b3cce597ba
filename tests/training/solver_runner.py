"""Runs solver cases in real Caffe (pycaffe), for :mod:`tests.training.test_solvers_real`.

Run in a subprocess that imports pycaffe: ``main(workdir)`` reads ``workdir/manifest.json``, a list of
cases ``{"name", "dir", "iters", "snapshot_at", "resume_from"}`` (or ``{"name", "dir", "mode": "solve"}``:
:func:`solve` in ``dir/caffe``). For each case, in ``dir/caffe``
(which holds solver.prototxt and net.prototxt): build the solver, load ``dir/init.caffemodel``, then
for each iteration i set the ``data`` input to ``dir/data.npz``'s ``x[i]`` (and the test nets' to
``t``), ``step(1)``, and record every learned blob and the test nets' outputs; after ``snapshot_at``
iterations write a snapshot. Then, in ``dir/caffe_resumed``, a second solver restores
``resume_from`` (our .solverstate) and runs the remaining iterations the same way. Results go to
``dir/caffe.npz`` and ``dir/caffe_resumed.npz`` (keys ``w/<iter>/<layer>/<k>`` and
``t/<iter>/<net>/<blob>``); ``workdir/results.json`` says ``ok`` or the traceback per case.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import numpy as np


def _record(solver, out: dict) -> None:
    it = solver.iter
    for layer, blobs in solver.net.params.items():
        for k, b in enumerate(blobs):
            out[f"w/{it}/{layer}/{k}"] = np.array(b.data)
    for n, net in enumerate(solver.test_nets):
        res = net.forward()
        for name, value in res.items():
            out[f"t/{it}/{n}/{name}"] = np.array(value)


def _run(caffe, case_dir: str, sub: str, first: int, last: int, snapshot_at, restore) -> None:
    with np.load(os.path.join(case_dir, "data.npz")) as z:
        x, t = z["x"], z["t"]
    os.chdir(os.path.join(case_dir, sub))
    solver = caffe.get_solver("solver.prototxt")
    solver.net.copy_from(os.path.join(case_dir, "init.caffemodel"))
    if restore:
        solver.restore(restore)
    assert solver.iter == first, (solver.iter, first)
    out: dict = {}
    for i in range(first, last):
        solver.net.blobs["data"].data[...] = x[i]
        for net in solver.test_nets:
            net.blobs["data"].data[...] = t
        solver.step(1)
        _record(solver, out)
        if snapshot_at is not None and solver.iter == snapshot_at:
            solver.snapshot()
    np.savez(os.path.join(case_dir, sub + ".npz"), **out)


def solve(caffe, case_dir: str, sub: str) -> None:
    """``solve()`` in ``case_dir/sub`` from init.caffemodel on the fixed batch ``x[0]`` (its snapshots stay there)."""
    with np.load(os.path.join(case_dir, "data.npz")) as z:
        x, t = z["x"], z["t"]
    os.chdir(os.path.join(case_dir, sub))
    solver = caffe.get_solver("solver.prototxt")
    solver.net.copy_from(os.path.join(case_dir, "init.caffemodel"))
    solver.net.blobs["data"].data[...] = x[0]
    for net in solver.test_nets:
        net.blobs["data"].data[...] = t
    solver.solve()


def main(workdir: str) -> None:
    sys.path.insert(0, os.getcwd())
    import caffe  # noqa: PLC0415 - pycaffe is only importable in this subprocess

    caffe.set_mode_cpu()
    with open(os.path.join(workdir, "manifest.json")) as f:
        cases = json.load(f)
    results = {}
    for case in cases:
        try:
            if case.get("mode") == "solve":
                solve(caffe, case["dir"], "caffe")
                results[case["name"]] = {"status": "ok", "log": ""}
                continue
            _run(caffe, case["dir"], "caffe", 0, case["iters"], case["snapshot_at"], None)
            _run(caffe, case["dir"], "caffe_resumed", case["snapshot_at"], case["iters"], None, case["resume_from"])
            results[case["name"]] = {"status": "ok", "log": ""}
        except Exception:  # noqa: BLE001 - reported per case to the test
            results[case["name"]] = {"status": "error", "log": traceback.format_exc()}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f)
