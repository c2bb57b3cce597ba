"""Integration with official Caffe (opt-in: AMCT_REAL_CAFFE, see README)."""

import pytest

from tests.golden import MODELS
from tests.real_caffe import run_with_pycaffe

pytestmark = pytest.mark.real_caffe


def test_pycaffe_and_amct_caffe_import_together_and_agree():
    """pycaffe's caffe_pb2 (package caffe) and our schemas coexist in one process."""
    code = f"""
import numpy as np
import caffe
from caffe.proto import caffe_pb2
import amct_caffe
from amct_caffe.io.schema import caffe_pb
from amct_caffe.runtime import Net, TEST
proto = {str(MODELS / 'lenet_mnist/lenet.prototxt')!r}
weights = {str(MODELS / 'lenet_mnist/lenet_iter_10000.caffemodel')!r}
x = np.random.default_rng(0).random((64, 1, 28, 28), dtype=np.float32)
ref = caffe.Net(proto, weights, caffe.TEST)
ref.blobs['data'].data[...] = x
a = ref.forward()['prob'].copy()
b = Net(proto, weights, TEST).forward(data=x)['prob']
assert caffe_pb2.NetParameter.DESCRIPTOR.full_name == 'caffe.NetParameter'
assert caffe_pb().NetParameter.DESCRIPTOR.full_name == 'amct_caffe.NetParameter'
print(float(np.abs(a - b).max()))
"""
    res = run_with_pycaffe(code)
    assert res.returncode == 0, res.stderr[-3000:]
    assert float(res.stdout.strip().splitlines()[-1]) < 1e-5


BATCH_NORM_NET = """
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 4096 dim: 3 dim: 3 } } }
layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y" batch_norm_param { use_global_stats: true } }
"""


def test_batch_norm_divides_by_caffes_powf(tmp_path):
    """Caffe's standard deviation is glibc's powf(var + eps, 0.5), not always the correctly rounded sqrt (an ulp
    apart in about 6 channels in 10^4): every value of such a channel came out an ulp off. Equal bit for bit
    with the layer run on its own (fold exact)."""
    proto = tmp_path / "bn.prototxt"
    proto.write_text(BATCH_NORM_NET)
    code = f"""
import numpy as np, caffe
from amct_caffe.runtime import Net, TEST
proto, weights = {str(proto)!r}, {str(tmp_path / 'bn.caffemodel')!r}
rng = np.random.default_rng(0)
ref = caffe.Net(proto, caffe.TEST)
ref.params['bn'][0].data[...] = rng.normal(0, 1, 4096)
ref.params['bn'][1].data[...] = rng.uniform(0.01, 9, 4096)
ref.params['bn'][2].data[...] = 1.0
ref.save(weights)
x = rng.standard_normal((2, 4096, 3, 3)).astype(np.float32)
ref.blobs['x'].data[...] = x
a = ref.forward()['y'].copy()
b = Net(proto, weights, TEST, fold="exact").forward(x=x)['y']
std = np.sqrt(ref.params['bn'][1].data + np.float32(1e-5))
print(int(np.count_nonzero(a != b)), int(np.count_nonzero(np.abs((x - ref.params['bn'][0].data[:, None, None]) / std
                                                                  [:, None, None] - a) > 0)))
"""
    res = run_with_pycaffe(code)
    assert res.returncode == 0, res.stderr[-3000:]
    differing, sqrt_differing = map(int, res.stdout.strip().splitlines()[-1].split())
    assert sqrt_differing > 0  # the statistics hold channels where the two roundings part
    assert differing == 0


LRN_NET = """
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 64 dim: 21 dim: 19 } } }
layer { name: "a" type: "LRN" bottom: "x" top: "a" lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "b" type: "LRN" bottom: "x" top: "b" lrn_param { local_size: 3 alpha: 2 beta: 0.5 k: 2 } }
layer { name: "t" type: "Input" top: "t" input_param { shape { dim: 3 dim: 2 dim: 5 dim: 4 } } }
layer { name: "c" type: "LRN" bottom: "t" top: "c" lrn_param { local_size: 7 alpha: 0.5 beta: 1.5 } }
layer { name: "w" type: "LRN" bottom: "x" top: "w" lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75
  norm_region: WITHIN_CHANNEL } }
layer { name: "w3" type: "LRN" bottom: "t" top: "w3" lrn_param { local_size: 3 alpha: 2 beta: 0.5
  norm_region: WITHIN_CHANNEL } }
"""


