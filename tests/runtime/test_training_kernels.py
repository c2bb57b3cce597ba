"""The C++ loops of the training path (forward and backward passes, solver update) against the NumPy
references they replace. Random geometries with a fixed seed; bytes where the loops keep NumPy's
order of operations, a tolerance where they add in Caffe's order instead."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from amct_caffe.runtime.layers import channel_sums as cs
from amct_caffe.runtime.layers import conv_grad, pooling_grad
from amct_caffe.runtime.layers.conv import conv_out_size
from amct_caffe.runtime.layers.conv_cols import im2col, tap_slices
from amct_caffe.runtime.layers.pooling import Pooling, pooled_hw

try:
    from amct_caffe import _kernels
except ImportError:  # the extension is not built
    _kernels = None


def _needs(name: str):
    return pytest.mark.skipif(not hasattr(_kernels, name), reason=f"amct_caffe._kernels.{name} not built")


def _geometry(rng):
    """A random 2-D window geometry whose output is not empty."""
    while True:
        n, c = (int(v) for v in rng.integers(1, 4, 2))
        h, w = (int(v) for v in rng.integers(1, 12, 2))
        k, s, p, d = ([int(v) for v in rng.integers(lo, hi, 2)] for lo, hi in ((1, 5), (1, 4), (0, 3), (1, 3)))
        out = [conv_out_size(h, k[0], s[0], p[0], d[0]), conv_out_size(w, k[1], s[1], p[1], d[1])]
        if min(out) > 0:
            return (n, c, h, w), k, s, p, d, out


@_needs("im2col_2d")
@pytest.mark.parametrize("seed", range(40))
def test_im2col_and_col2im_give_the_bytes_of_the_tap_loops(seed):
    """im2col copies what the per-tap strided copies copy; col2im adds each tap's columns onto the
    padded input in tap order, which is Caffe's order per cell: the same bytes in both layouts and
    with any thread count."""
    rng = np.random.default_rng(seed)
    shape, k, s, p, d, out = _geometry(rng)
    x = rng.standard_normal(shape).astype(np.float32)
    ext = conv_grad._extent(shape[2:], k, s, p, d, out)
    for batch_last in (True, False):
        want = im2col(conv_grad._padded_input(x, p, ext), k, s, d, out, batch_last=batch_last).copy()
        cols = np.empty(want.size, np.float32)
        _kernels.im2col_2d(x, cols, k, s, p, d, out, batch_last, int(rng.integers(1, 4)))
        np.testing.assert_array_equal(cols.reshape(want.shape), want)
        dcols = rng.standard_normal(want.shape).astype(np.float32)
        per_tap = np.moveaxis(dcols, 3, 0) if batch_last else dcols  # (N, C, kh, kw, Ho, Wo)
        acc = np.zeros(shape[:2] + ext, np.float32)
        for tap in itertools.product(range(k[0]), range(k[1])):
            acc[(slice(None), slice(None)) + tap_slices(tap, s, d, out)] += per_tap[(slice(None), slice(None)) + tap]
        got = np.empty(shape, np.float32)
        _kernels.col2im_2d(dcols, got, k, s, p, d, out, batch_last, int(rng.integers(1, 4)))
        np.testing.assert_array_equal(got, acc[:, :, p[0]:p[0] + shape[2], p[1]:p[1] + shape[3]])


@_needs("im2col_2d")
@pytest.mark.parametrize("seed", range(8))
def test_conv_gradients_with_and_without_the_column_kernels(seed, monkeypatch):
    """conv_weight_grad / conv_input_grad through the C++ columns and through the NumPy fallback."""
    rng = np.random.default_rng(100 + seed)
    shape, k, s, p, d, out = _geometry(rng)
    group = int(rng.choice([g for g in (1, 2, 3) if shape[1] % g == 0]))
    o = group * int(rng.integers(1, 4))
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((o, shape[1] // group, *k)).astype(np.float32)
    dy = rng.standard_normal((shape[0], o, *out)).astype(np.float32)
    geom = dict(stride=s, pad=p, dilation=d, group=group)
    fast = (conv_grad.conv_weight_grad(x, dy, k, **geom), conv_grad.conv_input_grad(dy, w, shape, **geom))
    monkeypatch.setattr(conv_grad, "IM2COL_KERNEL", None)
    monkeypatch.setattr(conv_grad, "COL2IM_KERNEL", None)
    ref = (conv_grad.conv_weight_grad(x, dy, k, **geom), conv_grad.conv_input_grad(dy, w, shape, **geom))
    np.testing.assert_array_equal(fast[0], ref[0])  # the same columns, the same per-image products
    np.testing.assert_allclose(fast[1], ref[1], rtol=1e-5, atol=1e-5)  # dcols laid out per image or side by side


@_needs("max_pool2d_argmax")
@pytest.mark.parametrize("seed", range(40))
def test_max_pool_argmax_and_backward_follow_caffes_loops(seed):
    """Maxima and argmax as the NumPy MAX pooling with its mask top (ties, NaN, -inf, padding); the
    backward as the per-tap reference (sums in another order where windows overlap)."""
    rng = np.random.default_rng(200 + seed)
    shape, k, s, _, _, _ = _geometry(rng)
    p = [min(int(v), kk - 1) for v, kk in zip(rng.integers(0, 3, 2), k, strict=True)]
    out = pooled_hw(shape[2], shape[3], k, s, p)
    if min(out) <= 0:
        pytest.skip("empty output")
    x = np.round(rng.standard_normal(shape) * 2).astype(np.float32) / 2  # many ties
    x[rng.random(shape) < 0.05] = np.nan
    x[rng.random(shape) < 0.05] = -np.inf
    want_y, want_mask = Pooling(x, pool="MAX", kernel=k, stride=s, pad=p, return_mask=True)
    y, mask = pooling_grad.max_pool_argmax(x, k, s, p, out)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(mask, want_mask.astype(np.int32))
    dy = rng.standard_normal(y.shape).astype(np.float32)
    got = pooling_grad.argmax_backward(dy, mask, shape[2:], k, s, p)
    np.testing.assert_allclose(got, pooling_grad.max_pool_backward(dy, x, want_y, k, s, p), rtol=1e-6, atol=1e-6)


@_needs("max_pool2d_argmax")
@pytest.mark.parametrize("k, s, p, hw", [((2, 2), (2, 2), (0, 0), (24, 24)), ((2, 2), (2, 2), (1, 1), (7, 9)),
                                         ((3, 3), (2, 2), (0, 0), (13, 12)), ((3, 3), (2, 2), (1, 1), (112, 112)),
                                         ((3, 3), (1, 2), (2, 0), (6, 11)), ((2, 2), (3, 2), (0, 1), (9, 5))])
def test_max_pool_argmax_unrolled_windows(k, s, p, hw):
    """The 2x2 and 3x3 windows at column stride 2 (unrolled where unclipped) as the NumPy mask top."""
    rng = np.random.default_rng(sum(hw))
    x = np.round(rng.standard_normal((2, 3) + hw) * 2).astype(np.float32) / 2
    x[rng.random(x.shape) < 0.05] = np.nan
    out = pooled_hw(hw[0], hw[1], k, s, p)
    want_y, want_mask = Pooling(x, pool="MAX", kernel=k, stride=s, pad=p, return_mask=True)
    y, mask = pooling_grad.max_pool_argmax(x, k, s, p, out)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(mask, want_mask.astype(np.int32))


@_needs("max_pool2d_argmax")
def test_argmax_backward_writes_empty_windows_on_the_previous_plane():
    x = np.arange(2 * 5 * 5, dtype=np.float32).reshape(1, 2, 5, 5)
    y, mask = pooling_grad.max_pool_argmax(x, (1, 1), (3, 3), (0, 0), (3, 3))
    assert (mask[0, :, 2, :] == -1).all()
    got = pooling_grad.argmax_backward(np.ones(y.shape, np.float32), mask, (5, 5), (1, 1), (3, 3), (0, 0))
    assert got[0, 0, 4, 4] == 5 and got.sum() == 2 * 4 + 5


@_needs("channel_sums")
@pytest.mark.parametrize("shape", [(8, 16, 3136), (2, 3, 5), (1, 1, 1), (64, 20, 9), (3, 7, 1001)])
def test_channel_sums_and_batch_norm_backward(shape, monkeypatch):
    """The float64 sums agree with NumPy's to a double's rounding and do not depend on the thread
    count; BatchNorm's backward gives the bytes of the NumPy expression."""
    rng = np.random.default_rng(shape[2])
    a, b = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    s_a, s_ab = cs.channel_sums(a, b)
    np.testing.assert_allclose(s_a, a.sum(axis=(0, 2), dtype=np.float64), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(s_ab, (a * b).sum(axis=(0, 2), dtype=np.float64), rtol=1e-12, atol=1e-9)
    for workers in (1, 3):
        got = _kernels.channel_sums(a, b, workers)
        np.testing.assert_array_equal(got[0], s_a)
        np.testing.assert_array_equal(got[1], s_ab)
    std = (rng.random(shape[1]) + 0.5).astype(np.float32)
    fast = cs.batch_norm_backward_batch_stats(a, b, std)
    monkeypatch.setattr(cs, "BN_BACKWARD_KERNEL", None)
    np.testing.assert_array_equal(fast, cs.batch_norm_backward_batch_stats(a, b, std))


@_needs("sgd_update")
@pytest.mark.parametrize("decay", [0.0, 5e-4])
def test_sgd_update_gives_the_bytes_of_the_numpy_steps(decay):
    rng = np.random.default_rng(5)
    w, g, h = (rng.standard_normal(100_003).astype(np.float32) for _ in range(3))
    w[:3] = (np.inf, -np.inf, np.nan)
    want_w, want_g, want_h = w.copy(), g.copy(), h.copy()
    decay, momentum, rate = np.float32(decay), np.float32(0.9), np.float32(0.01)
    with np.errstate(invalid="ignore"):
        if decay:
            want_g += decay * want_w
        want_h *= momentum
        want_h += rate * want_g
        want_w -= want_h
    _kernels.sgd_update(w, g, h, float(decay), float(momentum), float(rate), 2)
    for got, want in ((w, want_w), (g, want_h), (h, want_h)):
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
