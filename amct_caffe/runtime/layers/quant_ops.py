"""The quantization layers amct_caffe inserts into saved models: Quant, DeQuant, AntiQuant.

Layouts and formulas are those of docs/formats.md. With ``scale_d``, ``offset_d``, ``b = num_bits_d``
and rounding half away from zero (``amct_caffe.quant``):

* ``Quant``     fake-quant:
  ``y = (clamp(round(x/scale_d) + offset_d, -2^(b-1), 2^(b-1)-1) - offset_d) * scale_d``;
  integer (the layer it feeds has int8 weights): ``y = clamp(round(x/scale_d) + offset_d, ..) - offset_d``,
  float32 holding integers. ``quant_param.scale`` stores ``1/scale_d``.
* ``DeQuant``   fake-quant blobs ``[deq_scale, shift_bit, offset_w]`` (each (C,) or (1,), channel
  axis 1): identity when every shift_bit is 0, else the hardware's int16 requantization
  ``t = round(x/deq[c]); t = clamp(round(t/2^n[c]), -32768, 32767); y = t*deq[c]*2^n[c]``.
  Deploy blob: one uint64 (C,) or (1,) packing ``deq = scale_w*scale_d`` and ``offset_w``;
  ``y = acc * deq[c]`` on the int32 accumulator.
* ``AntiQuant`` identity.

Reference functions are named after the layer types and never modify their inputs. The
calibration layers (IFMR, SearchN, BNUpdate) are in :mod:`.calibration`.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from amct_caffe.errors import ConfigError, GraphError, WeightsError
from amct_caffe.ops import register
from amct_caffe.io.schema import caffe_pb
from amct_caffe.quant import QuantizationError, fake_quant, quantize, round_half_away, unpack_deq_scale
from amct_caffe.quant.search_n import shift_bit_fault
from amct_caffe.runtime.layer import Layer

_LOG = logging.getLogger(__name__)
_F32 = np.float32
INT16_MIN, INT16_MAX = -32768, 32767


# ------------------------------------------------------------------ reference functions
def _quant_scale_d(scale: float, offset: int, num_bits_d: int) -> float:
    """``scale_d = 1/scale`` (float32) after checking the Quant parameters; raises AmctError subclasses."""
    if not 8 <= num_bits_d <= 16:
        raise ConfigError(f"num_bits_d must be in [8, 16], got {num_bits_d}")
    if not (math.isfinite(scale) and scale > 0):
        raise QuantizationError(f"quant_param.scale (= 1/scale_d) must be finite and > 0, got {scale!r}")
    scale_d = float(_F32(1.0 / scale))
    if not (math.isfinite(scale_d) and scale_d > 0):
        raise QuantizationError(f"scale_d = 1/quant_param.scale = 1/{scale!r} is not a finite float32 > 0")
    lo, hi = -(1 << (num_bits_d - 1)), (1 << (num_bits_d - 1)) - 1
    if not lo <= offset <= hi:
        raise QuantizationError(f"quant_param.offset {offset} is outside [{lo}, {hi}] for {num_bits_d} bits")
    return scale_d


def Quant(x, scale, offset=0, num_bits_d=8, integer=False):
    """Quantize ``x`` (any shape, float32) with ``scale_d = 1/scale``; same shape, float32 out.

    ``integer=False``: ``fake_quant(x)`` (quantize then dequantize). ``integer=True``: the codes
    minus ``offset`` (the deploy model's int8 input, zero-centred so that zero padding stays 0).
    """
    scale_d = _quant_scale_d(scale, offset, num_bits_d)
    if integer:
        return quantize(x, scale_d, offset, num_bits_d).astype(_F32) - _F32(offset)
    return fake_quant(x, scale_d, offset, num_bits_d)


def AntiQuant(x):
    """Identity (the Caffe layer only marks where the data leaves the quantized domain)."""
    return x


def _per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """(C,) or (1,) -> (1, C, 1, ...) broadcasting along axis 1 of an ``ndim``-D blob."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _dequant_kind(params, channels: int | None = None):
    """Classify DeQuant blobs: ("deploy", deq) | ("identity", None) | ("shift", (deq, 2^n)).

    Raises ValueError describing what is wrong with the blobs.
    """
    arrays = [np.asarray(p) for p in params]
    for name, a in zip(("deq_scale", "shift_bit", "offset_w") if len(arrays) == 3 else ("deq_scale",), arrays,
                       strict=False):
        if a.size != 1 and channels is not None and a.size != channels:
            raise ValueError(f"{name} has {a.size} values; the bottom has {channels} channels "
                             f"(give {channels} or 1)")
    if len(arrays) == 1:
        if arrays[0].dtype != np.uint64:
            raise ValueError(f"a deploy DeQuant has one uint64 blob (packed deq_scale and offset_w), "
                             f"got {arrays[0].dtype}")
        deq, offset_w = unpack_deq_scale(arrays[0])
        if np.any(offset_w != 0):
            # The executor's conv adds no offset_w correction: weights must be symmetric.
            raise ValueError(f"packed offset_w must be 0 (symmetric weights), got {offset_w.tolist()}")
        if not np.isfinite(deq).all():
            raise ValueError(f"packed deq_scale is not finite: {deq.tolist()}")
        return "deploy", deq
    if len(arrays) != 3:
        raise ValueError(f"DeQuant takes 3 float blobs [deq_scale, shift_bit, offset_w] or 1 uint64 blob, "
                         f"got {len(arrays)}")
    if any(a.dtype == np.uint64 for a in arrays):
        raise ValueError("the fake-quant DeQuant blobs must be float, not packed uint64")
    deq = arrays[0].astype(_F32).reshape(-1)
    n = arrays[1].astype(np.float64).reshape(-1)
    if not np.any(n):
        return "identity", None
    fault = shift_bit_fault(n)
    if fault:
        raise ValueError(fault)
    if not (np.isfinite(deq).all() and (deq > 0).all()):
        raise ValueError(f"deq_scale must be finite and > 0 to emulate the shift, got {deq.tolist()}")
    return "shift", (deq, np.exp2(n).astype(_F32))


def DeQuant(x, *params):
    """Dequantize ``x`` [N, C, ...] with the layer's blobs ``params`` (see module doc); float32 out.

    ``DeQuant(x, deq_scale, shift_bit, offset_w)``: fake-quant model (offset_w unused: the conv
    already ran on dequantized weights). ``DeQuant(x, packed_uint64)``: deploy model.
    """
    kind, value = _dequant_kind(params, x.shape[1])
    if kind == "identity":
        return x
    if kind == "deploy":  # the accumulator may arrive exact in float64; the result is float32
        return (x * _per_channel(value, x.ndim).astype(np.float64)).astype(_F32)
    deq, pow2 = (_per_channel(v, x.ndim) for v in value)
    t = round_half_away(x / deq)
    t = np.clip(round_half_away(t / pow2), INT16_MIN, INT16_MAX)
    return (t * deq * pow2).astype(_F32)


def _named(layer: Layer, err: Exception) -> Exception:
    """The same error type with the layer named in front of the algorithm's message."""
    return type(err)(f"layer '{layer.name}' ({layer.type}): {err}")


# ------------------------------------------------------------------ layers
def _straight_through(self, top_diffs, propagate_down, bottoms, tops):
    """dx = dy, the backward of caffe_patch's Quant and DeQuant (the top diff copied) and AntiQuant (shared)."""
    return [top_diffs[0] if propagate_down[0] else None]


@register("Quant")
class QuantLayer(Layer):
    """Quant (quant_param): fake-quant, or integer codes when ``object_layer`` has integer weights."""

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        qp = lp.quant_param
        self.scale, self.offset = qp.scale, int(qp.offset)
        self.num_bits_d = int(qp.num_bits_d) if qp.HasField("num_bits_d") else 8
        try:
            self.scale_d = _quant_scale_d(self.scale, self.offset, self.num_bits_d)
        except (QuantizationError, ConfigError) as e:
            raise _named(self, e) from e
        if not qp.with_offset and self.offset != 0:
            _LOG.warning("layer '%s' (Quant): with_offset is false but offset is %d; using the offset",
                         self.name, self.offset)
        self.integer = False

    def on_net_built(self, net, index: int) -> None:
        target = net.layer_dict.get(self.lp.quant_param.object_layer)
        self.integer = bool(target is not None and target.integer_params)
        _LOG.debug("layer '%s' (Quant): %s mode (object_layer '%s')", self.name,
                   "integer" if self.integer else "fake-quant", self.lp.quant_param.object_layer)

    def forward(self, bottoms):
        return [Quant(bottoms[0], self.scale, self.offset, self.num_bits_d, self.integer)]

    def prepared_forward_into(self, bottom_shapes):
        if self.integer:
            return None
        scale_d, offset, num_bits = self.scale_d, self.offset, self.num_bits_d

        def quant_into(bottoms, outs):  # fake_quant's kernel writes into the top's array of the last forward
            return [fake_quant(bottoms[0], scale_d, offset, num_bits, into=outs[0])]
        return quant_into

    backward = _straight_through


@register("AntiQuant")
class AntiQuantLayer(Layer):
    """AntiQuant (quant_param, unused here): identity; caffe_patch's layer makes its top share the
    bottom's data and diff (ShareData, ShareDiff at every Reshape), so its gradient is the top's."""

    shares_data = True

    def forward(self, bottoms):
        return [AntiQuant(bottoms[0])]

    def diff_sharing(self, bottom_shapes):
        return "reshape"

    backward = _straight_through


@register("DeQuant")
class DeQuantLayer(Layer):
    """DeQuant (dequant_param): 3 float blobs (fake-quant model) or 1 uint64 blob (deploy model).

    ``param_shapes`` describes the fake-quant blobs, (C,) when ``channel_wise`` else (1,), filled
    with deq_scale=1, shift_bit=0, offset_w=0 (an identity) for nets built without weights.
    ``param_shapes_for_weights`` follows the caffemodel instead: its 1 or 3 blobs, each of C or
    1 values.
    """

    def _channels(self, bottom_shapes) -> int:
        s = bottom_shapes[0]
        if len(s) < 2:
            raise GraphError(f"layer '{self.name}' (DeQuant) needs a bottom of at least 2 axes (N, C, ...), "
                             f"got {list(s)}")
        return int(s[1])

    def param_shapes(self, bottom_shapes):
        c = self._channels(bottom_shapes) if self.lp.dequant_param.channel_wise else 1
        return [(c,)] * 3

    def param_shapes_for_weights(self, bottom_shapes, arrays):
        c = self._channels(bottom_shapes)
        if len(arrays) not in (1, 3):
            return self.param_shapes(bottom_shapes)  # the Net reports the count mismatch
        return [(1,) if np.asarray(a).size == 1 else (c,) for a in arrays]

    def param_fillers(self):
        one = caffe_pb().FillerParameter(type="constant", value=1.0)
        return [one, None, None]

    def reshape(self, bottom_shapes):
        c = self._channels(bottom_shapes)
        try:
            _dequant_kind([b.data for b in self.blobs], c)
        except ValueError as e:
            raise WeightsError(f"layer '{self.name}' (DeQuant): {e}") from e
        return [tuple(bottom_shapes[0])]

    def forward(self, bottoms):
        return [DeQuant(bottoms[0], *[b.data for b in self.blobs])]

    backward = _straight_through  # (its blobs get no gradient)
