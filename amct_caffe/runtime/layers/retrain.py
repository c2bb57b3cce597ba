"""The retrain (QAT) layers: RetrainDataQuant (ULQ) and RetrainWeightQuant (ARQ retrain).

They compute what caffe_patch's C++ layers compute (``caffe_patch/src/caffe/layers/
retrain_{data,weight}_quant_layer.cpp``), through the same functions (:mod:`amct_caffe.quant.ulq`,
:mod:`amct_caffe.quant.arq`; the C++ kernels by default, which libquant shares with the patch).

``RetrainDataQuant`` (retrain_data_quant_param), ``b = num_bits`` in [8, 16]. Blobs [clip_max],
[clip_min] (shape (1,), learnable; from the param when the caffemodel has none, clip_min = 0 with
``fixed_min``). Each forward::

    clip_min = 0 if fixed_min
    first forward: ifmr_init and the blobs still hold the param's values ->
        (s, o) = IFMR(x) (num_bits, asymmetric, percentiles 0.999999, ratios 0.7..1.3 by 0.01)
        clip_max = s * (2^(b-1) - 1 - o),  clip_min = s * (-2^(b-1) - o)     (float32)
      prev = (clip_max, clip_min)
    (clip_max, clip_min, prev) = ClipCheck(clip_max, clip_min, prev)   -> written back into the blobs
    (s, o) = ulq_scale_offset(clip_max, clip_min, b);   y = fake_quant(x, s, o, b)

Backward (ulq_backward at the forward's clip values, float64 sums): dL/dx = g inside the grid's
range, else 0; dL/dclip_max = sum (e + upper) g and dL/dclip_min = sum (lower - e) g, each rounded
to float32 and *added* to the blob's diff (none for clip_min with fixed_min). In the TEST phase
with ``record_file_path``, scale_d / offset_d / num_bits_d and the bottom's channels, height,
width go into ``record_d`` index 0 of ``object_layer`` whenever (s, o) differ from what this layer
wrote last (through the Net's record sink, as the calibration layers write).

``RetrainWeightQuant`` (retrain_weight_quant_param): bottom x, top x itself (Caffe's ShareData
and ShareDiff in Reshape, replayed by the Net's DiffStore). Blobs of shape (cout, cin[, h, w]):
[0] the fake-quantized weight, [1] the float weight that is trained. Blob 0 carries the object
layer's weight ``param { name }``, so the Net's param sharing makes it the very Blob the following
Convolution / InnerProduct / Deconvolution computes with (a caffemodel's weight for that layer
lands in it, as in Caffe's shared memory). Forward: on the first one, an all-zero blob 1 (a fresh
net) takes blob 0's values; then ``blob0 = ARQ_fake(blob1)`` (symmetric, per output channel when
channel_wise, scales recomputed each time). Backward, straight through: ``blob1.diff = blob0.diff``
(which the object layer's backward accumulated into, when its own ParamSpec has lr_mult != 0 or
the net forces the backward: Caffe's param_propagate_down), x's diff is top's.
"""

from __future__ import annotations

import logging

import numpy as np

from amct_caffe.errors import ConfigError, GraphError
from amct_caffe.io import TEST
from amct_caffe.io.record import f32
from amct_caffe.io.schema import caffe_pb
from amct_caffe.ops import register
from amct_caffe.quant import (IfmrParams, QuantizationError, arq_retrain_backward, arq_retrain_forward,
                              ifmr_search, ulq_backward, ulq_forward)
from amct_caffe.quant.arq import arq_layout
from amct_caffe.quant.ulq import ulq_clip_check
from amct_caffe.runtime.layer import Layer
from amct_caffe.runtime.layers.quant_ops import _named
from amct_caffe.runtime.record_sink import RecordSink

_LOG = logging.getLogger(__name__)
_F32 = np.float32


