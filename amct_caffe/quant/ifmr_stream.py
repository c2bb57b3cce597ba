"""Streaming IFMR: the search of :mod:`.ifmr` on a fine histogram instead of every value.

The exact search (:func:`.ifmr.ifmr_search`) needs all ``N`` calibration values at the end, since
its candidates depend on the global percentiles. This observer keeps, per layer, a fixed amount
of state whatever ``N`` is, and gives the exact search's start points and (bounded) losses:

State, updated by every batch (the zeros, which quantize to zero under every candidate, are only
counted, as in :class:`.ifmr.IfmrObserver`):

* the ``K = TOP_K`` largest and smallest nonzero values and the counts of positive and negative
  values: the percentile start points of step 1 are then *exact* whenever ``k <= K``
  (``k = N - floor(p N)``; with the default ``p = 0.999999``, any ``N`` up to 4 * 10^9);
  beyond, the k-th value is interpolated in the histogram below. A caller that knows the total
  ``N`` in advance (a calibration layer: ``batch_num`` batches of its first batch's size) may
  keep fewer (:meth:`IfmrStreamObserver.expect`): ``K = min(TOP_K, 4 k + 64)`` with ``k`` the larger
  of the two percentiles' counts for that ``N``. Every ``k <= K`` is still read from exact values,
  so the result is the same, and the candidates for the kept values (collected while filling,
  pruned to ``K`` at ``4 K``) stop coming much sooner: ``p = 0.999999`` over 25.6 M values needs
  ``k = 26``, and 4096 kept values cost about a third of the fill on a layer's first batch;
* a histogram of ``B = bins`` bins of width ``w = 2^e`` on the grid ``[g w, (g + 1) w)``
  (``g`` integer; zero is always a bin edge), holding per bin the count ``n_b`` and the first
  moment about its centre ``c_b``, ``D_b = sum (x - c_b)``, plus the total second moment
  ``M = sum (x - c_b)^2``. ``x - c_b`` is exact in float64. An update's array is cut into
  chunks of ``CHUNK = 2^16`` values; within a chunk the sums run in data order (``M``'s in four
  lanes, positions ``j = l mod 4``, then ``(l0 + l1) + (l2 + l3)``), and the chunks' sums are
  added in chunk order, so that workers filling whole chunks give the same bits as one. The
  first batch gets the finest ``e`` whose grid spans its values in ``B / 2`` bins; when a batch
  falls outside, the window moves or, if the occupied span no longer fits, pairs of bins merge
  (``e + 1``): ``n`` adds, ``D' = D_1 + D_2 + (n_2 - n_1) w / 2`` and ``M`` gains
  ``w (D_2 - D_1) + (n_1 + n_2) w^2 / 4`` (the moments moved to the new centre).

Search. Candidates (``clip_i``, ``lo_i``, ``scale_i = s``) are those of :mod:`.ifmr` from the start
points. A candidate's quantizer ``q(x) = s L(x)``, ``L(x) = round_half_away(clamp(x, lo, clip) / s)``,
is a staircase whose steps ``j -> j + 1`` sit at ``t_j = (j + 1/2) s``. On a bin ``[a, a + w)``
with ``L(a) = La``, ``L(a + w) = Le``, ``q_a = s La``::

    sum_b (q(x) - x)^2 = n_b (q_a - c_b)^2 - 2 (q_a - c_b) D_b + M_b - 2 s sum_{j=La}^{Le-1} sum_{x >= t_j} (x - t_j)

The first three terms are exact; the last is zero unless a step falls inside the bin. There the
values are taken as uniform over the bin, ``sum_{x >= t} (x - t) ~ n_b (a + w - t)^2 / (2 w)``, and
with ``u_j = a + w - t_j`` (an arithmetic sequence of ``m = Le - La`` terms, step ``s``, mean
``u = a + w - s (La + Le) / 2``) the step terms sum to ``-(s n_b / w) (m u^2 + s^2 (m^3 - m) / 12)``.
Each step's term lies in ``[-2 s n_b (a + w - t_j), 0]`` whatever the values, so a candidate's
loss is off by at most ``2 s w`` per value in a bin holding a step: with ``w`` far below ``s``
(``bins = 2^14`` leaves 16 to 64 bins per step on data spread over its range), the errors are
orders of magnitude below the loss differences of neighbouring candidates, and the same candidate
wins as in the exact search on almost every layer (``docs/architecture.md`` gives the measured
differences on the shared models; where the loss is nearly flat over the candidates, another one may win:
a random-weight MobileNet layer picked the ratio 0.98 for the exact search's 0.94, whose exact losses
differ by 0.1 %). Losses are ``(sum_b ... + M) / N``; the pick (first minimum,
relative tie tolerance) and the result are those of :mod:`.ifmr`.

The C++ kernel (``_kernels.IfmrHistogram``) fills the same histogram bit for bit (the same grid
rules, the same float64 sums in the same order) with any number of threads; its search sums the
bins in another order, which the tie tolerance absorbs. Results do not depend on thread counts.
"""

