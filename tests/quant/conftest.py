"""Shared pieces of the kernel-versus-reference tests.

``requires_kernels`` skips a comparison when the extension is not built; ``adversarial_arrays``
is the list of inputs the issue names (all-zero, all-negative, one huge outlier, denormals, a
single element), and ``float_arrays`` draws arbitrary finite float32 data with hypothesis.
"""

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from amct_caffe.quant import kernels_available

requires_kernels = pytest.mark.skipif(not kernels_available(), reason="amct_caffe._kernels is not built")


def adversarial_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20240601)
    normal = rng.standard_normal(5000).astype(np.float32)
    outlier = normal.copy()
    outlier[1234] = 1.0e6
    return {
        "normal": normal,
        "all_zero": np.zeros(777, np.float32),
        "all_negative": -np.abs(normal) - np.float32(0.01),
        "all_positive_relu": np.maximum(normal, 0),
        "huge_outlier": outlier,
        "denormals": (rng.standard_normal(300) * 1e-39).astype(np.float32),
        "single": np.array([0.37], np.float32),
        "single_negative": np.array([-2.5], np.float32),
        "constant": np.full(100, 3.0, np.float32),
        "grid_ties": (np.arange(-300, 300, dtype=np.float32) * np.float32(0.5)),
    }


finite_f32 = st.floats(min_value=-1e4, max_value=1e4, width=32, allow_nan=False, allow_infinity=False,
                       allow_subnormal=True)

float_arrays = hnp.arrays(np.float32, st.integers(1, 400), elements=finite_f32)
