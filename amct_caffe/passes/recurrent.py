"""Quantizing a recurrent layer (LSTM, RNN, GRU): its weights, its calibration form and its quantized forms.

The rules are docs/recurrent.md's "Quantization":

* weights per tensor with ARQ (an InnerProduct's, ``channel_wise`` false): the input weights
  (``W_x`` [, ``W_x_static``]) give ``scale_w``, the recurrent ones (LSTM ``W_hc``; RNN ``W_hh,
  W_ho``; GRU ``R_z, R_r, R_h``) ``scale_r``, offsets 0;
* the data inputs ``x`` [, ``x_static``] are ordinary quantized inputs (bottoms 0 [and 2]); the
  hidden state has its own factors ``scale_h`` / ``offset_h``, observed inside the layer by its
  calibration form (``LSTMCalibration`` / ``RNNCalibration`` / ``GRUCalibration``) and applied inside
  its quantized form (``LSTMQuant`` / ``RNNQuant`` / ``GRUQuant``);
* biases stay float in the fake-quant model; in the deploy model they become int32 on the scales of
  the product they are added to (``b``: ``scale_w[0] * scale_d``; RNN ``b_o``: ``scale_r[1] * scale_h``),
  as :attr:`~amct_caffe.ops.RecurrentLayout.recurrent_biases` pairs them.

The other passes call these functions for the targets whose type is recurrent.
"""

from __future__ import annotations

import numpy as np

from amct_caffe import ops
from amct_caffe.errors import AmctError
from amct_caffe.io.record import Record, RecordError
from amct_caffe.io.schema import caffe_pb
from amct_caffe.ir import Node
from amct_caffe.quant.arq import arq_quantize_weight, quantize_with_scales
from amct_caffe.quant.bias import quantize_bias

_F32 = np.float32


_RECURRENT_WEIGHTS = {"LSTM": "W_hc", "RNN": "W_hh, W_ho", "GRU": "R_z, R_r, R_h"}


def is_recurrent(node_type: str) -> bool:
    return ops.layer_type(node_type).recurrent


def layout(node: Node) -> ops.RecurrentLayout:
    return ops.recurrent_layout(node.type, node.layer_param, len(node.bottoms))


def quantize_recurrent_weights(node: Node) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """ARQ of every weight tensor of ``node``, one scale each.

    Returns (params with the fake-quantized weights, scale_w (input weights), scale_r (recurrent
    weights)), the scales float32.
    """
    lay = layout(node)
    params = list(node.params)
    scales = {}
    for i in lay.input_weights + lay.recurrent_weights:
        arq = arq_quantize_weight(node.params[i], "InnerProduct", False, 8)
        params[i] = arq.fake
        scales[i] = arq.scale.reshape(-1)[0]
    return (params, np.array([scales[i] for i in lay.input_weights], _F32),
            np.array([scales[i] for i in lay.recurrent_weights], _F32))


def recurrent_factors(record: Record, node: Node) -> tuple[np.ndarray, np.ndarray, float, int]:
    """(scale_w, scale_r, scale_h, offset_h) of a recurrent layer from the record, checked."""
    lay, name = layout(node), node.name
    entry = record.layer(name)
    if entry is None or not len(entry.scale_w):
        raise RecordError(f"Cannot find scale_w of layer '{name}' in record file")
    checks = (("scale_w", entry.scale_w, entry.offset_w, len(lay.input_weights),
               "W_x" + (", W_x_static" if lay.static else "")),
              ("scale_r", entry.scale_r, entry.offset_r, len(lay.recurrent_weights),
               _RECURRENT_WEIGHTS[ops.recurrent_base(node.type)]))
    for field, scales, offsets, want, what in checks:
        if len(scales) != want:
            raise RecordError(f"layer '{name}' ({node.type}): the record has {len(scales)} {field} value(s); the "
                              f"layer needs {want} (one per weight tensor: {what})")
        if len(offsets) not in (0, want) or any(offsets):
            offset = "offset_w" if field == "scale_w" else "offset_r"
            raise RecordError(f"layer '{name}' ({node.type}): {offset} must be {want} zero(s) or absent (weights "
                              "are quantized symmetrically)")
    if entry.num_bits_w not in (None, 8):
        raise RecordError(f"layer '{name}': num_bits_w {entry.num_bits_w} is not supported, give num_bits_w: 8")
    if entry.scale_h is None:
        raise RecordError(f"Cannot find scale_h of layer '{name}' in record file: run the calibration model "
                          "batch_num times before saving")
    with np.errstate(over="ignore"):
        inverse = _F32(1.0) / _F32(entry.scale_h)
    if not np.isfinite(inverse):  # the Quant layer multiplies by 1 / scale_h
        raise RecordError(f"layer '{name}': scale_h {entry.scale_h!r} is too small (1 / scale_h overflows float32); "
                          "recalibrate the model, or correct the record")
    offset_h = int(entry.offset_h or 0)
    bits = entry.record_d[0].num_bits_d if entry.record_d and entry.record_d[0].num_bits_d else 8
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if not lo <= offset_h <= hi:
        raise RecordError(f"layer '{name}': offset_h {offset_h} is outside the {bits}-bit range [{lo}, {hi}]; "
                          "recalibrate the model, or correct the record")
    return (np.asarray(entry.scale_w, _F32), np.asarray(entry.scale_r, _F32), float(_F32(entry.scale_h)), offset_h)


