"""libm_float.tanhf and expf are glibc's, bit for bit (tanhf where glibc still has fdlibm's float tanhf)."""

from __future__ import annotations

import ctypes
import platform

import numpy as np
import pytest

from amct_caffe.runtime.layers.libm_float import EXPF_KERNEL, TANHF_KERNEL, expf, expf_reference, tanhf, tanhf_reference
from amct_caffe.runtime.layers.libm_float import caffe_sigmoid


def _glibc_tanhf():
    lib, version = platform.libc_ver()
    if lib != "glibc" or tuple(int(v) for v in version.split(".")[:2]) >= (2, 41):
        pytest.skip(f"{lib} {version}: not the fdlibm tanhf (glibc 2.41 made it correctly rounded)")
    libm = ctypes.CDLL("libm.so.6")
    libm.tanhf.restype = ctypes.c_float
    libm.tanhf.argtypes = [ctypes.c_float]
    return np.vectorize(lambda v: libm.tanhf(float(v)), otypes=[np.float32])


def test_tanhf_is_glibcs_bit_for_bit():
    ref = _glibc_tanhf()
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(20000) * s for s in (1e-6, 0.05, 0.5, 1, 4, 12, 40)]).astype(np.float32)
    edges = [0.0, -0.0, 1e-20, -1e-20, 1.0, -1.0, 22.0, -22.0, np.inf, -np.inf, np.nan, 0.34657, 1.0397, 88.0]
    x = np.concatenate([x, np.float32(edges)])
    with np.errstate(over="ignore"):
        want = ref(x)
    np.testing.assert_array_equal(tanhf(x).view(np.int32), want.view(np.int32))


@pytest.mark.skipif(TANHF_KERNEL is None, reason="the compiled kernels are not built")
def test_tanhf_kernel_is_the_numpy_steps_on_any_machine():
    """The C++ port equals the NumPy reference on every 4099th float32 bit pattern (NaN, infinities,
    subnormals, both signs) and on a large array cut between 1 and 3 workers: no libm involved."""
    patterns = np.arange(0, 2 ** 32, 4099, dtype=np.uint64).astype(np.uint32).view(np.float32)
    got, want = TANHF_KERNEL(patterns, 1), tanhf_reference(patterns)
    same = (got.view(np.int32) == want.view(np.int32)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), patterns[~same][:5]
    x = np.random.default_rng(4).standard_normal(300_000).astype(np.float32) * 3
    one = TANHF_KERNEL(x, 1)
    np.testing.assert_array_equal(one.view(np.int32), tanhf_reference(x).view(np.int32))
    for workers in (2, 3):
        np.testing.assert_array_equal(TANHF_KERNEL(x, workers).view(np.int32), one.view(np.int32))


def test_tanhf_keeps_shape_and_dtype():
    x = np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4)
    y = tanhf(x)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, np.tanh(x), rtol=0, atol=2e-7)


def test_expf_keeps_shape_and_dtype():
    """A 0-d input stays 0-d (as expf_reference), an n-d one keeps its shape."""
    assert expf(np.float32(1.0)).shape == () and expf(np.float32(1.0)).dtype == np.float32
    x = np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4)
    assert expf(x).shape == x.shape
    np.testing.assert_array_equal(expf(np.float32(0.5)), expf_reference(np.float32(0.5)))


def _glibc_expf():
    lib, version = platform.libc_ver()
    if lib != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 27):
        pytest.skip(f"{lib} {version}: not the expf of e_expf.c (glibc 2.27 on)")
    libm = ctypes.CDLL("libm.so.6")
    libm.expf.restype = ctypes.c_float
    libm.expf.argtypes = [ctypes.c_float]
    return np.vectorize(lambda v: libm.expf(float(v)), otypes=[np.float32])


def test_expf_is_glibcs_bit_for_bit():
    """Where float64 exp rounded to float32 is an ulp off glibc's expf (6 in 1e4 values), expf is not."""
    ref = _glibc_expf()
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.standard_normal(40000) * s for s in (1e-3, 0.5, 2, 8, 40)]
                       + [rng.uniform(-110, 95, 40000)]).astype(np.float32)
    edges = [0.0, -0.0, 1e-40, -1e-40, 88.72283, 88.72284, -87.34, -103.97207, -103.97208, 1e30, -1e30,
             np.inf, -np.inf, np.nan]
    x = np.concatenate([x, np.float32(edges)])
    with np.errstate(over="ignore"):
        want = ref(x)
        assert np.sum(np.exp(x.astype(np.float64)).astype(np.float32) != want) > 20  # the values that tell
    for fn in (expf, expf_reference):
        got = fn(x)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_array_equal(got[~np.isnan(got)].view(np.int32), want[~np.isnan(want)].view(np.int32))


