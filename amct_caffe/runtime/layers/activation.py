"""Element-wise activations (Caffe's NeuronLayer family) and Dropout.

Each layer type has a pure reference function named exactly after it, whose keyword arguments
are the fields of the layer's parameter message with caffe.proto's defaults, e.g.
``ReLU(x, negative_slope=0.0)``. A function never modifies ``x``: it allocates its output and
works in place on that. The layer classes read those keyword arguments from the parameter
message by name, through the proto descriptor (fields the schema in use lacks keep the default).

All math is float32, in the order Caffe's ``Forward_cpu`` uses, so results agree with Caffe to
an ulp or two. Overflow to inf and NaN from invalid inputs happen silently, as in Caffe.

Backward: each layer class carries ``grad``, the ``<Type>_grad`` function of
:mod:`.activation_grad` (None where Caffe's is NOT_IMPLEMENTED: Threshold).
"""

from __future__ import annotations

import inspect
import logging
import zlib

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.io import TEST, TRAIN
from amct_caffe.runtime import threads
from amct_caffe.runtime.layer import EmptyBackward, Layer
from amct_caffe.runtime.layers import activation_grad as G
from amct_caffe.ops import register
from amct_caffe.runtime.layers.libm_float import caffe_bnll, caffe_sigmoid, expf, logf, powf, tanhf

try:  # csrc/src/conv_cols.cpp: NumPy's maximum(x, 0) without its NaN-keeping slow path (3x faster), same bytes
    from amct_caffe._kernels import relu as RELU_KERNEL
except ImportError:
    RELU_KERNEL = None
try:  # csrc/src/conv_cols.cpp: PReLU in one pass; the PReLU function below is its reference
    from amct_caffe._kernels import prelu as PRELU_KERNEL
except ImportError:
    PRELU_KERNEL = None
# Below this many values PReLU runs on one thread.
THREADED_PRELU = 1 << 18

_LOG = logging.getLogger(__name__)
_F32 = np.float32
# Below this many values a ReLU runs on one thread.
THREADED_RELU = 1 << 18
_QUIET = {"over": "ignore", "under": "ignore", "invalid": "ignore", "divide": "ignore"}


# ------------------------------------------------------------------------ reference ops
def ReLU(x, negative_slope=0.0):
    """y = max(x, 0) + negative_slope * min(x, 0)."""
    if negative_slope == 0:
        return np.maximum(x, _F32(0))
    out = np.multiply(x, _F32(negative_slope))
    if 0 < negative_slope <= 1:  # then max(x, slope*x) is the same function, in one pass
        return np.maximum(out, x, out=out)
    np.copyto(out, x, where=x > 0)
    return out


def PReLU(x, slope):
    """y = max(x, 0) + a_c * min(x, 0), x: (N, C, ...), slope: (C,) or one shared value."""
    a = np.asarray(slope, _F32)
    a = a.reshape(()) if a.size == 1 else a.reshape((-1,) + (1,) * (x.ndim - 2))
    out = np.multiply(x, a)
    if np.all((a > 0) & (a <= 1)):
        return np.maximum(out, x, out=out)
    np.copyto(out, x, where=x > 0)
    return out


def ReLU6(x, negative_slope=0.0, threshold=6.0):
    """y = min(max(x, 0) + negative_slope * min(x, 0), threshold)  (the fork's relu6_layer)."""
    out = ReLU(x, negative_slope)
    return np.minimum(out, _F32(threshold), out=out)


def Clip(x, min, max):  # noqa: A002 - the ClipParameter field names
    """y = max(min, min(x, max))  (BVLC master's clip_layer; min > max gives min everywhere)."""
    out = np.minimum(x, _F32(max))
    return np.maximum(out, _F32(min), out=out)


def Sigmoid(x):
    """y = 1 / (1 + exp(-x)), as sigmoid_layer.cpp rounds it: glibc's expf, then the sum and the division in
    double (its literals are doubles), rounded once (:func:`.libm_float.caffe_sigmoid`)."""
    return caffe_sigmoid(x)


