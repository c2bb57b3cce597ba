"""BatchNorm, Scale, Bias, LRN, MVN and Normalize against loop references on tiny inputs."""

import itertools
import math

import numpy as np
import pytest
from google.protobuf import text_format

from tests.runtime.layer_harness import make_layer as harness_make, run_layer as harness_run
from amct_caffe.errors import GraphError
from amct_caffe.io.schema import caffe_pb
from amct_caffe.runtime import TEST, TRAIN, Net
from amct_caffe.runtime.layers import normalization
from amct_caffe.runtime.registry import known_types

RNG = np.random.default_rng(11)


def make_layer(text, bottom_shapes, blobs=(), phase=TEST):
    return harness_make(text, len(bottom_shapes), blobs, phase)


def run_layer(text, bottoms, blobs=(), phase=TEST, layer=None):
    """reshape + forward one layer; checks the bottoms stay intact and the top shapes."""
    layer = layer or make_layer(text, [b.shape for b in bottoms], blobs, phase)
    return harness_run(layer, bottoms)[0][0], layer


def net_with(layer_text, *shapes):
    inputs = "".join(
        f'layer {{ name: "in{i}" type: "Input" top: "x{i}" input_param {{ shape {{ '
        f'{" ".join(f"dim: {d}" for d in s)} }} }} }}\n' for i, s in enumerate(shapes))
    bottoms = " ".join(f'bottom: "x{i}"' for i in range(len(shapes)))
    text = inputs + f'layer {{ name: "l" {bottoms} top: "y" {layer_text} }}'
    return Net(text_format.Parse(text, caffe_pb().NetParameter()), phase=TEST)


def data(*shape, scale=2.0, shift=0.0):
    return (RNG.standard_normal(shape) * scale + shift).astype(np.float32)


def check(got, want, rtol=2e-6, atol=2e-6):
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=rtol, atol=atol)


def test_every_type_has_a_reference_function_named_after_it():
    for t in ["BatchNorm", "Scale", "Bias", "LRN", "MVN", "Normalize"]:
        assert t in known_types()
        assert callable(getattr(normalization, t))


# ------------------------------------------------------------------ BatchNorm
def bn_reference(x, mean, var, eps):
    y = np.empty(x.shape)
    for idx in np.ndindex(*x.shape):
        c = 0 if x.ndim == 1 else idx[1]
        y[idx] = (x[idx] - mean[c]) / math.sqrt(var[c] + eps)
    return y


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (4, 3), (2, 3, 2, 2, 2)])
@pytest.mark.parametrize("factor,eps", [(1.0, 1e-5), (0.5, 1e-3), (999.0, 1e-5), (0.0, 1e-5)])
def test_batchnorm_global_stats(shape, factor, eps):
    c = shape[1]
    x = data(*shape, shift=1.0)
    mean = data(c, scale=0.5)
    var = np.abs(data(c)) + 0.5
    blobs = [mean, var, np.array([factor], np.float32)]
    y, _ = run_layer(f'type: "BatchNorm" batch_norm_param {{ eps: {eps} }}', [x], blobs)
    sf = 0.0 if factor == 0 else 1.0 / factor  # a zero factor zeroes the statistics (Caffe)
    check(y, bn_reference(x, mean.astype(np.float64) * sf, var.astype(np.float64) * sf, eps), rtol=1e-5,
          atol=1e-5)


@pytest.mark.parametrize("kind", ["BatchNorm", "BatchNormKyle"])
def test_a_bottom_without_channel_axis_is_refused_as_caffe_refuses_it(kind):
    """Caffe's BatchNorm takes one channel for a 1-axis bottom at setup, then its Reshape checks axis 1: abort."""
    from amct_caffe.errors import GraphError

    with pytest.raises(GraphError, match=rf"layer 'l' \({kind}\): the bottom \[6\] has no channel axis"):
        net_with(f'type: "{kind}"', (6,))


def test_batchnorm_blobs_default_to_zero():
    net = net_with('type: "BatchNorm"', (1, 3, 2, 2))
    assert [b.data.shape for b in net.params["l"]] == [(3,), (3,), (1,)]
    assert all((b.data == 0).all() for b in net.params["l"])


