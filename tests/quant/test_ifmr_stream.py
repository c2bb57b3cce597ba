"""The streaming IFMR observer against a NumPy brute force and against the exact search.

The brute force is independent of the module: it evaluates each candidate's quantizer on every
value in float64 (``q = round_half_away(clamp(x, lo, clip) / s) * s``, ``sum (q - x)^2``). The
histogram's loss may differ from it only inside bins that hold a step of the quantizer, by at most
``2 s w n_b`` per step (module doc), which the tests check candidate by candidate.
"""

import math

import numpy as np
import pytest

from amct_caffe.quant import IfmrObserver, IfmrParams, IfmrStreamObserver, QuantizationError, ifmr_search
from amct_caffe.quant.ifmr import _candidates, ifmr_ratios
from amct_caffe.quant.ifmr_stream import CHUNK, TOP_K, IfmrHistogram

from .conftest import requires_kernels

BACKENDS = ["reference", pytest.param("kernel", marks=requires_kernels)]


def brute_losses(x: np.ndarray, clip, lo, scale) -> np.ndarray:
    """sum over x of (q_i(x) - x)^2 in float64, one candidate at a time (no histogram)."""
    xd = x.astype(np.float64)
    out = np.empty(clip.size)
    for i in range(clip.size):
        t = np.clip(xd, float(lo[i]), float(clip[i])) / float(scale[i])
        q = np.where(np.abs(t - np.trunc(t)) >= 0.5, np.trunc(t) + np.sign(t), np.trunc(t)) * float(scale[i])
        out[i] = np.sum((q - xd) ** 2)
    return out


def step_bound(h, clip, lo, scale) -> np.ndarray:
    """Largest error the uniform/linear in-bin model can make: 2 s w n_b per step inside a bin."""
    w = math.ldexp(1.0, h.exp)
    occupied = np.flatnonzero(h.count)
    a = (h.base + occupied) * w
    out = np.empty(clip.size)
    for i in range(clip.size):
        s = float(scale[i])
        def level(v, i=i, s=s):
            return np.round(np.clip(v, float(lo[i]), float(clip[i])) / s)
        steps = np.abs(level(a + w) - level(a)) + 1  # + 1: a step on an edge may be counted on either side
        out[i] = np.sum(2 * s * w * h.count[occupied] * steps)
    return out


