"""BN+Scale+Bias acceleration (the guide's 工具实现的加速优化).

After BN fusion, a BatchNorm / Scale / Bias layer whose quantization the config enables gets a
DepthwiseConv inserted in front of it, and the BatchNorm, Scale and Bias that follow (in that
order) are folded into it, exactly as BN fusion folds them into a convolution. The result is a
quantizable layer doing the same per-channel affine map::

    x -> BatchNorm [-> Scale] [-> Bias] -> y      becomes      x -> DepthwiseConv -> y

The DepthwiseConv is a plain Caffe ``Convolution`` with ``num_output = group = C``,
``kernel_size: 1`` and ``bias_term: true``, weights (C, 1, 1, 1) starting at 1 and bias at 0,
so it runs in Caffe and in the executor, and the config recognises it as a DepthwiseConv.

Which chains: one starts at a BatchNorm, Scale or Bias whose name is in ``quant_enabled`` (its
input is the one that gets quantized) and extends over the Scale / Bias that follow it, whether
or not their own quantization is on (their inputs become internal to the new layer). The folding
rules are BN fusion's (:mod:`amct_caffe.passes.fusion`): channel axis only (Scale / Bias axis 1
or -3, num_axes 1, a learned parameter), BatchNorm with stored statistics, intermediate blobs read
only by the next layer. The input must be 4-D (N, C, H, W), since the inserted layer is a 2-D
convolution; an enabled layer that cannot be accelerated is reported with a warning.

Naming: the new layer takes the name of the chain's first layer (the one the config enabled), so
config entries and record keys for that name apply to it; its ``origin`` lists the folded layers
and it writes the chain's last blob, so blob names keep their values (as in BN fusion).
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import numpy as np

from amct_caffe import ops
from amct_caffe.ir import Graph, Node
from amct_caffe.ops import FOLDED_ORDER
from amct_caffe.passes.fusion import (Fusion, blob_readers, check_fusions, fold_chain,
                                      folded_problem, follow_chain)

_LOG = logging.getLogger(__name__)

def blob_rank(graph: Graph, blob: str) -> int | None:
    """Number of axes of ``blob``: its inferred shape if known, else traced back through layers that
    keep the rank to an Input, a (de)convolution or an InnerProduct. None if it cannot be told."""
    producers = {t: n for n in graph.nodes for t in n.tops}
    for _ in range(len(graph.nodes) + 1):
        known = graph.blobs.get(blob)
        if known is not None and known.shape is not None:
            return len(known.shape)
        node = producers.get(blob)
        if node is None or node.layer_param is None:
            return None
        if node.type == "Input":
            shapes = node.layer_param.input_param.shape
            if not shapes:
                return None
            return len(shapes[min(node.tops.index(blob), len(shapes) - 1)].dim)
        if node.type in ("Convolution", "Deconvolution"):
            return int(node.params[0].ndim) if node.params else None
        if node.type == "InnerProduct":
            axis = int(node.layer_param.inner_product_param.axis)
            return axis + 1 if axis >= 0 else None
        if not ops.layer_type(node.type).rank_preserving or not node.bottoms:
            return None
        blob = node.bottoms[0]
    return None


def _depthwise(name: str, bottom: str, channels: int, like: Node) -> Node:
    """A 1x1 Convolution with group = channels, weight 1 and bias 0 (the identity)."""
    lp = type(like.layer_param)()
    lp.name, lp.type = name, "Convolution"
    cp = lp.convolution_param
    cp.num_output, cp.group, cp.bias_term = channels, channels, True
    cp.kernel_size.append(1)
    node = Node(name, "Convolution", [bottom], [f"{name}:depthwise"],
                [np.ones((channels, 1, 1, 1), np.float32), np.zeros(channels, np.float32)], lp)
    node.origin = []  # it stands for the layers folded into it, not for a layer of the model
    return node


def _plan(graph: Graph, start: Node, readers) -> tuple[list[Node] | None, str]:
    if start.layer_param is None or not start.params or len(start.bottoms) != 1:
        return None, "it has no learned parameters or several bottoms"
    rank = blob_rank(graph, start.bottoms[0])
    if rank != 4:
        return None, f"its input is not known to be 4-D (N, C, H, W) (rank {rank})"
    channels = int(start.params[0].size)
    problem = folded_problem(start, channels, rank)
    if problem:
        return None, problem
    more, _ = follow_chain(start.tops[0], FOLDED_ORDER[FOLDED_ORDER.index(start.type) + 1:], channels, rank,
                           readers)
    return [start, *more], ""


def accelerate_bn_scale_bias(graph: Graph, quant_enabled: Collection[str]) -> bool:
    """Insert and fold a DepthwiseConv before each BatchNorm / Scale / Bias chain that starts at a
    layer named in ``quant_enabled`` (module doc). Returns whether anything changed."""
    enabled = frozenset(quant_enabled)
    readers = blob_readers(graph)
    taken: set[int] = set()
    plans: list[Fusion] = []
    for node in graph.nodes:
        if node.type not in FOLDED_ORDER or node.name not in enabled or id(node) in taken:
            continue
        chain, why = _plan(graph, node, readers)
        if chain is None:
            _LOG.warning("BN+Scale+Bias acceleration: layer '%s' (%s) has quantization enabled but cannot be "
                         "folded into a DepthwiseConv: %s; it stays unquantized", node.name, node.type, why)
            continue
        taken.update(id(n) for n in chain)
        plans.append(Fusion(_depthwise(node.name, node.bottoms[0], int(node.params[0].size), node), chain))
    # The new layers are not in the graph yet; check the chains as they stand.
    check_fusions(graph, [Fusion(f.folded[0], f.folded[1:]) for f in plans])
    for f in plans:
        index = graph.index(f.folded[0])
        fold_chain(f.target, f.folded)
        for node in f.folded:
            graph.remove(node)
        graph.insert(index, f.target)
        _LOG.debug("BN+Scale+Bias acceleration: %s folded into DepthwiseConv '%s'",
                   " + ".join(n.name for n in f.folded), f.target.name)
    if plans:
        graph.prune_blobs()
        graph.check()
    _LOG.info("BN+Scale+Bias acceleration: %d DepthwiseConv layer(s) inserted", len(plans))
    return bool(plans)
