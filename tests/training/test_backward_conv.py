"""Convolution and Deconvolution backward against official Caffe: bottom diffs, weight and bias
diffs over strides, pads, dilations, groups, 1x1 and depthwise kernels, N-D and several bottoms."""

from __future__ import annotations

import numpy as np
import pytest

from tests.real_caffe import pycaffe_dir
from tests.training.gradcheck import assert_matches_caffe, run_in_caffe

pytestmark = pytest.mark.real_caffe


def _conv(kind, params, bottoms=("data",), tops=("out",)):
    b = " ".join(f'bottom: "{x}"' for x in bottoms)
    t = " ".join(f'top: "{x}"' for x in tops)
    return (f'layer {{ name: "conv" type: "{kind}" {b} {t} convolution_param {{ {params} '
            'weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.3 } } }\n')


C, D = "Convolution", "Deconvolution"
# name: (input shape, layer text); every input is called "data" (a second one "data2")
CASES = {
    "conv_3x3_pad1": ((2, 3, 7, 7), _conv(C, "num_output: 4 kernel_size: 3 pad: 1")),
    "conv_stride2": ((2, 3, 8, 9), _conv(C, "num_output: 5 kernel_size: 3 stride: 2")),
    # C's truncating size: the 5-wide kernel on a 4-wide input still gives one output
    "conv_kernel_wider": ((2, 2, 4, 6), _conv(C, "num_output: 3 kernel_size: 5 stride: 2")),
    "conv_dilation": ((2, 3, 9, 8), _conv(C, "num_output: 4 kernel_size: 3 pad: 2 dilation: 2")),
    "conv_group_rect": ((2, 4, 7, 9), _conv(C, "num_output: 6 group: 2 kernel_h: 3 kernel_w: 2 stride_h: 1 "
                                               "stride_w: 2 pad_h: 1 pad_w: 0")),
    "conv_1x1_nobias": ((3, 6, 5, 5), _conv(C, "num_output: 4 kernel_size: 1 bias_term: false")),
    "conv_1x1_stride2": ((2, 4, 7, 6), _conv(C, "num_output: 3 kernel_size: 1 stride: 2")),
    "conv_depthwise": ((2, 8, 9, 9), _conv(C, "num_output: 8 group: 8 kernel_size: 3 pad: 1")),
    "conv_depthwise_s2": ((3, 6, 10, 9), _conv(C, "num_output: 6 group: 6 kernel_size: 5 pad: 2 stride: 2")),
    "conv_depth_multiplier": ((2, 4, 6, 6), _conv(C, "num_output: 8 group: 4 kernel_size: 3 pad: 1")),
    "conv_3d": ((2, 3, 4, 5, 6), _conv(C, "num_output: 4 kernel_size: 3 pad: 1 stride: 1 stride: 2 stride: 1")),
    "conv_wide_batch": ((6, 16, 12, 12), _conv(C, "num_output: 24 kernel_size: 3 pad: 1 group: 2")),
    "conv_large_map": ((1, 8, 40, 40), _conv(C, "num_output: 16 kernel_size: 3 pad: 1")),
    "conv_two_bottoms": ((2, 3, 6, 6), _conv(C, "num_output: 4 kernel_size: 3 stride: 2 pad: 1",
                                             ("data", "data2"), ("out", "out2"))),
    "deconv_k4_s2_p1": ((2, 3, 5, 6), _conv(D, "num_output: 4 kernel_size: 4 stride: 2 pad: 1")),
    "deconv_group_dilation": ((2, 4, 5, 5), _conv(D, "num_output: 6 group: 2 kernel_size: 3 dilation: 2")),
    "deconv_1x1": ((2, 5, 4, 4), _conv(D, "num_output: 3 kernel_size: 1 bias_term: false")),
    "deconv_depthwise_up": ((2, 6, 5, 5), _conv(D, "num_output: 6 group: 6 kernel_size: 4 stride: 2 pad: 1")),
    "deconv_stride3_gaps": ((2, 3, 4, 3), _conv(D, "num_output: 2 kernel_size: 2 stride: 3")),
    "deconv_rect_pad": ((2, 3, 4, 5), _conv(D, "num_output: 4 kernel_h: 3 kernel_w: 5 stride_h: 2 stride_w: 3 "
                                               "pad_h: 1 pad_w: 2")),
}


def _net(name, shape, layer, two_inputs):
    dims = " ".join(f"dim: {d}" for d in shape)
    text = f'name: "{name}"\nforce_backward: true\n'
    text += f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}\n'
    if two_inputs:
        text += f'layer {{ name: "data2" type: "Input" top: "data2" input_param {{ shape {{ {dims} }} }} }}\n'
    return text + layer


@pytest.fixture(scope="module")
def caffe_results(tmp_path_factory):
    if pycaffe_dir() is None:
        pytest.skip("AMCT_REAL_CAFFE is not set")
    workdir = tmp_path_factory.mktemp("backward_conv")
    rng = np.random.default_rng(11)
    cases = []
    for name, (shape, layer) in CASES.items():
        two = '"data2"' in layer
        inputs = {"data": rng.standard_normal(shape).astype(np.float32)}
        if two:
            inputs["data2"] = rng.standard_normal(shape).astype(np.float32)
        cases.append((name, _net(name, shape, layer, two), inputs, "TRAIN"))
    return workdir, run_in_caffe(workdir, cases)


@pytest.mark.parametrize("case", list(CASES))
def test_conv_backward_matches_caffe(caffe_results, case):
    workdir, results = caffe_results
    assert_matches_caffe(workdir, results, case, check_loss=False)
