"""Pooling / MaxUnPool against a transcription of pooling_layer.cpp's loops."""

import math

import numpy as np
import pytest
from google.protobuf import text_format

from amct_caffe.errors import GraphError
from amct_caffe.io.schema import caffe_pb
from amct_caffe.runtime.layers.pooling import (MaxUnPool, MaxUnPoolLayer, Pooling, PoolingLayer, SPPLayer,
                                               pooled_size)

RNG = np.random.default_rng(3)


def ref_size(size, k, s, p, ceil=True, padded=None):
    f = math.ceil if ceil else math.floor
    out = int(f((size + 2 * p - k) / s)) + 1
    if (p if padded is None else padded) and (out - 1) * s >= size + p:  # if (pad_h_ || pad_w_)
        out -= 1
    return out


def ref_pool(x, pool, k, s, p, ceil=True):
    """Caffe's Forward_cpu loops (MAX returns (top, mask)), plus the GPU STOCHASTIC test rule."""
    n, c, h, w = x.shape
    padded = bool(p[0] or p[1])
    ho, wo = ref_size(h, k[0], s[0], p[0], ceil, padded), ref_size(w, k[1], s[1], p[1], ceil, padded)
    y = np.zeros((n, c, ho, wo), np.float64)
    mask = np.full((n, c, ho, wo), -1.0)
    for ni in range(n):
        for ci in range(c):
            for ph in range(ho):
                for pw in range(wo):
                    hs, ws = ph * s[0] - p[0], pw * s[1] - p[1]
                    if pool == "MAX":
                        he, we = min(hs + k[0], h), min(ws + k[1], w)
                        hs, ws = max(hs, 0), max(ws, 0)
                        best = -np.finfo(np.float32).max
                        for hh in range(hs, he):
                            for ww in range(ws, we):
                                if x[ni, ci, hh, ww] > best:  # NaN never wins
                                    best = x[ni, ci, hh, ww]
                                    mask[ni, ci, ph, pw] = hh * w + ww
                        y[ni, ci, ph, pw] = best
                    elif pool == "AVE":
                        he, we = min(hs + k[0], h + p[0]), min(ws + k[1], w + p[1])
                        size = (he - hs) * (we - ws)
                        hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
                        y[ni, ci, ph, pw] = x[ni, ci, hs:he, ws:we].sum() / size
                    else:  # STOCHASTIC, test phase (no pad)
                        win = x[ni, ci, hs:min(hs + k[0], h), ws:min(ws + k[1], w)].astype(np.float64)
                        y[ni, ci, ph, pw] = (win * win).sum() / (win.sum() + np.finfo(np.float32).tiny)
    return y, mask


@pytest.mark.parametrize("size,k,s,p,ceil", [
    (7, 3, 2, 0, True), (6, 3, 2, 0, True), (7, 3, 2, 1, True), (6, 2, 2, 1, True), (5, 3, 3, 2, True),
    (224, 3, 2, 0, True), (112, 3, 2, 1, True), (7, 3, 2, 0, False), (6, 3, 2, 1, False), (1, 3, 2, 1, True),
])
def test_output_size_rule(size, k, s, p, ceil):
    assert pooled_size(size, k, s, p, ceil) == ref_size(size, k, s, p, ceil)


def test_last_window_clip_applies_to_both_axes_when_either_is_padded():
    # pooling_layer.cpp: if (pad_h_ || pad_w_) { if ((pooled_width_ - 1) * stride_w_ >= width_ + pad_w_)
    # --pooled_width_; ... } -- on the unpadded axis too: W 2, kernel 1, stride 2 gives 1, not 2
    x = RNG.standard_normal((2, 1, 3, 2)).astype(np.float32)
    y, mask = Pooling(x, pool="MAX", kernel=(2, 1), stride=(2, 2), pad=(1, 0), return_mask=True)
    assert y.shape == (2, 1, 2, 1)
    ref_y, ref_mask = ref_pool(x, "MAX", (2, 1), (2, 2), (1, 0))
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_array_equal(mask, ref_mask)
    lp = caffe_pb().LayerParameter()
    text_format.Parse('name: "p" type: "Pooling" top: "t" pooling_param { pool: AVE kernel_h: 2 kernel_w: 1 stride: 2 '
                      'pad_h: 1 pad_w: 0 }', lp)
    assert PoolingLayer(lp).reshape([(2, 1, 3, 2)]) == [(2, 1, 2, 1)]


