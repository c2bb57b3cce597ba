"""The retrain .cfg (create_quant_retrain_config's ``config_defination``): a ``RetrainConfig`` message in
protobuf text form (``proto/retrain_config.proto``), applied to the generated retrain config.

The guide passes a ``retrain.cfg`` to create_quant_retrain_config but gives no schema for it. Two forms are
read, in one file if wanted:

* the JSON's own schema, one ``layers { key: "<layer>" value { ... } }`` per layer to change::

      version: 1
      layers { key: "conv1" value { retrain_data_config { clip_max: 3.0 clip_min: -3.0 } } }
      layers { key: "fc" value { retrain_enable: false } }

* the vendor's retrain .cfg (its ``AMCTRetrainConfig``, shaped as the guide's PTQ .cfg)::

      batch_num: 1
      skip_layers: "conv1"
      skip_layer_types: "InnerProduct"
      retrain_data_quant_config { ulq_quantize { fixed_min: false dst_type: INT8 } }
      retrain_weight_quant_config { arq_retrain { channel_wise: true } }
      override_layer_types { layer_type: "DepthwiseConv" retrain_data_quant_config {
                             ulq_quantize { clip_max_min { clip_max: 6.0 clip_min: -6.0 } } } }
      override_layer_configs { layer_name: "conv2"
                               retrain_weight_quant_config { arq_retrain { channel_wise: false } } }

How a retrainable layer's entry is built: the generated default; then the common
``retrain_data_quant_config`` / ``retrain_weight_quant_config``; then the ``override_layer_types`` entry
of its type (a depthwise Convolution: "Convolution", then "DepthwiseConv"); then its
``override_layer_configs`` entry; then its ``layers`` entry. Each level changes only the fields it sets;
``clip_max_min`` sets the pair (a bound it leaves out is removed, so the JSON's rules on a lone bound
apply). ``dst_type`` INT8 / INT16 is ``num_bits`` 8 / 16 (data; weights INT8 only). A layer in
``skip_layers``, or of a type in ``skip_layer_types`` and not named by ``override_layer_configs``, gets
``retrain_enable: false`` and keeps the default settings (the common and type levels, which may not fit it, do
not apply). ``batch_num`` is the number of batches IFMR starts the clips on: the retrain
layers start them on the first forward, so only 1 is taken.

Checks: parse errors name the file, line and column; every layer name must be a retrainable layer of the
model and every type one of the retrainable types; a layer or type both skipped and overridden, or
overridden twice, is an error; the merged entry is validated as a JSON entry, naming the layer.
"""

from __future__ import annotations

import functools
import logging

from amct_caffe.config import checks as C
from amct_caffe.config import layer_types as T
from amct_caffe.config.quant_config import layer_where
from amct_caffe.config.retrain_config import (RETRAINABLE_TYPES, RetrainConfig, RetrainLayerConfig,
                                              bind_retrain_config, default_retrain_layer, retrainable_nodes)
from amct_caffe.io.schema import records

_LOG = logging.getLogger(__name__)

_DATA_BITS = {"INT8": 8, "INT16": 16}  # dst_type -> num_bits of data; INT4 is below the data range [8, 16]


def parse_retrain_cfg(path):
    """Read a retrain .cfg into a ``RetrainConfig`` message; errors name the file, line and column. A layer
    given twice in ``layers { key: ... }`` is refused (the map field would keep the last entry unsaid)."""
    msg = C.parse_text_message(path, records().RetrainConfig(), "retrain simple config")
    if len(msg.layers):
        keys = [entry.key for entry in C.parse_text_message(path, _listed_layers_class()(), "retrain simple config")
                .layers]
        twice = next((k for k in keys if keys.count(k) > 1), None)
        if twice is not None:
            raise C.fail(str(path), f"layers {{ key: \"{twice}\" }} is given twice; give each layer once")
    return msg


