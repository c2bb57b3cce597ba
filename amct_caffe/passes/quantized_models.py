"""Build the fake-quant and deploy graphs from a float graph and a scale/offset record.

Both save_model and convert_model end here, so given the same graph and record they produce the
same models. Layout (docs/formats.md):

* every quantized input ``x`` of layer ``L`` -> ``Quant`` (``L_quant``, or ``L_quant<i>`` for input
  ``i > 0``) -> ``L``;
* a layer with weights writes a new blob and ``DeQuant`` (``L_dequant``) writes ``L``'s original top,
  so all original blob names keep their meaning;
  fake-quant: weights ``q * scale_w`` (float), float bias, DeQuant blobs [deq, shift_bit, offset_w];
  deploy: int8 weights, int32 bias ``round(b / (scale_w * scale_d))``, DeQuant blob = packed uint64;
* a layer without weights gets ``AntiQuant`` (``L_antiquant``, ``L_antiquant<j>``) on each top.

Quant carries ``scale = 1 / scale_d`` (the multiplier the SoC applies), ``offset = offset_d``.
"""

from __future__ import annotations

import logging

from dataclasses import dataclass

import numpy as np

from amct_caffe import ops
from amct_caffe.errors import AmctError
from amct_caffe.io.schema import caffe_pb
from amct_caffe.ir import Graph, Node
from amct_caffe.quant.arq import quantize_with_scales
from amct_caffe.quant.bias import quantize_bias
from amct_caffe.quant.fake_quant import pack_deq_scale
from amct_caffe.quant.search_n import shift_bit_fault
from amct_caffe.io.record import ActivationRecord, LayerRecord, Record, RecordError
from amct_caffe.passes.recurrent import copy_recurrent_record, is_recurrent, quantized_form, recurrent_factors

FAKE, DEPLOY = "fake_quant", "deploy"

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantTarget:
    """A layer of the float graph to quantize: which inputs, and whether it has weights."""

    name: str
    inputs: tuple[int, ...]
    weighted: bool
    layer_type: str  # config type (DepthwiseConv for a depthwise Convolution)


@dataclass(frozen=True)
class ActFactors:
    scale_d: float
    offset_d: int
    num_bits: int


# What the guide's "Cannot find scale_d" error tells save_model's caller (convert_model says its own).
MISSING_SCALE_D_ADVICE = "run the calibration model batch_num times before saving"


def activation_factors(record: Record, target: QuantTarget) -> list[ActFactors]:
    """scale_d/offset_d of each quantized input of ``target``, or the guide's error."""
    entry = record.layer(target.name)
    by_index = entry.activations() if entry is not None else {}
    out = []
    for i in target.inputs:
        act = by_index.get(i)
        if act is None or act.scale_d is None:
            raise RecordError(f"Cannot find scale_d of layer '{target.name}' in record file"
                              + (f" (input {i})" if i else "")
                              + f": {MISSING_SCALE_D_ADVICE}")
        if not (np.isfinite(act.scale_d) and act.scale_d > 0):
            raise RecordError(f"layer '{target.name}': scale_d {act.scale_d} in the record is not a positive "
                              "finite number")
        bits = act.num_bits_d if act.num_bits_d is not None else 8
        if not 8 <= bits <= 16:
            raise RecordError(f"layer '{target.name}': num_bits_d {bits} is out of range [8, 16]")
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        offset_d = act.offset_d or 0
        if not lo <= offset_d <= hi:
            raise RecordError(f"layer '{target.name}': offset_d {offset_d} is outside the {bits}-bit range "
                              f"[{lo}, {hi}]")
        out.append(ActFactors(float(np.float32(act.scale_d)), int(offset_d), int(bits)))
    return out


