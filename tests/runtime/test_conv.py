"""Convolution / Deconvolution against direct loop implementations of Caffe's formulas."""

import itertools

import numpy as np
import pytest
from google.protobuf import text_format

from amct_caffe.errors import GraphError
from amct_caffe.io.schema import caffe_pb
from amct_caffe.runtime.blob import Blob
from amct_caffe.runtime.layers import conv, conv_plan
from amct_caffe.runtime.layers.conv import Convolution, ConvolutionLayer, Deconvolution, DeconvolutionLayer
from amct_caffe.runtime.layers.integer_ops import conv2d_exact

RNG = np.random.default_rng(7)


def ref_conv(x, w, b, stride, pad, dilation, group):
    """y[n,o,p] = b[o] + sum_{c,t} w[o,c,t] * x[n, g*Cg + c, p*s - pad + t*d] (zero outside)."""
    n, c = x.shape[:2]
    sp = x.shape[2:]
    o, cg = w.shape[:2]
    k = w.shape[2:]
    og = o // group
    # C++ int division truncates toward zero (base_conv_layer.cpp's compute_output_shape)
    out = [int((s + 2 * p - (d * (kk - 1) + 1)) / st) + 1
           for s, kk, st, p, d in zip(sp, k, stride, pad, dilation, strict=True)]
    y = np.zeros((n, o, *out), np.float64)
    for ni, oi in itertools.product(range(n), range(o)):
        g = oi // og
        for pos in itertools.product(*map(range, out)):
            acc = 0.0 if b is None else float(b[oi])
            for ci in range(cg):
                for t in itertools.product(*map(range, k)):
                    src = [q * st - p + tt * d
                           for q, st, p, tt, d in zip(pos, stride, pad, t, dilation, strict=True)]
                    if all(0 <= s_ < lim for s_, lim in zip(src, sp, strict=True)):
                        acc += w[(oi, ci, *t)] * x[(ni, g * cg + ci, *src)]
            y[(ni, oi, *pos)] = acc
    return y


def ref_deconv(x, w, b, stride, pad, dilation, group):
    """ypad[n, g*Og + o, i*s + t*d] += w[c, o, t] * x[n, c, i]; crop pad; add bias."""
    n, c = x.shape[:2]
    sp = x.shape[2:]
    og = w.shape[1]
    k = w.shape[2:]
    cg = c // group
    full = [st * (s - 1) + d * (kk - 1) + 1 for s, kk, st, d in zip(sp, k, stride, dilation, strict=True)]
    yp = np.zeros((n, og * group, *full), np.float64)
    for ni, ci in itertools.product(range(n), range(c)):
        g = ci // cg
        for pos in itertools.product(*map(range, sp)):
            for oi in range(og):
                for t in itertools.product(*map(range, k)):
                    dst = tuple(q * st + tt * d
                                for q, st, tt, d in zip(pos, stride, t, dilation, strict=True))
                    yp[(ni, g * og + oi, *dst)] += w[(ci, oi, *t)] * x[(ni, ci, *pos)]
    y = yp[(slice(None), slice(None), *[slice(p, f - p) for p, f in zip(pad, full, strict=True)])]
    if b is not None:
        y = y + b.reshape((-1,) + (1,) * len(sp))
    return y


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


