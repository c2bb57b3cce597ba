"""Quantization-aware training, the guide's 量化感知训练 interfaces.

create_quant_retrain_config -> create_quant_retrain_model -> (train the modified model in Caffe:
a solver with ``net`` and ``test_initialization: false``) -> save_quant_retrain_model.

* The config (:mod:`amct_caffe.config.retrain_config`) lists every retrainable layer.
* The modified model is the user's TRAIN/TEST prototxt with a RetrainDataQuant and a
  RetrainWeightQuant layer in front of every enabled layer (:mod:`amct_caffe.passes.retrain`);
  its TEST phase writes each layer's scale_d / offset_d into the record file.
* Saving strips those layers from the trained model's TEST phase, folds BatchNorm / Scale into the
  layers before them, and computes the record::

      scale_d, offset_d = ulq_scale_offset(clip_max, clip_min, num_bits)   (clip_min = 0 with fixed_min)
      scale_w, offset_w = ARQ of the final (BN-folded) float weight         (symmetric, offset_w = 0)

  then writes the fake-quant and deploy models through the same code as save_model
  (:func:`amct_caffe.api.outputs.save_quantized`), so an equal record gives equal files.

The learned clips come from the caffemodel, not from the record file the TEST phase wrote: the
snapshot holds the final values. The record file, when given, supplies the activations' shapes
(channels, height, width), stands in for a clip range that ClipCheck would refuse, and receives
the final record.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from amct_caffe import io, log, ops
from amct_caffe.api.outputs import SAVE_TYPES, save_quantized, stage_graph
from amct_caffe.config import (ArqParams, LayerQuantConfig, QuantConfig, bind_retrain_config, create_retrain_config,
                               read_retrain_config, write_retrain_config)
from amct_caffe.config.checks import show
from amct_caffe.errors import AmctError, ConfigError, GraphError, WeightsError
from amct_caffe.io.graph_io import graph_from_net, graph_to_net, layer_graph
from amct_caffe.io.outputs import StagedOutputs
from amct_caffe.io.paths import check_output, checked_path, reading, require
from amct_caffe.io.record import Record, read_record, record_text
from amct_caffe.io.schema import require_amct_messages
from amct_caffe.ir import Graph
from amct_caffe.passes.fusion import find_fusions
from amct_caffe.passes.prepare import prepare
from amct_caffe.passes.quantized_models import canonical_record
from amct_caffe.passes.retrain import (IFMR_START_MAX, IFMR_START_MIN, LearnedClips, insert_retrain_layers,
                                       retrain_specs, strip_retrain_layers)
from amct_caffe.passes.weights import quantize_weights, weights_record
from amct_caffe.quant.ulq import ulq_clip_check, ulq_scale_offset
from amct_caffe.runtime.shapes import check_weights_fit, infer_shapes, layers_without_weights

_LOG = logging.getLogger(__name__)

__all__ = ["create_quant_retrain_config", "create_quant_retrain_model", "save_quant_retrain_model"]


def _test_graph(model_file, weights_file, float_model: bool = True) -> Graph:
    """The model's TEST phase as an SSA graph with its weights, its shapes (the data sources' where they can
    be read) and its weights checked against the shapes known.

    ``float_model``: refuse a model that already has AMCT layers (quantized or retrain ones).
    """
    require_amct_messages("quantization-aware training")
    net, weights = io.load_model(model_file, weights_file)
    graph = graph_from_net(net, weights)
    # (a layer defined once per phase is in both: its TEST copy is trained through its TRAIN one)
    graph.train_layers = frozenset(lp.name for lp in io.load_prototxt(model_file, io.TRAIN).layer)
    names = [lp.name for lp in io.load_prototxt(model_file, filter_layers=False).layer]
    graph.phase_twins = frozenset(n for n in names if names.count(n) > 1)
    if float_model:
        for node in graph.nodes:
            if ops.layer_type(node.type).inserted:
                raise AmctError(f"{model_file}: layer '{node.name}' is a {node.type} layer: give the original float "
                                "model, not one amct_caffe has already modified")
    # not strict: the data sources need not exist here; where they can be read, the weights must fit the
    # shapes they give
    infer_shapes(graph, data_sources=True)
    check_weights_fit(graph)
    if float_model:
        _check_weights_present(graph, model_file, weights_file)
    return graph


def _check_weights_present(graph: Graph, model_file, weights_file) -> None:
    """A caffemodel with weights for none of the model's weighted layers is another model's (or empty):
    refused. Some missing is a warning: Caffe starts those layers from their fillers (a new classifier being
    fine-tuned), and they are not retrained."""
    missing = layers_without_weights(graph)
    if not missing:
        return
    if not any(node.params for node in graph.nodes):
        raise WeightsError(f"{weights_file} holds weights for none of the {len(missing)} weighted layer(s) of "
                           f"{model_file} ({', '.join(repr(n) for n in missing[:5])}"
                           f"{', ...' if len(missing) > 5 else ''}): give the caffemodel trained with this model")
    _LOG.warning("%s holds no weights for layer(s) %s of %s: Caffe starts them from their fillers, and they are "
                 "not retrained", weights_file, ", ".join(f"'{n}'" for n in missing), model_file)


def create_quant_retrain_config(config_file, model_file, weights_file, config_defination=None) -> None:
    """Write the retrain config (JSON) of every retrainable layer of the model.

    ``config_defination``: a retrain .cfg whose entries change the generated ones (see
    :mod:`amct_caffe.config.retrain_config`).
    """
    log.setup()
    require(model_file=model_file, weights_file=weights_file)
    with reading(model_file=model_file, weights_file=weights_file, config_defination=config_defination):
        graph = _test_graph(model_file, weights_file)
        config = create_retrain_config(graph, config_defination, model_file)
        write_retrain_config(config, config_file)
    _LOG.info("retrain config of %d layer(s) written to %s", len(config.retrained_layers()), config_file)


def _check_phases(net, model_file) -> None:
    """Each phase of the modified model must be a valid Caffe net (one producer per blob...)."""
    for phase in (io.TRAIN, io.TEST):
        copy = type(net)()
        copy.CopyFrom(net)
        io.filter_phase(copy, phase)
        try:
            graph_from_net(copy)
        except GraphError as e:
            name = "TRAIN" if phase == io.TRAIN else "TEST"
            raise GraphError(f"{model_file}: the retrain model's {name} phase is not a valid net: {e}") from None


def create_quant_retrain_model(model_file, weights_file, config_file, modified_model_file, modified_weights_file,
                               scale_offset_record_file) -> None:
    """Write the model to train: the user's TRAIN/TEST model with the retrain layers of every layer
    the config enables; the record file is created empty (the TEST phase fills it)."""
    log.setup()
    record_file = os.path.abspath(checked_path(scale_offset_record_file, "scale_offset_record_file"))
    require(model_file=model_file, weights_file=weights_file, config_file=config_file)
    with reading(model_file=model_file, weights_file=weights_file, config_file=config_file):
        graph = _test_graph(model_file, weights_file)
        config = bind_retrain_config(read_retrain_config(config_file), graph, str(config_file))
        specs = retrain_specs(graph, config)
        if not specs:
            raise ConfigError(f"{config_file}: no layer has retrain_enable true; nothing to retrain")
        net = io.load_prototxt(model_file, filter_layers=False)
        weights = io.load_weights(weights_file)
        modified = insert_retrain_layers(layer_graph(net, weights), specs, record_file)
        out_net, _ = graph_to_net(modified)
        _check_phases(out_net, modified_model_file)
        _warn_per_tensor_folds(graph, {s.layer for s in specs if not s.weight.channel_wise})
        outputs = StagedOutputs()
        stage_graph(outputs, modified, modified_model_file, modified_weights_file)
        outputs.add_text(record_file, record_text(Record()))
        outputs.commit()
    _LOG.info("retrain model written to %s (%d layer(s) retrained); train it with test_initialization false, "
              "then call save_quant_retrain_model", modified_model_file, len(specs))


def _warn_per_tensor_folds(graph: Graph, per_tensor: set[str]) -> None:
    """Warn about each layer in ``per_tensor`` (one weight scale) that BatchNorm / Scale fold into at save.

    Training quantizes ``w`` on one grid and the BatchNorm after it scales channel ``c`` by ``k_c``;
    the saved layer holds ``w * k`` quantized on one grid, which is not ``Q(w) * k`` unless every
    ``k_c`` is the same (per channel, a positive ``k_c`` commutes with the quantization)."""
    folds = {f.target.name: [n.name for n in f.folded] for f in find_fusions(graph) if f.target.name in per_tensor}
    for name, folded in sorted(folds.items()):
        _LOG.warning("layer '%s' quantizes its weights on one grid (channel_wise false) and %s fold into it when "
                     "the model is saved: the saved weights are the folded ones quantized again, which are not "
                     "the trained ones where the folded factors differ between channels. Set "
                     "retrain_weight_config.channel_wise true where the layer allows it (Convolution)",
                     name, ", ".join(f"'{n}'" for n in folded))


def _check_config(config_file, learned: list[LearnedClips]) -> None:
    """The retrained model must be the one the config describes."""
    config = read_retrain_config(config_file)
    found = {c.layer: c for c in learned}
    wanted = set(config.retrained_layers())
    missing, extra = sorted(wanted - set(found)), sorted(set(found) - wanted)
    if missing or extra:
        raise ConfigError(f"{config_file}: the retrained model does not match the config: "
                          + "; ".join(f"{what}: {names}" for what, names in (
                              ("enabled in the config but not retrained in the model", missing),
                              ("retrained in the model but not enabled in the config", extra)) if names))
    for name in sorted(wanted):
        entry = config.layers[name]
        data = entry.retrain_data_config
        differing = [("retrain_weight_config.channel_wise", entry.retrain_weight_config.channel_wise,
                      found[name].channel_wise),
                     ("retrain_data_config.num_bits", data.num_bits, found[name].num_bits)]
        if data.fixed_min is not None:  # absent: decided from the graph when the model was made
            differing.append(("retrain_data_config.fixed_min", data.fixed_min, found[name].fixed_min))
        for field, given, trained in differing:
            if given != trained:
                raise ConfigError(f"{config_file}: layer '{name}': {field} {show(given)} differs from the "
                                  f"retrained model's ({show(trained)}): give the config the model was made "
                                  "from")


def _activation_factors(clips: LearnedClips, test_record: Record | None) -> tuple[float, int]:
    """scale_d, offset_d of the learned clip range (the record's, when ClipCheck refuses the range)."""
    clip_min = 0.0 if clips.fixed_min else clips.clip_min
    cmax, cmin, _, _ = ulq_clip_check(clips.clip_max, clip_min, np.nan, np.nan)
    if np.isnan(cmax) or np.isnan(cmin):
        entry = test_record.layer(clips.layer) if test_record is not None else None
        act = entry.activation(0) if entry is not None else None
        if act is None or act.scale_d is None:
            raise AmctError(f"layer '{clips.layer}': the learned clip range [clip_min {clip_min}, clip_max "
                            f"{clips.clip_max}] is not valid (clip_max > clip_min, clip_max >= 0, clip_min <= 0) and "
                            "the record file gives no scale_d for it; pass the record file the TEST phase wrote")
        _LOG.warning("layer '%s': learned clip range [%s, %s] is not valid; using the record file's scale_d %s",
                     clips.layer, clip_min, clips.clip_max, act.scale_d)
        return act.scale_d, act.offset_d or 0
    return ulq_scale_offset(cmax, cmin, clips.num_bits)


def _record(prepared, weights, learned: list[LearnedClips], graph: Graph, test_record: Record | None) -> Record:
    record = weights_record(prepared, weights)
    for clips in learned:
        scale_d, offset_d = _activation_factors(clips, test_record)
        act = record.layer(clips.layer, create=True).activation(0, create=True)
        act.scale_d, act.offset_d, act.num_bits_d = scale_d, int(offset_d), clips.num_bits
        shape = graph.blobs[graph.node(clips.layer).bottoms[0]].shape
        old = test_record.layer(clips.layer) if test_record is not None else None
        old_act = old.activation(0) if old is not None else None
        if shape is not None and len(shape) >= 2:  # the model's own shape, whatever the record file says
            act.channels = int(shape[1])
            act.height = int(shape[2]) if len(shape) > 2 else 1
            act.width = int(shape[3]) if len(shape) > 3 else 1
        elif old_act is not None and old_act.channels is not None:
            act.channels, act.height, act.width = old_act.channels, old_act.height, old_act.width
        if old_act is not None and old_act.scale_d is not None and (old_act.scale_d, old_act.offset_d) != (
                act.scale_d, act.offset_d):
            _LOG.info("layer '%s': scale_d/offset_d from the trained clips (%s, %s) replace the record file's "
                      "(%s, %s)", clips.layer, act.scale_d, act.offset_d, old_act.scale_d, old_act.offset_d)
    return record


def save_quant_retrain_model(retrained_model_file, retrained_weights_file, save_type, save_path,
                             scale_offset_record_file=None, config_file=None) -> dict[str, str]:
    """Save the fake-quant and/or deploy model of a retrained model (its TEST phase).

    Returns the written files by kind, as save_model does.
    """
    log.setup()
    if save_type not in SAVE_TYPES:
        raise AmctError(f"save_type must be one of {', '.join(SAVE_TYPES)}, got {save_type!r}")
    require(retrained_model_file=retrained_model_file, retrained_weights_file=retrained_weights_file)
    inputs = {"retrained_model_file": retrained_model_file, "retrained_weights_file": retrained_weights_file,
              "config_file": config_file}
    if scale_offset_record_file is not None:
        with reading(**inputs):
            check_output(scale_offset_record_file)  # it receives the final record: refuse it early
    with reading(**inputs, scale_offset_record_file=scale_offset_record_file):
        graph = _test_graph(retrained_model_file, retrained_weights_file, float_model=False)
        missing = [name for name in layers_without_weights(graph)  # (the saved models would not load)
                   if name not in graph.train_layers]
        if missing:
            names = ", ".join(map(repr, missing))
            raise WeightsError(f"{retrained_weights_file} holds no weights for layer(s) {names} of the TEST phase; a "
                               "solver snapshot holds the TRAIN net's layers only: give a "
                               "caffemodel of the TEST net (e.g. solver.test_nets[0].save(path)) or of a net holding "
                               "every layer")
        float_graph, learned = strip_retrain_layers(graph)
        for node in float_graph.nodes:
            if ops.layer_type(node.type).inserted:
                raise AmctError(f"{retrained_model_file}: layer '{node.name}' is a {node.type} layer; give the "
                                "retrain model written by create_quant_retrain_model")
        untouched = [c.layer for c in learned if c.untouched]
        if untouched:
            _LOG.warning("%s: the clips of %s still hold the start placeholders [%s, %s] that IFMR replaces on the "
                         "first forward: this looks like the model before training; the saved factors are those "
                         "placeholders. Give the trained caffemodel (e.g. the solver's snapshot)",
                         retrained_weights_file, ", ".join(f"'{n}'" for n in untouched), IFMR_START_MIN,
                         IFMR_START_MAX)
        if config_file is not None:
            _check_config(config_file, learned)
        test_record = None
        if scale_offset_record_file is not None and os.path.exists(scale_offset_record_file):
            test_record = read_record(scale_offset_record_file)
        _warn_per_tensor_folds(float_graph, {c.layer for c in learned if not c.channel_wise})
        config = QuantConfig(layers={c.layer: LayerQuantConfig(weight_quant_params=ArqParams(c.channel_wise))
                                     for c in learned})
        prepared = prepare(float_graph, config)
        weights = quantize_weights(prepared, config)
        record = _record(prepared, weights, learned, float_graph, test_record)
    extra = None
    if scale_offset_record_file is not None:
        final = canonical_record(weights.float_graph, prepared.targets, record)
        extra = {"scale_offset_record_file": (scale_offset_record_file, record_text(final).encode("utf-8"))}
    with reading(**inputs):
        paths = save_quantized(weights.float_graph, prepared.targets, record, save_type, save_path,
                               {n.name for n in float_graph.nodes}, extra)
    _LOG.info("retrained model saved: %d layer(s) quantized", len(prepared.targets))
    return paths
