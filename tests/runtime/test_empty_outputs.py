"""Zero output sizes: empty blobs where Caffe has them, refusals where Caffe aborts.

Caffe's Blob::Reshape accepts a zero dimension and refuses a negative one. A freshly built net
cannot run an empty top (Caffe never allocated it: ``Check failed: data_``), so the Net and the
strict shape inference refuse it; a net that ran on a larger input first keeps its memory, and a
smaller input then gives empty blobs that every layer downstream passes on (the shapes below are
those real Caffe gives, see tests/differential/test_differential.py::test_known_empty_blobs...).
"""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

from amct_caffe import io
from amct_caffe.errors import GraphError
from amct_caffe.io.graph_io import graph_from_net
from amct_caffe.io.schema import caffe_pb
from amct_caffe.runtime import TEST, Net
from amct_caffe.runtime.blob import Blob
from amct_caffe.runtime.layers import conv_grad
from amct_caffe.runtime.layers.conv import Convolution, ConvolutionLayer, Deconvolution, conv_out_size
from amct_caffe.runtime.layers.pooling import Pooling, PoolingLayer
from amct_caffe.runtime.shapes import infer_shapes

RNG = np.random.default_rng(3)
INPUT = ('layer {{ name: "data" type: "Input" top: "data" '
         'input_param {{ shape {{ dim: 2 dim: 3 dim: {h} dim: {h} }} }} }}\n')
CHAIN = (
    'layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
    'convolution_param { num_output: 4 kernel_size: 6 } }\n'
    'layer { name: "r" type: "ReLU" bottom: "c" top: "c" }\n'
    'layer { name: "p" type: "Pooling" bottom: "c" top: "p" top: "m" '
    'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n'
    'layer { name: "c2" type: "Convolution" bottom: "p" top: "c2" '
    'convolution_param { num_output: 2 kernel_size: 1 } }\n'
    'layer { name: "d" type: "Deconvolution" bottom: "c2" top: "d" '
    'convolution_param { num_output: 2 kernel_size: 2 stride: 2 } }\n'
    'layer { name: "a" type: "Pooling" bottom: "d" top: "a" pooling_param { pool: AVE kernel_size: 1 } }\n')
# What real Caffe gives for CHAIN on 8x8 and then 5x5 inputs (the 6x6 kernel leaves 0x0 of 5x5).
CAFFE_SHAPES_8 = {"data": (2, 3, 8, 8), "c": (2, 4, 3, 3), "p": (2, 4, 2, 2), "m": (2, 4, 2, 2),
                  "c2": (2, 2, 2, 2), "d": (2, 2, 4, 4), "a": (2, 2, 4, 4)}
CAFFE_SHAPES_5 = {"data": (2, 3, 5, 5), "c": (2, 4, 0, 0), "p": (2, 4, 0, 0), "m": (2, 4, 0, 0),
                  "c2": (2, 2, 0, 0), "d": (2, 2, 0, 0), "a": (2, 2, 0, 0)}


def _layer(cls, text, ltype):
    lp = text_format.Parse(f'name: "l" type: "{ltype}" bottom: "x" top: "y" {text}', caffe_pb().LayerParameter())
    return cls(lp)


def _net(h: int, layers: str = CHAIN) -> Net:
    net = io.parse_prototxt_text('name: "z"\n' + INPUT.format(h=h) + layers, "z.prototxt")
    return Net(net, phase=TEST)


def test_layers_give_an_empty_top_for_a_zero_output_size():
    conv = _layer(ConvolutionLayer, "convolution_param { num_output: 4 kernel_h: 6 kernel_w: 1 }", "Convolution")
    conv.blobs = [Blob(data=RNG.standard_normal(s).astype(np.float32)) for s in conv.param_shapes([(2, 3, 5, 5)])]
    assert conv.reshape([(2, 3, 5, 5)]) == [(2, 4, 0, 5)]
    (y,) = conv.forward([RNG.standard_normal((2, 3, 5, 5)).astype(np.float32)])
    assert y.shape == (2, 4, 0, 5) and y.dtype == np.float32
    pool = _layer(PoolingLayer, "pooling_param { pool: AVE kernel_size: 6 stride: 1 ceil_mode: false }", "Pooling")
    assert pool.reshape([(2, 3, 5, 5)]) == [(2, 3, 0, 0)]
    assert pool.forward([np.ones((2, 3, 5, 5), np.float32)])[0].shape == (2, 3, 0, 0)


