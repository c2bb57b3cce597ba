"""The layers amct_caffe inserts: IFMR and SearchN (calibration), Quant, DeQuant, AntiQuant.

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
* ``IFMR``      collects ``batch_num`` batches of its bottom, runs the IFMR search and writes
  ``record_d`` (scale_d, offset_d, num_bits_d, channels/height/width) for each object layer.
* ``SearchN``   collects ``batch_num`` batches of a quantized layer's float output, then searches
  the shift bit per channel (``deq = scale_w * scale_d`` from the record) and writes ``shift_bit``.

Reference functions are named after the layer types and never modify their inputs.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from amct_caffe.errors import ConfigError, GraphError, WeightsError
from amct_caffe.io.files import atomic_output
from amct_caffe.io.schema import caffe_pb
from amct_caffe.quant import (IfmrObserver, IfmrParams, QuantizationError, SearchNObserver, fake_quant,
                              quantize, round_half_away, unpack_deq_scale)
from amct_caffe.record import (RecordError, activation_entry, layer_entry, new_record, read_record,
                               write_record)
from amct_caffe.runtime.layer import Layer
from amct_caffe.runtime.layers.normalization import ChannelStatisticsLayer, moving_average_update
from amct_caffe.runtime.registry import register

_LOG = logging.getLogger(__name__)
_F32 = np.float32
MIN_SHIFT_BIT, MAX_SHIFT_BIT = 1, 16
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
    if not np.all((n >= MIN_SHIFT_BIT) & (n <= MAX_SHIFT_BIT) & (n == np.round(n))):
        raise ValueError(f"shift_bit values must be all 0 or all integers in [{MIN_SHIFT_BIT}, "
                         f"{MAX_SHIFT_BIT}] (mixed zero/non-zero is not allowed), got {n.tolist()}")
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


# ------------------------------------------------------------------ helpers
def _named(layer: Layer, err: Exception) -> Exception:
    """The same error type with the layer named in front of the algorithm's message."""
    return type(err)(f"layer '{layer.name}' ({layer.type}): {err}")


def _proto_float(v: float) -> float:
    """A float proto field as the decimal it was written from.

    Proto floats are float32: 0.999999 comes back as 0.99999898672. Its shortest round-trip
    decimal is the config's value, so the search uses the same percentiles and candidates as
    a run driven by the config itself.
    """
    return float(str(_F32(v)))


def _read_or_new(path: str):
    return read_record(path) if Path(path).exists() else new_record()


def _stamp(path: str):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


class _SharedRecord:
    """The record file of the IFMR layers of one Net, parsed once and written once per forward.

    Parsing and printing protobuf text in Python is slow (about a second for a ResNet's record), so
    the layers that finish in the same forward update one in-memory record and the last of them
    writes it. The file is parsed again only if something else changed it meanwhile.
    """

    def __init__(self, path: str):
        self.path = path
        self._record = None
        self._stamp = None

    def get(self):
        if self._record is None or _stamp(self.path) != self._stamp:
            self._record = _read_or_new(self.path)
            self._stamp = _stamp(self.path)
        return self._record

    def write(self) -> None:
        if self._record is None:  # nothing was read or changed
            return
        write_record(self._record, self.path)
        self._stamp = _stamp(self.path)


