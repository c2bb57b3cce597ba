"""The simple post-training config (.cfg): an ``AMCTConfig`` in protobuf text format -> QuantConfig.

Schema: ``proto/calibration_config.proto`` (the guide's 训练后量化简易量化配置文件说明).

How a layer's entry is built, for every layer of a quantizable type (see :mod:`.layer_types`):

1. layers named in ``skip_layers``, and layers of a type in ``skip_layer_types`` (unless the
   layer itself is in ``override_layer_configs``), are left out of the config (not quantized);
2. start from the type's default entry (ARQ 8 bit, channel_wise true except InnerProduct /
   LSTM / RNN / GRU; IFMR with the guide's defaults);
3. apply ``common_config``, then the ``override_layer_types`` entry of the layer's type (for a
   depthwise Convolution: "Convolution", then "DepthwiseConv"), then its
   ``override_layer_configs`` entry: precedence layer > type > common;
4. merging is per field and only for fields the file sets (``HasField``): a level that sets
   ``ifmr_quantize { num_bits: 12 }`` keeps the search range from the levels below. The weight
   algorithm is a oneof: a level that names a different algorithm than the one below starts
   over from that algorithm's defaults (SNQ fields do not leak into ARQ and back);
5. ``quant_enable`` is true for types quantized by default, and for the 默认不量化 types only
   when an override (type or layer) names them.

``batch_num`` and ``activation_offset`` come from the file (defaults 1 and true); the
create_quant_config arguments of the same names are then ignored, as the guide says.

Checks: parse errors give the file, line and column; names in ``skip_layers``,
``override_layer_configs`` and ``skip_fusion_layers`` must be layers of the model; type names must
be in the table of quantizable types; a layer both skipped and overridden, or a type both
skipped and overridden, is an error; a type or layer override may not give a weight algorithm to a
layer without weights (common_config may: data-only layers ignore it); every value is
range-checked, first where it is written (``common_config.ifmr_quantize.max_percentile``) and
then per layer after merging (cross-field and per-type rules, e.g. InnerProduct channel_wise).
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path


from amct_caffe.config import checks as C
from amct_caffe.config import layer_types as T
from amct_caffe.config.binding import check_skip_fusion_layers, check_weight_params, quantizable_nodes
from amct_caffe.config.quant_config import (ActivationQuantParams, ArqParams, BnUpdateConfig,
                                            LayerQuantConfig, QuantConfig, SnqParams)
from amct_caffe.errors import ConfigError
from amct_caffe.io.schema import records

_LOG = logging.getLogger(__name__)

# FMRQuantize field -> range; search_range_* and search_step must be positive and finite where written, and are
# checked together (start < end, the step, float32 precision) after merging.
_IFMR_RANGES = {"max_percentile": C.PERCENTILE, "min_percentile": C.PERCENTILE, "num_bits": C.ACT_NUM_BITS}
_FLOAT_FIELDS = {"search_range_start", "search_range_end", "search_step", "max_percentile", "min_percentile",
                 "min_distance", "bn_moving_average_fraction"}


def parse_simple_cfg(path):
    """Read a .cfg file into an ``AMCTConfig`` message; errors name the file, line and column."""
    path = Path(path)
    msg = C.parse_text_message(path, records().AMCTConfig(), "simple config")
    missing = msg.FindInitializationErrors()
    if missing:
        raise ConfigError(f"{path}: required field(s) missing: {', '.join(missing)}")
    return msg


def _fields(sub) -> dict:
    """The fields a sub-message sets, float32 values shown as the user wrote them."""
    return {f.name: (C.shortest_float(v) if f.name in _FLOAT_FIELDS else v) for f, v in sub.ListFields()}


def _check_block(calib, path: str, block: str) -> None:
    """Single-field ranges of one CalibrationConfig, named where they are written."""
    if calib.HasField("ifmr_quantize"):
        values = _fields(calib.ifmr_quantize)
        for name, interval in _IFMR_RANGES.items():
            if name in values:
                C.in_range(path, f"{block}.ifmr_quantize.{name}", values[name], interval)
        for name in ("search_range_start", "search_range_end", "search_step"):
            if name in values:
                C.in_range(path, f"{block}.ifmr_quantize.{name}", values[name], C.POSITIVE)
    algo = calib.WhichOneof("wts_quant_algo")
    if algo is not None:
        _weights(algo, _fields(getattr(calib, algo)), "Convolution").validate(path, f"{block}.{algo}.")


def _no_weights_for_data_only(calib, kind: str, path: str, block: str) -> None:
    """A type or layer override may not give a weight algorithm to a layer type without weights.

    (common_config may: it applies to every layer, and data-only layers just ignore it.)
    """
    algo = calib.WhichOneof("wts_quant_algo")
    if algo is not None and not T.has_weights(kind):
        raise C.fail(path, f"{block}.{algo} is not allowed: {kind} layers have no weights to quantize")


def _weights(algo: str, values: dict, kind: str):
    channel_wise = values.get("channel_wise", T.default_channel_wise(kind))
    if algo == "arq_quantize":
        return ArqParams(channel_wise=channel_wise, num_bits=values.get("num_bits", C.ARQ_NUM_BITS))
    return SnqParams(channel_wise=channel_wise, max_iteration=values.get("max_iteration", 1000),
                     min_distance=values.get("min_distance", 1e-10),
                     init_algo=values.get("init_algo", "uniform"))


class _Merged:
    """One layer's settings while the levels are applied (field name -> value, cfg names)."""

    def __init__(self):
        d = ActivationQuantParams()
        self.acts = {"num_bits": d.num_bits, "max_percentile": d.max_percentile,
                     "min_percentile": d.min_percentile, "search_range_start": d.search_range[0],
                     "search_range_end": d.search_range[1], "search_step": d.search_step}
        self.algo = "arq_quantize"
        self.weights: dict = {}

    def apply(self, calib) -> None:
        if calib.HasField("ifmr_quantize"):
            self.acts.update(_fields(calib.ifmr_quantize))
        algo = calib.WhichOneof("wts_quant_algo")
        if algo is not None:
            if algo != self.algo:
                self.algo, self.weights = algo, {}
            self.weights.update(_fields(getattr(calib, algo)))

    def result(self, kind: str, quant_enable: bool) -> LayerQuantConfig:
        a = self.acts
        acts = ActivationQuantParams(num_bits=a["num_bits"], max_percentile=a["max_percentile"],
                                     min_percentile=a["min_percentile"],
                                     search_range=(a["search_range_start"], a["search_range_end"]),
                                     search_step=a["search_step"])
        weights = _weights(self.algo, self.weights, kind) if T.has_weights(kind) else None
        return LayerQuantConfig(quant_enable=quant_enable, activation_quant_params=acts,
                                weight_quant_params=weights)


