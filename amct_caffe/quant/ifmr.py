"""IFMR activation calibration: search the clip value whose quantization error is smallest.

Given all calibration values ``x`` (N floats, from ``batch_num`` batches) and ``b = num_bits``:

1. Percentile start points (partial selection, no full sort)::

       k_max = 1 if |max_percentile - 1| < DBL_EPSILON else N - floor(max_percentile * N)
       max0  = k_max-th largest x,   min0 = k_min-th smallest x   (k clamped to [1, N])
       max0  = max(max0, 0),         min0 = min(min0, 0)          (the range always holds 0)

2. Candidates ``ratio_i = start + i * step`` for ``i = 0 .. n-1`` with
   ``n = floor((end - start) / step + 1e-6) + 1`` -- the end point is included (0.7..1.3 by 0.01
   gives 61); the 1e-6 guards against ``0.4 / 0.02 = 19.999...``. Computed in float64.

3. With offset (asymmetric), only the upper clip moves::

       clip_i  = f32(ratio_i * max0),  lo = min0,  scale_i = f32((clip_i - min0) / (2^b - 1))

   Without offset (symmetric), ``a = max0 if |max0| > |min0| else min0`` (a tie picks the negative
   side), ``limit = 2^(b-1) - 1 if a > 0 else 2^(b-1)`` (the 127-versus-128 rule)::

       clip_i  = f32(ratio_i * |a|),   lo = -clip_i, scale_i = f32(clip_i / limit)

   Every ``scale_i`` goes through ``process_scale`` (``< FLT_EPSILON`` -> 1; non-finite or
   ``> 2^23`` -> "IfmrQuantWithOffset scale is illegal" / "IfmrQuantWithoutOffset ...").

4. Loss of candidate i: mean squared error against the *unclipped* data, so clipping counts::

       q = round(clamp(x, lo, clip_i) * inv_i) * scale_i,   inv_i = f32(1) / scale_i
       loss_i = sum_j f64(q_j - x_j)^2 / N        (q - x in float32, squared and summed in float64)

   Multiplying by the float32 reciprocal instead of dividing (the vendor divides) keeps the
   search vectorizable; it can move a value that sits on a rounding boundary by one step, which
   changes the loss by a rounding-noise amount and never the result's formula.

5. The first minimum wins: ``best = first i with sum_i <= min(sum) * (1 + 1e-10)``. The relative
   tolerance makes losses that differ only by float64 summation order (about 1e-13 for 10^7
   values) a tie, so the kernel and this reference always choose the same candidate.

6. Result: ``scale = scale_best``; with offset ``offset = -round(min0 / scale) - 2^(b-1)``
   (clamped into the int range), without offset ``offset = 0``.

The inputs must be finite: an inf or NaN raises the "scale is illegal" error of the mode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from amct_caffe.errors import ConfigError

from ._backend import call_kernel, resolve
from ._common import QuantizationError, check_num_bits, process_scale, qrange, round_half_away

__all__ = ["IfmrObserver", "IfmrParams", "IfmrResult", "ifmr_ratios", "ifmr_search"]

TIE_RTOL = 1e-10
_DBL_EPSILON = float(np.finfo(np.float64).eps)
_SLICE = 1 << 20  # reference works on slices of this many values to bound temporaries


@dataclass(frozen=True)
class IfmrParams:
    """IFMR settings with the user guide's defaults and ranges (checked on construction)."""

    num_bits: int = 8
    with_offset: bool = True
    max_percentile: float = 0.999999
    min_percentile: float = 0.999999
    search_range_start: float = 0.7
    search_range_end: float = 1.3
    search_step: float = 0.01

    def __post_init__(self) -> None:
        check_num_bits(self.num_bits, 8, 16, "IFMR activation_quant_params")
        for name in ("max_percentile", "min_percentile"):
            value = getattr(self, name)
            if not 0.5 < value <= 1.0:
                raise ConfigError(f"IFMR {name} must be in (0.5, 1], got {value!r}")
        start, end, step = self.search_range_start, self.search_range_end, self.search_step
        if not 0 < start < end:
            raise ConfigError(f"IFMR search_range must satisfy 0 < start < end, got [{start!r}, {end!r}]")
        # at float32 precision, as the config checks (amct_caffe.config.checks.search_step_fits): a step
        # of 0.2 fits [0.1, 0.3] although 0.3 - 0.1 is 0.19999999999999998 in float64
        if not (0 < step <= end - start or (step > 0 and np.float32(step) <= np.float32(end - start))):
            raise ConfigError(f"IFMR search_step must be in (0, {end - start!r}] (end - start), got {step!r}")

    @property
    def error_name(self) -> str:
        return "IfmrQuantWithOffset" if self.with_offset else "IfmrQuantWithoutOffset"


