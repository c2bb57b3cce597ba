"""Label-free QAT's FP32 targets, cached per sample (step 2 of :mod:`amct_caffe.api.label_free`)."""

from __future__ import annotations

import numpy as np

from amct_caffe.api.compare import batch_samples
from amct_caffe.api.compared_outputs import graph_layers, stand_in_outputs
from amct_caffe.errors import AmctError
from amct_caffe.ir import Graph
from amct_caffe.runtime import TEST, Net

Feed = dict[str, np.ndarray]


def fp32_samples(graph: Graph, feeds: list[Feed], bar) -> tuple[dict, dict]:
    """(inputs, FP32 targets) each as {blob: (samples, ...) array}; the targets are the float
    graph's outputs or the blobs that stand for them (label_free module doc, step 2)."""
    names, _ = stand_in_outputs(graph_layers(graph), graph.outputs, trainable=True)
    if not names:
        raise AmctError(f"the model's outputs {graph.outputs} do not depend on its inputs through layers that can "
                        "be trained: label-free retraining has nothing to distil")
    # only the targets are read after a forward: the in-place chains fold, with the bytes of the separate layers
    net = Net.from_graph(graph, TEST, observed=names)
    inputs: dict[str, list] = {}
    outputs: dict[str, list] = {}
    for feed in feeds:
        n = batch_samples(feed)
        net.forward(**feed)
        for name, value in feed.items():
            value = np.asarray(value, np.float32)
            if value.ndim == 0 or value.shape[0] != n:
                raise AmctError(f"input '{name}' has shape {list(value.shape)} in a batch of {n} sample(s): label-free "
                                "retraining draws samples across batches, so every input must hold one row per "
                                "sample (an image-info input cannot be split); quantize this model with calibrate")
            inputs.setdefault(name, []).append(value)
        for name in names:
            value = np.asarray(net.blobs[name].data, np.float32)
            if value.ndim == 0 or value.shape[0] != n:
                raise AmctError(f"output '{name}' has shape {list(value.shape)} for a batch of {n}: label-free "
                                "retraining needs every output blob to hold one row per sample (batch axis first)")
            outputs.setdefault(name, []).append(value.copy())
        bar.update(1)
    return {k: np.concatenate(v) for k, v in inputs.items()}, {k: np.concatenate(v) for k, v in outputs.items()}
