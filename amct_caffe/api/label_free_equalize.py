"""Label-free QAT, step 0: cross-layer range equalization before depthwise convolutions.

A depthwise convolution's input is quantized per tensor but used per channel: a channel whose range
is a small part of the tensor's keeps few INT8 levels. Where a Convolution feeds only a ReLU that
feeds only a depthwise Convolution, :func:`equalize` rescales the ReLU's channels to about the same
range without changing the float function (the math is in its docstring).
"""

from __future__ import annotations

import logging

import numpy as np

from amct_caffe.ir import Graph, Node
from amct_caffe.runtime import TEST, Net

_LOG = logging.getLogger(__name__)

EQUALIZE_FLOOR = 1e-2  # a channel is scaled up at most 1 / EQUALIZE_FLOOR times


def _equalize_pairs(graph: Graph) -> list[tuple[Node, str, Node]]:
    """(conv, its ReLU's output blob, depthwise conv) wherever a Convolution feeds only a ReLU that
    feeds only a depthwise Convolution (``group`` = its input and output channels)."""
    pairs = []
    for node in graph.nodes:
        if node.type != "Convolution" or len(node.params) < 1 or len(node.tops) != 1:
            continue
        relu = graph.consumers(node.tops[0])
        if len(relu) != 1 or relu[0].type != "ReLU" or relu[0].layer_param.relu_param.negative_slope != 0:
            continue
        nxt = graph.consumers(relu[0].tops[0])
        if len(nxt) != 1 or nxt[0].type != "Convolution" or len(nxt[0].params) < 1:
            continue
        channels = node.params[0].shape[0]
        cp = nxt[0].layer_param.convolution_param
        if cp.group == channels == nxt[0].params[0].shape[0] and nxt[0].params[0].shape[1] == 1:
            pairs.append((node, relu[0].tops[0], nxt[0]))
    return pairs


def equalize(graph: Graph, feeds: list[dict[str, np.ndarray]]) -> int:
    """Cross-layer range equalization before a depthwise convolution; returns the pairs scaled.

    A depthwise convolution's input is quantized per tensor but used per channel: a channel whose
    range is a small part of the tensor's keeps few INT8 levels (UltraFace's second layer: ranges
    0.06 to 4.7, boxes cosine 0.993 from that quantizer alone, 0.9998 with per-channel ranges).
    ReLU commutes with a positive scale, so channel c of the first convolution's weights and bias
    is divided by ``s_c = max(a_c / max_c a_c, EQUALIZE_FLOOR)`` (``a_c``: the channel's largest
    value over the data) and channel c of the depthwise weights multiplied by it: the float
    function is unchanged, every channel spans about the tensor's range, and both layers' weights,
    quantized per output channel, keep their INT8 grids.
    """
    pairs = _equalize_pairs(graph)
    if not pairs:
        return 0
    net = Net.from_graph(graph, TEST)
    peak = {blob: None for _, blob, _ in pairs}
    for feed in feeds:
        net.forward(**feed)
        for blob in peak:
            value = np.asarray(net.blobs[blob].data, np.float32)
            m = np.moveaxis(value, 1, 0).reshape(value.shape[1], -1).max(axis=1)
            peak[blob] = m if peak[blob] is None else np.maximum(peak[blob], m)
    for first, blob, depthwise in pairs:
        a = np.maximum(peak[blob], 0.0)
        if not a.max() > 0:
            continue
        s = np.maximum(a / a.max(), EQUALIZE_FLOOR).astype(np.float32)
        w = first.params[0]
        first.params[0] = (w / s.reshape(-1, *[1] * (w.ndim - 1))).astype(w.dtype)
        if len(first.params) > 1:
            first.params[1] = (first.params[1] / s.reshape(first.params[1].shape)).astype(first.params[1].dtype)
        d = depthwise.params[0]
        depthwise.params[0] = (d * s.reshape(-1, *[1] * (d.ndim - 1))).astype(d.dtype)
    _LOG.info("label-free QAT: equalized the channel ranges before %d depthwise convolution(s)", len(pairs))
    return len(pairs)
