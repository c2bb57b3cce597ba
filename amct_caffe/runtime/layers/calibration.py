"""The calibration layers of the calibration model: IFMR, SearchN and BNUpdate.

* ``IFMR``      collects ``batch_num`` batches of its bottom, runs the IFMR search and writes
  ``record_d`` (scale_d, offset_d, num_bits_d, channels/height/width) for each object layer.
* ``SearchN``   collects ``batch_num`` batches of a quantized layer's float output, then searches
  the shift bit per channel (``deq = scale_w * scale_d`` from the record) and writes ``shift_bit``.
* ``BNUpdate``  refreshes a BatchNorm's statistics behind quantized weights (update_bn) and dumps
  them (:mod:`amct_caffe.io.bn_dump`).

IFMR keeps the observer the Net asks for (``Net(..., ifmr=)``): a streaming histogram by default
(:class:`~amct_caffe.quant.ifmr_stream.IfmrStreamObserver`, bounded memory, the exact search's
result on small layers and, measured on the shared models, on the large ones too, but for layers whose
loss is nearly flat over the candidates) or every value for the exact search
(:class:`~amct_caffe.quant.IfmrObserver`, what patched Caffe computes).

IFMR and SearchN write the record through the Net's record sink (:mod:`amct_caffe.runtime.record_sink`):
the record file named by ``record_file_path``, or a record held in memory when the Net was built
with one for that path (the embedded flows).
"""

from __future__ import annotations

import logging

import numpy as np

from amct_caffe.errors import ConfigError, GraphError
from amct_caffe.io.bn_dump import bn_dump_path, write_bn_dump
from amct_caffe.io.record import ActivationRecord, RecordError, f32
from amct_caffe import ops
from amct_caffe.ops import register
from amct_caffe.quant import IfmrObserver, IfmrParams, IfmrStreamObserver, QuantizationError, SearchNObserver
from amct_caffe.runtime import threads
from amct_caffe.runtime.layer import Layer
from amct_caffe.runtime.layers.batch_norm import ChannelStatisticsLayer, moving_average_update
from amct_caffe.runtime.layers.calibration_overlap import Overlap, spare_cores
from amct_caffe.runtime.layers.quant_ops import _named
from amct_caffe.runtime.record_sink import RecordSink

_LOG = logging.getLogger(__name__)
_F32 = np.float32


# ------------------------------------------------------------------ helpers
def _proto_float(v: float) -> float:
    """A float proto field as the decimal it was written from.

    Proto floats are float32: 0.999999 comes back as 0.99999898672. Its shortest round-trip
    decimal is the config's value, so the search uses the same percentiles and candidates as
    a run driven by the config itself.
    """
    return float(str(_F32(v)))


def ifmr_settings(layer: Layer, p) -> IfmrParams:
    """The IFMR settings of an ``IFMRParameter`` message ``p``, checked; errors name ``layer``."""
    try:
        return IfmrParams(
            num_bits=p.num_bits, with_offset=p.with_offset,
            max_percentile=_proto_float(p.max_percentile), min_percentile=_proto_float(p.min_percentile),
            search_range_start=_proto_float(p.search_range_start),
            search_range_end=_proto_float(p.search_range_end), search_step=_proto_float(p.search_step))
    except ConfigError as e:
        raise _named(layer, e) from e


# The streaming observer's histogram resolves a quantization step of 8-bit data into about 64 bins; with more
# bits a step spans only a few bins (16 bits: less than one), its loss model no longer ranks the candidates (at
# 12 bits it picked a clip with 12 % more error than the exact search) and its sums can go negative.
STREAM_MAX_BITS = 8


def ifmr_observer(params: IfmrParams, mode: str = "stream") -> IfmrObserver | IfmrStreamObserver:
    """The IFMR observer of a calibration layer in a Net built with ``ifmr=mode``: the exact one for
    ``"exact"``, and for data of more than :data:`STREAM_MAX_BITS` bits whatever the mode."""
    if mode == "exact" or params.num_bits > STREAM_MAX_BITS:
        return IfmrObserver(params)
    return IfmrStreamObserver(params)