def TanH(x):
    """y = tanh(x), rounded as glibc's ``tanhf`` that Caffe's layer calls: NumPy's ``tanh`` is an ulp
    off it for many values, enough to flip a tie downstream (an Eltwise MAX of x and tanh(x) for a
    tiny x, where tanhf gives x itself)."""
    return tanhf(x)


def HardSigmoid(x, alpha=0.2, beta=0.5):
    """y = max(0, min(1, alpha * x + beta))  (the fork's hardsigmoid_layer)."""
    out = np.multiply(x, _F32(alpha))
    out += _F32(beta)
    # std::min(Dtype(1), v) is (v < 1) ? v : 1, so NaN gives 1: fmin, not minimum
    np.fmin(out, _F32(1), out=out)
    return np.maximum(out, _F32(0), out=out)


def HardSwish(x):
    """y = x * max(0, min(1, x / 6 + 0.5))  (the fork's hardswish_layer)."""
    out = np.divide(x, _F32(6))
    out += _F32(0.5)
    np.minimum(out, _F32(1), out=out)
    np.maximum(out, _F32(0), out=out)
    return np.multiply(out, x, out=out)


def Swish(x, beta=1.0):
    """y = x * sigmoid(beta * x), sigmoid(t) = 0.5 * tanh(0.5 * t) + 0.5  (BVLC master)."""
    out = np.multiply(x, _F32(0.5 * beta))
    np.tanh(out, out=out)
    out *= _F32(0.5)
    out += _F32(0.5)
    return np.multiply(out, x, out=out)


def Power(x, power=1.0, scale=1.0, shift=0.0):
    """y = (shift + scale * x) ^ power.

    When power * scale == 0 the input is ignored: y = 1 if power == 0 else shift ^ power.
    """
    power, scale, shift = _F32(power), _F32(scale), _F32(shift)
    with np.errstate(**_QUIET):
        if power * scale == 0:
            value = _F32(1) if power == 0 else powf(np.asarray(shift), power)[()]
            return np.full(x.shape, value, _F32)
        out = np.multiply(x, scale) if scale != 1 else None
        if shift != 0:
            out = np.add(x, shift) if out is None else np.add(out, shift, out=out)
        if power == 1:
            return x if out is None else out
        # caffe_powx: glibc's powf for every power, 2 and 0.5 included (not always the correctly rounded
        # square or root numpy's square / sqrt give; pow(-inf, 0.5) = +inf and pow(-0, 0.5) = +0 as well)
        return powf(x if out is None else out, power)


def AbsVal(x):
    """y = |x|."""
    return np.abs(x)


def BNLL(x):
    """y = log(1 + exp(x)) as bnll_layer.cpp computes it (:func:`.libm_float.caffe_bnll`)."""
    return caffe_bnll(x)


def ELU(x, alpha=1.0):
    """y = max(x, 0) + alpha * (exp(min(x, 0)) - 1), in float with glibc's expf (elu_layer.cpp)."""
    out = expf(np.minimum(x, _F32(0)))
    out -= _F32(1)
    out *= _F32(alpha)
    out += np.maximum(x, _F32(0))
    return out


def _log_base(base) -> np.float32:
    """log(base) in float32; base -1 stands for e (log 1 exactly), as in Caffe's Exp/Log layers."""
    if base == -1:
        return _F32(1)
    if not base > 0:
        raise ValueError(f"base must be strictly positive (or -1 for e), got {base}")
    return logf(np.asarray(_F32(base)))[()]  # Caffe's log(Dtype): logf


