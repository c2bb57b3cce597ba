"""Upsample / Interp / BilinearInterpolate / Resize against transcriptions of the C++ loops."""

import math

import numpy as np
import pytest
from google.protobuf import text_format

from amct_caffe.errors import GraphError
from amct_caffe.io.schema import caffe_pb
from amct_caffe.runtime.layers.pooling import Pooling
from amct_caffe.runtime.layers.resize import (BilinearInterpolate, BilinearInterpolateLayer, Interp,
                                              InterpLayer, Resize, ResizeLayer, UpsampleLayer)

RNG = np.random.default_rng(11)
F = np.float32


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def make(cls, text, phase=1):
    lp = caffe_pb().LayerParameter()
    text_format.Parse(text, lp)
    return cls(lp, phase)


def ref_interp2(x, ho, wo):
    """caffe_cpu_interp2 (not packed) on each plane."""
    n, c, h, w = x.shape
    if (h, w) == (ho, wo):
        return x.copy()
    rh = F(h - 1) / F(ho - 1) if ho > 1 else F(0)
    rw = F(w - 1) / F(wo - 1) if wo > 1 else F(0)
    y = np.zeros((n, c, ho, wo), np.float64)
    for i in range(ho):
        h1r = F(rh * F(i))
        h1 = int(h1r)
        h1p = 1 if h1 < h - 1 else 0
        l1 = F(h1r - F(h1))
        l0 = F(1) - l1
        for j in range(wo):
            w1r = F(rw * F(j))
            w1 = int(w1r)
            w1p = 1 if w1 < w - 1 else 0
            m1 = F(w1r - F(w1))
            m0 = F(1) - m1
            y[:, :, i, j] = (l0 * (m0 * x[:, :, h1, w1] + m1 * x[:, :, h1, w1 + w1p])
                             + l1 * (m0 * x[:, :, h1 + h1p, w1] + m1 * x[:, :, h1 + h1p, w1 + w1p]))
    return y


def ref_bilinear(x, dh, dw, align):
    """BilinearInterpolateLayer::Forward_cpu."""
    n, c, sh, sw = x.shape

    def coords(src, dst):
        out = []
        for i in range(dst):
            if align:
                v = F(F(src - 1) / F(dst - 1) * F(i))
            else:
                v = F(float(F(src) / F(dst)) * (i + 0.5) - 0.5)
            v = min(max(v, F(0)), F(src - 1))
            i0 = min(max(math.floor(v), 0), src - 2)
            out.append((v, i0, i0 + 1))
        return out

    y = np.zeros((n, c, dh, dw), np.float64)
    for i, (hv, h0, h1) in enumerate(coords(sh, dh)):
        for j, (wv, w0, w1) in enumerate(coords(sw, dw)):
            r0 = (w1 - wv) * x[:, :, h0, w0] + (wv - w0) * x[:, :, h0, w1]
            r1 = (w1 - wv) * x[:, :, h1, w0] + (wv - w0) * x[:, :, h1, w1]
            y[:, :, i, j] = (h1 - hv) * r0 + (hv - h0) * r1
    return y


def ref_resize(x, dh, dw):
    """BiLinearResizeMat_cpu on each plane, every step rounded to float32 as the C++ does."""
    n, c, sh, sw = x.shape
    scale_w, scale_h = F(sw) / F(dw), F(sh) / F(dh)
    y = np.zeros((n, c, dh, dw), np.float32)
    for i in range(dh):
        fh = F(F(i) * scale_h)
        h = math.floor(fh)
        fh = F(fh - F(h))
        wh0, wh1 = abs(F(1) - fh), abs(fh)
        for j in range(dw):
            fw = F(F(j) * scale_w)
            w = math.floor(fw)
            fw = F(fw - F(w))
            ww0, ww1 = abs(F(1) - fw), abs(fw)
            v = wh0 * ww0 * x[:, :, h, w]
            flag = 0
            if w + 1 < sw:
                v = v + wh0 * ww1 * x[:, :, h, w + 1]
                flag += 1
            if h + 1 < sh:
                v = v + wh1 * ww0 * x[:, :, h + 1, w]
                flag += 1
            if flag > 1:
                v = v + wh1 * ww1 * x[:, :, h + 1, w + 1]
            y[:, :, i, j] = v
    return y