def _type_name_error(path: str, field: str, name: str) -> ConfigError:
    close = difflib.get_close_matches(name, T.quantizable_types(), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return C.fail(path, f"{field}: '{name}' is not a layer type that supports quantization{hint}")


def config_from_simple_cfg(cfg_path, graph) -> QuantConfig:
    """Build the full config of ``graph`` from the simple .cfg ``cfg_path`` (rules: module doc)."""
    path = str(cfg_path)
    cfg = parse_simple_cfg(cfg_path)
    by_name = {n.name: n for n in graph.nodes}

    # ---- names and types
    C.unique(path, "skip_layers", cfg.skip_layers)
    for name in cfg.skip_layers:
        if name not in by_name:
            raise C.fail(path, f"skip_layers: layer '{name}' is not in the model")
    C.unique(path, "skip_layer_types", cfg.skip_layer_types)
    for name in cfg.skip_layer_types:
        if not T.is_quantizable_type(name):
            raise _type_name_error(path, "skip_layer_types", name)
    type_overrides = {}
    for i, o in enumerate(cfg.override_layer_types):
        if not T.is_quantizable_type(o.layer_type):
            raise _type_name_error(path, f"override_layer_types[{i}].layer_type", o.layer_type)
        if o.layer_type in type_overrides:
            raise C.fail(path, f"override_layer_types: type '{o.layer_type}' is overridden twice")
        if o.layer_type in cfg.skip_layer_types:
            raise C.fail(path, f"override_layer_types: type '{o.layer_type}' is also in skip_layer_types")
        block = f"override_layer_types[{o.layer_type}]"
        _check_block(o.calibration_config, path, block)
        _no_weights_for_data_only(o.calibration_config, o.layer_type, path, block)
        type_overrides[o.layer_type] = o.calibration_config
    layer_overrides = {}
    for o in cfg.override_layer_configs:
        name = o.layer_name
        if name not in by_name:
            raise C.fail(path, f"override_layer_configs: layer '{name}' is not in the model")
        if name in layer_overrides:
            raise C.fail(path, f"override_layer_configs: layer '{name}' is overridden twice")
        if name in cfg.skip_layers:
            raise C.fail(path, f"override_layer_configs: layer '{name}' is also in skip_layers")
        _check_block(o.calibration_config, path, f"override_layer_configs[{name}]")
        layer_overrides[name] = o.calibration_config
    if cfg.HasField("common_config"):
        _check_block(cfg.common_config, path, "common_config")
    C.unique(path, "skip_fusion_layers", cfg.skip_fusion_layers)
    check_skip_fusion_layers(cfg.skip_fusion_layers, graph, path)

    # ---- per-layer entries
    candidates = quantizable_nodes(graph)
    candidate_names = {node.name for node, _ in candidates}
    for name in layer_overrides:
        if name not in candidate_names:
            kind = T.config_type(by_name[name], graph)
            raise C.fail(path, f"override_layer_configs: layer '{name}' ({kind}) cannot be quantized")
    kinds = {node.name: kind for node, kind in candidates}
    for name, calib in layer_overrides.items():
        _no_weights_for_data_only(calib, kinds[name], path, f"override_layer_configs[{name}]")
    layers = {}
    for node, kind in candidates:
        names = T.matching_type_names(node, graph)
        if node.name in cfg.skip_layers:
            _LOG.info("layer '%s' is in skip_layers: not quantized", node.name)
            continue
        if node.name not in layer_overrides and any(t in cfg.skip_layer_types for t in names):
            _LOG.info("layer '%s' (%s) is of a type in skip_layer_types: not quantized", node.name, kind)
            continue
        merged = _Merged()
        if cfg.HasField("common_config"):
            merged.apply(cfg.common_config)
        named = node.name in layer_overrides
        for t in names:
            if t in type_overrides:
                merged.apply(type_overrides[t])
                named = True
        if node.name in layer_overrides:
            merged.apply(layer_overrides[node.name])
        layer = merged.result(kind, T.on_by_default(kind) or named)
        where = f"{path}: layer '{node.name}' ({kind})"
        layer.activation_quant_params.validate(where, "ifmr_quantize.")
        if layer.weight_quant_params is not None:
            prefix = f"{layer.weight_quant_params.wts_algo}."
            layer.weight_quant_params.validate(where, prefix)
            check_weight_params(layer.weight_quant_params, kind, where, prefix)
        layers[node.name] = layer

    # ---- global options
    bn = None
    if cfg.HasField("bn_update_config"):
        bn = BnUpdateConfig(**{**BnUpdateConfig().to_dict(), **_fields(cfg.bn_update_config)})
    elif cfg.update_bn:
        bn = BnUpdateConfig()
    result = QuantConfig(version=1, batch_num=cfg.batch_num, activation_offset=cfg.activation_offset,
                         do_fusion=cfg.do_fusion, skip_fusion_layers=list(cfg.skip_fusion_layers),
                         update_bn=cfg.update_bn, bn_update_config=bn, layers=layers)
    result.validate(path)
    return result