def _time_major_blobs(net) -> frozenset[str]:
    """The blobs of ``net`` with the batch on axis 1 (ops.time_major_blobs), worked out once per net."""
    found = getattr(net, "_time_major_blobs", None)
    if found is None:
        found = frozenset(ops.time_major_blobs(net.net_param.layer, downstream=True))
        net._time_major_blobs = found  # noqa: SLF001 - a cache on the net these layers belong to
    return found


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
    bounded_run = True

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
        self._sink = RecordSink(record_file_path)  # the Net's shared sink replaces it (on_net_built)

    def on_net_built(self, net, index: int) -> None:
        self._sink = net.record_sink(self.record_file_path)

    @property
    def hands_off_work(self) -> bool:
        """Whether its next forward may give work to the IFMR worker (calibration_overlap.py)."""
        return getattr(self, "_overlap", None) is not None and not self._done

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
        self.params = ifmr_settings(self, p)
        self._observer = ifmr_observer(self.params)
        self._shape: tuple[int, ...] | None = None
        self._later_peers: list[IfmrLayer] = []
        self._overlap: Overlap | None = None  # the Net's worker queue (calibration_overlap.py)
        self._reads_input = False
        self._finish_deferred = False

    def on_net_built(self, net, index: int) -> None:
        # IFMR layers of this net writing the same record share its sink (see RecordSink).
        super().on_net_built(net, index)
        self._observer = ifmr_observer(self.params, net.ifmr)
        if self.lp.bottom[0] in _time_major_blobs(net):
            self._observer.batch_axis = 1  # (T, N, ...) data of a recurrent layer: a smaller last batch changes N
        # (only the layers after this one: the sink of each is looked up once per pair, not twice)
        self._later_peers = [layer for layer in net.layers[index + 1:] if isinstance(layer, IfmrLayer)
                             and net.record_sink(layer.record_file_path) is self._sink]
        if isinstance(self._observer, IfmrStreamObserver):  # the exact observer stays as patched Caffe runs
            self._overlap = Overlap.of(net)
            bottom = self.lp.bottom[0]
            self._reads_input = any(b in net.inputs for b in net._shared_with.get(bottom, [bottom]))  # noqa: SLF001

    def _finishes_next_forward(self) -> bool:
        return not self._done and self._seen + 1 == self.batch_num

    def _mapped(self, e: Exception) -> Exception:
        if isinstance(e, QuantizationError):
            return self._explained(_named(self, e))
        return GraphError(f"layer '{self.name}' (IFMR): {e}")  # the sample shape changed between batches

    def _explained(self, e: Exception) -> Exception:
        """``e`` with, for non-finite data, where the values come from: this layer is amct_caffe's, the blob and
        the layers it calibrates are the user's (the data batches were finite: data.source checks them)."""
        if "inf or NaN" not in str(e):
            return e
        layers = ", ".join(f"'{name}'" for name, _ in self.targets)
        return type(e)(f"{e}: blob '{self.lp.bottom[0]}', the input of {layers}, holds infinite or NaN values in "
                       "the float model on this data; check the weights before it and the scale of the input data")

    def _update(self, x, n: int) -> None:
        try:
            if isinstance(self._observer, IfmrStreamObserver):  # the histogram fill splits over the free cores
                self._observer.update(x, threads=n)
            else:
                self._observer.update(x)
        except (QuantizationError, ValueError) as e:
            raise self._mapped(e) from e

    def _collect(self, x):
        if self._seen == 0 and isinstance(self._observer, IfmrStreamObserver):
            # batch_num batches of this size: the histogram keeps only the extremes the search can read
            self._observer.expect(self.batch_num * x.size)
        spare = spare_cores() if self._overlap is not None else 0
        finishing = self._seen + 1 == self.batch_num
        if not spare or self._reads_input:  # the next forward writes an input in place: fill it now
            self._update(x, threads.workers())
        if spare and (finishing or not self._reads_input):  # on the worker while the forward goes on
            observer, fill = self._observer, not self._reads_input
            observer.prepare()  # its state made by this thread (see IfmrStreamObserver.prepare)

            def task():
                if fill:
                    observer.update(x, threads=spare)
                return observer.compute_qparams(threads=spare) if finishing else None
            self._overlap.submit(self, task, finishing)  # settled by the Net's drain, in this order
            self._finish_deferred = finishing
        if self._shape is None:
            self._shape = tuple(x.shape)

    def _settle(self, task, finishing: bool) -> None:
        """The drain's part (calibration_overlap.py): the task's error, or its last batch's record."""
        try:
            result = task.result()
        except (QuantizationError, ValueError) as e:
            raise self._mapped(e) from e
        finally:
            if finishing:
                self._finish_deferred = False
                self._observer.reset()
        if finishing:
            self._record(result)

    def _finish(self):
        if self._finish_deferred:  # the drain settles it at the end of this forward
            return
        try:
            result = self._observer.compute_qparams(threads=threads.workers())  # the cores the load leaves
        except QuantizationError as e:
            self._sink.write()  # keep what the layers before this one computed
            raise self._mapped(e) from e
        self._record(result)
        if not any(peer._finishes_next_forward() for peer in self._later_peers):
            self._sink.write()  # the last IFMR layer of this record to finish in this forward

    def _record(self, result) -> None:
        """Set ``result`` as the record_d of every target (the caller writes the file)."""
        c, h, w = _chw(self._shape)
        record = self._sink.get()
        have: dict[str, dict] = {}  # per layer, its record_d by index (a Concat may have thousands of inputs)
        for layer, index in self.targets:
            entry = record.layer(layer, create=True)
            by_index = have.get(layer)
            if by_index is None:
                by_index = have[layer] = entry.activations()
            act = by_index.get(int(index))
            if act is None:
                act = by_index[int(index)] = ActivationRecord(int(index))
                entry.record_d.append(act)
            act.scale_d, act.offset_d, act.num_bits_d = f32(result.scale), int(result.offset), int(self.params.num_bits)
            act.channels, act.height, act.width = c, h, w
        _LOG.info("IFMR '%s': scale_d=%.9g offset_d=%d written for %s", self.name, result.scale,
                  result.offset, [t[0] for t in self.targets])
        for layer, _ in self.targets:  # the guide's completion line (FAQ "Cannot find scale_d")
            _LOG.info("Do layer '%s' activation calibration success!", layer)

    def _release(self):
        if not self._finish_deferred:  # else the drain resets it, once the worker is done with it
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
        self._overlap: Overlap | None = None

    def on_net_built(self, net, index: int) -> None:
        super().on_net_built(net, index)
        self._overlap = Overlap.of(net)

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
        if not self._sink.exists():
            raise self._missing("scale_d", self.layers[0], " (the file does not exist)")
        channels = shape[1]
        rows = []
        for layer, ltype in zip(self.layers, self.layer_types, strict=True):
            entry = record.layer(layer)
            act = entry.activation(0) if entry is not None else None
            if act is None or act.scale_d is None:
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
        if self._overlap is not None:  # the scale_d of IFMR layers settled at the end of the forward
            self._overlap.drain()
        record = self._sink.get()
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
            entry = record.layer(layer)
            if is_global:  # searched as one channel: every channel dequantizes with max(deq)
                entry.scale_w = [f32(deq[0] / scale_d)] * n_w
            entry.shift_bit = [int(s) for s in shift]
        self._sink.write()
        _LOG.info("SearchN '%s': shift_bit=%s written for %s%s", self.name, [int(s) for s in shift],
                  self.layers, " (global conv: searched as one channel, scale_w rewritten)" if is_global
                  else "")


# ------------------------------------------------------------------ BNUpdate
def bn_update_step(x, mean, variance, factor, fraction):
    """One Caffe BatchNorm moving-average update (TRAIN / use_global_stats false) of the blobs
    ``mean``, ``variance`` (each (C,)) and ``factor`` ((1,)) with batch ``x`` (N, C, ...).

    factor = factor * f + 1; mean = batch_mean + f * mean;
    variance = m / (m - 1) * batch_var + f * variance (m = elements per channel). New arrays.
    """
    return moving_average_update(x, mean, variance, factor, fraction)[:3]


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
            write_bn_dump(self.dump_file, (self.blobs[0].data / f).astype(_F32),
                          (self.blobs[1].data / f).astype(_F32), self.bn_layer, self.iterations)
            _LOG.info("BNUpdate '%s': statistics of BatchNorm '%s' refreshed over %d batch(es), written to %s",
                      self.name, self.bn_layer, self.iterations, self.dump_file)
        return []
