"""Winograd F(m x m, 3 x 3) (runtime/layers/winograd.py) against its float64 formula and the direct
convolution, and its use by FAST chains only."""

import numpy as np
import pytest

from amct_caffe.runtime import threads
from amct_caffe.runtime.layers import winograd
from amct_caffe.runtime.layers.conv import Convolution

from .test_fold import _net, _x

pytestmark = pytest.mark.skipif(not winograd.available(), reason="amct_caffe._kernels not built")


def _case(seed):
    rng = np.random.default_rng(seed)
    n, c, o = (int(v) for v in rng.integers(1, 6, 3))
    h, w = (int(v) for v in rng.integers(3, 20, 2))
    pad = tuple(int(v) for v in rng.integers(0, 3, 2))
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    g = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
    return x, g, pad


@pytest.mark.parametrize("m", [2, 4])
def test_transformed_weights_are_g_g_gt_of_each_kernel(m):
    g_matrix = winograd.MATRICES[m][1]
    weight = np.random.default_rng(m).standard_normal((5, 7, 3, 3)).astype(np.float32)
    u = winograd.transform_weights(weight, m)
    assert u.shape == ((m + 2) ** 2, 5, 7) and u.dtype == np.float32 and u.flags.c_contiguous
    for o in range(5):
        for c in range(7):
            want = g_matrix @ weight[o, c].astype(np.float64) @ g_matrix.T
            np.testing.assert_allclose(u[:, o, c], want.ravel(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("seed", range(8))
def test_kernels_follow_the_formula_and_give_the_convolution(m, seed):
    x, g, pad = _case(seed)
    got = winograd.conv3x3(x, winograd.transform_weights(g, m), m, pad)
    ref = winograd.winograd_reference(x, g, m, pad)
    direct = Convolution(x, g, pad=pad)
    assert got.shape == direct.shape == ref.shape
    np.testing.assert_allclose(ref, direct, rtol=0, atol=1e-5 * max(1.0, np.abs(direct).max()))
    np.testing.assert_allclose(got, ref, rtol=0, atol=(2e-6 if m == 2 else 2e-5) * max(1.0, np.abs(ref).max()))


def test_epilogue_is_the_affine_map_then_relu():
    x, g, pad = _case(3)
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal(g.shape[0]).astype(np.float32) for _ in range(2))
    u = winograd.transform_weights(g, 4)
    y = winograd.conv3x3(x, u, 4, pad)
    want = np.maximum(y * a.reshape(-1, 1, 1) + b.reshape(-1, 1, 1), 0)
    np.testing.assert_array_equal(winograd.conv3x3(x, u, 4, pad, a, b, relu=True), want)


def test_bytes_do_not_depend_on_the_thread_count(monkeypatch):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 16, 14, 14)).astype(np.float32)
    u = winograd.transform_weights(rng.standard_normal((8, 16, 3, 3)).astype(np.float32), 4)
    monkeypatch.setattr(winograd, "THREADED_MACS", 0)
    outs = []
    for n in (1, 2, 3):
        monkeypatch.setattr(threads, "workers", lambda n=n: n)
        outs.append(winograd.conv3x3(x, u, 4, (1, 1)))
    for y in outs[1:]:
        np.testing.assert_array_equal(y.view(np.uint32), outs[0].view(np.uint32))


def test_tile_size_is_4_on_large_maps_and_wherever_the_transforms_are_vectors(monkeypatch, simd_limit):
    from amct_caffe import _kernels

    assert winograd.tile_size(56, 56) == winograd.tile_size(28, 17) == 4
    small = (winograd.tile_size(14, 14), winograd.tile_size(7, 7), winograd.tile_size(40, 16))
    assert small == ((4, 4, 4) if _kernels.winograd_simd_level() >= 2 else (2, 2, 2))
    simd_limit(0)
    assert winograd.tile_size(14, 14) == winograd.tile_size(7, 7) == winograd.tile_size(40, 16) == 2


