"""Net.backward against official Caffe: diffs of blobs and learned blobs, Caffe's split sums,
the need-backward rules (propagate_down, lr_mult 0, force_backward) and loss weights."""

from __future__ import annotations

import numpy as np
import pytest

from tests.real_caffe import pycaffe_dir
from tests.training.gradcheck import assert_matches_caffe, run_in_caffe

pytestmark = pytest.mark.real_caffe

_IN = 'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}\n'


def _input(*dims):
    return _IN.format(dims=" ".join(f"dim: {d}" for d in dims))


CASES = {
    # a blob read by two layers: Caffe's automatic split adds the two diffs
    "ip_two_readers": "force_backward: true\n" + _input(3, 2, 2, 2) +
    'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 4 } }\n'
    'layer { name: "ip2" type: "InnerProduct" bottom: "data" top: "ip2" '
    'inner_product_param { num_output: 3 transpose: true axis: 2 } }\n',
    # no force_backward: the input gets no diff; lr_mult 0 on the first IP's weight
    "lr_mult_zero": _input(2, 5) +
    'layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" param { lr_mult: 0 } param { lr_mult: 1 } '
    'inner_product_param { num_output: 4 } }\n'
    'layer { name: "b" type: "InnerProduct" bottom: "a" top: "b" inner_product_param { num_output: 3 } '
    'loss_weight: 0.5 }\n',
    # propagate_down false on the second layer stops the gradient before the first
    "propagate_down_false": _input(2, 5) +
    'layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" inner_product_param { num_output: 4 } }\n'
    'layer { name: "b" type: "InnerProduct" bottom: "a" top: "b" propagate_down: false '
    'inner_product_param { num_output: 3 } loss_weight: 2 }\n',
    # a loss-weighted blob also read by another layer: the split carries the loss
    "loss_blob_also_read": _input(2, 5) +
    'layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" inner_product_param { num_output: 4 } '
    'loss_weight: 1.5 }\n'
    'layer { name: "b" type: "InnerProduct" bottom: "a" top: "b" inner_product_param { num_output: 3 } '
    'loss_weight: 0.25 }\n',
    # shared parameters: both layers accumulate into one weight
    "shared_param": _input(2, 5) +
    'layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" param { name: "w" } param { name: "bias" } '
    'inner_product_param { num_output: 5 } }\n'
    'layer { name: "b" type: "InnerProduct" bottom: "a" top: "b" param { name: "w" } param { name: "bias" } '
    'inner_product_param { num_output: 5 } loss_weight: 1 }\n',
}


@pytest.fixture(scope="module")
def caffe_results(tmp_path_factory):
    if pycaffe_dir() is None:
        pytest.skip("AMCT_REAL_CAFFE is not set")
    workdir = tmp_path_factory.mktemp("backward_net")
    rng = np.random.default_rng(7)
    cases = []
    for name, text in CASES.items():
        shape = (3, 2, 2, 2) if name == "ip_two_readers" else (2, 5)
        cases.append((name, f'name: "{name}"\n' + text, {"data": rng.standard_normal(shape).astype(np.float32)},
                      "TRAIN"))
    return workdir, run_in_caffe(workdir, cases)


@pytest.mark.parametrize("case", sorted(CASES))
def test_backward_matches_caffe(caffe_results, case):
    workdir, results = caffe_results
    assert_matches_caffe(workdir, results, case)
