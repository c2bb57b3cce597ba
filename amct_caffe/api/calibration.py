"""Post-training quantization, the guide's 训练后量化 interfaces.

create_quant_config -> init -> weights_quantize_model -> activation_quantize_model -> (run the
calibration model batch_num times) -> save_model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np

from amct_caffe import io, log
from amct_caffe.api.outputs import StagedOutputs, write_model_files
from amct_caffe.config import BnUpdateConfig, config_type, create_default_config, load_config, write_quant_config
from amct_caffe.errors import AmctError, ConfigError
from amct_caffe.io.graph_io import graph_from_net, graph_to_net
from amct_caffe.io.schema import caffe_pb
from amct_caffe.ir import Graph, Node
from amct_caffe.passes.bn_acceleration import accelerate_bn_scale_bias
from amct_caffe.passes.calibration import ActivationSpec, insert_calibration_layers
from amct_caffe.passes.fusion import apply_fusion, check_fusions, find_fusions, fuse_bn_scale
from amct_caffe.passes.quantized_models import (DEPLOY, FAKE, INSERTED_TYPES, WEIGHT_TYPES, QuantTarget,
                                                build_quantized_graph, canonical_record, quant_mapping)
from amct_caffe.quant.arq import arq_quantize_weight
from amct_caffe.quant.snq import snq_quantize_weight
from amct_caffe.record import layer_entry, new_record, read_record, write_record
from amct_caffe.runtime.layers.amct import bn_dump_path
from amct_caffe.runtime.registry import DATA_ONLY, WEIGHTS_AND_DATA, type_info

_LOG = logging.getLogger(__name__)
SAVE_TYPES = ("Fakequant", "Deploy", "Both")


@dataclass
class QuantGraph:
    """The ``graph`` init returns: the model's IR plus what the later steps need.

    ``graph`` is the working graph (fused, then with fake-quantized weights); ``float_graph`` the
    fused graph with float weights, from which the saved models are built.
    """

    graph: Graph
    config: object
    record_file: str
    model_file: str
    original_names: set[str]
    float_graph: Graph | None = None
    targets: list[QuantTarget] = field(default_factory=list)
    unfused: set[str] = field(default_factory=set)  # layers BN fusion could have folded into, kept apart
    # update_bn: quantized layer -> the BatchNorm [, Scale] [, Bias] chain left unfused until save_model,
    # so that the BatchNorm statistics can be refreshed behind the quantized weights.
    bn_kept: dict[str, list[str]] = field(default_factory=dict)
    stage: str = "init"

    @property
    def name(self) -> str:
        return self.graph.name


def load_float_graph(model_file, weights_file) -> Graph:
    """The model as an SSA graph; refuses models that are already quantized."""
    net, weights = io.load_model(model_file, weights_file)
    graph = graph_from_net(net, weights)
    for node in graph.nodes:
        if node.type in INSERTED_TYPES:
            raise AmctError(f"{model_file}: layer '{node.name}' is a {node.type} layer: the model is already "
                            "quantized; give the original float model")
        if any(np.issubdtype(p.dtype, np.integer) for p in node.params):
            raise AmctError(f"{weights_file}: layer '{node.name}' has integer weights: the model is already "
                            "quantized; give the original float model")
    return graph


def create_quant_config(config_file, model_file, weights_file, batch_num=1, activation_offset=True,
                        config_defination=None) -> None:
    """Write the full quantization config (JSON) of every quantizable layer of the model."""
    log.setup()
    graph = load_float_graph(model_file, weights_file)
    config = create_default_config(graph, batch_num, activation_offset, config_defination)
    write_quant_config(config, config_file)
    _LOG.info("quantization config of %d layer(s) written to %s", len(config.quantized_layers()), config_file)


def init(config_file, model_file, weights_file, scale_offset_record_file) -> QuantGraph:
    """Parse the model and config, and create (or empty) the record file."""
    log.setup()
    graph = load_float_graph(model_file, weights_file)
    config = load_config(config_file, graph)
    write_record(new_record(), scale_offset_record_file)
    _LOG.info("init: model %s, %d layer(s) to quantize, record %s", model_file, len(config.quantized_layers()),
              scale_offset_record_file)
    return QuantGraph(graph, config, os.path.abspath(scale_offset_record_file), str(model_file),
                      {n.name for n in graph.nodes})


def _check_graph(graph) -> QuantGraph:
    if not isinstance(graph, QuantGraph):
        raise AmctError(f"expected the graph returned by amct_caffe.init(), got {type(graph).__name__}")
    return graph


def quant_targets(graph: Graph, enabled: list[str]) -> list[QuantTarget]:
    """The enabled layers present in ``graph`` (fusion may have absorbed some), in graph order."""
    wanted = set(enabled)
    targets = []
    for node in graph.nodes:
        if node.name not in wanted:
            continue
        targets.append(quant_target(node, graph))
    gone = wanted - {t.name for t in targets}
    if gone:
        _LOG.info("layers %s were fused into other layers; their own quantization settings do not apply",
                  sorted(gone))
    return targets


def quant_target(node, graph: Graph, inputs: tuple[int, ...] | None = None) -> QuantTarget:
    """What quantizing ``node`` means: its weights (if any) and which inputs.

    ``inputs`` narrows a data-only layer's quantized inputs (convert_model: those the record
    gives); by default they are the type's activation inputs (all but ROI boxes, shape references...).
    """
    info = type_info(node.type)
    kind = info.quant if info is not None else None
    if node.type in WEIGHT_TYPES and node.params:
        if len(node.bottoms) != 1 or len(node.tops) != 1:
            raise ConfigError(f"layer '{node.name}' ({node.type}) has {len(node.bottoms)} inputs and "
                              f"{len(node.tops)} outputs sharing its weights; only single-input layers can be "
                              "quantized: set its quant_enable to false")
        return QuantTarget(node.name, (0,), True, config_type(node, graph))
    if kind == DATA_ONLY or (kind == WEIGHTS_AND_DATA and not node.params):
        allowed = info.quant_inputs if info.quant_inputs is not None else tuple(range(len(node.bottoms)))
        allowed = tuple(i for i in allowed if i < len(node.bottoms))
        if inputs is not None:
            bad = [i for i in inputs if i not in allowed]
            if bad:
                raise ConfigError(f"layer '{node.name}' ({node.type}): input(s) {bad} carry no activations to "
                                  f"quantize (quantizable inputs: {list(allowed)})")
            allowed = inputs
        return QuantTarget(node.name, tuple(allowed), False, config_type(node, graph))
    raise ConfigError(f"layer '{node.name}' ({node.type}) cannot be quantized")


def _fuse(qg: QuantGraph) -> None:
    config = qg.config
    fusions = find_fusions(qg.graph)
    candidates = {f.target.name for f in fusions}
    qg.unfused = candidates if not config.do_fusion else candidates & set(config.skip_fusion_layers)
    skip = list(config.skip_fusion_layers)
    if config.update_bn and config.do_fusion:
        # Quantized layers keep their BatchNorm chain until save_model (update_bn): the calibration
        # model runs conv(quantized weights) -> BatchNorm -> Scale and refreshes the statistics.
        quantized = set(config.quantized_layers())
        qg.bn_kept = {f.target.name: [n.name for n in f.folded] for f in fusions
                      if f.target.name in quantized and f.target.name not in qg.unfused
                      and f.target.type in WEIGHT_TYPES}
        skip += sorted(qg.bn_kept)
    fuse_bn_scale(qg.graph, config.do_fusion, skip)
    # The kept chain's layers are fused at save_model: their own quantization settings do not apply.
    kept = {name for chain in qg.bn_kept.values() for name in chain}
    enabled = [name for name in config.quantized_layers() if name not in kept]
    accelerate_bn_scale_bias(qg.graph, set(enabled))
    qg.float_graph = qg.graph.copy()
    qg.targets = quant_targets(qg.graph, enabled)


def _write_graph(graph: Graph, model_file, weights_file) -> None:
    net, weights = graph_to_net(graph)
    outputs = StagedOutputs()
    write_model_files(outputs, net, weights, model_file, weights_file)
    outputs.commit()


def _arq_settings(qg: QuantGraph, node, target: QuantTarget) -> tuple[str, bool, int]:
    """(layer_type, channel_wise, group) of the ARQ quantization of ``node``'s weights."""
    params = qg.config.layers[target.name].weight_quant_params if target.name in qg.config.layers else None
    group = int(node.layer_param.convolution_param.group) if node.type == "Deconvolution" else 1
    layer_type = target.layer_type if node.type == "Convolution" else node.type
    channel_wise = bool(getattr(params, "channel_wise", node.type != "InnerProduct"))
    return layer_type, channel_wise, group