CONV_CASES = [
    # (x shape, O, kernel, stride, pad, dilation, group)
    ((2, 3, 7, 6), 4, (3, 3), (1, 1), (0, 0), (1, 1), 1),
    ((1, 4, 8, 7), 6, (3, 2), (2, 1), (1, 2), (1, 1), 2),
    ((2, 3, 9, 9), 2, (3, 3), (2, 3), (2, 1), (2, 2), 1),  # dilation + unequal stride/pad
    ((2, 6, 6, 5), 6, (3, 3), (1, 1), (1, 1), (1, 1), 6),  # depthwise
    ((1, 4, 7, 7), 4, (5, 3), (2, 2), (2, 1), (1, 2), 4),  # depthwise, strided, dilated
    ((1, 4, 6, 6), 8, (3, 3), (1, 1), (1, 1), (1, 1), 4),  # group == C, multiplier 2
    ((2, 5, 6, 4), 3, (1, 1), (1, 1), (0, 0), (1, 1), 1),  # 1x1 plain matmul
    ((1, 4, 7, 5), 6, (1, 1), (2, 2), (0, 0), (1, 1), 2),  # 1x1 strided, grouped
    ((1, 2, 5, 5), 3, (1, 1), (1, 1), (1, 1), (1, 1), 1),  # 1x1 with pad goes through im2col
    ((1, 2, 5), 3, (3,), (2,), (1,), (1,), 1),  # 1-D
    ((1, 2, 4, 5, 4), 2, (2, 3, 2), (1, 2, 1), (1, 0, 1), (1, 1, 2), 2),  # 3-D
    # Caffe's output size truncates a negative (in + 2p - extent) / stride toward zero: one
    # output whose window reaches past the padded input, which reads zeros there
    ((2, 3, 1, 1), 2, (2, 2), (3, 3), (0, 0), (1, 1), 1),  # 2-wide kernel, stride 3, on a 1x1 map
    ((1, 2, 2, 5), 3, (5, 3), (2, 2), (1, 0), (1, 1), 1),  # kernel 5 > padded height 4
    ((1, 4, 4, 3), 2, (3, 3), (3, 2), (0, 0), (2, 1), 2),  # dilated extent 5 > 4, grouped
]


