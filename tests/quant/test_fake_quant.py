import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amct_caffe.errors import ConfigError
from amct_caffe.quant import (QuantizationError, dequantize, fake_quant, pack_deq_scale, quantize,
                              round_half_away, unpack_deq_scale)

from .conftest import adversarial_arrays, float_arrays, requires_kernels

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True)


def test_round_half_away_matches_c_round():
    t = np.array([0.5, -0.5, 1.5, 2.5, -2.5, 0.49999997, -0.49999997, 8388607.5, 3.0, -0.0], np.float32)
    assert round_half_away(t).tolist() == [1, -1, 2, 3, -3, 0, -0, 8388608, 3, 0]


def test_fake_quant_formula_small_case():
    x = np.array([-1.0, -0.26, 0.0, 0.25, 0.5, 10.0], np.float32)
    # scale 0.5, offset 3, 4 bits: q in [-8, 7] -> y in [-5.5, 2.0]
    y = fake_quant(x, 0.5, 3, 4, backend="reference")
    assert y.tolist() == [-1.0, -0.5, 0.0, 0.5, 0.5, 2.0]
    assert quantize(x, 0.5, 3, 4, backend="reference").tolist() == [1, 2, 3, 4, 4, 7]


@requires_kernels
@SETTINGS
@given(x=float_arrays, scale=st.floats(2.0**-10, 16.0, width=32), offset=st.integers(-128, 127),
       num_bits=st.sampled_from([8, 4, 12, 16]))
def test_kernel_matches_reference(x, scale, offset, num_bits):
    qmin, qmax = -(1 << (num_bits - 1)), (1 << (num_bits - 1)) - 1
    offset = int(np.clip(offset, qmin, qmax))
    q_ref = quantize(x, scale, offset, num_bits, backend="reference")
    q_ker = quantize(x, scale, offset, num_bits, backend="kernel")
    assert q_ref.dtype == q_ker.dtype == (np.int8 if num_bits <= 8 else np.int16)
    np.testing.assert_array_equal(q_ref, q_ker)
    y_ker = fake_quant(x, scale, offset, num_bits, backend="kernel")
    np.testing.assert_array_equal(fake_quant(x, scale, offset, num_bits, backend="reference"), y_ker)
    np.testing.assert_array_equal(dequantize(q_ker, scale, offset), y_ker)


@requires_kernels
@pytest.mark.parametrize("name,x", list(adversarial_arrays().items()))
def test_kernel_matches_reference_adversarial(name, x):
    for scale, offset, bits in [(0.5, 0, 8), (1e-3, -20, 8), (0.02, 100, 16)]:
        np.testing.assert_array_equal(quantize(x, scale, offset, bits, backend="reference"),
                                      quantize(x, scale, offset, bits, backend="kernel"))
        with np.errstate(invalid="ignore"):  # (the NumPy reference on NaN / inf inputs)
            reference = fake_quant(x, scale, offset, bits, backend="reference")
        assert fake_quant(x, scale, offset, bits, backend="kernel").tobytes() == reference.tobytes()


@requires_kernels
def test_fake_quant_kernel_rounds_ties_and_edges_like_the_reference():
    # The kernel rounds with an int conversion instead of std::round (so that the loop vectorizes):
    # every tie, value next to a tie, the clamp edges, both zeros, infinities and NaN payloads as the reference.
    scale = np.float32(0.0123)
    ties = np.arange(-300, 300, 0.5, dtype=np.float32) * scale
    near = np.concatenate([np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf))])
    nans = np.array([0x7FC00001, 0xFFC12345, 0x7F800001], np.uint32).view(np.float32)
    special = np.array([np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30, 1e-40, -1e-40], np.float32)
    x = np.concatenate([ties, near, nans, special])
    for s, offset, bits in [(scale, 0, 8), (scale, -128, 8), (scale, 127, 8), (np.float32(1.0), 5, 4),
                            (np.float32(3.3e-5), 100, 16), (np.float32(7.0), 0, 2)]:
        with np.errstate(invalid="ignore"):
            reference = fake_quant(x, float(s), offset, bits, backend="reference")
        assert fake_quant(x, float(s), offset, bits, backend="kernel").tobytes() == reference.tobytes()