def calibration_form(node: Node, ifmr_layer_param) -> None:
    """Turn ``node`` (in a calibration graph) into its calibration form, in place.

    ``ifmr_layer_param``: a LayerParameter whose ``ifmr_param`` holds the hidden state's IFMR
    settings, ``object_layer`` and record file (the calibration pass builds it as for an IFMR layer).
    """
    lp = caffe_pb().LayerParameter()
    lp.CopyFrom(node.layer_param)
    lp.type = ops.CALIBRATION_RECURRENT[node.type]
    lp.lstm_calibration_param.ifmr_param.CopyFrom(ifmr_layer_param.ifmr_param)
    node.type, node.layer_param = lp.type, lp


def _dequant(param, deq: float, target: str, layer_type: str) -> None:
    """Append ``deq`` to a DeQuantParameter of the quantized layer (set up on the first call)."""
    param.channel_wise = False
    param.object_layer = target
    param.layer_type = layer_type
    param.deqscale.append(float(_F32(deq)))


def quantized_form(node: Node, record: Record, scale_d: dict[int, float], num_bits_d: int, integer: bool) -> None:
    """Turn ``node`` (a copy in a fake-quant or deploy graph) into LSTMQuant / RNNQuant, in place.

    ``scale_d``: the data scale of each quantized input (bottom index -> scale_d); ``integer``: the
    deploy form (int8 weights, int32 biases) instead of the fake-quant one (float ``q * scale``).
    """
    lay, name, base = layout(node), node.name, node.type
    scale_w, scale_r, scale_h, offset_h = recurrent_factors(record, node)
    params = list(node.params)
    try:
        for i, s in zip(lay.input_weights + lay.recurrent_weights, [*scale_w, *scale_r], strict=True):
            q, fake = quantize_with_scales(node.params[i], np.array([s], _F32), "InnerProduct", 8)
            params[i] = q if integer else fake
        if integer:
            params[1] = quantize_bias(node.params[1], scale_w[:1], scale_d[0])
            for w, b in lay.recurrent_biases.items():
                s = scale_r[lay.recurrent_weights.index(w)]
                params[b] = quantize_bias(node.params[b], np.array([s], _F32), scale_h)
    except AmctError as e:
        raise RecordError(f"layer '{name}': {e}") from None
    lp = caffe_pb().LayerParameter()
    lp.CopyFrom(node.layer_param)
    lp.type = ops.QUANTIZED_RECURRENT[base]
    qp = lp.lstm_quant_param
    h = qp.w_h_quant_param
    h.scale = float(_F32(1.0) / _F32(scale_h))
    h.offset = offset_h
    h.with_offset = offset_h != 0
    h.num_bits_d = num_bits_d
    h.object_layer = name
    _dequant(qp.w_x_dequant_param, scale_w[0] * scale_d[0], name, base)
    if lay.static:
        _dequant(qp.w_x_static_dequant_param, scale_w[1] * scale_d[2], name, base)
    for s in scale_r:  # one per recurrent weight
        _dequant(qp.w_h_dequant_param, s * scale_h, name, base)
    node.type, node.layer_param, node.params = lp.type, lp, params


def copy_recurrent_record(src, dst) -> None:
    """The recurrent fields of a record entry, as the canonical record keeps them."""
    dst.scale_r = list(src.scale_r)
    dst.offset_r = list(src.offset_r) if len(src.offset_r) else [0] * len(src.scale_r)
    dst.scale_h, dst.offset_h = src.scale_h, src.offset_h if src.offset_h is not None else 0