def test_fast_chains_use_it_and_notice_changed_weights(tmp_path, monkeypatch):
    calls = []
    real = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast, off, exact = _net(tmp_path, "fast"), _net(tmp_path, "off"), _net(tmp_path, "exact")
    x = _x()
    for _ in range(2):  # the second time, after the weights were written in place
        want = off.forward(data=x, blobs=["conv"])["conv"].copy()
        got = fast.forward(data=x, blobs=["conv"])["conv"]
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * max(1.0, np.abs(want).max()))
        np.testing.assert_array_equal(exact.forward(data=x, blobs=["conv"])["conv"], want)
        for net in (fast, off, exact):
            net.params["conv"][0].data[0] *= -2
    assert len(calls) == 2  # FAST only; EXACT and unfolded nets keep Caffe's arithmetic


def _transforms(x, mm, pad, m, a, b, relu):
    from amct_caffe import _kernels

    cols = mm.shape[2]
    v = np.full(((m + 2) ** 2, x.shape[1], cols), np.nan, np.float32)
    _kernels.winograd_input(x, v, list(pad), m, 1)
    return v, _kernels.winograd_output(mm, list(x.shape), list(pad), m, a, b, relu, 1)


@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("m", [2, 4])
def test_vector_transforms_give_the_portable_bytes(m, level, simd_limit):
    """The AVX2 (eight tiles per vector) and AVX-512 transforms (sixteen; on maps of few tiles a row gathered
    across rows and images) against the one-tile loops: maps narrower and wider than a vector of tiles,
    several images, every padding, NaN and -0 through the ReLU, with and without the map. (One NaN: where two
    different NaNs meet, which one an addition keeps depends on the order the compiler gave its operands.)"""
    from amct_caffe import _kernels

    simd_limit(level)
    if _kernels.winograd_simd_level() < level:
        pytest.skip("the CPU lacks this vector width")
    rng = np.random.default_rng(m)
    for case in range(60):
        n, c, o = (int(v) for v in rng.integers(1, 4, 3))
        h, w = int(rng.integers(1, 40)), int(rng.integers(1, 150))
        pad = tuple(int(v) for v in rng.integers(0, 3, 2))
        ho, wo = h + 2 * pad[0] - 2, w + 2 * pad[1] - 2
        if ho <= 0 or wo <= 0:
            continue
        x = rng.standard_normal((n, c, h, w)).astype(np.float32)
        x.flat[rng.integers(0, x.size, 3)] = [np.nan, -0.0, np.inf]
        cols = n * -(-ho // m) * -(-wo // m)
        mm = rng.standard_normal(((m + 2) ** 2, o, cols)).astype(np.float32)
        mm[0, 0, :2] = [np.nan, -0.0]
        a = rng.standard_normal(o).astype(np.float32) if case % 3 else None
        b = rng.standard_normal(o).astype(np.float32) if case % 4 else None
        got = []
        for limit in (level, 0):
            simd_limit(limit)
            got.append(_transforms(x, mm, pad, m, a, b, relu=bool(case % 2)))
        for fast, portable in zip(*got, strict=True):
            np.testing.assert_array_equal(fast.view(np.uint32), portable.view(np.uint32))


@pytest.mark.parametrize("m", [2, 4])
def test_a_batch_in_chunks_of_images_gives_the_convolution_into_the_given_array(m, monkeypatch):
    """... and into a fresh array when the given one is read-only."""
    monkeypatch.setattr(winograd, "CHUNK_BYTES", 1)  # one image at a time
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 3, 11, 13)).astype(np.float32)
    g = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    a, b = (rng.standard_normal(4).astype(np.float32) for _ in range(2))
    into = np.full((5, 4, 11, 13), np.nan, np.float32)
    got = winograd.conv3x3(x, winograd.transform_weights(g, m), m, (1, 1), a, b, True, into)
    assert got is into
    ref = np.maximum(winograd.winograd_reference(x, g, m, (1, 1)) * a.reshape(-1, 1, 1) + b.reshape(-1, 1, 1), 0)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * max(1.0, np.abs(ref).max()))
    want = got.copy()
    into[...] = np.nan
    into.flags.writeable = False
    fresh = winograd.conv3x3(x, winograd.transform_weights(g, m), m, (1, 1), a, b, True, into)
    assert fresh is not into and np.isnan(into).all()
    np.testing.assert_array_equal(fresh, want)