@dataclass(frozen=True)
class IfmrResult:
    """Outcome of a search. ``losses`` [n] are the mean squared errors of the candidates."""

    scale: float
    offset: int
    clip_max: float
    clip_min: float
    best_index: int
    ratios: np.ndarray = field(repr=False)
    losses: np.ndarray = field(repr=False)


def ifmr_ratios(start: float, end: float, step: float) -> np.ndarray:
    """Candidate ratios (float64), end point included; see step 2 of the module doc."""
    n = int(math.floor((end - start) / step + 1e-6)) + 1
    return start + np.arange(n, dtype=np.float64) * step


def _select_count(percentile: float, n: int) -> int:
    if abs(percentile - 1.0) < _DBL_EPSILON:
        return 1
    return min(max(n - int(math.floor(percentile * n)), 1), n)


def _kth_largest(chunks: Sequence[np.ndarray], k: int) -> np.float32:
    """k-th largest over all chunks by partial selection (each chunk keeps only its top k)."""
    tops = []
    for c in chunks:
        kk = min(k, c.size)
        if kk:
            tops.append(np.partition(c, c.size - kk)[c.size - kk:])
    top = np.concatenate(tops)
    return np.partition(top, top.size - k)[top.size - k]


def _candidates(params: IfmrParams, max0: np.float32, min0: np.float32, ratios: np.ndarray):
    """Per-candidate float32 (clip, lo, scale, inv) arrays, steps 3 of the module doc."""
    b = params.num_bits
    if params.with_offset:
        clip = (ratios * np.float64(max0)).astype(np.float32)
        scale = ((clip.astype(np.float64) - np.float64(min0)) / (2.0**b - 1)).astype(np.float32)
        lo = np.full_like(clip, min0)
    else:
        a = max0 if abs(max0) > abs(min0) else min0
        limit = 2.0 ** (b - 1) - 1 if a > 0 else 2.0 ** (b - 1)
        clip = (ratios * abs(np.float64(a))).astype(np.float32)
        scale = (clip.astype(np.float64) / limit).astype(np.float32)
        lo = -clip
    scale = process_scale(scale, params.error_name)
    return clip, lo, scale, np.float32(1.0) / scale


def _loss_sums(chunks: Sequence[np.ndarray], clip, lo, scale, inv) -> np.ndarray:
    sums = np.zeros(clip.size, dtype=np.float64)
    for c in chunks:
        for start in range(0, c.size, _SLICE):
            x = c[start:start + _SLICE]
            for i in range(clip.size):
                q = round_half_away(np.minimum(np.maximum(x, lo[i]), clip[i]) * inv[i]) * scale[i]
                d = (q - x).astype(np.float64)
                sums[i] += np.dot(d, d)
    return sums


def _pick(sums: np.ndarray) -> int:
    """The first candidate whose loss is within TIE_RTOL of the least (ties go to the smaller clip)."""
    least = sums.min()
    # (a negative least, which only a histogram's loss model can give, is a candidate too)
    return int(np.flatnonzero(sums <= least * (1.0 + TIE_RTOL if least >= 0 else 1.0 - TIE_RTOL))[0])


def _finish(params: IfmrParams, best: int, clip, scale, min0, ratios, sums, n) -> IfmrResult:
    s = np.float32(scale[best])
    if params.with_offset:
        qmin, qmax = qrange(params.num_bits)
        offset = int(np.clip(-round_half_away(np.float32(min0) / s) + qmin, qmin, qmax))
        clip_min = float(min0)
    else:
        offset, clip_min = 0, -float(clip[best])
    return IfmrResult(scale=float(s), offset=offset, clip_max=float(clip[best]), clip_min=clip_min,
                      best_index=best, ratios=ratios, losses=sums / n)


def _as_chunks(chunks: Sequence[np.ndarray] | np.ndarray, params: IfmrParams, zeros: int = 0) -> list[np.ndarray]:
    if isinstance(chunks, np.ndarray):
        chunks = [chunks]
    out = [np.ascontiguousarray(c, dtype=np.float32).reshape(-1) for c in chunks]
    if sum(c.size for c in out) + zeros == 0:
        raise QuantizationError(f"{params.error_name}: no calibration data")
    for c in out:
        if not np.isfinite(c).all():
            raise QuantizationError(f"{params.error_name} scale is illegal: input data contains inf or NaN")
    return out


