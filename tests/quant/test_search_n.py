import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from amct_caffe.quant import QuantizationError, SearchNObserver, search_n
from amct_caffe.quant.search_n import search_n_errors

from .conftest import requires_kernels

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)
BACKENDS = ["reference", pytest.param("kernel", marks=requires_kernels)]


def brute_force(x, deq):
    """Pure-Python integers, straight from the formula."""
    out = []
    for c in range(deq.size):
        row = []
        for n in range(1, 17):
            err = 0
            for v in x[:, c].reshape(-1):
                s32 = int(np.clip(np.round(np.float64(v) / np.float64(deq[c]) + 0.0), -2**31, 2**31 - 1))
                s16 = min(max(s32 >> n, -32768), 32767)
                err += (s16 * 2**n - s32) ** 2
            row.append(err)
        out.append(row)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_are_exact(backend):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((2, 3, 7)) * np.array([1.0, 3e4, 5e9])[None, :, None]).astype(np.float32)
    x[0, 2, 0] = 3e38  # clamps to INT32_MAX
    deq = np.array([0.01, 0.5, 0.25], np.float32)
    # inputs are chosen so that no value lands on a .5 boundary, where np.round would differ
    assert search_n_errors(x, deq, backend=backend) == brute_force(x, deq)


@requires_kernels
@SETTINGS
@given(x=hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 20)),
                    elements=st.floats(-1e7, 1e7, width=32)),
       deq=st.floats(2.0**-10, 4.0, width=32))
def test_kernel_matches_reference(x, deq):
    d = np.full(x.shape[1], deq, np.float32) * np.linspace(1, 2, x.shape[1]).astype(np.float32)
    assert search_n_errors(x, d, backend="reference") == search_n_errors(x, d, backend="kernel")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_pick_the_smallest_n(backend):
    best = search_n(np.zeros((1, 2, 4), np.float32), np.ones(2, np.float32), backend=backend)
    assert best.tolist() == [1, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_outputs_need_a_large_shift(backend):
    x = np.full((1, 1, 8), 2.0**29, np.float32)  # s32 = 2^29: n = 15 and 16 are exact, 15 wins
    assert search_n(x, np.ones(1, np.float32), backend=backend).tolist() == [15]


@pytest.mark.parametrize("backend", BACKENDS)
def test_observer_accumulates_batches(backend):
    rng = np.random.default_rng(4)
    batches = [(rng.standard_normal((2, 4, 3, 3)) * 1e4).astype(np.float32) for _ in range(3)]
    deq = np.array([0.1, 0.2, 0.3, 0.05], np.float32)
    obs = SearchNObserver(deq, backend=backend)
    for b in batches:
        obs.update(b)
    whole = search_n_errors(np.concatenate(batches), deq, backend="reference")
    assert obs.errors == whole
    np.testing.assert_array_equal(obs.compute_qparams(), search_n(np.concatenate(batches), deq))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    with pytest.raises(QuantizationError, match="NaN"):
        search_n(np.full((1, 1, 2), np.nan, np.float32), np.ones(1, np.float32), backend=backend)
    with pytest.raises(QuantizationError, match="deq_scale"):
        search_n(np.ones((1, 1, 2), np.float32), np.zeros(1, np.float32), backend=backend)
    with pytest.raises(QuantizationError, match="expected data shaped"):
        search_n(np.ones((1, 3, 2), np.float32), np.ones(2, np.float32), backend=backend)