def _record_weights(record, name: str, arq) -> None:
    entry = layer_entry(record, name, create=True)
    del entry.scale_w[:]
    del entry.offset_w[:]
    entry.scale_w.extend(arq.scale.tolist())
    entry.offset_w.extend(arq.offset.tolist())
    entry.num_bits_w = 8


def weights_quantize_model(graph, modified_model_file, modified_weights_file) -> None:
    """Fuse BN/Scale/Bias, quantize the weights of the enabled layers (ARQ or SNQ), record scale_w."""
    qg = _check_graph(graph)
    log.setup()
    if qg.stage != "init":
        raise AmctError("weights_quantize_model: call it once, right after init()")
    _fuse(qg)
    if qg.config.update_bn:
        _LOG.info("update_bn: BatchNorm layer(s) %s stay unfused until save_model; their statistics are "
                  "refreshed by the calibration model", [chain[0] for chain in qg.bn_kept.values()])
    record = read_record(qg.record_file)
    # The record says which layers stayed unfused, so convert_model rebuilds the same graph from it.
    for name in sorted(qg.unfused):
        layer_entry(record, name, create=True).skip_fusion = True
    for target in qg.targets:
        if not target.weighted:
            continue
        node = qg.graph.node(target.name)
        params = qg.config.layers[target.name].weight_quant_params if target.name in qg.config.layers else None
        layer_type, channel_wise, group = _arq_settings(qg, node, target)
        weight = node.params[0]
        if params is not None and params.wts_algo == "snq_quantize":
            snq = snq_quantize_weight(weight, channel_wise, params.num_bits, params.max_iteration,
                                      params.min_distance, params.init_algo, layer_type=layer_type)
            # The 16 cluster centres per channel become the layer's weights; they are then stored
            # on the uniform int8 grid (at most 16 distinct codes per channel).
            weight = snq.fake
            qg.float_graph.node(target.name).params[0] = weight
        arq = arq_quantize_weight(weight, layer_type, channel_wise, 8, group)
        _record_weights(record, target.name, arq)
        node.params = [arq.fake, *node.params[1:]]
        _LOG.debug("weights of '%s' quantized (%s, %d scale(s))", target.name,
                   "snq" if params is not None and params.wts_algo == "snq_quantize" else "arq", arq.scale.size)
    write_record(record, qg.record_file)
    _write_graph(qg.graph, modified_model_file, modified_weights_file)
    qg.stage = "weights"
    _LOG.info("weights of %d layer(s) quantized; model written to %s", sum(t.weighted for t in qg.targets),
              modified_model_file)


