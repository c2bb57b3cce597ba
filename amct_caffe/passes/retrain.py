"""The retrain (quantization-aware training) model: insert, and later strip, the retrain layers.

:func:`insert_retrain_layers` is create_quant_retrain_model's pass. For every retrained layer
``L`` (Convolution, DepthwiseConv, Deconvolution, InnerProduct) reading blob ``x``::

    x -> RetrainDataQuant  (L_data_quant)    -> L_data_quant
      -> RetrainWeightQuant (L_weight_quant) -> L_weight_quant -> L

* ``RetrainDataQuant`` fake-quantizes ``x`` with ULQ on ``[clip_min, clip_max]``, its two learned
  blobs (shape (1,) each). Their start values are the config's, or IFMR's on the first batch
  (``ifmr_init``; the blobs then hold the parameter's clip_max / clip_min, which is how the layer
  knows they were never trained). ``fixed_min`` holds clip_min at 0: the config's value, else
  true exactly when ``x`` comes from a ReLU (the guide: the tool decides from the graph). In the
  TEST phase it writes scale_d / offset_d of ``L`` (``object_layer``) into ``record_file_path``.
  The clips get ``decay_mult: 0``: weight decay would pull the range towards 0, which is no
  regularisation of the model.
* ``RetrainWeightQuant`` holds ``L``'s weight twice: blob 1 is the float weight the solver trains
  (it takes ``L``'s own ParamSpec for the weight, lr_mult and decay_mult), blob 0 its ARQ
  fake-quantization, recomputed every forward and shared with ``L`` through a ParamSpec name
  (``L_retrain_weight``). The owner (this layer) gives it lr_mult 0 and decay_mult 0, so no solver
  moves it; ``L`` names it only: Caffe takes ``L``'s weight gradient from ``L``'s own ParamSpec
  (an unset lr_mult is 1), so ``L`` still computes the gradient this layer hands to blob 1 (an
  lr_mult 0 there would train the clips only), and Caffe checks two lr_mults only when both are
  set. Its top is its bottom's data, so ``L`` computes on the fake-quantized input and weight.

Inserted layers copy ``L``'s ``include`` / ``exclude`` rules, so they exist in exactly ``L``'s
phases. Nothing else changes: BatchNorm layers stay (they are trained; BN fusion happens when the
models are saved), as do the data, loss and accuracy layers of both phases.

The pass takes any graph whose layers are in Caffe order, including the whole TRAIN/TEST model
(:func:`amct_caffe.io.graph_io.layer_graph`, whose blob names are Caffe's and whose two phases
may both write ``data``): it only adds layers in front of ``L`` with fresh blob names and changes
``L``'s bottom. Given an SSA graph it returns one.

:func:`strip_retrain_layers` is the reverse for save_quant_retrain_model: on the retrained
model's TEST-phase graph it removes the pairs, gives ``L`` back its trained float weight and its
ParamSpec, and returns each layer's learned clips.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from amct_caffe.config import RetrainConfig, RetrainDataConfig, RetrainWeightConfig, config_type, follows_relu
from amct_caffe.errors import GraphError, WeightsError
from amct_caffe.io.schema import caffe_pb
from amct_caffe.ir import Graph, Node

_LOG = logging.getLogger(__name__)

DATA_QUANT, WEIGHT_QUANT = "RetrainDataQuant", "RetrainWeightQuant"
# RetrainDataQuantParameter's defaults: with ifmr_init the blobs start at these values.
IFMR_START_MAX, IFMR_START_MIN = 3.0, 0.0


@dataclass(frozen=True)
class RetrainSpec:
    """One retrained layer: its config type, weight shape and settings (``fixed_min`` resolved)."""

    layer: str
    layer_type: str
    weight_shape: tuple[int, ...]
    data: RetrainDataConfig
    weight: RetrainWeightConfig


@dataclass(frozen=True)
class LearnedClips:
    """What training learned for one layer's input: the clip range and its settings."""

    layer: str
    clip_max: float
    clip_min: float
    fixed_min: bool
    num_bits: int
    channel_wise: bool  # the weight layer's setting
    untouched: bool = False  # IFMR was to give the start values, and the blobs still hold the placeholders