@functools.lru_cache(maxsize=1)
def _listed_layers_class():
    """RetrainConfig with ``layers`` read as the list of entries the text gives (its map entry made a plain
    message), so that a key given twice can be seen."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    file_proto = descriptor_pb2.FileDescriptorProto()
    records().RetrainConfig.DESCRIPTOR.file.CopyToProto(file_proto)
    for message in file_proto.message_type:
        for nested in message.nested_type:
            nested.options.ClearField("map_entry")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    name = records().RetrainConfig.DESCRIPTOR.full_name
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


def _set_fields(sub) -> dict:
    """The fields a sub-message sets; float32 values shown as the user wrote them (0.7, not 0.699999988)."""
    out = {}
    for fd, value in sub.ListFields():
        out[fd.name] = C.shortest_float(value) if fd.type == fd.TYPE_FLOAT else value
    return out


def _dst_type_name(msg) -> str:
    return msg.DESCRIPTOR.fields_by_name["dst_type"].enum_type.values_by_number[msg.dst_type].name


def _data_update(block, where: str) -> tuple[dict, tuple[str, ...]]:
    """(fields to set, fields to remove) of the JSON's retrain_data_config from a RetrainDataQuantConfig."""
    if not block.HasField("ulq_quantize"):
        return {}, ()
    ulq = block.ulq_quantize
    update: dict = {"algo": "ulq_quantize"}
    removed: tuple[str, ...] = ()
    if ulq.HasField("clip_max_min"):
        pair = _set_fields(ulq.clip_max_min)
        update.update(pair)
        removed = tuple(k for k in ("clip_max", "clip_min") if k not in pair)
    if ulq.HasField("fixed_min"):
        update["fixed_min"] = ulq.fixed_min
    if ulq.HasField("dst_type") and ulq.HasField("num_bits"):
        raise C.fail(where, "ulq_quantize gives both dst_type and num_bits: give one of them")
    if ulq.HasField("dst_type"):
        name = _dst_type_name(ulq)
        if name not in _DATA_BITS:
            raise C.fail(where, f"ulq_quantize.dst_type {name}: data is quantized to 8 to 16 bits (INT8 or INT16)")
        update["num_bits"] = _DATA_BITS[name]
    if ulq.HasField("num_bits"):
        update["num_bits"] = ulq.num_bits
    return update, removed


def _weight_update(block, where: str) -> dict:
    """The fields a RetrainWeightQuantConfig sets in the JSON's retrain_weight_config."""
    if not block.HasField("arq_retrain"):
        return {}
    arq = block.arq_retrain
    update: dict = {"algo": "arq_retrain"}
    if arq.HasField("channel_wise"):
        update["channel_wise"] = arq.channel_wise
    if arq.HasField("dst_type"):
        if _dst_type_name(arq) != "INT8":
            raise C.fail(where, f"arq_retrain.dst_type {_dst_type_name(arq)}: weights are retrained in INT8 only")
        update["num_bits"] = 8
    return update


class _Level:
    """One level of the vendor form (common, a type, a layer): the JSON fields it sets. ``where``: the file
    and the level ("a.cfg: override_layer_types[Convolution]."), which the field name completes."""

    def __init__(self, owner, where: str):
        self.data, self.removed = ({}, ())
        self.weight = {}
        if owner.HasField("retrain_data_quant_config"):
            self.data, self.removed = _data_update(owner.retrain_data_quant_config,
                                                   f"{where}retrain_data_quant_config")
        if owner.HasField("retrain_weight_quant_config"):
            self.weight = _weight_update(owner.retrain_weight_quant_config, f"{where}retrain_weight_quant_config")

    def apply(self, d: dict) -> None:
        for key in self.removed:
            d["retrain_data_config"].pop(key, None)
        d["retrain_data_config"].update(self.data)
        d["retrain_weight_config"].update(self.weight)


def _not_retrainable(where: str, what: str, layers: dict):
    close = ", ".join(sorted(layers)[:10]) or "none"
    return C.fail(where, f"{what} is not a retrainable layer of the model (retrainable: {close})")


