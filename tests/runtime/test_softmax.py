"""Softmax against a float64 loop reference and on golden blobs."""

import itertools

import numpy as np
import pytest
from google.protobuf import text_format

from amct_caffe.errors import GraphError
from amct_caffe.io.schema import caffe_pb
from amct_caffe.runtime.layers import softmax
from amct_caffe.runtime.layers.softmax import Softmax
from amct_caffe.runtime.registry import layer_class
from tests.golden import CASES_BY_NAME, compare

RNG = np.random.default_rng(3)


def layer(axis=None):
    param = "" if axis is None else f"softmax_param {{ axis: {axis} }}"
    lp = text_format.Parse(f'name: "prob" type: "Softmax" bottom: "x" top: "y" {param}',
                           caffe_pb().LayerParameter())
    return layer_class("Softmax")(lp)


def reference(x, axis):
    """One softmax per index of the other axes, in float64."""
    x64 = np.moveaxis(x.astype(np.float64), axis, -1)
    out = np.empty_like(x64)
    for idx in itertools.product(*(range(d) for d in x64.shape[:-1])):
        e = np.exp(x64[idx] - x64[idx].max())
        out[idx] = e / e.sum()
    return np.moveaxis(out, -1, axis)


@pytest.mark.parametrize("axis", [None, 0, 1, 2, 3, -1, -3])
def test_softmax_axes(axis):
    x = (RNG.standard_normal((2, 3, 4, 5)) * 4).astype(np.float32)
    lay = layer(axis)
    assert lay.reshape([x.shape]) == [x.shape]
    (y,) = lay.forward([x])
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, reference(x, 1 if axis is None else axis), rtol=2e-6, atol=1e-7)


def test_softmax_large_logits_do_not_overflow():
    x = np.array([[1000.0, 999.0, -1000.0], [88.0, 89.0, 90.0]], np.float32)
    y = Softmax(x, axis=1)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, reference(x, 1), rtol=1e-6)
    np.testing.assert_allclose(y.sum(1), 1, rtol=1e-6)


def test_softmax_bad_axis():
    with pytest.raises(GraphError, match="out of range"):
        layer(4).reshape([(2, 3, 4, 5)])


@pytest.mark.parametrize("case, bottom, top", [("hyperlpr_mininet_ssd", "ssd0_reshape6", "softmax0"),
                                               ("lenet_mnist", "ip2", "prob")])
def test_softmax_golden(case, bottom, top):
    c = CASES_BY_NAME[case]
    if not c.golden.exists():
        pytest.skip(f"{c.golden} missing")
    z = np.load(c.golden)
    axis = 2 if case.startswith("hyperlpr") else None
    lay = layer(axis)
    x = z[f"blob:{bottom}"]
    lay.reshape([x.shape])
    err, allowed = compare(top, lay.forward([x])[0], z)
    assert err <= 2e-7 <= allowed


@pytest.mark.parametrize("n", range(1, 9))
def test_short_last_axis_path_gives_the_reference_bytes(n):
    """The layer's slice-wise path for a last axis of at most 7 values is :func:`Softmax` bit for bit
    (numpy sums such an axis value after value); 8 values keep the reference."""
    from amct_caffe.runtime.layers.softmax import SHORT_AXIS, softmax_short_last_axis

    x = (RNG.standard_normal((2, 37, n)) * 8).astype(np.float32)
    x[0, 0] = np.inf
    x[1, 1, 0] = -np.inf
    x[1, 2, 0] = np.nan
    lay = layer(-1)
    lay.reshape([x.shape])
    with np.errstate(invalid="ignore"):  # inf - inf, as in Caffe
        want = Softmax(x, axis=-1)
        if n <= SHORT_AXIS:
            np.testing.assert_array_equal(softmax_short_last_axis(x).view(np.uint32), want.view(np.uint32))
        np.testing.assert_array_equal(lay.forward([x])[0].view(np.uint32), want.view(np.uint32))


def _order_sensitive(shape, axis, rng):
    """Logits whose exps sum to different floats in different orders: a dominant 1 and many 2^-24-sized
    terms (exp(-16.6) ~ 6e-8), random elsewhere."""
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    moved = np.moveaxis(x, axis, 0)
    moved[1:] = np.where(rng.random(moved[1:].shape) < 0.5, np.float32(-16.6), moved[1:])
    moved[0] = 0
    return x


@pytest.mark.skipif(softmax.SOFTMAX_KERNEL is None, reason="the compiled kernels are not built")
@pytest.mark.parametrize("shape, axis", [((1, 2, 1, 1), 1), ((3, 5), 1), ((2, 7), -1), ((4, 3, 5, 6), 1),
                                         ((2, 9, 3, 4), 1), ((1, 20, 2, 1), 1), ((64, 10), 0), ((2, 3, 4, 5), 3),
                                         ((2, 3, 4, 5), 0), ((1, 4420, 2), 2), ((5, 1), 1), ((1, 130, 1, 3), 1)])