def test_lrn_across_channels_is_caffes_running_sum(tmp_path):
    """Caffe's ACROSS_CHANNELS LRN keeps a running sum of the squares (each step a fused saxpy) and takes glibc's
    powf: window sums rounded otherwise, so a third of GoogLeNet's LRN values were an ulp or so off, which
    moved its record by 1.3e-6 and flipped Quant roundings in its fake-quant model. WITHIN_CHANNEL runs Caffe's
    internal layers (powf squares, AVE pooling, Power, product) instead of separable window sums. Bit for bit
    now, with a window wider than the channels too."""
    proto = tmp_path / "lrn.prototxt"
    proto.write_text(LRN_NET)
    code = f"""
import numpy as np, caffe
from amct_caffe.runtime import Net, TEST
proto = {str(proto)!r}
rng = np.random.default_rng(0)
feed = dict(x=(np.maximum(rng.standard_normal((2, 64, 21, 19)), 0) * 150).astype(np.float32),
            t=rng.standard_normal((3, 2, 5, 4)).astype(np.float32))
ref = caffe.Net(proto, caffe.TEST)
for k, v in feed.items():
    ref.blobs[k].data[...] = v
ref.forward()
for fold in ("exact", "auto"):
    got = Net(proto, TEST, fold=fold).forward(**feed)
    print(fold, *[int(np.count_nonzero(got[k] != ref.blobs[k].data)) for k in ("a", "b", "c", "w", "w3")])
"""
    res = run_with_pycaffe(code)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()[-2:]
    assert lines == ["exact 0 0 0 0 0", "auto 0 0 0 0 0"], lines


# Runs ``proto`` in pycaffe and in the executor on the arrays ``feed`` (code defining a dict of them, with ``rng``
# at hand), optionally a backward from random top diffs, and prints how many float32 values of each blob of ``names``
# (its data, or its diff after the backward) differ in their bits.
BITS_SCRIPT = """
import numpy as np, caffe
from amct_caffe.runtime import Net, TEST, TRAIN
proto, names, tops = {proto!r}, {names!r}, {tops!r}
rng = np.random.default_rng(0)
{feed}
phase = TRAIN if tops else TEST
nets = [caffe.Net(proto, caffe.TRAIN if tops else caffe.TEST), Net(proto, phase)]
diffs = {{k: rng.standard_normal(nets[0].blobs[k].data.shape).astype(np.float32) for k in tops}}
for net in nets:
    for k, v in feed.items():
        net.blobs[k].data[...] = v
    net.forward()
    if tops:
        for k, v in diffs.items():
            net.blobs[k].diff[...] = v
        net.backward()
bits = [[(b.diff if tops else b.data).view(np.uint32) for b in (net.blobs[k] for k in names)] for net in nets]
print(*[f"{{k}}:{{int(np.count_nonzero(a != b))}}" for k, a, b in zip(names, *bits)])
"""


def _differing_bits(tmp_path, net_text: str, feed: str, names, tops=()) -> list[str]:
    """``name:count`` per blob of ``names`` (:data:`BITS_SCRIPT`)."""
    proto = tmp_path / "net.prototxt"
    proto.write_text(net_text)
    res = run_with_pycaffe(BITS_SCRIPT.format(proto=str(proto), names=tuple(names), tops=tuple(tops), feed=feed))
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip().splitlines()[-1].split()


GLIBC_MATH_NET = """
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 8 dim: 31 dim: 17 } } }
layer { name: "p" type: "Input" top: "p" input_param { shape { dim: 2 dim: 8 dim: 31 dim: 17 } } }
layer { name: "sigmoid" type: "Sigmoid" bottom: "x" top: "sigmoid" }
layer { name: "bnll" type: "BNLL" bottom: "x" top: "bnll" }
layer { name: "elu" type: "ELU" bottom: "x" top: "elu" elu_param { alpha: 0.3 } }
layer { name: "cube" type: "Power" bottom: "x" top: "cube" power_param { power: 3 } }
layer { name: "square" type: "Power" bottom: "x" top: "square" power_param { power: 2 scale: 0.7 shift: 0.3 } }
layer { name: "root" type: "Power" bottom: "p" top: "root" power_param { power: 0.5 } }
layer { name: "odd" type: "Power" bottom: "p" top: "odd" power_param { power: 1.7 } }
layer { name: "log" type: "Log" bottom: "p" top: "log" }
layer { name: "log2" type: "Log" bottom: "p" top: "log2" log_param { base: 2 scale: 1.5 shift: 0.1 } }
layer { name: "wsum" type: "Eltwise" bottom: "x" bottom: "p" bottom: "x" top: "wsum"
  eltwise_param { operation: SUM coeff: 0.5 coeff: -1.3 coeff: 2.1 } }
"""


