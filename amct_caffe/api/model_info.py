"""What a model and a config say before any quantization runs (ours, beyond the guide; the command line's
``inspect`` and its checks of ``--batch-num`` against a config).

* :func:`describe_layers`: per layer its type, output shapes, parameter count and whether and how it
  is quantized: ``quantizable`` (its type is in the guide's table and nothing in its parameters
  prevents it), ``quant_kind`` (weights and data, or data only) and ``by_default`` (quantized by the
  config ``create_quant_config`` generates). With weights, ``by_default`` is read from that generated
  config itself; without, from the table (the config needs the weights to be generated).
* :func:`config_settings`: the global ``batch_num`` and ``activation_offset`` a JSON config or a
  simple .cfg defines, which take precedence over the arguments of the same names.
"""

from __future__ import annotations

import json
import math

import numpy as np

from amct_caffe import io, log, ops
from amct_caffe.api.session import load_float_graph
from amct_caffe.config import create_default_config, parse_simple_cfg, read_quant_config
from amct_caffe.config.quant_config import BnUpdateConfig
from amct_caffe.passes.weights import bn_update_settings
from amct_caffe.config.layer_types import cannot_quantize_reason, config_type
from amct_caffe.errors import AmctError, ConfigError
from amct_caffe.io.files import read_text
from amct_caffe.io.graph_io import graph_from_net
from amct_caffe.io.paths import reading
from amct_caffe.config import checks as C
from amct_caffe.runtime import TEST
from amct_caffe.runtime.blob import INT_MAX
from amct_caffe.runtime.shapes import infer_shapes, static_class

__all__ = ["config_settings", "describe_layers"]


def _param_shapes(node, graph) -> list[tuple[int, ...]] | None:
    """The shapes of the learned blobs ``node``'s layer creates from its input shapes (None: unknown)."""
    bottoms = [graph.blobs[b].shape for b in node.bottoms]
    if any(s is None for s in bottoms) or node.layer_param is None:
        return None
    cls = static_class(node.type)
    if cls is None:  # no executor for the type, or a Python layer (only a Net imports its module)
        return None
    try:
        layer = cls(node.layer_param, TEST)
        return [tuple(int(d) for d in s) for s in layer.param_shapes([tuple(s) for s in bottoms])]
    except (AmctError, ValueError, IndexError):  # parameters the layer rejects
        return None


def _infer_shapes_without_weights(graph) -> dict[str, str]:
    """infer_shapes(have_weights=False), with zero placeholders for the learned blobs of the layers that
    read their blobs' shapes to shape their output (Scale, Bias): without them inference stops there.
    Returns {layer: why its output shapes are unknown} for the layers where inference stopped."""
    while True:
        stops: dict[str, str] = {}
        infer_shapes(graph, have_weights=False, stops=stops)
        filled = False
        for node in graph.nodes:
            if node.params or all(graph.blobs[t].shape is not None for t in node.tops):
                continue
            shapes = _param_shapes(node, graph)
            if shapes and all(math.prod(s) <= INT_MAX for s in shapes):  # larger: Caffe refuses them, shapes unknown
                # zero views, not arrays: only their shapes are read, and a layer of huge parameters stays cheap
                node.params = [np.broadcast_to(np.float32(0), s) for s in shapes]
                filled = True
        if not filled:
            return stops


def _param_count(node, graph) -> int | None:
    """Learned values of ``node``: its weights, else the blob shapes its layer would create (None: unknown)."""
    if node.params:
        return int(sum(p.size for p in node.params))
    shapes = _param_shapes(node, graph)
    return None if shapes is None else int(sum(math.prod(s) for s in shapes))


def describe_layers(model_file, weights_file=None) -> list[dict]:
    """One dict per layer of ``model_file``, in model order (module doc):

    ``name``, ``type``, ``config_type`` (the config's name for it: "DepthwiseConv" for a depthwise
    Convolution), ``bottoms`` / ``tops`` (as the prototxt names them), ``top_shapes`` (a list per top,
    None where unknown), ``params`` (learned values, None when unknown), ``quantizable``,
    ``quant_kind`` ("weights_and_data", "data_only" or None), ``by_default``, and ``note`` (why a
    layer of a quantizable type cannot be quantized, or None).
    """
    log.setup()
    with reading(model_file=model_file, weights_file=weights_file):
        stops: dict[str, str] = {}
        if weights_file is not None:
            graph = load_float_graph(model_file, weights_file)
            enabled = set(create_default_config(graph).quantized_layers())
        else:
            net, _ = io.load_model(model_file)
            graph = graph_from_net(net)
            stops = _infer_shapes_without_weights(graph)
            enabled = None
    rows = []
    for node in graph.nodes:
        kind = config_type(node, graph)
        row = ops.layer_type(kind)
        note = cannot_quantize_reason(node, graph) if row.quantizable else None
        quantizable = row.quantizable and note is None
        if node.name in stops:  # where shape inference stopped: the layers after it have unknown shapes too
            note = f"output shape unknown: {stops[node.name]}" + (f"; {note}" if note else "")
        by_default = node.name in enabled if enabled is not None else quantizable and row.quant_by_default
        shapes = [graph.blobs[t].shape for t in node.tops]
        rows.append({
            "name": node.name, "type": node.type, "config_type": kind,
            "bottoms": list(node.layer_param.bottom), "tops": list(node.layer_param.top),
            "top_shapes": [list(s) if s is not None else None for s in shapes],
            "params": _param_count(node, graph), "quantizable": quantizable,
            "quant_kind": row.quant.value if quantizable else None, "by_default": by_default, "note": note,
        })
    return rows


def config_settings(config_file=None, config_defination=None) -> dict:
    """``{"batch_num", "activation_offset", "written": the names of the two the file sets itself,
    "bn_update_iterations": the forwards update_bn asks for (0 without update_bn)}`` of a JSON config
    (``config_file``) or a simple .cfg (``config_defination``); a value the file does not set is its
    default (1, true, the guide's 30 iterations), which applies all the same."""
    if (config_file is None) == (config_defination is None):
        raise AmctError("config_settings: give one of config_file and config_defination")
    names = ("batch_num", "activation_offset")
    with reading(config_file=config_file, config_defination=config_defination):
        if config_file is not None:
            config = read_quant_config(config_file)
            doc = json.loads(read_text(config_file, "quantization config", ConfigError))
            values, written = config, [n for n in names if n in doc]
            iterations = bn_update_settings(config).bn_update_iterations
        else:
            values = parse_simple_cfg(config_defination)
            written = [n for n in names if values.HasField(n)]
            C.in_range(str(config_defination), "batch_num", int(values.batch_num), C.BATCH_NUM)
            bn = values.bn_update_config
            iterations = bn.bn_update_iterations if bn.HasField("bn_update_iterations") else \
                BnUpdateConfig().bn_update_iterations
    return {"batch_num": int(values.batch_num), "activation_offset": bool(values.activation_offset),
            "written": written, "bn_update_iterations": int(iterations) if values.update_bn else 0}
