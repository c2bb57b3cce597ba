"""Loss layers and Accuracy against official Caffe: the loss (Net.loss), tops, and every gradient."""

from __future__ import annotations

import numpy as np
import pytest

from amct_caffe.errors import GraphError
from amct_caffe.io.blobs import array_to_blob
from amct_caffe.io.schema import caffe_pb
from amct_caffe.runtime import TRAIN, Net
from tests.real_caffe import pycaffe_dir
from tests.training.gradcheck import input_layer as _input, assert_matches_caffe, caffe_grads, run_in_caffe

pytestmark = pytest.mark.real_caffe

FORCE = "force_backward: true\n"




def _layer(name, kind, bottoms, tops=None, extra=""):
    text = " ".join(f'bottom: "{b}"' for b in bottoms)
    text += " " + " ".join(f'top: "{t}"' for t in (tops or [name]))
    return f'layer {{ name: "{name}" type: "{kind}" {text} {extra} }}\n'


def _loss(kind, data, label, extra="", force=True, tops=None):
    """Inputs data (shape ``data``) and label (shape ``label``) read by one ``kind`` layer."""
    return ((FORCE if force else "") + _input("data", *data) + _input("label", *label) +
            _layer("loss", kind, ["data", "label"], tops, extra))


SOFTMAX_4x5 = ((4, 5), (4,))
SPATIAL = ((2, 4, 3, 2), (2, 3, 2))

