"""The executor's C++ forward helpers (csrc/src/conv_cols.cpp, the depthwise bias) against the NumPy
paths they replace: copies, compares and the same float32 roundings, so the same bytes."""

import numpy as np
import pytest

from amct_caffe.runtime import fold
from amct_caffe.runtime.layers import activation, conv, conv_cols, conv_plan, pooling
from amct_caffe.runtime.layers.integer_ops import conv2d_exact
from amct_caffe.runtime.layers.pooling import Pooling

pytestmark = pytest.mark.skipif(conv_cols.IM2COL_KERNEL is None, reason="amct_caffe._kernels not built")


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint32)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("batch_last", [False, True])
def test_im2col_is_the_padded_copy(seed, batch_last):
    rng = np.random.default_rng(seed)
    n, c = (int(v) for v in rng.integers(1, 4, 2))
    k = tuple(int(v) for v in rng.integers(1, 6, 2))
    s, d, p = (tuple(int(v) for v in rng.integers(lo, hi, 2)) for lo, hi in ((1, 4), (1, 3), (0, 4)))
    h, w = (int(v) for v in rng.integers(max(k) * 2, 20, 2))
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    out = [conv.conv_out_size(*a) for a in zip((h, w), k, s, p, d, strict=True)]
    want = conv_cols.im2col(conv_cols.padded(x, p), k, s, d, out, batch_last).copy()
    np.testing.assert_array_equal(conv_cols.im2col_2d(x, k, s, p, d, out, batch_last), want)


@pytest.mark.parametrize("seed", range(10))
def test_pooling_kernels(seed):
    rng = np.random.default_rng(seed)
    k = tuple(int(v) for v in rng.integers(1, 5, 2))
    s = tuple(int(v) for v in rng.integers(1, 4, 2))
    p = tuple(int(v) for v in rng.integers(0, 2, 2)) if min(k) > 1 else (0, 0)
    x = rng.standard_normal((2, 3) + tuple(int(v) for v in rng.integers(max(k), 15, 2))).astype(np.float32)
    x[0, 0, 0, :2] = np.nan
    x[1, 1, 1, :] = -0.0
    x[1, 2, :, 0] = 0.0
    args = dict(kernel=k, stride=s, pad=p)
    np.testing.assert_array_equal(_bits(Pooling(x, pool="MAX", **args)),
                                  _bits(Pooling(x, pool="MAX", native=False, **args)))
    np.testing.assert_array_equal(_bits(Pooling(x, pool="MAX", global_pooling=True)),
                                  _bits(Pooling(x, pool="MAX", global_pooling=True, native=False)))


def test_pooling_threads_split_planes(monkeypatch):
    x = np.random.default_rng(0).standard_normal((3, 5, 17, 13)).astype(np.float32)
    one = Pooling(x, pool="MAX", kernel=(3, 3), stride=(2, 2), pad=(1, 1))
    monkeypatch.setattr(pooling, "THREADED_POOL", 0)
    monkeypatch.setattr(pooling.threads, "workers", lambda: 3)
    np.testing.assert_array_equal(_bits(Pooling(x, pool="MAX", kernel=(3, 3), stride=(2, 2), pad=(1, 1))), _bits(one))


def test_channel_epilogue_and_residual_sum():
    rng = np.random.default_rng(2)
    y = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    y[0, 0, 0, :3] = (np.nan, -0.0, np.inf)
    a, b = (rng.standard_normal(4).astype(np.float32) for _ in range(2))
    for args in ((a, b, True), (a, None, False), (None, b, True), (None, None, True)):
        got, want = y.copy(), y.copy()
        fold.AFFINE_KERNEL(got, *args, 2)
        with np.errstate(invalid="ignore"):
            if args[0] is not None:
                want *= a.reshape(-1, 1, 1)
            if args[1] is not None:
                want += b.reshape(-1, 1, 1)
            if args[2]:
                np.maximum(want, np.float32(0), out=want)
        np.testing.assert_array_equal(_bits(got), _bits(want))
    z = rng.standard_normal(y.shape).astype(np.float32)
    with np.errstate(invalid="ignore"):
        want = np.maximum(y + z, np.float32(0))
    np.testing.assert_array_equal(_bits(fold.ADD_RELU_KERNEL(y, z, 2)), _bits(want))


@pytest.mark.skipif(not conv_plan.caffe_gemm.exact(),
                    reason="numpy's BLAS here sums a product differently as its columns are split differently")
