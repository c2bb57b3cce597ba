"""Writing models and the saved quantized models (save_model, convert_model).

Graphs are written through :class:`~amct_caffe.io.outputs.StagedOutputs`: all files of a call, or
none of them.
"""

from __future__ import annotations

import logging
import os

from amct_caffe import ops
from amct_caffe.errors import AmctError
from amct_caffe.io.caffemodel_bytes import caffemodel_chunks
from amct_caffe.io.graph_io import graph_to_net
from amct_caffe.io.outputs import StagedOutputs
from amct_caffe.io.paths import check_output, checked_path
from amct_caffe.io.record import Record, record_bytes, record_text
from amct_caffe.ir import Graph
from amct_caffe.passes.quantized_models import (DEPLOY, FAKE, QuantTarget, build_quantized_graph, canonical_record,
                                                quant_mapping)

_LOG = logging.getLogger(__name__)
SAVE_TYPES = ("Fakequant", "Deploy", "Both")


def stage_graph(outputs: StagedOutputs, graph: Graph, model_file, weights_file, in_place: bool = False) -> None:
    """Stage a prototxt (no blobs) and a caffemodel (with the weights) of ``graph``
    (``in_place``: see :func:`~amct_caffe.io.graph_io.graph_to_net`)."""
    net, weights = graph_to_net(graph, in_place)
    outputs.add_message_text(model_file, net)
    # a layer with parameters and no weights (one the source caffemodel lacks) is not named, as Caffe leaves it
    unweighted = {node.name for node in graph.nodes if not node.params and _has_parameters(node.type)}
    outputs.add_chunks(weights_file, caffemodel_chunks(net, weights, unweighted))  # views of the graph's weights


def _has_parameters(type_name: str) -> bool:
    """Whether the executor's layer of ``type_name`` declares learned blobs (Convolution, BatchNorm, Scale...)."""
    from amct_caffe.runtime import registry  # noqa: F401 - registers the executor's layer classes
    from amct_caffe.runtime.layer import Layer

    return ops.has_executor(type_name) and ops.executor_class(type_name).param_shapes is not Layer.param_shapes


def write_graph(graph: Graph, model_file, weights_file, in_place: bool = False, meanwhile=None):
    """Write ``graph`` as a prototxt and a caffemodel (both or neither); returns ``meanwhile()``, called
    while they are written (on a worker thread)."""
    with StagedOutputs(ahead=meanwhile is not None) as outputs:
        stage_graph(outputs, graph, model_file, weights_file, in_place)
        result = meanwhile() if meanwhile is not None else None
        outputs.commit()
    return result


def check_save_path(save_path) -> str:
    """``save_path`` as a string, refused (None, a number, an empty or NUL-holding string, a
    directory without a model name prefix) before any work that would be lost."""
    checked_path(save_path, "save_path")
    save_path = os.fsdecode(os.fspath(save_path))
    if not os.path.basename(save_path):
        raise AmctError(f"save_path {save_path!r} must end with a model name prefix, e.g. ./results/model")
    return save_path


# The files save_quantized writes for save_type "Both", after the prefix
SAVED_SUFFIXES = ("_fake_quant_model.prototxt", "_fake_quant_weights.caffemodel", "_deploy_model.prototxt",
                  "_deploy_weights.caffemodel", "_quant.json", "_quant_param_record.txt", "_quant_param_record.bin")


def check_saved_outputs(save_path) -> str:
    """``save_path`` checked as :func:`check_save_path` does, and each file save_quantized would write there
    against the files the current call reads (io/paths.py): a collision is refused before the work, not after
    it. Returns ``save_path`` as a string."""
    save_path = check_save_path(save_path)
    for suffix in SAVED_SUFFIXES:
        check_output(f"{save_path}{suffix}")
    return save_path


def save_quantized(float_graph: Graph, targets: list[QuantTarget], record: Record, save_type: str, save_path,
                   original_names: set[str], extra_files: dict[str, tuple[str, bytes]] | None = None) -> dict[str, str]:
    """Write the fake-quant and/or deploy model, quant.json and quant_param_record files.

    ``extra_files``: {kind: (path, bytes)} written together with them (all or nothing).
    """
    if save_type not in SAVE_TYPES:
        raise AmctError(f"save_type must be one of {', '.join(SAVE_TYPES)}, got {save_type!r}")
    save_path = check_save_path(save_path)
    with StagedOutputs(ahead=True) as outputs:  # the fake-quant model is written while the deploy model is built
        return _stage_quantized(outputs, float_graph, targets, record, save_type, save_path, original_names,
                                extra_files)


def _stage_quantized(outputs: StagedOutputs, float_graph: Graph, targets: list[QuantTarget], record: Record,
                     save_type: str, save_path: str, original_names: set[str],
                     extra_files: dict[str, tuple[str, bytes]] | None) -> dict[str, str]:
    paths = {}
    if not targets:
        _LOG.warning("no layer is quantized (the config enables none): the models saved to %s compute the float "
                     "model", save_path)
    mapping_graph = None
    codes: dict = {}  # each weight quantized once for both models
    for kind, wanted in ((FAKE, ("Fakequant", "Both")), (DEPLOY, ("Deploy", "Both"))):
        if save_type not in wanted:
            continue
        quantized = build_quantized_graph(float_graph, targets, record, kind, codes)
        mapping_graph = mapping_graph or quantized
        model, weights_path = f"{save_path}_{kind}_model.prototxt", f"{save_path}_{kind}_weights.caffemodel"
        stage_graph(outputs, quantized, model, weights_path)
        paths[f"{kind}_model"], paths[f"{kind}_weights"] = model, weights_path
    final_record = canonical_record(float_graph, targets, record)
    paths["quant_json"] = outputs.add_json(f"{save_path}_quant.json", quant_mapping(original_names, mapping_graph))
    # The record of the saved model, as text and as binary protobuf, for the SoC compiler.
    paths["quant_param_record_txt"] = outputs.add_text(f"{save_path}_quant_param_record.txt",
                                                       record_text(final_record))
    paths["quant_param_record_bin"] = outputs.add_bytes(f"{save_path}_quant_param_record.bin",
                                                        record_bytes(final_record))
    for kind, (path, data) in (extra_files or {}).items():
        paths[kind] = outputs.add_bytes(path, data)
    outputs.commit()
    for kind, path in paths.items():
        _LOG.info("saved %s: %s", kind, path)
    return paths