def _overrides(entries, key: str, kind: str, skipped, skip_field: str, known, where: str) -> dict:
    """{key value: _Level} of override_layer_types / override_layer_configs ``entries`` (``key``: layer_type or
    layer_name), each known, given once and not also skipped."""
    field = "override_layer_types" if key == "layer_type" else "override_layer_configs"
    out: dict = {}
    for o in entries:
        name = getattr(o, key)
        known(field, name)
        if name in out:
            raise C.fail(where, f"{field}: {kind} '{name}' is overridden twice")
        if name in skipped:
            raise C.fail(where, f"{field}: {kind} '{name}' is also in {skip_field}")
        out[name] = _Level(o, f"{where}: {field}[{name}].")
    return out


def _levels(msg, where: str, layers: dict) -> tuple[dict, dict]:
    """The vendor form's type and layer overrides, checked: ({type: _Level}, {layer: _Level})."""
    def known_layer(field: str, name: str) -> None:
        if name not in layers:
            raise _not_retrainable(where, f"{field}: layer '{name}'", layers)

    def known_type(field: str, name: str) -> None:
        if name not in RETRAINABLE_TYPES:
            raise C.fail(where, f"{field}: '{name}' is not one of the retrainable types {', '.join(RETRAINABLE_TYPES)}")

    C.unique(where, "skip_layers", msg.skip_layers)
    for name in msg.skip_layers:
        known_layer("skip_layers", name)
    C.unique(where, "skip_layer_types", msg.skip_layer_types)
    for name in msg.skip_layer_types:
        known_type("skip_layer_types", name)
    types = _overrides(msg.override_layer_types, "layer_type", "type", msg.skip_layer_types, "skip_layer_types",
                       known_type, where)
    named = _overrides(msg.override_layer_configs, "layer_name", "layer", msg.skip_layers, "skip_layers",
                       known_layer, where)
    return types, named


def apply_retrain_cfg(config: RetrainConfig, path, graph) -> RetrainConfig:
    """``config`` (the generated defaults for ``graph``) with the .cfg at ``path`` applied (module doc)."""
    msg = parse_retrain_cfg(path)
    where = str(path)
    if msg.batch_num != 1:
        raise C.fail(where, f"batch_num {msg.batch_num}: the retrain layers start their clips by IFMR on the first "
                            "batch only; give 1 or leave it out")
    layers = dict(config.layers)
    for name in msg.layers:
        if name not in layers:
            raise _not_retrainable(where, f"layer '{name}'", layers)
    types, named = _levels(msg, where, layers)
    common = _Level(msg, f"{where}: ")
    nodes = {n.name: n for n in graph.nodes}
    for name in list(layers):  # a level that sets nothing leaves the entry as it is
        d = layers[name].to_dict()
        type_names = T.matching_type_names(nodes[name], graph)
        if name in msg.skip_layers or (name not in named and any(t in msg.skip_layer_types for t in type_names)):
            d["retrain_enable"] = False  # and its settings stay the defaults: the levels are for retrained layers
        else:
            common.apply(d)
            for t in type_names:
                if t in types:
                    types[t].apply(d)
            if name in named:
                named[name].apply(d)
        if name in msg.layers:
            entry = msg.layers[name]
            if entry.HasField("retrain_enable"):
                d["retrain_enable"] = entry.retrain_enable
            for key in ("retrain_data_config", "retrain_weight_config"):
                if entry.HasField(key):
                    d[key].update(_set_fields(getattr(entry, key)))
        layers[name] = RetrainLayerConfig.from_dict(d, layer_where(where, name))
    out = RetrainConfig(version=msg.version, layers=layers)
    out.validate(where)
    return out


def create_retrain_config(graph, config_defination=None, model_file=None) -> RetrainConfig:
    """Every retrainable layer of ``graph`` with its default entry; with a retrain .cfg, that applied (module
    doc); checked against ``graph``. ``model_file`` names the model in the warning when nothing is retrained."""
    layers = {node.name: default_retrain_layer(node, graph) for node, _ in retrainable_nodes(graph)}
    config = RetrainConfig(layers=layers)
    if config_defination is not None:
        config = apply_retrain_cfg(config, config_defination, graph)
    if not config.retrained_layers():
        _LOG.warning("no layer of %s will be retrained", model_file or f"model '{graph.name}'")
    return bind_retrain_config(config, graph, "" if config_defination is None else str(config_defination))