def retrain_specs(graph: Graph, config: RetrainConfig) -> list[RetrainSpec]:
    """The specs of ``config``'s enabled layers, from an SSA graph of one phase (model order)."""
    specs = []
    for name in config.retrained_layers():
        node = graph.node(name)
        layer = config.layers[name]
        given = layer.retrain_data_config
        after_relu = follows_relu(graph, node)
        data = given.resolved(after_relu, f"layer '{name}'", warn=False)  # the config's check said it, naming its file
        if given.fixed_min is None:
            _LOG.debug("layer '%s': fixed_min %s (its input %s a ReLU's output)", name, data.fixed_min,
                       "is" if after_relu else "is not")
            if after_relu and given.clip_min is not None:
                _LOG.warning("layer '%s': its input is a ReLU's output, but the config gives clip_min %s, so the "
                             "lower clip starts there and is learned instead of held at 0 (fixed_min true)", name,
                             given.clip_min)
        specs.append(RetrainSpec(name, config_type(node, graph), tuple(node.params[0].shape), data,
                                 layer.retrain_weight_config))
    return specs


def _copy_phase_rules(lp, node: Node) -> None:
    if node.layer_param is not None:
        lp.include.extend(node.layer_param.include)
        lp.exclude.extend(node.layer_param.exclude)


def _data_quant_node(graph: Graph, node: Node, spec: RetrainSpec, record_file: str) -> Node:
    name = graph.unique_node_name(f"{node.name}_data_quant")
    top = graph.unique_blob_name(name)
    lp = caffe_pb().LayerParameter(name=name, type=DATA_QUANT, bottom=[node.bottoms[0]], top=[top])
    _copy_phase_rules(lp, node)
    data = spec.data
    p = lp.retrain_data_quant_param
    p.ifmr_init = data.ifmr_init
    p.clip_max = IFMR_START_MAX if data.ifmr_init else data.clip_max
    p.clip_min = 0.0 if data.fixed_min or data.ifmr_init else data.clip_min
    p.with_offset = True
    p.fixed_min = bool(data.fixed_min)
    p.object_layer = node.name
    p.record_file_path = record_file
    p.num_bits = data.num_bits
    for _ in range(2):
        lp.param.add(lr_mult=1.0, decay_mult=0.0)
    blobs = [np.array([p.clip_max], np.float32), np.array([p.clip_min], np.float32)]
    return Node(name, DATA_QUANT, [node.bottoms[0]], [top], blobs, lp, origin=[])


def _weight_quant_node(graph: Graph, node: Node, bottom: str, spec: RetrainSpec, shared: str) -> Node:
    name = graph.unique_node_name(f"{node.name}_weight_quant")
    top = graph.unique_blob_name(name)
    lp = caffe_pb().LayerParameter(name=name, type=WEIGHT_QUANT, bottom=[bottom], top=[top])
    _copy_phase_rules(lp, node)
    lp.param.add(name=shared, lr_mult=0.0, decay_mult=0.0)
    trained = lp.param.add()
    if node.layer_param is not None and len(node.layer_param.param):
        trained.CopyFrom(node.layer_param.param[0])  # the weight's own learning rate and decay
    p = lp.retrain_weight_quant_param
    shape = spec.weight_shape
    p.cout, p.cin = shape[0], shape[1]
    if len(shape) == 4:
        p.h, p.w = shape[2], shape[3]
    p.channel_wise = spec.weight.channel_wise
    p.layer_type = spec.layer_type
    p.with_offset = False
    p.num_bits = spec.weight.num_bits
    weight = np.asarray(node.params[0], np.float32)
    return Node(name, WEIGHT_QUANT, [bottom], [top], [weight.copy(), weight.copy()], lp, origin=[])


def insert_retrain_layers(graph: Graph, specs: list[RetrainSpec], record_file: str) -> Graph:
    """A copy of ``graph`` with the retrain layers of ``specs`` (module doc); ``record_file`` is
    where their TEST phase writes the activation factors."""
    out = graph.copy()
    for spec in specs:
        found = [n for n in out.nodes if n.name == spec.layer]
        if len(found) != 1:
            raise GraphError(f"layer '{spec.layer}' appears {len(found)} times in the model; a retrained layer "
                             "must appear once (give each phase's copy its own name)")
        node = found[0]
        if tuple(node.params[0].shape) != spec.weight_shape:
            raise WeightsError(f"layer '{spec.layer}': weight shape {list(node.params[0].shape)} differs from "
                               f"{list(spec.weight_shape)}")
        shared = f"{node.name}_retrain_weight"
        data = _data_quant_node(out, node, spec, record_file)
        out.insert(out.index(node), data)
        weight = _weight_quant_node(out, node, data.tops[0], spec, shared)
        out.insert(out.index(node), weight)
        node.bottoms[0] = weight.tops[0]
        lp = node.layer_param
        if not len(lp.param):
            lp.param.add()
        lp.param[0].Clear()
        lp.param[0].name = shared  # no lr_mult: L keeps computing the weight gradient (module doc)
        _LOG.debug("layer '%s': inserted %s and %s", node.name, data.name, weight.name)
    return out


