"""Backward of the spatial layers against official Caffe: Pooling (MAX with ties and its mask top,
AVE with padding, global, ceil and floor sizes), SPP, LRN (both regions, in place), Crop and the
fork's Resize; the fork's Upsample, BilinearInterpolate and MaxUnPool have an empty backward, kept as such."""

from __future__ import annotations

import numpy as np
import pytest

from tests.real_caffe import pycaffe_dir
from tests.training.gradcheck import assert_matches_caffe, caffe_grads, executor_grads, grad_problems, run_in_caffe

pytestmark = pytest.mark.real_caffe


def _layer(kind, params, bottoms=("data",), tops=("out",)):
    b = " ".join(f'bottom: "{x}"' for x in bottoms)
    t = " ".join(f'top: "{x}"' for x in tops)
    return f'layer {{ name: "l" type: "{kind}" {b} {t} {params} }}\n'


def _pool(params, tops=("out",)):
    return _layer("Pooling", f"pooling_param {{ {params} }}", tops=tops)


def _lrn(params, in_place=False):
    return _layer("LRN", f"lrn_param {{ {params} }}", tops=("data",) if in_place else ("out",))


# name: (input shapes (data, then data2), layer text, input kind: "normal" or "ties" (a few distinct values))
CASES = {
    "max_3x3_s2_ceil": ([(2, 3, 8, 8)], _pool("pool: MAX kernel_size: 3 stride: 2"), "normal"),
    "max_2x2_s2_odd": ([(2, 3, 7, 5)], _pool("pool: MAX kernel_size: 2 stride: 2"), "normal"),
    "max_3x3_s1_p1_ties": ([(2, 3, 6, 7)], _pool("pool: MAX kernel_size: 3 stride: 1 pad: 1"), "ties"),
    "max_pad_ceil_ties": ([(2, 2, 7, 6)], _pool("pool: MAX kernel_size: 3 stride: 2 pad: 1"), "ties"),
    "max_rect": ([(2, 2, 7, 9)], _pool("pool: MAX kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 1 "
                                       "pad_w: 1"), "normal"),
    "max_gaps": ([(2, 2, 8, 8)], _pool("pool: MAX kernel_size: 2 stride: 3"), "ties"),
    # (windows wholly past the input, stride > kernel, are not compared: Caffe's mask -1 makes it write before
    # its diff buffer on the first plane, which corrupts its heap)
    "max_floor": ([(2, 3, 8, 8)], _pool("pool: MAX kernel_size: 3 stride: 2 ceil_mode: false"), "ties"),
    "max_mask_top": ([(2, 3, 7, 7)], _pool("pool: MAX kernel_size: 3 stride: 2 pad: 1", ("out", "mask")), "ties"),
    "max_global_ties": ([(2, 4, 5, 6)], _pool("pool: MAX global_pooling: true"), "ties"),
    "ave_3x3_s2_p1": ([(2, 3, 7, 7)], _pool("pool: AVE kernel_size: 3 stride: 2 pad: 1"), "normal"),
    "ave_2x2_s2_odd": ([(2, 3, 5, 7)], _pool("pool: AVE kernel_size: 2 stride: 2"), "normal"),
    "ave_overlap": ([(2, 3, 6, 6)], _pool("pool: AVE kernel_size: 3 stride: 1"), "normal"),
    "ave_rect_pad": ([(2, 2, 6, 9)], _pool("pool: AVE kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 2 "
                                           "pad_w: 1"), "normal"),
    "ave_global": ([(3, 4, 5, 7)], _pool("pool: AVE global_pooling: true"), "normal"),
    "spp_max_3": ([(2, 3, 7, 9)], _layer("SPP", "spp_param { pyramid_height: 3 pool: MAX }"), "ties"),
    "spp_ave_2": ([(2, 3, 6, 5)], _layer("SPP", "spp_param { pyramid_height: 2 pool: AVE }"), "normal"),
    "spp_max_1": ([(2, 3, 5, 4)], _layer("SPP", "spp_param { pyramid_height: 1 pool: MAX }"), "normal"),
    "lrn_across_5": ([(2, 7, 4, 5)], _lrn("local_size: 5 alpha: 0.5 beta: 0.75 k: 2"), "normal"),
    "lrn_across_3": ([(2, 4, 3, 3)], _lrn("local_size: 3 alpha: 2 beta: 0.6 k: 1"), "normal"),
    "lrn_within_3": ([(2, 3, 5, 6)], _lrn("local_size: 3 alpha: 1.5 beta: 0.75 norm_region: WITHIN_CHANNEL"),
                     "normal"),
    "lrn_within_5": ([(2, 2, 6, 4)], _lrn("local_size: 5 alpha: 3 beta: 0.5 norm_region: WITHIN_CHANNEL"),
                     "normal"),
    # (in place ACROSS_CHANNELS is not compared: Caffe's forward then overwrites its input with s^-beta
    # before multiplying by it, giving y = s^(-2 beta))
    "lrn_within_in_place": ([(2, 3, 4, 5)], _lrn("local_size: 3 alpha: 2 beta: 0.75 norm_region: WITHIN_CHANNEL",
                                                 True), "normal"),
    "crop_offsets": ([(2, 3, 8, 9), (2, 3, 5, 4)], _layer("Crop", "crop_param { axis: 2 offset: 1 offset: 3 }",
                                                          ("data", "data2")), "normal"),
    "crop_axis1_single": ([(2, 5, 6, 6), (2, 3, 4, 4)], _layer("Crop", "crop_param { axis: 1 offset: 2 }",
                                                               ("data", "data2")), "normal"),
    "crop_default": ([(2, 3, 6, 7), (1, 1, 4, 3)], _layer("Crop", "", ("data", "data2")), "normal"),
    "resize_up_down": ([(2, 3, 5, 7)], _layer("Resize", "resize_param { height: 9 width: 4 }"), "normal"),
    "resize_pyramid": ([(2, 2, 6, 5)], _layer("Resize", "resize_param { is_pyramid_test: true "
                                                        "out_height_scale: 1.5 out_width_scale: 2 }"), "normal"),
}

