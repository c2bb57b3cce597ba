"""Convolutions (and Eltwise layers) and the in-place chains after them, run as one step of the Net.

A prototxt's BatchNorm, Scale and ReLU layers computed in place on a Convolution's top
(``top == bottom == conv top``, the layers following each other) leave only their last value
in the blob: nobody, pycaffe user or later layer, can read the values in between. The Net may
then run the chain as one step on the convolution's output array, without the temporaries of
the separate layers. Two modes (:class:`FoldMode`):

* ``EXACT``: each layer's arithmetic in Caffe's order, done in place on the convolution's output
  (bias added by the convolution; BatchNorm ``y = (y - m) / sqrt(v + eps)``, one subtraction and
  one division; Scale ``y = y * s + beta``; ReLU ``y = max(y, 0)``): the bytes of the unfolded
  layers, minus their copies.
* ``FAST``: BatchNorm and Scale folded into one per-channel affine map computed in float64 from
  the layers' current blobs and applied to the bias-free GEMM result, then ReLU in place::

      a = prod_l a_l,  b = (...((bias * a_1 + b_1) * a_2 + b_2)...),
      BatchNorm: a_l = 1 / sqrt(v + eps), b_l = -m / sqrt(v + eps);  Scale: a_l = s, b_l = beta
      y = max(W (*) x * a + b, 0)

  Each element is rounded once (twice with the ReLU) instead of four to five times, so it
  differs from Caffe's by a few float32 ulps of the larger of the terms (measured: at most
  ~1e-6 relative on open_nsfw's blobs); a fake-quant model's next Quant layer could round such a
  value the other way, which is why FAST is only for float models. A 3x3 stride-1 convolution in
  such a chain runs as Winograd F(4x4 or 2x2, 3x3) (:mod:`.layers.winograd`: 2.25-4x fewer
  multiplies, at most 1.4e-5 of a blob's scale from Caffe on open_nsfw), with the affine map and the
  ReLU applied by its output transform. A 1x1
  convolution (no padding or groups) in such a chain runs
  in the pointwise kernel where the CPU has AVX-512, or AVX2 for at most :data:`POINTWISE_AVX2_MAX_K`
  input channels (``csrc/src/pointwise_conv.cpp``: one fused multiply-add per input channel in order,
  the affine map and ReLU applied as it stores). A chain
  without BatchNorm / Scale (a convolution and a ReLU) keeps Caffe's arithmetic in both modes.

A chain whose result reaches a layer that squashes large values (:data:`_SQUASHING`: TanH, Sigmoid,
Softmax, ReLU6, Clip, Exp...; or a Python layer) before the next Convolution / InnerProduct runs EXACT
even in a FAST net (:func:`_fast_safe`): FAST's differences, small against the chain's values, would be
large against the squashed output (a TanH on a chain of raw pixels: 2.9e-4 of the TanH's output from
Caffe with Winograd, 1.3e-4 with the folded map alone; Caffe's own is 5e-5 from float64). Past a
convolution a squash can still show them, as it shows any float32 rounding upstream: on a net of
pre-activations in the hundreds, a 1x1 convolution then a TanH after a FAST chain differed from the
unfolded net by 2.3e-4 of the TanH's output (Caffe from float64: 6.9e-5), and a deep such net can differ
from Caffe by more than 1e-4 with no folding at all. Nets of normalized activations stay far below (the
shared models: at most 1.4e-5 of a blob's scale); ``fold="exact"`` gives Caffe's arithmetic.

The per-channel steps after the GEMM (FAST's ``y * a + b`` and the ReLU, a ReLU alone) run as one
C++ pass over the output where the extension is built (``channel_affine`` in
``csrc/src/conv_cols.cpp``: the same two float32 roundings as NumPy's ``y *= a; y += b``, so the
same bytes), instead of one NumPy pass each.

In FAST mode, a chain that ends with BatchNorm / Scale and is followed by an Eltwise SUM of its top
and another blob with an in-place ReLU (the end of a residual block) runs the Eltwise too
(``residual``): ``y = conv * a + b`` is written as the chain's top and ``max(y + other, 0)`` as the
Eltwise's in the same pass (``affine_add_relu``), the bytes of the separate steps.

An in-place PReLU may end a Convolution's chain like a ReLU: it is applied in place on the chain's fresh
top (``bias_prelu``, activation.PReLU's bytes); only a ReLU joins an Eltwise.

An Eltwise followed by an in-place ReLU (a residual block's end) is folded the same way: the ReLU
runs in place on the Eltwise's fresh result, or, for the plain sum of two blobs, ``max(x0 + x1, 0)``
in one C++ pass (``add_relu``); the same bytes in both modes. In FAST, a BatchNorm writing a top of its own with
Scale / ReLU in place on it (MobileNet-v2) heads a chain: x - mean, then the rest in one pass (31.8 -> 25.1 ms).

A third mode, ``CALIBRATION``, folds as FAST does (but for the residual Eltwise, which stays FAST's) and gives
the fast kernels (Winograd, the pointwise kernel) to every convolution that Caffe's arithmetic would run as a
column GEMM (not the direct, depthwise or one-call paths, which are as fast and keep its bytes), with or
without a BatchNorm / Scale after it, alone as a chain of its own when no in-place layer follows; the first
forward and the prepared later ones choose alike. It is for calibration nets: their BatchNorms are already
fused into the weights, so FAST would find nothing to fold, and their IFMR layers' streaming observer bins the
values anyway (2^14 bins of the range, :mod:`amct_caffe.quant.ifmr_stream`); SearchN's shifts and BNUpdate's
statistics read the same values (a BNUpdate dump moved by 4e-8 relative in a review's check). Measured on the
shared models (open_nsfw, UltraFace slim-320 and RFB-320, MiniNet-SSD, MTCNN P- and O-Net; two batches of
normal noise), every ``scale_d`` was within 8.4e-7 relative of an EXACT net's (open_nsfw on raw 0-255 pixels:
1.1e-6) and every ``offset_d`` equal; open_nsfw's four calibration forwards at batch 8 take 1.02 s instead of
1.18 s. Winograd's transformed weights ((m+2)^2 / 9 times a layer's weights, plus the copy of the weights they
were made from) are kept only where they hold at most :data:`TRANSFORMED_PER_BLOBS` (4) times the values of the
layer's input and output, so that a calibration net's memory stays about that of its blobs: open_nsfw at batch 8
takes F(4x4) on its 56x56, 28x28 and 14x14 maps (+17 MiB of peak; on the 7x7 ones too it was +70 MiB), MiniNet-SSD
on its two larger 3x3 heads. On Zen 4 the 14x14 layers' column GEMMs took 6-11 ms, Winograd 2.2-2.8 ms (a
calibration forward of open_nsfw 231 -> 213 ms, on a loaded machine); with the rule against the output alone
(before) they ran the GEMMs. A layer that no longer meets the rule (a smaller batch) lets go of them.

:func:`plan` picks the chains (only in nets that need no backward: the backward reads each
layer's own input) and the mode: ``"auto"`` is CALIBRATION for a net whose inserted layers only observe
(IFMR, SearchN, BNUpdate) and whose IFMR layers stream (``Net(..., ifmr="stream")``, the default), EXACT
for any other net holding a layer the tool inserts (Quant, DeQuant, AntiQuant, the retrain layers; or IFMR
with ``ifmr="exact"``, which reproduces patched Caffe's record), and FAST otherwise.
``Net(..., fold="exact" | "fast" | "calibration" | "off")`` forces one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from amct_caffe import ops
from amct_caffe.errors import GraphError
from amct_caffe.runtime import threads
from amct_caffe.runtime.layers.batch_norm import _std, global_moments
from amct_caffe.runtime.layers import winograd
from amct_caffe.runtime.layers.activation import PReLU
from amct_caffe.runtime.layers.conv import Convolution
from amct_caffe.runtime.layers.conv_plan import conv_plan, simd_level
from amct_caffe.runtime.layers.eltwise import SUM

try:  # csrc/src/conv_cols.cpp; the NumPy lines beside each call are its reference
    from amct_caffe._kernels import add_relu as ADD_RELU_KERNEL
    from amct_caffe._kernels import channel_affine as AFFINE_KERNEL
except ImportError:
    ADD_RELU_KERNEL = AFFINE_KERNEL = None
try:
    from amct_caffe._kernels import affine_add_relu as AFFINE_ADD_RELU_KERNEL
except ImportError:
    AFFINE_ADD_RELU_KERNEL = None
try:  # a PReLU ending a chain: the bias add and PReLU's select in one call (activation.PReLU's bytes)
    from amct_caffe._kernels import bias_prelu as BIAS_PRELU_KERNEL
except ImportError:
    BIAS_PRELU_KERNEL = None
try:  # csrc/src/pointwise_conv.cpp: a FAST chain's 1x1 convolution with its epilogue in the stores (AVX2 / AVX-512)
    from amct_caffe._kernels import pointwise_conv as POINTWISE_KERNEL
except ImportError:
    POINTWISE_KERNEL = None
# Below this many values the per-channel pass runs on one thread.
THREADED_AFFINE = 1 << 18
# ... below this many multiply-adds the pointwise kernel
THREADED_POINTWISE = 1 << 21
# Output maps of fewer pixels per image run the 1x1 GEMM: the kernel's 48-pixel blocks would be partly empty
# (open_nsfw's 7x7 layers at batch 8: 2.5-2.6 ms against 2.4-2.5 through OpenBLAS; 14x14: 2.0 against 2.2-2.4).
POINTWISE_MIN_PIXELS = 128
# A calibration net keeps a layer's Winograd weights ((m+2)^2 / 9 times its weights) only up to this many times
# the values of the layer's input and output (module doc).
TRANSFORMED_PER_BLOBS = 4
# With AVX2 only (4 channels per pass, amct/register_block.h) the kernel beats OpenBLAS's Haswell GEMM plus the
# pass up to this K (measured with OpenBLAS's Haswell kernels: K = 32-128 0.74-0.90 of their time, K = 256-1024
# 1.15-1.21).
POINTWISE_AVX2_MAX_K = 128

_F32 = np.float32
_QUIET = {"over": "ignore", "invalid": "ignore", "divide": "ignore"}


class FoldMode(enum.Enum):
    OFF = "off"
    EXACT = "exact"
    FAST = "fast"
    CALIBRATION = "calibration"  # FAST's kernels wherever Caffe's would run a column GEMM, BatchNorm or not


@dataclass(frozen=True)
class Chain:
    """Layer ``first`` (a Convolution, or an Eltwise before a ReLU) and the in-place layers
    ``first + 1 .. last`` folded into it (none in CALIBRATION's lone convolutions: ``last == first``)."""

    first: int
    last: int
    head: object        # the ConvolutionLayer or EltwiseLayer
    members: tuple      # the BatchNorm / Scale / ReLU layers, in order
    mode: FoldMode
    residual: int | None = None  # FAST: index of an Eltwise SUM + in-place ReLU run with the chain
    other: int = 0               # ... and which of its two bottoms is not the chain's top
    weights: winograd.WeightCache = field(default_factory=winograd.WeightCache, compare=False, repr=False)

    def forward(self, bottoms: list[np.ndarray], other: np.ndarray | None = None,
                into: tuple = (None, None)) -> list[np.ndarray]:
        """The tops for the head's ``bottoms``: [the chain's final value], or with ``residual``
        [the chain's final value, the Eltwise's after its ReLU] (``other``: the Eltwise's other bottom).

        ``into``: for each top, None or an array its value may be written into instead of fresh memory
        (the top's array of the last forward when no one else holds it: runtime/forward.py); the kernels
        take it only when it has the top's shape and shares no memory with what they read."""
        if self.residual is not None:
            return self._residual(bottoms[0], other, into)
        return [self._single(bottoms, into[0])]

    def _residual(self, x: np.ndarray, other: np.ndarray, into: tuple) -> list[np.ndarray]:
        """conv -> BatchNorm/Scale (FAST) as y, then max(y + other, 0), in one pass where possible."""
        conv = self.head
        _, stride, pad, dilation = conv._geom  # noqa: SLF001 - set by the layer's reshape
        weight = conv.blobs[0].data
        group = conv.lp.convolution_param.group
        if AFFINE_ADD_RELU_KERNEL is None or winograd.applies(weight.shape, stride, dilation, group) \
                or _pointwise_applies(x, weight, stride, pad, group):
            y = self._single([x], into[0])
        else:
            bias = conv.blobs[1].data if len(conv.blobs) > 1 else None
            y = Convolution(x, weight, None, stride=stride, pad=pad, dilation=dilation, group=group, into=into[0])
            a, b = channel_affine(self.members, bias, y.shape[1])
            if y.shape == other.shape and y.flags.c_contiguous and other.flags.c_contiguous \
                    and other.dtype == _F32:
                return [y, AFFINE_ADD_RELU_KERNEL(y, a, b, other, _threads(y), into[1])]
            _affine(y, a, b, relu=False)
        if _plain_pair(y, other):
            return [y, ADD_RELU_KERNEL(y, other, _threads(y), into[1])]
        s = np.add(other.reshape(y.shape), y)  # eltwise.Eltwise's SUM (coefficients 1), then the ReLU
        return [y, np.maximum(s, _F32(0), out=s)]

    def prepared(self, x_shape: tuple):
        """None, or ``forward(x) -> top`` for a Convolution head alone or with a ReLU or PReLU after it, on a small
        ``x_shape`` input: the head's prepared call with the activation (:meth:`.conv._BaseConv.prepared_small`),
        the bytes of :meth:`forward`."""
        if self.head.type != "Convolution" or self.residual is not None or len(self.members) > 1 \
                or any(m.type not in ("ReLU", "PReLU") for m in self.members) \
                or self.mode is FoldMode.CALIBRATION and self._calibration_kernels(x_shape):
            return None
        return self.head.prepared_small(x_shape, self.members[0] if self.members else None)

    def _calibration_kernels(self, x_shape) -> bool:
        """CALIBRATION: whether the convolution takes FAST's kernels on inputs of ``x_shape``. Only where Caffe's
        arithmetic runs a column GEMM (:attr:`~.conv_plan.ConvPlan.column_gemm`), which they beat; the direct,
        depthwise and one-call paths are as fast and keep Caffe's bytes (MTCNN O-Net at batch 16: 15.9 ms a
        calibration forward with them, 21.8 ms with Winograd on its small layers instead)."""
        conv = self.head
        _, stride, pad, dilation = conv._geom  # noqa: SLF001 - set by the layer's reshape
        weight = conv.blobs[0].data
        if len(x_shape) != 4 or weight.ndim != 4:
            return False
        return conv_plan(tuple(x_shape), weight.shape, stride, pad, dilation,
                         conv.lp.convolution_param.group).column_gemm

    def _single(self, bottoms: list[np.ndarray], into: np.ndarray | None = None) -> np.ndarray:
        relu = bool(self.members) and self.members[-1].type == "ReLU"
        if self.head.type == "Convolution":
            y, done = self._convolution(bottoms[0], relu, into)
            relu = relu and not done
            if self.members and self.members[-1].type == "PReLU":
                _prelu(y, self.members[-1])
        elif self.head.type == "BatchNorm":  # out of place: x - mean as Caffe's first step, then one affine pass
            x = bottoms[0]
            y = into if into is not None and into.shape == x.shape and not np.may_share_memory(into, x) \
                else np.empty(x.shape, _F32)
            mean, _ = global_moments(*(blob.data for blob in self.head.blobs[:3]))  # (first: as a shift it cancels)
            np.subtract(x, np.asarray(mean, _F32).reshape((-1,) + (1,) * (x.ndim - 2)), out=y)
            a, b = channel_affine((self.head,) + tuple(m for m in self.members if m.type in ("BatchNorm", "Scale")),
                                  None, x.shape[1], centred=True)
            _affine(y, a, b, relu)
            if self.members and self.members[-1].type == "PReLU":
                _prelu(y, self.members[-1])
            return y
        elif relu and _plain_sum(self.head, bottoms):  # a residual sum and its ReLU in one pass
            return ADD_RELU_KERNEL(bottoms[0], bottoms[1], threads.workers() if bottoms[0].size >= THREADED_AFFINE
                                   else 1, into)
        else:  # an Eltwise: its result is a fresh array nobody else holds
            (y,) = self.head.forward(bottoms)
        if relu:
            _affine(y, None, None, relu=True)  # activation.ReLU with negative_slope 0
        return y

    def _convolution(self, x: np.ndarray, relu: bool, into: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
        """The convolution and the affine members; (y, whether ``relu`` was applied too). ``into``: see
        :meth:`forward`."""
        conv = self.head
        _, stride, pad, dilation = conv._geom  # noqa: SLF001 - set by the layer's reshape
        weight = conv.blobs[0].data
        bias = conv.blobs[1].data if len(conv.blobs) > 1 else None
        affine = [m for m in self.members if m.type not in ("ReLU", "PReLU")]
        group = conv.lp.convolution_param.group
        # FAST's kernels only where FAST already gives up Caffe's bytes (a BatchNorm / Scale folded): a
        # convolution + ReLU chain stays exact, as float nets without BatchNorm are Caffe's bit for bit; a
        # CALIBRATION net takes them on every chain
        folded = bool(affine) and self.mode in (FoldMode.FAST, FoldMode.CALIBRATION)  # one map y * a + b
        fast = folded or self.mode is FoldMode.CALIBRATION and self._calibration_kernels(x.shape)  # Winograd, 1x1
        if fast and winograd.available() and x.ndim == 4 and winograd.applies(weight.shape, stride, dilation, group) \
                and min(x.shape[2] + 2 * pad[0], x.shape[3] + 2 * pad[1]) > 2 and x.size > 0:
            ho, wo = x.shape[2] + 2 * pad[0] - 2, x.shape[3] + 2 * pad[1] - 2
            m = winograd.tile_size(ho, wo)
            # a calibration net's transformed weights stay within TRANSFORMED_PER_BLOBS times the layer's input and
            # output (module doc)
            if self.mode is FoldMode.FAST or (m + 2) ** 2 * weight.shape[0] * weight.shape[1] <= \
                    TRANSFORMED_PER_BLOBS * (x.size + x.shape[0] * weight.shape[0] * ho * wo):
                a, b = channel_affine(affine, bias, weight.shape[0])
                return winograd.conv3x3(x, self.weights.get(weight, m), m, pad, a, b, relu, into), relu
        if self.mode is FoldMode.CALIBRATION:
            self.weights.clear()  # (no Winograd on these inputs: a smaller batch)
        if fast and _pointwise_applies(x, weight, stride, pad, group):
            a, b = channel_affine(affine, bias, weight.shape[0])
            return _pointwise(x, weight, stride, a, b, relu, into), relu
        if (folded or not affine) and x.ndim == 4:  # the epilogue in the direct kernel's stores, where it runs
            a, b = channel_affine(affine, bias, weight.shape[0]) if folded else (None, bias)
            y = conv_plan(x.shape, weight.shape, stride, pad, dilation, group).fused(x, weight, a, b, relu, into)
            if y is not None:
                return y, relu
        y = Convolution(x, weight, None if folded else bias, stride=stride, pad=pad, dilation=dilation,
                        group=group, into=into)
        shape = (-1,) + (1,) * (y.ndim - 2)
        with np.errstate(**_QUIET):
            if folded:
                a, b = channel_affine(affine, bias, y.shape[1])
                _affine(y, a, b, relu)
                return y, relu
            for m in affine:
                if m.type == "BatchNorm":  # batch_norm._normalize, in place
                    mean, var = global_moments(m.blobs[0].data, m.blobs[1].data, m.blobs[2].data)
                    y -= np.asarray(mean, _F32).reshape(shape)
                    y /= _std(var, m.eps).reshape(shape)
                else:  # scale_bias.Scale, in place
                    y *= m.blobs[0].data.reshape(shape)
                    if len(m.blobs) > 1:
                        y += m.blobs[1].data.reshape(shape)
        return y, False


def _pointwise_applies(x: np.ndarray, weight: np.ndarray, stride, pad, group: int) -> bool:
    """Whether a FAST (or CALIBRATION) chain's convolution runs in the pointwise kernel: a 2-D 1x1 one without
    padding or groups, on float32, whose output maps have at least :data:`POINTWISE_MIN_PIXELS` pixels, on a CPU with
    AVX-512, or with AVX2 for at most :data:`POINTWISE_AVX2_MAX_K` input channels."""
    if POINTWISE_KERNEL is None or x.ndim != 4 or weight.ndim != 4 or weight.shape[2:] != (1, 1) or any(pad) \
            or group != 1 or x.dtype != _F32 or weight.dtype != _F32 or x.shape[1] == 0:
        return False
    level = simd_level()
    if level < 1 or (level == 1 and x.shape[1] > POINTWISE_AVX2_MAX_K):
        return False
    return ((x.shape[2] - 1) // stride[0] + 1) * ((x.shape[3] - 1) // stride[1] + 1) >= POINTWISE_MIN_PIXELS


def _pointwise(x, weight, stride, a, b, relu: bool, into) -> np.ndarray:
    """``max(conv1x1(x, weight) * a + b, 0)`` (the ReLU if ``relu``) by the pointwise kernel: each sum one
    fused multiply-add per input channel in order, then the folded map's two float32 roundings as
    :func:`_affine`'s (csrc/include/amct/pointwise_conv.h). A strided layer reads its pixels first."""
    if into is not None and np.may_share_memory(into, x):
        into = None
    x = np.ascontiguousarray(x[:, :, ::stride[0], ::stride[1]] if any(s > 1 for s in stride) else x)
    n, k = x.shape[:2]
    o = weight.shape[0]
    workers = threads.workers() if n * k * o * x.shape[2] * x.shape[3] >= THREADED_POINTWISE else 1
    return POINTWISE_KERNEL(x, np.ascontiguousarray(weight), a, b, relu, workers, into)


def _plain_sum(layer, bottoms) -> bool:
    """Whether Eltwise ``layer`` adds two C-contiguous float32 arrays of one shape with coefficients 1."""
    return _plain_add(layer) and len(bottoms) == 2 and _plain_pair(*bottoms)


def _plain_add(layer) -> bool:
    return layer.operation == SUM and all(float(c) == 1.0 for c in layer.coeff)


def _plain_pair(a: np.ndarray, b: np.ndarray) -> bool:
    return (ADD_RELU_KERNEL is not None and a.shape == b.shape
            and all(v.dtype == _F32 and v.flags.c_contiguous for v in (a, b)))


def _affine(y: np.ndarray, a: np.ndarray | None, b: np.ndarray | None, relu: bool) -> None:
    """In place on ``y`` (N, C, ...): ``y *= a[c]; y += b[c]`` (each if given), then ReLU if ``relu``."""
    if AFFINE_KERNEL is not None and y.flags.c_contiguous and y.ndim >= 2:
        AFFINE_KERNEL(y, a, b, relu, threads.workers() if y.size >= THREADED_AFFINE else 1)
        return
    shape = (-1,) + (1,) * (y.ndim - 2)
    if a is not None:
        y *= a.reshape(shape)
    if b is not None:
        y += b.reshape(shape)
    if relu:
        np.maximum(y, _F32(0), out=y)


def _prelu(y: np.ndarray, layer) -> None:
    """In place on ``y`` (N, C, ...), the chain's fresh top: PReLU ``layer``'s forward (activation.PReLU)."""
    slope = layer.blobs[0].data
    if BIAS_PRELU_KERNEL is not None and y.flags.c_contiguous and slope.dtype == _F32 \
            and slope.flags.c_contiguous:
        BIAS_PRELU_KERNEL(y, None, slope, _threads(y))
    else:
        y[...] = PReLU(y, slope)


def _threads(y: np.ndarray) -> int:
    return threads.workers() if y.size >= THREADED_AFFINE else 1


def channel_affine(layers, bias, channels: int, centred: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(a, b), float32 (C,): the BatchNorm / Scale ``layers`` applied after a convolution of ``bias``
    (None: 0) as one map ``y -> y * a + b`` (module doc), composed in float64. ``centred``: the first layer is
    a BatchNorm whose mean the caller subtracted already (it only scales)."""
    a = np.ones(channels, np.float64)
    b = np.zeros(channels, np.float64) if bias is None else np.asarray(bias, np.float64).reshape(-1).copy()
    with np.errstate(**_QUIET):
        for k, m in enumerate(layers):
            if m.type == "BatchNorm":
                mean, var = global_moments(m.blobs[0].data, m.blobs[1].data, m.blobs[2].data)
                inv = 1.0 / np.sqrt(np.asarray(var, np.float64) + np.float64(_F32(m.eps)))
                a *= inv
                if not (centred and k == 0):
                    b = (b - np.asarray(mean, np.float64)) * inv
            else:
                s = np.asarray(m.blobs[0].data, np.float64).reshape(-1)
                a *= s
                b *= s
                if len(m.blobs) > 1:
                    b += np.asarray(m.blobs[1].data, np.float64).reshape(-1)
    return a.astype(_F32), b.astype(_F32)


def resolve_mode(fold: str, layer_types, ifmr: str = "stream") -> FoldMode:
    """The mode for ``Net(fold=..., ifmr=...)``: "auto" is FAST for a float net, CALIBRATION for a calibration net
    whose inserted layers only observe (IFMR, SearchN, BNUpdate, the recurrent calibration layers) and whose IFMR
    layers stream (``ifmr="stream"``), EXACT for any other net holding a layer the tool inserts (Quant, the
    quantized recurrent layers...)."""
    if fold == "auto":
        # the recurrent layers the tool puts in place of LSTM / RNN / GRU count as inserted: their calibration
        # forms observe (IFMR inside), their quantized forms round their inputs
        observing = set(ops.CALIBRATION_RECURRENT.values())
        tool = [t for t in set(layer_types) if ops.layer_type(t).inserted or t in observing
                or t in ops.QUANTIZED_RECURRENT.values()]
        if not tool:
            return FoldMode.FAST
        only_observe = all(ops.layer_type(t).observer or t in observing for t in tool)
        return FoldMode.CALIBRATION if ifmr == "stream" and only_observe else FoldMode.EXACT
    try:
        return FoldMode(fold)
    except ValueError:
        raise GraphError(f"fold must be 'auto', 'exact', 'fast', 'calibration' or 'off', got {fold!r}") from None


def plan(layers, bottom_names, top_names, mode: FoldMode, needs_backward: bool, loss_weights,
         shared: set[str]) -> dict[int, Chain]:
    """{index of the head: Chain} for every Convolution / Eltwise with foldable in-place layers after it, and in
    CALIBRATION for every other Convolution whose top no squashing layer reads first (:func:`_fast_safe`).

    ``bottom_names`` / ``top_names`` are per layer; ``loss_weights`` per layer and top (a loss
    read from a top makes it observable); ``shared``: blobs that are the memory of others (Caffe's
    ShareData), left alone.
    """
    if mode is FoldMode.OFF or needs_backward:
        return {}
    chains = {}
    covered = -1  # the last layer of the previous chain
    readers: dict[str, list[int]] = {}
    for k, names in enumerate(bottom_names):
        for name in dict.fromkeys(names):
            readers.setdefault(name, []).append(k)
    for i, head in enumerate(layers):
        if i <= covered or not _foldable_head(head, bottom_names[i], top_names[i], loss_weights[i]):
            continue
        top = top_names[i][0]
        if top in shared:
            continue
        if head.type == "BatchNorm" and mode is not FoldMode.FAST:
            continue
        if head.type == "Eltwise":  # only a ReLU joins an Eltwise
            if i + 1 < len(layers) and bottom_names[i + 1] == top_names[i + 1] == [top] \
                    and not any(loss_weights[i + 1]) and layers[i + 1].type == "ReLU" \
                    and _foldable_member(layers[i + 1]):
                chains[i] = Chain(i, i + 1, head, (layers[i + 1],), mode)
            continue
        j = i + 1
        while j < len(layers) and bottom_names[j] == [top] and top_names[j] == [top] \
                and not any(loss_weights[j]) and _foldable_member(layers[j]):
            j += 1
            if layers[j - 1].type in ("ReLU", "PReLU"):  # nothing affine can join after the activation
                break
        if j == i + 1 and mode is FoldMode.CALIBRATION and head.type == "Convolution" \
                and _fast_safe({top}, i + 1, readers, layers, top_names):
            chains[i] = Chain(i, i, head, (), mode)  # a convolution alone, for the fast kernels
        elif j > i + 1:
            residual = mode is FoldMode.FAST and head.type == "Convolution" and layers[j - 1].type not in ("ReLU",
                                                                                                         "PReLU")
            tail = _residual_tail(j, top, layers, bottom_names, top_names, loss_weights, shared) if residual else None
            last = j + 1 if tail is not None else j - 1
            chain_mode = mode
            if mode in (FoldMode.FAST, FoldMode.CALIBRATION) \
                    and not _fast_safe({top, top_names[last][0]}, last + 1, readers, layers, top_names):
                if head.type == "BatchNorm":  # (its layers run one by one instead)
                    continue
                chain_mode, tail, last = FoldMode.EXACT, None, j - 1
            members = tuple(layers[i + 1:j])
            if tail is not None:
                chains[i] = Chain(i, last, head, members, chain_mode, residual=j, other=tail)
            else:
                chains[i] = Chain(i, last, head, members, chain_mode)
            covered = last
    return chains


# Layers that squash large values into a small range (saturate, clamp or exponentiate: the output keeps the
# input's absolute differences but not its scale), flip on a threshold, or run user code: a FAST chain's result
# read by one of these before the next layer that mixes channels runs EXACT (see _fast_safe). Others (ReLU,
# pooling, Eltwise, reshaping, ShuffleChannel, AbsVal, ELU / Swish / HardSwish, which follow large positive
# values, normalizations that divide everything alike) keep a difference's size relative to their output.
_SQUASHING = frozenset(("TanH", "Sigmoid", "Softmax", "ReLU6", "Clip", "HardSigmoid", "Threshold", "Exp", "Log",
                        "Power", "Python"))
_MIXING = frozenset(("Convolution", "Deconvolution", "InnerProduct"))
_SHAPE_ONLY = frozenset(("PriorBox",))  # reads its bottoms' shapes, not their values


def _fast_safe(blobs: set[str], start: int, readers: dict[str, list[int]], layers, top_names) -> bool:
    """Whether the values of ``blobs`` (a chain's results, read from layer ``start`` on: ``readers`` lists each
    blob's readers in order) reach no ``_SQUASHING`` layer before a Convolution / Deconvolution / InnerProduct.

    FAST's differences from Caffe are small against the values they arise in (the folded map: a few float32 ulps
    of its largest term; Winograd F(4x4): 1.4e-5 of the blob's scale on open_nsfw, some 100x float32's). A
    layer that squashes large values straight after the chain leaves them large against its own, much smaller
    output: a TanH on a chain of raw pixels was 2.9e-4 of the TanH's output from Caffe (Caffe's own: 5e-5 from
    float64). Such chains run EXACT. Past a layer that mixes channels the chain's differences are mixed with
    that layer's own rounding; a squash further down can still show them on nets of large pre-activations
    (module doc)."""
    todo, seen = list(blobs), set(blobs)
    while todo:
        blob = todo.pop()
        for k in readers.get(blob, ()):
            if k < start:
                continue
            layer = layers[k]
            if layer.type in _MIXING or layer.type in _SHAPE_ONLY:
                continue
            if layer.type in _SQUASHING:
                return False
            for top in top_names[k]:
                if top not in seen:
                    seen.add(top)
                    todo.append(top)
    return True


def _residual_tail(j, top, layers, bottom_names, top_names, loss_weights, shared) -> int | None:
    """If layer ``j`` is an Eltwise SUM of ``top`` and another blob followed by an in-place ReLU, the
    index of that other bottom (a residual block's end, run with the chain before it), else None."""
    if j + 1 >= len(layers) or layers[j].type != "Eltwise" or len(bottom_names[j]) != 2 \
            or bottom_names[j].count(top) != 1 or not _plain_add(layers[j]) \
            or not _foldable_head(layers[j], bottom_names[j], top_names[j], loss_weights[j]):
        return None
    out = top_names[j][0]
    if out in shared or bottom_names[j + 1] != [out] or top_names[j + 1] != [out] or any(loss_weights[j + 1]) \
            or layers[j + 1].type != "ReLU" or not _foldable_member(layers[j + 1]):
        return None
    return 1 - bottom_names[j].index(top)


def _foldable_head(layer, bottoms, tops, loss_weights) -> bool:
    if len(tops) != 1 or tops[0] in bottoms or any(loss_weights):
        return False
    if layer.type == "Eltwise":
        return True
    if layer.type == "BatchNorm":  # out of place, on the stored statistics (FAST only: plan)
        return len(bottoms) == 1 and layer.use_global_stats and len(layer.lp.bottom) == 1
    if layer.type != "Convolution" or len(bottoms) != 1:
        return False
    return not layer.integer_params and layer.lp.convolution_param.axis == 1 and len(layer.blobs) >= 1


def _foldable_member(layer) -> bool:
    if layer.type == "PReLU":  # (only after a Convolution: an Eltwise takes a ReLU alone)
        return not layer.integer_params
    if layer.type == "ReLU":
        return layer.lp.relu_param.negative_slope == 0
    if layer.type == "BatchNorm":
        return layer.use_global_stats
    if layer.type == "Scale":
        p = layer.lp.scale_param
        return len(layer.lp.bottom) == 1 and p.axis == 1 and p.num_axes == 1 and not layer.integer_params
    return False