# name -> (prototxt, {input: (shape, kind)}); kind: "normal", "prob" (softmax rows), "binary",
# "unit" (uniform 0..1), or an int C (labels 0..C-1)
CASES = {
    "softmax_basic": (_loss("SoftmaxWithLoss", *SOFTMAX_4x5), {"data": ((4, 5), "normal"), "label": ((4,), 5)}),
    "softmax_ignore_valid": (_loss("SoftmaxWithLoss", *SPATIAL, "loss_param { ignore_label: 2 }"),
                             {"data": ((2, 4, 3, 2), "normal"), "label": ((2, 3, 2), 4)}),
    "softmax_full": (_loss("SoftmaxWithLoss", *SPATIAL, "loss_param { ignore_label: 1 normalization: FULL }"),
                     {"data": ((2, 4, 3, 2), "normal"), "label": ((2, 3, 2), 4)}),
    "softmax_batch": (_loss("SoftmaxWithLoss", *SPATIAL, "loss_param { normalization: BATCH_SIZE }"),
                      {"data": ((2, 4, 3, 2), "normal"), "label": ((2, 3, 2), 4)}),
    "softmax_none": (_loss("SoftmaxWithLoss", *SPATIAL, "loss_param { normalization: NONE }"),
                     {"data": ((2, 4, 3, 2), "normal"), "label": ((2, 3, 2), 4)}),
    "softmax_legacy_false": (_loss("SoftmaxWithLoss", *SPATIAL, "loss_param { normalize: false ignore_label: 0 }"),
                             {"data": ((2, 4, 3, 2), "normal"), "label": ((2, 3, 2), 4)}),
    "softmax_legacy_true": (_loss("SoftmaxWithLoss", *SPATIAL, "loss_param { normalize: true ignore_label: 0 }"),
                            {"data": ((2, 4, 3, 2), "normal"), "label": ((2, 3, 2), 4)}),
    "softmax_axis2": (_loss("SoftmaxWithLoss", (2, 3, 5), (2, 3), "softmax_param { axis: 2 }"),
                      {"data": ((2, 3, 5), "normal"), "label": ((2, 3), 5)}),
    # propagate_down on the label changes nothing when no gradient reaches the layer
    "softmax_label_pd_idle": (_loss("SoftmaxWithLoss", *SOFTMAX_4x5, "propagate_down: true propagate_down: true",
                                    force=False), {"data": ((4, 5), "normal"), "label": ((4,), 5)}),
    # an InnerProduct under the loss: its weights learn, no force_backward
    "ip_softmax": (_input("data", 4, 6) + _input("label", 4) +
                   _layer("ip", "InnerProduct", ["data"], extra="inner_product_param { num_output: 3 }") +
                   _layer("loss", "SoftmaxWithLoss", ["ip", "label"], extra="loss_weight: 0.7") +
                   _layer("acc", "Accuracy", ["ip", "label"]),
                   {"data": ((4, 6), "normal"), "label": ((4,), 3)}),
    "euclidean": (_loss("EuclideanLoss", (3, 4), (3, 2, 2), "loss_weight: 0.5"),
                  {"data": ((3, 4), "normal"), "label": ((3, 2, 2), "normal")}),
    "sigmoid_ce": (_loss("SigmoidCrossEntropyLoss", (3, 4), (3, 4)),
                   {"data": ((3, 4), "normal"), "label": ((3, 4), "binary")}),
    # the fork's layer reads no loss_param: normalization is ignored, the loss is divided by N
    "sigmoid_ce_soft_full": (_loss("SigmoidCrossEntropyLoss", (2, 3, 2), (2, 6), "loss_param { normalization: FULL }"),
                             {"data": ((2, 3, 2), "normal"), "label": ((2, 6), "unit")}),
    "hinge_l1": (_loss("HingeLoss", (4, 5), (4,)), {"data": ((4, 5), "normal"), "label": ((4,), 5)}),
    "hinge_l2": (_loss("HingeLoss", (4, 5), (4,), "hinge_loss_param { norm: L2 } loss_weight: 3"),
                 {"data": ((4, 5), "normal"), "label": ((4,), 5)}),
    "multinomial": (_loss("MultinomialLogisticLoss", (4, 5), (4,)), {"data": ((4, 5), "prob"), "label": ((4,), 5)}),
    "contrastive": (FORCE + _input("a", 5, 3) + _input("b", 5, 3) + _input("sim", 5) +
                    _layer("loss", "ContrastiveLoss", ["a", "b", "sim"], extra="contrastive_loss_param { margin: 3 }"),
                    {"a": ((5, 3), "normal"), "b": ((5, 3), "normal"), "sim": ((5,), 2)}),
    "contrastive_legacy": (FORCE + _input("a", 5, 3) + _input("b", 5, 3) + _input("sim", 5) +
                           _layer("loss", "ContrastiveLoss", ["a", "b", "sim"],
                                  extra="contrastive_loss_param { margin: 6 legacy_version: true }"),
                           {"a": ((5, 3), "normal"), "b": ((5, 3), "normal"), "sim": ((5,), 2)}),
    # the infogain matrix as bottom 2 (no force_backward: Caffe refuses a gradient for it)
    "infogain_bottom": (_input("data", 4, 3) + _input("label", 4) + _input("h", 1, 1, 3, 3) +
                        _layer("loss", "InfogainLoss", ["data", "label", "h"]),
                        {"data": ((4, 3), "prob"), "label": ((4,), 3), "h": ((1, 1, 3, 3), "unit")}),
    # Accuracy: top-k, ignore_label, a spatial axis, the per-class top, ties between scores
    "accuracy_top2": (_loss("Accuracy", (6, 5), (6,), "accuracy_param { top_k: 2 }", force=False),
                      {"data": ((6, 5), "normal"), "label": ((6,), 5)}),
    "accuracy_spatial": (_loss("Accuracy", (2, 4, 3), (2, 3), "accuracy_param { ignore_label: 1 }", force=False,
                               tops=["acc", "per_class"]),
                         {"data": ((2, 4, 3), "normal"), "label": ((2, 3), 4)}),
    "accuracy_ties": (_loss("Accuracy", (8, 4), (8,), "accuracy_param { top_k: 2 }", force=False,
                            tops=["acc", "per_class"]),
                      {"data": ((8, 4), "ties"), "label": ((8,), 4)}),
    "accuracy_axis_last": (_loss("Accuracy", (3, 2, 4), (3, 2), "accuracy_param { axis: -1 }", force=False),
                           {"data": ((3, 2, 4), "normal"), "label": ((3, 2), 4)}),
}

