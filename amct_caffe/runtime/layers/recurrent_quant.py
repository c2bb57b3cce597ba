"""The quantized and calibration forms of LSTM, RNN and GRU (docs/recurrent.md, "Quantization").

Same bottoms, tops, ``recurrent_param`` and blob layout as the layer they replace
(:mod:`.recurrent`); they differ only in the products whose input is the hidden state
(``W_h h~_{t-1}``; RNN also ``W_ho h_t``; GRU ``R_z h~``, ``R_r h~`` and ``R_h (r * h~)`` or ``R_h h~``):

* ``LSTMCalibration`` / ``RNNCalibration`` compute the float cell and observe those inputs
  (every step of ``lstm_calibration_param.ifmr_param.batch_num`` forwards, pooled), then run IFMR
  and write ``scale_h`` / ``offset_h`` of ``ifmr_param.object_layer`` into the record.
* ``LSTMQuant`` / ``RNNQuant``, fake-quant model (float weights ``q * scale``): the hidden state is
  fake-quantized by ``lstm_quant_param.w_h_quant_param`` before each such product::

      fq(v) = (clamp(round(v / scale_h) + offset_h, -2^(b-1), 2^(b-1) - 1) - offset_h) * scale_h

* the same types in a deploy model (int8 weights, int32 biases, integer ``x`` codes from the
  Quant layers in front): every product is computed on integers and dequantized,
  ``deqscale * (W_q v_q [+ b_q])``, with ``v_q = clamp(round(v / scale) + offset) - offset`` for
  the hidden state; ``deqscale`` comes from ``w_x_dequant_param`` (``x``),
  ``w_x_static_dequant_param`` and ``w_h_dequant_param`` (one per recurrent weight: ``W_h``; RNN
  ``W_hh, W_ho``). It equals the fake-quant forward up to the int32 biases' rounding.

None of them has a backward (they are inference models), as in caffe_patch.
"""

from __future__ import annotations

import logging

import numpy as np

from amct_caffe.errors import ConfigError, GraphError
from amct_caffe.io.record import f32
from amct_caffe.ops import recurrent_layout, register
from amct_caffe.quant import QuantizationError
from amct_caffe.runtime.layers.calibration import ifmr_observer, ifmr_settings
from amct_caffe.runtime.layers.quant_ops import Quant, _named, _quant_scale_d
from amct_caffe.runtime.layers.gru import GRULayer
from amct_caffe.runtime.layers.recurrent import LSTMLayer, RNNLayer
from amct_caffe.runtime.record_sink import RecordSink

_LOG = logging.getLogger(__name__)
_F32 = np.float32


class _InferenceOnly:
    """The quantized recurrent layers run forward only (refused like Caffe's unimplemented backward)."""

    @classmethod
    def has_backward(cls) -> bool:
        return False

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        raise GraphError(f"layer '{self.name}' ({self.type}) has no backward: it belongs to a calibration or "
                         "quantized model; train the float model (or use the retrain flow) instead")


# ------------------------------------------------------------------ calibration
class _HiddenCalibration(_InferenceOnly):
    """Observe the hidden-state inputs of the recurrent products; write scale_h / offset_h."""

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        p = lp.lstm_calibration_param.ifmr_param
        where = f"layer '{self.name}' ({self.type})"
        if p.batch_num < 1:
            raise GraphError(f"{where}: lstm_calibration_param.ifmr_param.batch_num must be >= 1, got {p.batch_num}")
        if not p.record_file_path:
            raise GraphError(f"{where}: lstm_calibration_param.ifmr_param.record_file_path is empty")
        if len(p.object_layer) != 1:
            raise GraphError(f"{where}: lstm_calibration_param.ifmr_param must name exactly one object_layer (the "
                             f"recurrent layer), got {list(p.object_layer)}")
        self.params = ifmr_settings(self, p)
        self.batch_num, self.record_file_path = int(p.batch_num), p.record_file_path
        self.object_layer = p.object_layer[0]
        self._observer = ifmr_observer(self.params)
        self._sink = RecordSink(self.record_file_path)
        self._seen, self._done = 0, False
        self._observed: list[np.ndarray] = []

    def on_net_built(self, net, index: int) -> None:
        self._sink = net.record_sink(self.record_file_path)
        self._observer = ifmr_observer(self.params, net.ifmr)
        self._observer.batch_axis = 1  # the hidden states (T, N, H): a smaller last batch changes N

    def _hidden_product(self, h, w_index, b_index=None):
        if not self._done:
            self._observed.append(h)
        return super()._hidden_product(h, w_index, b_index)

    def forward(self, bottoms):
        self._observed = []
        tops = super().forward(bottoms)
        if self._done:
            return tops
        try:
            self._observer.update(np.stack(self._observed))
        except QuantizationError as e:
            raise _named(self, e) from e
        finally:
            self._observed = []
        self._seen += 1
        _LOG.info("%s '%s': batch %d/%d of the hidden state recorded", self.type, self.name, self._seen,
                  self.batch_num)
        if self._seen == self.batch_num:
            self._done = True
            try:
                result = self._observer.compute_qparams()
            except QuantizationError as e:
                raise _named(self, e) from e
            finally:
                self._observer.reset()
            entry = self._sink.get().layer(self.object_layer, create=True)
            entry.scale_h, entry.offset_h = f32(result.scale), int(result.offset)
            self._sink.write()
            _LOG.info("%s '%s': scale_h=%.9g offset_h=%d written for '%s'", self.type, self.name, result.scale,
                      result.offset, self.object_layer)
        return tops


