"""BatchNorm (TRAIN statistics, moving averages, both backward modes), BatchNormKyle, Scale, Bias, MVN
and Normalize: forward and backward of the executor against official Caffe, blob by blob."""

from __future__ import annotations

import numpy as np
import pytest

from tests.real_caffe import pycaffe_dir
from tests.training.gradcheck import input_layer as _input, assert_matches_caffe, caffe_grads, run_in_caffe

pytestmark = pytest.mark.real_caffe

FORCE = "force_backward: true\n"




def _layer(name, kind, bottoms, top=None, extra=""):
    bottoms = [bottoms] if isinstance(bottoms, str) else bottoms
    text = " ".join(f'bottom: "{b}"' for b in bottoms)
    return f'layer {{ name: "{name}" type: "{kind}" {text} top: "{top or name}" {extra} }}\n'


def _one(kind, shape, extra="", force=True, bottoms=("data",), more_inputs=()):
    """A net of Inputs and one layer of ``kind`` reading them."""
    text = (FORCE if force else "") + _input("data", *shape)
    for name, dims in more_inputs:
        text += _input(name, *dims)
    return text + _layer("l", kind, list(bottoms), extra=extra)


# name -> (prototxt, {input: shape}, options)
CASES = {
    # BatchNorm in TRAIN: batch statistics, moving averages (fraction, eps), the full backward
    "bn_train_4d": (_one("BatchNorm", (4, 3, 2, 3), "batch_norm_param { moving_average_fraction: 0.9 eps: 0.001 }"),
                    {"data": (4, 3, 2, 3)}, {}),
    "bn_train_2d": (_one("BatchNorm", (6, 5)), {"data": (6, 5)}, {}),
    # use_global_stats in TRAIN: the stored statistics, dx = dy / sqrt(var + eps)
    "bn_global": (_one("BatchNorm", (3, 4, 2, 2), "batch_norm_param { use_global_stats: true }"),
                  {"data": (3, 4, 2, 2)}, {}),
    # three forwards of different batches, then one backward: the moving averages and factor
    "bn_three_forwards": (_one("BatchNorm", (4, 3, 5), "batch_norm_param { moving_average_fraction: 0.8 }"),
                          {"data": (4, 3, 5), "data#1": (4, 3, 5), "data#2": (4, 3, 5)}, {"forwards": 3}),
    # in-place BatchNorm + Scale (bias) after an InnerProduct, as in every ResNet block; the IP's
    # input takes no gradient (no force_backward), a Euclidean loss drives it (a loss_weight on ip2
    # would give BatchNorm a per-channel constant top diff, whose gradient is zero up to rounding)
    "ip_bn_scale_in_place": (_input("data", 4, 5) + _input("t", 4, 3) +
                             _layer("ip", "InnerProduct", "data", extra="inner_product_param { num_output: 6 }") +
                             _layer("bn", "BatchNorm", "ip", "ip") +
                             _layer("sc", "Scale", "ip", "ip", "scale_param { bias_term: true }") +
                             _layer("ip2", "InnerProduct", "ip", extra="inner_product_param { num_output: 3 }") +
                             _layer("loss", "EuclideanLoss", ["ip2", "t"], extra="loss_weight: 0.5"),
                             {"data": (4, 5), "t": (4, 3)}, {}),
    # BatchNorm on a net input without force_backward: Caffe's backward still writes the input's diff
    # (a Euclidean loss: a per-channel constant top diff, as an InnerProduct gives, has a zero gradient)
    "bn_input_no_force": (_input("data", 4, 3) + _input("t", 4, 3) + _layer("bn", "BatchNorm", "data") +
                          _layer("loss", "EuclideanLoss", ["bn", "t"]),
                          {"data": (4, 3), "t": (4, 3)}, {}),
    "bn_lr_mult_zero": (_one("BatchNorm", (4, 3, 2), "param { lr_mult: 0 } param { lr_mult: 0 } "
                             "param { lr_mult: 0 }"), {"data": (4, 3, 2)}, {}),
    "kyle_train": (_one("BatchNormKyle", (4, 3, 2, 2), "batch_norm_param { use_alpha_beta: true "
                        "moving_average_fraction: 0.5 }"), {"data": (4, 3, 2, 2)}, {}),
    "kyle_global": (_one("BatchNormKyle", (4, 3, 2), "batch_norm_param { use_alpha_beta: true "
                         "use_global_stats: true }"), {"data": (4, 3, 2)}, {}),
    "kyle_plain": (_one("BatchNormKyle", (5, 2, 3)), {"data": (5, 2, 3)}, {}),
    # Scale: learned scale (accumulated / assigned diff paths), bias, a second bottom, in place
    "scale_axis1_bias": (_one("Scale", (2, 3, 4, 2), "scale_param { bias_term: true }"),
                         {"data": (2, 3, 4, 2)}, {}),
    "scale_two_axes": (_one("Scale", (2, 3, 4, 2), "scale_param { axis: 1 num_axes: 2 bias_term: true }"),
                       {"data": (2, 3, 4, 2)}, {}),
    "scale_scalar": (_one("Scale", (2, 3, 4), "scale_param { num_axes: 0 }"), {"data": (2, 3, 4)}, {}),
    "scale_eltwise": (_one("Scale", (2, 3, 4), "scale_param { axis: 0 num_axes: -1 }"), {"data": (2, 3, 4)}, {}),
    "scale_outer_one": (_one("Scale", (2, 3, 4), "scale_param { axis: 0 num_axes: 2 }"), {"data": (2, 3, 4)}, {}),
    "scale_inner_one": (_one("Scale", (2, 3, 4), "scale_param { axis: -1 }"), {"data": (2, 3, 4)}, {}),
    "scale_bottom": (_one("Scale", (2, 3, 4), "scale_param { axis: 1 bias_term: true }", bottoms=("data", "s"),
                          more_inputs=[("s", (3, 4))]), {"data": (2, 3, 4), "s": (3, 4)}, {}),
    "scale_in_place": (FORCE + _input("data", 3, 4, 2) + _layer("sc", "Scale", "data", "data",
                                                                 "scale_param { bias_term: true }"),
                       {"data": (3, 4, 2)}, {}),
    # no gradient into the input: Caffe leaves its dy * x scratch in the input's diff
    "scale_scratch": (_input("data", 3, 4) + _layer("sc", "Scale", "data") +
                      _layer("ip", "InnerProduct", "sc", extra="inner_product_param { num_output: 2 } loss_weight: 1"),
                      {"data": (3, 4)}, {}),
    "bias_learned": (_one("Bias", (2, 3, 4), "bias_param { axis: 1 num_axes: 2 }"), {"data": (2, 3, 4)}, {}),
    "bias_bottom": (_one("Bias", (2, 3, 4), "bias_param { axis: 0 }", bottoms=("data", "b"),
                         more_inputs=[("b", (2,))]), {"data": (2, 3, 4), "b": (2,)}, {}),
    "bias_in_place": (FORCE + _input("data", 2, 3) + _layer("b", "Bias", "data", "data"), {"data": (2, 3)}, {}),
    # MVN: within channel / across channels, with and without the variance; a 3-axis bottom
    "mvn_default": (_one("MVN", (2, 3, 4, 2)), {"data": (2, 3, 4, 2)}, {}),
    "mvn_across": (_one("MVN", (2, 3, 4, 2), "mvn_param { across_channels: true eps: 0.001 }"),
                   {"data": (2, 3, 4, 2)}, {}),
    "mvn_mean_only": (_one("MVN", (3, 4, 5), "mvn_param { normalize_variance: false }"), {"data": (3, 4, 5)}, {}),
    "mvn_input_no_force": (_input("data", 2, 3, 4) + _input("t", 2, 3, 4, 1) + _layer("m", "MVN", "data") +
                           _layer("loss", "EuclideanLoss", ["m", "t"]),
                           {"data": (2, 3, 4), "t": (2, 3, 4, 1)}, {}),
    # Normalize (SSD): every across_spatial x channel_shared combination; the scale's diff
    "norm_spatial_shared": (_one("Normalize", (2, 3, 2, 2)), {"data": (2, 3, 2, 2)}, {}),
    "norm_spatial_channels": (_one("Normalize", (2, 3, 2, 2), "norm_param { channel_shared: false }"),
                              {"data": (2, 3, 2, 2)}, {}),
    "norm_pixel_shared": (_one("Normalize", (2, 4, 3, 2), "norm_param { across_spatial: false }"),
                          {"data": (2, 4, 3, 2)}, {}),
    "norm_pixel_channels": (_one("Normalize", (2, 4, 3, 2), "norm_param { across_spatial: false "
                                 "channel_shared: false eps: 0.01 }"), {"data": (2, 4, 3, 2)}, {}),
    # an in-place MVN on 3 axes gives the shared blob 4 (Caffe's legacy accessors): the Scale and ReLU below
    # still backpropagate through it (their backward received the diff in the 4-axis shape and failed)
    "mvn_in_place_reshapes_below": (FORCE + _input("data", 2, 3, 4)
                                    + _layer("s", "Scale", "data", "h", 'scale_param { filler { type: "gaussian" } }')
                                    + _layer("r", "ReLU", "h", "h") + _layer("m", "MVN", "h", "h"),
                                    {"data": (2, 3, 4)}, {}),
}


