"""Blob shapes of an IR graph, inferred and checked by the executor's own layers.

:func:`infer_shapes` fills ``graph.blobs[name].shape`` the way the Net computes shapes when it is
built: each layer's ``reshape`` on its bottoms' shapes, in graph order, from the Input layers'
``input_param``. It is how the IR learns its shapes when a model is loaded, so that passes read a
blob's rank instead of guessing it.

With ``strict`` (loading a model to quantize it) it also refuses, naming the layer, what Caffe
refuses when it builds the net, before anything is written: a wrong number of bottoms or tops, a
weight blob count or shape that does not fit the layer (Caffe's "Incompatible number of blobs"),
missing weights, parameters the layer's Reshape rejects (a kernel larger than the padded input,
group not dividing the channels, stride 0...), negative dimensions, empty tops (a zero output
size, which Caffe cannot run in a freshly built net: see ``blob.check_not_empty_at_build``) and
blobs of more than ``INT_MAX`` elements. Without it, a layer the executor would reject just leaves its tops unknown.

Shapes stay ``None`` after a layer type the executor does not implement and for a layer whose
output size depends on the data (DetectionOutput): those cannot be checked here.
"""

from __future__ import annotations

import logging

import numpy as np

from amct_caffe.errors import AmctError, GraphError, WeightsError
from amct_caffe.io import conform_blob
from amct_caffe.ir import Graph, Node
from amct_caffe import ops
from amct_caffe.ops import has_executor
from amct_caffe.runtime.blob import AS_CAFFE, Blob, check_not_empty_at_build, check_param_shapes, check_top_shape
from amct_caffe.runtime.net import TEST
from amct_caffe.runtime.param_sharing import shares_every_blob
from amct_caffe.runtime.registry import layer_class

_LOG = logging.getLogger(__name__)


def _check_params(node: Node, layer, bottoms, where: str, have_weights: bool, owned: set[str] = frozenset()) -> None:
    """The node's weight blobs against what the layer needs (Caffe's CopyTrainedLayersFrom checks). ``owned``:
    the param names earlier layers own; a layer whose every blob is one of them needs no weights of its own."""
    expected = layer.param_shapes(bottoms) if not node.params else layer.param_shapes_for_weights(bottoms,
                                                                                                 node.params)
    check_param_shapes(where, expected)
    if not node.params:
        specs = node.layer_param.param if node.layer_param is not None else ()
        if expected and have_weights and not shares_every_blob(specs, len(expected), owned):
            raise WeightsError(f"{where}: the caffemodel has no weights for this layer (it needs {len(expected)} "
                               f"blob(s) of shapes {[list(s) for s in expected]}); check that the layer names of "
                               "the prototxt and the caffemodel match")
        return
    if len(node.params) != len(expected):
        raise WeightsError(f"{where}: the caffemodel has {len(node.params)} blob(s), the layer needs "
                           f"{len(expected)} ({[list(s) for s in expected]}); were the model and weights saved "
                           "from the same network?")
    # a legacy blob (4-D num/channels/height/width for a 2-D weight) takes the layer's shape, as Caffe's
    # CopyTrainedLayersFrom reshapes it: the passes after this read the weights with the layer's axes
    node.params = [conform_blob(np.asarray(array), shape, f"{where} blob {i}")
                   for i, (array, shape) in enumerate(zip(node.params, expected, strict=True))]


def static_class(type_name: str) -> type | None:
    """The executor class shape inference outside a Net may build for ``type_name``; None for a type without one,
    or whose code is the user's (a Python layer: only a Net imports its module, layers/python_layer.py)."""
    if not has_executor(type_name):
        return None
    cls = layer_class(type_name)
    return None if cls.runs_user_code else cls


def infer_shapes(graph: Graph, phase: int = TEST, strict: bool = False, have_weights: bool = True,
                 data_sources: bool = False, stops: dict[str, str] | None = None) -> int:
    """Fill (and with ``strict`` check) the shapes of ``graph``'s blobs (module doc).

    ``have_weights``: the graph was loaded with a caffemodel, so a layer that needs weights must have
    them. ``data_sources``: the tops of data layers whose shape comes from their source (Data, ImageData,
    MemoryData: ``shape_from_forward`` without bottoms) get the shapes their first record gives, as Caffe's
    DataLayerSetUp does, where the source can be read; a source that cannot be read (not on this machine)
    leaves them unknown. ``stops``: filled with {layer name: why} for each layer whose input shapes were known
    but whose own parameters refused them (not ``strict``). Returns how many blobs got a shape.
    """
    with np.errstate(**AS_CAFFE):  # computed as the Net's build computes it
        return _infer(graph, phase, strict, have_weights, data_sources, {} if stops is None else stops)