def activation_quantize_model(graph, modified_model_file, modified_weights_file) -> None:
    """Write the calibration model: IFMR layers observing every quantized input."""
    qg = _check_graph(graph)
    log.setup()
    if qg.stage not in ("weights", "activations"):
        raise AmctError("activation_quantize_model: call weights_quantize_model first")
    config = qg.config
    specs = []
    for target in qg.targets:
        act = config.layers[target.name].activation_quant_params if target.name in config.layers else None
        if act is None:
            raise ConfigError(f"layer '{target.name}' has no activation_quant_params")
        with_offset = config.with_offset(target.name) if target.name in config.layers else config.activation_offset
        specs.extend(ActivationSpec(target.name, i, act.num_bits, with_offset, act.max_percentile,
                                    act.min_percentile, tuple(act.search_range), act.search_step)
                     for i in target.inputs)
    calib = qg.graph.copy()
    insert_calibration_layers(calib, specs, qg.record_file, config.batch_num)
    _insert_bn_update_layers(qg, calib)
    _write_graph(calib, modified_model_file, modified_weights_file)
    qg.stage = "activations"
    _LOG.info("calibration model written to %s: run it %d time(s), then call save_model", modified_model_file,
              calibration_forwards(qg))


def calibration_forwards(graph) -> int:
    """How many times the calibration model must run: batch_num, or bn_update_iterations if larger
    (update_bn with BatchNorm layers to refresh)."""
    qg = _check_graph(graph)
    n = qg.config.batch_num
    if qg.bn_kept:
        n = max(n, _bn_update_settings(qg).bn_update_iterations)
    return n