def ifmr_search(chunks: Sequence[np.ndarray] | np.ndarray, params: IfmrParams | None = None, *, zeros: int = 0,
                threads: int = 1, backend: str | None = None) -> IfmrResult:
    """Run IFMR over the concatenation of ``chunks`` (arrays of any shape) without concatenating.

    ``zeros``: how many more values, all zero, the data holds (an observer may drop them). A zero
    quantizes to zero under every candidate (``clamp(0) * inv`` rounds to 0), so it adds nothing to
    a loss; it counts in ``N`` (the percentiles' ranks and the mean) and, where a percentile's rank
    falls past the values kept, gives the start point 0, which the clamp of step 1 gives anyway.
    The losses are then the same sums in other float64 blocks (about 1e-13 relative apart, far
    inside the tie tolerance of step 5): the same candidate wins. ``threads``: the kernel's workers
    (each sums whole candidates: the result does not depend on them).
    """
    params = params or IfmrParams()
    chunks = _as_chunks(chunks, params, zeros)
    ratios = ifmr_ratios(params.search_range_start, params.search_range_end, params.search_step)
    if resolve(backend) == "kernel":
        args = (params.num_bits, params.with_offset, params.max_percentile, params.min_percentile, ratios)
        try:
            best, scale, offset, clip_max, clip_min, losses = call_kernel("ifmr_search", chunks, *args, zeros=zeros,
                                                                          threads=threads)
        except TypeError:  # an extension built before `zeros` existed: give it the zeros themselves
            best, scale, offset, clip_max, clip_min, losses = call_kernel(
                "ifmr_search", chunks + [np.zeros(zeros, np.float32)], *args)
        return IfmrResult(scale=scale, offset=offset, clip_max=clip_max, clip_min=clip_min,
                          best_index=best, ratios=ratios, losses=losses)
    stored = sum(c.size for c in chunks)
    n = stored + zeros
    k_max, k_min = _select_count(params.max_percentile, n), _select_count(params.min_percentile, n)
    max0 = np.float32(0) if k_max > stored else max(_kth_largest(chunks, k_max), np.float32(0))
    min0 = np.float32(0) if k_min > stored else min(-_kth_largest([-c for c in chunks], k_min), np.float32(0))
    clip, lo, scale, inv = _candidates(params, np.float32(max0), np.float32(min0), ratios)
    sums = _loss_sums(chunks, clip, lo, scale, inv)
    return _finish(params, _pick(sums), clip, scale, min0, ratios, sums, n)


def batch_arrays(arrays, known_shapes, owner: str, batch_axis: int = 0) -> tuple[tuple[np.ndarray, ...], tuple]:
    """An observer's batch: the arrays and their sample shapes (all but the batch axis: 0, or 1 for the
    time-major data of a recurrent layer), which must be ``known_shapes`` when that is not None (the shapes of
    the first batch)."""
    if not arrays:
        raise ValueError(f"{owner}.update needs at least one array")
    arrays = tuple(np.asarray(a) for a in arrays)
    shapes = tuple(a.shape[:batch_axis] + a.shape[batch_axis + 1:] for a in arrays)
    if known_shapes is not None and shapes != known_shapes:
        raise ValueError(f"{owner}: sample shapes changed from {known_shapes} to {shapes}")
    return arrays, shapes


class IfmrObserver:
    """Streaming IFMR: ``update()`` once per calibration batch, then ``compute_qparams()``.

    IFMR needs every value (the candidates depend on the global percentiles), so ``update`` keeps
    a float32 copy of each batch's nonzero values and counts its zeros (after a ReLU, typically
    half of them or more): the search gives the result it would give on everything
    (:func:`ifmr_search`'s ``zeros``) from that much less memory and time. One call may pass
    several arrays (a layer with several bottoms); their shapes except the leading batch axis
    must not change between calls.
    """

    def __init__(self, params: IfmrParams | None = None, *, backend: str | None = None) -> None:
        self.params = params or IfmrParams()
        self.backend = backend
        self.batch_axis = 0  # 1 for a recurrent layer's time-major data: a smaller last batch changes axis 1
        self.reset()

    def reset(self) -> None:
        """Forget all data."""
        self._chunks: list[np.ndarray] = []
        self._zeros = 0
        self._shapes: tuple | None = None
        self.batches = 0

    def update(self, *arrays: np.ndarray) -> None:
        """Add one batch (one or more arrays); rejects inf/NaN and changed shapes."""
        arrays, shapes = batch_arrays(arrays, self._shapes, "IfmrObserver", self.batch_axis)
        flat = [np.asarray(a, dtype=np.float32).reshape(-1) for a in arrays]
        kept = [f[f != 0] for f in flat]  # a new compact array: the caller's data is not held
        for c in kept:
            if not np.isfinite(c).all():
                raise QuantizationError(
                    f"{self.params.error_name} scale is illegal: input data contains inf or NaN")
        self._shapes = shapes
        self._chunks.extend(kept)
        self._zeros += sum(f.size - c.size for f, c in zip(flat, kept, strict=True))
        self.batches += 1

    def compute_qparams(self, threads: int = 1) -> IfmrResult:
        """Search over everything seen since the last ``reset`` (``threads``: see :func:`ifmr_search`)."""
        if not self.batches:
            raise QuantizationError(f"{self.params.error_name}: compute_qparams() before any update()")
        return ifmr_search(self._chunks, self.params, zeros=self._zeros, threads=threads, backend=self.backend)
