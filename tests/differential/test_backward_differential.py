"""Differential test of the backward pass: random small nets, official Caffe vs the executor.

The nets of :mod:`tests.differential.netgen` get ``force_backward: true`` and run through
:mod:`tests.training.grad_runner` (TEST phase: forward, random diffs on the outputs, backward).
The executor runs the same prototxt on the caffemodel Caffe wrote, with the same output diffs;
every blob diff and every learned-blob diff must agree within 1e-4 of the array's scale.

A net whose forward already disagrees is left to ``test_differential`` (it reports those). A net
Caffe cannot back-propagate (a layer whose Backward_cpu is NOT_IMPLEMENTED aborts it) must be
refused by the executor with an AmctError. CI runs ``DEFAULT_NETS`` nets; more by hand::

    AMCT_BACKWARD_NETS=4000 AMCT_REAL_CAFFE=/path/to/caffe python -m pytest -m real_caffe \
        tests/differential/test_backward_differential.py
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from amct_caffe.errors import AmctError
from tests.differential.netgen import generate
from tests.training.gradcheck import caffe_grads, executor_grads, grad_problems, run_in_caffe

pytestmark = pytest.mark.real_caffe

SEEDS = (101, 211, 307, 401)
DEFAULT_NETS = 480


def nets_per_seed() -> int:
    total = int(os.environ.get("AMCT_BACKWARD_NETS", DEFAULT_NETS))
    return max(1, -(-total // len(SEEDS)))


def _with_force_backward(prototxt: str) -> str:
    head, _, rest = prototxt.partition("\n")
    return f"{head}\nforce_backward: true\n{rest}"


def _executor(workdir: Path, name: str):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return executor_grads(workdir, name, phase="TEST")


def _check(workdir: Path, name: str, status: str) -> tuple[str, str]:
    """("ok" | "forward" | "fail", detail) for one net."""
    if status != "ok":
        try:
            _executor(workdir, name)
        except AmctError:
            return "ok", ""
        except Exception as e:  # noqa: BLE001 - reported with the net
            return "fail", f"Caffe cannot back-propagate it; the executor fails with {type(e).__name__}: {e}"
        return "fail", "Caffe cannot back-propagate it, the executor does"
    try:
        ours = _executor(workdir, name)
    except Exception as e:  # noqa: BLE001 - reported with the net
        return "fail", f"the executor fails where Caffe runs: {type(e).__name__}: {e}"
    ref = caffe_grads(workdir, name)
    forward = [k for k in ref if k.startswith("data/")]
    if grad_problems({k: ref[k] for k in forward}, ours):
        return "forward", ""
    problems = grad_problems({k: v for k, v in ref.items() if k.startswith(("diff/", "pdiff/"))}, ours)
    return ("fail", "\n  ".join(problems[:6])) if problems else ("ok", "")


@pytest.mark.parametrize("seed", SEEDS)
def test_random_nets_backward_agree_with_caffe(seed, tmp_path, caplog):
    caplog.set_level(logging.CRITICAL, logger="amct_caffe")
    nets = [generate(seed, i) for i in range(nets_per_seed())]
    results = run_in_caffe(tmp_path, [(n.name, _with_force_backward(n.prototxt), n.inputs, "TEST") for n in nets],
                           seed=seed)
    failures, forward_differs = [], 0
    for n in nets:
        verdict, detail = _check(tmp_path, n.name, results[n.name]["status"])
        if verdict == "forward":
            forward_differs += 1
        elif verdict == "fail":
            failures.append(f"--- seed {seed}, net {n.index} (focus {n.focus}):\n  {detail}\n{n.prototxt}")
    assert forward_differs <= max(3, len(nets) // 50), f"{forward_differs} nets differ already in the forward"
    assert not failures, f"{len(failures)} of {len(nets)} nets disagree with Caffe:\n" + "\n".join(failures[:8])