from __future__ import annotations

import math

import numpy as np

from ._backend import _kernels_module, resolve
from ._common import QuantizationError
from .ifmr import (IfmrParams, IfmrResult, _candidates, _finish, _pick, _select_count, batch_arrays, ifmr_ratios,
                   ifmr_search)

__all__ = ["CHUNK", "DEFAULT_BINS", "EXACT_LIMIT", "TOP_K", "IfmrHistogram", "IfmrStreamObserver"]

CHUNK = 1 << 16  # values per chunk of an update (the kernel's IfmrHistogram::kChunk)
DEFAULT_BINS = 1 << 14
TOP_K = 4096
EXACT_LIMIT = 1 << 16
_MIN_EXP = -200  # finest bin width 2^-200: below any float32 spacing that matters


def _span(lo: float, hi: float, e: int) -> tuple[int, int]:
    """Global bin indices of ``lo`` and ``hi`` on the grid of width ``2^e`` (exact in float64)."""
    return math.floor(math.ldexp(lo, -e)), math.floor(math.ldexp(hi, -e))


class IfmrHistogram:
    """The NumPy reference of the histogram above (``update`` one flat float32 array at a time)."""

    def __init__(self, bins: int = DEFAULT_BINS, top_k: int = TOP_K) -> None:
        if bins < 4 or bins & (bins - 1):
            raise ValueError(f"IfmrHistogram: bins must be a power of two >= 4, got {bins}")
        self.bins, self.top_k = int(bins), int(top_k)
        self.count = np.zeros(self.bins, np.float64)
        self.dev = np.zeros(self.bins, np.float64)
        self.m2 = 0.0
        self.exp: int | None = None   # w = 2^exp; None before the first nonzero value
        self.base = 0                 # global index of bin 0
        self.nonzero = self.positive = 0
        self.top = np.empty(0, np.float32)     # largest nonzero values, descending
        self.bottom = np.empty(0, np.float32)  # smallest nonzero values, ascending

    # -------------------------------------------------------------- filling
    @property
    def negative(self) -> int:
        return self.nonzero - self.positive

    def update(self, x: np.ndarray, what: str = "IfmrQuantWithOffset", threads: int = 1) -> None:
        """Add the nonzero values of the flat float32 array ``x``; an inf or NaN raises
        ``"<what> scale is illegal ..."`` and changes nothing. ``threads``: the kernel's workers (one here)."""
        del threads
        if not np.isfinite(x).all():
            raise QuantizationError(f"{what} scale is illegal: input data contains inf or NaN")
        pos = np.flatnonzero(x)  # positions of the nonzero values in x
        x = x[pos]
        if not x.size:
            return
        lo, hi = float(x.min()), float(x.max())
        self._cover(lo, hi)
        w = math.ldexp(1.0, self.exp)
        g = np.floor(x.astype(np.float64) * math.ldexp(1.0, -self.exp))
        idx = (g - self.base).astype(np.int64)
        d = x.astype(np.float64) - (g + 0.5) * w
        self.count += np.bincount(idx, minlength=self.bins)
        dev, m2 = np.zeros(self.bins), 0.0
        cuts = np.searchsorted(pos, np.arange(CHUNK, pos[-1] + 1, CHUNK))  # where each later chunk starts
        for s in np.split(np.arange(x.size), cuts):
            if s.size:
                dev += np.bincount(idx[s], weights=d[s], minlength=self.bins)
                m2 += _lane_sum(d[s] * d[s], pos[s])
        self.dev += dev
        self.m2 += m2
        self.nonzero += x.size
        self.positive += int(np.count_nonzero(x > 0))
        k = self.top_k
        top = np.concatenate([self.top, x if x.size <= k else np.partition(x, x.size - k)[x.size - k:]])
        self.top = -np.sort(-top)[:k]
        bottom = np.concatenate([self.bottom, x if x.size <= k else np.partition(x, k - 1)[:k]])
        self.bottom = np.sort(bottom)[:k]

    def _cover(self, lo: float, hi: float) -> None:
        """Move the window or merge bins until ``[lo, hi]`` and every occupied bin fit."""
        half = self.bins // 2
        if self.exp is None:  # first data: the finest grid spanning it in B/2 bins
            if hi == lo:  # one value: bins of 2^-20 of it
                e = max(_MIN_EXP, math.frexp(abs(hi))[1] - 21)
            else:
                e = max(_MIN_EXP, math.frexp((hi - lo) / (half - 1))[1] - 1)
            while True:
                g0, g1 = _span(lo, hi, e)
                if g1 - g0 < half:
                    break
                e += 1
            self.exp = e
            self.base = g0 - (self.bins - (g1 - g0 + 1)) // 2
            return
        while True:
            g0, g1 = _span(lo, hi, self.exp)
            occupied = np.flatnonzero(self.count)
            if occupied.size:
                g0 = min(g0, self.base + int(occupied[0]))
                g1 = max(g1, self.base + int(occupied[-1]))
            if g0 >= self.base and g1 < self.base + self.bins:
                return
            if g1 - g0 < self.bins:  # fits at this width: re-centre the window
                self._shift(g0 - (self.bins - (g1 - g0 + 1)) // 2)
                return
            self._merge()

    def _shift(self, base: int) -> None:
        delta = base - self.base
        count, dev = np.zeros_like(self.count), np.zeros_like(self.dev)
        src = np.arange(self.bins) + delta  # new bin i holds old bin i + delta
        ok = (src >= 0) & (src < self.bins)
        count[ok], dev[ok] = self.count[src[ok]], self.dev[src[ok]]
        self.count, self.dev, self.base = count, dev, base

    def _merge(self) -> None:
        """Bins of width w -> 2w: global index g -> floor(g / 2); moments moved to the new centres."""
        w = math.ldexp(1.0, self.exp)
        occupied = np.flatnonzero(self.count)
        g = self.base + occupied
        new_base = self.base >> 1
        shift = np.where((g & 1) == 0, -0.5 * w, 0.5 * w)  # old centre - new centre
        n, d = self.count[occupied], self.dev[occupied]
        terms = np.concatenate([[self.m2], 2.0 * shift * d + n * (0.25 * w * w)])
        self.m2 = float(np.cumsum(terms)[-1])  # in index order, as the kernel adds them
        idx = (g >> 1) - new_base
        self.count = np.bincount(idx, weights=n, minlength=self.bins)
        self.dev = np.bincount(idx, weights=d + n * shift, minlength=self.bins)
        self.exp, self.base = self.exp + 1, new_base

    # -------------------------------------------------------------- reading
    def kth(self, k: int, largest: bool) -> float:
        """The k-th largest (smallest) nonzero value: exact from the kept extremes when ``k <= top_k``,
        else interpolated in its bin (values taken as uniform over the bin)."""
        kept = self.top if largest else self.bottom
        if k <= kept.size:
            return float(kept[k - 1])
        w = math.ldexp(1.0, self.exp)
        order = np.arange(self.bins)[::-1] if largest else np.arange(self.bins)
        cum = np.cumsum(self.count[order])
        pos = int(np.searchsorted(cum, k))
        b = int(order[pos])
        before = cum[pos] - self.count[b]
        frac = (k - before - 0.5) / self.count[b]
        a = (self.base + b) * w
        return a + w - frac * w if largest else a + frac * w

    def losses(self, clip, lo, scale, threads: int = 1) -> np.ndarray:
        """Sum over all values of (q_i(x) - x)^2 for every candidate (see the module doc)."""
        del threads  # the kernel's workers; one here
        occupied = np.flatnonzero(self.count)
        n, d = self.count[occupied], self.dev[occupied]
        w = math.ldexp(1.0, self.exp)
        a = (self.base + occupied).astype(np.float64) * w
        c, e = a + 0.5 * w, a + w
        beta = np.clip(12.0 * d / (n * w * w), -2.0 / w, 2.0 / w)  # linear density with the bin's mean
        sums = np.empty(clip.size, np.float64)
        for i in range(clip.size):
            s, lo_i, hi_i = float(scale[i]), float(lo[i]), float(clip[i])
            la = _level(a, lo_i, hi_i, 1.0 / s)
            le = _level(e, lo_i, hi_i, 1.0 / s)
            qa = la * s - c
            total = n * qa * qa - 2.0 * qa * d
            m = le - la
            u = e - s * 0.5 * (la + le)
            k2 = s * s * (m * m * m - m) / 12.0
            su2 = m * u * u + k2
            su3 = m * u * u * u + 3.0 * u * k2
            total -= np.where(m > 0, (2.0 * s / w) * n * (0.5 * su2 + beta * (0.25 * w * su2 - su3 / 6.0)), 0.0)
            sums[i] = float(np.sum(total)) + self.m2
        return sums


def _lane_sum(v: np.ndarray, pos: np.ndarray) -> float:
    """Sum of ``v`` (one term per value of a chunk, at positions ``pos`` of the array) as the kernel adds
    it: each term goes to lane ``pos % 4``, every lane sums in order, then (l0 + l1) + (l2 + l3)."""
    lanes = [float(np.cumsum(v[pos % 4 == lane])[-1]) if np.any(pos % 4 == lane) else 0.0 for lane in range(4)]
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3])