def Exp(x, base=-1.0, scale=1.0, shift=0.0):
    """y = base ^ (shift + scale * x); base -1 means e.

    Caffe's order: y = exp(log(base) * scale * x) * base^shift, each step rounded to float32,
    exp, log and pow as Caffe's calls of glibc's expf, logf and powf (:mod:`.libm_float`).
    """
    inner = _log_base(base) * _F32(scale)
    if shift == 0:
        outer = _F32(1)
    else:
        outer = (expf(_F32(shift)) if base == -1 else powf(np.asarray(_F32(base)), shift))[()]
    # a factor of 0 (inner, or an outer base^shift that underflowed) is Caffe's BLAS sscal by 0: zeros
    # even where x is inf or NaN
    if outer == 0:
        return np.zeros(x.shape, _F32)
    with np.errstate(**_QUIET):
        if inner == 0:
            out = np.full(x.shape, outer, _F32)
        else:
            out = expf(x if inner == 1 else np.multiply(x, inner))
            if outer != 1:
                out *= outer
    return out


def Log(x, base=-1.0, scale=1.0, shift=0.0):
    """y = log_base(shift + scale * x); base -1 means e.

    Caffe's order: y = ln(shift + scale * x) * (1 / ln(base)), each step rounded to float32, ln
    glibc's logf itself (:func:`.libm_float.logf`).
    """
    log_base = _log_base(base)
    if log_base == 0:
        raise ValueError("base 1 has no logarithm (1 / log(base) is infinite)")
    base_scale = _F32(1) / log_base
    with np.errstate(**_QUIET):
        # scale 0: Caffe's BLAS sscal by 0 writes zeros, even where x is inf or NaN
        out = (np.zeros(x.shape, _F32) if scale == 0 else np.multiply(x, _F32(scale)) if scale != 1
               else np.asarray(x, _F32) if shift == 0 else np.array(x, _F32, copy=True))  # (logf makes a new array)
        if shift != 0:
            out += _F32(shift)
        out = logf(out)
        if base_scale != 1:
            out *= base_scale
    return out


def Threshold(x, threshold=0.0):
    """y = 1 if x > threshold else 0."""
    return np.greater(x, _F32(threshold)).astype(_F32)


def dropout_scale(dropout_ratio) -> np.float32:
    """Caffe's scale_ = 1. / (1. - threshold_), in double, stored as float."""
    if not 0 <= dropout_ratio < 1:
        raise ValueError(f"dropout_ratio must be in [0, 1), got {dropout_ratio}")
    return _F32(1.0 / (1.0 - float(_F32(dropout_ratio))))


def dropout_mask(shape, dropout_ratio, rng) -> np.ndarray:
    """Keep mask of a TRAIN forward: True with probability 1 - dropout_ratio."""
    return rng.random(shape, dtype=_F32) >= _F32(dropout_ratio)


def Dropout(x, dropout_ratio=0.5, scale_train=True, train=False, rng=None, mask=None):
    """TEST: y = x. TRAIN: y = x * mask / (1 - dropout_ratio), mask ~ Bernoulli(1 - dropout_ratio).

    ``scale_train`` (a field of some Caffe forks' DropoutParameter, absent from the SSD fork)
    false moves the scaling to TEST: TRAIN y = x * mask, TEST y = x * (1 - dropout_ratio).
    ``mask`` (TRAIN) is a keep mask drawn beforehand (:func:`dropout_mask`), else one is drawn.
    """
    if not train and scale_train:
        return x  # whatever the ratio, as Caffe (its range check is a debug-only DCHECK)
    scale = dropout_scale(dropout_ratio)
    if not train:
        return np.multiply(x, _F32(1.0 / float(scale)))
    if mask is None:
        mask = dropout_mask(x.shape, dropout_ratio, np.random.default_rng() if rng is None else rng)
    out = np.multiply(x, mask)  # Caffe's order: x * mask * scale
    if scale_train and scale != 1:
        out *= scale
    return out