@pytest.mark.parametrize("shape,o,k,s,p,d,g", CONV_CASES)
def test_convolution_matches_loops(shape, o, k, s, p, d, g):
    x = rand(*shape)
    w = rand(o, shape[1] // g, *k)
    b = rand(o)
    got = Convolution(x, w, b, stride=s, pad=p, dilation=d, group=g)
    np.testing.assert_allclose(got, ref_conv(x, w, b, s, p, d, g), rtol=1e-4, atol=1e-4)
    assert got.dtype == np.float32


DECONV_CASES = [
    ((1, 3, 4, 5), 2, (3, 3), (2, 2), (1, 1), (1, 1), 1),
    ((2, 4, 3, 3), 6, (4, 2), (2, 3), (1, 0), (1, 2), 2),
    ((1, 4, 3, 4), 4, (3, 3), (1, 1), (0, 0), (2, 1), 4),
    ((1, 3, 4, 4), 2, (1, 1), (1, 1), (0, 0), (1, 1), 1),  # 1x1: no col2im
    ((1, 3, 4, 4), 2, (1, 1), (2, 2), (0, 0), (1, 1), 1),
    ((1, 2, 5), 3, (3,), (2,), (1,), (1,), 1),
]


@pytest.mark.parametrize("shape,o,k,s,p,d,g", DECONV_CASES)
def test_deconvolution_matches_loops(shape, o, k, s, p, d, g):
    x = rand(*shape)
    w = rand(shape[1], o // g, *k)
    b = rand(o)
    got = Deconvolution(x, w, b, stride=s, pad=p, dilation=d, group=g)
    np.testing.assert_allclose(got, ref_deconv(x, w, b, s, p, d, g), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("wide", [0, 1 << 30])
@pytest.mark.parametrize("budget", [1, 1 << 20])
@pytest.mark.parametrize("rows", [0, 1 << 30])
@pytest.mark.parametrize("stride,pad,dilation", [((1, 2), (1, 1), (1, 1)), ((1, 1), (2, 1), (2, 1)),
                                                 ((1, 1), (0, 0), (1, 2))])
def test_gemm_layouts_and_batch_chunks_agree(monkeypatch, wide, budget, rows, stride, pad, dilation):
    """Per-image or one wide GEMM, whole batch or one image at a time, tap-by-tap or whole-row
    columns: same numbers."""
    from amct_caffe.runtime.layers import conv_plan
    monkeypatch.setattr(conv_plan, "WIDE_GEMM_PIXELS", wide)
    monkeypatch.setattr(conv_plan, "COLS_BUDGET", budget)
    monkeypatch.setattr(conv_plan, "ROW_COLUMNS_WIDTH", rows)
    monkeypatch.setattr(conv_plan, "ROW_COLUMNS_MAX_OUT", rows)
    x = rand(3, 4, 6, 7)
    w = rand(6, 2, 3, 3)
    b = rand(6)
    got = Convolution(x, w, b, stride=stride, pad=pad, dilation=dilation, group=2)
    np.testing.assert_allclose(got, ref_conv(x, w, b, stride, pad, dilation, 2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("budget", [1, 800, 1 << 20])
@pytest.mark.parametrize("rows", [0, 1 << 30])
@pytest.mark.parametrize("stride,dilation", [((1, 1), (1, 1)), ((2, 1), (1, 2)), ((1, 1), (2, 1))])
def test_depthwise_chunks_agree(monkeypatch, budget, rows, stride, dilation):
    """Whole batch, one image, or a few channels of one image per chunk: same numbers."""
    from amct_caffe.runtime.layers import conv_plan
    monkeypatch.setattr(conv_plan, "COLS_BUDGET", budget)
    monkeypatch.setattr(conv_plan, "ROW_COLUMNS_WIDTH", rows)
    x = rand(2, 5, 7, 6)
    w = rand(5, 1, 3, 3)
    b = rand(5)
    got = Convolution(x, w, b, stride=stride, pad=1, dilation=dilation, group=5)
    np.testing.assert_allclose(got, ref_conv(x, w, b, stride, (1, 1), dilation, 5), rtol=1e-4, atol=1e-4)


def test_deconvolution_is_the_adjoint_of_convolution():
    x = rand(2, 3, 5, 7)
    w = rand(4, 3, 3, 3)
    y = Convolution(x, w, stride=2, pad=1)
    u = rand(*y.shape)
    v = Deconvolution(u, w, stride=2, pad=1)  # the conv weight (O, C, k, k) read as deconv's (C_in, O, k, k)
    assert v.shape == x.shape
    assert np.isclose(np.vdot(y, u), np.vdot(x, v), rtol=1e-4)


def make_layer(cls, text, bottom_shapes, phase=1):
    lp = caffe_pb().LayerParameter()
    text_format.Parse(text, lp)
    layer = cls(lp, phase)
    layer.blobs = [Blob(data=rand(*s)) for s in layer.param_shapes(bottom_shapes)]
    return layer, layer.reshape(bottom_shapes)


def test_layer_fields_kernel_hw_stride_hw_pad_hw_and_two_bottoms():
    text = ('name: "c" type: "Convolution" bottom: "a" bottom: "b" top: "a2" top: "b2" '
            'convolution_param { num_output: 4 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 '
            'pad_h: 1 pad_w: 0 '
            'group: 2 }')
    layer, tops = make_layer(ConvolutionLayer, text, [(2, 6, 7, 5)] * 2)
    assert [b.data.shape for b in layer.blobs] == [(4, 3, 3, 2), (4,)]
    assert tops == [(2, 4, 4, 4)] * 2
    x1, x2 = rand(2, 6, 7, 5), rand(2, 6, 7, 5)
    y1, y2 = layer.forward([x1, x2])
    w, b = layer.blobs[0].data, layer.blobs[1].data
    np.testing.assert_allclose(y2, ref_conv(x2, w, b, (2, 1), (1, 0), (1, 1), 2), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y1, ref_conv(x1, w, b, (2, 1), (1, 0), (1, 1), 2), rtol=1e-4, atol=1e-4)


def test_layer_output_size_truncates_toward_zero_like_cpp():
    # (1 + 0 - 2) / 3 + 1 is 1 in C++ (-1 / 3 == 0), 0 with Python's floor division
    text = ('name: "c" type: "Convolution" bottom: "a" top: "b" '
            'convolution_param { num_output: 2 kernel_size: 2 stride: 3 }')
    layer, tops = make_layer(ConvolutionLayer, text, [(1, 3, 1, 1)])
    assert tops == [(1, 2, 1, 1)]
    x = rand(1, 3, 1, 1)
    (y,) = layer.forward([x])
    w, b = layer.blobs[0].data, layer.blobs[1].data
    np.testing.assert_allclose(y[:, :, 0, 0], x[:, :, 0, 0] @ w[:, :, 0, 0].T + b, rtol=1e-5)


def test_layer_axis_and_no_bias():
    # axis 2: the leading axes (2, 3) are independent images; 1-D spatial axis of 9.
    text = ('name: "c" type: "Convolution" bottom: "a" top: "b" '
            'convolution_param { num_output: 2 kernel_size: 3 '
            'stride: 2 pad: 1 dilation: 2 bias_term: false axis: 2 }')
    layer, tops = make_layer(ConvolutionLayer, text, [(2, 3, 4, 9)])
    assert len(layer.blobs) == 1 and tops == [(2, 3, 2, 4)]
    x = rand(2, 3, 4, 9)
    (y,) = layer.forward([x])
    ref = ref_conv(x.reshape(6, 4, 9), layer.blobs[0].data, None, (2,), (1,), (2,), 1).reshape(2, 3, 2, 4)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_deconvolution_layer_shapes():
    text = ('name: "d" type: "Deconvolution" bottom: "a" top: "b" '
            'convolution_param { num_output: 6 kernel_size: 4 '
            'stride: 2 pad: 1 group: 3 }')
    layer, tops = make_layer(DeconvolutionLayer, text, [(1, 3, 5, 4)])
    assert [b.data.shape for b in layer.blobs] == [(3, 2, 4, 4), (6,)]
    assert tops == [(1, 6, 10, 8)]  # stride*(in-1) + k - 2*pad
    x = rand(1, 3, 5, 4)
    (y,) = layer.forward([x])
    ref = ref_deconv(x, layer.blobs[0].data, layer.blobs[1].data, (2, 2), (1, 1), (1, 1), 3)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_fillers_are_the_proto_messages():
    text = ('name: "c" type: "Convolution" bottom: "a" top: "b" '
            'convolution_param { num_output: 2 kernel_size: 1 '
            'weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0.5 } }')
    lp = caffe_pb().LayerParameter()
    text_format.Parse(text, lp)
    wf, bf = ConvolutionLayer(lp).param_fillers()
    assert wf.type == "xavier" and bf.value == pytest.approx(0.5)


@pytest.mark.parametrize("param,msg", [
    ("num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3", "not both"),
    ("num_output: 2", "kernel_size must be given"),
    ("num_output: 3 kernel_size: 1 group: 2", "multiple of group"),
    ("num_output: 2 kernel_size: 1 stride: 0", "must be positive"),
    ("num_output: 2 kernel_size: 9", "negative"),
])
def test_bad_fields_raise(param, msg):
    with pytest.raises(GraphError, match=msg):
        make_layer(ConvolutionLayer,
                   f'name: "c" type: "Convolution" bottom: "a" top: "b" convolution_param {{ {param} }}',
                   [(1, 2, 5, 5)])


def test_weight_shape_mismatch_raises():
    text = ('name: "c" type: "Convolution" bottom: "a" top: "b" '
            'convolution_param { num_output: 2 kernel_size: 3 }')
    layer, _ = make_layer(ConvolutionLayer, text, [(1, 2, 5, 5)])
    with pytest.raises(GraphError, match="does not fit"):
        layer.reshape([(1, 3, 5, 5)])


# Every layer family of conv.py / pooling.py / inner_product.py / resize.py in one net, with
# parameter variants the shared models lack; official Caffe fills the weights and computes.
_CROSS_CHECK_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 9 dim: 11 } } }
layer { name: "conv_g" type: "Convolution" bottom: "data" top: "conv_g" convolution_param { num_output: 6
  kernel_size: 3 stride: 2 pad: 1 group: 2 weight_filler { type: "gaussian" std: 0.3 }
  bias_filler { type: "gaussian" std: 0.3 } } }
layer { name: "conv_hw" type: "Convolution" bottom: "data" top: "conv_hw" convolution_param { num_output: 5
  kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 2 pad_h: 2 pad_w: 0 dilation: 2
  weight_filler { type: "xavier" } bias_filler { type: "gaussian" std: 0.3 } } }
layer { name: "conv_dw" type: "Convolution" bottom: "data" top: "conv_dw" convolution_param { num_output: 4
  kernel_size: 3 pad: 1 group: 4 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "conv_1x1" type: "Convolution" bottom: "data" top: "conv_1x1" convolution_param { num_output: 3
  kernel_size: 1 stride: 2 weight_filler { type: "gaussian" std: 0.3 } bias_term: false } }
layer { name: "deconv" type: "Deconvolution" bottom: "conv_dw" top: "deconv" convolution_param { num_output: 6
  kernel_size: 4 stride: 2 pad: 1 group: 2 weight_filler { type: "gaussian" std: 0.3 }
  bias_filler { type: "gaussian" std: 0.3 } } }
layer { name: "deconv_hw" type: "Deconvolution" bottom: "conv_g" top: "deconv_hw" convolution_param {
  num_output: 2 kernel_h: 3 kernel_w: 2 stride_h: 3 stride_w: 1 pad_h: 1 dilation: 2
  weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "pool_max" type: "Pooling" bottom: "data" top: "pool_max" top: "pool_mask" pooling_param {
  pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "pool_ave" type: "Pooling" bottom: "data" top: "pool_ave" pooling_param { pool: AVE kernel_h: 3
  kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 1 } }
layer { name: "pool_floor" type: "Pooling" bottom: "data" top: "pool_floor" pooling_param { pool: AVE
  kernel_size: 2 stride: 2 pad: 1 ceil_mode: false } }
layer { name: "pool_global" type: "Pooling" bottom: "conv_hw" top: "pool_global" pooling_param { pool: MAX
  global_pooling: true } }
layer { name: "unpool" type: "MaxUnPool" bottom: "pool_max" bottom: "pool_mask" top: "unpool"
  max_unpool_param { dst_h: 9 dst_w: 11 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool_max" top: "ip" inner_product_param { num_output: 7
  weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.3 } } }
layer { name: "ip_t" type: "InnerProduct" bottom: "conv_g" top: "ip_t" inner_product_param { num_output: 3
  axis: 2 transpose: true weight_filler { type: "gaussian" std: 0.3 }
  bias_filler { type: "gaussian" std: 0.3 } } }
layer { name: "up" type: "Upsample" bottom: "conv_g" top: "up" upsample_param { scale: 3 } }
layer { name: "bil" type: "BilinearInterpolate" bottom: "conv_g" top: "bil"
  bilinear_interpolate_param { dst_h: 13 dst_w: 7 align_corners: false } }
layer { name: "bil_ac" type: "BilinearInterpolate" bottom: "data" top: "bil_ac"
  bilinear_interpolate_param { scale_factor: 1.5 } }
layer { name: "resize" type: "Resize" bottom: "data" top: "resize" resize_param { height: 14 width: 6 } }
layer { name: "spp" type: "SPP" bottom: "data" top: "spp" spp_param { pyramid_height: 3 pool: MAX } }
layer { name: "spp_ave" type: "SPP" bottom: "conv_g" top: "spp_ave" spp_param { pyramid_height: 2 pool: AVE} }
"""


@pytest.mark.real_caffe
def test_conv_pool_ip_resize_layers_match_real_caffe(tmp_path):
    from tests.real_caffe import run_with_pycaffe

    proto = tmp_path / "net.prototxt"
    proto.write_text(_CROSS_CHECK_NET)
    code = f"""
import numpy as np
import caffe
from amct_caffe.runtime import Net, TEST
proto, weights = {str(proto)!r}, {str(tmp_path / 'net.caffemodel')!r}
x = np.random.default_rng(1).standard_normal((2, 4, 9, 11)).astype(np.float32)
ref = caffe.Net(proto, caffe.TEST)
ref.save(weights)
ref.blobs['data'].data[...] = x
ref.forward()
ours = Net(proto, weights, TEST)
ours.forward(data=x)
for name, blob in ref.blobs.items():
    if "_split_" in name:  # copies made by Caffe's automatic Split layers
        continue
    a, b = blob.data, ours.blobs[name].data
    assert a.shape == b.shape, (name, a.shape, b.shape)
    print(name, float(np.abs(a - b).max()), float(np.abs(a).max()))
"""
    res = run_with_pycaffe(code)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split() for line in res.stdout.strip().splitlines()]
    assert len(rows) == 21, rows  # data + 20 tops
    bad = [r for r in rows if float(r[1]) > 1e-5 * max(1.0, float(r[2]))]
    assert not bad, bad


@pytest.mark.parametrize("shape,k,s,p,d,g", [
    ((2, 3, 4, 9), 3, 3, (0, 1), 2, 1),     # dilated kernel (5) longer than the input height (4)
    ((1, 4, 1, 1), 2, 3, (0, 0), 1, 2),     # (1 - 2) / 3 + 1 == 1 in C++
    ((1, 2, 6, 5), 3, 2, (1, 1), 1, 1),
])
def test_deploy_integer_convolution_agrees_with_caffes_loops(shape, k, s, p, d, g):
    """The deploy model's exact INT8 convolution, also where the kernel overruns the padded input."""
    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, shape).astype(np.float64)
    w = rng.integers(-128, 128, (4, shape[1] // g, k, k)).astype(np.float64)
    b = rng.integers(-1000, 1000, 4).astype(np.float64)
    got = conv2d_exact(x, w, b, (s, s), p, (d, d), g)
    np.testing.assert_array_equal(got, ref_conv(x, w, b, (s, s), p, (d, d), g))


def _assert_depthwise_kernel_bytes(fast, simd_limit, monkeypatch, x, weight, bias, **geometry):
    """``fast``, the depthwise kernel's output, against what it must equal: the NumPy path's bytes (Caffe's
    sums) where numpy's BLAS sums like Caffe's (``caffe_gemm.exact``); elsewhere, where numpy's own products
    sum in another order, the kernel's portable loops' bytes (one fused multiply-add per tap in tap order)
    and the NumPy path within float32 rounding."""
    c = weight.shape[0]
    kernel = conv_plan.DEPTHWISE_KERNEL
    monkeypatch.setattr(conv_plan, "DEPTHWISE_KERNEL", None)
    ref = Convolution(x, weight, bias, group=c, **geometry)
    monkeypatch.setattr(conv_plan, "DEPTHWISE_KERNEL", kernel)
    assert fast.shape == ref.shape
    if not conv_plan.caffe_gemm.exact():
        np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-5)
        simd_limit(0)
        ref = Convolution(x, weight, bias, group=c, **geometry)
    np.testing.assert_array_equal(fast.view(np.int32), ref.view(np.int32))


@pytest.mark.skipif(conv_plan.DEPTHWISE_KERNEL is None, reason="amct_caffe._kernels not built")
@pytest.mark.parametrize("stride,pad,with_bias", [((2, 2), (1, 1), True), ((2, 2), (0, 0), False),
                                                  ((1, 2), (1, 0), True), ((3, 3), (1, 1), True),
                                                  ((2, 3), (0, 1), False)])
def test_depthwise_3x3_strided_in_registers_gives_the_same_bytes(stride, pad, with_bias, monkeypatch, simd_limit):
    """The 3x3 strided loop that keeps one output's nine taps in a register: the NumPy path's bytes."""
    rng = np.random.default_rng(sum(stride) * 7 + pad[0])
    x = rng.standard_normal((2, 5, 23, 31)).astype(np.float32)
    x[x < -1.5] = 0.0
    weight = rng.standard_normal((5, 1, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32) if with_bias else None
    fast = conv.Convolution(x, weight, bias, stride=stride, pad=pad, group=5)
    _assert_depthwise_kernel_bytes(fast, simd_limit, monkeypatch, x, weight, bias, stride=stride, pad=pad)


@pytest.mark.skipif(conv_plan.DEPTHWISE_KERNEL is None, reason="amct_caffe._kernels not built")
@pytest.mark.parametrize("width", [1, 2, 7, 8, 9, 15, 16, 17, 23, 25, 31, 33, 48, 50])
@pytest.mark.parametrize("pad,with_bias", [((1, 1), True), ((0, 0), False), ((2, 1), True), ((1, 0), False)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("level", [2, 1, 0])
def test_depthwise_3x3_rows_in_registers_give_the_same_bytes(width, pad, with_bias, stride, level, monkeypatch,
                                                             simd_limit):
    """The 3x3 rows computed 16 (AVX-512) or 8 (AVX2) outputs per register (the last ones masked or stored
    through the stack; at column stride 2 gathered by permutes / shuffles), and the portable loops (level
    0): the NumPy path's bytes, zero signs included, on widths around the lanes."""
    from amct_caffe import _kernels

    simd_limit(level)
    if _kernels.simd_level() < level:
        pytest.skip("the CPU lacks this vector width")
    rng = np.random.default_rng(width * 5 + pad[0] + 100 * stride)
    w = (width - 1) * stride + 3 - 2 * pad[1]  # the input width that gives `width` outputs
    if w < 1:
        pytest.skip("no input for that output width")
    x = rng.standard_normal((2, 3, 7, w)).astype(np.float32)
    x[x < -0.5] = 0.0
    weight = rng.standard_normal((3, 1, 3, 3)).astype(np.float32)
    weight[0, 0, 1] = -0.0
    bias = rng.standard_normal(3).astype(np.float32) if with_bias else None
    x[0, 1, 2, :2] = np.nan
    fast = conv.Convolution(x, weight, bias, stride=(stride, stride), pad=pad, group=3)
    assert fast.shape[-1] == width
    _assert_depthwise_kernel_bytes(fast, simd_limit, monkeypatch, x, weight, bias, stride=(stride, stride), pad=pad)


@pytest.mark.skipif(conv_plan.DEPTHWISE_KERNEL is None, reason="amct_caffe._kernels not built")
@pytest.mark.parametrize("seed", range(12))
def test_depthwise_kernel_gives_the_bytes_of_the_numpy_products(seed, monkeypatch, simd_limit):
    """The C++ depthwise loops (one FMA per tap, in tap order) against the NumPy path they replace."""
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(1, 4)), int(rng.integers(1, 9))
    kh, kw = (int(v) for v in rng.integers(1, 6, 2))
    stride, dilation = tuple(int(v) for v in rng.integers(1, 4, 2)), tuple(int(v) for v in rng.integers(1, 3, 2))
    pad = tuple(int(v) for v in rng.integers(0, 3, 2))
    h, w = (int(v) for v in rng.integers(max(kh, kw) * 2, 40, 2))
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    x[x < -1.5] = 0.0  # exact zeros: the signs of zero sums must agree too
    weight = rng.standard_normal((c, 1, kh, kw)).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    fast = conv.Convolution(x, weight, bias, stride=stride, pad=pad, dilation=dilation, group=c)
    if not conv_plan.caffe_gemm.exact():
        _assert_depthwise_kernel_bytes(fast, simd_limit, monkeypatch, x, weight, bias, stride=stride, pad=pad,
                                       dilation=dilation)
        return
    monkeypatch.setattr(conv_plan, "DEPTHWISE_KERNEL", None)
    ref = conv.Convolution(x, weight, bias, stride=stride, pad=pad, dilation=dilation, group=c)
    assert fast.shape == ref.shape
    if kh * kw == 4 and fast[0, 0].size <= 1024:
        # numpy sends these products (one row, 4 taps, few pixels) to an sgemv kernel that pairs the
        # taps; Caffe's sgemm sums them one by one like the C++ loops (checked with pycaffe: a 2x2
        # depthwise convolution of a 19x19 map, the loops equal Caffe's, numpy's differs in 10 values)
        np.testing.assert_allclose(fast, ref, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(fast.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize(("k", "s", "p", "g"), [(1, 1, 0, 1), (1, 2, 0, 1), (1, 1, 0, 2), (3, 1, 1, 1), (3, 2, 0, 4)])
def test_an_empty_batch_gives_an_empty_top(k, s, p, g):
    """A batch of 0 images (Caffe's Blob allows a count of 0; its convolution then loops over no image): the top
    is (0, O, *out), as the reference gives it, on every path (the 1x1 GEMM once tried to reshape it)."""
    x = np.zeros((0, 4, 7, 6), np.float32)
    w = np.ones((8, 4 // g, k, k), np.float32)
    b = np.ones(8, np.float32)
    y = Convolution(x, w, b, stride=s, pad=p, group=g)
    assert y.shape == ref_conv(x, w, b, (s, s), (p, p), (1, 1), g).shape and y.dtype == np.float32


@pytest.mark.parametrize("cls", [ConvolutionLayer, DeconvolutionLayer])
def test_a_channel_axis_without_spatial_axes_points_to_the_inner_product(cls):
    """Caffe takes a channel axis that is the bottom's last (a product over the channels); the executor
    refuses it and names the InnerProduct that computes the same (docs/differential.md)."""
    text = 'name: "c" type: "Convolution" convolution_param { num_output: 2 kernel_size: 1 axis: 3 }'
    with pytest.raises(GraphError, match="no spatial axis after channel axis 3: .*InnerProduct with axis: 3"):
        make_layer(cls, text, [(2, 3, 4, 5)])