def _bn_update_settings(qg: QuantGraph) -> BnUpdateConfig:
    return qg.config.bn_update_config or BnUpdateConfig()


def _insert_bn_update_layers(qg: QuantGraph, calib: Graph) -> None:
    """A BNUpdate layer on the input of each kept BatchNorm (update_bn), starting from its blobs."""
    if not qg.bn_kept:
        return
    settings = _bn_update_settings(qg)
    dump_dir = os.path.abspath(settings.bn_dump_dir)
    for chain in qg.bn_kept.values():
        bn = calib.node(chain[0])
        bp = bn.layer_param.batch_norm_param
        # The guide: the BatchNorm's own moving_average_fraction if it sets one, else the config's.
        fraction = bp.moving_average_fraction if bp.HasField("moving_average_fraction") \
            else settings.bn_moving_average_fraction
        stale = bn_dump_path(dump_dir, bn.name)
        if stale.exists():  # a dump of an earlier run must not be taken for this one's
            stale.unlink()
        lp = caffe_pb().LayerParameter()
        name = calib.unique_node_name(f"{bn.name}_bn_update")
        lp.name, lp.type = name, "BNUpdate"
        lp.bottom.append(bn.bottoms[0])
        p = lp.bn_update_param
        p.bn_layer, p.iterations = bn.name, settings.bn_update_iterations
        p.moving_average_fraction, p.dump_dir = fraction, dump_dir
        params = [np.array(a, dtype=np.float32, copy=True) for a in bn.params[:3]]
        calib.insert(calib.index(bn), Node(name, "BNUpdate", [bn.bottoms[0]], [], params, lp, origin=[]))
        _LOG.debug("inserted BNUpdate '%s' for BatchNorm '%s'", name, bn.name)
    calib.check()