# ------------------------------------------------------------------------ layers
def _param_kwargs(lp, field: str | None, fn) -> dict:
    """Keyword arguments of ``fn`` (after x) read by name from ``lp.<field>``."""
    if field is None or field not in lp.DESCRIPTOR.fields_by_name:
        return {}
    msg = getattr(lp, field)
    names = list(inspect.signature(fn).parameters)[1:]
    fields = msg.DESCRIPTOR.fields_by_name
    return {n: getattr(msg, n) for n in names if n in fields}


class _Neuron(Layer):
    """One bottom, one top of the same shape: ``top = fn(bottom, **params)``.

    Parameters are read (and checked, by a run on an empty input) at construction, like
    Caffe's ``LayerSetUp``.
    """

    fn = staticmethod(lambda x: x)
    # grad(dy, x, y, **kwargs) -> dx, x / y as Caffe holds them at backward time; None: no backward
    grad = None
    # Caffe's Backward_cpu builds the local derivative g in the bottom diff before multiplying
    # by the top diff (Power, Log); in place the two are one buffer, so it yields g * g
    clobbers_top_diff = False
    param_field: str | None = None

    def __init__(self, lp, phase: int = TEST):
        super().__init__(lp, phase)
        self.kwargs = self.read_params()
        try:
            self.fn(np.zeros(0, _F32), **self.kwargs)
        except ValueError as e:
            raise GraphError(f"layer '{self.name}' ({self.type}): {e}") from None

    def read_params(self) -> dict:
        return _param_kwargs(self.lp, self.param_field, self.fn)

    def forward(self, bottoms):
        x = bottoms[0]
        if x.ndim == 0:  # a 0-axis blob (Reduction over axis 0): numpy ufuncs would give scalars
            return [np.asarray(self.fn(x.reshape(1), **self.kwargs)).reshape(())]
        return [self.fn(x, **self.kwargs)]

    @classmethod
    def has_backward(cls) -> bool:
        return cls.grad is not None

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """dx = grad(dy, x, y): see :mod:`.activation_grad` for each type's formula."""
        if not propagate_down[0]:
            return [None]
        dy, x, y = top_diffs[0], bottoms[0], tops[0]
        if dy.ndim == 0:  # a 0-axis blob: keep the ufuncs on arrays, as forward does
            dy, x, y = dy.reshape(1), x.reshape(1), y.reshape(1)
        if self.in_place and self.clobbers_top_diff:
            if not getattr(self, "_warned", False):
                self._warned = True
                _LOG.warning("layer '%s' (%s) in place: Caffe's backward overwrites the top diff before "
                             "reading it, so the bottom diff is the local derivative squared, not the "
                             "gradient; reproduced as Caffe computes it", self.name, self.type)
            g = self.grad(np.ones_like(dy), x, y, **self.kwargs)
            return [np.multiply(g, g, out=g)]
        return [self.grad(dy, x, y, **self.kwargs)]


class _ReLUNeuron(_Neuron):
    """ReLU, whose common form (negative slope 0) may write into the Net's array (see ``prepared_forward_into``)."""

    def prepared_forward_into(self, bottom_shapes):
        if self.kwargs.get("negative_slope", 0.0) != 0 or len(bottom_shapes[0]) == 0:
            return None
        zero = _F32(0)

        def forward(bottoms, outs):  # ReLU(x): maximum(x, 0), into outs[0] if given
            x = bottoms[0]
            if RELU_KERNEL is not None and x.dtype == _F32 and x.flags.c_contiguous:
                return [RELU_KERNEL(x, threads.workers() if x.size >= THREADED_RELU else 1, outs[0])]
            return [np.maximum(x, zero, out=outs[0])]
        return forward


class _EmptyBackward(EmptyBackward, _Neuron):
    """An activation whose Caffe ``Backward_cpu`` is an empty body (the fork's HardSigmoid, HardSwish)."""