def test_elementwise_math_is_glibcs_as_caffe_calls_it(tmp_path):
    """Sigmoid (expf, then the sum and the division in double), BNLL (expf, log in double), ELU (expf), Power
    (powf for every power, 2 and 0.5 included), Log (logf) and an Eltwise SUM with coefficients (one fused
    saxpy per term): numpy's float32 exp / power / square / sqrt, float64 log rounded to float32 and rounded
    products each differ from what Caffe's layers compute, in up to a third of the values (Sigmoid), by an ulp.
    Bit for bit now."""
    names = ("sigmoid", "bnll", "elu", "cube", "square", "root", "odd", "log", "log2", "wsum")
    feed = ("x = (rng.standard_normal((2, 8, 31, 17)) * 3).astype(np.float32)\n"
            "feed = dict(x=x, p=(np.abs(x) + np.float32(0.01)).astype(np.float32))")
    got = _differing_bits(tmp_path, GLIBC_MATH_NET, feed, names)
    assert got == [f"{k}:0" for k in names], got


GRAD_NET = """
force_backward: true
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 8 dim: 31 dim: 17 } } }
layer { name: "p" type: "Input" top: "p" input_param { shape { dim: 2 dim: 8 dim: 31 dim: 17 } } }
layer { name: "x2" type: "Input" top: "x2" input_param { shape { dim: 2 dim: 8 dim: 31 dim: 17 } } }
layer { name: "sigmoid" type: "Sigmoid" bottom: "x" top: "sigmoid" }
layer { name: "bnll" type: "BNLL" bottom: "x2" top: "bnll" }
layer { name: "log" type: "Log" bottom: "p" top: "log" log_param { base: 2 scale: 1.5 shift: 0.1 } }
"""


def test_elementwise_math_gradients_are_caffes(tmp_path):
    """The backward of Sigmoid (dy * y in float, times 1. - y in double), BNLL (dy * expf(x) in float, divided
    by expf(x) + 1. in double) and Log (glibc's powf(x', -1), not the reciprocal) as Caffe rounds them: numpy's
    float32 steps were an ulp off in up to a third of the values."""
    feed = ("x = (rng.standard_normal((2, 8, 31, 17)) * 3).astype(np.float32)\n"
            "feed = dict(x=x, p=(np.abs(x) + np.float32(0.01)).astype(np.float32), x2=(x * 7).astype(np.float32))")
    got = _differing_bits(tmp_path, GRAD_NET, feed, ("x", "x2", "p"), tops=("sigmoid", "bnll", "log"))
    assert got == ["x:0", "x2:0", "p:0"], got


SOFTMAX_NET = """
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 64 dim: 1000 } } }
layer { name: "prob" type: "Softmax" bottom: "x" top: "prob" }
layer { name: "t" type: "Input" top: "t" input_param { shape { dim: 3 dim: 5 dim: 37 } } }
layer { name: "last" type: "Softmax" bottom: "t" top: "last" softmax_param { axis: -1 } }
layer { name: "w" type: "Input" top: "w" input_param { shape { dim: 3 dim: 12000 } } }
layer { name: "wide" type: "Softmax" bottom: "w" top: "wide" }
"""


def test_softmax_over_a_last_axis_sums_as_caffes_gemv(tmp_path):
    """A classifier's (N, 1000) softmax: Caffe sums each row by sgemv, in its kernel's order, where NumPy's
    pairwise sum put about a third of the sums an ulp away. Over 9,216 classes or more Caffe's threaded OpenBLAS
    sums each row in two halves (every value of a 12,000-class softmax was off). Bit for bit where the two
    OpenBLAS builds round alike (the rest of this file's cores)."""
    feed = ("feed = dict(x=(rng.standard_normal((64, 1000)) * 4).astype(np.float32),\n"
            "            t=(rng.standard_normal((3, 5, 37)) * 4).astype(np.float32),\n"
            "            w=(rng.standard_normal((3, 12000)) * 3).astype(np.float32))")
    got = _differing_bits(tmp_path, SOFTMAX_NET, feed, ("prob", "last", "wide"))
    assert got == ["prob:0", "last:0", "wide:0"], got
