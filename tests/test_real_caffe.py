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
