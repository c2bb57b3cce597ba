"""Which blobs stand for a model's outputs when its FP32 and INT8 versions are compared or distilled.

A detection layer (DetectionOutput) writes a list of boxes whose length depends on the data:
quantization noise that moves one score across the confidence threshold or one overlap across the
NMS threshold changes the list's length, so the FP32 and INT8 lists cannot be compared value by
value, and no gradient crosses the layer. The compare report, the accuracy-based fallback and
label-free QAT therefore use the blobs such an output is computed from (for SSD: the box offsets
and the class scores), which have the same shape in both models:

* an output is *replaced* by the inputs of the layer that writes it when that layer's top shape
  depends on the data (``shape_from_forward``, a layer with bottoms: a detection output, and a Python
  layer, whose code may reshape its tops), when any input has such a
  shape, or (for training, ``trainable``) when the executor has no backward for the layer; the
  replacement repeats until every blob left is kept;
* a blob whose values do not depend on the inputs' values is dropped (PriorBox's priors depend on
  the feature maps' shapes only, ``reads_shapes_only``): it is the same in both models.

Both an SSA graph (:class:`~amct_caffe.ir.Graph`) and a Net built from a file (in-place layers:
a blob's writer is the last layer before the reader that writes it) can be asked.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from amct_caffe import ops
from amct_caffe.ir import Graph
from amct_caffe.runtime.registry import layer_class

_LOG = logging.getLogger(__name__)

# (layer name, type, bottoms, tops) in execution order
LayerView = tuple[str, str, Sequence[str], Sequence[str]]


def graph_layers(graph: Graph) -> list[LayerView]:
    return [(node.name, node.type, node.bottoms, node.tops) for node in graph.nodes]


def net_layers(net) -> list[LayerView]:
    """The layers of an executor Net (pycaffe's ``_layer_names`` / ``bottom_names`` / ``top_names``)."""
    return [(name, layer.type, net.bottom_names[name], net.top_names[name])
            for name, layer in zip(net._layer_names, net.layers, strict=True)]  # noqa: SLF001 - pycaffe's name


class _Writes:
    """For each blob, which layer last wrote it before a given layer, and whether that value depends
    on the inputs' values or has a data-dependent shape."""

    def __init__(self, layers: Sequence[LayerView]):
        self.layers = layers
        self.writers: dict[str, list[int]] = {}
        self.varying: dict[tuple[int, str], bool] = {}
        self.dynamic: dict[tuple[int, str], bool] = {}
        self.after_python: dict[tuple[int, str], str] = {}  # a dynamic value computed from a Python layer's top
        self.dynamic_elsewhere: dict[tuple[int, str], bool] = {}  # dynamic through a layer other than a Python one
        for i, (name, type_name, bottoms, tops) in enumerate(layers):
            cls = layer_class(type_name)
            ins = [self.writer(b, i) for b in bottoms]
            varies = not bottoms or (not cls.reads_shapes_only and any(self.varying.get(k, True) for k in ins))
            dynamic = bool(bottoms) and (cls.shape_from_forward or any(self.dynamic.get(k, False) for k in ins))
            python = name if bottoms and cls.runs_user_code else next(
                (self.after_python[k] for k in ins if k in self.after_python), None)
            other = bool(bottoms) and ((cls.shape_from_forward and not cls.runs_user_code)
                                       or any(self.dynamic_elsewhere.get(k, False) for k in ins))
            for t in tops:
                self.writers.setdefault(t, []).append(i)
                self.varying[(i, t)] = varies
                self.dynamic[(i, t)] = dynamic
                self.dynamic_elsewhere[(i, t)] = other
                if python is not None:
                    self.after_python[(i, t)] = python

    def writer(self, blob: str, before: int) -> tuple[int, str]:
        """(index of the last layer before ``before`` writing ``blob``, blob); index -1 if none."""
        index = max((i for i in self.writers.get(blob, ()) if i < before), default=-1)
        return index, blob


def dynamic_shape_blobs(layers: Sequence[LayerView]) -> dict[str, bool]:
    """Blobs whose final value has a data-dependent shape (a detection list and what is computed from it), each
    with whether that comes through Python layers alone: their code may keep the shapes (a custom activation) or
    not (a proposal list), which only a run tells."""
    writes = _Writes(layers)
    keys = {t: writes.writer(t, len(layers)) for t in writes.writers}
    return {t: not writes.dynamic_elsewhere.get(key, False) for t, key in keys.items()
            if writes.dynamic.get(key, False)}


def stand_in_outputs(layers: Sequence[LayerView], outputs: Sequence[str], *,
                     trainable: bool = False) -> tuple[list[str], dict[str, list[str]]]:
    """(the blobs to compare in place of ``outputs``, in order and without repeats; {output: its
    stand-ins} for each output replaced). See the module doc."""
    writes = _Writes(layers)
    chosen: list[str] = []
    replaced: dict[str, list[str]] = {}

    def visit(key: tuple[int, str], into: list[str], output: bool, crossed: list[str]) -> None:
        index, blob = key
        if not writes.varying.get(key, True):
            return
        if index >= 0:
            _, type_name, bottoms, _ = writes.layers[index]
            if not bottoms and not output:
                return  # an input the replaced layer reads (an image-info blob): the same in both models
            if writes.dynamic[key] or (trainable and bottoms and not layer_class(type_name).has_backward()):
                crossed.append(type_name)
                for b in bottoms:
                    visit(writes.writer(b, index), into, False, crossed)
                return
        if blob not in into:
            into.append(blob)

    for out in outputs:
        mine: list[str] = []
        crossed: list[str] = []  # the types of the layers between the output and what stands for it
        key = writes.writer(out, len(layers))
        visit(key, mine, True, crossed)
        if mine != [out]:
            replaced[out] = mine
            python = writes.after_python.get(key)
            if python is not None and any(ops.layer_type(t).quantizable for t in crossed):
                _LOG.warning("output '%s' is computed after Python layer '%s', whose code may change its tops' shape "
                             "with the data: %s stand(s) for it, so the quantized layers in between count in no output "
                             "figure (the report's worst output, the fallback's target, label-free QAT's loss); "
                             "calibrate_with_fallback's compare_blobs can name blobs of fixed shape instead",
                             out, python, ", ".join(mine) or "nothing")
            if mine:
                _LOG.info("output '%s' is compared through %s (its shape may depend on the data%s)", out, mine,
                          " or it has no gradient" if trainable else "")
            else:
                _LOG.info("output '%s' does not depend on the inputs' values: it is not compared", out)
        chosen.extend(b for b in mine if b not in chosen)
    return chosen, replaced