@pytest.fixture(scope="module")
def caffe_results(tmp_path_factory):
    if pycaffe_dir() is None:
        pytest.skip("AMCT_REAL_CAFFE is not set")
    workdir = tmp_path_factory.mktemp("backward_norm")
    rng = np.random.default_rng(11)
    cases = []
    for name, (text, inputs, options) in CASES.items():
        arrays = {k: (1.5 * rng.standard_normal(s) + 0.3).astype(np.float32) for k, s in inputs.items()}
        cases.append((name, f'name: "{name}"\n' + text, arrays, "TRAIN", options))
    return workdir, run_in_caffe(workdir, cases)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_caffe(caffe_results, case):
    workdir, results = caffe_results
    assert_matches_caffe(workdir, results, case)


def test_moving_averages_moved(caffe_results):
    """The three-forward case really updated the statistics: factor = f^3 a + f^2 + f + 1."""
    from amct_caffe.runtime import TRAIN, Net  # noqa: PLC0415

    workdir, _ = caffe_results
    ref = caffe_grads(workdir, "bn_three_forwards")
    start = Net(str(workdir / "bn_three_forwards.prototxt"), str(workdir / "bn_three_forwards.caffemodel"),
                TRAIN).params["l"][2].data
    f = np.float32(0.8)
    np.testing.assert_allclose(ref["pdata/l/2"], start * f**3 + f**2 + f + 1, rtol=1e-6)