def data(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    if kind == "relu":
        return np.maximum(x * 2, 0)
    if kind == "skewed":
        return (rng.gamma(2.0, 1.0, n) - 0.5).astype(np.float32)
    if kind == "outlier":
        x[7] = 40.0
        return x
    return x


def new_hist(backend: str, bins: int = 1 << 12):
    if backend == "kernel":
        from amct_caffe import _kernels
        if not hasattr(_kernels, "IfmrHistogram"):
            pytest.skip("the built extension predates IfmrHistogram")
        return _kernels.IfmrHistogram(bins, TOP_K)
    return IfmrHistogram(bins)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_offset", [True, False])
@pytest.mark.parametrize("kind", ["normal", "relu", "skewed", "outlier"])
def test_histogram_losses_within_the_bound_of_the_brute_force(backend, with_offset, kind):
    batches = [data(kind, 60_000, seed) * np.float32(1 + 0.3 * seed) for seed in range(3)]  # growing ranges
    h = new_hist(backend)
    for b in batches:
        h.update(b)
    x = np.concatenate(batches)
    params = IfmrParams(with_offset=with_offset)
    max0, min0 = np.float32(max(x.max(), 0)), np.float32(min(x.min(), 0))
    clip, lo, scale, _ = _candidates(params, max0, min0, ifmr_ratios(0.7, 1.3, 0.01))
    exact, got = brute_losses(x, clip, lo, scale), h.losses(clip, lo, scale)
    assert np.all(np.abs(got - exact) <= step_bound(h, clip, lo, scale) + 1e-9 * exact)
    assert np.max(np.abs(got - exact) / exact) < 2e-3  # the model is far better than its bound
    assert h.nonzero == np.count_nonzero(x) and h.positive == np.count_nonzero(x > 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moments_survive_window_moves_and_merges(backend):
    """count, centre moments and m2 equal those recomputed from the data on the final grid."""
    h = new_hist(backend, bins=64)
    batches = [data("normal", 5000, 1) * 0.01 + 3, data("normal", 5000, 2) * 0.01 - 2, data("skewed", 5000, 3) * 5]
    for b in batches:
        h.update(b)
    x = np.concatenate(batches).astype(np.float64)
    x = x[x != 0]
    w = math.ldexp(1.0, h.exp)
    g = np.floor(x / w)
    idx = (g - h.base).astype(int)
    assert idx.min() >= 0 and idx.max() < 64
    np.testing.assert_array_equal(h.count, np.bincount(idx, minlength=64))
    dev = x - (g + 0.5) * w
    np.testing.assert_allclose(h.dev, np.bincount(idx, weights=dev, minlength=64), rtol=1e-9, atol=1e-9 * w)
    assert math.isclose(h.m2, float(np.sum(dev * dev)), rel_tol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extremes_are_exact_up_to_top_k_then_within_a_bin(backend):
    h = new_hist(backend)
    x = data("skewed", 200_000, 5)
    for part in np.array_split(x, 4):
        h.update(part)
    s = np.sort(x[x != 0])
    for k in (1, 13, TOP_K):
        assert h.kth(k, True) == s[-k] and h.kth(k, False) == s[k - 1]
    w = math.ldexp(1.0, h.exp)
    for k in (TOP_K + 1, 50_000):
        assert abs(h.kth(k, True) - s[-k]) <= w and abs(h.kth(k, False) - s[k - 1]) <= w


@requires_kernels
@pytest.mark.parametrize("simd", [2, 0])  # the vector fill (where the CPU has AVX2) and the portable one
@pytest.mark.parametrize("kind", ["normal", "relu", "outlier"])
def test_kernel_fills_the_references_histogram_bit_for_bit(kind, simd, simd_limit):
    ref, ker = new_hist("reference", 1 << 10), new_hist("kernel", 1 << 10)
    simd_limit(simd)
    for seed in range(4):  # growing, shifting batches: every grid rule runs
        b = data(kind, 30_000 + seed, seed) * np.float32(1 + seed) + np.float32(0.5 * seed)
        ref.update(b)
        ker.update(b)
        assert (ref.exp, ref.base) == (ker.exp, ker.base)
        bad = b * np.float32(9)  # past the grid, and with a NaN: refused, nothing added
        bad[-1] = np.nan
        for h in (ref, ker):
            with pytest.raises((QuantizationError, ValueError), match="scale is illegal"):
                h.update(bad)
    np.testing.assert_array_equal(ref.count, ker.count)
    assert ref.dev.tobytes() == ker.dev.tobytes() and ref.m2 == ker.m2
    np.testing.assert_array_equal(ref.top, ker.top)
    np.testing.assert_array_equal(ref.bottom, ker.bottom)
    for k in (1, 100, 5000, 60_000):
        assert ref.kth(k, True) == ker.kth(k, True) and ref.kth(k, False) == ker.kth(k, False)
    params = IfmrParams()
    clip, lo, scale, _ = _candidates(params, np.float32(ref.kth(1, True)), np.float32(min(ref.kth(1, False), 0)),
                                     ifmr_ratios(0.7, 1.3, 0.01))
    one, two = ker.losses(clip, lo, scale, 1), ker.losses(clip, lo, scale, 2)
    assert one.tobytes() == two.tobytes()  # workers split whole candidates
    np.testing.assert_allclose(one, ref.losses(clip, lo, scale), rtol=1e-12)


@requires_kernels
@pytest.mark.parametrize("simd", [2, 1, 0])
def test_kernel_fills_arrays_of_many_chunks_as_the_reference_with_any_thread_count(simd, simd_limit):
    """Arrays of several chunks, summed chunk by chunk: 1, 2 and 3 workers give the reference's bits."""
    ref = new_hist("reference", 1 << 10)
    kernels = {threads: new_hist("kernel", 1 << 10) for threads in (1, 2, 3)}
    simd_limit(simd)
    for seed in range(3):  # growing, shifting batches of 5 to 6 chunks: the grid rules run too
        b = data("relu" if seed % 2 else "outlier", 5 * CHUNK + 12_345 * seed + 3, seed) * np.float32(1 + seed)
        ref.update(b)
        for threads, h in kernels.items():
            h.update(b, threads=threads)
    for h in kernels.values():
        assert (h.exp, h.base, h.nonzero, h.positive) == (ref.exp, ref.base, ref.nonzero, ref.positive)
        np.testing.assert_array_equal(h.count, ref.count)
        assert h.dev.tobytes() == ref.dev.tobytes() and h.m2 == ref.m2
        np.testing.assert_array_equal(h.top, ref.top)
        np.testing.assert_array_equal(h.bottom, ref.bottom)


@requires_kernels
@pytest.mark.parametrize("with_offset", [True, False])
def test_kernel_search_gives_the_same_losses_on_every_simd_level(with_offset, simd_limit):
    """The vector search (eight candidates per register) does the scalar loop's operations per lane."""
    h = new_hist("kernel", 1 << 12)
    for seed in range(3):
        h.update(data("skewed", 50_000, seed) * np.float32(1 + seed))
    clip, lo, scale, _ = _candidates(IfmrParams(with_offset=with_offset), np.float32(h.kth(2, True)),
                                     np.float32(min(h.kth(2, False), 0)), ifmr_ratios(0.7, 1.3, 0.01))
    got = {}
    for simd in (2, 1, 0):
        simd_limit(simd)
        got[simd] = h.losses(clip, lo, scale, 2).tobytes()
    assert got[2] == got[1] == got[0]


@requires_kernels
def test_observer_factors_do_not_depend_on_the_fill_threads():
    observers = {threads: IfmrStreamObserver(IfmrParams(), exact_limit=10_000) for threads in (1, 2)}
    for seed in range(3):
        b = data("skewed", 3 * CHUNK + 7, seed).reshape(-1, 1)
        for threads, obs in observers.items():
            obs.update(b, threads=threads)
    one, two = (obs.compute_qparams() for obs in observers.values())
    assert (one.scale, one.offset, one.best_index) == (two.scale, two.offset, two.best_index)
    assert one.losses.tobytes() == two.losses.tobytes()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_offset", [True, False])
@pytest.mark.parametrize("kind", ["normal", "relu", "skewed"])
def test_observer_picks_the_exact_searchs_candidate(backend, with_offset, kind):
    params = IfmrParams(with_offset=with_offset)
    stream = IfmrStreamObserver(params, exact_limit=10_000, backend=backend)
    exact = IfmrObserver(params, backend="reference")
    for seed in range(3):
        b = data(kind, 40_000, seed).reshape(10, 4, 1000)
        stream.update(b)
        exact.update(b)
    assert not stream.exact  # the histogram path
    a, b = stream.compute_qparams(), exact.compute_qparams()
    assert stream.last_search == "histogram"
    assert (a.best_index, a.scale, a.offset, a.clip_max, a.clip_min) == (b.best_index, b.scale, b.offset,
                                                                         b.clip_max, b.clip_min)
    np.testing.assert_allclose(a.losses, b.losses, rtol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_layers_get_the_exact_search(backend):
    params = IfmrParams(with_offset=False, max_percentile=0.99, min_percentile=0.99)
    obs = IfmrStreamObserver(params, exact_limit=5000, backend=backend)
    batches = [data("relu", 3000, s).reshape(3, 1000) for s in range(3)]  # ~1500 nonzero each
    for b in batches:
        obs.update(b)
    assert obs.exact
    got, want = obs.compute_qparams(), ifmr_search(batches, params, backend="reference")
    assert (got.best_index, got.scale, got.offset) == (want.best_index, want.scale, want.offset)
    assert obs.last_search == "exact"
    obs.update(batches[0])  # now past the limit: the kept values are dropped
    assert not obs.exact and obs._kept is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_observer_checks(backend):
    obs = IfmrStreamObserver(backend=backend)
    with pytest.raises(QuantizationError, match="compute_qparams"):
        obs.compute_qparams()
    obs.update(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="sample shapes changed"):
        obs.update(np.zeros((2, 4), np.float32))
    bad = np.ones((2, 3), np.float32)
    bad[1, 2] = np.inf
    with pytest.raises(QuantizationError, match="IfmrQuantWithOffset scale is illegal"):
        obs.update(bad)
    r = obs.compute_qparams()  # all zeros: the unit scale of process_scale
    assert r.scale == 1.0 and r.best_index == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("percentile", [0.999999, 0.9999])
@pytest.mark.parametrize("kind", ["relu", "skewed"])
def test_expected_count_keeps_fewer_extremes_and_gives_the_same_bits(backend, percentile, kind):
    params = IfmrParams(max_percentile=percentile, min_percentile=percentile)
    full = IfmrStreamObserver(params, exact_limit=1000, backend=backend)
    planned = IfmrStreamObserver(params, exact_limit=1000, backend=backend)
    batches = [data(kind, 3 * CHUNK + 11, seed).reshape(-1, 1) for seed in range(4)]
    planned.expect(len(batches) * batches[0].size)
    k = len(batches) * batches[0].size * (1 - percentile)  # the percentile's count, about
    assert planned.top_k < TOP_K and planned.top_k >= 4 * k
    for b in batches:
        full.update(b)
        planned.update(b)
    a, b = full.compute_qparams(), planned.compute_qparams()
    assert (a.best_index, a.scale, a.offset, a.clip_max, a.clip_min) == (b.best_index, b.scale, b.offset,
                                                                         b.clip_max, b.clip_min)
    assert a.losses.tobytes() == b.losses.tobytes()


@pytest.mark.parametrize("backend", BACKENDS)
def test_expected_count_never_keeps_more_than_top_k_and_comes_first(backend):
    obs = IfmrStreamObserver(IfmrParams(max_percentile=0.99, min_percentile=0.99), backend=backend)
    obs.expect(10**7)  # k = 10^5: more than the histogram ever keeps
    assert obs.top_k == TOP_K
    obs.update(data("normal", 1000, 0).reshape(10, 100))
    with pytest.raises(QuantizationError, match="expect"):
        obs.expect(1000)
    obs.reset()  # forgets the expectation too
    obs.expect(1000)
    assert obs.top_k == 64 + 4 * 10
