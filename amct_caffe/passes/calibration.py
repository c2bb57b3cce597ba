"""The calibration model (activation_quantize_model): IFMR layers, and BNUpdate layers for update_bn.

:func:`calibration_graph` builds it from the working graph of the weight pass and the config.

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

import numpy as np

from amct_caffe.errors import ConfigError
from amct_caffe.ir import Graph, Node
from amct_caffe.passes.prepare import Prepared
from amct_caffe.passes.recurrent import calibration_form, is_recurrent
from amct_caffe.io.schema import caffe_pb

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


def activation_specs(prepared: Prepared, config) -> list[ActivationSpec]:
    """One :class:`ActivationSpec` per quantized input of every target, from the config."""
    specs = []
    for target in prepared.targets:
        layer = config.layers.get(target.name)
        act = layer.activation_quant_params if layer is not None else None
        if act is None:
            raise ConfigError(f"layer '{target.name}' has no activation_quant_params")
        with_offset = config.with_offset(target.name) if layer is not None else config.activation_offset
        specs.extend(ActivationSpec(target.name, i, act.num_bits, with_offset, act.max_percentile,
                                    act.min_percentile, tuple(act.search_range), act.search_step)
                     for i in target.inputs)
    return specs


def insert_bn_update_layers(graph: Graph, prepared: Prepared, settings, dump_dir: str) -> list[Node]:
    """A BNUpdate layer on the input of each kept BatchNorm (update_bn), starting from its blobs.

    ``settings``: the config's BnUpdateConfig; ``dump_dir``: where the layers write their statistics.
    """
    added = []
    for chain in prepared.bn_kept.values():
        bn = graph.node(chain[0])
        bp = bn.layer_param.batch_norm_param
        # The guide: the BatchNorm's own moving_average_fraction if it sets one, else the config's.
        fraction = bp.moving_average_fraction if bp.HasField("moving_average_fraction") \
            else settings.bn_moving_average_fraction
        lp = caffe_pb().LayerParameter()
        name = graph.unique_node_name(f"{bn.name}_bn_update")
        lp.name, lp.type = name, "BNUpdate"
        lp.bottom.append(bn.bottoms[0])
        p = lp.bn_update_param
        p.bn_layer, p.iterations = bn.name, settings.bn_update_iterations
        p.moving_average_fraction, p.dump_dir = fraction, dump_dir
        params = [np.array(a, dtype=np.float32, copy=True) for a in bn.params[:3]]
        node = Node(name, "BNUpdate", [bn.bottoms[0]], [], params, lp, origin=[])
        graph.insert(graph.index(bn), node)
        added.append(node)
        _LOG.debug("inserted BNUpdate '%s' for BatchNorm '%s'", name, bn.name)
    graph.check()
    return added


def calibration_graph(graph: Graph, prepared: Prepared, config, record_file: str, bn_settings,
                      bn_dump_dir: str) -> Graph:
    """A copy of ``graph`` with the IFMR layers writing ``record_file`` and, for update_bn, the
    BNUpdate layers writing to ``bn_dump_dir``."""
    calib = graph.copy()
    specs = activation_specs(prepared, config)
    insert_calibration_layers(calib, specs, record_file, config.batch_num)
    for spec in specs:  # a recurrent layer observes its hidden state itself, with x's settings
        node = calib.node(spec.layer)
        if spec.index == 0 and is_recurrent(node.type):
            lp = _ifmr_param(spec, config.batch_num, record_file, [])
            lp.ifmr_param.object_layer.append(node.name)
            calibration_form(node, lp)
    insert_bn_update_layers(calib, prepared, bn_settings, bn_dump_dir)
    return calib