@register("LSTMCalibration")
class LSTMCalibrationLayer(_HiddenCalibration, LSTMLayer):
    """LSTM forward that calibrates its hidden state (module doc)."""


@register("RNNCalibration")
class RNNCalibrationLayer(_HiddenCalibration, RNNLayer):
    """RNN forward that calibrates its hidden state (module doc)."""


@register("GRUCalibration")
class GRUCalibrationLayer(_HiddenCalibration, GRULayer):
    """GRU forward that calibrates its hidden state (module doc)."""


# ------------------------------------------------------------------ quantized
def _deqscale(param, what: str, where: str, count: int = 1) -> list[np.float64]:
    values = list(param.deqscale)
    if len(values) != count or not all(np.isfinite(v) and v > 0 for v in values):
        raise GraphError(f"{where}: lstm_quant_param.{what}.deqscale must be {count} finite value(s) > 0 (one per "
                         f"weight tensor), got {values}")
    return [np.float64(_F32(v)) for v in values]


class _HiddenQuant(_InferenceOnly):
    """Quantize the hidden state before each product that reads it (module doc)."""

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        qp = lp.lstm_quant_param.w_h_quant_param
        self.scale, self.offset = qp.scale, int(qp.offset)
        self.num_bits_d = int(qp.num_bits_d) if qp.HasField("num_bits_d") else 8
        try:
            _quant_scale_d(self.scale, self.offset, self.num_bits_d)
        except (QuantizationError, ConfigError) as e:
            raise type(e)(f"layer '{self.name}' ({self.type}): lstm_quant_param.w_h_quant_param: {e}") from e

    def _deq(self) -> dict:
        """The deploy model's dequantization factors, checked (only read in integer mode): per data
        input, and per recurrent weight (by blob index)."""
        p, where = self.lp.lstm_quant_param, f"layer '{self.name}' ({self.type})"
        layout = recurrent_layout(self.type, self.lp, len(self.lp.bottom))
        deq = {"x": _deqscale(p.w_x_dequant_param, "w_x_dequant_param", where)[0]}
        if self.static:
            deq["static"] = _deqscale(p.w_x_static_dequant_param, "w_x_static_dequant_param", where)[0]
        recurrent = _deqscale(p.w_h_dequant_param, "w_h_dequant_param", where, len(layout.recurrent_weights))
        deq.update(zip(layout.recurrent_weights, recurrent, strict=True))
        return deq

    def on_net_built(self, net, index: int) -> None:
        self._deq_factors = self._deq() if self.integer_params else None

    def _hidden_product(self, h, w_index, b_index=None):
        q = Quant(h, self.scale, self.offset, self.num_bits_d, integer=self.integer_params)
        if not self.integer_params:
            return super()._hidden_product(q, w_index, b_index)
        return self._integer_product(q, w_index, b_index, self._deq_factors[w_index])

    def _integer_product(self, v, w_index, b_index, deq) -> np.ndarray:
        """``deq * (W_q v + b_q)`` on integers (exact in float64), rounded once to float32."""
        acc = np.asarray(v, np.float64) @ self.blobs[w_index].data.astype(np.float64).T
        if b_index is not None:
            acc += self.blobs[b_index].data.astype(np.float64)
        return (acc * deq).astype(_F32)

    def _input_transforms(self, bottoms):
        if not self.integer_params:
            return super()._input_transforms(bottoms)
        x = np.asarray(bottoms[0])
        t, n = x.shape[:2]
        wx = self._integer_product(x.reshape(t * n, -1), 0, 1, self._deq_factors["x"]).reshape(t, n, -1)
        ws = None
        if self.static:
            ws = self._integer_product(np.asarray(bottoms[2]).reshape(n, -1), 2, None, self._deq_factors["static"])
        return wx, ws


@register("LSTMQuant")
class LSTMQuantLayer(_HiddenQuant, LSTMLayer):
    """LSTM of a fake-quant or deploy model (module doc)."""


@register("RNNQuant")
class RNNQuantLayer(_HiddenQuant, RNNLayer):
    """RNN of a fake-quant or deploy model (module doc)."""


@register("GRUQuant")
class GRUQuantLayer(_HiddenQuant, GRULayer):
    """GRU of a fake-quant or deploy model (module doc)."""
