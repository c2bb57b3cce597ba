import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from amct_caffe.errors import ConfigError
from amct_caffe.quant import (QuantizationError, arq_quantize_weight, arq_retrain_backward, dequantize_bias,
                              quantize_bias)

from .conftest import finite_f32, requires_kernels

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)
BACKENDS = ["reference", pytest.param("kernel", marks=requires_kernels)]


def assert_same(a, b):
    np.testing.assert_array_equal(a.scale, b.scale)
    np.testing.assert_array_equal(a.offset, b.offset)
    np.testing.assert_array_equal(a.quantized, b.quantized)
    np.testing.assert_array_equal(a.fake, b.fake)


@requires_kernels
@SETTINGS
@given(w=hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 3),
                                          st.integers(1, 3)), elements=finite_f32),
       channel_wise=st.booleans(), num_bits=st.sampled_from([8, 4]))
def test_conv_kernel_matches_reference(w, channel_wise, num_bits):
    for layer_type in ("Convolution", "DepthwiseConv"):
        assert_same(arq_quantize_weight(w, layer_type, channel_wise, num_bits, backend="reference"),
                    arq_quantize_weight(w, layer_type, channel_wise, num_bits, backend="kernel"))


@requires_kernels
@pytest.mark.parametrize("group", [1, 2, 4])
def test_deconv_kernel_matches_reference(group):
    w = np.random.default_rng(group).standard_normal((8, 3, 2, 2)).astype(np.float32)
    assert_same(arq_quantize_weight(w, "Deconvolution", True, group=group, backend="reference"),
                arq_quantize_weight(w, "Deconvolution", True, group=group, backend="kernel"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deconv_channels_follow_the_transposed_layout(backend):
    # Caffe Deconvolution weight [Cin, Cout/G, kh, kw]; output channel g*Cout/G + j.
    cin, cout_g, group = 6, 2, 3
    w = np.random.default_rng(0).standard_normal((cin, cout_g, 3, 3)).astype(np.float32)
    r = arq_quantize_weight(w, "Deconvolution", True, group=group, backend=backend)
    expected = []
    for g in range(group):
        rows = w[g * cin // group:(g + 1) * cin // group]
        for j in range(cout_g):
            v = rows[:, j]
            t = v.max() if abs(v.max()) > abs(v.min()) else v.min()
            expected.append(t / np.float32(127) if t > 0 else t / np.float32(-128))
    np.testing.assert_array_equal(r.scale, np.array(expected, np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_rules(backend):
    w = np.zeros((3, 1, 1, 2), np.float32)
    w[1] = [[[0.5, -1.0]]]   # |min| wins -> /128
    w[2] = [[[1.0, -1.0]]]   # tie -> min side -> /128
    r = arq_quantize_weight(w, backend=backend)
    np.testing.assert_array_equal(r.scale, np.array([1.0, 1 / 128, 1 / 128], np.float32))
    assert r.quantized[1].ravel().tolist() == [64, -128]
    w[2] = [[[1.0, -0.5]]]
    assert arq_quantize_weight(w, backend=backend).scale[2] == np.float32(1.0) / np.float32(127)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inner_product_is_per_tensor_only(backend):
    w = np.ones((4, 5), np.float32)
    with pytest.raises(ConfigError, match="InnerProduct supports only channel_wise=false"):
        arq_quantize_weight(w, "InnerProduct", channel_wise=True, backend=backend)
    assert arq_quantize_weight(w, "InnerProduct", channel_wise=False, backend=backend).scale.shape == (1,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_weights(backend):
    w = np.ones((2, 2, 1, 1), np.float32)
    w[1, 1] = np.nan
    with pytest.raises(QuantizationError, match="NaN"):
        arq_quantize_weight(w, backend=backend)
    w[1, 1] = np.inf
    with pytest.raises(QuantizationError, match="ArqQuant scale is illegal"):
        arq_quantize_weight(w, backend=backend)


def test_retrain_backward_is_straight_through():
    g = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = arq_retrain_backward(g)
    np.testing.assert_array_equal(out, g)
    assert out is not g


@requires_kernels
@SETTINGS
@given(b=hnp.arrays(np.float32, st.integers(1, 32), elements=finite_f32),
       scale_d=st.floats(2.0**-12, 4.0, width=32))
def test_bias_kernel_matches_reference(b, scale_d):
    sw = np.linspace(0.001, 0.1, b.size).astype(np.float32)

    def outcome(backend):
        try:
            return quantize_bias(b, sw, scale_d, backend=backend).tolist()
        except QuantizationError as exc:  # out of int32 range: both must refuse
            return str(exc).split(" bias ")[0]

    assert outcome("reference") == outcome("kernel")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_values_and_range_error(backend):
    b = np.array([1.0, -2.5, 0.0], np.float32)
    q = quantize_bias(b, np.array([0.5], np.float32), 2.0, backend=backend)  # deq = 1
    assert q.dtype == np.int32 and q.tolist() == [1, -3, 0]
    np.testing.assert_array_equal(dequantize_bias(q, np.array([0.5], np.float32), 2.0), [1.0, -3.0, 0.0])
    with pytest.raises(QuantizationError, match="does not fit in int32; skip"):
        quantize_bias(np.array([1e6], np.float32), np.array([1e-4], np.float32), 1e-4, backend=backend)