def _refreshed_float_graph(qg: QuantGraph, record) -> Graph:
    """update_bn: the float graph with the refreshed BatchNorm statistics fused into the kept
    layers, whose weights are quantized again (ARQ) into ``record``'s scale_w / offset_w."""
    settings = _bn_update_settings(qg)
    dump_dir = os.path.abspath(settings.bn_dump_dir)
    g = qg.float_graph.copy()
    for chain in qg.bn_kept.values():
        bn = g.node(chain[0])
        path = bn_dump_path(dump_dir, bn.name)
        if not path.is_file():
            raise AmctError(f"update_bn: no refreshed statistics of BatchNorm layer '{bn.name}' ({path}): run "
                            f"the calibration model bn_update_iterations ({settings.bn_update_iterations}) "
                            "times before save_model")
        with np.load(path) as z:
            mean, var = np.asarray(z["mean"], np.float32), np.asarray(z["var"], np.float32)
        channels = bn.params[0].size
        if mean.shape != (channels,) or var.shape != (channels,):
            raise AmctError(f"update_bn: {path} holds {mean.size} mean / {var.size} var value(s); BatchNorm "
                            f"'{bn.name}' has {channels} channels")
        bn.params = [mean.reshape(bn.params[0].shape), var.reshape(bn.params[1].shape),
                     np.ones_like(bn.params[2], dtype=np.float32), *bn.params[3:]]
        _LOG.info("update_bn: BatchNorm '%s' uses the statistics of %s", bn.name, path)
    fusions = [f for f in find_fusions(g) if f.target.name in qg.bn_kept]
    for f in fusions:
        if [n.name for n in f.folded] != qg.bn_kept[f.target.name]:
            raise AmctError(f"update_bn: layer '{f.target.name}' would now fuse {[n.name for n in f.folded]}, "
                            f"not {qg.bn_kept[f.target.name]}")
    if {f.target.name for f in fusions} != set(qg.bn_kept):
        raise AmctError(f"update_bn: cannot fuse the BatchNorm chains of {sorted(qg.bn_kept)} any more")
    check_fusions(g, fusions)
    for f in fusions:
        apply_fusion(g, f)
    g.prune_blobs()
    g.check()
    for target in qg.targets:
        if target.name not in qg.bn_kept:
            continue
        node = g.node(target.name)
        layer_type, channel_wise, group = _arq_settings(qg, node, target)
        arq = arq_quantize_weight(node.params[0], layer_type, channel_wise, 8, group)
        _record_weights(record, target.name, arq)
    write_record(record, qg.record_file)
    return g


def save_quantized(float_graph: Graph, targets: list[QuantTarget], record, save_type: str, save_path,
                   original_names: set[str]) -> dict[str, str]:
    """Write the fake-quant and/or deploy model, quant.json and quant_param_record files."""
    if save_type not in SAVE_TYPES:
        raise AmctError(f"save_type must be one of {', '.join(SAVE_TYPES)}, got {save_type!r}")
    save_path = str(save_path)
    if not os.path.basename(save_path):
        raise AmctError(f"save_path {save_path!r} must end with a model name prefix, e.g. ./results/model")
    outputs = StagedOutputs()
    paths = {}
    mapping_graph = None
    for kind, wanted in ((FAKE, ("Fakequant", "Both")), (DEPLOY, ("Deploy", "Both"))):
        if save_type not in wanted:
            continue
        quantized = build_quantized_graph(float_graph, targets, record, kind)
        mapping_graph = mapping_graph or quantized
        net, weights = graph_to_net(quantized)
        model, weights_path = f"{save_path}_{kind}_model.prototxt", f"{save_path}_{kind}_weights.caffemodel"
        write_model_files(outputs, net, weights, model, weights_path)
        paths[f"{kind}_model"], paths[f"{kind}_weights"] = model, weights_path
    final_record = canonical_record(float_graph, targets, record)
    paths["quant_json"] = outputs.add_json(f"{save_path}_quant.json", quant_mapping(original_names, mapping_graph))
    # The record of the saved model, as text and as binary protobuf, for the SoC compiler.
    paths["quant_param_record_txt"] = outputs.add_message_text(f"{save_path}_quant_param_record.txt", final_record)
    paths["quant_param_record_bin"] = outputs.add_bytes(f"{save_path}_quant_param_record.bin",
                                                        final_record.SerializeToString())
    outputs.commit()
    for kind, path in paths.items():
        _LOG.info("saved %s: %s", kind, path)
    return paths


def save_model(graph, save_type, save_path) -> dict[str, str]:
    """Save the fake-quant model (runs in Caffe) and/or the deploy model (for the SoC compiler)."""
    qg = _check_graph(graph)
    log.setup()
    if qg.stage != "activations":
        raise AmctError("save_model: call activation_quantize_model and run the calibration model first")
    record = read_record(qg.record_file)
    float_graph = _refreshed_float_graph(qg, record) if qg.bn_kept else qg.float_graph
    return save_quantized(float_graph, qg.targets, record, save_type, save_path, qg.original_names)
