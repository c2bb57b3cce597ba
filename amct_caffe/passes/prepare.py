"""The prepare pass: BN fusion, BN+Scale+Bias acceleration and the choice of quantized layers.

Every flow starts here: calibration (from a quantization config), convert_model (from a user's
record) and the accelerated fallback search. ``prepare`` takes the float model's graph, leaves it
untouched and returns a :class:`Prepared`:

* ``graph``: the fused, accelerated graph with float weights, from which the calibration model
  and the saved models are built;
* ``targets``: the layers to quantize, in graph order, as :class:`QuantTarget` (which inputs, and
  whether the weights too);
* ``unfused``: layers BN fusion could have folded into but that were kept apart (``do_fusion``
  false or ``skip_fusion_layers``); the record says so (``skip_fusion: true``), so that
  convert_model rebuilds the same graph from the record alone;
* ``bn_kept`` (update_bn): quantized layer -> its BatchNorm [, Scale] [, Bias] chain, left unfused
  until the models are saved, so the calibration model can refresh the BatchNorm statistics
  behind the quantized weights (:func:`amct_caffe.passes.weights.refresh_bn_chains` folds them).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from amct_caffe import ops
from amct_caffe.config import config_type
from amct_caffe.errors import ConfigError
from amct_caffe.ir import Graph
from amct_caffe.passes.bn_acceleration import accelerate_bn_scale_bias
from amct_caffe.passes.fusion import find_fusions, fuse_bn_scale
from amct_caffe.passes.quantized_models import QuantTarget

_LOG = logging.getLogger(__name__)


class Stage(enum.Enum):
    """How far a quantization has gone (the guide's PTQ steps)."""

    INIT = "init"                  # config and model parsed
    WEIGHTS = "weights"            # weights quantized, scale_w known
    ACTIVATIONS = "activations"    # calibration model built; save once it has run


@dataclass
class Prepared:
    graph: Graph
    targets: list[QuantTarget]
    unfused: frozenset[str] = frozenset()
    bn_kept: dict[str, list[str]] = field(default_factory=dict)


def quant_target(node, graph: Graph, inputs: tuple[int, ...] | None = None) -> QuantTarget:
    """What quantizing ``node`` means: its weights (if any) and which inputs.

    ``inputs`` narrows a data-only layer's quantized inputs (convert_model: those the record
    gives); by default they are the type's activation inputs (all but ROI boxes, shape references...).
    """
    row = ops.layer_type(node.type)
    if row.recurrent and row.quantizable:
        if not node.params:
            raise ConfigError(f"layer '{node.name}' ({node.type}) has no weights to quantize: give the caffemodel "
                              "that holds them, or set its quant_enable to false")
        # x [and x_static] are quantized like any input; the hidden state inside (passes/recurrent.py)
        return QuantTarget(node.name, ops.recurrent_layout(node.type, node.layer_param, len(node.bottoms)).data_inputs,
                           True, node.type)
    if row.weighted and node.params:
        if len(node.bottoms) != 1 or len(node.tops) != 1:
            raise ConfigError(f"layer '{node.name}' ({node.type}) has {len(node.bottoms)} inputs and "
                              f"{len(node.tops)} outputs sharing its weights; only single-input layers can be "
                              "quantized: set its quant_enable to false")
        return QuantTarget(node.name, (0,), True, config_type(node, graph))
    if row.quant is ops.DATA_ONLY or (row.quant is ops.WEIGHTS_AND_DATA and not node.params):
        allowed = row.quant_inputs if row.quant_inputs is not None else tuple(range(len(node.bottoms)))
        allowed = tuple(i for i in allowed if i < len(node.bottoms))
        if inputs is not None:
            bad = [i for i in inputs if i not in allowed]
            if bad:
                raise ConfigError(f"layer '{node.name}' ({node.type}): input(s) {bad} carry no activations to "
                                  f"quantize (quantizable inputs: {list(allowed)})")
            allowed = inputs
        return QuantTarget(node.name, tuple(allowed), False, config_type(node, graph))
    raise ConfigError(f"layer '{node.name}' ({node.type}) cannot be quantized")


def quant_targets(graph: Graph, enabled: Iterable[str]) -> list[QuantTarget]:
    """The enabled layers present in ``graph`` (fusion may have absorbed some), in graph order."""
    wanted = set(enabled)
    targets = [quant_target(node, graph) for node in graph.nodes if node.name in wanted]
    gone = wanted - {t.name for t in targets}
    if gone:
        _LOG.info("layers %s were fused into other layers; their own quantization settings do not apply",
                  sorted(gone))
    return targets


def unshare_quantized_weights(graph: Graph, targets: Iterable[QuantTarget]) -> list[str]:
    """Each layer whose weights are quantized stops sharing them by param name (its ParamSpecs lose their
    ``name``), in ``graph``, in place; returns those layers.

    The saved and calibration models hold per-layer values in those blobs: an int32 bias divided by the
    layer's own ``scale_w * scale_d``, weights quantized with the layer's own settings. Loaded with the names
    kept, Caffe (and the executor) make the blobs one memory and every sharer would run with the last layer's
    values. The layers' own blobs are in the graph (:func:`amct_caffe.runtime.shapes.fill_shared_weights`)."""
    unshared = []
    for target in targets:
        lp = graph.node(target.name).layer_param if target.weighted else None
        if lp is not None and any(spec.name for spec in lp.param):
            for spec in lp.param:
                spec.ClearField("name")
            unshared.append(target.name)
    if unshared:
        _LOG.info("layer(s) %s share weights by param name; quantized, each keeps its own in the models saved",
                  unshared)
    return unshared


def prepare(graph: Graph, config) -> Prepared:
    """Fusion, BN acceleration and targets as ``config`` (a bound QuantConfig) asks (module doc)."""
    graph = graph.copy()
    quantized = config.quantized_layers()
    fusions = find_fusions(graph)
    candidates = {f.target.name for f in fusions}
    unfused = candidates if not config.do_fusion else candidates & set(config.skip_fusion_layers)
    skip = list(config.skip_fusion_layers)
    bn_kept: dict[str, list[str]] = {}
    if config.update_bn and config.do_fusion:
        # Quantized layers keep their BatchNorm chain until the models are saved: the calibration
        # model runs conv(quantized weights) -> BatchNorm -> Scale and refreshes the statistics.
        bn_kept = {f.target.name: [n.name for n in f.folded] for f in fusions
                   if f.target.name in set(quantized) and f.target.name not in unfused
                   and ops.layer_type(f.target.type).weighted}
        skip += sorted(bn_kept)
    if config.update_bn:
        refreshed = {chain[0] for chain in bn_kept.values()}
        left = [node.name for node in graph.nodes if node.type == "BatchNorm" and node.name not in refreshed]
        if left:
            why = ("do_fusion is false" if not config.do_fusion else
                   "only a BatchNorm folded into a quantized layer is refreshed (skip_fusion_layers keeps some "
                   "apart, or the layer before is not a quantized weighted one)")
            _LOG.warning("update_bn: BatchNorm layer(s) %s keep their statistics: %s", left, why)
    fuse_bn_scale(graph, config.do_fusion, skip)
    # The kept chains' layers are fused at save time: their own quantization settings do not apply.
    kept = {name for chain in bn_kept.values() for name in chain}
    enabled = [name for name in quantized if name not in kept]
    accelerate_bn_scale_bias(graph, set(enabled))
    if bn_kept:
        _LOG.info("update_bn: BatchNorm layer(s) %s stay unfused until the models are saved; their statistics "
                  "are refreshed by the calibration model", [chain[0] for chain in bn_kept.values()])
    targets = quant_targets(graph, enabled)
    unshare_quantized_weights(graph, targets)
    return Prepared(graph, targets, frozenset(unfused), bn_kept)


def prepare_from_record(graph: Graph, layers: Collection[str], skip_fusion: Collection[str]) -> Graph:
    """convert_model's fusion: BN fusion except for ``skip_fusion`` (the record's ``skip_fusion: true``
    entries), and BN acceleration of the BatchNorm / Scale / Bias layers named in ``layers`` (the
    record's keys). Returns the new graph; the targets are chosen from the record by the caller."""
    graph = graph.copy()
    names = {n.name for n in graph.nodes}
    fuse_bn_scale(graph, True, [k for k in skip_fusion if k in names])
    accelerate_bn_scale_bias(graph, {k for k in layers if k in names and graph.has_node(k)
                                     and graph.node(k).type in ops.FOLDED_ORDER})
    return graph
