"""Smoke test of libquant.so's C ABI (what the Caffe layers call) through ctypes."""

import ctypes
import importlib.util
import pathlib

import numpy as np
import pytest

from amct_caffe.quant import IfmrParams, arq_quantize_weight, ifmr_search


def _load():
    spec = importlib.util.find_spec("amct_caffe._kernels")
    if spec is None or spec.origin is None:
        return None
    path = pathlib.Path(spec.origin).parent / "lib" / "libquant.so"
    return ctypes.CDLL(str(path)) if path.exists() else None


LIB = _load()
pytestmark = pytest.mark.skipif(LIB is None, reason="libquant.so is not built")
P = ctypes.POINTER


def _ifmr(chunks, with_offset):
    ptrs = (P(ctypes.c_float) * len(chunks))(*[c.ctypes.data_as(P(ctypes.c_float)) for c in chunks])
    sizes = (ctypes.c_size_t * len(chunks))(*[c.size for c in chunks])
    scale, offset, best = ctypes.c_float(), ctypes.c_int(), ctypes.c_int()
    LIB.amct_ifmr_search.argtypes = (
        [P(P(ctypes.c_float)), P(ctypes.c_size_t), ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
        + [ctypes.c_double] * 5 + [P(ctypes.c_float), P(ctypes.c_int), P(ctypes.c_int)])
    settings = (0.999999, 0.999999, 0.7, 1.3, 0.01)
    rc = LIB.amct_ifmr_search(ptrs, sizes, len(chunks), 8, int(with_offset), *settings,
                              ctypes.byref(scale), ctypes.byref(offset), ctypes.byref(best))
    return rc, scale.value, offset.value, best.value


@pytest.mark.parametrize("with_offset", [True, False])
def test_ifmr_through_the_c_abi(with_offset):
    x = np.random.default_rng(0).standard_normal(50_000).astype(np.float32)
    rc, scale, offset, best = _ifmr([x[:20_000], x[20_000:]], with_offset)
    ref = ifmr_search(x, IfmrParams(with_offset=with_offset), backend="reference")
    assert rc == 0 and (scale, offset, best) == (ref.scale, ref.offset, ref.best_index)


def test_errors_become_codes_and_messages():
    LIB.amct_last_error.restype = ctypes.c_char_p
    rc, *_ = _ifmr([np.array([1.0, np.inf], np.float32)], True)
    assert rc == -1
    assert b"IfmrQuantWithOffset scale is illegal" in LIB.amct_last_error()


def test_arq_through_the_c_abi():
    w = np.random.default_rng(1).standard_normal((4, 3, 2, 2)).astype(np.float32)
    scale, offset = np.empty(4, np.float32), np.empty(4, np.int32)
    q, fake = np.empty(w.shape, np.int8), np.empty(w.shape, np.float32)
    rc = LIB.amct_arq(w.ctypes.data_as(P(ctypes.c_float)), ctypes.c_size_t(1), ctypes.c_size_t(1),
                      ctypes.c_size_t(4), ctypes.c_size_t(12), 1, 8, scale.ctypes.data_as(P(ctypes.c_float)),
                      offset.ctypes.data_as(P(ctypes.c_int)), q.ctypes.data_as(P(ctypes.c_int8)),
                      fake.ctypes.data_as(P(ctypes.c_float)))
    ref = arq_quantize_weight(w, backend="reference")
    assert rc == 0
    np.testing.assert_array_equal(scale, ref.scale)
    np.testing.assert_array_equal(q, ref.quantized)
    np.testing.assert_array_equal(fake, ref.fake)
