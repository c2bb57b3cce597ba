"""Weight quantization as a pass, and update_bn's refresh of the kept BatchNorm chains.

:func:`quantize_weights` quantizes the weights of every weighted target of a :class:`Prepared`
(ARQ, or SNQ then ARQ) and returns a :class:`QuantizedWeights`: the working graph whose weights
are fake-quantized (what the calibration model runs), the float graph to save from (with SNQ's
cluster centres in place of the original weights), and the typed factors per layer. Nothing is
written; :func:`weights_record` turns the result into the record entries the guide's
weights_quantize_model writes.

SNQ: the 16 cluster centres per channel become the layer's weights; ARQ then stores them on the
uniform int8 grid (at most 16 distinct codes per channel).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from amct_caffe import ops
from amct_caffe.config import BnUpdateConfig, SnqParams
from amct_caffe.errors import AmctError
from amct_caffe.io.record import Record
from amct_caffe.ir import Graph, Node
from amct_caffe.passes.fusion import apply_fusion, check_fusions, find_fusions
from amct_caffe.passes.prepare import Prepared
from amct_caffe.passes.quantized_models import QuantTarget
from amct_caffe.passes.recurrent import is_recurrent, quantize_recurrent_weights
from amct_caffe.quant import QuantizationError
from amct_caffe.quant.arq import arq_quantize_weight
from amct_caffe.quant.snq import snq_quantize_weight

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightFactors:
    """ARQ's factors of one layer: scale_w and offset_w per output channel (or one of each)."""

    scale_w: np.ndarray   # float32 (C,) or (1,); recurrent layers: one per input weight (W_x [, W_x_static])
    offset_w: np.ndarray  # int (C,) or (1,), 0 (symmetric)
    num_bits: int = 8
    scale_r: np.ndarray | None = None   # recurrent layers: one per recurrent weight (W_h; RNN W_hh, W_ho)


@dataclass
class QuantizedWeights:
    graph: Graph        # fused graph with fake-quantized weights (the calibration model's)
    float_graph: Graph  # fused graph with float weights (SNQ centres), saved models are built from it
    factors: dict[str, WeightFactors]


def arq_settings(node: Node, target: QuantTarget, config) -> tuple[str, bool, int]:
    """(layer_type, channel_wise, group) of the ARQ quantization of ``node``'s weights."""
    layer = config.layers.get(target.name)
    params = layer.weight_quant_params if layer is not None else None
    layer_type = target.layer_type if node.type == "Convolution" else node.type
    channel_wise = bool(getattr(params, "channel_wise", not ops.layer_type(node.type).per_tensor_only))
    return layer_type, channel_wise, ops.weight_layout(node.type, node.layer_param).group


def _arq(node: Node, target: QuantTarget, config, weight: np.ndarray):
    layer_type, channel_wise, group = arq_settings(node, target, config)
    return arq_quantize_weight(weight, layer_type, channel_wise, 8, group)


def quantize_weights(prepared: Prepared, config) -> QuantizedWeights:
    """ARQ (or SNQ + ARQ) on every weighted target (module doc); ``prepared`` is not modified."""
    graph, float_graph = prepared.graph.copy(), prepared.graph.copy()
    factors: dict[str, WeightFactors] = {}
    for target in prepared.targets:
        if not target.weighted:
            continue
        node = graph.node(target.name)
        try:
            factors[target.name] = _quantize_node(node, target, config, float_graph)
        except QuantizationError as e:  # the algorithms do not know which layer they quantize
            raise type(e)(f"layer '{node.name}' ({node.type}), its weights: {e}") from None
    return QuantizedWeights(graph, float_graph, factors)


def _quantize_node(node: Node, target: QuantTarget, config, float_graph: Graph) -> WeightFactors:
    """Quantize ``node``'s weights in place (SNQ's centres also into ``float_graph``); its factors."""
    if is_recurrent(node.type):
        node.params, scale_w, scale_r = quantize_recurrent_weights(node)
        return WeightFactors(scale_w, np.zeros(scale_w.size, int), scale_r=scale_r)
    layer = config.layers.get(target.name)
    params = layer.weight_quant_params if layer is not None else None
    weight = node.params[0]
    if isinstance(params, SnqParams):
        layer_type, channel_wise, group = arq_settings(node, target, config)
        snq = snq_quantize_weight(weight, channel_wise, params.num_bits, params.max_iteration,
                                  params.min_distance, params.init_algo, layer_type=layer_type, group=group)
        weight = snq.fake
        float_graph.node(target.name).params[0] = weight
    arq = _arq(node, target, config, weight)
    node.params = [arq.fake, *node.params[1:]]
    _LOG.debug("weights of '%s' quantized (%s, %d scale(s))", target.name,
               "snq" if isinstance(params, SnqParams) else "arq", arq.scale.size)
    return WeightFactors(arq.scale, arq.offset)


def record_weight_factors(record: Record, factors: dict[str, WeightFactors]) -> None:
    """Set scale_w / offset_w / num_bits_w of each layer of ``factors`` in ``record``."""
    for name, f in factors.items():
        entry = record.layer(name, create=True)
        entry.scale_w = np.asarray(f.scale_w, np.float32).tolist()
        entry.offset_w = np.asarray(f.offset_w).astype(int).tolist()
        entry.num_bits_w = f.num_bits
        if f.scale_r is not None:
            entry.scale_r = np.asarray(f.scale_r, np.float32).tolist()
            entry.offset_r = [0] * len(entry.scale_r)


def weights_record(prepared: Prepared, weights: QuantizedWeights) -> Record:
    """The record after weight quantization: ``skip_fusion`` of the unfused layers, then scale_w."""
    record = Record()
    for name in sorted(prepared.unfused):
        record.layer(name, create=True).skip_fusion = True
    record_weight_factors(record, weights.factors)
    return record


def bn_update_settings(config) -> BnUpdateConfig:
    return config.bn_update_config or BnUpdateConfig()


def refresh_bn_chains(prepared: Prepared, float_graph: Graph, config,
                      statistics: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[Graph, dict[str, WeightFactors]]:
    """update_bn: ``float_graph`` with each kept BatchNorm's refreshed statistics (``statistics``:
    BatchNorm name -> (mean, var), each (C,)) fused into its layer, whose weights are quantized again.

    Returns the new graph and the new factors of the kept layers; nothing is modified.
    """
    g = float_graph.copy()
    for chain in prepared.bn_kept.values():
        bn = g.node(chain[0])
        mean, var = statistics[bn.name]
        bn.params = [mean.reshape(bn.params[0].shape), var.reshape(bn.params[1].shape),
                     np.ones_like(bn.params[2], dtype=np.float32), *bn.params[3:]]
    fusions = [f for f in find_fusions(g) if f.target.name in prepared.bn_kept]
    for f in fusions:
        if [n.name for n in f.folded] != prepared.bn_kept[f.target.name]:
            raise AmctError(f"update_bn: layer '{f.target.name}' would now fuse {[n.name for n in f.folded]}, "
                            f"not {prepared.bn_kept[f.target.name]}")
    if {f.target.name for f in fusions} != set(prepared.bn_kept):
        raise AmctError(f"update_bn: cannot fuse the BatchNorm chains of {sorted(prepared.bn_kept)} any more")
    check_fusions(g, fusions)
    for f in fusions:
        apply_fusion(g, f)
    g.prune_blobs()
    g.check()
    factors = {}
    for target in prepared.targets:
        if target.name in prepared.bn_kept:
            node = g.node(target.name)
            arq = _arq(node, target, config, node.params[0])
            factors[target.name] = WeightFactors(arq.scale, arq.offset)
    return g, factors