# ------------------------------------------------------------------------------ after training
def _single(blob: np.ndarray, what: str, layer: str) -> float:
    arr = np.asarray(blob, np.float32).reshape(-1)
    if arr.size != 1 or not np.isfinite(arr[0]):
        raise WeightsError(f"layer '{layer}': {what} must be one finite value, got {arr.tolist()[:4]}")
    return float(arr[0])


def strip_retrain_layers(graph: Graph) -> tuple[Graph, list[LearnedClips]]:
    """The float model inside a retrained SSA graph, and the learned clips of each retrained layer.

    For each ``RetrainDataQuant -> RetrainWeightQuant -> L`` chain: ``L`` reads the data layer's
    bottom again, takes the weight layer's blob 1 (the trained float weight) as its weight and the
    weight layer's ParamSpec for it. Retrain layers outside such a chain are an error.
    """
    out = graph.copy()
    learned = []
    for node in list(out.nodes):
        if not node.bottoms:
            continue
        weight = out.producer(node.bottoms[0])
        if weight is None or weight.type != WEIGHT_QUANT:
            continue
        data = out.producer(weight.bottoms[0])
        if data is None or data.type != DATA_QUANT:
            raise GraphError(f"layer '{weight.name}' ({WEIGHT_QUANT}) does not read a {DATA_QUANT} layer's output; "
                             "give the model written by create_quant_retrain_model")
        dp, wp = data.layer_param.retrain_data_quant_param, weight.layer_param.retrain_weight_quant_param
        if dp.object_layer != node.name:
            raise GraphError(f"layer '{data.name}' quantizes the input of '{dp.object_layer}' but feeds "
                             f"'{node.name}'")
        if len(out.consumers(data.tops[0])) != 1 or len(out.consumers(weight.tops[0])) != 1:
            raise GraphError(f"the outputs of '{data.name}' / '{weight.name}' must be read by '{node.name}' only")
        if len(data.params) != 2 or len(weight.params) != 2:
            raise WeightsError(f"layers '{data.name}' and '{weight.name}' need 2 blobs each in the weights file "
                               f"(got {len(data.params)} and {len(weight.params)}): give the caffemodel of the "
                               "retrained model (a solver snapshot)")
        trained = np.asarray(weight.params[1], np.float32)
        if not node.params:
            raise WeightsError(f"layer '{node.name}' is not in the weights file: give the caffemodel of the "
                               "retrained model (a solver snapshot)")
        if trained.shape != tuple(node.params[0].shape):
            raise WeightsError(f"layer '{weight.name}': trained weight shape {list(trained.shape)} does not fit "
                               f"layer '{node.name}'")
        learned.append(LearnedClips(node.name, _single(data.params[0], "clip_max", data.name),
                                    _single(data.params[1], "clip_min", data.name), bool(dp.fixed_min),
                                    int(dp.num_bits), bool(wp.channel_wise),
                                    untouched=bool(dp.ifmr_init) and np.array_equal(
                                        np.ravel(data.params[0]), [IFMR_START_MAX])
                                    and np.array_equal(np.ravel(data.params[1]), [IFMR_START_MIN])))
        node.bottoms[0] = data.bottoms[0]
        node.params = [trained, *node.params[1:]]
        lp = node.layer_param
        lp.param[0].CopyFrom(weight.layer_param.param[1])
        if len(lp.param) == 1 and lp.param[0].ByteSize() == 0:
            del lp.param[:]  # the layer had no ParamSpec before the retrain layers gave it one
        out.remove(weight)
        out.remove(data)
    left = [n.name for n in out.nodes if n.type in (DATA_QUANT, WEIGHT_QUANT)]
    if left:
        raise GraphError(f"retrain layer(s) {left} are not in front of a retrained layer "
                         f"({DATA_QUANT} -> {WEIGHT_QUANT} -> layer)")
    if not learned:
        raise GraphError(f"the model has no retrain layers ({DATA_QUANT}, {WEIGHT_QUANT}): give the model written "
                         "by create_quant_retrain_model, after training")
    out.prune_blobs()
    out.check()
    return out, learned
