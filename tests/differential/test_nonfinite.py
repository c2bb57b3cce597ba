"""Non-finite values (inf, NaN, float32 overflow) through layers whose factors Caffe applies with BLAS.

Caffe scales with ``sscal`` and adds terms with ``saxpy``: a factor of 0 writes zeros (or skips the
term) whatever the input holds, where NumPy's ``0 * inf`` is NaN, and ``saxpy``'s fused multiply-add
rounds once (``2 * 3e38 - 2 * 3e38`` added term by term is inf, not NaN). ``std::pow(-inf, 0.5)`` is
+inf where NumPy's square root gives NaN. Each layer below runs in official Caffe and in the executor
on inputs that hold inf, -inf and NaN; every top must agree, NaN for NaN.
"""

from __future__ import annotations

import numpy as np
import pytest

from amct_caffe.runtime import TEST, Net
from tests.real_caffe import run_with_pycaffe

pytestmark = pytest.mark.real_caffe

_NET = """name: "nonfinite"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 dim: 4 dim: 1 dim: 1 } } }
layer { name: "z" type: "Input" top: "z" input_param { shape { dim: 1 dim: 4 dim: 1 dim: 1 } } }
layer { name: "zero" type: "Input" top: "zero" input_param { shape { dim: 4 } } }
layer { name: "scale_learned" type: "Scale" bottom: "x" top: "scale_learned" }
layer { name: "scale_bottom" type: "Scale" bottom: "x" bottom: "zero" top: "scale_bottom" }
layer { name: "sum_coeff0" type: "Eltwise" bottom: "x" bottom: "z" top: "sum_coeff0"
        eltwise_param { operation: SUM coeff: 0 coeff: 1 } }
layer { name: "sum_fused" type: "Eltwise" bottom: "z" bottom: "z" top: "sum_fused"
        eltwise_param { operation: SUM coeff: 2 coeff: -2 } }
layer { name: "reduce_coeff0" type: "Reduction" bottom: "x" top: "reduce_coeff0" reduction_param { coeff: 0 } }
layer { name: "exp_scale0" type: "Exp" bottom: "x" top: "exp_scale0" exp_param { scale: 0 shift: 1 } }
layer { name: "exp_underflow" type: "Exp" bottom: "x" top: "exp_underflow" exp_param { base: 0.5 shift: 200 } }
layer { name: "log_scale0" type: "Log" bottom: "x" top: "log_scale0" log_param { scale: 0 shift: 2 } }
layer { name: "root" type: "Power" bottom: "x" top: "root" power_param { power: 0.5 } }
"""

_RUN = """
import numpy as np
import caffe
caffe.set_mode_cpu()
w = {workdir!r}
net = caffe.Net(w + "/net.prototxt", caffe.TEST)
net.params["scale_learned"][0].data[...] = [0, 2, 0, 1]
net.save(w + "/net.caffemodel")
inputs = np.load(w + "/inputs.npz")
for name in inputs.files:
    net.blobs[name].data[...] = inputs[name]
net.forward()
np.savez(w + "/caffe.npz", **{{k: np.array(b.data) for k, b in net.blobs.items() if "_split_" not in k}})
"""


def test_factors_of_zero_and_overflow_agree_with_caffe(tmp_path):
    (tmp_path / "net.prototxt").write_text(_NET)
    inputs = {"x": np.array([np.inf, -np.inf, np.nan, 4.0], np.float32).reshape(1, 4, 1, 1),
              "z": np.array([3e38, -1e38, 1.0, 2.5], np.float32).reshape(1, 4, 1, 1),
              "zero": np.zeros(4, np.float32)}
    np.savez(tmp_path / "inputs.npz", **inputs)
    res = run_with_pycaffe(_RUN.format(workdir=str(tmp_path)))
    assert res.returncode == 0, res.stderr[-2000:]
    net = Net(str(tmp_path / "net.prototxt"), str(tmp_path / "net.caffemodel"), TEST)
    with np.errstate(all="ignore"):
        net.forward(**inputs)
    with np.load(tmp_path / "caffe.npz") as caffe:
        # the cases still reach what they test: Caffe's zeros where NumPy's product is NaN, and an inf
        assert (caffe["scale_learned"].ravel()[[0, 2]] == 0).all() and np.isposinf(caffe["sum_fused"].ravel()[0])
        assert np.isposinf(caffe["root"].ravel()[1])
        for blob in caffe.files:
            np.testing.assert_allclose(net.blobs[blob].data, caffe[blob], rtol=1e-6, equal_nan=True, err_msg=blob)
