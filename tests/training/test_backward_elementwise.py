"""Backward of the element-wise, data-movement, Reduction and Softmax layers against official Caffe.

Every case is a ``force_backward`` net on random inputs (unless it says otherwise), run once in
real Caffe; data, diffs and learned-blob diffs are compared blob by blob. The nets use
in-place chains and blobs read by several layers, where Caffe's split sums and its in-place
formulas (a layer reading its own overwritten output as bottom data) matter.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.real_caffe import pycaffe_dir
from tests.training.gradcheck import assert_matches_caffe, run_in_caffe

pytestmark = pytest.mark.real_caffe


def L(ltype, name, bottoms, tops, params=""):  # noqa: N802 - reads like a prototxt line
    """One prototxt layer; ``bottoms`` / ``tops`` are space-separated blob names."""
    b = " ".join(f'bottom: "{x}"' for x in bottoms.split())
    t = " ".join(f'top: "{x}"' for x in tops.split())
    return f'layer {{ name: "{name}" type: "{ltype}" {b} {t} {params} }}\n'


def IN(name, *dims):  # noqa: N802
    shape = " ".join(f"dim: {d}" for d in dims)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {shape} }} }} }}\n'


def IP(name, bottom, n, top=None):  # noqa: N802
    return L("InnerProduct", name, bottom, top or name, f"inner_product_param {{ num_output: {n} }}")


FB = "force_backward: true\n"
# name -> (prototxt body, {input: shape}, phase, input scale)
CASES = {
    # ReLU in place after an InnerProduct, then a leaky ReLU (not in place) and a negative slope in place
    "relu": (FB + IN("data", 4, 6) + IP("ip", "data", 8) + L("ReLU", "r0", "ip", "ip") +
             IP("ip2", "ip", 7) + L("ReLU", "r1", "ip2", "leaky", "relu_param { negative_slope: 0.1 }") +
             IP("ip3", "data", 5) + L("ReLU", "r2", "ip3", "ip3", "relu_param { negative_slope: -0.3 }"),
             {"data": (4, 6)}, "TRAIN", 1.0),
    "relu6": (FB + IN("data", 3, 4, 5) + L("ReLU6", "r6", "data", "r6", "relu6_param { threshold: 1.0 }") +
              IP("ip", "data", 6) + L("ReLU6", "r6b", "ip", "ip",
                                      "relu6_param { negative_slope: 0.2 threshold: 0.5 }"),
              {"data": (3, 4, 5)}, "TRAIN", 2.0),
    # per-channel slopes on a 4-D blob; a shared slope in place (Caffe keeps the input for it)
    "prelu": (FB + IN("data", 2, 3, 4, 5) + L("PReLU", "pr", "data", "pr") +
              IP("ip", "data", 6) + L("PReLU", "prs", "ip", "ip", "prelu_param { channel_shared: true }") +
              IP("ip2", "ip", 4) + L("PReLU", "pr2", "ip2", "ip2"),
              {"data": (2, 3, 4, 5)}, "TRAIN", 1.0),
    "sigmoid_tanh_inplace": (FB + IN("data", 3, 5) + IP("ip", "data", 6) + L("Sigmoid", "s", "ip", "ip") +
                             IP("ip2", "ip", 5) + L("TanH", "t", "ip2", "ip2") +
                             L("Sigmoid", "s2", "data", "s2") + L("TanH", "t2", "data", "t2"),
                             {"data": (3, 5)}, "TRAIN", 2.0),
    "elu_absval_bnll": (FB + IN("data", 3, 4, 5) + L("ELU", "e", "data", "e", "elu_param { alpha: 0.5 }") +
                        IP("ip", "data", 6) + L("ELU", "e2", "ip", "ip") +
                        L("AbsVal", "a", "data", "a") + L("BNLL", "b", "data", "b"),
                        {"data": (3, 4, 5)}, "TRAIN", 30.0),
    # every branch of PowerLayer::Backward_cpu; in place, Caffe's formulas read the output as x
    "power": (FB + IN("data", 3, 7) +
              L("Power", "sq", "data", "sq", "power_param { power: 2 scale: 0.5 shift: 1 }") +
              L("Power", "lin", "data", "lin", "power_param { power: 1 scale: 2 shift: -1 }") +
              L("Power", "const", "data", "const", "power_param { power: 0 scale: 2 }") +
              L("Power", "gen", "data", "gen", "power_param { power: 1.5 scale: 0.5 shift: 3 }") +
              L("Exp", "ex", "data", "ex") +
              L("Power", "cube", "ex", "ex", "power_param { power: 3 }") +
              IP("ip", "data", 5) + L("Power", "ipp", "ip", "ip", "power_param { power: 2 shift: 0.5 }") +
              IP("ip2", "data", 4) +
              L("Power", "ipp2", "ip2", "ip2", "power_param { power: -1 scale: 0.2 shift: 4 }"),
              {"data": (3, 7)}, "TRAIN", 1.0),
    "exp_log": (FB + IN("data", 3, 6) +
                L("Exp", "e", "data", "e") +
                L("Exp", "e2", "data", "e2", "exp_param { base: 2 scale: 0.5 shift: 1 }") +
                L("Log", "l", "e", "l") +
                L("Log", "l2", "data", "l2", "log_param { base: 10 scale: 0.5 shift: 3 }") +
                IP("ip", "data", 4) + L("Exp", "ipe", "ip", "ip", "exp_param { scale: -0.5 }"),
                {"data": (3, 6)}, "TRAIN", 1.0),
    # the fork's empty backwards: the bottom diff is left as it was
    "empty_backward": (FB + IN("data", 2, 3, 4) + L("HardSwish", "hs", "data", "hs") +
                       IP("ip", "data", 5) + L("HardSigmoid", "hsg", "ip", "ip") +
                       IN("data2", 2, 3) + L("Unsqueeze", "u", "data2", "u", "unsqueeze_param { dim: 1 }"),
                       {"data": (2, 3, 4), "data2": (2, 3)}, "TRAIN", 3.0),
    # ratio 0 in TRAIN keeps everything (Caffe's DCHECK is off in release builds)
    "dropout_train_ratio0": (FB + IN("data", 3, 5) + IP("ip", "data", 6) +
                             L("Dropout", "d", "ip", "ip", "dropout_param { dropout_ratio: 0 }") +
                             L("Dropout", "d2", "data", "d2", "dropout_param { dropout_ratio: 0 }"),
                             {"data": (3, 5)}, "TRAIN", 1.0),
    "dropout_test": (FB + IN("data", 3, 5) + IP("ip", "data", 6) + L("Dropout", "d", "ip", "ip") +
                     L("Dropout", "d2", "data", "d2", "dropout_param { dropout_ratio: 0.3 }"),
                     {"data": (3, 5)}, "TEST", 1.0),
    # an in-place chain on a blob then read by several layers
    "inplace_chain_readers": (FB + IN("data", 4, 6) + IP("ip", "data", 8) + L("ReLU", "r", "ip", "ip") +
                              L("Dropout", "d", "ip", "ip", "dropout_param { dropout_ratio: 0 }") +
                              L("Power", "p", "ip", "ip", "power_param { power: 2 scale: 0.5 shift: 1 }") +
                              L("Sigmoid", "s", "ip", "s") + L("TanH", "t", "ip", "t") +
                              L("Eltwise", "sum", "s t ip", "sum") + IP("ip2", "sum", 3),
                              {"data": (4, 6)}, "TRAIN", 1.0),
    "eltwise_sum": (FB + IN("a", 2, 3, 4) + IN("b", 2, 3, 4) + IN("c", 2, 12) +
                    L("Eltwise", "s", "a b c", "s", "eltwise_param { operation: SUM coeff: 1 coeff: -0.5 coeff: 2 }") +
                    L("Eltwise", "s2", "a b", "s2") +
                    IP("ip", "a", 12) + L("Eltwise", "s3", "ip c", "ip", "eltwise_param { coeff: 2 coeff: 1 }"),
                    {"a": (2, 3, 4), "b": (2, 3, 4), "c": (2, 12)}, "TRAIN", 1.0),
    "eltwise_prod": (FB + IN("a", 2, 3, 4) + IN("b", 2, 3, 4) + IN("c", 2, 3, 4) +
                     L("Eltwise", "p", "a b c", "p", "eltwise_param { operation: PROD }") +
                     L("Eltwise", "p2", "a b c", "p2", "eltwise_param { operation: PROD stable_prod_grad: false }") +
                     IP("ip", "a", 24) + IP("ipb", "b", 24) +
                     L("Eltwise", "p3", "ip ipb", "ip", "eltwise_param { operation: PROD stable_prod_grad: false }") +
                     IP("ip2", "c", 24) + IP("ipc", "c", 24) +
                     L("Eltwise", "p4", "ip2 ipc", "ip2", "eltwise_param { operation: PROD }"),
                     {"a": (2, 3, 4), "b": (2, 3, 4), "c": (2, 3, 4)}, "TRAIN", 1.0),
    "eltwise_max": (FB + IN("a", 2, 3, 4) + IN("b", 2, 3, 4) + IN("c", 2, 3, 4) +
                    L("Eltwise", "m", "a b c", "m", "eltwise_param { operation: MAX }") +
                    L("Eltwise", "m2", "a b", "m2", "eltwise_param { operation: MAX }") +
                    IP("ip", "a", 24) + IP("ipb", "b", 24) +
                    L("Eltwise", "m3", "ip ipb", "ip", "eltwise_param { operation: MAX }"),
                    {"a": (2, 3, 4), "b": (2, 3, 4), "c": (2, 3, 4)}, "TRAIN", 1.0),
    "concat_slice_split": (FB + IN("a", 2, 3, 4) + IN("b", 2, 5, 4) + IN("c", 1, 3, 4) +
                           L("Concat", "cat", "a b", "cat") + L("Concat", "cat0", "a c", "cat0",
                                                               "concat_param { axis: 0 }") +
                           L("Concat", "one", "b", "one") + L("ReLU", "r", "one", "one2") +
                           L("Slice", "sl", "cat", "s1 s2 s3",
                             "slice_param { axis: 1 slice_point: 2 slice_point: 6 }") +
                           L("Slice", "sl2", "a", "h1 h2", "slice_param { axis: -1 }") +
                           L("Split", "sp", "c", "c1 c2 c3") + L("Sigmoid", "sg", "c1", "c1s") +
                           L("TanH", "th", "c2", "c2t") + L("Eltwise", "e", "c1s c2t c3", "csum"),
                           {"a": (2, 3, 4), "b": (2, 5, 4), "c": (1, 3, 4)}, "TRAIN", 1.0),
    # Reshape/Flatten share data and diff with their bottom; an in-place ReLU on the reshaped blob
    "flatten_reshape_permute": (FB + IN("data", 2, 3, 4, 5) + L("Flatten", "f", "data", "f") +
                                L("Flatten", "f2", "data", "f2", "flatten_param { axis: 2 }") +
                                L("Reshape", "rs", "data", "rs", "reshape_param { shape { dim: 0 dim: -1 dim: 2 } }") +
                                IP("ip", "data", 12) +
                                L("Reshape", "rs2", "ip", "rs2", "reshape_param { shape { dim: 0 dim: 3 dim: 4 } }") +
                                L("ReLU", "r", "rs2", "rs2") +
                                L("Permute", "pm", "data", "pm",
                                  "permute_param { order: 0 order: 2 order: 3 order: 1 }") +
                                L("Permute", "pm2", "data", "pm2", "permute_param { order: 3 order: 1 }") +
                                L("Permute", "pmid", "f", "pmid", "permute_param { order: 0 order: 1 }"),
                                {"data": (2, 3, 4, 5)}, "TRAIN", 1.0),
    "tile_silence": (FB + IN("data", 2, 3, 4) + L("Tile", "t", "data", "t", "tile_param { axis: 1 tiles: 3 }") +
                     L("Tile", "t2", "data", "t2", "tile_param { axis: -1 tiles: 2 }") +
                     L("Silence", "si", "data", "") + IP("ip", "data", 4) + L("Silence", "si2", "ip", ""),
                     {"data": (2, 3, 4)}, "TRAIN", 1.0),
    # no force_backward: Caffe CHECK-fails on a gradient into the index
    "batch_reindex": (IN("data", 3, 4) + IN("idx", 5) + IP("ip", "data", 6) +
                      L("BatchReindex", "br", "ip idx", "br", "loss_weight: 1"),
                      {"data": (3, 4)}, "TRAIN", 1.0),
    "reduction": (FB + IN("data", 2, 3, 4) +
                  L("Reduction", "sum", "data", "sum", "reduction_param { operation: SUM axis: 1 coeff: 2 }") +
                  L("Reduction", "asum", "data", "asum", "reduction_param { operation: ASUM axis: 2 }") +
                  L("Reduction", "sumsq", "data", "sumsq", "reduction_param { operation: SUMSQ axis: 1 coeff: -0.5 }") +
                  L("Reduction", "mean", "data", "mean", "reduction_param { operation: MEAN axis: -1 coeff: 3 }") +
                  IP("ip", "data", 5) + L("Reduction", "all", "ip", "all", "reduction_param { operation: ASUM }") +
                  L("Reshape", "allr", "all", "allr", "reshape_param { shape { dim: 1 } }"),
                  {"data": (2, 3, 4)}, "TRAIN", 1.0),
    # in place, Caffe's Log writes its derivative over the top diff before reading it
    "log_inplace": (FB + IN("data", 3, 6) + IP("ip", "data", 5) + L("Exp", "e", "ip", "ip") +
                    L("Log", "l", "ip", "ip", "log_param { base: 2 scale: 0.5 shift: 1 }") + IP("ip2", "ip", 3),
                    {"data": (3, 6)}, "TRAIN", 1.0),
    # in place with three bottoms: the bottoms after the first read its diff as their top diff
    "eltwise_inplace_three": (FB + IN("a", 2, 6) + IN("b", 2, 6) + IN("c", 2, 6) +
                              IP("ia", "a", 6) + L("Eltwise", "s", "ia b c", "ia",
                                                   "eltwise_param { coeff: 0.5 coeff: -2 coeff: 3 }") +
                              IP("ib", "b", 6) + L("Eltwise", "p", "ib a c", "ib",
                                                   "eltwise_param { operation: PROD }") +
                              IP("ic", "c", 6) + L("Eltwise", "m", "ic a b", "ic",
                                                   "eltwise_param { operation: MAX }"),
                              {"a": (2, 6), "b": (2, 6), "c": (2, 6)}, "TRAIN", 1.0),
    "crop": (FB + IN("data", 2, 3, 6, 5) + IN("ref", 2, 3, 4, 2) +
             L("Crop", "c", "data ref", "c", "crop_param { axis: 2 offset: 1 offset: 2 }") +
             L("Crop", "c2", "data ref", "c2", "crop_param { axis: 1 offset: 0 }"),
             {"data": (2, 3, 6, 5), "ref": (2, 3, 4, 2)}, "TRAIN", 1.0),
    "softmax": (FB + IN("data", 2, 3, 4, 5) + L("Softmax", "sm", "data", "sm") +
                L("Softmax", "sm3", "data", "sm3", "softmax_param { axis: -1 }") +
                IP("ip", "data", 7) + L("Softmax", "smi", "ip", "ip") + IP("ip2", "ip", 3),
                {"data": (2, 3, 4, 5)}, "TRAIN", 0.5),
}

SPECIAL_INPUTS = {"batch_reindex": {"idx": np.array([2, 0, 0, 1, 2], np.float32)}}


def case_inputs(name, rng):
    _, shapes, _, scale = CASES[name]
    inputs = {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    inputs.update(SPECIAL_INPUTS.get(name, {}))
    return inputs


@pytest.fixture(scope="module")
def caffe_results(tmp_path_factory):
    if pycaffe_dir() is None:
        pytest.skip("AMCT_REAL_CAFFE is not set")
    workdir = tmp_path_factory.mktemp("backward_elementwise")
    rng = np.random.default_rng(11)
    cases = [(name, f'name: "{name}"\n' + CASES[name][0], case_inputs(name, rng), CASES[name][2])
             for name in CASES]
    return workdir, run_in_caffe(workdir, cases)


@pytest.mark.parametrize("case", sorted(CASES))
def test_backward_matches_caffe(caffe_results, case):
    workdir, results = caffe_results
    assert_matches_caffe(workdir, results, case, CASES[case][2])