def test_kernels_run_on_empty_arrays():
    x = RNG.standard_normal((2, 3, 5, 5)).astype(np.float32)
    assert Convolution(x, np.ones((4, 3, 6, 6), np.float32), np.ones(4, np.float32)).shape == (2, 4, 0, 0)
    y, mask = Pooling(x, kernel=(6, 6), stride=(1, 1), ceil_mode=False, return_mask=True)
    assert y.shape == mask.shape == (2, 3, 0, 0)
    # An empty bottom under a deconvolution whose kernel still reaches out: the top is the bias alone,
    # as Caffe's col2im zeroes the top before it scatters nothing into it.
    y = Deconvolution(np.zeros((2, 3, 0, 4), np.float32), np.ones((3, 2, 3, 3), np.float32),
                      np.array([1.5, -2.0], np.float32))
    assert y.shape == (2, 2, 2, 6)
    np.testing.assert_array_equal(y[:, 0], 1.5)
    np.testing.assert_array_equal(y[:, 1], -2.0)


@pytest.mark.parametrize("fn, what", [
    (lambda x: Convolution(x, np.ones((4, 3, 7, 7), np.float32)), "convolution output size"),
    (lambda x: Pooling(x, kernel=(7, 7), stride=(1, 1), ceil_mode=False), "pooling output size"),
])
def test_kernels_refuse_a_negative_output_size(fn, what):
    with pytest.raises(ValueError, match=what + r" \[-1, -1\] is negative"):
        fn(np.zeros((1, 3, 5, 5), np.float32))


def test_a_fresh_net_refuses_an_empty_top_naming_the_layer():
    with pytest.raises(GraphError, match=r"layer 'c' \(Convolution\): top 'c' would be empty \(shape \[2, 4, 0, 0\]\)"
                                         r".*Check failed: data_"):
        _net(5)
    pool = 'layer { name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param { pool: MAX kernel_size: 6 ' \
           'stride: 1 ceil_mode: false } }\n'
    with pytest.raises(GraphError, match=r"layer 'p' \(Pooling\): top 'p' would be empty"):
        _net(5, pool)


def test_strict_shape_inference_refuses_an_empty_top_and_plain_inference_keeps_it():
    text = 'name: "z"\n' + INPUT.format(h=5) + CHAIN
    graph = graph_from_net(io.parse_prototxt_text(text, "z.prototxt"), {})
    infer_shapes(graph)
    assert graph.blobs["c"].shape == (2, 4, 0, 0)
    with pytest.raises(GraphError, match=r"layer 'c' \(Convolution\): top 'c' would be empty"):
        infer_shapes(graph, strict=True, have_weights=False)


def test_a_net_reshaped_to_a_smaller_input_runs_empty_blobs_as_caffe_does():
    net = _net(8)
    net.forward(data=RNG.standard_normal((2, 3, 8, 8)).astype(np.float32))
    assert {k: b.data.shape for k, b in net.blobs.items()} == CAFFE_SHAPES_8
    out = net.forward(data=RNG.standard_normal((2, 3, 5, 5)).astype(np.float32))
    assert {k: b.data.shape for k, b in net.blobs.items()} == CAFFE_SHAPES_5
    assert out["a"].size == 0 and out["a"].dtype == np.float32
    # and back: the empty pass leaves nothing behind
    out = net.forward(data=np.ones((2, 3, 8, 8), np.float32))
    assert out["a"].shape == (2, 2, 4, 4) and np.isfinite(out["a"]).all()


def test_a_reshape_to_a_negative_output_size_is_refused_naming_the_layer():
    net = _net(8)
    with pytest.raises(GraphError, match=r"layer 'c' \(Convolution\): output spatial size \[-1, -1\] is negative"
                                         r".*kernel extent \[6, 6\]"):
        net.forward(data=np.zeros((2, 3, 4, 4), np.float32))


