"""Checks of a config against the model it quantizes, and each layer type's default entry.

A JSON config names layers but not their types, so these rules need the graph:

* every layer key is a layer of the model whose type (DepthwiseConv for a depthwise Convolution)
  is in the guide's table of quantizable layers;
* data-only layers have no ``weight_quant_params``; layers with weights get the type's default
  when the file leaves it out;
* InnerProduct / LSTM / RNN / GRU take only ``channel_wise: false``; snq_quantize only for
  InnerProduct, Convolution, DepthwiseConv, Deconvolution;
* a Scale / Bias the BN+Scale+Bias acceleration cannot handle cannot have ``quant_enable: true``;
* ``skip_fusion_layers`` names layers of the model that BN fusion starts from.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from amct_caffe import ops
from amct_caffe.config import layer_types as T
from amct_caffe.config.checks import fail, show
from amct_caffe.config.quant_config import (ArqParams, LayerQuantConfig, QuantConfig, SnqParams,
                                            WeightQuantParams, layer_where)

_LOG = logging.getLogger(__name__)


def default_layer_config(kind: str) -> LayerQuantConfig:
    """The generated entry of a layer whose config type is ``kind`` (create_quant_config's sample)."""
    weights = ArqParams(channel_wise=T.default_channel_wise(kind)) if T.has_weights(kind) else None
    return LayerQuantConfig(quant_enable=T.on_by_default(kind), weight_quant_params=weights)


def quantizable_nodes(graph, log_skipped: bool = True) -> list[tuple[object, str]]:
    """``(node, config type)`` of every layer the config may cover, in model order.

    Layers of a listed type that still cannot be quantized are left out, with a log line.
    """
    found = []
    for node in graph.nodes:
        kind = T.config_type(node, graph)
        if not T.is_quantizable_type(kind):
            continue
        reason = T.cannot_quantize_reason(node, graph)
        if reason is not None:
            if log_skipped:
                _LOG.info("layer '%s' (%s) cannot be quantized and is left out of the config: %s",
                          node.name, kind, reason)
            continue
        found.append((node, kind))
    return found


def check_weight_params(params: WeightQuantParams | None, kind: str, where: str,
                        prefix: str = "weight_quant_params.") -> None:
    """The per-type weight rules (see the module doc); ``where`` names the layer."""
    if params is None:
        return
    if not T.has_weights(kind):
        raise fail(where, f"{prefix.rstrip('.')} is not allowed: {kind} layers have no weights to quantize "
                          "(only activation_quant_params applies)")
    if params.channel_wise and ops.layer_type(kind).per_tensor_only:
        raise fail(where, f"{prefix}channel_wise true is not supported: "
                          f"{kind} supports only channel_wise false")
    if isinstance(params, SnqParams) and not ops.layer_type(kind).snq:
        what = f'{prefix}wts_algo "snq_quantize"' if prefix == "weight_quant_params." else "snq_quantize"
        raise fail(where, f"{what} is not supported for {kind}: non-uniform quantization supports only "
                          f"{', '.join(sorted(ops.types_where('snq')))}")


def check_skip_fusion_layers(names, graph, where: str, field: str = "skip_fusion_layers") -> None:
    by_name = {n.name: n for n in graph.nodes}
    for name in names:
        node = by_name.get(name)
        if node is None:
            raise fail(where, f"{field}: layer '{name}' is not in the model")
        kind = T.config_type(node, graph)
        if not ops.layer_type(kind).fusion_target:
            raise fail(where, f"{field}: layer '{name}' ({kind}) is not a fusable layer "
                              f"(BN fusion starts from {', '.join(sorted(ops.types_where('fusion_target')))})")


def bind_to_graph(config: QuantConfig, graph, where: str = "") -> QuantConfig:
    """Check ``config`` against ``graph`` and return a completed copy, layers in model order.

    Raises ConfigError for a layer that is not in the model or cannot be quantized, for
    ``weight_quant_params`` a layer type does not allow, and for bad ``skip_fusion_layers``.
    """
    config.validate(where)
    by_name = {n.name: n for n in graph.nodes}
    kinds = {}
    for name in config.layers:
        node = by_name.get(name)
        if node is None:
            raise fail(where, f"layer '{name}' is in the config but not in the model")
        kind = T.config_type(node, graph)
        if not T.is_quantizable_type(kind):
            raise fail(where, f"layer '{name}' ({kind}) cannot be quantized: {kind} is not in the list of "
                              "layers that support quantization")
        kinds[name] = kind
    layers = {}
    for node in graph.nodes:
        if node.name not in config.layers:
            continue
        name, kind, layer = node.name, kinds[node.name], config.layers[node.name]
        lw = f"{layer_where(where, name)} ({kind})"
        reason = T.cannot_quantize_reason(node, graph)
        if reason is not None and layer.quant_enable:
            raise fail(lw, f"quant_enable true is not possible: {reason}")
        check_weight_params(layer.weight_quant_params, kind, lw)
        if layer.weight_quant_params is None and T.has_weights(kind):
            layer = replace(layer, weight_quant_params=ArqParams(channel_wise=T.default_channel_wise(kind)))
        layers[name] = replace(layer)  # a copy: the caller's config stays as it was
    check_skip_fusion_layers(config.skip_fusion_layers, graph, where)
    bound = replace(config, skip_fusion_layers=list(config.skip_fusion_layers), layers=layers)
    if any(node.type == "BatchNorm" for node in graph.nodes):  # (update_bn refreshes BatchNorm statistics)
        _warn_snq_without_bn_update(bound)
    return bound


def _warn_snq_without_bn_update(config: QuantConfig) -> None:
    snq = [n for n, layer in config.layers.items()
           if layer.quant_enable and isinstance(layer.weight_quant_params, SnqParams)]
    if snq and not config.update_bn:
        _LOG.warning("layers %s use snq_quantize but update_bn is false: the guide warns that accuracy drops "
                     "noticeably unless BN statistics are refreshed after non-uniform weight quantization",
                     show(snq[:5]) + (" ..." if len(snq) > 5 else ""))
