import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amct_caffe.quant import (QuantizationError, UlqQuantizer, fake_quant, ulq_backward, ulq_forward,
                              ulq_scale_offset)
from amct_caffe.quant.ulq import ulq_clip_check

from .conftest import adversarial_arrays, float_arrays, requires_kernels

SETTINGS = settings(max_examples=80, deadline=None, derandomize=True)
BACKENDS = ["reference", pytest.param("kernel", marks=requires_kernels)]


def test_scale_offset_formula():
    s, o = ulq_scale_offset(3.0, -1.0, 8, backend="reference")
    assert s == np.float32(4.0) / np.float32(255)
    assert o == int(np.round(-128 + 1.0 / s))
    assert ulq_scale_offset(1e-9, 0.0, 8, backend="reference") == (1.0, -128)


@requires_kernels
@SETTINGS
@given(x=float_arrays, cmax=st.floats(2.0**-6, 64.0, width=32), cmin=st.floats(-64.0, 0.0, width=32),
       num_bits=st.sampled_from([8, 12, 16]))
def test_kernel_matches_reference(x, cmax, cmin, num_bits):
    assert ulq_scale_offset(cmax, cmin, num_bits, backend="reference") == \
        ulq_scale_offset(cmax, cmin, num_bits, backend="kernel")
    y_ref = ulq_forward(x, cmax, cmin, num_bits, backend="reference")[0]
    np.testing.assert_array_equal(y_ref, ulq_forward(x, cmax, cmin, num_bits, backend="kernel")[0])
    g = np.cos(np.arange(x.size, dtype=np.float32)).astype(np.float32)
    gx_r, gmax_r, gmin_r = ulq_backward(x, g, cmax, cmin, num_bits, backend="reference")
    gx_k, gmax_k, gmin_k = ulq_backward(x, g, cmax, cmin, num_bits, backend="kernel")
    np.testing.assert_array_equal(gx_r, gx_k)
    np.testing.assert_allclose([gmax_k, gmin_k], [gmax_r, gmin_r], rtol=1e-9, atol=1e-12)


@requires_kernels
@pytest.mark.parametrize("name,x", list(adversarial_arrays().items()))
def test_kernel_matches_reference_adversarial(name, x):
    g = np.ones_like(x)
    r = ulq_backward(x, g, 2.0, -1.0, backend="reference")
    k = ulq_backward(x, g, 2.0, -1.0, backend="kernel")
    np.testing.assert_array_equal(r[0], k[0])
    np.testing.assert_allclose(r[1:], k[1:], rtol=1e-9, atol=1e-12)


def _surrogate(x, g, cmax, cmin, num_bits, frozen):
    """sum g * (clamp(x) + s * rho) with masks and rho held at ``frozen`` (float64)."""
    upper, lower, rho = frozen
    s = (cmax - cmin) / (2**num_bits - 1)
    xc = np.where(upper, cmax, np.where(lower, cmin, x.astype(np.float64)))
    return float(np.sum(g.astype(np.float64) * (xc + s * rho)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_bits", [8, 12])
def test_gradients_match_finite_differences(backend, num_bits):
    rng = np.random.default_rng(num_bits)
    x = (rng.standard_normal(4000) * 1.5).astype(np.float32)
    g = rng.standard_normal(4000).astype(np.float32)
    cmax, cmin = 2.0, -1.25
    gx, gmax, gmin = ulq_backward(x, g, cmax, cmin, num_bits, backend=backend)
    s, o = ulq_scale_offset(cmax, cmin, num_bits, backend="reference")
    qmin, qmax = -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
    upper = x > np.float32(s) * np.float32(qmax - o)
    lower = x < np.float32(s) * np.float32(qmin - o)
    t = np.where(upper, np.float32(cmax), np.where(lower, np.float32(cmin), x)) / np.float32(s)
    rho = (np.round(t.astype(np.float64)) - t).astype(np.float64)
    frozen = (upper, lower, rho)
    h = 1e-3
    fd_max = (_surrogate(x, g, cmax + h, cmin, num_bits, frozen)
              - _surrogate(x, g, cmax - h, cmin, num_bits, frozen)) / (2 * h)
    fd_min = (_surrogate(x, g, cmax, cmin + h, num_bits, frozen)
              - _surrogate(x, g, cmax, cmin - h, num_bits, frozen)) / (2 * h)
    np.testing.assert_allclose([gmax, gmin], [fd_max, fd_min], rtol=1e-6, atol=1e-6)
    i = int(np.flatnonzero(~(upper | lower))[0])
    xp, xm = x.copy(), x.copy()
    xp[i] += np.float32(h)
    xm[i] -= np.float32(h)
    up, down = (_surrogate(v, g, cmax, cmin, num_bits, frozen) for v in (xp, xm))
    fd_x = (up - down) / float(xp[i] - xm[i])
    assert gx[i] == pytest.approx(fd_x, rel=1e-5)
    assert (gx[upper | lower] == 0).all() and upper.any() and lower.any()


def test_clip_check_rules():
    assert ulq_clip_check(1.0, 2.0, 3.0, -1.0) == (3.0, -1.0, 3.0, -1.0)   # max <= min: restore both
    assert ulq_clip_check(-0.5, -2.0, 3.0, -1.0) == (3.0, -2.0, 3.0, -1.0)  # max < 0: restore max
    assert ulq_clip_check(4.0, 0.5, 3.0, -1.0) == (4.0, -1.0, 3.0, -1.0)    # min > 0: restore min
    assert ulq_clip_check(4.0, -0.5, 3.0, -1.0) == (4.0, -0.5, 4.0, -0.5)   # valid: remember


@requires_kernels
def test_clip_check_kernel_agrees():
    from amct_caffe import _kernels
    cases = [(1.0, 2.0, 3.0, -1.0), (-0.5, -2.0, 3.0, -1.0), (4.0, 0.5, 3.0, -1.0), (4.0, -0.5, 3.0, -1.0)]
    for args in cases:
        assert tuple(_kernels.ulq_clip_check(*args)) == tuple(float(v) for v in ulq_clip_check(*args))


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantizer_state(backend):
    q = UlqQuantizer(3.0, -1.0, fixed_min=True, backend=backend)
    x = np.linspace(-2, 4, 50).astype(np.float32)
    y = q.forward(x)
    assert q.clip_min == 0 and y.min() == 0
    np.testing.assert_array_equal(y, fake_quant(x, q.scale, q.offset, 8, backend="reference"))
    assert q.backward(x, np.ones_like(x))[2] == 0.0
    q.clip_max = np.float32(-1.0)  # an optimizer step went wrong: ClipCheck restores the last good value
    q.forward(x)
    assert q.clip_max == 3.0


def test_illegal_clip_range():
    with pytest.raises(QuantizationError, match="UlqQuant scale is illegal"):
        ulq_scale_offset(np.inf, 0.0, 8, backend="reference")
