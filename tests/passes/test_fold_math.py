"""The folding math alone, against layers evaluated directly in NumPy (loops over output channels)."""

import numpy as np
import pytest

from amct_caffe.passes import fold_math

RNG = np.random.default_rng(0)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def conv_at_one_pixel(w, b, x, group):
    """Convolution whose input patch is exactly one kernel: w (O, C/g, k, k), x (C, k, k) -> (O,)."""
    o_n, cg = w.shape[0], w.shape[1]
    og = o_n // group
    return np.array([np.sum(w[o] * x[(o // og) * cg:(o // og + 1) * cg]) + b[o] for o in range(o_n)])


def deconv_of_one_pixel(w, b, x, group):
    """Deconvolution of a 1x1 input: w (C, O/g, k, k), x (C,) -> (O, k, k)."""
    c_n, og = w.shape[0], w.shape[1]
    cg = c_n // group
    out = np.zeros((og * group, *w.shape[2:]))
    for o in range(og * group):
        g, j = divmod(o, og)
        for c in range(g * cg, (g + 1) * cg):
            out[o] += x[c] * w[c, j]
        out[o] += b[o]
    return out


def inner_product(w, b, x, transpose):
    return (x @ w if transpose else w @ x) + b


def caffe_batchnorm(y, mean, var, factor, eps):
    """BatchNorm with use_global_stats as batch_norm_layer.cpp computes it (channels on axis 0)."""
    s = 0.0 if factor == 0 else 1.0 / factor
    shape = (-1,) + (1,) * (y.ndim - 1)
    return (y - (mean * s).reshape(shape)) / np.sqrt(var * s + eps).reshape(shape)


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(np.max(np.abs(b)))))


@pytest.mark.parametrize("factor", [1.0, 0.37, 999.0, 0.0])
@pytest.mark.parametrize("with_bias", [True, False])
def test_batchnorm_into_convolution(factor, with_bias):
    w, x = randn(6, 2, 3, 3), randn(6, 3, 3)
    b = randn(6) if with_bias else None
    mean, var = randn(6) * factor, RNG.uniform(0.2, 2, 6).astype(np.float32) * factor
    eps = 1e-3
    w2, b2 = fold_math.fold_batchnorm(w, b, mean, var, np.float32([factor]), eps, out_axis=0)
    assert w2.shape == w.shape and w2.dtype == np.float32 and b2.shape == (6,) and b2.dtype == np.float32
    ref = caffe_batchnorm(conv_at_one_pixel(w, np.zeros(6) if b is None else b, x, 3), mean, var, factor, eps)
    close(conv_at_one_pixel(w2, b2, x, 3), ref)


def test_zero_factor_means_zero_statistics():
    """Caffe treats a 0 moving-average factor as statistics 0: z = y / sqrt(eps), not NaN."""
    a, c = fold_math.batchnorm_affine(np.ones(3), np.ones(3), 0.0, 0.25)
    np.testing.assert_array_equal(a, np.full(3, 2.0))
    np.testing.assert_array_equal(c, np.zeros(3))


@pytest.mark.parametrize("group", [1, 2, 3])
def test_scale_and_batchnorm_into_grouped_deconvolution(group):
    c_in, og = 6, 2
    o_n = og * group
    w, b, x = randn(c_in, og, 2, 2), randn(o_n), randn(c_in)
    mean, var, gamma, beta = randn(o_n), RNG.uniform(0.2, 2, o_n), randn(o_n), randn(o_n)
    w2, b2 = fold_math.fold_batchnorm(w, b, mean, var, 2.0, 1e-5, out_axis=1, group=group)
    w2, b2 = fold_math.fold_scale(w2, b2, gamma, beta, out_axis=1, group=group)
    y = caffe_batchnorm(deconv_of_one_pixel(w, b, x, group), mean, var, 2.0, 1e-5)
    ref = y * gamma[:, None, None] + beta[:, None, None]
    close(deconv_of_one_pixel(w2, b2, x, group), ref)


def test_grouped_deconvolution_channel_order():
    """Output channel o of a group-2 deconvolution with O/g = 3 is w[block o // 3][:, o % 3]."""
    w = np.ones((4, 3, 1, 1), np.float32)
    factor = np.arange(6, dtype=np.float32)
    scaled = fold_math.scale_out_channels(w, factor, out_axis=1, group=2)
    np.testing.assert_array_equal(scaled[:2, :, 0, 0], [[0, 1, 2], [0, 1, 2]])
    np.testing.assert_array_equal(scaled[2:, :, 0, 0], [[3, 4, 5], [3, 4, 5]])


@pytest.mark.parametrize("transpose", [False, True])
def test_batchnorm_scale_bias_into_inner_product(transpose):
    o_n, k = 5, 7
    w = randn(k, o_n) if transpose else randn(o_n, k)
    x, mean, var = randn(k), randn(o_n), RNG.uniform(0.2, 2, o_n)
    gamma, beta, bias = randn(o_n), randn(o_n), randn(o_n)
    axis = 1 if transpose else 0
    w2, b2 = fold_math.fold_batchnorm(w, None, mean, var, 1.0, 1e-5, out_axis=axis)
    w2, b2 = fold_math.fold_scale(w2, b2, gamma, None, out_axis=axis)
    b2 = fold_math.fold_bias(b2, beta)
    w2, b2 = fold_math.fold_scale(w2, b2, np.ones(o_n), bias, out_axis=axis)  # Scale with bias_term
    y = caffe_batchnorm(inner_product(w, np.zeros(o_n), x, transpose), mean, var, 1.0, 1e-5)
    close(inner_product(w2, b2, x, transpose), y * gamma + beta + bias)


def test_bias_folding():
    b, beta = randn(4), randn(4)
    np.testing.assert_array_equal(fold_math.fold_bias(b, beta), b + beta)
    np.testing.assert_array_equal(fold_math.fold_bias(None, beta), beta)


def test_legacy_shaped_blobs_are_accepted():
    w = randn(3, 2, 1, 1)
    w2, b2 = fold_math.fold_scale(w, randn(1, 1, 1, 3), randn(1, 1, 1, 3), None, out_axis=0)
    assert w2.shape == (3, 2, 1, 1) and b2.shape == (3,)


def test_mismatched_channels_are_refused():
    with pytest.raises(ValueError, match="4 values but the layer has 3 output channels"):
        fold_math.fold_scale(randn(3, 2, 1, 1), None, randn(4), None, out_axis=0)
    with pytest.raises(ValueError, match="multiple of group"):
        fold_math.scale_out_channels(randn(5, 2, 1, 1), np.ones(4), out_axis=1, group=2)
