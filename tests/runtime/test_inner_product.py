"""InnerProduct against an explicit sum over the flattened input."""

import numpy as np
import pytest
from google.protobuf import text_format

from amct_caffe.errors import GraphError
from amct_caffe.io.schema import caffe_pb
from amct_caffe.runtime.blob import Blob
from amct_caffe.runtime.layers.inner_product import InnerProduct, InnerProductLayer

RNG = np.random.default_rng(5)


def ref_ip(x, w, b, axis, transpose):
    """y[m, j] = b[j] + sum_k X[m, k] * W[j, k]   (W[k, j] when transpose)."""
    lead = x.shape[:axis]
    xm = x.reshape(int(np.prod(lead)), -1).astype(np.float64)
    y = np.zeros((xm.shape[0], w.shape[1] if transpose else w.shape[0]))
    for m in range(xm.shape[0]):
        for j in range(y.shape[1]):
            y[m, j] = sum(xm[m, k] * (w[k, j] if transpose else w[j, k]) for k in range(xm.shape[1]))
            y[m, j] += 0.0 if b is None else b[j]
    return y.reshape(lead + (y.shape[1],))


def make(text, shape):
    lp = caffe_pb().LayerParameter()
    text_format.Parse('name: "fc" type: "InnerProduct" bottom: "x" top: "y" '
                      'inner_product_param { ' + text + " }", lp)
    lyr = InnerProductLayer(lp)
    lyr.blobs = [Blob(data=RNG.standard_normal(s).astype(np.float32)) for s in lyr.param_shapes([shape])]
    return lyr


@pytest.mark.parametrize("shape,axis,transpose,bias", [
    ((4, 3, 2, 2), 1, False, True),
    ((4, 3, 2, 2), 1, True, True),
    ((2, 3, 5), 2, False, False),   # per-position fully connected over the last axis
    ((2, 3, 5), -1, True, True),     # negative axis
    ((6, 7), 0, False, True),        # axis 0: the whole blob is one sample
])
def test_layer_matches_sum(shape, axis, transpose, bias):
    lyr = make(f"num_output: 3 axis: {axis} transpose: {str(transpose).lower()} "
               f"bias_term: {str(bias).lower()}", shape)
    x = RNG.standard_normal(shape).astype(np.float32)
    k = int(np.prod(shape[(axis % len(shape)):]))
    assert lyr.blobs[0].data.shape == ((k, 3) if transpose else (3, k))
    assert len(lyr.blobs) == (2 if bias else 1)
    (top,) = lyr.reshape([shape])
    (y,) = lyr.forward([x])
    assert y.shape == top
    ref = ref_ip(x, lyr.blobs[0].data, lyr.blobs[1].data if bias else None, axis % len(shape), transpose)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_function_defaults_are_caffe_defaults():
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    w = RNG.standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(InnerProduct(x, w), x @ w.T, rtol=1e-6)


def test_input_size_change_is_rejected():
    lyr = make("num_output: 3", (2, 4, 2))
    with pytest.raises(GraphError, match="does not match"):
        lyr.reshape([(2, 5, 2)])


def test_num_output_required():
    lp = caffe_pb().LayerParameter()
    text_format.Parse('name: "fc" type: "InnerProduct" bottom: "x" top: "y"', lp)
    with pytest.raises(GraphError, match="num_output"):
        InnerProductLayer(lp)
