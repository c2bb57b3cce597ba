import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from amct_caffe.errors import ConfigError
from amct_caffe.quant import QuantizationError, snq_quantize_weight

from .conftest import finite_f32, requires_kernels

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
BACKENDS = ["reference", pytest.param("kernel", marks=requires_kernels)]
INITS = ["uniform", "gaussian", "d2sampling"]


def assert_same(a, b):
    np.testing.assert_array_equal(a.centres, b.centres)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.iterations, b.iterations)
    np.testing.assert_array_equal(a.fake, b.fake)


@requires_kernels
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("seed", [0, 7, 2**63 + 5])
def test_kernel_matches_reference(init, seed):
    w = np.random.default_rng(seed % 1000).standard_normal((6, 4, 3, 3)).astype(np.float32)
    w[1] = 0.25              # a constant channel
    w[2, :2] = 0.5           # few distinct values
    w[2, 2:] = -0.5
    assert_same(snq_quantize_weight(w, init_algo=init, seed=seed, backend="reference"),
                snq_quantize_weight(w, init_algo=init, seed=seed, backend="kernel"))


@requires_kernels
@SETTINGS
@given(w=hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 40)), elements=finite_f32),
       init=st.sampled_from(INITS), channel_wise=st.booleans())
def test_kernel_matches_reference_random(w, init, channel_wise):
    kwargs = {"init_algo": init, "channel_wise": channel_wise, "seed": 3, "max_iteration": 500}
    assert_same(snq_quantize_weight(w, backend="reference", **kwargs),
                snq_quantize_weight(w, backend="kernel", **kwargs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("init", INITS)
def test_result_properties(backend, init):
    w = np.random.default_rng(1).standard_normal((4, 8, 3, 3)).astype(np.float32)
    r = snq_quantize_weight(w, init_algo=init, seed=11, backend=backend)
    assert r.centres.shape == (4, 16) and r.codes.shape == (4, 72) and r.fake.shape == w.shape
    assert r.codes.dtype == np.uint8 and r.codes.max() <= 15
    assert (np.diff(r.centres, axis=1) >= 0).all()
    # every value's code names its nearest centre
    rows = w.reshape(4, -1)
    dist = np.abs(rows[:, :, None] - r.centres[:, None, :].astype(np.float64))
    chosen = np.take_along_axis(dist, r.codes[:, :, None].astype(np.intp), axis=2)[..., 0]
    np.testing.assert_allclose(chosen, dist.min(axis=2), rtol=0, atol=1e-6)
    # Lloyd iterations only lower the squared error: from the uniform start it cannot be worse than
    # the 16-level uniform grid, and from any start it is a small fraction of the variance
    mse = ((r.fake - w).reshape(4, -1).astype(np.float64) ** 2).mean(axis=1)
    assert (mse < 0.05 * rows.var(axis=1)).all()
    if init == "uniform":
        grid = np.linspace(rows.min(axis=1), rows.max(axis=1), 16, axis=1)
        mse_grid = (np.abs(rows[:, :, None] - grid[:, None, :]).min(axis=2) ** 2).mean(axis=1)
        assert (mse <= mse_grid * (1 + 1e-6)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_determinism(backend):
    w = np.random.default_rng(2).standard_normal((2, 200)).astype(np.float32)
    a = snq_quantize_weight(w, init_algo="d2sampling", seed=5, backend=backend)
    b = snq_quantize_weight(w, init_algo="d2sampling", seed=5, backend=backend)
    assert_same(a, b)


@pytest.mark.parametrize("kwargs,match", [
    ({"max_iteration": 499}, "max_iteration"), ({"max_iteration": 2001}, "max_iteration"),
    ({"min_distance": 1e-11}, "min_distance"), ({"min_distance": 2e-3}, "min_distance"),
    ({"init_algo": "kmeans"}, "init_algo"), ({"num_bits": 8}, "num_bits"),
    ({"channel_wise": True, "layer_type": "InnerProduct"}, "InnerProduct supports only channel_wise=false"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        snq_quantize_weight(np.ones((2, 3), np.float32), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_weight(backend):
    with pytest.raises(QuantizationError, match="inf or NaN"):
        snq_quantize_weight(np.array([[1.0, np.inf]], np.float32), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", [1, 2])
def test_deconvolution_clusters_each_output_channel(backend, group):
    """A Deconvolution's output channels are axis 1 within each group of (Cin, Cout / g, kh, kw): SNQ
    clusters those (at most 16 values each, what ARQ then scales), the same as on the weight laid out
    as a Convolution's (one row per output channel)."""
    rng = np.random.default_rng(3)
    cin, per_group, k = 8, 3, 3
    w = rng.standard_normal((cin, per_group, k, k)).astype(np.float32)
    r = snq_quantize_weight(w, layer_type="Deconvolution", group=group, backend=backend)
    assert r.fake.shape == w.shape
    rows_per_group = cin // group
    for g in range(group):
        block = r.fake[g * rows_per_group:(g + 1) * rows_per_group]
        for c in range(per_group):
            assert len(np.unique(block[:, c])) <= 16
    as_conv = np.concatenate([w[g * rows_per_group:(g + 1) * rows_per_group].transpose(1, 0, 2, 3)
                              for g in range(group)])
    conv = snq_quantize_weight(as_conv, backend=backend)
    back = np.concatenate([conv.fake[g * per_group:(g + 1) * per_group].transpose(1, 0, 2, 3) for g in range(group)])
    np.testing.assert_array_equal(r.fake, back)
    np.testing.assert_array_equal(r.centres, conv.centres)
