"""quantize_with_scales reproduces ARQ's codes and fake weights from ARQ's own scales."""

import numpy as np
import pytest

from amct_caffe.quant._common import QuantizationError
from amct_caffe.quant.arq import arq_quantize_weight, quantize_with_scales


@pytest.mark.parametrize("layer_type,shape,group,channel_wise", [
    ("Convolution", (8, 3, 3, 3), 1, True), ("Convolution", (8, 3, 3, 3), 1, False),
    ("DepthwiseConv", (16, 1, 3, 3), 1, True), ("Deconvolution", (6, 4, 3, 3), 2, True),
    ("Deconvolution", (6, 4, 2, 2), 3, False), ("InnerProduct", (10, 20), 1, False)])
@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_same_as_arq(layer_type, shape, group, channel_wise, backend):
    w = np.random.default_rng(7).normal(size=shape).astype(np.float32)
    arq = arq_quantize_weight(w, layer_type, channel_wise, 8, group, backend=backend)
    for how in ("kernel", "reference"):  # the other backend too: every pair agrees bit for bit
        q, fake = quantize_with_scales(w, arq.scale, layer_type, 8, group, backend=how)
        assert q.dtype == np.int8 and np.array_equal(q, arq.quantized) and q.shape == w.shape
        assert np.array_equal(fake.view(np.uint32), arq.fake.view(np.uint32))


@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_user_scales_clip_and_validate(backend):
    w = np.array([[1.0, -3.0], [0.5, 0.25]], np.float32)
    q, fake = quantize_with_scales(w, np.array([0.01], np.float32), "InnerProduct", backend=backend)
    assert q.tolist() == [[100, -128], [50, 25]]
    np.testing.assert_allclose(fake, q * np.float32(0.01))
    with pytest.raises(QuantizationError, match="3 weight scales"):
        quantize_with_scales(np.ones((2, 1, 1, 1), np.float32), np.ones(3, np.float32), backend=backend)
    with pytest.raises(QuantizationError, match="finite and > 0"):
        quantize_with_scales(np.ones((2, 1, 1, 1), np.float32), np.array([1, 0], np.float32), backend=backend)
