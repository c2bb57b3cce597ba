"""Learned rounding inside label-free QAT (api/label_free_rounding.py) on LeNet and MNIST digits.

Level by level, each layer aiming at the FP32 network's output, the rounded network must come
closer to the FP32 outputs than the one-pass rounding aimed at each layer's own float weight, and
closer than PTQ; the new weights must stay on ARQ's grid (ARQ gives them back unchanged).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from amct_caffe.api import label_free as lf
from amct_caffe.api import label_free_rounding as lfr
from amct_caffe.api.calibration import create_quant_config
from amct_caffe.api.label_free_save import with_data_only_quant
from amct_caffe.api.session import load_float_graph
from amct_caffe.api.workflow import run_calibration
from amct_caffe.passes.fusion import fuse_bn_scale
from amct_caffe.passes.retrain import WEIGHT_QUANT
from amct_caffe.quant import arq_quantize_weight
from amct_caffe.runtime import TEST, TRAIN, Net

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "mnist"
MODEL, WEIGHTS = str(SAMPLE / "lenet.prototxt"), str(SAMPLE / "lenet_iter_10000.caffemodel")


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """(float graph, retrain graph at PTQ's factors, inputs, FP32 ip2 outputs) on 256 digits."""
    with np.load(SAMPLE / "mnist_500.npz") as f:
        images = f[f.files[0]] if "images" not in f.files else f["images"]
    x = images[:256].astype(np.float32)[:, None] * np.float32(0.00390625)
    feeds = [{"data": x[i:i + 64]} for i in range(0, 256, 64)]
    work = str(tmp_path_factory.mktemp("rounding"))
    graph = load_float_graph(MODEL, WEIGHTS)
    fuse_bn_scale(graph)
    config = os.path.join(work, "config.json")
    create_quant_config(config, MODEL, WEIGHTS, batch_num=len(feeds))
    session = run_calibration(config, MODEL, WEIGHTS, iter(feeds), work, progress=False)
    retrain, _ = lf._retrain_graph(graph, session.record, os.path.join(work, "record.txt"))
    retrain, _ = with_data_only_quant(retrain, session.targets, session.record)
    fp32 = {k: v.copy() for k, v in Net(MODEL, WEIGHTS, TEST).forward(data=x, blobs=["conv2", "ip2"]).items()}
    return graph, retrain, {"data": x}, fp32


def _error(graph, inputs, fp32, blob="ip2") -> float:
    out = Net.from_graph(graph, TEST).forward(**inputs, blobs=[blob])[blob]
    return float(np.mean((out - fp32[blob]) ** 2))


def test_levels_follow_the_longest_path_of_retrained_layers(setting):
    _, retrain, _, _ = setting
    layers = lfr._targets(retrain)
    lfr._levels(retrain, layers)
    assert {layer.node.name: layer.level for layer in layers} == {"conv1": 0, "conv2": 1, "ip1": 2, "ip2": 3}


def test_level_by_level_rounding_comes_closest_to_fp32(setting):
    graph, retrain, inputs, fp32 = setting
    aimed, own = retrain.copy(), retrain.copy()
    # ip1 (K = 800) and ip2 (K = 500) see 256 samples: too few to choose, they keep nearest rounding
    assert lfr.round_weights(aimed, inputs, 64, graph) == ["conv1", "conv2"]
    lfr.round_weights(own, inputs, 64)
    # the last rounded layer's output (PTQ 1.3e-4, one pass 9.2e-5, level by level 7.1e-5) and the net's
    ptq, one_pass, level_by_level = (_error(g, inputs, fp32, "conv2") for g in (retrain, own, aimed))
    assert level_by_level < 0.9 * one_pass < 0.9 * 0.9 * ptq
    ptq, one_pass, level_by_level = (_error(g, inputs, fp32) for g in (retrain, own, aimed))
    assert level_by_level < one_pass < ptq
    checked = 0
    for node in aimed.nodes:  # the new float weights are grid points: ARQ gives them back
        if node.type == WEIGHT_QUANT and node.name in ("conv1_weight_quant", "conv2_weight_quant"):
            checked += 1
            w = np.asarray(node.params[1], np.float32)
            p = node.layer_param.retrain_weight_quant_param
            np.testing.assert_array_equal(arq_quantize_weight(w, p.layer_type, p.channel_wise, p.num_bits).fake, w)
    assert checked == 2
    assert not np.array_equal(aimed.node("conv2").params[1], retrain.node("conv2").params[1])  # bias corrected


def test_statistics_passes_take_any_batch(setting):
    """The passes run the data in batches of the model's size; a last, shorter batch counts too."""
    graph, retrain, inputs, fp32 = setting
    a, b = retrain.copy(), retrain.copy()
    lfr.round_weights(a, inputs, 64, graph)
    short = {"data": inputs["data"][:250]}
    lfr.round_weights(b, short, 64, graph)
    assert _error(b, inputs, fp32) < 1.2 * _error(a, inputs, fp32)


# ------------------------------------------------------------------ each sample weighted alike
def test_per_sample_loss_divides_each_samples_error_by_its_own_energy(setting):
    graph, retrain, inputs, _ = setting
    x = inputs["data"]
    targets = {"prob": np.array(Net(MODEL, WEIGHTS, TEST).forward(data=x)["prob"], np.float32)}
    t = targets["prob"].reshape(len(x), -1).astype(np.float64)
    energy = np.sum(t * t, axis=1)
    idx = np.arange(64, 128)
    for per_sample in (False, True):
        train, feeds = lf._training_graph(retrain, inputs, targets, 64, 64, per_sample)
        net = Net.from_graph(train, TRAIN)
        lf._feed(net, feeds, idx)
        net.forward()
        err = np.sum((np.asarray(net.blobs["prob"].data, np.float64).reshape(64, -1) - t[idx]) ** 2, axis=1)
        want = np.mean(err / energy[idx]) if per_sample else np.mean(err) / np.mean(energy)
        assert float(net.loss) == pytest.approx(want, rel=1e-4)


def test_per_sample_loss_bounds_the_weight_of_a_sample_with_a_zero_target(setting):
    """A sample whose FP32 output is zero (a blank image's heat map) counts as if its energy were
    SAMPLE_ENERGY_FLOOR of the mean: the loss stays finite and the other samples still count."""
    graph, retrain, inputs, _ = setting
    x = inputs["data"]
    targets = {"prob": np.array(Net(MODEL, WEIGHTS, TEST).forward(data=x)["prob"], np.float32)}
    targets["prob"][70] = 0.0
    t = targets["prob"].reshape(len(x), -1).astype(np.float64)
    energy = np.sum(t * t, axis=1)
    idx = np.arange(64, 128)
    train, feeds = lf._training_graph(retrain, inputs, targets, 64, 64, True)
    net = Net.from_graph(train, TRAIN)
    lf._feed(net, feeds, idx)
    net.forward()
    err = np.sum((np.asarray(net.blobs["prob"].data, np.float64).reshape(64, -1) - t[idx]) ** 2, axis=1)
    floor = lf.SAMPLE_ENERGY_FLOOR * np.mean(energy)
    want = np.mean(err / np.maximum(energy[idx], floor))
    assert np.isfinite(float(net.loss)) and float(net.loss) == pytest.approx(want, rel=1e-3)
    assert err[70 - 64] > 0  # the quantized output is not zero there: without the floor the loss is ~1e30