@pytest.mark.parametrize("stride", [1, 2])
def test_wide_1x1_gives_the_per_image_bytes(stride, monkeypatch):
    rng = np.random.default_rng(stride)
    x = rng.standard_normal((4, 24, 9, 9)).astype(np.float32)
    w = rng.standard_normal((16, 24, 1, 1)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    wide = conv.Convolution(x, w, b, stride=stride)
    monkeypatch.setattr(conv_plan, "WIDE_1X1_PIXELS", 0)
    np.testing.assert_array_equal(_bits(wide), _bits(conv.Convolution(x, w, b, stride=stride)))


@pytest.mark.skipif(not conv_plan.DEPTHWISE_BIAS, reason="depthwise kernel without the bias argument")
def test_depthwise_bias_in_the_kernel_is_the_numpy_add(monkeypatch):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 5, 11, 12)).astype(np.float32)
    w = rng.standard_normal((5, 1, 3, 3)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    got = conv.Convolution(x, w, b, pad=1, group=5)
    monkeypatch.setattr(conv_plan, "DEPTHWISE_BIAS", False)
    np.testing.assert_array_equal(_bits(got), _bits(conv.Convolution(x, w, b, pad=1, group=5)))


# the direct kernel runs here (a CPU with AVX2, amct/cpu.h)
DIRECT = conv_plan.DIRECT_KERNEL is not None and conv_plan.simd_level() >= 1


def _vector_levels(simd_limit) -> list[int]:
    """The vector widths of the register-block kernels this CPU can run: 1 (AVX2), 2 (AVX-512)."""
    simd_limit(2)
    return [level for level in (1, 2) if level <= conv_plan.simd_level()]


@pytest.mark.skipif(not DIRECT or not conv_plan.caffe_gemm.exact(),
                    reason="direct kernel needs AVX2 and numpy's OpenBLAS rounding like Caffe's")
@pytest.mark.parametrize("seed", range(12))
def test_direct_kernel_gives_numpy_gemm_bytes(seed, monkeypatch):
    """Short contractions without columns: the bytes of the column GEMM they replace (zeros included)."""
    rng = np.random.default_rng(seed)
    c = int(rng.integers(1, 9))
    k = tuple(int(v) for v in rng.integers(1, 4, 2))
    s, d, p = (tuple(int(v) for v in rng.integers(lo, hi, 2)) for lo, hi in ((1, 3), (1, 3), (0, 3)))
    o = int(rng.integers(1, 64))
    x = rng.standard_normal((int(rng.integers(1, 3)), c, int(rng.integers(20, 70)), int(rng.integers(40, 90))))
    x = np.where(x < -1, 0, x).astype(np.float32)
    w = rng.standard_normal((o, c) + k).astype(np.float32)
    if seed % 3 == 0:  # a 1x1 stride-1 layer: flattened planes
        w, s, p, d = w[:, :, :1, :1].copy(), (1, 1), (0, 0), (1, 1)
    calls = []
    real = conv_plan.DIRECT_KERNEL
    monkeypatch.setattr(conv_plan, "DIRECT_KERNEL", lambda *a: calls.append(1) or real(*a))
    got = conv.Convolution(x, w, stride=s, pad=p, dilation=d)
    monkeypatch.setattr(conv_plan, "DIRECT_KERNEL", None)
    want = conv.Convolution(x, w, stride=s, pad=p, dilation=d)
    assert calls or got.shape[3] < 16 or conv_plan.caffe_gemm.conv_gemms(o, got[0, 0].size, w[0].size).same_shape
    np.testing.assert_array_equal(_bits(got), _bits(want))


@pytest.mark.skipif(not DIRECT, reason="direct kernel needs AVX2")
def test_direct_kernel_bytes_do_not_depend_on_the_thread_count():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 3, 61, 83)).astype(np.float32)
    w = rng.standard_normal((11, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(11).astype(np.float32)
    out = [conv.conv_out_size(61, 3, 2, 1, 1), conv.conv_out_size(83, 3, 2, 1, 1)]
    ys = [conv_plan.DIRECT_KERNEL(x, w, [2, 2], [1, 1], [1, 1], out, t, b) for t in (1, 2, 3)]
    for y in ys[1:]:
        np.testing.assert_array_equal(_bits(y), _bits(ys[0]))


@pytest.mark.skipif(activation.PRELU_KERNEL is None, reason="amct_caffe._kernels without prelu")
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shared", [False, True])
def test_prelu_kernel_is_the_numpy_prelu(seed, shared):
    """Slopes in (0, 1] (NumPy's maximum branch), negative, zero and above 1 (its copyto branch); NaN,
    -0 and +0 inputs; 2 to 4 axes; one thread or several."""
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 4)), int(rng.integers(1, 9))) + tuple(int(v) for v in rng.integers(1, 30, seed % 3))
    x = rng.standard_normal(shape).astype(np.float32)
    x.reshape(-1)[::7] = -0.0
    x.reshape(-1)[1::11] = 0.0
    x.reshape(-1)[2::13] = np.nan
    if shared:
        slope = np.array(rng.choice([0.25, -0.5, 0.0, 1.7]), np.float32).reshape(())
    else:
        slope = (rng.standard_normal(shape[1]) if seed % 2 else rng.uniform(0.01, 1, shape[1])).astype(np.float32)
    want = activation.PReLU(x, slope)
    for threads in (1, 3):
        np.testing.assert_array_equal(_bits(activation.PRELU_KERNEL(x, slope, threads)), _bits(want))