@requires_kernels
def test_fake_quant_writes_into_an_array_that_fits_only():
    x = np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4)
    want = fake_quant(x, 0.1, -3, 8, backend="reference")
    into = np.full_like(x, np.nan)
    assert fake_quant(x, 0.1, -3, 8, backend="kernel", into=into) is into and into.tobytes() == want.tobytes()
    for other in (np.empty((2, 3, 5), np.float32), np.empty(x.shape, np.float64), x):  # shape, dtype, the input
        before = other.copy()
        out = fake_quant(x, 0.1, -3, 8, backend="kernel", into=other)
        assert out is not other and out.tobytes() == want.tobytes()
        assert other.tobytes() == before.tobytes()


@pytest.mark.parametrize("backend", ["reference", pytest.param("kernel", marks=requires_kernels)])
def test_bad_arguments(backend):
    x = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="scale"):
        fake_quant(x, 0.0, 0, 8, backend=backend)
    with pytest.raises(ValueError, match="offset"):
        quantize(x, 1.0, 200, 8, backend=backend)
    with pytest.raises(ConfigError, match="num_bits"):
        quantize(x, 1.0, 0, 17, backend=backend)


@requires_kernels
def test_quantize_rejects_nan_in_kernel():
    with pytest.raises(QuantizationError, match="NaN"):
        quantize(np.array([1.0, np.nan], np.float32), 1.0, 0, 8, backend="kernel")


@pytest.mark.parametrize("backend", ["reference", pytest.param("kernel", marks=requires_kernels)])
def test_deq_scale_pack_layout_and_roundtrip(backend):
    scale_w = np.array([0.5, 0.001, 3.0e-5], np.float32)
    offset_w = np.array([0, -1, 127], np.int8)
    packed = pack_deq_scale(scale_w, 0.25, offset_w, backend=backend)
    assert packed.dtype == np.uint64
    deq = scale_w * np.float32(0.25)
    assert int(packed[0]) == int(deq[:1].view(np.uint32)[0])
    assert int(packed[1]) >> 32 == 0xFF and int(packed[2]) >> 32 == 0x7F
    got_deq, got_off = unpack_deq_scale(packed, backend=backend)
    np.testing.assert_array_equal(got_deq.view(np.uint32), deq.view(np.uint32))
    np.testing.assert_array_equal(got_off, offset_w)


@requires_kernels
@SETTINGS
@given(scale_w=st.lists(st.floats(2.0**-27, 1024.0, width=32), min_size=1, max_size=64),
       scale_d=st.floats(2.0**-20, 16.0, width=32))
def test_pack_kernel_matches_reference(scale_w, scale_d):
    sw = np.array(scale_w, np.float32)
    off = (np.arange(sw.size) % 256 - 128).astype(np.int8)
    np.testing.assert_array_equal(pack_deq_scale(sw, scale_d, off, backend="reference"),
                                  pack_deq_scale(sw, scale_d, off, backend="kernel"))


@requires_kernels
def test_fake_quant_never_writes_into_the_callers_strided_input():
    base = np.linspace(-3, 3, 48, dtype=np.float32)
    x = base[::2]  # strided: the kernel sees a contiguous copy
    kept = base.copy()
    into = base[:24]  # contiguous, of x's shape, over x's memory
    out = fake_quant(x, 0.1, 0, 8, backend="kernel", into=into)
    assert base.tobytes() == kept.tobytes()
    assert out.tobytes() == fake_quant(np.ascontiguousarray(x), 0.1, 0, 8, backend="reference").tobytes()
