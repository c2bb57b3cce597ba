"""A detection model's list output is compared, and distilled, through the blobs it is computed from.

A tiny SSD head (random weights): box offsets and class scores from one feature map, its PriorBox,
and a DetectionOutput whose list length changes from image to image. The compare report, the
accuracy-based fallback and label-free QAT must all work on it, using ``loc`` and ``conf`` in place
of ``detection_out`` (the priors are the same in both models and are left out).
"""

from __future__ import annotations

import numpy as np
import pytest

import amct_caffe as amct
from amct_caffe.api.compare import compare_batches
from amct_caffe.api.compared_outputs import (dynamic_shape_blobs, graph_layers, net_layers,
                                             stand_in_outputs)
from amct_caffe.api.fallback import calibrate_with_fallback
from amct_caffe.api.outputs import write_graph
from amct_caffe.api.workflow import calibrate
from amct_caffe.errors import AmctError
from amct_caffe.runtime import TEST, Net
from tests.passes.helpers import model, net_of

SSD = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "loc_conv" type: "Convolution" bottom: "conv1" top: "loc_conv"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "loc_perm" type: "Permute" bottom: "loc_conv" top: "loc_perm"
        permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "loc" type: "Flatten" bottom: "loc_perm" top: "loc" }
layer { name: "conf_conv" type: "Convolution" bottom: "conv1" top: "conf_conv"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "conf_perm" type: "Permute" bottom: "conf_conv" top: "conf_perm"
        permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "conf_resh" type: "Reshape" bottom: "conf_perm" top: "conf_resh"
        reshape_param { shape { dim: 0 dim: -1 dim: 2 } } }
layer { name: "conf_soft" type: "Softmax" bottom: "conf_resh" top: "conf_soft" softmax_param { axis: 2 } }
layer { name: "conf" type: "Flatten" bottom: "conf_soft" top: "conf" }
layer { name: "priors" type: "PriorBox" bottom: "conv1" bottom: "data" top: "priors"
        prior_box_param { min_size: 4 max_size: 8 variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 } }
layer { name: "detection_out" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "priors"
        top: "detection_out"
        detection_output_param { num_classes: 2 share_location: true background_label_id: 0
          nms_param { nms_threshold: 0.45 top_k: 200 } code_type: CENTER_SIZE keep_top_k: 200
          confidence_threshold: 0.9 } }