@pytest.mark.parametrize("return_mask", [False, True])
@pytest.mark.parametrize("kernel", [(2, 2), (3, 3)])
def test_max_pooling_skips_nan_like_caffes_strict_greater(return_mask, kernel):
    # Caffe keeps a tap where bottom > top (top starts at -FLT_MAX): NaN never wins, and a window
    # holding only NaN gives -FLT_MAX with mask -1.
    x = RNG.standard_normal((1, 2, 4, 4)).astype(np.float32)
    x[0, 0, 0, 1] = x[0, 1, 2, 2] = np.nan
    x[0, 1, :2, :2] = np.nan
    res = Pooling(x, pool="MAX", kernel=kernel, stride=(2, 2), return_mask=return_mask)
    y = res[0] if return_mask else res
    ref_y, ref_mask = ref_pool(x, "MAX", kernel, (2, 2), (0, 0))
    assert not np.isnan(y).any()
    np.testing.assert_array_equal(y, ref_y)
    if return_mask:
        np.testing.assert_array_equal(res[1], ref_mask)
    g = Pooling(x, pool="MAX", kernel=(4, 4), stride=(1, 1))  # the global fast path
    np.testing.assert_array_equal(g, ref_pool(x, "MAX", (4, 4), (1, 1), (0, 0))[0])


CASES = [
    # (shape, kernel, stride, pad)
    ((2, 3, 7, 7), (3, 3), (2, 2), (0, 0)),  # ceil leaves a partial last window
    ((1, 2, 6, 7), (3, 3), (2, 2), (1, 1)),
    ((1, 2, 8, 5), (2, 3), (2, 1), (1, 2)),  # pad_h/pad_w, kernel_h/kernel_w, stride_h/stride_w
    ((2, 2, 9, 9), (5, 5), (3, 3), (2, 2)),  # the last-window-start correction applies
    ((1, 1, 4, 4), (2, 2), (2, 2), (0, 0)),
    ((1, 2, 5, 6), (5, 6), (1, 1), (0, 0)),  # window == input
    ((1, 2, 5, 5), (1, 2), (3, 3), (0, 0)),  # stride > kernel: the last windows lie outside the input
]


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("shape,k,s,p", CASES)
def test_pooling_matches_caffe_loops(pool, shape, k, s, p):
    x = RNG.standard_normal(shape).astype(np.float32)
    got = Pooling(x, pool=pool, kernel=k, stride=s, pad=p, return_mask=pool == "MAX")
    ref, ref_mask = ref_pool(x, pool, k, s, p)
    if pool == "MAX":
        got, mask = got
        np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_max_mask_takes_first_maximum_on_ties():
    x = np.zeros((1, 1, 4, 4), np.float32)
    x[0, 0, 1, 1] = x[0, 0, 1, 2] = 5.0
    y, mask = Pooling(x, pool="MAX", kernel=(3, 3), stride=(1, 1), pad=(1, 1), return_mask=True)
    np.testing.assert_array_equal(mask, ref_pool(x, "MAX", (3, 3), (1, 1), (1, 1))[1])
    assert mask[0, 0, 1, 1] == 1 * 4 + 1


def test_floor_mode_and_stochastic_test_rule():
    x = RNG.uniform(0.1, 1.0, (1, 2, 7, 7)).astype(np.float32)
    got = Pooling(x, pool="AVE", kernel=(3, 3), stride=(2, 2), pad=(1, 1), ceil_mode=False)
    np.testing.assert_allclose(got, ref_pool(x, "AVE", (3, 3), (2, 2), (1, 1), ceil=False)[0], rtol=1e-5)
    got = Pooling(x, pool="STOCHASTIC", kernel=(3, 3), stride=(2, 2))
    np.testing.assert_allclose(got, ref_pool(x, "STOCHASTIC", (3, 3), (2, 2), (0, 0))[0], rtol=1e-5)