def _neuron(type_name: str, fn, param_field: str | None = None, grad=None, base=_Neuron):
    cls = type(f"{type_name}Layer", (base,), {
        "fn": staticmethod(fn), "param_field": param_field,
        "grad": None if grad is None else staticmethod(grad),
        "__doc__": f"Caffe's {type_name} layer: {fn.__doc__.splitlines()[0]}",
        "__module__": __name__})
    return register(type_name)(cls)


ReLULayer = _neuron("ReLU", ReLU, "relu_param", G.ReLU_grad, base=_ReLUNeuron)
ReLU6Layer = _neuron("ReLU6", ReLU6, "relu6_param", G.ReLU6_grad)
SigmoidLayer = _neuron("Sigmoid", Sigmoid, None, G.Sigmoid_grad)
TanHLayer = _neuron("TanH", TanH, None, G.TanH_grad)
HardSigmoidLayer = _neuron("HardSigmoid", HardSigmoid, "hardsigmoid_param", base=_EmptyBackward)
HardSwishLayer = _neuron("HardSwish", HardSwish, base=_EmptyBackward)
PowerLayer = _neuron("Power", Power, "power_param", G.Power_grad)
PowerLayer.clobbers_top_diff = True
AbsValLayer = _neuron("AbsVal", AbsVal, None, G.AbsVal_grad)
AbsValLayer.in_place_ok = False  # absval_layer.cpp's LayerSetUp: CHECK_NE(top[0], bottom[0])
BNLLLayer = _neuron("BNLL", BNLL, None, G.BNLL_grad)
ELULayer = _neuron("ELU", ELU, "elu_param", G.ELU_grad)
ExpLayer = _neuron("Exp", Exp, "exp_param", G.Exp_grad)
LogLayer = _neuron("Log", Log, "log_param", G.Log_grad)
LogLayer.clobbers_top_diff = True
ThresholdLayer = _neuron("Threshold", Threshold, "threshold_param")  # Caffe: NOT_IMPLEMENTED


@register("Swish")
class SwishLayer(_Neuron):
    """Caffe's Swish layer (BVLC master): y = x * sigmoid(beta * x)."""

    fn = staticmethod(Swish)
    grad = staticmethod(G.Swish_grad)
    param_field = "swish_param"

    def forward(self, bottoms):
        # Caffe keeps sigmoid(beta * x) for an in-place backward; we keep x (never modified)
        self._x = bottoms[0]
        return super().forward(bottoms)

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        return super().backward(top_diffs, propagate_down, [self._x], tops)


@register("Clip")
class ClipLayer(_Neuron):
    """Caffe's Clip layer (BVLC master): y = max(min, min(x, max)); both bounds are required."""

    fn = staticmethod(Clip)
    grad = staticmethod(G.Clip_grad)
    param_field = "clip_param"

    def read_params(self):
        if self.param_field not in self.lp.DESCRIPTOR.fields_by_name:
            raise GraphError(f"layer '{self.name}' (Clip): the caffe.proto in use has no clip_param")
        p = self.lp.clip_param
        if not (p.HasField("min") and p.HasField("max")):
            raise GraphError(f"layer '{self.name}' (Clip): clip_param needs both min and max")
        return {"min": p.min, "max": p.max}