"""


@pytest.fixture(scope="module")
def ssd(tmp_path_factory):
    """(model, weights, 8 batches of one image whose detection lists differ in length)."""
    graph, _ = model(SSD, seed=3)
    work = tmp_path_factory.mktemp("ssd")
    files = str(work / "ssd.prototxt"), str(work / "ssd.caffemodel")
    write_graph(graph, *files)
    rng = np.random.default_rng(0)
    batches = [{"data": rng.uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)} for _ in range(8)]
    net = Net(*files, TEST)
    counts = {net.forward(**b)["detection_out"].shape[2] for b in batches}
    assert len(counts) > 1, counts  # the case this file is about: lists of different lengths
    return files, batches


def test_detection_list_stands_in_through_its_inputs(ssd):
    (proto, weights), _ = ssd
    graph, _ = model(SSD)
    layers = graph_layers(graph)
    assert stand_in_outputs(layers, graph.outputs) == (["loc", "conf"], {"detection_out": ["loc", "conf"]})
    assert dynamic_shape_blobs(layers) == {"detection_out": False}  # not through a Python layer
    # a Net of the file (ReLU in place) says the same
    net = Net(proto, weights, TEST)
    assert stand_in_outputs(net_layers(net), net.outputs)[0] == ["loc", "conf"]


def test_what_is_computed_from_a_detection_list_is_replaced_too():
    text = SSD + 'layer { name: "flat" type: "Flatten" bottom: "detection_out" top: "flat" }\n'
    graph, _ = model(text)
    layers = graph_layers(graph)
    assert dynamic_shape_blobs(layers) == {"detection_out": False, "flat": False}
    assert stand_in_outputs(layers, graph.outputs)[0] == ["loc", "conf"]


def test_fixed_shape_outputs_stay_and_training_looks_through_layers_without_gradient():
    text = (SSD.split('layer { name: "priors"')[0]
            + 'layer { name: "best" type: "ArgMax" bottom: "conf" top: "best" }\n')
    graph, _ = model(text)
    assert stand_in_outputs(graph_layers(graph), graph.outputs)[0] == ["best", "loc"]
    assert stand_in_outputs(graph_layers(graph), graph.outputs, trainable=True)[0] == ["conf", "loc"]


def test_outputs_that_do_not_depend_on_the_data_are_left_out():
    text = SSD.split('layer { name: "detection_out"')[0]
    graph, _ = model(text)
    assert graph.outputs == ["conf", "loc", "priors"]
    assert stand_in_outputs(graph_layers(graph), graph.outputs)[0] == ["conf", "loc"]
    net = Net(net_of(text), TEST)
    assert stand_in_outputs(net_layers(net), net.outputs)[0] == ["conf", "loc"]


def test_compare_report_on_a_detection_model(ssd, tmp_path):
    (proto, weights), batches = ssd
    ptq = calibrate(proto, weights, batches, str(tmp_path / "ptq" / "ssd"), len(batches), progress=False)
    reports, summary, _ = compare_batches(proto, weights, ptq["fake_quant_model"], ptq["fake_quant_weights"],
                                          batches)
    assert summary["compared_instead"] == {"detection_out": ["loc", "conf"]}
    assert sorted(summary["outputs"]) == ["conf", "loc"]
    assert "detection_out" not in {r.name for r in reports}
    assert summary["outputs"]["loc"]["top1_agreement"] is None  # box offsets are no classifier
    assert 0.9 < summary["worst_output_cosine"] < 1.0


def test_fallback_on_a_detection_model(ssd, tmp_path):
    (proto, weights), batches = ssd
    result = calibrate_with_fallback(proto, weights, batches, str(tmp_path / "fb" / "ssd"), len(batches),
                                     target_cosine=0.99999, max_float_layers=3, progress=False)
    assert result.cosine_final > result.cosine_int8
    assert result.float_layers


def test_label_free_retrain_on_a_detection_model(ssd, tmp_path):
    (proto, weights), batches = ssd
    result = amct.label_free_retrain(proto, weights, batches, str(tmp_path / "qat" / "ssd"), iterations=10,
                                     progress=False)
    net = Net(result.outputs["fake_quant_model"], result.outputs["fake_quant_weights"], TEST)
    assert net.forward(**batches[0])["detection_out"].shape[-1] == 7
    assert np.isfinite(result.losses).all()
    assert result.targets == ["loc", "conf"]


def test_label_free_retrain_needs_an_output_that_depends_on_the_data(tmp_path):
    text = SSD.split('layer { name: "loc_conv"')[0] + \
        'layer { name: "priors" type: "PriorBox" bottom: "conv1" bottom: "data" top: "priors" ' \
        'prior_box_param { min_size: 4 } }\n'
    graph, _ = model(text)
    files = str(tmp_path / "p.prototxt"), str(tmp_path / "p.caffemodel")
    write_graph(graph, *files)
    batches = [{"data": np.zeros((1, 3, 16, 16), np.float32)}]
    with pytest.raises(AmctError, match="nothing to distil"):
        amct.label_free_retrain(*files, batches, str(tmp_path / "out" / "p"), iterations=1, progress=False)


def test_compare_report_says_an_output_of_priors_is_not_compared(ssd, tmp_path):
    from amct_caffe.cli.compare import headline

    (_, _), batches = ssd
    graph, _ = model(SSD.split('layer { name: "detection_out"')[0], seed=3)
    files = str(tmp_path / "p.prototxt"), str(tmp_path / "p.caffemodel")
    write_graph(graph, *files)
    ptq = calibrate(*files, batches, str(tmp_path / "ptq" / "p"), len(batches), progress=False)
    _, summary, _ = compare_batches(*files, ptq["fake_quant_model"], ptq["fake_quant_weights"], batches)
    assert summary["compared_instead"] == {"priors": []}
    assert sorted(summary["outputs"]) == ["conf", "loc"]
    assert "output priors does not depend on the input's values (priors): not compared" in headline(summary)
