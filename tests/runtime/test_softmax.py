"""Softmax against a float64 loop reference and on golden blobs."""

import itertools

import numpy as np
import pytest
from google.protobuf import text_format

from amct_caffe.errors import GraphError
from amct_caffe.io.schema import caffe_pb
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