@pytest.mark.parametrize("x_shape, w_shape, pad, dilation, stride", [
    ((2, 3, 0, 4), (4, 3, 1, 1), (1, 0), (1, 1), (1, 1)),           # zero height, the pad gives 2 rows
    ((1, 3, 0, 5), (2, 3, 2, 3), (2, 1), (3, 1), (1, 2)),           # dilated, strided
    ((1, 3, 0, 4), (4, 3, 3, 3), (2, 1), (1, 1), (1, 1)),           # a 3x3 stride-1 kernel (Winograd's shape)
    ((1, 0, 3, 3), (4, 0, 3, 3), (1, 1), (1, 1), (1, 1)),           # no channels at all
    ((1, 3, 0, 4), (4, 3, 2, 1), (2**29 - 1, 0), (2**28, 1), (2**29, 1)),  # windows 2^28 apart: no memory for them
])
def test_a_convolution_over_an_empty_bottom_gives_its_bias_where_the_padding_fills_windows(
        x_shape, w_shape, pad, dilation, stride):
    bias = np.array([0.5, -1.25, 2.0, 3.5][:w_shape[0]], np.float32)
    y = Convolution(np.zeros(x_shape, np.float32), RNG.standard_normal(w_shape).astype(np.float32), bias,
                    stride=stride, pad=pad, dilation=dilation)
    out = tuple(conv_out_size(s, k, st, p, d) for s, k, st, p, d in zip(x_shape[2:], w_shape[2:], stride, pad,
                                                                        dilation, strict=True))
    assert y.shape == (x_shape[0], w_shape[0]) + out and y.size > 0
    np.testing.assert_array_equal(y, np.broadcast_to(bias.reshape(-1, 1, 1), y.shape))
    # and backward: nothing reaches the weights or the (empty) input through padding
    dy = np.ones(y.shape, np.float32)
    geom = dict(stride=stride, pad=pad, dilation=dilation, group=1)
    np.testing.assert_array_equal(conv_grad.conv_weight_grad(np.zeros(x_shape, np.float32), dy, w_shape[2:], **geom),
                                  np.zeros(w_shape, np.float32))
    assert conv_grad.conv_input_grad(dy, np.ones(w_shape, np.float32), x_shape, **geom).shape == x_shape


@pytest.mark.parametrize("fold", ["fast", "exact", "off"])
def test_a_folded_batchnorm_chain_over_an_emptied_bottom_runs_on_its_bias(fold):
    """A net run on 8x8 and then on 5x5: the 6x6 kernel leaves c empty, and the 3x3 convolution with pad 2 after
    it still has 2x2 outputs, its bias through the BatchNorm, Scale and ReLU (the formula below)."""
    layers = (
        'layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 4 '
        'kernel_size: 6 } }\n'
        'layer { name: "k" type: "Convolution" bottom: "c" top: "k" convolution_param { num_output: 3 '
        'kernel_size: 3 pad: 2 } }\n'
        'layer { name: "bn" type: "BatchNorm" bottom: "k" top: "k" }\n'
        'layer { name: "sc" type: "Scale" bottom: "k" top: "k" scale_param { bias_term: true } }\n'
        'layer { name: "r" type: "ReLU" bottom: "k" top: "k" }\n')
    text = 'name: "z"\n' + INPUT.format(h=8) + layers
    net = Net(io.parse_prototxt_text(text, "z.prototxt"), phase=TEST, fold=fold)
    rng = np.random.default_rng(11)
    for layer in net.layers:
        for blob in layer.blobs:
            blob.data[...] = rng.uniform(0.5, 1.5, blob.data.shape).astype(np.float32)
    k_bias = net.params["k"][1].data * np.float32(rng.choice([-1, 1], 3))
    net.params["k"][1].data[...] = k_bias
    net.forward(data=rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    out = net.forward(data=rng.standard_normal((2, 3, 5, 5)).astype(np.float32))["k"]
    mean, var, factor = (p.data.astype(np.float64) for p in net.params["bn"])
    gamma, beta = (p.data.astype(np.float64) for p in net.params["sc"])
    f = 0.0 if factor[0] == 0 else 1.0 / factor[0]
    want = np.maximum((k_bias - mean * f) / np.sqrt(var * f + 1e-5) * gamma + beta, 0)
    assert out.shape == (2, 3, 2, 2)
    np.testing.assert_allclose(out, np.broadcast_to(want.reshape(3, 1, 1), out.shape), rtol=2e-6, atol=1e-6)