def _chw(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """channels, height, width of a bottom (N, C[, H[, W...]]); missing axes count as 1 and
    axes past the fourth are folded into width, so C*H*W is always the per-sample count."""
    c = shape[1]
    h = shape[2] if len(shape) > 2 else 1
    w = int(np.prod(shape[3:], dtype=np.int64)) if len(shape) > 3 else 1
    return int(c), int(h), int(w)


class _Collector(Layer):
    """A calibration layer: no top, acts on the first ``batch_num`` forwards, then does nothing."""

    num_tops = 0

    def _setup(self, batch_num: int, record_file_path: str, targets, what: str) -> None:
        if batch_num < 1:
            raise GraphError(f"layer '{self.name}' ({self.type}): {what}.batch_num must be >= 1, "
                             f"got {batch_num}")
        if not record_file_path:
            raise GraphError(f"layer '{self.name}' ({self.type}): {what}.record_file_path is empty")
        if not targets:
            raise GraphError(f"layer '{self.name}' ({self.type}): {what} names no quantized layer")
        self.batch_num, self.record_file_path = int(batch_num), record_file_path
        self._seen, self._done, self._told_done = 0, False, False

    def reshape(self, bottom_shapes):
        if len(bottom_shapes[0]) < 2:
            raise GraphError(f"layer '{self.name}' ({self.type}) needs a bottom of at least 2 axes "
                             f"(N, C, ...), got {list(bottom_shapes[0])}")
        return []

    def forward(self, bottoms):
        if self._done:
            if not self._told_done:
                _LOG.debug("%s '%s': already calibrated on %d batch(es); further forwards are ignored",
                           self.type, self.name, self.batch_num)
                self._told_done = True
            return []
        self._collect(bottoms[0])
        self._seen += 1
        _LOG.info("%s '%s': batch %d/%d recorded", self.type, self.name, self._seen, self.batch_num)
        if self._seen == self.batch_num:
            try:
                self._finish()
            finally:  # free the collected data whatever happens; a failed layer stays failed
                self._done = True
                self._release()
        return []

    def _collect(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError


# ------------------------------------------------------------------ IFMR
@register("IFMR")
class IfmrLayer(_Collector):
    """IFMR activation calibration (ifmr_param); writes ``record_d`` of every ``object_layer``."""

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        p = lp.ifmr_param
        self._setup(p.batch_num, p.record_file_path, list(p.object_layer), "ifmr_param")
        if len(p.index) not in (0, len(p.object_layer)):
            raise GraphError(f"layer '{self.name}' (IFMR): ifmr_param gives {len(p.index)} index value(s) "
                             f"for {len(p.object_layer)} object_layer(s); give one per object_layer or none")
        self.targets = list(zip(p.object_layer, list(p.index) or [0] * len(p.object_layer), strict=True))
        try:
            self.params = IfmrParams(
                num_bits=p.num_bits, with_offset=p.with_offset,
                max_percentile=_proto_float(p.max_percentile), min_percentile=_proto_float(p.min_percentile),
                search_range_start=_proto_float(p.search_range_start),
                search_range_end=_proto_float(p.search_range_end), search_step=_proto_float(p.search_step))
        except ConfigError as e:
            raise _named(self, e) from e
        self._observer = IfmrObserver(self.params)
        self._shape: tuple[int, ...] | None = None
        self._shared = _SharedRecord(self.record_file_path)
        self._later_peers: list[IfmrLayer] = []

    def on_net_built(self, net, index: int) -> None:
        # IFMR layers of this net writing the same record share it (see _SharedRecord).
        peers = [layer for layer in net.layers if isinstance(layer, IfmrLayer)
                 and layer.record_file_path == self.record_file_path]
        self._shared = peers[0]._shared
        self._later_peers = [layer for layer in peers if net.layers.index(layer) > index]

    def _finishes_next_forward(self) -> bool:
        return not self._done and self._seen + 1 == self.batch_num

    def _collect(self, x):
        try:
            self._observer.update(x)
        except QuantizationError as e:
            raise _named(self, e) from e
        except ValueError as e:  # the sample shape changed between batches
            raise GraphError(f"layer '{self.name}' (IFMR): {e}") from e
        if self._shape is None:
            self._shape = tuple(x.shape)

    def _finish(self):
        try:
            result = self._observer.compute_qparams()
        except QuantizationError as e:
            self._shared.write()  # keep what the layers before this one computed
            raise _named(self, e) from e
        c, h, w = _chw(self._shape)
        record = self._shared.get()
        for layer, index in self.targets:
            act = activation_entry(layer_entry(record, layer, create=True), int(index), create=True)
            act.scale_d, act.offset_d, act.num_bits_d = result.scale, result.offset, self.params.num_bits
            act.channels, act.height, act.width = c, h, w
        if not any(peer._finishes_next_forward() for peer in self._later_peers):
            self._shared.write()  # the last IFMR layer of this record to finish in this forward
        _LOG.info("IFMR '%s': scale_d=%.9g offset_d=%d written for %s", self.name, result.scale,
                  result.offset, [t[0] for t in self.targets])
        for layer, _ in self.targets:  # the guide's completion line (FAQ "Cannot find scale_d")
            _LOG.info("Do layer '%s' activation calibration success!", layer)

    def _release(self):
        self._observer.reset()


# ------------------------------------------------------------------ SearchN
@register("SearchN")
class SearchNLayer(_Collector):
    """Shift-bit search for the quantized layers ``search_n_param.layer_name`` sharing this output.

    The batches are kept until the last one: ``deq`` needs ``scale_d``, which the IFMR layers of
    the same calibration run write only at their own last batch (and an older record may hold a
    stale one). Rules: every named layer needs ``scale_w`` and ``record_d`` index 0 in the record,
    the same number of ``scale_w`` (1 or C) and the same ``deq = scale_w * scale_d``; an
    InnerProduct has one ``scale_w``. A "global" convolution (C > 1, 1x1 output) is searched as
    one channel with ``max(deq)``, and its ``scale_w`` is rewritten to ``max(deq)/scale_d``.
    ``shift_bit`` gets one value per ``scale_w``.
    """

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        p = lp.search_n_param
        self._setup(p.batch_num, p.record_file_path, list(p.layer_name), "search_n_param")
        if len(p.layer_type) not in (0, len(p.layer_name)):
            raise GraphError(f"layer '{self.name}' (SearchN): search_n_param gives {len(p.layer_type)} "
                             f"layer_type(s) for {len(p.layer_name)} layer_name(s)")
        self.layers = list(p.layer_name)
        self.layer_types = list(p.layer_type) or [""] * len(self.layers)
        self._batches: list[np.ndarray] = []

    def _collect(self, x):
        self._batches.append(np.array(x, dtype=_F32, copy=True))

    def _release(self):
        self._batches = []

    def _missing(self, what: str, layer: str, why: str = "") -> RecordError:
        return RecordError(f"Cannot find {what} of layer '{layer}' in record file "
                           f"{self.record_file_path}{why} (SearchN layer '{self.name}'); run the calibration "
                           "for batch_num batches first")

    def _deq(self, record, shape):
        """(deq [1 or C] float32, scale_d, number of scale_w, global-conv flag) from the record."""
        if not Path(self.record_file_path).exists():
            raise self._missing("scale_d", self.layers[0], " (the file does not exist)")
        channels = shape[1]
        rows = []
        for layer, ltype in zip(self.layers, self.layer_types, strict=True):
            entry = layer_entry(record, layer)
            act = activation_entry(entry, 0) if entry is not None else None
            if act is None or not act.HasField("scale_d"):
                raise self._missing("scale_d", layer)
            if not len(entry.scale_w):
                raise self._missing("scale_w", layer)
            scale_w = np.asarray(entry.scale_w, dtype=_F32)
            if ltype == "InnerProduct" and scale_w.size != 1:
                raise RecordError(f"SearchN layer '{self.name}': InnerProduct '{layer}' must have one "
                                  f"scale_w (C = 1), the record has {scale_w.size}")
            if scale_w.size not in (1, channels):
                raise RecordError(f"SearchN layer '{self.name}': '{layer}' has {scale_w.size} scale_w in the "
                                  f"record but its output has {channels} channels")
            rows.append((layer, scale_w, _F32(act.scale_d), ltype))
        deqs = [(sw * sd).astype(_F32) for _, sw, sd, _ in rows]
        if any(d.shape != deqs[0].shape or not np.array_equal(d, deqs[0]) for d in deqs[1:]):
            raise RecordError(f"SearchN layer '{self.name}': layers {self.layers} share one output but their "
                              "deq_scale = scale_w * scale_d differ")
        deq = deqs[0]
        spatial = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 0
        is_global = deq.size > 1 and spatial == 1 and all(t != "InnerProduct" for *_, t in rows)
        if is_global:
            deq = np.array([deq.max()], dtype=_F32)
        return deq, rows[0][2], rows[0][1].size, is_global

    def _finish(self):
        record = _read_or_new(self.record_file_path)
        shape = self._batches[0].shape
        deq, scale_d, n_w, is_global = self._deq(record, shape)
        try:
            observer = SearchNObserver(deq)
            for x in self._batches:
                observer.update(x.reshape(x.shape[0], deq.size, -1))
            best = observer.compute_qparams()
        except QuantizationError as e:
            raise _named(self, e) from e
        shift = np.broadcast_to(best, (n_w,)) if best.size == 1 else best
        for layer in self.layers:
            entry = layer_entry(record, layer)
            if is_global:  # searched as one channel: every channel dequantizes with max(deq)
                del entry.scale_w[:]
                entry.scale_w.extend([float(deq[0] / scale_d)] * n_w)
            del entry.shift_bit[:]
            entry.shift_bit.extend(int(s) for s in shift)
        write_record(record, self.record_file_path)
        _LOG.info("SearchN '%s': shift_bit=%s written for %s%s", self.name, [int(s) for s in shift],
                  self.layers, " (global conv: searched as one channel, scale_w rewritten)" if is_global
                  else "")


# ------------------------------------------------------------------ Quant / DeQuant / AntiQuant
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


@register("AntiQuant")
class AntiQuantLayer(Layer):
    """AntiQuant (quant_param, unused here): identity."""

    def forward(self, bottoms):
        return [AntiQuant(bottoms[0])]


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


# ------------------------------------------------------------------ BNUpdate
def bn_update_step(x, mean, variance, factor, fraction):
    """One Caffe BatchNorm moving-average update (TRAIN / use_global_stats false) of the blobs
    ``mean``, ``variance`` (each (C,)) and ``factor`` ((1,)) with batch ``x`` (N, C, ...).

    factor = factor * f + 1; mean = batch_mean + f * mean;
    variance = m / (m - 1) * batch_var + f * variance (m = elements per channel). New arrays.
    """
    return moving_average_update(x, mean, variance, factor, fraction)[:3]


def bn_dump_path(dump_dir, bn_layer: str) -> Path:
    """Where the BNUpdate layer of BatchNorm ``bn_layer`` writes its refreshed statistics."""
    return Path(dump_dir) / f"{bn_layer.replace('/', '_')}.npz"


@register("BNUpdate")
class BnUpdateLayer(ChannelStatisticsLayer):
    """Refreshes the statistics of BatchNorm ``bn_update_param.bn_layer`` (update_bn).

    Bottom: the BatchNorm's input; no top. Blobs: copies of the BatchNorm's mean, variance and
    moving-average factor, the starting point of Caffe's update rule (:func:`bn_update_step`),
    applied on each of the first ``iterations`` forwards. After the last one the layer writes
    ``<dump_dir>/<bn_layer>.npz`` with ``mean`` = blobs[0] / blobs[2] and ``var`` = blobs[1] / blobs[2]
    (atomically); later forwards do nothing.
    """

    num_tops = 0
    n_blobs = 3

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        p = lp.bn_update_param
        where = f"layer '{self.name}' (BNUpdate): bn_update_param"
        if not p.bn_layer:
            raise GraphError(f"{where}.bn_layer is empty")
        if p.iterations < 1:
            raise GraphError(f"{where}.iterations must be >= 1, got {p.iterations}")
        if not 0 < p.moving_average_fraction < 1:
            raise GraphError(f"{where}.moving_average_fraction must be in (0, 1), got {p.moving_average_fraction}")
        if not p.dump_dir:
            raise GraphError(f"{where}.dump_dir is empty")
        self.bn_layer, self.iterations = p.bn_layer, int(p.iterations)
        self.fraction = _F32(p.moving_average_fraction)
        self.dump_file = bn_dump_path(p.dump_dir, p.bn_layer)
        self._seen = 0

    def reshape(self, bottom_shapes):
        self.check_statistics(bottom_shapes)
        return []

    def forward(self, bottoms):
        if self._seen >= self.iterations:
            return []
        mean, var, factor = bn_update_step(bottoms[0], self.blobs[0].data, self.blobs[1].data,
                                           self.blobs[2].data, self.fraction)
        self.blobs[0].data[...], self.blobs[1].data[...], self.blobs[2].data[...] = mean, var, factor
        self._seen += 1
        _LOG.info("BNUpdate '%s': batch %d/%d applied to '%s'", self.name, self._seen, self.iterations,
                  self.bn_layer)
        if self._seen == self.iterations:
            f = _F32(self.blobs[2].data.reshape(-1)[0])
            with atomic_output(self.dump_file, "wb") as out:
                np.savez(out, mean=(self.blobs[0].data / f).astype(_F32),
                         var=(self.blobs[1].data / f).astype(_F32), bn_layer=np.array(self.bn_layer),
                         iterations=np.array(self.iterations))
            _LOG.info("BNUpdate '%s': statistics of BatchNorm '%s' refreshed over %d batch(es), written to %s",
                      self.name, self.bn_layer, self.iterations, self.dump_file)
        return []
