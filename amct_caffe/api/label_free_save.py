"""Label-free QAT quantizes what PTQ quantizes: the data-only layers, in training and in the saved files.

The guide's retrain model (:mod:`amct_caffe.passes.retrain`) covers the layers with weights. PTQ
(``calibrate``) also quantizes the inputs of the data-only layers its config enables (Pooling,
Eltwise, Concat, Permute, Reshape, Softmax...: a Quant / AntiQuant pair around each), so a
label-free QAT model saved by :func:`~amct_caffe.api.retrain.save_quant_retrain_model` alone
would keep those float and compute something else than the INT8 network it is compared with and
deployed as.

* :func:`with_data_only_quant` puts a RetrainDataQuant in front of every quantized input ``i`` of
  every data-only target ``T`` of the calibration, fixed (``lr_mult`` 0) at PTQ's grid::

      clip_max = scale_d (2^(b-1) - 1 - offset_d),   clip_min = scale_d (-2^(b-1) - offset_d)

  so training, the loss checks and the rounding statistics see the deployed network's numerics.
* :func:`save_trained` removes them again, strips the retrain layers, and writes the files
  ``calibrate`` writes for the calibration's targets, from a copy of PTQ's record in which each
  retrained layer gets ``scale_w`` (ARQ of its trained weight) and ``scale_d`` / ``offset_d`` of
  its learned clips (:func:`amct_caffe.quant.ulq.ulq_scale_offset`; PTQ's when ClipCheck refuses the
  range); the data-only layers keep PTQ's factors, the very ones they trained with.
"""

from __future__ import annotations

import logging

import numpy as np

from amct_caffe.api.outputs import save_quantized
from amct_caffe.errors import AmctError
from amct_caffe.io.record import Record
from amct_caffe.io.schema import caffe_pb
from amct_caffe.ir import Graph, Node
from amct_caffe.passes.prepare import prepare
from amct_caffe.passes.retrain import DATA_QUANT, strip_retrain_layers
from amct_caffe.passes.weights import quantize_weights, record_weight_factors
from amct_caffe.quant.ulq import ulq_clip_check, ulq_scale_offset

_LOG = logging.getLogger(__name__)


def with_data_only_quant(graph: Graph, targets, record: Record) -> tuple[Graph, list[str]]:
    """A copy of ``graph`` with a fixed RetrainDataQuant before each quantized input of the
    data-only ``targets`` (module doc), and the names of the layers inserted."""
    out = graph.copy()
    inserted = []
    taken = {n.name for n in out.nodes}  # the node names, kept up to date as layers go in (a wide Concat)
    for target in targets:
        if target.weighted or target.name not in taken:
            continue
        node = out.node(target.name)
        entry = record.layer(target.name)
        by_index = entry.activations() if entry is not None else {}
        at = out.index(node)  # where the next quantizer goes: just before the node, which moves on by one each time
        for i in target.inputs:
            act = by_index.get(i)
            if act is None or act.scale_d is None:
                raise AmctError(f"layer '{target.name}': the calibration gave no scale_d for input {i}")
            b, scale, offset = int(act.num_bits_d or 8), float(act.scale_d), int(act.offset_d or 0)
            cmax = float(np.float32(scale * ((1 << (b - 1)) - 1 - offset)))
            cmin = float(np.float32(min(0.0, scale * (-(1 << (b - 1)) - offset))))
            name = out.unique_node_name(f"{target.name}_data_quant{i or ''}", taken)
            top = out.unique_blob_name(name)
            lp = caffe_pb().LayerParameter(name=name, type=DATA_QUANT, bottom=[node.bottoms[i]], top=[top])
            p = lp.retrain_data_quant_param
            p.ifmr_init, p.clip_max, p.clip_min, p.with_offset = False, cmax, cmin, True
            p.fixed_min, p.object_layer, p.num_bits = False, target.name, b
            for _ in range(2):
                lp.param.add(lr_mult=0.0, decay_mult=0.0)
            quant = Node(name, DATA_QUANT, [node.bottoms[i]], [top],
                         [np.array([cmax], np.float32), np.array([cmin], np.float32)], lp, origin=[])
            out.insert(at, quant)
            at += 1
            node.bottoms[i] = top
            inserted.append(name)
    if inserted:
        _LOG.info("label-free QAT: %d input(s) of data-only layers quantized at PTQ's factors", len(inserted))
    return out, inserted


def _without(graph: Graph, names: list[str]) -> Graph:
    out = graph.copy()
    for name in names:
        node = out.node(name)
        for consumer in out.consumers(node.tops[0]):
            consumer.bottoms[:] = [node.bottoms[0] if b == node.tops[0] else b for b in consumer.bottoms]
        out.remove(node)
    out.prune_blobs()
    return out


def save_trained(graph: Graph, inserted: list[str], session, save_path) -> dict[str, str]:
    """Write ``calibrate``'s files for the retrain ``graph`` (trained blobs in its nodes) and the
    calibration ``session``'s targets (module doc)."""
    float_graph, learned = strip_retrain_layers(_without(graph, inserted))
    prepared = prepare(float_graph, session.config)
    weights = quantize_weights(prepared, session.config)
    record = session.record.copy()
    record_weight_factors(record, weights.factors)  # ARQ of the trained weights
    for clips in learned:
        cmax, cmin, _, _ = ulq_clip_check(clips.clip_max, 0.0 if clips.fixed_min else clips.clip_min, np.nan, np.nan)
        act = record.layer(clips.layer, create=True).activation(0, create=True)
        if np.isnan(cmax) or np.isnan(cmin):
            _LOG.warning("layer '%s': the learned clip range is not valid; keeping PTQ's scale_d", clips.layer)
            continue
        scale_d, offset_d = ulq_scale_offset(cmax, cmin, clips.num_bits)
        act.scale_d, act.offset_d, act.num_bits_d = float(scale_d), int(offset_d), clips.num_bits
    return save_quantized(weights.float_graph, prepared.targets, record, "Both", save_path, session.original_names)