@register("Dropout")
class DropoutLayer(_Neuron):
    """Caffe's Dropout layer: identity in TEST; in TRAIN a fresh random mask per forward.

    The TRAIN mask comes from a generator seeded by the layer name, so runs are reproducible
    (Caffe's masks depend on its own RNG and cannot be matched bit for bit anyway); it is kept
    for the backward, dx = dy * mask * scale, as Caffe keeps rand_vec_.
    """

    fn = staticmethod(Dropout)
    param_field = "dropout_param"

    def read_params(self):
        kwargs = _param_kwargs(self.lp, self.param_field, self.fn)
        for k in ("train", "rng", "mask"):
            kwargs.pop(k, None)
        if self.phase == TRAIN:
            kwargs.update(train=True, rng=np.random.default_rng(zlib.crc32(self.name.encode())))
        return kwargs

    def forward(self, bottoms):
        x = bottoms[0]
        self._mask = None
        if self.phase != TRAIN:
            return super().forward(bottoms)
        kw = dict(self.kwargs)
        self._mask = dropout_mask(x.shape or (1,), kw["dropout_ratio"], kw.pop("rng"))
        return [Dropout(x.reshape(self._mask.shape), mask=self._mask, **kw).reshape(x.shape)]

    @classmethod
    def has_backward(cls) -> bool:
        return True

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """TRAIN: dx = dy * mask * scale (scale 1 / (1 - ratio), or 1 without scale_train);
        TEST: dx = dy (times 1 - ratio when scale_train is false)."""
        if not propagate_down[0]:
            return [None]
        ratio, scale_train = self.kwargs["dropout_ratio"], self.kwargs.get("scale_train", True)
        if self.phase == TRAIN:
            scale = dropout_scale(ratio) if scale_train else _F32(1)
        else:
            scale = _F32(1) if scale_train else _F32(1.0 / float(dropout_scale(ratio)))
        dy = top_diffs[0]
        mask = self._mask if self.phase == TRAIN else None
        return [G.Dropout_grad(dy.reshape(mask.shape) if mask is not None else dy, mask, scale)]


@register("PReLU")
class PReLULayer(Layer):
    """Caffe's PReLU layer: per-channel (axis 1) learned negative slope.

    Blob 0: slopes, shape (C,), or shape () when ``channel_shared``; filled with constant
    0.25 unless ``prelu_param.filler`` says otherwise.
    """

    def _channels(self, shape) -> int:
        # prelu_layer.cpp reads bottom[0]->channels(), a legacy accessor: Blob CHECKs <= 4 axes
        if not 2 <= len(shape) <= 4:
            raise GraphError(f"layer '{self.name}' (PReLU): the bottom needs 2 to 4 axes, it has shape "
                             f"{list(shape)}")
        return int(shape[1])

    def param_shapes(self, bottom_shapes):
        c = self._channels(bottom_shapes[0])
        return [() if self.lp.prelu_param.channel_shared else (c,)]

    def param_fillers(self):
        p = self.lp.prelu_param
        return [p.filler if p.HasField("filler") else type(p.filler)(type="constant", value=0.25)]

    def reshape(self, bottom_shapes):
        c = self._channels(bottom_shapes[0])
        want = 1 if self.lp.prelu_param.channel_shared else c
        if self.blobs and self.blobs[0].data.size != want:
            raise GraphError(f"layer '{self.name}' (PReLU): {self.blobs[0].data.size} slopes for a bottom "
                             f"with {c} channels (channel_shared={self.lp.prelu_param.channel_shared})")
        return [tuple(bottom_shapes[0])]

    def forward(self, bottoms):
        # Caffe copies the input of an in-place PReLU for its backward; ours is never overwritten
        x = self._x = bottoms[0]
        slope = self.blobs[0].data
        if PRELU_KERNEL is not None and x.dtype == _F32 and x.flags.c_contiguous and slope.dtype == _F32 \
                and slope.flags.c_contiguous:  # one C++ pass, the bytes of PReLU's NumPy
            return [PRELU_KERNEL(x, slope, threads.workers() if x.size >= THREADED_PRELU else 1)]
        return [PReLU(x, slope)]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """dx = dy * ((x > 0) + a_c * (x <= 0)); slope diff += sum dy * x * (x <= 0) per channel."""
        want_slope = bool(self.param_propagate_down and self.param_propagate_down[0])
        dx, dslope = G.PReLU_grads(top_diffs[0], self._x, self.blobs[0].data, self.lp.prelu_param.channel_shared,
                                   want_x=propagate_down[0], want_slope=want_slope)
        if dslope is not None:
            self.blobs[0].diff += dslope
        return [dx]
