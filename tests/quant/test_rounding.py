"""Learned rounding onto ARQ's grid (quant/rounding.py): never worse than nearest rounding on the
objective, a local optimum of it, inside the constraints, and ARQ gives the codes back."""

import itertools

import numpy as np
import pytest

from amct_caffe.quant import QuantizationError, arq_quantize_weight
from amct_caffe.quant import rounding
from amct_caffe.quant.rounding import bias_correction, dominant_mask, learned_codes, rounding_cost


def _problem(seed: int, rows: int = 6, k: int = 9, samples: int = 400):
    """Weights, ARQ scales and the covariance of correlated inputs (smooth 3x3 patches: a shared
    level plus a little texture), as a depthwise layer sees them."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, k)).astype(np.float32)
    x = rng.standard_normal((samples, 1)) * 2.0 + 0.3 * rng.standard_normal((samples, k))
    arq = arq_quantize_weight(w.reshape(rows, k, 1, 1))
    return w.astype(np.float64), arq.scale.astype(np.float64), np.cov(x, rowvar=False), x, arq


@pytest.mark.parametrize("seed", range(5))
def test_lowers_the_output_error_and_keeps_the_constraints(seed):
    w, s, h, _, arq = _problem(seed)
    nearest = np.asarray(arq.quantized, np.float64).reshape(w.shape)
    codes = learned_codes(w, s, h)
    assert (rounding_cost(w, s, codes, h) <= rounding_cost(w, s, nearest, h) + 1e-12).all()
    assert rounding_cost(w, s, codes, h).sum() < 0.9 * rounding_cost(w, s, nearest, h).sum()
    t = w / s[:, None]
    assert ((codes == np.floor(t)) | (codes == np.floor(t) + 1) | (codes == nearest)).all()
    keep = dominant_mask(w)
    np.testing.assert_array_equal(codes[keep], nearest[keep])
    # ARQ of the saved weight (dominant element as it was) gives back these codes and the same scales
    saved = (codes * s[:, None]).astype(np.float32)
    saved[keep] = w.astype(np.float32)[keep]
    again = arq_quantize_weight(saved.reshape(*w.shape, 1, 1))
    np.testing.assert_array_equal(again.scale, arq.scale)
    np.testing.assert_array_equal(np.asarray(again.quantized, np.float64).reshape(w.shape), codes)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("exhaustive", [True, False])
@pytest.mark.parametrize("with_linear", [False, True])
def test_exhaustive_search_is_optimal_and_descent_a_local_optimum(seed, exhaustive, with_linear, monkeypatch):
    if not exhaustive:
        monkeypatch.setattr(rounding, "EXHAUSTIVE", 0)
    w, s, h, _, _ = _problem(seed, rows=2, k=6)
    c = np.random.default_rng(seed + 50).standard_normal(w.shape) * s[:, None] if with_linear else None
    codes = learned_codes(w, s, h, damp=0.0, linear=c)
    cost = rounding_cost(w, s, codes, h, c)
    keep = dominant_mask(w)
    lo = np.floor(w / s[:, None])
    for r in range(len(w)):
        free = [j for j in range(w.shape[1]) if not keep[r, j]]
        for j in free:  # no single flip lowers the cost
            other = codes[r].copy()
            other[j] = lo[r, j] + (codes[r, j] == lo[r, j])
            row_c = None if c is None else c[r:r + 1]
            assert rounding_cost(w[r:r + 1], s[r:r + 1], other[None], h, row_c)[0] >= cost[r] - 1e-12
        best = np.inf
        for bits in itertools.product((0, 1), repeat=len(free)):
            trial = codes[r].copy()
            trial[free] = lo[r, free] + np.array(bits)
            best = min(best, rounding_cost(w[r:r + 1], s[r:r + 1], trial[None], h, row_c)[0])
        if exhaustive:
            assert cost[r] <= best + 1e-15


def test_keeps_a_high_pass_kernels_gain_on_flat_inputs():
    """Equal inputs: only the kernel's sum matters, and the learned codes hold it within half a step."""
    w = np.array([[-1.0, -1.0, -1.0, -1.0, 8.0, -1.0, -1.0, -1.0, -0.7]]) * 0.37 + 0.0041
    s = np.array([float(arq_quantize_weight(w.reshape(1, 9, 1, 1).astype(np.float32)).scale[0])])
    codes = learned_codes(w, s, np.ones((9, 9)))
    assert abs((codes * s).sum() - w.sum()) <= 0.5 * s[0] + 1e-9


def test_bias_correction_keeps_the_mean_output():
    w, s, h, x, _ = _problem(7, rows=3)
    codes = learned_codes(w, s, h)
    b = bias_correction(w, s, codes, x.mean(0))
    err = x @ w.T - (x @ (codes * s[:, None]).T + b)
    np.testing.assert_allclose(err.mean(0), 0.0, atol=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_upstream_target_cancels_part_of_the_input_error(seed):
    """The input differs from the FP32 network's by an error correlated with it (a per-channel
    gain error, as a quantized earlier layer leaves): the codes chosen with the linear term
    c = Cov(x, d) w, and the bias that also takes the mean upstream error, come closer to the FP32
    output w . x_fp32 than the codes aimed at the layer's own float weight, and match its mean."""
    w, s, _, x, _ = _problem(seed, rows=8)
    rng = np.random.default_rng(seed + 100)
    x_fp32 = x * (1.0 + 0.02 * rng.standard_normal(x.shape[1])) + 0.01 * rng.standard_normal(x.shape) + 0.05
    d = x_fp32 - x
    h = np.cov(x, rowvar=False)
    cross = (x - x.mean(0)).T @ (d - d.mean(0)) / len(x)
    own = learned_codes(w, s, h)
    aimed = learned_codes(w, s, h, linear=w @ cross.T)
    target = x_fp32 @ w.T

    def error(codes, mu_d):
        out = x @ (codes * s[:, None]).T + bias_correction(w, s, codes, x.mean(0), mu_d)
        return out - target

    assert (error(aimed, d.mean(0)) ** 2).mean() < 0.5 * (error(own, d.mean(0)) ** 2).mean()
    assert (error(own, d.mean(0)) ** 2).mean() < (error(own, None) ** 2).mean()
    np.testing.assert_allclose(error(aimed, d.mean(0)).mean(0), 0.0, atol=1e-9)


def test_bad_shapes_are_errors():
    with pytest.raises(QuantizationError, match="rows"):
        learned_codes(np.zeros(9), np.ones(1), np.eye(9))
    with pytest.raises(QuantizationError, match="covariance"):
        learned_codes(np.zeros((2, 9)), np.ones(2), np.eye(8))
    with pytest.raises(QuantizationError, match="linear"):
        learned_codes(np.zeros((2, 9)), np.ones(2), np.eye(9), linear=np.zeros((2, 8)))
