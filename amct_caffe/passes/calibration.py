"""Insert the IFMR calibration layers (activation_quantize_model).

Each distinct blob read by a quantized input gets an ``IFMR`` layer (no top: it only observes)
placed right before its first quantized reader. Readers of the same blob with the same
activation settings share it, and so share one scale_d/offset_d (the data they see is the
same); readers with other settings (bits, offset, search) get their own. The layer writes a
``record_d`` (with the reader's input ``index``) for every layer it serves into the record file
after ``batch_num`` forwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from amct_caffe.io.schema import caffe_pb
from amct_caffe.ir import Graph, Node

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActivationSpec:
    """One quantized input: ``layer``'s bottom number ``index`` and its IFMR settings."""

    layer: str
    index: int
    num_bits: int
    with_offset: bool
    max_percentile: float
    min_percentile: float
    search_range: tuple[float, float]
    search_step: float


def _ifmr_param(spec: ActivationSpec, batch_num: int, record_file: str, served):
    lp = caffe_pb().LayerParameter()
    p = lp.ifmr_param
    p.batch_num = batch_num
    p.with_offset = spec.with_offset
    p.search_range_start, p.search_range_end = spec.search_range
    p.search_step = spec.search_step
    p.max_percentile = spec.max_percentile
    p.min_percentile = spec.min_percentile
    p.num_bits = spec.num_bits
    p.record_file_path = record_file
    for s in served:
        p.object_layer.append(s.layer)
        p.index.append(s.index)
    return lp


def insert_calibration_layers(graph: Graph, specs: list[ActivationSpec], record_file: str,
                              batch_num: int) -> list[Node]:
    """Add IFMR layers for ``specs`` to ``graph`` (in place); returns them."""
    groups: dict[tuple, list[ActivationSpec]] = {}
    for spec in specs:
        blob = graph.node(spec.layer).bottoms[spec.index]
        settings = (spec.num_bits, spec.with_offset, spec.max_percentile, spec.min_percentile,
                    tuple(spec.search_range), spec.search_step)
        groups.setdefault((blob, settings), []).append(spec)
    added = []
    for (blob, _), served in groups.items():
        first = served[0]
        readers = [graph.node(s.layer) for s in served]
        position = min(graph.index(n) for n in readers)
        name = graph.unique_node_name(f"{first.layer}_ifmr" if first.index == 0 else
                                      f"{first.layer}_ifmr{first.index}")
        lp = _ifmr_param(first, batch_num, record_file, served)
        lp.name, lp.type = name, "IFMR"
        lp.bottom.append(blob)
        node = Node(name, "IFMR", [blob], [], [], lp, origin=[])
        graph.insert(position, node)
        added.append(node)
        _LOG.debug("inserted IFMR '%s' on blob '%s' for %s", name, blob, [s.layer for s in served])
    graph.check()
    return added