def test_kernel_gives_the_reference_bytes(shape, axis):
    """Where the sum is sequential (inner > 1, or < 8 values) the one-pass C++ softmax is softmax_reference
    bit for bit (its ufuncs: max, subtract, glibc's expf, NumPy's sum, divide), on sums whose order shows,
    with infinities and NaNs as Caffe has them; and the layer takes the kernel there."""
    rng = np.random.default_rng(len(shape) * 100 + shape[axis])
    x = _order_sensitive(shape, axis, rng)
    flat = x.reshape(-1)
    flat[rng.integers(0, flat.size, 3)] = [np.inf, -np.inf, np.nan]
    inner = int(np.prod(x.shape[axis % x.ndim + 1:]))
    assert softmax.sequential_sum(x.shape[axis], inner)
    with np.errstate(invalid="ignore"):
        want = softmax.softmax_reference(x, axis=axis)
        got = softmax.SOFTMAX_KERNEL(x, axis % x.ndim, 1)
        same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
        assert same.all() and np.isnan(got).any()
        np.testing.assert_array_equal(Softmax(x, axis=axis).view(np.uint32), got.view(np.uint32))
    x = _order_sensitive(shape, axis, rng)
    want = softmax.softmax_reference(x, axis=axis)
    np.testing.assert_array_equal(Softmax(x, axis=axis).view(np.uint32), want.view(np.uint32))
    np.testing.assert_allclose(want, reference(x, axis % x.ndim), rtol=2e-6, atol=1e-7)


def test_long_axis_with_nothing_after_it_sums_by_caffes_gemv(monkeypatch):
    """Eight or more values along an axis with nothing after it (a classifier's (N, classes)): each row's sum is
    Caffe's sgemv call through numpy's OpenBLAS (real Caffe's bytes: tests/test_real_caffe.py); without that
    library, NumPy's pairwise sum (the reference path). Both differ from the sequential sum here."""
    rng = np.random.default_rng(9)
    x = _order_sensitive((6, 40), 1, rng)
    assert not softmax.sequential_sum(40, 1)
    e = softmax.expf(x - x.max(axis=1, keepdims=True))
    sums = softmax.row_sums_as_gemv(e, softmax.gemm_config().threads)
    if sums is not None:
        np.testing.assert_array_equal(Softmax(x, axis=1).view(np.uint32), (e / sums[:, None]).view(np.uint32))
    monkeypatch.setattr(softmax, "row_sums_as_gemv", lambda rows, threads: None)
    got = Softmax(x, axis=1)
    np.testing.assert_array_equal(got.view(np.uint32), (e / e.sum(axis=1, keepdims=True)).view(np.uint32))
    sequential = e[:, :1].copy()
    for j in range(1, 40):
        sequential += e[:, j:j + 1]
    assert not np.array_equal(sequential, e.sum(axis=1, keepdims=True))  # (the case tells the orders apart)


@pytest.mark.skipif(softmax.SOFTMAX_KERNEL is None, reason="the compiled kernels are not built")
def test_kernel_threads_give_one_result():
    x = (RNG.standard_normal((40, 3, 50, 20)) * 5).astype(np.float32)
    one = softmax.SOFTMAX_KERNEL(x, 1, 1)
    for workers in (2, 3):
        np.testing.assert_array_equal(softmax.SOFTMAX_KERNEL(x, 1, workers).view(np.uint32), one.view(np.uint32))


def test_exp_is_glibcs_expf():
    """Softmax's exp is libm_float.expf (glibc's, as Caffe's std::exp(float)), not NumPy's float32 exp: on
    two channels, y0 = 1 / (1 + expf(x1 - x0)) when x0 is the max."""
    x = np.stack([np.zeros(20000, np.float32), -np.linspace(0.01, 12, 20000, dtype=np.float32)], axis=1)
    e = softmax.expf(x[:, 1])
    want = np.float32(1) / (np.float32(1) + e)
    np.testing.assert_array_equal(Softmax(x, axis=1)[:, 0].view(np.uint32), want.view(np.uint32))
    assert (np.exp(x[:, 1]) != e).any()  # (NumPy's own exp would be another result here)


def test_row_sums_from_cpp_are_the_ctypes_calls_sums(monkeypatch):
    """The per-row cblas_sgemv calls made in one C++ loop (SSD's thousands of prior rows) against the same calls
    made one by one through ctypes: bit for bit, for widths across OpenBLAS's kernel blocks."""
    from amct_caffe.runtime.layers import cblas
    if cblas.ROW_SUMS_KERNEL is None or cblas._cblas("sgemv", "eeiifpipifpi") is None:
        pytest.skip("numpy's OpenBLAS or the compiled kernels are not available")
    rng = np.random.default_rng(4)
    for channels in (8, 9, 16, 21, 33, 64, 1000):
        rows = rng.standard_normal((257, channels)).astype(np.float32) ** 2
        fast = cblas.row_sums_as_gemv(rows, 2)
        monkeypatch.setattr(cblas, "ROW_SUMS_KERNEL", None)
        slow = cblas.row_sums_as_gemv(rows, 2)
        monkeypatch.undo()
        np.testing.assert_array_equal(fast.view(np.uint32), slow.view(np.uint32))
