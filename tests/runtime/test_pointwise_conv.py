"""The pointwise kernel (csrc/src/pointwise_conv.cpp): a FAST chain's 1x1 convolution with the folded map
and ReLU applied in its stores (runtime/fold.py)."""

import numpy as np
import pytest

from amct_caffe.runtime import fold, threads

from .test_fold import _net

pytestmark = pytest.mark.skipif(fold.POINTWISE_KERNEL is None or fold.simd_level() < 1,
                                reason="needs the extension on a CPU with AVX2")


def _case(rng, n=None, k=None, o=None, p=None):
    n = n or int(rng.integers(1, 4))
    k = k or int(rng.integers(1, 70))
    o = o or int(rng.integers(1, 21))
    p = p or int(rng.integers(1, 300))
    x = rng.standard_normal((n, k, 1, p)).astype(np.float32)
    w = rng.standard_normal((o, k, 1, 1)).astype(np.float32)
    return x, w


@pytest.mark.parametrize("seed", range(6))
def test_sums_follow_the_float64_products(seed):
    rng = np.random.default_rng(seed)
    x, w = _case(rng)
    got = fold.POINTWISE_KERNEL(x, w, None, None, False, 1)
    terms = np.abs(w[:, :, 0, 0]).astype(np.float64) @ np.abs(x[:, :, 0, :]).astype(np.float64)  # (n, o, p)
    want = w[:, :, 0, 0].astype(np.float64) @ x[:, :, 0, :].astype(np.float64)
    assert got.shape == (x.shape[0], w.shape[0], 1, x.shape[3])
    assert np.all(np.abs(got[:, :, 0, :] - want) <= 2 * x.shape[1] * np.finfo(np.float32).eps * terms + 1e-30)


@pytest.mark.parametrize("seed", range(6))
def test_every_vector_width_gives_the_same_bytes(seed, simd_limit):
    """The AVX2 register blocks (8 x 24, four channels a pass, taps in chunks of 64) and the AVX-512 ones
    (8 x 48): the same chain of fused multiply-adds per sum, with and without the epilogue, K across the
    chunks and partial blocks of channels and pixels."""
    rng = np.random.default_rng(seed)
    x, w = _case(rng, k=int(rng.integers(1, 200)), o=int(rng.integers(1, 21)) if seed % 2 else 5 + seed % 3)
    x.reshape(-1)[::97] = np.nan  # (the ReLU keeps NaN and stores -0 as +0 on both widths)
    x[:, :, :, -1] = -0.0
    a = rng.standard_normal(w.shape[0]).astype(np.float32)
    simd_limit(2)
    if fold.simd_level() < 2:
        pytest.skip("the CPU lacks AVX-512")
    got = []
    for level in (2, 1):
        simd_limit(level)
        got.append([fold.POINTWISE_KERNEL(x, w, None, None, False, 1), fold.POINTWISE_KERNEL(x, w, a, a, True, 1)])
    for wide, narrow in zip(*got, strict=True):
        np.testing.assert_array_equal(wide.view(np.uint32), narrow.view(np.uint32))


def test_avx2_blocks_only_take_short_contractions(simd_limit):
    """With AVX2 only, FAST chains take the kernel up to POINTWISE_AVX2_MAX_K input channels (beyond, OpenBLAS's
    GEMM and a pass are faster); with AVX-512 at any K."""
    x = np.zeros((1, fold.POINTWISE_AVX2_MAX_K + 1, 16, 16), np.float32)
    w = np.zeros((8, x.shape[1], 1, 1), np.float32)
    simd_limit(1)
    assert fold._pointwise_applies(x[:, 1:], w[:, 1:], (1, 1), (0, 0), 1)
    assert not fold._pointwise_applies(x, w, (1, 1), (0, 0), 1)
    simd_limit(0)
    assert not fold._pointwise_applies(x[:, 1:], w[:, 1:], (1, 1), (0, 0), 1)
    simd_limit(2)
    if fold.simd_level() == 2:
        assert fold._pointwise_applies(x, w, (1, 1), (0, 0), 1)


@pytest.mark.parametrize("seed", range(6))
def test_the_epilogue_is_the_separate_passes_rounding(seed):
    """y = s * a + b then NumPy's maximum(y, 0), each a float32 rounding, on the kernel's own sums s: every
    block shape (channel counts not a multiple of 8, pixel tails of every vector) and -0 / NaN."""
    rng = np.random.default_rng(10 + seed)
    x, w = _case(rng)
    x[0, 0, 0, : min(3, x.shape[3])] = [np.nan, 0.0, -0.0][: min(3, x.shape[3])]
    a, b = (rng.standard_normal(w.shape[0]).astype(np.float32) for _ in range(2))
    b[0] = -0.0
    s = fold.POINTWISE_KERNEL(x, w, None, None, False, 1)
    for scale, bias, relu in ((a, b, True), (a, None, False), (None, b, True), (None, None, True), (a, b, False)):
        want = s.copy()
        if scale is not None:
            want *= scale.reshape(-1, 1, 1)
        if bias is not None:
            want += bias.reshape(-1, 1, 1)
        if relu:
            want = np.maximum(want, np.float32(0))
        got = fold.POINTWISE_KERNEL(x, w, scale, bias, relu, 1)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_bytes_do_not_depend_on_the_thread_count():
    rng = np.random.default_rng(7)
    x, w = _case(rng, n=3, k=37, o=19, p=1000)
    a = rng.standard_normal(19).astype(np.float32)
    outs = [fold.POINTWISE_KERNEL(x, w, a, a, True, t) for t in (1, 2, 3, 5)]
    for y in outs[1:]:
        np.testing.assert_array_equal(y.view(np.uint32), outs[0].view(np.uint32))