# Caffe aborts in these nets' backward; the executor refuses them with a GraphError
REFUSED = {
    "softmax_label_diff": (_input("data", 4, 6) + _input("label", 4) +
                           _layer("ip", "InnerProduct", ["data"], extra="inner_product_param { num_output: 3 }") +
                           _layer("loss", "SoftmaxWithLoss", ["ip", "label"],
                                  extra="propagate_down: true propagate_down: true"),
                           {"data": ((4, 6), "normal"), "label": ((4,), 3)}),
    # the fork's SoftmaxWithLoss cannot have its prob top (see SoftmaxWithLossLayer): refused when built
    "softmax_prob_top": (_loss("SoftmaxWithLoss", *SOFTMAX_4x5, "loss_weight: 2 loss_weight: 0",
                               tops=["loss", "prob"]), {"data": ((4, 5), "normal"), "label": ((4,), 5)}),
    "accuracy_forced": (_loss("Accuracy", (4, 5), (4,)), {"data": ((4, 5), "normal"), "label": ((4,), 5)}),
    "infogain_forced": (FORCE + CASES["infogain_bottom"][0], CASES["infogain_bottom"][1]),
}


def _arrays(spec, rng):
    out = {}
    for name, (shape, kind) in spec.items():
        if isinstance(kind, int):
            v = rng.integers(0, kind, shape)
        elif kind == "prob":
            e = np.exp(rng.standard_normal(shape))
            v = e / e.sum(axis=1, keepdims=True)
        elif kind == "binary":
            v = rng.integers(0, 2, shape)
        elif kind == "unit":
            v = rng.uniform(0, 1, shape)
        elif kind == "ties":
            v = rng.integers(0, 3, shape)
        else:
            v = 1.5 * rng.standard_normal(shape)
        out[name] = np.asarray(v, np.float32)
    return out


@pytest.fixture(scope="module")
def caffe_results(tmp_path_factory):
    if pycaffe_dir() is None:
        pytest.skip("AMCT_REAL_CAFFE is not set")
    workdir = tmp_path_factory.mktemp("losses")
    rng = np.random.default_rng(5)
    cases = [(name, f'name: "{name}"\n' + text, _arrays(spec, rng), "TRAIN")
             for name, (text, spec) in {**CASES, **REFUSED}.items()]
    # InfogainLoss reading its matrix from infogain_loss_param.source (a BlobProto file)
    blob = caffe_pb().BlobProto()
    array_to_blob(rng.uniform(0, 2, (1, 1, 3, 3)).astype(np.float32), blob)
    (workdir / "h.binaryproto").write_bytes(blob.SerializeToString())
    text = _loss("InfogainLoss", (4, 3), (4,), f'infogain_loss_param {{ source: "{workdir / "h.binaryproto"}" }}')
    cases.append((INFOGAIN_SOURCE, f'name: "{INFOGAIN_SOURCE}"\n' + text,
                  _arrays({"data": ((4, 3), "prob"), "label": ((4,), 3)}, rng), "TRAIN"))
    return workdir, run_in_caffe(workdir, cases)


INFOGAIN_SOURCE = "infogain_source"


@pytest.mark.parametrize("case", sorted(CASES) + [INFOGAIN_SOURCE])
def test_matches_caffe(caffe_results, case):
    workdir, results = caffe_results
    assert_matches_caffe(workdir, results, case)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_like_caffe(caffe_results, case):
    workdir, results = caffe_results
    assert results[case]["status"] == "refused"
    with pytest.raises(GraphError):  # when the net is built or when its backward runs, as in Caffe
        weights = workdir / f"{case}.caffemodel"
        net = Net(str(workdir / f"{case}.prototxt"), str(weights) if weights.exists() else None, TRAIN)
        with np.load(workdir / f"{case}.inputs.npz") as z:
            net.forward(**{k: z[k] for k in z.files})
        net.backward()


def test_loss_cases_carry_a_loss(caffe_results):
    """The loss cases are not vacuous: Caffe's weighted loss is non-zero where a loss layer runs."""
    workdir, _ = caffe_results
    for case in CASES:
        if not case.startswith("accuracy"):
            assert float(caffe_grads(workdir, case)["loss"]) != 0.0, case
