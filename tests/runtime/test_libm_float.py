"""libm_float.tanhf is glibc's tanhf, bit for bit, where glibc still has fdlibm's float tanhf."""

from __future__ import annotations

import ctypes
import platform

import numpy as np
import pytest

from amct_caffe.runtime.layers.libm_float import tanhf


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


def test_tanhf_keeps_shape_and_dtype():
    x = np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4)
    y = tanhf(x)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, np.tanh(x), rtol=0, atol=2e-7)
