"""AVE pooling in C++ (csrc/src/conv_cols.cpp ave_pool2d) gives the NumPy path's bytes, which are Caffe's order."""

import numpy as np
import pytest

from amct_caffe.runtime.layers.pooling import POOL_KERNEL, Pooling

pytestmark = pytest.mark.skipif(POOL_KERNEL is None, reason="the C++ extension is not built")


def test_native_ave_pooling_has_the_numpy_paths_bytes():
    rng = np.random.default_rng(0)
    cases = 0
    for _ in range(1500):
        h, w = (int(v) for v in rng.integers(1, 20, 2))
        kh, kw = (int(v) for v in rng.integers(1, 8, 2))
        sh, sw = (int(v) for v in rng.integers(1, 5, 2))
        ph, pw = int(rng.integers(0, kh)), int(rng.integers(0, kw))
        x = (rng.standard_normal((2, 3, h, w)) * rng.choice([1.0, 1000.0])).astype(np.float32)
        x[0, 0] = -0.0 if rng.random() < 0.2 else x[0, 0]  # an all -0 plane sums to +0, as in Caffe
        if rng.random() < 0.1:
            x[0, 1, 0, 0] = np.nan
        glob = bool(rng.random() < 0.15)
        try:
            want = Pooling(x, pool="AVE", kernel=(kh, kw), stride=(sh, sw), pad=(ph, pw), global_pooling=glob,
                           native=False)
        except ValueError:
            continue
        got = Pooling(x, pool="AVE", kernel=(kh, kw), stride=(sh, sw), pad=(ph, pw), global_pooling=glob)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
        cases += 1
    assert cases > 1000


def test_ave_pooling_sums_in_caffes_order():
    """A 2x2 window of values whose sum depends on the order: ((a + b) + c) + d, from +0, then / 4."""
    x = np.array([[[[1e8, 1.0], [-1e8, 1.0]]]], np.float32)
    caffe = ((np.float32(0) + x[0, 0, 0, 0] + x[0, 0, 0, 1]) + x[0, 0, 1, 0]) + x[0, 0, 1, 1]
    for native in (True, False):
        assert Pooling(x, pool="AVE", kernel=(2, 2), stride=(2, 2), native=native)[0, 0, 0, 0] == caffe / 4
        assert Pooling(x, pool="AVE", global_pooling=True, native=native)[0, 0, 0, 0] == caffe / 4
    zeros = np.full((1, 1, 3, 3), -0.0, np.float32)
    assert not np.signbit(Pooling(zeros, pool="AVE", global_pooling=True)[0, 0, 0, 0])