def test_batchnorm_sees_parameter_changes_between_forwards():
    net = net_with('type: "BatchNorm"', (2, 3, 2, 2))
    x = data(2, 3, 2, 2)
    net.params["l"][1].data[...] = 1.0
    net.params["l"][2].data[...] = 1.0
    y1 = net.forward(x0=x)["y"].copy()
    net.params["l"][0].data[...] = 1.0
    y2 = net.forward(x0=x)["y"]
    check(y2, y1 - 1 / math.sqrt(1 + 1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extra,phase", [("", TRAIN), ("use_global_stats: false", TEST)])
def test_batchnorm_batch_statistics_and_moving_average(extra, phase):
    x = data(3, 2, 4, 5, shift=2.0)
    f = 0.9
    text = f'type: "BatchNorm" batch_norm_param {{ moving_average_fraction: {f} {extra} }}'
    old_mean, old_var = np.array([0.5, -1.0], np.float32), np.array([2.0, 3.0], np.float32)
    layer = make_layer(text, [x.shape], [old_mean, old_var, np.array([2.0], np.float32)], phase)
    y, _ = run_layer(text, [x], layer=layer)
    xc = x.astype(np.float64).transpose(1, 0, 2, 3).reshape(2, -1)
    m, v = xc.mean(axis=1), xc.var(axis=1)
    check(y, bn_reference(x, m, v, 1e-5), rtol=1e-5, atol=1e-5)
    count = xc.shape[1]
    check(layer.blobs[2].data, [2.0 * f + 1], rtol=1e-6)
    check(layer.blobs[0].data, m + f * old_mean, rtol=1e-5)
    check(layer.blobs[1].data, v * count / (count - 1) + f * old_var, rtol=1e-5)


def test_batchnorm_use_global_stats_in_train_phase():
    x = data(2, 2, 3, 3)
    blobs = [np.array([1.0, 2.0]), np.array([4.0, 9.0]), np.array([1.0])]
    y, layer = run_layer('type: "BatchNorm" batch_norm_param { use_global_stats: true }', [x], blobs, TRAIN)
    check(y, bn_reference(x, [1.0, 2.0], [4.0, 9.0], 1e-5), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(layer.blobs[2].data, [1.0])  # untouched


def test_batchnorm_kyle_alpha_beta():
    x = data(2, 3, 2, 2)
    blobs = [np.zeros(3), np.ones(3), np.ones(1), np.array([1.0, 2.0, -1.0]), np.array([0.0, 0.5, 1.0])]
    y, _ = run_layer('type: "BatchNormKyle" batch_norm_param { use_alpha_beta: true }', [x], blobs)
    want = bn_reference(x, np.zeros(3), np.ones(3), 1e-5) * np.array([1, 2, -1.0])[:, None, None] \
        + np.array([0, 0.5, 1.0])[:, None, None]
    check(y, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ Scale / Bias
def affine_reference(x, scale, bias, axis):
    """y[i] = x[i] * scale[i restricted to the covered axes] + bias[...] by explicit indexing."""
    y = np.empty(x.shape)
    axis = axis % x.ndim
    for idx in np.ndindex(*x.shape):
        y[idx] = x[idx] * (scale[idx[axis:axis + scale.ndim]] if scale.ndim else scale[()])
        if bias is not None:
            y[idx] += bias[idx[axis:axis + bias.ndim]] if bias.ndim else bias[()]
    return y


@pytest.mark.parametrize("axis,num_axes", [(1, 1), (0, 1), (1, 2), (2, -1), (-1, 1), (0, 0), (1, 0), (0, -1)])
@pytest.mark.parametrize("bias_term", [False, True])
def test_scale_learned(axis, num_axes, bias_term):
    x = data(2, 3, 4, 5)
    pshape = x.shape[axis % 4:] if num_axes == -1 else x.shape[axis % 4: axis % 4 + num_axes]
    scale = data(*pshape)
    bias = data(*pshape) if bias_term else None
    text = (f'type: "Scale" scale_param {{ axis: {axis} num_axes: {num_axes} '
            f'bias_term: {str(bias_term).lower()} }}')
    layer = make_layer(text, [x.shape])
    assert [tuple(s) for s in layer.param_shapes([x.shape])] == [pshape] * (2 if bias_term else 1)
    y, _ = run_layer(text, [x], [scale] + ([bias] if bias_term else []))
    check(y, affine_reference(x, scale, bias, axis))


@pytest.mark.parametrize("sshape,axis", [((2, 3), 0), ((3,), 1), ((3, 4), 1), ((5,), -1), ((), 1)])
@pytest.mark.parametrize("bias_term", [False, True])
def test_scale_from_second_bottom(sshape, axis, bias_term):
    x = data(2, 3, 4, 5)
    s = data(*sshape)
    text = f'type: "Scale" scale_param {{ axis: {axis} bias_term: {str(bias_term).lower()} }}'
    layer = make_layer(text, [x.shape, s.shape])
    shapes = layer.param_shapes([x.shape, s.shape])
    assert [tuple(p) for p in shapes] == ([sshape] if bias_term else [])  # no learned scale blob
    bias = data(*sshape) if bias_term else None
    y, _ = run_layer(text, [x, s], [bias] if bias_term else [])
    check(y, affine_reference(x, s, bias, axis))


def test_scale_default_fillers():
    net = net_with('type: "Scale" scale_param { bias_term: true }', (1, 3, 2, 2))
    np.testing.assert_array_equal(net.params["l"][0].data, np.ones(3))
    np.testing.assert_array_equal(net.params["l"][1].data, np.zeros(3))
    net = net_with('type: "Scale" scale_param { filler { type: "constant" value: 2 } bias_term: true '
                   'bias_filler { type: "constant" value: 0.5 } }', (1, 3, 2, 2))
    y = net.forward(x0=np.ones((1, 3, 2, 2), np.float32))["y"]
    np.testing.assert_array_equal(y, 2.5)


def test_scale_shape_mismatch_is_an_error():
    with pytest.raises(GraphError):
        run_layer('type: "Scale"', [data(2, 3, 4)], [np.ones(4, np.float32)])
    with pytest.raises(GraphError):
        make_layer('type: "Scale" scale_param { axis: 2 num_axes: 3 }', [(2, 3, 4)]).param_shapes([(2, 3, 4)])


@pytest.mark.parametrize("axis,num_axes", [(1, 1), (0, 2), (2, -1), (-2, 1), (1, 0)])
def test_bias_learned(axis, num_axes):
    x = data(2, 3, 4)
    pshape = x.shape[axis % 3:] if num_axes == -1 else x.shape[axis % 3: axis % 3 + num_axes]
    b = data(*pshape)
    text = f'type: "Bias" bias_param {{ axis: {axis} num_axes: {num_axes} }}'
    assert [tuple(s) for s in make_layer(text, [x.shape]).param_shapes([x.shape])] == [pshape]
    y, _ = run_layer(text, [x], [b])
    check(y, affine_reference(x, np.array(1.0), b, axis))


def test_bias_from_second_bottom_and_filler():
    x, b = data(2, 3, 4), data(3, 4)
    y, _ = run_layer('type: "Bias"', [x, b])
    check(y, x + b[None].astype(np.float64))
    with pytest.raises(GraphError):
        run_layer('type: "Bias"', [x, data(4, 3)])  # Bias checks each covered axis
    net = net_with('type: "Bias" bias_param { filler { type: "constant" value: 3 } }', (1, 2))
    np.testing.assert_array_equal(net.params["l"][0].data, [3, 3])


# ------------------------------------------------------------------ LRN
def lrn_across(x, size, alpha, beta, k):
    n_, c_, h_, w_ = x.shape
    y = np.empty(x.shape)
    pre = (size - 1) // 2
    for n, c, h, w in np.ndindex(*x.shape):
        s = sum(float(x[n, cc, h, w]) ** 2 for cc in range(max(0, c - pre), min(c_, c + pre + 1)))
        y[n, c, h, w] = x[n, c, h, w] * (k + alpha / size * s) ** -beta
    return y


def lrn_within(x, size, alpha, beta):
    n_, c_, h_, w_ = x.shape
    y = np.empty(x.shape)
    pre = (size - 1) // 2
    for n, c, h, w in np.ndindex(*x.shape):
        s = sum(float(x[n, c, hh, ww]) ** 2 for hh in range(max(0, h - pre), min(h_, h + pre + 1))
                for ww in range(max(0, w - pre), min(w_, w + pre + 1)))
        y[n, c, h, w] = x[n, c, h, w] * (1 + alpha / size ** 2 * s) ** -beta
    return y


@pytest.mark.parametrize("size,alpha,beta,k", [(5, 1.0, 0.75, 1.0), (3, 1e-4, 0.75, 2.0), (1, 0.5, 0.5, 1.0),
                                               (7, 0.1, 1.2, 1.5)])
def test_lrn_across_channels(size, alpha, beta, k):
    x = data(2, 6, 3, 4)
    text = f'type: "LRN" lrn_param {{ local_size: {size} alpha: {alpha} beta: {beta} k: {k} }}'
    y, _ = run_layer(text, [x])
    check(y, lrn_across(x, size, alpha, beta, k), rtol=1e-5)


@pytest.mark.parametrize("size,alpha,beta", [(3, 1.0, 0.75), (5, 0.5, 0.6), (1, 2.0, 1.0)])
def test_lrn_within_channel(size, alpha, beta):
    x = data(2, 2, 5, 4)
    text = (f'type: "LRN" lrn_param {{ local_size: {size} alpha: {alpha} beta: {beta} k: 7 '
            'norm_region: WITHIN_CHANNEL }')  # k is unused within channels
    y, _ = run_layer(text, [x])
    check(y, lrn_within(x, size, alpha, beta), rtol=1e-5)


def test_lrn_rejects_even_size_and_non_4d():
    with pytest.raises(GraphError, match="odd"):
        make_layer('type: "LRN" lrn_param { local_size: 4 }', [(1, 4, 2, 2)])
    with pytest.raises(GraphError, match="4 axes"):
        run_layer('type: "LRN"', [data(2, 4, 3)])


# ------------------------------------------------------------------ MVN
@pytest.mark.parametrize("norm_var,across", list(itertools.product([True, False], repeat=2)))
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 4), (2, 3, 5)])
def test_mvn(norm_var, across, shape, eps=1e-3):
    x = data(*shape, shift=1.5)
    text = (f'type: "MVN" mvn_param {{ normalize_variance: {str(norm_var).lower()} '
            f'across_channels: {str(across).lower()} eps: {eps} }}')
    y, _ = run_layer(text, [x])
    legacy = tuple(shape) + (1,) * (4 - len(shape))
    assert y.shape == legacy  # Caffe reshapes the top to (num, channels, height, width)
    x4 = x.reshape(legacy).astype(np.float64)
    want = np.empty(legacy)
    for n in range(legacy[0]):
        for cs in ([slice(None)] if across else [slice(c, c + 1) for c in range(legacy[1])]):
            g = x4[n, cs]
            d = g - g.mean()
            want[n, cs] = d / (math.sqrt((d ** 2).mean()) + eps) if norm_var else d  # eps on the std
    check(y, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ Normalize
@pytest.mark.parametrize("across_spatial,channel_shared", list(itertools.product([True, False], repeat=2)))
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 3)])
def test_normalize(across_spatial, channel_shared, shape, eps=1e-3):
    x = data(*shape)
    c = shape[1]
    scale = np.array(2.5, np.float32) if channel_shared else data(c)
    text = (f'type: "Normalize" norm_param {{ across_spatial: {str(across_spatial).lower()} '
            f'channel_shared: {str(channel_shared).lower()} eps: {eps} }}')
    y, _ = run_layer(text, [x], [scale])
    x3 = x.reshape(shape[0], c, -1).astype(np.float64)
    want = np.empty(x3.shape)
    for n, ch, s in np.ndindex(*x3.shape):
        sumsq = (x3[n] ** 2).sum() if across_spatial else (x3[n, :, s] ** 2).sum()
        norm = math.sqrt(sumsq + eps)
        want[n, ch, s] = x3[n, ch, s] / norm * (scale[()] if channel_shared else scale[ch])
    check(y, want.reshape(shape), rtol=1e-5)


def test_normalize_blob_shapes_and_filler():
    net = net_with('type: "Normalize"', (1, 3, 2, 2))
    assert net.layers[1].param_shapes([(1, 3, 2, 2)]) == [()]
    assert net.params["l"][0].data.size == 1
    np.testing.assert_array_equal(net.params["l"][0].data, 1.0)
    net = net_with('type: "Normalize" norm_param { channel_shared: false scale_filler { type: "constant" '
                   'value: 20 } }', (1, 3, 2, 2))
    np.testing.assert_array_equal(net.params["l"][0].data, [20, 20, 20])