def weight_factors(record: Record, target: QuantTarget, channels: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(scale_w, offset_w, num_bits_w) of a weighted target from the record, checked."""
    entry = record.layer(target.name)
    if entry is None or not len(entry.scale_w):
        raise RecordError(f"Cannot find scale_w of layer '{target.name}' in record file")
    scale_w = np.asarray(entry.scale_w, dtype=np.float32)
    offset_w = np.asarray(entry.offset_w, dtype=np.int32) if len(entry.offset_w) else np.zeros_like(scale_w,
                                                                                                     np.int32)
    if scale_w.size not in (1, channels):
        raise RecordError(f"layer '{target.name}': the record has {scale_w.size} scale_w values but the layer "
                          f"has {channels} output channels (give 1 or {channels})")
    if offset_w.shape != scale_w.shape:
        raise RecordError(f"layer '{target.name}': offset_w needs as many values as scale_w ({scale_w.size})")
    if np.any(offset_w != 0):
        raise RecordError(f"layer '{target.name}': offset_w must be 0 (weights are quantized symmetrically)")
    if target.layer_type == "InnerProduct" and scale_w.size != 1:
        raise RecordError(f"layer '{target.name}': InnerProduct supports one scale_w (channel_wise false)")
    bits = entry.num_bits_w if entry.num_bits_w is not None else 8
    if bits != 8:
        raise RecordError(f"layer '{target.name}': num_bits_w {bits} is not supported: weights are stored as "
                          "INT8 (SNQ's INT4 clusters too), give num_bits_w: 8")
    return scale_w, offset_w, int(bits)


def _out_channels(node: Node) -> int:
    return ops.out_channels(node.type, node.layer_param, node.params[0].shape)


def _group(node: Node) -> int:
    """ARQ's group: a grouped Deconvolution's weight blocks (see :class:`amct_caffe.ops.WeightLayout`)."""
    return ops.weight_layout(node.type, node.layer_param).group


def _quant_node(graph: Graph, target: QuantTarget, index: int, blob: str, act: ActFactors,
                taken: set[str] | None = None) -> Node:
    suffix = "" if index == 0 else str(index)
    name = graph.unique_node_name(f"{target.name}_quant{suffix}", taken)
    top = graph.unique_blob_name(f"{blob}_{name}")
    lp = caffe_pb().LayerParameter(name=name, type="Quant", bottom=[blob], top=[top])
    qp = lp.quant_param
    qp.scale = float(np.float32(1.0) / np.float32(act.scale_d))
    qp.offset = act.offset_d
    qp.with_offset = act.offset_d != 0
    qp.num_bits_d = act.num_bits
    qp.object_layer = target.name
    qp.index = index
    return Node(name, "Quant", [blob], [top], [], lp, origin=[])


def _after_node(graph: Graph, node: Node, j: int, kind: str, suffix: str, layer_param) -> Node:
    """Give ``node``'s top ``j`` a new name and return a ``kind`` node writing the old name."""
    old = node.tops[j]
    new = graph.unique_blob_name(f"{old}_{node.name}_{suffix}")
    node.tops[j] = new
    name = graph.unique_node_name(f"{node.name}_{suffix}" + ("" if j == 0 else str(j)))
    layer_param.name, layer_param.type = name, kind
    del layer_param.bottom[:]
    layer_param.bottom.append(new)
    del layer_param.top[:]
    layer_param.top.append(old)
    return Node(name, kind, [new], [old], [], layer_param, origin=[])


def _warn_zero_channels(name: str, q: np.ndarray, bias, bias_q: np.ndarray, scale_w: np.ndarray,
                        scale_d: float) -> None:
    """Warn about output channels whose weights are all zero (a pruned channel) and whose bias the deploy model
    rounds coarsely: ARQ gives them scale_w 1 (the guide's rule for a zero range), so their int32 bias has a step
    of ``1 * scale_d``, the input's step, where the fake-quant model keeps the float bias. Named when a bias of
    more than one step moves by more than a tenth of itself (open_nsfw's and UltraFace's few all-zero channels
    have biases below a step: not named)."""
    b = np.asarray(bias, np.float32).reshape(-1)
    if scale_w.size < 2 or q.ndim < 2 or q.shape[0] != scale_w.size or b.size != scale_w.size:
        return  # a per-tensor scale (the caller passes Convolutions only: output channels on axis 0)
    zero = ~q.reshape(q.shape[0], -1).any(axis=1) & (np.asarray(scale_w).reshape(-1) == 1)
    step = np.float32(scale_d)
    error = np.abs(np.asarray(bias_q, np.float64) * float(step) - b)
    # a bias of more than a step off by more than a tenth of itself (a bias below a step stays below the noise of the
    # layer's other channels, whose inputs are rounded with that step)
    bad = np.flatnonzero(zero & (np.abs(b) > float(step)) & (error > 0.1 * np.abs(b)))
    if bad.size:
        c = int(bad[np.argmax(error[bad])])
        _LOG.warning("layer '%s': output channel(s) %s have all-zero weights (pruned?), for which ARQ sets scale_w "
                     "to 1 as the guide's rule does; the deploy model's int32 bias then has a step of scale_d "
                     "(%.6g), so channel %d's bias %.6g becomes %.6g there (the fake-quant model keeps it). Keep the "
                     "layer float (quant_enable: false) if those channels matter, or remove them from the model",
                     name, ", ".join(str(int(i)) for i in bad[:8]) + (", ..." if bad.size > 8 else ""), step, c,
                     float(b[c]), float(bias_q[c]) * float(step))


def _quantize_weights(node: Node, target: QuantTarget, record, act: ActFactors, model: str, codes: dict | None):
    """New params for ``node`` and the DeQuant blobs, for ``model`` FAKE or DEPLOY (``codes``: see
    :func:`build_quantized_graph`)."""
    channels = _out_channels(node)
    scale_w, offset_w, bits = weight_factors(record, target, channels)
    if codes is not None and target.name in codes:
        q, fake = codes[target.name]
    else:
        try:
            q, fake = quantize_with_scales(node.params[0], scale_w, node.type if node.type != "Convolution"
                                           else target.layer_type, bits, _group(node))
        except AmctError as e:
            raise RecordError(f"layer '{target.name}': {e}") from None
        if codes is not None:
            codes[target.name] = q, fake
    bias = node.params[1] if len(node.params) > 1 else None
    deq_channels = scale_w.size
    with np.errstate(over="ignore", under="ignore"):  # (an overflow is refused just below)
        deq = (scale_w * np.float32(act.scale_d)).astype(np.float32)  # the DeQuant's deq_scale, packed or not
    if not (np.isfinite(deq).all() and (deq > 0).all()):  # (a bias's quantization says so too; this for every layer)
        raise RecordError(f"layer '{target.name}': scale_w * scale_d must be finite and > 0 (the DeQuant's "
                          f"deq_scale), got {deq[~(np.isfinite(deq) & (deq > 0))][:4].tolist()} with scale_d "
                          f"{act.scale_d}")
    if model == FAKE:
        params = [fake] + ([bias] if bias is not None else [])
        dequant_blobs = [deq, np.zeros(deq_channels, np.float32), offset_w.astype(np.float32)]
    else:
        params = [q]
        if bias is not None:
            try:
                params.append(quantize_bias(bias, scale_w, act.scale_d))
            except AmctError as e:
                raise AmctError(f"layer '{target.name}': {e}") from None
            if node.type == "Convolution":  # (output channels on the weight's first axis)
                _warn_zero_channels(target.name, q, bias, params[-1], scale_w, act.scale_d)
        dequant_blobs = [pack_deq_scale(scale_w, act.scale_d, offset_w)]
    shift = None
    entry = record.layer(target.name)
    if model == FAKE and entry is not None and len(entry.shift_bit):
        shift = np.asarray(entry.shift_bit, dtype=np.float32)
        if shift.size not in (1, deq_channels):
            raise RecordError(f"layer '{target.name}': {shift.size} shift_bit values for {deq_channels} channels")
        fault = shift_bit_fault(shift)
        if fault:
            raise RecordError(f"layer '{target.name}': {fault}")
        dequant_blobs[1] = np.broadcast_to(shift, (deq_channels,)).astype(np.float32)
    return params, dequant_blobs, deq_channels > 1


def build_quantized_graph(graph: Graph, targets: list[QuantTarget], record, model: str,
                          codes: dict | None = None) -> Graph:
    """The fake-quant (``FAKE``) or deploy (``DEPLOY``) graph of float ``graph`` (not modified).

    ``codes``: {layer: (integer weights, fake-quant weights)}, filled by the first of two calls with
    the same graph, targets and record and read by the second, so that saving both models quantizes
    each weight once (the fake-quant model holds the one, the deploy model the other).
    """
    out = graph.copy()
    for target in targets:
        node = out.node(target.name)
        acts = activation_factors(record, target)
        at = out.index(node)
        quants = []
        taken = {n.name for n in out.nodes} if len(target.inputs) > 1 else None  # one scan for a wide layer
        for i, act in zip(target.inputs, acts, strict=False):
            quant = _quant_node(out, target, i, node.bottoms[i], act, taken)
            node.bottoms[i] = quant.tops[0]
            out.insert(at, quant)
            quants.append(quant)
            at += 1
        at = out.index(node) + 1
        if is_recurrent(node.type):  # its tops stay float: nothing follows it (passes/recurrent.py)
            quantized_form(node, record, {i: a.scale_d for i, a in zip(target.inputs, acts, strict=True)},
                           acts[0].num_bits, integer=model == DEPLOY)
        elif target.weighted:
            params, dequant_blobs, channel_wise = _quantize_weights(node, target, record, acts[0], model, codes)
            node.params = params
            lp = caffe_pb().LayerParameter()
            dp = lp.dequant_param
            dp.channel_wise = channel_wise
            dp.object_layer = target.name
            dp.layer_type = target.layer_type
            dequant = _after_node(out, node, 0, "DeQuant", "dequant", lp)
            dequant.params = dequant_blobs
            out.insert(at, dequant)
        else:
            for j in range(len(node.tops)):
                lp = caffe_pb().LayerParameter()
                lp.quant_param.CopyFrom(quants[0].layer_param.quant_param)
                out.insert(at + j, _after_node(out, node, j, "AntiQuant", "antiquant", lp))
    out.check()
    return out


def canonical_record(graph: Graph, targets: list[QuantTarget], record: Record) -> Record:
    """The record of the saved model: one entry per target in graph order, factors as used."""
    out = Record()
    for target in targets:
        src = record.layer(target.name)
        dst = out.layers[target.name] = LayerRecord()
        if is_recurrent(graph.node(target.name).type):
            scale_w, _, _, _ = recurrent_factors(record, graph.node(target.name))
            dst.scale_w = scale_w.tolist()
            dst.offset_w = [0] * scale_w.size
            dst.num_bits_w = 8
            copy_recurrent_record(src, dst)
        elif target.weighted:
            scale_w, offset_w, bits = weight_factors(record, target, _out_channels(graph.node(target.name)))
            dst.scale_w = scale_w.tolist()
            dst.offset_w = offset_w.tolist()
            dst.num_bits_w = bits
            dst.shift_bit = list(src.shift_bit)
        if src is not None:
            dst.skip_fusion = src.skip_fusion
        by_index = src.activations()
        for i in target.inputs:
            dst.record_d.append(ActivationRecord(**vars(by_index[i])))
    return out


def quant_mapping(original_names: set[str], quantized: Graph) -> dict:
    """The quant.json content: each quantized-model layer -> the original layers it stands for."""
    layers = {}
    quantized_layers = {n.layer_param.quant_param.object_layer for n in quantized.nodes if n.type == "Quant"}
    for node in quantized.nodes:
        if ops.layer_type(node.type).inserted:
            lp = node.layer_param
            target = (lp.quant_param.object_layer if lp.HasField("quant_param")
                      else lp.dequant_param.object_layer if lp.HasField("dequant_param") else "")
            layers[node.name] = {"type": node.type, "origin": [], "inserted_for": target}
        else:
            layers[node.name] = {"type": node.type,
                                 "origin": [n for n in node.origin if n in original_names],
                                 "quantized": node.name in quantized_layers}
    return {"version": 1, "layers": layers}
