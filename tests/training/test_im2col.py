"""Caffe's Im2col against official Caffe, forward data and the gradient (col2im), on geometries random nets
do not reach: 1-D and 3-D windows, a channel axis other than 1, force_nd_im2col, windows C's truncating
output size lets reach past the padded input (runtime/layers/im2col.py)."""

from __future__ import annotations

import numpy as np
import pytest

from amct_caffe.errors import GraphError
from amct_caffe.runtime import TEST, Net
from tests.real_caffe import pycaffe_dir
from tests.training.gradcheck import assert_matches_caffe, input_layer, run_in_caffe
from tests.training.test_backward_elementwise import L

RNG = np.random.default_rng(8)


def _case(shape, conv_param):
    body = "force_backward: true\n" + input_layer("x", *shape) + L("Im2col", "cols", "x", "cols",
                                                                   f"convolution_param {{ {conv_param} }}")
    return body, {"x": RNG.standard_normal(shape).astype(np.float32)}


CASES = {
    "two_d": _case((2, 3, 7, 6), "kernel_size: 3 pad: 1 stride: 2"),
    "two_d_past_the_border": _case((1, 2, 5, 5), "kernel_h: 4 kernel_w: 2 stride_h: 3 stride_w: 2 pad_w: 1"),
    "dilated_nd": _case((2, 2, 8, 7), "kernel_size: 3 dilation: 2 dilation: 1 pad: 2 force_nd_im2col: true"),
    "one_d": _case((2, 4, 9), "kernel_size: 3 stride: 2 pad: 1"),
    "three_d": _case((1, 2, 4, 5, 4), "kernel_size: 2 kernel_size: 3 kernel_size: 2 stride: 1 pad: 1"),
    "axis_2": _case((2, 3, 2, 6, 5), "axis: 2 kernel_size: 3 pad: 1"),
}


@pytest.fixture(scope="module")
def caffe_results(tmp_path_factory):
    if pycaffe_dir() is None:
        pytest.skip("AMCT_REAL_CAFFE is not set")
    workdir = tmp_path_factory.mktemp("im2col")
    cases = [(name, f'name: "{name}"\n' + body, inputs, "TEST") for name, (body, inputs) in CASES.items()]
    return workdir, run_in_caffe(workdir, cases)


@pytest.mark.real_caffe
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradient_match_caffe(caffe_results, case):
    workdir, results = caffe_results
    assert_matches_caffe(workdir, results, case, phase="TEST", check_loss=False)


def test_columns_are_the_receptive_fields(tmp_path):
    """top[n, c*K + t, oy, ox] = x[n, c, oy*s - p + i*d, ox*s - p + j*d] (t = i*kw + j), 0 in the padding."""
    body, inputs = _case((2, 3, 6, 5), "kernel_h: 3 kernel_w: 2 stride: 2 pad: 1 dilation: 2")
    (tmp_path / "m.prototxt").write_text('name: "m"\n' + body)
    x = inputs["x"]
    top = Net(str(tmp_path / "m.prototxt"), TEST).forward(x=x)["cols"]
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    oh, ow = (6 + 2 - 5) // 2 + 1, (5 + 2 - 3) // 2 + 1
    want = np.stack([xp[:, :, i * 2:i * 2 + 2 * (oh - 1) + 1:2, j * 2:j * 2 + 2 * (ow - 1) + 1:2]
                     for i in range(3) for j in range(2)], axis=2).reshape(2, 3 * 6, oh, ow)
    np.testing.assert_array_equal(top, want)


def test_a_window_larger_than_the_input_is_refused(tmp_path):
    body, _ = _case((1, 2, 3, 3), "kernel_size: 5")
    (tmp_path / "m.prototxt").write_text('name: "m"\n' + body)
    with pytest.raises(GraphError, match=r"layer 'cols' \(Im2col\): output spatial size \[-1, -1\] is negative"):
        Net(str(tmp_path / "m.prototxt"), TEST)


def _net(tmp_path, shape, conv_param, train=False):
    body, _ = _case(shape, conv_param)
    (tmp_path / "m.prototxt").write_text('name: "m"\n' + body)
    from amct_caffe.runtime import TRAIN  # noqa: PLC0415

    return Net(str(tmp_path / "m.prototxt"), TRAIN if train else TEST)


def test_windows_over_padding_only_or_no_window_give_zeros(tmp_path):
    # an empty input under padding that still fills windows: Caffe's im2col reads zeros for every tap
    net = _net(tmp_path, (1, 2, 3, 4), "kernel_size: 3 pad: 2")
    cols = net.forward(x=np.zeros((1, 2, 0, 4), np.float32))["cols"]
    assert cols.shape == (1, 18, 2, 6) and not cols.any()
    # no output position: an empty top, and a zero gradient (col2im of nothing)
    net = _net(tmp_path, (1, 2, 5, 8), "kernel_size: 4", train=True)
    assert net.forward(x=np.ones((1, 2, 3, 8), np.float32))["cols"].shape == (1, 32, 0, 5)
    grad = net.backward(cols=np.zeros((1, 32, 0, 5), np.float32))["x"]
    assert grad.shape == (1, 2, 3, 8) and not grad.any()


def test_in_place_and_huge_padding_are_refused(tmp_path):
    (tmp_path / "p.prototxt").write_text('name: "p"\n' + input_layer("x", 1, 2, 4, 4)
                                         + L("Im2col", "cols", "x", "x", "convolution_param { kernel_size: 2 }"))
    with pytest.raises(GraphError, match=r"layer 'cols' \(Im2col\) does not allow in-place computation"):
        Net(str(tmp_path / "p.prototxt"), TEST)
    net = _net(tmp_path, (1, 1, 2, 2, 2), "kernel_size: 1 pad: 4096 stride: 4096")
    with pytest.raises(GraphError, match=r"layer 'cols' \(Im2col\): with pad \[4096, 4096, 4096\] the padded "
                                         r"input holds \d+ values"):
        net.forward(x=np.ones((1, 1, 2, 2, 2), np.float32))


def test_a_convolution_with_no_output_position_back_propagates_zeros(tmp_path):
    (tmp_path / "c.prototxt").write_text(
        'name: "c"\nforce_backward: true\n' + input_layer("x", 1, 2, 5, 8)
        + L("Convolution", "c", "x", "y", 'convolution_param { num_output: 3 kernel_size: 4 '
            'weight_filler { type: "gaussian" std: 0.1 } }'))
    from amct_caffe.runtime import TRAIN  # noqa: PLC0415

    net = Net(str(tmp_path / "c.prototxt"), TRAIN)
    assert net.forward(x=np.ones((1, 2, 3, 8), np.float32))["y"].shape == (1, 3, 0, 5)
    grad = net.backward(y=np.zeros((1, 3, 0, 5), np.float32))["x"]
    assert grad.shape == (1, 2, 3, 8) and not grad.any()
    assert not net.params["c"][0].diff.any()
