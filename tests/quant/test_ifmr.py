import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amct_caffe.errors import ConfigError
from amct_caffe.quant import IfmrObserver, IfmrParams, QuantizationError, ifmr_search
from amct_caffe.quant.ifmr import ifmr_ratios

from .conftest import adversarial_arrays, float_arrays, requires_kernels

SETTINGS = settings(max_examples=80, deadline=None, derandomize=True)
BACKENDS = ["reference", pytest.param("kernel", marks=requires_kernels)]


def assert_same_result(a, b):
    assert a.best_index == b.best_index
    assert abs(int(np.float32(a.scale).view(np.int32)) - int(np.float32(b.scale).view(np.int32))) <= 1
    assert a.offset == b.offset
    assert a.clip_max == b.clip_max and a.clip_min == b.clip_min
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-9, atol=0)


def test_candidates_include_the_end_point():
    r = ifmr_ratios(0.7, 1.3, 0.01)
    assert r.size == 61 and r[0] == 0.7 and abs(r[-1] - 1.3) < 1e-12
    assert ifmr_ratios(0.8, 1.2, 0.02).size == 21  # 0.4 / 0.02 = 19.999... in float64


@requires_kernels
def test_kernel_ratios_match():
    from amct_caffe import _kernels
    for args in [(0.7, 1.3, 0.01), (0.8, 1.2, 0.02), (0.5, 2.0, 0.3)]:
        np.testing.assert_array_equal(_kernels.ifmr_ratios(*args), ifmr_ratios(*args))


@requires_kernels
@pytest.mark.parametrize("with_offset", [True, False])
@pytest.mark.parametrize("num_bits", [8, 12, 16])
@pytest.mark.parametrize("name,x", list(adversarial_arrays().items()))
def test_kernel_matches_reference_adversarial(name, x, with_offset, num_bits):
    params = IfmrParams(num_bits=num_bits, with_offset=with_offset)
    assert_same_result(ifmr_search(x, params, backend="reference"), ifmr_search(x, params, backend="kernel"))


@requires_kernels
@SETTINGS
@given(x=float_arrays, with_offset=st.booleans(), num_bits=st.sampled_from([8, 16]),
       percentile=st.sampled_from([1.0, 0.999999, 0.99, 0.6]))
def test_kernel_matches_reference_random(x, with_offset, num_bits, percentile):
    params = IfmrParams(num_bits=num_bits, with_offset=with_offset, max_percentile=percentile,
                        min_percentile=percentile)
    assert_same_result(ifmr_search(x, params, backend="reference"), ifmr_search(x, params, backend="kernel"))