def _bottom_chw(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """channels, height, width of a bottom as the C++ layers record them (amct::ChannelsHeightWidth):
    missing axes count as 1, axes past the fourth fold into width."""
    c = shape[1] if len(shape) > 1 else 1
    h = shape[2] if len(shape) > 2 else 1
    w = int(np.prod(shape[3:], dtype=np.int64)) if len(shape) > 3 else 1
    return int(c), int(h), int(w)


@register("RetrainDataQuant")
class RetrainDataQuantLayer(Layer):
    """ULQ activation retrain with learnable clip_max / clip_min (see the module doc)."""

    weights_optional = True

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        p = lp.retrain_data_quant_param
        self.num_bits = int(p.num_bits)
        if not 8 <= self.num_bits <= 16:
            raise GraphError(f"layer '{self.name}' (RetrainDataQuant): ULQ retrain_data_config: num_bits must "
                             f"be an integer in [8, 16], got {p.num_bits}")
        self.fixed_min, self.ifmr_init = bool(p.fixed_min), bool(p.ifmr_init)
        if not p.with_offset:
            _LOG.warning("layer '%s' (RetrainDataQuant): with_offset is false, but ULQ quantizes the clip range "
                         "asymmetrically (with an offset); with_offset is ignored", self.name)
        if p.record_file_path and not p.object_layer:
            raise GraphError(f"layer '{self.name}' (RetrainDataQuant): record_file_path is set but object_layer "
                             "(the layer whose record_d it fills) is empty")
        self.record_file_path, self.object_layer = p.record_file_path, p.object_layer
        # the param's values, which ifmr_init recognises as "not trained yet"
        self.init_max, self.init_min = _F32(p.clip_max), _F32(0 if self.fixed_min else p.clip_min)
        self._prev: tuple[np.float32, np.float32] | None = None  # ClipCheck's last accepted values
        self._x: np.ndarray | None = None  # x of the forward, kept when in place (the top replaces it)
        self.clip_max = self.clip_min = _F32(0)
        self.scale, self.offset = 1.0, 0
        self._written: tuple[float, int] | None = None
        self._sink = RecordSink(self.record_file_path) if self.record_file_path else None

    def on_net_built(self, net, index: int) -> None:
        if self.record_file_path:  # share the record with the Net's other writers of that file
            self._sink = net.record_sink(self.record_file_path)

    def param_shapes(self, bottom_shapes):
        return [(1,), (1,)]

    def param_fillers(self):
        filler = caffe_pb().FillerParameter
        return [filler(type="constant", value=float(self.init_max)),
                filler(type="constant", value=float(self.init_min))]

    def reshape(self, bottom_shapes):
        if any(b.count != 1 for b in self.blobs):
            raise GraphError(f"layer '{self.name}' (RetrainDataQuant): clip_max and clip_min must hold one value "
                             f"each, got {self.blobs[0].count} and {self.blobs[1].count}")
        return [tuple(bottom_shapes[0])]

    def _ifmr_clips(self, x: np.ndarray) -> tuple[np.float32, np.float32]:
        """IFMR's grid on this batch as a clip range (ifmr_init)."""
        try:
            r = ifmr_search(x, IfmrParams(num_bits=self.num_bits))
        except (QuantizationError, ConfigError) as e:
            raise _named(self, e) from e
        qmin, qmax = -(1 << (self.num_bits - 1)), (1 << (self.num_bits - 1)) - 1
        cmax, cmin = _F32(r.scale) * _F32(qmax - r.offset), _F32(r.scale) * _F32(qmin - r.offset)
        _LOG.info("RetrainDataQuant '%s': ifmr_init: IFMR scale=%.9g offset=%d -> clip_max=%.9g clip_min=%.9g",
                  self.name, r.scale, r.offset, cmax, cmin)
        return cmax, cmin

    def forward(self, bottoms):
        x = bottoms[0]
        cmax, cmin = _F32(self.blobs[0].data.reshape(-1)[0]), _F32(self.blobs[1].data.reshape(-1)[0])
        if self.fixed_min:
            cmin = _F32(0)
        if self._prev is None:
            # Only untouched blobs are initialised: a snapshot's trained clips are kept.
            if self.ifmr_init and cmax == self.init_max and cmin == self.init_min:
                cmax, cmin = self._ifmr_clips(x)
                if self.fixed_min:
                    cmin = _F32(0)
            self._prev = (cmax, cmin)
        try:
            cmax, cmin, *prev = ulq_clip_check(cmax, cmin, *self._prev)
            self._prev = tuple(prev)
            # in place: a test net sharing these arrays sees the checked values, as in Caffe
            self.blobs[0].data[...] = cmax
            self.blobs[1].data[...] = cmin
            y, self.scale, self.offset = ulq_forward(x, cmax, cmin, self.num_bits)
        except QuantizationError as e:
            raise _named(self, e) from e
        self.clip_max, self.clip_min = cmax, cmin
        self._x = x if self.in_place else None
        if self.phase == TEST and self.record_file_path:
            self._write_record(x.shape)
        return [y]

    def _write_record(self, shape) -> None:
        if self._written == (f32(self.scale), self.offset):
            return
        c, h, w = _bottom_chw(shape)
        act = self._sink.get().layer(self.object_layer, create=True).activation(0, create=True)
        act.scale_d, act.offset_d, act.num_bits_d = f32(self.scale), int(self.offset), self.num_bits
        act.channels, act.height, act.width = c, h, w
        self._sink.write()
        self._written = (f32(self.scale), self.offset)
        _LOG.info("RetrainDataQuant '%s': scale_d=%.9g offset_d=%d written for '%s'", self.name, self.scale,
                  self.offset, self.object_layer)

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        grad_max = self.param_propagate_down[0]
        grad_min = self.param_propagate_down[1] and not self.fixed_min
        if not (propagate_down[0] or grad_max or grad_min):
            return [None]
        x = self._x if self.in_place else bottoms[0]
        if x is None or x.shape != top_diffs[0].shape:
            raise GraphError(f"layer '{self.name}' (RetrainDataQuant): backward without a matching forward")
        gx, dmax, dmin = ulq_backward(x, top_diffs[0], self.clip_max, self.clip_min, self.num_bits)
        # Caffe's diff += static_cast<float>(sum): the float64 sum is rounded, then added in float32
        if grad_max:
            self.blobs[0].diff += _F32(dmax)
        if grad_min:
            self.blobs[1].diff += _F32(dmin)
        return [gx if propagate_down[0] else None]


_ARQ_TYPES = ("Convolution", "DepthwiseConv", "Deconvolution", "InnerProduct")


@register("RetrainWeightQuant")
class RetrainWeightQuantLayer(Layer):
    """ARQ retrain of the following layer's weight; x passes through (see the module doc)."""

    weights_optional = True
    shares_data = True  # Reshape: top[0]->ShareData(*bottom[0]) ...

    def diff_sharing(self, bottom_shapes):
        return "reshape"  # ... and ShareDiff: x's diff is the very memory the object layer writes

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        p = lp.retrain_weight_quant_param
        where = f"layer '{self.name}' (RetrainWeightQuant): "
        if p.layer_type not in _ARQ_TYPES:
            raise GraphError(f"{where}ARQ supports layer types {_ARQ_TYPES}, got '{p.layer_type}' "
                             "(retrain_weight_quant_param.layer_type)")
        if p.layer_type == "InnerProduct" and p.channel_wise:
            raise GraphError(f"{where}InnerProduct supports only channel_wise=false for weight quantization")
        if p.with_offset:
            raise GraphError(f"{where}ARQ retrain is symmetric (offset_w = 0); with_offset must be false")
        if not 2 <= p.num_bits <= 8:
            raise GraphError(f"{where}ARQ weight_quant_params: num_bits must be an integer in [2, 8], "
                             f"got {p.num_bits}")
        # h and w only when both are given (InnerProduct has none), as the C++ layer reads them
        hw = (int(p.h), int(p.w)) if p.HasField("h") and p.HasField("w") else ()
        self.weight_shape = (int(p.cout), int(p.cin)) + hw
        if min(self.weight_shape) <= 0:
            raise GraphError(f"{where}weight shape {self.weight_shape} (cout, cin[, h, w]) must be positive")
        self.layer_type, self.channel_wise, self.num_bits = p.layer_type, bool(p.channel_wise), int(p.num_bits)
        arq_layout(self.weight_shape, self.layer_type, self.channel_wise)  # group 1, as the C++ layout
        self._started = False

    def param_shapes(self, bottom_shapes):
        return [self.weight_shape, self.weight_shape]  # zeros without a caffemodel, as LayerSetUp

    def forward(self, bottoms):
        fake, weight = self.blobs
        if not self._started:
            if not np.any(weight.data):  # a fresh net: train the object layer's (caffemodel) weight
                weight.data[...] = fake.data
                _LOG.info("layer '%s' (RetrainWeightQuant): float weights (blob 1) initialised from blob 0",
                          self.name)
            self._started = True
        try:
            result = arq_retrain_forward(weight.data, self.layer_type, self.channel_wise, self.num_bits)
        except QuantizationError as e:
            raise _named(self, e) from e
        # in place: the object layer holds this Blob, and a test net may share its array
        fake.data[...] = result.fake
        return [bottoms[0]]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        if self.param_propagate_down[1]:
            # A copy, not a sum: blob 0's diff already accumulates over iter_size passes.
            self.blobs[1].diff = arq_retrain_backward(self.blobs[0].diff)
        return [top_diffs[0] if propagate_down[0] else None]  # the Net keeps the shared memory instead