def layer(text, phase=1):
    lp = caffe_pb().LayerParameter()
    text_format.Parse('name: "p" type: "Pooling" bottom: "x" top: "y" ' + text, lp)
    return PoolingLayer(lp, phase)


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
def test_global_pooling_layer(pool):
    x = RNG.standard_normal((2, 3, 5, 4)).astype(np.float32)
    lyr = layer(f"pooling_param {{ pool: {pool} global_pooling: true }}")
    assert lyr.reshape([x.shape]) == [(2, 3, 1, 1)]
    (y,) = lyr.forward([x])
    ref = x.max(axis=(2, 3), keepdims=True) if pool == "MAX" else x.mean(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_layer_fields_and_mask_top():
    lp = caffe_pb().LayerParameter()
    text_format.Parse('name: "p" type: "Pooling" bottom: "x" top: "y" top: "m" pooling_param { pool: MAX '
                      'kernel_h: 2 kernel_w: 3 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 2 }', lp)
    lyr = PoolingLayer(lp)
    x = RNG.standard_normal((1, 2, 8, 5)).astype(np.float32)
    shapes = lyr.reshape([x.shape])
    y, m = lyr.forward([x])
    ref, ref_mask = ref_pool(x, "MAX", (2, 3), (2, 1), (1, 2))
    assert shapes == [ref.shape, ref.shape]
    np.testing.assert_allclose(y, ref, rtol=1e-6)
    np.testing.assert_array_equal(m, ref_mask)


def test_round_mode_floor_if_the_schema_has_it():
    fields = caffe_pb().PoolingParameter.DESCRIPTOR.fields_by_name
    if "round_mode" not in fields and "ceil_mode" not in fields:
        pytest.skip("schema has neither round_mode nor ceil_mode")
    text = "round_mode: FLOOR" if "round_mode" in fields else "ceil_mode: false"
    lyr = layer(f"pooling_param {{ pool: MAX kernel_size: 3 stride: 2 {text} }}")
    assert lyr.reshape([(1, 1, 8, 8)]) == [(1, 1, 3, 3)]  # ceil would give 4


@pytest.mark.parametrize("text,msg", [
    ("pooling_param { pool: MAX }", "kernel_size"),
    ("pooling_param { pool: MAX kernel_size: 2 kernel_h: 2 kernel_w: 2 }", "not both"),
    ("pooling_param { pool: MAX global_pooling: true kernel_size: 2 }", "global_pooling"),
    ("pooling_param { pool: MAX kernel_size: 2 pad: 2 }", "smaller than the kernel"),
    ("pooling_param { pool: STOCHASTIC kernel_size: 2 pad: 1 }", "only for MAX and AVE"),
    ("pooling_param { pool: AVE kernel_size: 2 } top: \"m\"", "second"),
])
def test_bad_fields_raise(text, msg):
    with pytest.raises(GraphError, match=msg):
        layer(text)


def test_stochastic_rejected_in_train_phase():
    with pytest.raises(GraphError, match="TRAIN"):
        layer("pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 }", phase=0)


def test_max_unpool_inverts_max_pool_mask():
    x = RNG.standard_normal((2, 3, 6, 6)).astype(np.float32)
    y, mask = Pooling(x, pool="MAX", kernel=(2, 2), stride=(2, 2), return_mask=True)
    up = MaxUnPool(y, mask, out_h=6, out_w=6)
    ref = np.zeros_like(x)
    for n in range(2):
        for c in range(3):
            for i, idx in enumerate(mask[n, c].ravel().astype(int)):
                ref[n, c].flat[idx] = y[n, c].flat[i]
    np.testing.assert_array_equal(up, ref)
    lp = caffe_pb().LayerParameter()
    text_format.Parse('name: "u" type: "MaxUnPool" bottom: "y" bottom: "m" top: "z" '
                      'max_unpool_param { dst_h: 6 dst_w: 6 }', lp)
    lyr = MaxUnPoolLayer(lp)
    assert lyr.reshape([y.shape, mask.shape]) == [(2, 3, 6, 6)]
    np.testing.assert_array_equal(lyr.forward([y, mask])[0], ref)
    with pytest.raises(ValueError, match="out of range"):
        MaxUnPool(y, mask, out_h=3, out_w=3)


def test_max_unpool_of_an_empty_window_mask_is_refused():
    # Ceil mode without padding: a 3x3 map, kernel 2, stride 3 gives 2x2 windows, the last ones
    # wholly past the input (pooling_layer.cpp leaves their mask at -1). MaxUnPool's
    # top_data[-1] = ... corrupts Caffe's heap; the executor refuses it naming the layer.
    x = RNG.standard_normal((1, 2, 3, 3)).astype(np.float32)
    y, mask = Pooling(x, pool="MAX", kernel=(2, 2), stride=(3, 3), return_mask=True)
    assert y.shape == (1, 2, 2, 2) and (mask == -1).any()
    lp = caffe_pb().LayerParameter()
    text_format.Parse('name: "u" type: "MaxUnPool" bottom: "y" bottom: "m" top: "z" '
                      'max_unpool_param { dst_h: 3 dst_w: 3 }', lp)
    lyr = MaxUnPoolLayer(lp)
    lyr.reshape([y.shape, mask.shape])
    with pytest.raises(GraphError, match="'u'.*out of range"):
        lyr.forward([y, mask])


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("height,hw", [(1, (5, 7)), (3, (9, 11)), (2, (4, 4))])
def test_spp_levels_are_caffe_poolings_flattened(pool, height, hw):
    lp = caffe_pb().LayerParameter()
    text_format.Parse(f'name: "s" type: "SPP" bottom: "x" top: "y" spp_param {{ pyramid_height: {height} '
                      f'pool: {pool} }}', lp)
    lyr = SPPLayer(lp)
    x = RNG.standard_normal((2, 3) + hw).astype(np.float32)
    (top,) = lyr.reshape([x.shape])
    (y,) = lyr.forward([x])
    refs = []
    for i in range(height):  # spp_layer.cpp: kernel ceil(H / 2^i), stride = kernel, pad (k*2^i - H + 1) // 2
        bins = 2 ** i
        k = tuple(math.ceil(v / bins) for v in hw)
        p = tuple((kk * bins - v + 1) // 2 for kk, v in zip(k, hw, strict=True))
        refs.append(ref_pool(x, pool, k, k, p)[0])
    ref = refs[0] if height == 1 else np.concatenate([r.reshape(2, -1) for r in refs], axis=1)
    assert y.shape == top == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_stochastic_pooling_backward_is_refused(tmp_path):
    """Caffe's CPU Backward_cpu is NOT_IMPLEMENTED for STOCHASTIC: asking for its gradient fails clearly."""
    from amct_caffe.runtime import TEST, Net

    proto = tmp_path / "net.prototxt"
    proto.write_text('force_backward: true\n'
                     'layer { name: "data" type: "Input" top: "data" '
                     'input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } } }\n'
                     'layer { name: "p" type: "Pooling" bottom: "data" top: "p" '
                     'pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 } }\n')
    net = Net(str(proto), TEST)
    net.forward(data=np.abs(np.random.default_rng(0).standard_normal((1, 2, 4, 4))).astype(np.float32))
    with pytest.raises(GraphError, match="STOCHASTIC pooling has no backward"):
        net.backward(p=np.ones((1, 2, 2, 2), np.float32))


def test_max_pool_backward_empty_window_writes_previous_plane():
    """A window wholly past the input (mask -1) gives its diff to the previous plane's last cell, as
    Caffe's pointer arithmetic does; on the first plane (before Caffe's buffer) it is dropped."""
    from amct_caffe.runtime.layers import pooling_grad

    x = np.arange(2 * 5 * 5, dtype=np.float32).reshape(1, 2, 5, 5)
    y, mask = Pooling(x, pool="MAX", kernel=(1, 1), stride=(3, 3), return_mask=True)
    assert y.shape[2:] == (3, 3) and (mask[0, :, 2, :] == -1).all()
    dy = np.ones(y.shape, np.float32)
    for got in (pooling_grad.max_pool_backward(dy, x, y, (1, 1), (3, 3), (0, 0)),
                pooling_grad.max_pool_backward(dy, x, None, (1, 1), (3, 3), (0, 0), mask)):
        assert got[0, 0, 4, 4] == 5  # (0, 0) is no window's cell: plane 1's five empty windows land here
        assert got.sum() == 2 * 4 + 5  # plane 0's empty windows are dropped


def test_max_pool_backward_refuses_a_mask_rewritten_out_of_the_bottom(tmp_path):
    """An in-place layer that turns the mask top into indices outside the bottom makes Caffe's backward
    write out of its buffer (glibc aborts it): the executor refuses instead of guessing."""
    from amct_caffe.runtime import TEST, Net

    proto = tmp_path / "net.prototxt"
    proto.write_text('force_backward: true\n'
                     'layer { name: "data" type: "Input" top: "data" '
                     'input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } } }\n'
                     'layer { name: "p" type: "Pooling" bottom: "data" top: "p" top: "m" '
                     'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n'
                     'layer { name: "s" type: "Power" bottom: "m" top: "m" power_param { shift: -40 } }\n')
    net = Net(str(proto), TEST)
    net.forward(data=RNG.standard_normal((1, 2, 4, 4)).astype(np.float32))
    with pytest.raises(GraphError, match="mask top, rewritten after the forward"):
        net.backward(p=np.ones((1, 2, 2, 2), np.float32), m=np.ones((1, 2, 2, 2), np.float32))