# layers whose Caffe Backward_cpu is empty: Caffe leaves the bottom diff zero, and so does the executor
NO_BACKWARD = {
    "upsample": ([(2, 3, 3, 4)], _layer("Upsample", "upsample_param { scale: 2 }"), "normal"),
    "bilinear_interpolate": ([(2, 3, 3, 4)], _layer("BilinearInterpolate",
                                                    "bilinear_interpolate_param { dst_h: 5 dst_w: 7 }"), "normal"),
}


def _net(name, shapes, layer):
    text = f'name: "{name}"\nforce_backward: true\n'
    for blob, shape in zip(("data", "data2"), shapes, strict=False):
        dims = " ".join(f"dim: {d}" for d in shape)
        text += f'layer {{ name: "{blob}" type: "Input" top: "{blob}" input_param {{ shape {{ {dims} }} }} }}\n'
    return text + layer


@pytest.fixture(scope="module")
def caffe_results(tmp_path_factory):
    if pycaffe_dir() is None:
        pytest.skip("AMCT_REAL_CAFFE is not set")
    workdir = tmp_path_factory.mktemp("backward_spatial")
    rng = np.random.default_rng(5)
    cases = []
    for name, (shapes, layer, kind) in {**CASES, **NO_BACKWARD}.items():
        inputs = {}
        for blob, shape in zip(("data", "data2"), shapes, strict=False):
            x = rng.standard_normal(shape).astype(np.float32)
            if kind == "ties":  # a few distinct values: many windows hold their maximum twice
                x = np.round(x).astype(np.float32)
            inputs[blob] = x
        cases.append((name, _net(name, shapes, layer), inputs, "TRAIN"))
    return workdir, run_in_caffe(workdir, cases)


@pytest.mark.parametrize("case", list(CASES))
def test_spatial_backward_matches_caffe(caffe_results, case):
    workdir, results = caffe_results
    assert_matches_caffe(workdir, results, case, check_loss=False)


@pytest.mark.parametrize("case", list(NO_BACKWARD))
def test_empty_backward_leaves_the_diff_as_caffe(caffe_results, case, caplog):
    workdir, results = caffe_results
    assert results[case]["status"] == "ok", results[case]["log"]
    ref = caffe_grads(workdir, case)
    assert not np.any(ref["diff/data"])  # Caffe's empty Backward_cpu
    ours = executor_grads(workdir, case)
    assert grad_problems(ref, ours) == []
    assert "no gradient crosses" in caplog.text
