"""Differential test of the backward pass: random small nets, official Caffe vs the executor.

The nets of :mod:`tests.differential.netgen` get ``force_backward: true`` and run through
:mod:`tests.training.grad_runner` (TEST phase: forward, random diffs on the outputs, backward).
The executor runs the same prototxt on the caffemodel Caffe wrote, with the same output diffs;
every blob diff and every learned-blob diff must agree within 1e-4 of the array's scale, except
where both are rounding noise of a cancelled sum under a normalization (``cancelled_noise``).

A net whose forward already disagrees is left to ``test_differential`` (it reports those). A net
Caffe cannot back-propagate (a layer whose Backward_cpu is NOT_IMPLEMENTED aborts it) must be
refused by the executor with an AmctError. CI runs ``DEFAULT_NETS`` nets; more by hand::

    AMCT_BACKWARD_NETS=4000 AMCT_REAL_CAFFE=/path/to/caffe python -m pytest -m real_caffe \
        tests/differential/test_backward_differential.py
"""

from __future__ import annotations

import logging
import os
import re
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


# Layers whose output does not change when a per-group constant (MVN, BatchNorm with batch
# statistics: the mean is subtracted) or a per-group scale (MVN normalize_variance, BatchNorm,
# Normalize: divided by the spread or the norm) is added to or multiplies their input. The fork's
# BatchNormKyle is BatchNorm then alpha * x_norm + beta; its use_global_stats defaults to the
# phase (TEST: stored statistics), so only an explicit false counts.
_INVARIANT = re.compile(r'type: "(MVN|Normalize)"|type: "BatchNorm(Kyle)?".*use_global_stats: false')
NOISE = 1e-5


def _largest_diff(ref: dict) -> float:
    """The largest magnitude of any blob diff (or output diff) of the net."""
    return max(float(np.abs(v).max()) for k, v in ref.items() if k.startswith(("diff/", "topdiff/")) and v.size)


def _largest_count(ref: dict) -> int:
    """The size of the net's largest diff array: at most that many terms sum into one gradient."""
    return max(v.size for k, v in ref.items() if k.startswith(("diff/", "topdiff/")))


def cancelled_noise(prototxt: str, ref: dict, ours: dict, problems: list[str]) -> str | None:
    """Why the disagreeing arrays are rounding noise of a sum whose terms cancel, or None.

    Under a layer of ``_INVARIANT`` the exact gradient of a learned blob that only shifts (a bias
    feeding an MVN) or only scales (a num_axes 0 Scale before a variance normalization) each
    normalized group is zero (up to eps), and so is every diff under a Normalize of one-element
    groups or a BatchNorm of two-value channels. Above the normalization, a blob that scales the
    normalized values per channel (BatchNormKyle's alpha) has gradient
    ``sum over n, s of x_norm[n, c, s] * dy[n, c, s]``, which is zero when ``dy`` is constant per
    channel (a SUM reduction above it), since batch statistics make ``sum x_norm[:, c] = 0``.
    Caffe and the executor both return the rounding of a sum of terms of the net's gradient size
    that cancel, so the two values agree only to a few float32 ulps of those terms, whatever their
    own (tiny) scale. Excused: a net with such a layer where every disagreement is within
    ``noise_bound`` of the largest diff of the net, or within ``n`` times the difference the other
    diffs agree within (a sum of up to ``n`` such elements, ``n`` the largest diff array).
    """
    if not _INVARIANT.search(prototxt):
        return None
    big = _largest_diff(ref)
    bound = noise_bound(prototxt, ref)
    keys = [p.split(":", 1)[0] for p in problems]
    if any(key not in ours or ours[key].size != ref[key].size for key in keys):
        return None

    def err(key):
        return float(np.abs(ours[key].reshape(ref[key].shape).astype(np.float64) - ref[key]).max()) if ref[
            key].size else 0.0
    # a learned blob's gradient sums up to n elements of diffs that agree within this each
    n = _largest_count(ref)
    agreed = max((err(k) for k in ref if k.startswith(("diff/", "pdiff/")) and k not in keys and k in ours
                  and ours[k].size == ref[k].size), default=0.0)
    for key in keys:
        if not err(key) <= max(bound * big, n * agreed):
            return None
    return (f"every disagreement is within {bound:.3g} of the net's largest diff {big:.3g}, or {n} times the "
            f"{agreed:.3g} the other diffs agree within, under a normalization")


def noise_bound(prototxt: str, ref: dict) -> float:
    """The rounding noise of a cancelled gradient, relative to the net's largest diff.

    A learned blob's gradient under a normalization sums ``n`` terms of up to that size whose exact
    sum is zero; summed in another order, two float32 results differ by up to about ``n`` ulps of
    the terms (``n``: bounded by the largest diff array). Under a Normalize of one-element groups
    every bottom diff is ``(dy - x_hat (dy . x_hat)) / |x|``, an ulp of ``dy`` divided by ``|x|``:
    the noise grows with the spread of the Normalize's bottom, ``max |x| / min |x|``. At least
    ``NOISE``.
    """
    n = _largest_count(ref)
    spread = 1.0
    for bottom in re.findall(r'type: "Normalize" bottom: "([^"]+)"', prototxt):
        x = np.abs(ref.get(f"data/{bottom}", np.ones(1)))
        x = x[x > 0]
        if x.size:
            spread = max(spread, float(x.max() / x.min()))
    return max(NOISE, 4 * 2.0 ** -24 * max(n, spread))


_BATCH_NORMALIZING = re.compile(r'type: "(BatchNorm|MVN)" bottom: "[^"]+" top: "([^"]+)"(.*)')


