"""Blob shapes of an IR graph, inferred by the executor's own layers.

:func:`infer_shapes` fills ``graph.blobs[name].shape`` the way the Net computes shapes when it is
built: each layer's ``reshape`` on its bottoms' shapes, in graph order, from the Input layers'
``input_param``. It is how the IR learns its shapes at import, so that passes read a blob's rank
instead of guessing it. Shapes stay ``None`` where they cannot be known: after a layer type the
executor does not implement, a layer whose output size depends on the data (DetectionOutput),
or a layer the executor would reject (its error is logged; the Net reports it when it is built).
"""

from __future__ import annotations

import logging

import numpy as np

from amct_caffe.errors import AmctError
from amct_caffe.ir import Graph
from amct_caffe.ops import has_executor
from amct_caffe.runtime.blob import Blob
from amct_caffe.runtime.net import TEST
from amct_caffe.runtime.registry import layer_class

_LOG = logging.getLogger(__name__)


def infer_shapes(graph: Graph, phase: int = TEST) -> int:
    """Fill the shapes of ``graph``'s blobs (module doc); returns how many blobs got one."""
    known = 0
    for node in graph.nodes:
        bottoms = [graph.blobs[b].shape for b in node.bottoms]
        if any(s is None for s in bottoms) or node.layer_param is None or not has_executor(node.type):
            continue
        cls = layer_class(node.type, node.name)
        try:
            cls.check_arity(node.layer_param)
            layer = cls(node.layer_param, phase)
            layer.blobs = [Blob(data=np.asarray(p)) for p in node.params]
            tops = layer.reshape([tuple(s) for s in bottoms])
        except (AmctError, ValueError, IndexError, ZeroDivisionError) as e:
            _LOG.debug("shape inference stops at layer '%s' (%s): %s", node.name, node.type, e)
            continue
        if cls.shape_from_forward:
            continue
        for top, shape in zip(node.tops, tops, strict=False):
            graph.blobs[top].shape = tuple(int(d) for d in shape)
            known += 1
    return known