@requires_kernels
@pytest.mark.parametrize("with_offset", [True, False])
def test_every_simd_path_agrees(with_offset, simd_limit):
    x = np.random.default_rng(3).standard_normal(100_003).astype(np.float32) * 3
    params = IfmrParams(with_offset=with_offset)
    ref = ifmr_search(x, params, backend="reference")
    for level in (2, 1, 0):
        simd_limit(level)
        assert_same_result(ref, ifmr_search([x[:777], x[777:]], params, backend="kernel"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_percentile_selection(backend):
    x = np.random.default_rng(5).standard_normal(100_000).astype(np.float32)
    xs = np.sort(x)
    for p in (0.999, 0.9):  # k = 100 (heap) and k = 10000 (nth_element in C++)
        k = x.size - math.floor(p * x.size)
        r = ifmr_search([x[:1000], x[1000:]], IfmrParams(max_percentile=p, min_percentile=p), backend=backend)
        assert r.clip_min == xs[k - 1]
        assert r.clip_max == np.float32(r.ratios[r.best_index] * float(xs[-k]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_first_candidate_and_unit_scale(backend):
    r = ifmr_search(np.zeros(64, np.float32), IfmrParams(with_offset=True), backend=backend)
    assert (r.best_index, r.scale, r.offset) == (0, 1.0, -128)
    r = ifmr_search(np.zeros(64, np.float32), IfmrParams(with_offset=False), backend=backend)
    assert (r.best_index, r.scale, r.offset) == (0, 1.0, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_symmetric_127_versus_128(backend):
    pos = ifmr_search(np.array([4.0, -1.0], np.float32), IfmrParams(with_offset=False), backend=backend)
    assert pos.scale == np.float32(pos.clip_max / 127.0)
    neg = ifmr_search(np.array([1.0, -4.0], np.float32), IfmrParams(with_offset=False), backend=backend)
    assert neg.scale == np.float32(neg.clip_max / 128.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_offset_formula(backend):
    x = np.random.default_rng(9).uniform(-1, 3, 4000).astype(np.float32)
    r = ifmr_search(x, IfmrParams(with_offset=True), backend=backend)
    assert r.offset == int(-np.round(np.float64(r.clip_min) / r.scale) - 128)
    assert r.scale == np.float32((np.float64(r.clip_max) - r.clip_min) / 255)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_offset,name",
                         [(True, "IfmrQuantWithOffset"), (False, "IfmrQuantWithoutOffset")])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan, 1e30])
def test_illegal_data_raises_the_spec_error(backend, with_offset, name, bad):
    x = np.array([0.5, -0.25, bad, 1.0], np.float32)
    with pytest.raises(QuantizationError, match=f"{name} scale is illegal"):
        ifmr_search(x, IfmrParams(with_offset=with_offset), backend=backend)


def test_observer_rejects_inf_and_shape_changes():
    obs = IfmrObserver(IfmrParams(with_offset=True))
    with pytest.raises(QuantizationError, match="IfmrQuantWithOffset scale is illegal"):
        obs.update(np.array([[1.0, np.inf]], np.float32))
    obs.update(np.ones((2, 3), np.float32))
    obs.update(np.ones((1, 3), np.float32))  # a smaller last batch is fine
    with pytest.raises(ValueError, match="shapes changed"):
        obs.update(np.ones((2, 4), np.float32))
    with pytest.raises(QuantizationError, match="before any update"):
        IfmrObserver().compute_qparams()


@pytest.mark.parametrize("backend", BACKENDS)
def test_observer_streams_batches(backend):
    rng = np.random.default_rng(11)
    batches = [rng.standard_normal((4, 3, 5, 5)).astype(np.float32) for _ in range(3)]
    obs = IfmrObserver(backend=backend)
    for b in batches:
        buffer = b.copy()
        obs.update(buffer)
        buffer[...] = 0  # the observer must have copied the data
    streamed = obs.compute_qparams()
    assert_same_result(streamed, ifmr_search(np.concatenate(batches), backend="reference"))
    obs.reset()
    assert obs.batches == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_offset", [True, False])
@pytest.mark.parametrize("zero_share,percentile", [(0.0, 0.999999), (0.6, 0.999999), (0.97, 0.9), (0.999, 0.99),
                                                   (1.0, 0.999999), (0.5, 1.0)])
def test_dropped_zeros_give_the_search_on_everything(backend, with_offset, zero_share, percentile):
    """The observer keeps nonzero values and counts zeros; the result is the full search's, also where
    a percentile's rank falls among the zeros or past them."""
    rng = np.random.default_rng(5)
    params = IfmrParams(with_offset=with_offset, max_percentile=percentile, min_percentile=percentile)
    batches = []
    for _ in range(3):
        b = np.maximum(rng.standard_normal((4, 8, 9, 9)).astype(np.float32), -0.2)
        b[rng.random(b.shape) < zero_share] = 0.0
        b[0, 0, 0, :2] = (-0.0, 0.0)
        batches.append(b)
    obs = IfmrObserver(params, backend=backend)
    for b in batches:
        obs.update(b)
    assert obs._zeros == sum(int((b == 0).sum()) for b in batches)
    assert_same_result(obs.compute_qparams(), ifmr_search(np.concatenate(batches), params, backend="reference"))
    if backend == "kernel":  # workers split the candidates: the same sums, bit for bit
        one, three = obs.compute_qparams(threads=1), obs.compute_qparams(threads=3)
        assert one.best_index == three.best_index and one.scale == three.scale
        np.testing.assert_array_equal(one.losses, three.losses)


@pytest.mark.parametrize("kwargs,match", [
    ({"max_percentile": 0.5}, "max_percentile"), ({"min_percentile": 1.01}, "min_percentile"),
    ({"search_range_start": 1.3, "search_range_end": 0.7}, "search_range"),
    ({"search_range_start": 0.0}, "search_range"), ({"search_step": 0.7}, "search_step"),
    ({"num_bits": 7}, "num_bits"), ({"num_bits": 17}, "num_bits"),
])
def test_config_ranges(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        IfmrParams(**kwargs)