@pytest.mark.parametrize("hw,out", [((4, 5), (7, 9)), ((6, 6), (3, 4)), ((5, 3), (5, 3)), ((3, 4), (1, 6)),
                                    ((4, 4), (4, 9))])
def test_interp_matches_interp2(hw, out):
    x = rand(2, 3, *hw)
    np.testing.assert_allclose(Interp(x, height=out[0], width=out[1]), ref_interp2(x, *out),
                               rtol=1e-5, atol=1e-6)


def test_interp_crop_pads():
    x = rand(1, 2, 9, 8)
    got = Interp(x, height=5, width=4, pad_beg=-1, pad_end=-2)
    np.testing.assert_allclose(got, ref_interp2(x[:, :, 1:7, 1:6], 5, 4), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("param,bottoms,out", [
    ("zoom_factor: 3", 1, (10, 13)),                 # in + (in-1)*(z-1)
    ("shrink_factor: 2", 1, (2, 3)),                 # (in-1)//s + 1
    ("shrink_factor: 2 zoom_factor: 2", 1, (3, 5)),  # shrink then zoom
    ("height: 6 width: 2", 1, (6, 2)),
    ("zoom_factor: 2 pad_beg: -1 pad_end: -1", 1, (3, 5)),
    ("", 2, (7, 3)),                                  # size of the second bottom
])
def test_interp_layer_output_sizes(param, bottoms, out):
    extra = ' bottom: "ref"' if bottoms == 2 else ""
    lyr = make(InterpLayer,
               f'name: "i" type: "Interp" bottom: "x"{extra} top: "y" interp_param {{ {param} }}')
    shapes = [(1, 2, 4, 5)] + ([(1, 1, 7, 3)] if bottoms == 2 else [])
    assert lyr.reshape(shapes) == [(1, 2) + out]
    x = rand(1, 2, 4, 5)
    ip = lyr.lp.interp_param
    crop = x[:, :, -ip.pad_beg:4 + ip.pad_end, -ip.pad_beg:5 + ip.pad_end]
    np.testing.assert_allclose(lyr.forward([x] + [rand(*s) for s in shapes[1:]])[0], ref_interp2(crop, *out),
                               rtol=1e-5, atol=1e-6)


def test_interp_rejects_positive_pad_and_ambiguous_second_bottom():
    with pytest.raises(GraphError, match="non-positive"):
        make(InterpLayer,
             'name: "i" type: "Interp" bottom: "x" top: "y" interp_param { zoom_factor: 2 pad_beg: 1 }')
    with pytest.raises(GraphError, match="second bottom"):
        make(InterpLayer,
             'name: "i" type: "Interp" bottom: "x" bottom: "r" top: "y" interp_param { height: 3 }')


@pytest.mark.parametrize("align", [True, False])
@pytest.mark.parametrize("hw,out", [((4, 5), (7, 9)), ((6, 6), (3, 4)), ((5, 4), (5, 4)), ((1, 4), (3, 6))])
def test_bilinear_interpolate_matches_loops(align, hw, out):
    x = rand(1, 2, *hw)
    got = BilinearInterpolate(x, dst_h=out[0], dst_w=out[1], align_corners=align)
    np.testing.assert_allclose(got, ref_bilinear(x, *out, align), rtol=1e-5, atol=1e-6)


def test_bilinear_interpolate_layer_sizes_fixed_at_setup():
    lyr = make(BilinearInterpolateLayer, 'name: "b" type: "BilinearInterpolate" bottom: "x" top: "y" '
                                         'bilinear_interpolate_param { scale_factor: 1.5 '
                                         'align_corners: false }')
    assert lyr.reshape([(1, 2, 5, 4)]) == [(1, 2, 7, 6)]
    assert lyr.reshape([(1, 2, 8, 8)]) == [(1, 2, 7, 6)]  # Caffe computes dst in LayerSetUp only
    x = rand(1, 2, 8, 8)
    np.testing.assert_allclose(lyr.forward([x])[0], ref_bilinear(x, 7, 6, False), rtol=1e-5, atol=1e-6)
    lyr = make(BilinearInterpolateLayer, 'name: "b" type: "BilinearInterpolate" bottom: "x" top: "y" '
                                         'bilinear_interpolate_param { dst_h: 9 }')
    assert lyr.reshape([(1, 2, 5, 4)]) == [(1, 2, 9, 4)]
    with pytest.raises(GraphError, match="exactly one"):
        make(BilinearInterpolateLayer, 'name: "b" type: "BilinearInterpolate" bottom: "x" top: "y" '
                                       'bilinear_interpolate_param { dst_h: 9 scale_factor: 2 }')


@pytest.mark.parametrize("hw,out", [((4, 5), (8, 10)), ((4, 5), (7, 3)), ((6, 6), (6, 6)), ((3, 7), (5, 5))])
def test_resize_matches_loops(hw, out):
    x = rand(2, 1, *hw)
    np.testing.assert_array_equal(Resize(x, height=out[0], width=out[1]), ref_resize(x, *out))


def test_resize_layer_pyramid_mode():
    lyr = make(ResizeLayer, 'name: "r" type: "Resize" bottom: "x" top: "y" '
                            'resize_param { is_pyramid_test: true out_height_scale: 1.5 '
                            'out_width_scale: 0.5 }')
    assert lyr.reshape([(1, 3, 6, 8)]) == [(1, 3, 9, 4)]
    x = rand(1, 3, 6, 8)
    np.testing.assert_array_equal(lyr.forward([x])[0], ref_resize(x, 9, 4))


def test_upsample_nearest_fork_semantics():
    x = rand(2, 3, 2, 3)
    lyr = make(UpsampleLayer, 'name: "u" type: "Upsample" bottom: "x" top: "y" upsample_param { scale: 3 }')
    assert lyr.reshape([x.shape]) == [(2, 3, 6, 9)]
    (y,) = lyr.forward([x])
    for h in range(6):
        for w in range(9):
            np.testing.assert_array_equal(y[:, :, h, w], x[:, :, h // 3, w // 3])
    lyr = make(UpsampleLayer,
               'name: "u" type: "Upsample" bottom: "x" top: "y" upsample_param { scale: 2 dims_num: 3 }')
    x3 = rand(2, 3, 4)
    assert lyr.reshape([x3.shape]) == [(2, 3, 8)]
    np.testing.assert_array_equal(lyr.forward([x3])[0], np.repeat(x3, 2, axis=2))


def test_upsample_atc_stride_fields_if_the_schema_has_them():
    if "stride_h" not in caffe_pb().UpsampleParameter.DESCRIPTOR.fields_by_name:
        pytest.skip("schema without ATC's Upsample fields")
    lyr = make(UpsampleLayer, 'name: "u" type: "Upsample" bottom: "x" top: "y" '
                              'upsample_param { stride_h: 2 stride_w: 3 }')
    x = rand(1, 2, 2, 2)
    assert lyr.reshape([x.shape]) == [(1, 2, 4, 6)]
    np.testing.assert_array_equal(lyr.forward([x])[0], np.repeat(np.repeat(x, 2, axis=2), 3, axis=3))


def test_upsample_segnet_mask_form():
    x = np.abs(rand(1, 2, 6, 6)) + 0.1  # positive, so the zeros never win the re-pooling below
    pooled, mask = Pooling(x, pool="MAX", kernel=(2, 2), stride=(2, 2), return_mask=True)
    lyr = make(UpsampleLayer,
               'name: "u" type: "Upsample" bottom: "p" bottom: "m" top: "y" upsample_param { scale: 2 }')
    assert lyr.reshape([pooled.shape, mask.shape]) == [(1, 2, 6, 6)]
    (y,) = lyr.forward([pooled, mask])
    # every pooled maximum goes back to its place, all else is 0
    np.testing.assert_array_equal(np.where(y != 0, x, 0), y)
    np.testing.assert_array_equal(Pooling(y, pool="MAX", kernel=(2, 2), stride=(2, 2)), pooled)
    if "upsample_h" in caffe_pb().UpsampleParameter.DESCRIPTOR.fields_by_name:
        lyr = make(UpsampleLayer, 'name: "u" type: "Upsample" bottom: "p" bottom: "m" top: "y" '
                                  'upsample_param { upsample_h: 7 upsample_w: 6 }')
        assert lyr.reshape([pooled.shape, mask.shape]) == [(1, 2, 7, 6)]