def _infer(graph: Graph, phase: int, strict: bool, have_weights: bool, data_sources: bool,
           stops: dict[str, str]) -> int:
    known = 0
    owned: set[str] = set()  # param names of the layers so far (Caffe's param sharing)
    for node in graph.nodes:
        bottoms = [graph.blobs[b].shape for b in node.bottoms]
        cls = static_class(node.type)
        if any(s is None for s in bottoms) or node.layer_param is None:
            continue
        if cls is None:
            stops[node.name] = (f"layer '{node.name}' ({node.type}): " + (
                "a Python layer's shapes come from its module, which only a Net imports" if node.type == "Python"
                else "the executor does not run this type"))
            continue
        where = f"layer '{node.name}' ({node.type})"
        try:
            cls.check_arity(node.layer_param)
            layer = cls(node.layer_param, phase)
            bottoms = [tuple(s) for s in bottoms]
            if strict:
                _check_params(node, layer, bottoms, where, have_weights, owned)
            owned.update(p.name for p in node.layer_param.param if p.name)
            layer.blobs = [Blob(data=np.asarray(p)) for p in node.params]
            tops = layer.reshape(bottoms)
            tops = [check_top_shape(where, t, s) for t, s in zip(node.tops, tops, strict=False)]
            if strict and node.type != "Input" and not cls.shape_from_forward:
                for t, s in zip(node.layer_param.top, tops, strict=False):  # the model's names, not SSA's
                    check_not_empty_at_build(where, t, s)
        except AmctError as e:
            if strict:
                raise
            _LOG.debug("shape inference stops at %s: %s", where, e)
            stops[node.name] = str(e)
            continue
        except (ValueError, IndexError, ZeroDivisionError, OverflowError, MemoryError) as e:
            why = f"{where}: {e} (its parameters do not fit its input shapes {[list(s) for s in bottoms]})"
            if strict:
                raise GraphError(why) from None
            _LOG.debug("shape inference stops at %s", why)
            stops[node.name] = why
            continue
        if cls.shape_from_forward and not (data_sources and not node.bottoms):
            continue
        for top, shape in zip(node.tops, tops, strict=False):
            graph.blobs[top].shape = shape
            known += 1
    return known


def _blob_count(cls, node: Node, graph: Graph, phase: int, unknown: int) -> int:
    """How many learned blobs ``node``'s layer (executor class ``cls``) has for its bottoms' shapes: ``unknown``
    where a bottom's shape is unknown, 0 where the layer's own parameters are wrong (the net's build says what)."""
    bottoms = [graph.blobs[b].shape for b in node.bottoms]
    if any(s is None for s in bottoms):
        return unknown
    try:
        return len(cls(node.layer_param, phase).param_shapes([tuple(s) for s in bottoms]))
    except (AmctError, ValueError):
        return 0


def layers_without_weights(graph: Graph, phase: int = TEST) -> list[str]:
    """The layers of ``graph`` with learned blobs by their type for which the graph holds no weights and which
    share none by param name (:func:`~.param_sharing.shares_every_blob`): a Net built from it would refuse them.
    (Where a layer's bottom shapes are unknown, Caffe's weighted types count.)"""
    missing = []
    owned: set[str] = set()  # param names of the layers so far, as in _infer
    for node in graph.nodes:
        cls = static_class(node.type)
        specs = node.layer_param.param if node.layer_param is not None else ()
        if node.params or node.layer_param is None or cls is None:
            owned.update(p.name for p in specs if p.name)
            continue
        count = _blob_count(cls, node, graph, phase, unknown=1 if ops.layer_type(node.type).weighted else 0)
        if count and not shares_every_blob(specs, count, owned):
            missing.append(node.name)
    return missing


def fill_shared_weights(graph: Graph, phase: int = TEST) -> list[str]:
    """Give each layer whose caffemodel holds no blobs, and which names an earlier layer's params for every blob
    it has (:func:`~.param_sharing.shares_every_blob`), copies of that owner's blobs, as Caffe's Net holds them:
    every node of the graph then carries its own weights (a pass may then quantize one sharer and not the
    other). The count is the layer's own (a sharer without a bias takes only the weight). Returns the layers
    filled."""
    owners: dict[str, np.ndarray] = {}  # param name -> the blob of the first layer that holds it
    filled = []
    for node in graph.nodes:
        specs = list(node.layer_param.param) if node.layer_param is not None else []
        cls = static_class(node.type)
        if not node.params and specs and cls is not None:
            count = _blob_count(cls, node, graph, phase, unknown=0)
            if count and shares_every_blob(specs, count, owners):
                node.params = [owners[spec.name].copy() for spec in specs[:count]]
                filled.append(node.name)
        for spec, array in zip(specs, node.params, strict=False):
            if spec.name:
                owners.setdefault(spec.name, array)
    return filled


def _bottom_from_weights(node: Node) -> tuple[int, ...] | None:
    """A bottom shape that a Convolution, Deconvolution or InnerProduct (on its default axis 1) with
    ``node``'s caffemodel weights would take, for checking what the prototxt alone fixes (num_output,
    kernel, group) where the real bottom's shape is unknown (a data source not on this machine)."""
    lp, weight = node.layer_param, np.asarray(node.params[0])
    if node.type in ("Convolution", "Deconvolution") and lp.convolution_param.axis == 1 and weight.ndim >= 3:
        group = max(int(lp.convolution_param.group), 1)
        channels = weight.shape[0] if node.type == "Deconvolution" else weight.shape[1] * group
        return (1, int(channels)) + (64,) * (weight.ndim - 2)
    if node.type == "InnerProduct" and lp.inner_product_param.axis == 1 and weight.ndim == 2:
        return (1, int(weight.shape[0] if lp.inner_product_param.transpose else weight.shape[1]))
    return None


def check_weights_fit(graph: Graph, phase: int = TEST) -> None:
    """A WeightsError naming the layer when its caffemodel blobs do not fit the shapes of its bottoms, for
    every layer whose bottom shapes are known (Caffe's CopyTrainedLayersFrom check); where they are not, a
    Convolution's, Deconvolution's or InnerProduct's blobs are still checked against what its own parameters
    fix (the channels they read are taken from the weights)."""
    for node in graph.nodes:
        cls = static_class(node.type)
        if not node.params or node.layer_param is None or cls is None:
            continue
        bottoms = [graph.blobs[b].shape for b in node.bottoms]
        if any(s is None for s in bottoms):
            guessed = _bottom_from_weights(node) if len(bottoms) == 1 else None
            if guessed is None:
                continue
            bottoms = [guessed]
        try:
            layer = cls(node.layer_param, phase)
        except AmctError:
            continue  # the net's build says what is wrong with the layer itself
        _check_params(node, layer, [tuple(s) for s in bottoms], f"layer '{node.name}' ({node.type})", False)