def constant_group(prototxt: str, ref: dict) -> str | None:
    """The normalization whose output has a group of spread well under 1, or None.

    A BatchNorm on batch statistics or an MVN dividing by the spread gives every group unit
    variance, unless the group was constant (its variance under eps): then the output is the
    rounding noise of ``x - mean`` times ``1 / sqrt(eps)``, and so is every gradient through it.
    Such a net's forward agrees only within the tolerance, and its backward not at all; the
    forward test excludes it alike (``test_differential.ill_conditioned``).
    """
    for line in prototxt.splitlines():
        m = _BATCH_NORMALIZING.search(line)
        if not m or (m.group(1) == "BatchNorm" and "use_global_stats: false" not in m.group(3)) or (
                m.group(1) == "MVN" and "normalize_variance: false" in m.group(3)):
            continue
        y = ref.get(f"data/{m.group(2)}")
        if y is None or y.ndim < 2 or not y.size:
            continue
        if m.group(1) == "BatchNorm":
            groups = np.moveaxis(y, 1, 0).reshape(y.shape[1], -1)
        else:
            groups = y.reshape(y.shape[0], -1) if "across_channels: true" in m.group(3) else y.reshape(
                y.shape[0] * y.shape[1], -1)
        if groups.shape[1] > 1 and float(groups.std(axis=1).min()) < 0.5:
            return f"a constant group under {m.group(1)} (top '{m.group(2)}'): amplified rounding noise"
    return None


def _check(workdir: Path, name: str, status: str, prototxt: str = "") -> tuple[str, str]:
    """("ok" | "forward" | "noise" | "fail", detail) for one net."""
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
    if not problems:
        return "ok", ""
    for why in (constant_group(prototxt, ref), near_max_tie(prototxt, ref, ours)):
        if why:
            return "forward", why
    for why in (cancelled_noise(prototxt, ref, ours, problems), summed_noise(ref, ours, problems)):
        if why:
            return "noise", why
    return "fail", "\n  ".join(problems[:6])


_ELTWISE_MAX = re.compile(r'type: "Eltwise" ((?:bottom: "[^"]+" )+)top: "[^"]+" eltwise_param \{[^}]*operation: MAX')
TIE = 1e-6


def near_max_tie(prototxt: str, ref: dict, ours: dict) -> str | None:
    """An Eltwise MAX whose two largest bottoms are within ``TIE`` of the blob scale somewhere in
    Caffe's forward, where the executor's bottoms are not Caffe's to the bit: which bottom wins
    there (and takes the gradient) then depends on the last ulp, as at the order-sensitive layers
    the forward test excuses (``test_differential.near_tie``). None when there is no such place.
    """
    for m in _ELTWISE_MAX.finditer(prototxt):
        names = re.findall(r'bottom: "([^"]+)"', m.group(1))
        if any(f"data/{b}" not in ref or f"data/{b}" not in ours for b in names) or len(names) < 2:
            continue
        caffe = np.stack([ref[f"data/{b}"].ravel() for b in names])
        if not any(np.any(ours[f"data/{b}"].ravel() != ref[f"data/{b}"].ravel()) for b in names):
            continue  # the same bottoms: the same choices
        top2 = np.sort(caffe, axis=0)[-2:]
        scale = float(np.abs(caffe).max()) or 1.0
        if np.any(top2[1] - top2[0] <= TIE * scale):
            return f"an Eltwise MAX of {names} has bottoms within {TIE:g} of scale {scale:.3g}: a near tie"
    return None


def summed_noise(ref: dict, ours: dict, problems: list[str]) -> str | None:
    """Why the disagreeing arrays are within the rounding of a float32 sum of the net's terms, or None.

    A learned blob's gradient (a bias: the sum of its top diff over the batch and the map) whose
    terms nearly cancel is compared against its own small scale; two summation orders differ by
    up to about ``n`` ulps of the terms, ``n`` the largest diff array (at most 4096 counted).
    """
    big = _largest_diff(ref)
    n = min(4096, _largest_count(ref))
    bound = 4 * 2.0 ** -24 * n * big
    for p in problems:
        key = p.split(":", 1)[0]
        if key not in ours or ours[key].size != ref[key].size or not ref[key].size:
            return None
        if not float(np.abs(ours[key].reshape(ref[key].shape).astype(np.float64) - ref[key]).max()) <= bound:
            return None
    return f"every disagreement is within {bound:.3g}, the rounding of a sum of {n} terms of the net's {big:.3g}"


@pytest.mark.parametrize("seed", SEEDS)
def test_random_nets_backward_agree_with_caffe(seed, tmp_path, caplog):
    caplog.set_level(logging.CRITICAL, logger="amct_caffe")
    nets = [generate(seed, i) for i in range(nets_per_seed())]
    results = run_in_caffe(tmp_path, [(n.name, _with_force_backward(n.prototxt), n.inputs, "TEST") for n in nets],
                           seed=seed)
    failures, forward_differs, noise = [], 0, 0
    for n in nets:
        verdict, detail = _check(tmp_path, n.name, results[n.name]["status"], n.prototxt)
        if verdict == "forward":
            forward_differs += 1
        elif verdict == "noise":
            noise += 1
        elif verdict == "fail":
            failures.append(f"--- seed {seed}, net {n.index} (focus {n.focus}):\n  {detail}\n{n.prototxt}")
    assert forward_differs <= max(3, len(nets) // 50), f"{forward_differs} nets differ already in the forward"
    assert noise <= max(3, len(nets) // 50), f"{noise} nets excused as cancellation noise: too many to be that"
    assert not failures, f"{len(failures)} of {len(nets)} nets disagree with Caffe:\n" + "\n".join(failures[:8])