def _same_bits(got, want):
    """Per element: the same bits, or both NaN."""
    return (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))


_EXPF_EDGES = np.float32([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 88.0, 88.72283, 88.72284, -87.33655,
                          -103.27893, -103.278931, -103.972076, -103.97208, -104.0, 1e-45, -1e-45, 1e-38, 3e38,
                          -3e38, 0.5 * np.log(2) / 32, np.float32(np.log(2) / 64) * 3])
# the only two float32 inputs where glibc's FMA build rounds otherwise than the same steps unfused (the
# NumPy steps, expf_reference): 0x1.04845ep+5 and -0x1.f8cbb2p+5 (an exhaustive run over all 2^32)
_EXPF_FMA_SHOWS = np.float32([float.fromhex("0x1.04845ep+5"), -float.fromhex("0x1.f8cbb2p+5")])


@pytest.mark.skipif(EXPF_KERNEL is None, reason="the compiled kernels are not built")
def test_expf_kernel_is_libms_on_every_257th_float():
    """The C++ port against this machine's libm expf on 16.7 million float32 bit patterns spread over the
    whole range (both signs, subnormal inputs and results, overflow, underflow, infinities, NaNs: checked
    against all 2^32 once, see csrc/src/libm_float.cpp) and the thresholds, threaded and not."""
    from amct_caffe._kernels import libm_expf

    from amct_caffe._kernels import depthwise_has_fma

    _glibc_expf()  # (skips where libm is not glibc's e_expf.c)
    # without FMA glibc runs its unfused build, which differs from the port at _EXPF_FMA_SHOWS
    fma_shows = _EXPF_FMA_SHOWS if depthwise_has_fma() else np.empty(0, np.float32)
    x = np.concatenate([np.arange(0, 2 ** 32, 257, dtype=np.uint64).astype(np.uint32).view(np.float32),
                        _EXPF_EDGES, fma_shows, np.nextafter(_EXPF_EDGES, np.float32(np.inf)),
                        np.nextafter(_EXPF_EDGES, np.float32(-np.inf))])
    want = libm_expf(x)
    assert (want.view(np.uint32) == 1).any() and np.isinf(want).any() and (want == 0).any()  # the edges are in
    for threads in (1, 2):
        same = _same_bits(EXPF_KERNEL(x, threads), want)
        assert same.all(), (x[~same][:5], EXPF_KERNEL(x, 1)[~same][:5], want[~same][:5])


@pytest.mark.skipif(EXPF_KERNEL is None, reason="the compiled kernels are not built")
def test_expf_kernel_is_the_numpy_steps_on_any_machine():
    """The C++ port (FMA-contracted as glibc's x86-64 FMA build) equals the NumPy steps (no FMA) on every
    4099th bit pattern and on the values of a softmax (x - max <= 0): no libm involved."""
    patterns = np.arange(0, 2 ** 32, 4099, dtype=np.uint64).astype(np.uint32).view(np.float32)
    rng = np.random.default_rng(5)
    x = np.concatenate([patterns, _EXPF_EDGES, -np.abs(rng.standard_normal(200_000) * 6).astype(np.float32)])
    same = _same_bits(EXPF_KERNEL(x, 1), expf_reference(x))
    assert same.all(), x[~same][:5]
    # where the fused steps show, the kernel takes glibc's FMA build's values (an ulp above the unfused ones)
    np.testing.assert_array_equal(EXPF_KERNEL(_EXPF_FMA_SHOWS, 1).view(np.int32),
                                  expf_reference(_EXPF_FMA_SHOWS).view(np.int32) + 1)


def test_lstm_sigmoid_takes_glibcs_expf():
    """lstm_unit_layer.cpp's sigmoid on gate inputs of samples/recurrent/lstm_mnist (t = 3, 4 of the first
    held-out batch) where float64 exp rounds the other way: with it, the executor's LSTM went an ulp off
    Caffe's at t = 3, and 1e-6 off by t = 27."""
    ref = _glibc_expf()
    x = np.float32([0.037025865, 0.11502473, -0.2429132, 0.048775673, -0.84987897])
    e64 = np.exp(-x.astype(np.float64)).astype(np.float32)
    want = (1.0 / (1.0 + ref(-x).astype(np.float64))).astype(np.float32)
    assert np.all(e64 != ref(-x))
    assert np.any((1.0 / (1.0 + e64.astype(np.float64))).astype(np.float32) != want)
    np.testing.assert_array_equal(caffe_sigmoid(x).view(np.int32), want.view(np.int32))