@pytest.mark.skipif(not DIRECT or not conv_plan.caffe_gemm.exact(),
                    reason="direct kernel needs AVX2 and numpy's OpenBLAS rounding like Caffe's")
@pytest.mark.parametrize("c,k,o,stride,pad",
                         [(3, 7, 64, 2, 3), (24, 3, 48, 1, 1), (28, 3, 16, 2, 0), (10, 5, 64, 1, 2)])
def test_direct_kernel_with_longer_spatial_contractions(c, k, o, stride, pad, monkeypatch):
    """Kernels of several taps run direct up to K = 256 (open_nsfw's 7x7/2 conv_1 has K = 147): still the
    bytes of the column GEMM, bias included."""
    rng = np.random.default_rng(c * k)
    x = rng.standard_normal((2, c, 37, 70)).astype(np.float32)
    w = (rng.standard_normal((o, c, k, k)) * 0.1).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    plan = conv_plan.conv_plan(x.shape, w.shape, (stride,) * 2, (pad,) * 2, (1, 1), 1)
    assert plan.kind == "direct"
    got = conv.Convolution(x, w, b, stride=stride, pad=pad)
    monkeypatch.setattr(conv_plan, "DIRECT_KERNEL", None)
    np.testing.assert_array_equal(_bits(got), _bits(conv.Convolution(x, w, b, stride=stride, pad=pad)))


@pytest.mark.skipif(conv_plan.DIRECT_AFFINE_KERNEL is None or not DIRECT, reason="direct kernel needs AVX2")
@pytest.mark.parametrize("seed", range(8))
def test_direct_kernel_epilogue_is_the_separate_pass(seed):
    """A folded chain's epilogue applied in the direct kernel's stores (ConvPlan.fused): the bytes of the
    convolution followed by fold._affine (scale and / or bias, ReLU; NaN and zeros in the input)."""
    rng = np.random.default_rng(seed)
    c, k, o, stride, pad = [(3, 7, 64, 2, 3), (16, 1, 32, 1, 0), (8, 3, 24, 1, 1), (6, 3, 32, 2, 0)][seed % 4]
    x = rng.standard_normal((2, c, 48, 61)).astype(np.float32)
    x[0, 0, :3] = 0.0
    x[1, 0, 5, 7] = np.nan
    w = (rng.standard_normal((o, c, k, k)) * 0.2).astype(np.float32)
    scale = rng.standard_normal(o).astype(np.float32) if seed % 2 else None
    bias = rng.standard_normal(o).astype(np.float32) if seed % 3 else None
    relu = seed % 4 != 3
    plan = conv_plan.conv_plan(x.shape, w.shape, (stride,) * 2, (pad,) * 2, (1, 1), 1)
    assert plan.kind == "direct"
    got = plan.fused(x, w, scale, bias, relu)
    want = conv.Convolution(x, w, None, stride=stride, pad=pad)
    with np.errstate(invalid="ignore"):
        fold._affine(want, scale, bias, relu)
    np.testing.assert_array_equal(_bits(got), _bits(want))


def test_relu_kernel_is_numpys_maximum_with_zero_on_every_kind_of_float():
    """NaNs of both signs and any payload kept, -0 and negatives to +0, denormals, infinities: the bytes of
    np.maximum(x, 0), which the prepared ReLU step used before; with any thread count and into its top's array."""
    bits = np.arange(0, 2**32, 65521, dtype=np.uint64).astype(np.uint32)
    special = np.array([0x80000000, 0x7FC00001, 0xFFC00002, 0x7F800000, 0xFF800000, 1, 0x80000001], np.uint32)
    x = np.concatenate([bits, special]).view(np.float32)
    want = np.maximum(x, np.float32(0))
    for threads in (1, 3):
        into = np.empty_like(x)
        got = activation.RELU_KERNEL(x, threads, into)
        assert got is into
        np.testing.assert_array_equal(_bits(got), _bits(want))
    # an array overlapping the input is not written into (a shifted view would feed results forward)
    buf = np.random.default_rng(1).standard_normal(40001).astype(np.float32)
    src, shifted = buf[:40000], buf[1:]
    want = np.maximum(src, np.float32(0))
    got = activation.RELU_KERNEL(src, 2, shifted)
    assert got is not shifted
    np.testing.assert_array_equal(_bits(got), _bits(want))