BN_SHAPES = [(2, 3), (1, 5), (4, 8, 5, 7), (1, 16, 1, 1), (3, 6, 2, 3, 4), (8, 64, 14, 14), (2, 512, 3, 3),
             (1, 32, 40, 40),
             (4096, 3), (2400, 4), (9217, 1), (4096, 5)]  # few channels: OpenBLAS splits the batch sum instead


def test_batch_statistics_are_caffes_bit_for_bit(tmp_path):
    """BatchNorm in TRAIN (batch statistics): top, the three statistics blobs after two forwards and the bottom
    diff are real Caffe's bytes. Summed in float64 they were about 1e-7 off, enough to flip a deep net's ReLU
    masks and move its gradients by up to 1e-2..0.5 relative (MobileNet, ResNet-18 on batch statistics). The
    inputs have channel means far from zero and sizes that thread Caffe's sgemv."""
    from tests.real_caffe import run_with_pycaffe

    rng = np.random.default_rng(5)
    arrays = {}
    for i, shape in enumerate(BN_SHAPES):
        offset = rng.normal(0, 50, (1, shape[1]) + (1,) * (len(shape) - 2))
        arrays[f"x{i}"] = (rng.standard_normal(shape) * rng.uniform(0.1, 3) + offset).astype(np.float32)
        arrays[f"x2_{i}"] = rng.standard_normal(shape).astype(np.float32)
        arrays[f"dy{i}"] = rng.standard_normal(shape).astype(np.float32)
    np.savez(tmp_path / "in.npz", **arrays)
    script = f"""
import sys, numpy as np
which = sys.argv[1]
if which == "caffe":
    import os
    os.environ["OPENBLAS_NUM_THREADS"] = "2"  # the multi-threaded Caffe the executor reproduces (caffe_gemm.py)
    import caffe
    Net, TRAIN = caffe.Net, caffe.TRAIN
else:
    from amct_caffe.runtime import Net, TRAIN
d, out = np.load({str(tmp_path / 'in.npz')!r}), {{}}
for i, shape in enumerate({BN_SHAPES!r}):
    path = {str(tmp_path)!r} + f"/bn{{i}}.prototxt"
    dims = " ".join(f"dim: {{v}}" for v in shape)
    open(path, "w").write('force_backward: true\\nlayer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ '
                          + dims + ' }} }} }}\\nlayer {{ name: "bn" type: "BatchNorm" bottom: "x" top: "y" '
                          'batch_norm_param {{ moving_average_fraction: 0.9 }} }}\\n')
    net = Net(path, TRAIN)
    for x in (d[f"x2_{{i}}"], d[f"x{{i}}"]):
        net.blobs["x"].data[...] = x
        net.forward()
    net.blobs["y"].diff[...] = d[f"dy{{i}}"]
    net.backward()
    out[f"top{{i}}"] = net.blobs["y"].data.copy()
    out[f"dx{{i}}"] = net.blobs["x"].diff.copy()
    for j in range(3):
        out[f"b{{j}}_{{i}}"] = net.params["bn"][j].data.copy()
np.savez({str(tmp_path)!r} + f"/{{which}}.npz", **out)
"""
    (tmp_path / "run.py").write_text(script)
    for which in ("caffe", "ours"):
        done = run_with_pycaffe(f"import runpy, sys; sys.argv = ['run.py', {which!r}]; "
                                f"runpy.run_path({str(tmp_path / 'run.py')!r}, run_name='__main__')")
        assert done.returncode == 0, done.stderr[-3000:]
    caffe, ours = np.load(tmp_path / "caffe.npz"), np.load(tmp_path / "ours.npz")
    for key in caffe.files:
        np.testing.assert_array_equal(ours[key].view(np.uint32), caffe[key].view(np.uint32), err_msg=key)
