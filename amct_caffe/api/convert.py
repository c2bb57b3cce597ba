"""convert_model: quantized models from a user's own scale/offset record (the guide's convert_model)."""

from __future__ import annotations

import logging

from amct_caffe import log, ops
from amct_caffe.api.outputs import save_quantized
from amct_caffe.api.session import load_float_graph
from amct_caffe.errors import AmctError, ConfigError
from amct_caffe.io.paths import reading, require
from amct_caffe.io.record import RecordError, read_record
from amct_caffe.passes.prepare import prepare_from_record, quant_target, unshare_quantized_weights
from amct_caffe.passes.quantized_models import MISSING_SCALE_D_ADVICE

_LOG = logging.getLogger(__name__)
# convert_model runs no calibration model: a layer's entry must give its activation factors itself
_NO_RECORD_D = ("give its entry a record_d { scale_d offset_d index } for each input it quantizes, or drop the "
                "entry to keep the layer float")


def convert_model(model_file, weights_file, scale_offset_record_file, save_path) -> dict[str, str]:
    """Write the fake-quant and deploy models for a float model and a record of its factors.

    Conv/Deconv/InnerProduct + BatchNorm + Scale + Bias chains are fused first, except for layers
    whose record sets ``skip_fusion: true``; a record entry for a BatchNorm/Scale/Bias layer turns
    that layer into a quantized depthwise convolution. Every record key must name a quantizable
    layer of the (fused) model.
    """
    log.setup()
    require(model_file=model_file, weights_file=weights_file, scale_offset_record_file=scale_offset_record_file)
    with reading(model_file=model_file, weights_file=weights_file, scale_offset_record_file=scale_offset_record_file):
        return _convert(model_file, weights_file, scale_offset_record_file, save_path)


def _convert(model_file, weights_file, scale_offset_record_file, save_path) -> dict[str, str]:
    source = load_float_graph(model_file, weights_file)
    original_names = {n.name for n in source.nodes}
    record = read_record(scale_offset_record_file)
    skip = [k for k, e in record.layers.items() if e.skip_fusion]
    graph = prepare_from_record(source, list(record.layers), skip)
    # Entries carrying only skip_fusion are fusion settings, not layers to quantize.
    keys = [k for k, e in record.layers.items() if e.scale_w or e.record_d]
    if not keys:  # what calibrate writes for a config that quantizes no layer: save_model's float models
        _LOG.warning("%s: no record entry gives quantization factors (scale_w / record_d): no layer is quantized",
                     scale_offset_record_file)
    present = {n.name for n in graph.nodes}
    for key in keys:
        if key not in present:
            where = "was fused into another layer" if key in original_names else f"is not a layer of {model_file}"
            raise AmctError(f"{scale_offset_record_file}: record entry '{key}' {where}; give factors for the "
                            "layers of the model as converted (set skip_fusion: true to keep a layer unfused)")
    targets = []
    for node in graph.nodes:
        if node.name not in keys:
            continue
        entry = record.layer(node.name)
        if not ops.layer_type(node.type).quantizable:
            raise AmctError(f"{scale_offset_record_file}: layer '{node.name}' has type {node.type}, which cannot "
                            "be quantized")
        inputs = None
        row = ops.layer_type(node.type)
        if not ((row.weighted or row.recurrent) and node.params):
            inputs = tuple(sorted({d.index for d in entry.record_d}))
            if not inputs:
                raise RecordError(f"{scale_offset_record_file}: Cannot find scale_d of layer '{node.name}' in record "
                                  f"file: {_NO_RECORD_D}")
        try:
            targets.append(quant_target(node, graph, inputs))
        except ConfigError as e:
            raise AmctError(f"{scale_offset_record_file}: {e}") from None
    unshare_quantized_weights(graph, targets)
    _LOG.info("convert_model: %d layer(s) quantized from %s", len(targets), scale_offset_record_file)
    try:
        return save_quantized(graph, targets, record, "Both", save_path, original_names)
    except RecordError as e:  # a factor missing or out of range: name the file it comes from
        text = str(e).replace(MISSING_SCALE_D_ADVICE, _NO_RECORD_D)  # no calibration model runs here
        raise RecordError(f"{scale_offset_record_file}: {text}") from None