def test_into_is_used_only_when_it_fits_and_overlaps_nothing():
    rng = np.random.default_rng(8)
    x, w = _case(rng, n=2, k=5, o=5, p=200)
    into = np.empty((2, 5, 1, 200), np.float32)
    assert fold.POINTWISE_KERNEL(x, w, None, None, False, 1, into) is into
    assert fold.POINTWISE_KERNEL(x, w, None, None, False, 1, x) is not x  # the input itself
    assert fold.POINTWISE_KERNEL(x, w, None, None, False, 1, into[:, :4]) is not into


def test_bad_arguments_are_refused():
    rng = np.random.default_rng(9)
    x, w = _case(rng, n=1, k=4, o=3, p=20)
    with pytest.raises(ValueError, match="weight"):
        fold.POINTWISE_KERNEL(x, w[:, :3], None, None, False, 1)
    with pytest.raises(ValueError, match="one value per output channel"):
        fold.POINTWISE_KERNEL(x, w, np.ones(2, np.float32), None, False, 1)
    with pytest.raises(TypeError, match="float32"):
        fold.POINTWISE_KERNEL(x.astype(np.float64), w, None, None, False, 1)


POINTWISE_NET = '''
name: "pointwise"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 5 dim: 17 dim: 23 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 11 kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 }
                            bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "down" type: "Convolution" bottom: "conv" top: "down"
        convolution_param { num_output: 9 kernel_size: 1 stride: 2 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "bn2" type: "BatchNorm" bottom: "down" top: "down" }
layer { name: "c3" type: "Convolution" bottom: "down" top: "c3"
        convolution_param { num_output: 9 kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "bn3" type: "BatchNorm" bottom: "c3" top: "c3" }
layer { name: "sum" type: "Eltwise" bottom: "down" bottom: "c3" top: "sum" }
layer { name: "sum_relu" type: "ReLU" bottom: "sum" top: "sum" }
'''


def test_fast_chains_run_it_and_stay_close_to_caffe(tmp_path, monkeypatch):
    """A 1x1 convolution + BatchNorm / Scale (+ ReLU) chain in a float net runs in the kernel, strided and before
    a residual sum too (maps over POINTWISE_MIN_PIXELS); the exact and unfolded nets keep Caffe's arithmetic."""
    monkeypatch.setattr(fold, "POINTWISE_MIN_PIXELS", 16)
    calls = []
    real = fold.POINTWISE_KERNEL
    monkeypatch.setattr(fold, "POINTWISE_KERNEL", lambda *a: calls.append(a[0].shape) or real(*a))
    x = np.random.default_rng(0).normal(size=(2, 5, 17, 23)).astype(np.float32)
    blobs = ["conv", "down", "c3", "sum"]
    got = {k: v.copy() for k, v in _net(tmp_path, "fast", POINTWISE_NET).forward(data=x, blobs=blobs).items()}
    assert calls == [(2, 5, 17, 23), (2, 11, 9, 12), (2, 9, 9, 12)]
    off = _net(tmp_path, "off", POINTWISE_NET).forward(data=x, blobs=blobs)
    for k in blobs:
        np.testing.assert_allclose(got[k], off[k], rtol=0, atol=2e-6 * max(1.0, np.abs(off[k]).max()))
    calls.clear()
    exact = _net(tmp_path, "exact", POINTWISE_NET).forward(data=x, blobs=blobs)
    assert calls == []
    for k in blobs:
        np.testing.assert_array_equal(exact[k], off[k])


def test_small_maps_keep_the_gemm(tmp_path, monkeypatch):
    calls = []
    real = fold.POINTWISE_KERNEL
    monkeypatch.setattr(fold, "POINTWISE_KERNEL", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setattr(threads, "workers", lambda: 1)
    _net(tmp_path, "fast", POINTWISE_NET).forward(data=np.zeros((2, 5, 17, 23), np.float32))
    assert calls == [(2, 5, 17, 23)]  # 391 pixels; the 9 x 12 maps (108) stay below POINTWISE_MIN_PIXELS


def test_sums_are_the_direct_kernels_bytes():
    """One fused multiply-add per input channel in order, stored + 0 (so a -0 sum is +0), then + bias: the
    bytes of the direct kernel (conv_plan), itself numpy's OpenBLAS GEMM's where K is not split."""
    from amct_caffe import _kernels

    rng = np.random.default_rng(11)
    for _ in range(10):
        x, w = _case(rng, k=int(rng.integers(1, 200)))
        x[..., :2] = 0.0
        w[:, :1] = -0.0
        bias = rng.standard_normal(w.shape[0]).astype(np.float32)
        for b in (None, bias):
            got = fold.POINTWISE_KERNEL(x, w, None, b, False, 1)
            want = _kernels.direct_conv2d(x, w, [1, 1], [0, 0], [1, 1], [1, x.shape[3]], 1, b)
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