def _level(x: np.ndarray, lo: float, hi: float, inv: float) -> np.ndarray:
    """round_half_away(clamp(x, lo, hi) * inv) in float64 (the quantizer's integer level)."""
    t = np.clip(x, lo, hi) * inv
    r = np.trunc(t)
    return r + np.where(np.abs(t - r) >= 0.5, np.sign(t), 0.0)


class IfmrStreamObserver:
    """IFMR in bounded memory: ``update()`` once per batch, then ``compute_qparams()``.

    The observer of the calibration layers, with the interface and checks of
    :class:`.ifmr.IfmrObserver` (which keeps every value for the exact search). Until a layer has
    seen more than ``EXACT_LIMIT`` nonzero values it also keeps them and its result is the exact
    search's (:func:`.ifmr.ifmr_search`): small layers (a classifier's outputs, LeNet's fully
    connected layers) are searched on their values, larger ones on the histogram of the module
    doc, filled by the C++ kernel when the built extension has it, else by :class:`IfmrHistogram`.
    An array holding an inf or NaN raises before it is added. ``threads`` of ``compute_qparams``
    splits the candidates; the result never depends on it.
    """

    def __init__(self, params: IfmrParams | None = None, *, bins: int = DEFAULT_BINS,
                 exact_limit: int = EXACT_LIMIT, backend: str | None = None) -> None:
        self.params = params or IfmrParams()
        self.bins, self.exact_limit = bins, exact_limit
        self.backend = backend
        self.last_search: str | None = None  # "exact" or "histogram": what the last compute_qparams ran
        self.batch_axis = 0  # 1 for a recurrent layer's time-major data (see ifmr.batch_arrays)
        self.reset()

    def expect(self, total: int) -> None:
        """Announce that about ``total`` values (zeros included) will come before ``compute_qparams``:
        the histogram then keeps ``min(TOP_K, 4 k + 64)`` extremes instead of ``TOP_K`` (module doc).
        Call it before the first ``update``; the result does not change as long as the values that
        come need no ``k`` above that (four times the announced count's, plus 64)."""
        if self._hist is not None:
            raise QuantizationError("IfmrStreamObserver.expect() after update()")
        p = self.params
        total = max(int(total), 1)
        k = max(_select_count(p.max_percentile, total), _select_count(p.min_percentile, total))
        self._top_k = min(TOP_K, 4 * k + 64)

    @property
    def top_k(self) -> int:
        """How many of the largest (and of the smallest) nonzero values the histogram keeps exactly."""
        return self._top_k

    def reset(self) -> None:
        """Forget all data (and any :meth:`expect`)."""
        self._top_k = TOP_K
        self._hist = None  # made by the first update: a finished layer holds no histogram
        self._kept: list[np.ndarray] | None = []  # the nonzero values while there are few of them
        self._zeros = 0
        self._shapes: tuple | None = None
        self.batches = 0

    @property
    def exact(self) -> bool:
        """Whether :meth:`compute_qparams` runs the exact search (few values seen so far)."""
        return self._kept is not None

    def prepare(self) -> None:
        """Make the histogram now (``update`` does it on first use). A caller that fills from a worker
        thread calls it first: the histogram's state is then allocated by the calling thread, and the
        kernel keeps it there, instead of in the worker's own malloc arena."""
        if self._hist is None:
            kernel = resolve(self.backend) == "kernel" and hasattr(_kernels_module, "IfmrHistogram")
            self._hist = _kernels_module.IfmrHistogram(self.bins, self._top_k) if kernel \
                else IfmrHistogram(self.bins, self._top_k)

    def update(self, *arrays: np.ndarray, threads: int = 1) -> None:
        """Add one batch (one or more arrays); rejects inf/NaN and changed shapes. ``threads`` workers
        fill the kernel's histogram (the same bits with any number)."""
        arrays, shapes = batch_arrays(arrays, self._shapes, "IfmrStreamObserver", self.batch_axis)
        self.prepare()
        for a in arrays:
            f = np.ascontiguousarray(a, dtype=np.float32).reshape(-1)
            before = self._hist.nonzero
            try:
                self._hist.update(f, self.params.error_name, threads)
            except ValueError as e:  # the kernel's message, as the reference's QuantizationError
                raise QuantizationError(str(e)) from None
            added = self._hist.nonzero - before
            self._zeros += f.size - added
            if self._kept is not None:
                self._kept = [*self._kept, f[f != 0]] if self._hist.nonzero <= self.exact_limit else None
        self._shapes = shapes
        self.batches += 1

    def compute_qparams(self, threads: int = 1) -> IfmrResult:
        """The search of the module doc over everything seen since the last ``reset``."""
        p = self.params
        if not self.batches:
            raise QuantizationError(f"{p.error_name}: compute_qparams() before any update()")
        self.last_search = "exact" if self._kept is not None else "histogram"
        if self._kept is not None:
            return ifmr_search(self._kept or [np.empty(0, np.float32)], p, zeros=self._zeros, threads=threads,
                               backend=self.backend)
        h = self._hist
        n = h.nonzero + self._zeros
        k_max, k_min = _select_count(p.max_percentile, n), _select_count(p.min_percentile, n)
        max0 = np.float32(h.kth(k_max, True)) if k_max <= h.positive else np.float32(0)
        min0 = np.float32(h.kth(k_min, False)) if k_min <= h.negative else np.float32(0)
        max0, min0 = max(max0, np.float32(0)), min(min0, np.float32(0))
        ratios = ifmr_ratios(p.search_range_start, p.search_range_end, p.search_step)
        clip, lo, scale, _ = _candidates(p, max0, min0, ratios)
        sums = h.losses(clip, lo, scale, threads)
        return _finish(p, _pick(sums), clip, scale, min0, ratios, sums, n)