def test_prepared_relu_steps_give_numpys_bytes(monkeypatch):
    layer_forward = activation._ReLUNeuron.prepared_forward_into  # noqa: SLF001 - the step under test

    class Fake:
        kwargs = {"negative_slope": 0.0}

    x = np.random.default_rng(0).standard_normal((2, 3, 33, 17)).astype(np.float32)
    x[0, 0, 0, :3] = [np.nan, -0.0, -np.inf]
    step = layer_forward(Fake(), [x.shape])
    got = step([x], [None])[0].copy()
    monkeypatch.setattr(activation, "RELU_KERNEL", None)
    np.testing.assert_array_equal(_bits(got), _bits(step([x], [None])[0]))


@pytest.mark.skipif(conv_plan.DIRECT_AFFINE_KERNEL is None or not DIRECT, reason="direct kernel needs AVX2")
@pytest.mark.parametrize("seed", range(10))
def test_direct_kernel_is_exact_on_integers_and_the_same_on_every_vector_width(seed, simd_limit):
    """Both register blocks (AVX2: 24 pixels, four channels a pass, taps in chunks of 64; AVX-512: 48 pixels,
    eight channels): on small integers, whose sums are exact in any order, the exact convolution (taps,
    padding, strides, partial blocks of pixels and channels, the epilogue of a folded chain); on floats, the
    same bytes on both widths (each sum the same chain of fused multiply-adds)."""
    rng = np.random.default_rng(seed)
    kh, kw = (int(v) for v in rng.integers(1, 4, 2))
    c = int(rng.integers(1, 256 // (kh * kw) + 1))  # K = c*kh*kw up to 256, across the chunks of 64
    o = int(rng.integers(1, 21))
    stride, pad = [int(v) for v in rng.integers(1, 3, 2)], [int(v) for v in rng.integers(0, 2, 2)]
    shape = (int(rng.integers(1, 3)), c, int(rng.integers(kh, 12)), int(rng.integers(kw, 80)))
    out = [conv.conv_out_size(shape[2], kh, stride[0], pad[0], 1),
           conv.conv_out_size(shape[3], kw, stride[1], pad[1], 1)]
    xi, wi = rng.integers(-8, 9, shape), rng.integers(-4, 5, (o, c, kh, kw))
    bi, scale = rng.integers(-50, 50, o), 2.0 ** rng.integers(-2, 3, o)
    exact = conv2d_exact(xi.astype(np.float64), wi.astype(np.float64), None, stride, pad, (1, 1), 1)
    xf, wf = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(wi.shape).astype(np.float32)
    xf.reshape(-1)[::97] = np.nan  # (the ReLU keeps NaN and stores -0 as +0 on both widths)
    xf.reshape(-1)[1::89] = -0.0
    f32 = np.float32
    floats = []
    for level in _vector_levels(simd_limit):
        simd_limit(level)
        got = conv_plan.DIRECT_KERNEL(xi.astype(f32), wi.astype(f32), stride, pad, [1, 1], out, 1, bi.astype(f32))
        np.testing.assert_array_equal(got, (exact + bi[:, None, None]).astype(f32))
        got = conv_plan.DIRECT_AFFINE_KERNEL(xi.astype(f32), wi.astype(f32), stride, pad, [1, 1], out, 1,
                                             scale.astype(f32), bi.astype(f32), True)
        np.testing.assert_array_equal(got, np.maximum(exact * scale[:, None, None] + bi[:, None, None], 0).astype(f32))
        floats.append([conv_plan.DIRECT_KERNEL(xf, wf, stride, pad, [1, 1], out, 1, None),
                       conv_plan.DIRECT_AFFINE_KERNEL(xf, wf, stride, pad, [1, 1], out, 1, wf[:, 0, 0, 0].copy(),
                                                      xf[0, 0, 0, :o].copy() if shape[3] >= o else None, True)])
    for width in floats[1:]:
        for a, b in zip(width, floats[0], strict=True):
            np.testing.assert_array_equal(_bits(a), _bits(b))
