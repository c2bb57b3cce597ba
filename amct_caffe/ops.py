"""The one table of Caffe layer types: what amct_caffe knows and can do with each type.

Every question of the form "is a Pooling quantizable?", "does BN fusion fold into an
InnerProduct?", "does a ReLU keep its input's rank?" is answered here, from one declarative
table (:data:`_TABLE`), so that config, passes and the executor cannot disagree. The module sits
at the bottom of the package: it imports nothing of amct_caffe but errors. The executor
registers its layer classes into it (:func:`register`); ``config``, ``passes`` and ``api`` read it.

Quantization (the user guide's 支持量化的算子列表, in the guide's order):

* ``WEIGHTS_AND_DATA``: Convolution, DepthwiseConv, InnerProduct, Deconvolution, LSTM, RNN, GRU;
* ``DATA_ONLY``: the rest of the table. Rows marked 默认不量化 ("not quantized unless the user
  switches it on") have ``quant_by_default=False``: a generated config lists them with
  ``quant_enable: false``;
* ``quant_inputs``: the bottoms that carry activations (None: all of them). ROI boxes, a
  reference blob giving only a shape (Crop, Interp) or an unpooling mask stay float.

"DepthwiseConv" is the guide's name for a Convolution with group == input channels ==
num_output; Caffe has no such type, but the config names such layers by it and the BN+Scale+Bias
acceleration inserts them (``amct_caffe.config.layer_types.config_type`` tells them apart).

Weights (``weighted`` types, the layers whose first blob the tool quantizes and BN fusion folds
into) are laid out as :func:`weight_layout` says; the output channel count of a layer comes from
:func:`out_channels` and nowhere else.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from amct_caffe.errors import UnsupportedLayerError


class QuantKind(enum.Enum):
    """How a layer type can be quantized."""

    NONE = "none"
    DATA_ONLY = "data_only"                  # its input activations (Quant before, AntiQuant after)
    WEIGHTS_AND_DATA = "weights_and_data"    # its weights and its input (Quant before, DeQuant after)


WEIGHTS_AND_DATA = QuantKind.WEIGHTS_AND_DATA
DATA_ONLY = QuantKind.DATA_ONLY


@dataclass(frozen=True)
class LayerType:
    """One row of the table. Fields default to "no": an unknown type is a ``LayerType(name)``."""

    name: str
    quant: QuantKind = QuantKind.NONE
    quant_by_default: bool = False          # on in a generated config (else listed with quant_enable false)
    quant_inputs: tuple[int, ...] | None = None   # bottoms carrying activations to quantize (None: all)
    per_tensor_only: bool = False           # channel_wise must be false (InnerProduct, recurrent layers)
    snq: bool = False                       # snq_quantize (INT4 non-uniform) supported
    fusion_target: bool = False             # BN fusion folds BatchNorm/Scale/Bias into it (skip_fusion_layers)
    weighted: bool = False                  # a Caffe layer whose blob 0 is a weight laid out as weight_layout says
    recurrent: bool = False                 # LSTM / RNN / GRU
    rank_preserving: bool = False           # its single top has as many axes as its first bottom
    inserted: bool = False                  # an AMCT layer the tool inserts (never in a float model)
    observer: bool = False                  # writes no top (calibration layers, Silence)

    @property
    def quantizable(self) -> bool:
        return self.quant is not QuantKind.NONE


#: Layers BatchNorm, Scale and Bias fold into, and the order in which they may follow each other.
FOLDED_ORDER = ("BatchNorm", "Scale", "Bias")
DEPTHWISE = "DepthwiseConv"

_WEIGHTED = ("Convolution", DEPTHWISE, "InnerProduct", "Deconvolution", "LSTM", "RNN", "GRU")
_OFF = False  # the guide's rows marked 默认不量化
_DATA_ONLY = (
    ("PassThrough", True), ("Pooling", True), ("PSROIPooling", True), ("ROIPooling", True), ("SPP", True),
    ("Upsample", True), ("Eltwise", True), ("Slice", True), ("Concat", True), ("Softmax", True),
    ("ROIAlign", True), ("AbsVal", _OFF), ("BNLL", True), ("CReLU", True), ("ELU", True), ("Exp", True),
    ("Interp", True), ("Log", True), ("LRN", True), ("Mvm", True), ("Nms", True), ("Normalize", True),
    ("Power", True), ("PReLU", _OFF), ("Reduction", True), ("ReLU", _OFF), ("Sigmoid", True), ("Sort", True),
    ("Threshold", True), ("Scale", _OFF), ("BatchNorm", _OFF), ("Bias", _OFF), ("Reshape", True),
    ("Reverse", True), ("ShuffleChannel", True), ("Crop", True), ("Axpy", True), ("Flatten", True),
    ("Permute", True), ("Tile", True), ("Split", True), ("ArgMax", True), ("Clip", _OFF), ("Hswish", True),
    ("MVN", True), ("Reorg", True), ("TanH", True), ("MatMul", True), ("RReLU", _OFF), ("ReLU6", _OFF),
    ("Swish", _OFF), ("GroupNorm", True), ("ArgMin", True), ("Sqrt", True), ("ReduceSum", True),
    ("ReduceMean", True), ("ReduceProd", True), ("LayerNormalization", True), ("Gemm", True), ("Ceil", True),
    ("Pad", _OFF), ("Equal", _OFF), ("Greater", _OFF), ("ReduceMax", _OFF), ("ReduceMin", _OFF),
    ("Sign", _OFF), ("Cos", _OFF), ("Sin", _OFF), ("TopK", _OFF), ("Unpooling", _OFF), ("Erf", _OFF),
)
_ACTIVATION_INPUTS = {"ROIPooling": (0,), "PSROIPooling": (0,), "ROIAlign": (0,), "Crop": (0,),
                      "Interp": (0,), "Upsample": (0,), "Unpooling": (0,)}
_PER_TENSOR_ONLY = {"InnerProduct", "LSTM", "RNN", "GRU"}
_SNQ = {"Convolution", DEPTHWISE, "InnerProduct", "Deconvolution"}
_FUSION_TARGETS = {"Convolution", DEPTHWISE, "Deconvolution", "InnerProduct"}
_CAFFE_WEIGHTED = {"Convolution", "Deconvolution", "InnerProduct"}
_RECURRENT = {"LSTM", "RNN", "GRU"}
_RANK_PRESERVING = {
    "BatchNorm", "Scale", "Bias", "ReLU", "PReLU", "ReLU6", "Sigmoid", "TanH", "ELU", "AbsVal", "BNLL",
    "Power", "Exp", "Log", "Threshold", "Clip", "Swish", "Hswish", "Dropout", "LRN", "MVN", "Normalize",
    "Eltwise", "Concat", "Pooling", "Split", "Softmax", "Crop", "ShuffleChannel", "Upsample", "Interp",
    "Quant", "AntiQuant", "DeQuant",
}
#: The quantized forms a recurrent layer takes in the models the tool writes (docs/recurrent.md).
QUANTIZED_RECURRENT = {"LSTM": "LSTMQuant", "RNN": "RNNQuant", "GRU": "GRUQuant"}
CALIBRATION_RECURRENT = {"LSTM": "LSTMCalibration", "RNN": "RNNCalibration", "GRU": "GRUCalibration"}
_RECURRENT |= set(QUANTIZED_RECURRENT.values()) | set(CALIBRATION_RECURRENT.values())
_INSERTED = {"Quant", "DeQuant", "AntiQuant", "IFMR", "SearchN", "BNUpdate", "RetrainDataQuant", "RetrainWeightQuant"}
_OBSERVERS = {"Silence", "IFMR", "SearchN", "BNUpdate"}


def _build_table() -> dict[str, LayerType]:
    rows: list[tuple[str, QuantKind, bool]] = [(n, WEIGHTS_AND_DATA, True) for n in _WEIGHTED]
    rows += [(n, DATA_ONLY, on) for n, on in _DATA_ONLY]
    table = {n: LayerType(n, kind, on, _ACTIVATION_INPUTS.get(n)) for n, kind, on in rows}
    names = set(table) | _RANK_PRESERVING | _INSERTED | _OBSERVERS | _RECURRENT
    for name in names:
        row = table.get(name, LayerType(name))
        table[name] = replace(
            row, per_tensor_only=name in _PER_TENSOR_ONLY, snq=name in _SNQ, fusion_target=name in _FUSION_TARGETS,
            weighted=name in _CAFFE_WEIGHTED, recurrent=name in _RECURRENT, rank_preserving=name in _RANK_PRESERVING,
            inserted=name in _INSERTED, observer=name in _OBSERVERS)
    return table


_TABLE: dict[str, LayerType] = _build_table()
_EXECUTORS: dict[str, type] = {}


def layer_type(name: str) -> LayerType:
    """The row of ``name``; an unknown type gets a row of defaults (nothing can be done with it)."""
    row = _TABLE.get(name)
    return row if row is not None else LayerType(name)


def quantizable_types() -> list[str]:
    """Every type name of the guide's table (DepthwiseConv included), in the guide's order."""
    return [n for n, row in _TABLE.items() if row.quantizable]


def quantizable_rows() -> dict[str, LayerType]:
    return {n: row for n, row in _TABLE.items() if row.quantizable}


def types_where(flag: str) -> list[str]:
    """The type names whose row sets ``flag`` (a boolean field of :class:`LayerType`), table order."""
    return [n for n, row in _TABLE.items() if getattr(row, flag)]


# ------------------------------------------------------------------ executor classes
def register(*type_names: str):
    """Class decorator: ``@register("ReLU")`` makes the class the executor's ReLU.

    Registering a type twice is an error (two modules would silently fight over it).
    """

    def deco(cls):
        for name in type_names:
            if name in _EXECUTORS:
                raise RuntimeError(f"layer type {name!r} registered twice "
                                   f"({_EXECUTORS[name].__qualname__} and {cls.__qualname__})")
            _EXECUTORS[name] = cls
        cls.type_names = tuple(type_names)
        return cls

    return deco


def executor_class(type_name: str, layer_name: str = "?") -> type:
    """The executor class registered for ``type_name``; the error lists the registered types."""
    cls = _EXECUTORS.get(type_name)
    if cls is None and not type_name:
        raise UnsupportedLayerError(f"layer '{layer_name}' gives no type: set its type (type: \"ReLU\", say); "
                                    "Caffe refuses a layer without one too")
    if cls is None:
        what = f"the embedded executor does not run type '{type_name}'"
        raise UnsupportedLayerError(
            f"layer '{layer_name}' has type '{type_name}': {what}. Quantize with the guide's calls and run the "
            "calibration model in your own (patched) Caffe, or leave the layer out of the model you quantize "
            f"(a post-processing layer at the end, say). The executor runs: {', '.join(registered_types())}")
    return cls


def has_executor(type_name: str) -> bool:
    return type_name in _EXECUTORS


def registered_types() -> list[str]:
    """Types the executor can run (those whose classes were registered), sorted."""
    return sorted(_EXECUTORS)


# ------------------------------------------------------------------ weight layout
@dataclass(frozen=True)
class WeightLayout:
    """Where the output channels of a weighted layer's blob 0 are.

    ================================  =====================  ========
    layer                             weight shape           out_axis
    ================================  =====================  ========
    Convolution (any group)           (O, C/g, *kernel)      0
    Deconvolution, group g            (C, O/g, *kernel)      1
    InnerProduct                      (O, K)                 0
    InnerProduct, transpose: true     (K, O)                 1
    ================================  =====================  ========

    A grouped Deconvolution's weight is g blocks of C/g rows; block k produces output channels
    k*(O/g) .. (k+1)*(O/g) - 1, so its output channel count is ``shape[1] * group``.
    ``group`` is 1 for every other layout (a grouped Convolution's output channels are simply
    axis 0).
    """

    out_axis: int
    group: int = 1

    def out_channels(self, weight_shape) -> int:
        return int(weight_shape[self.out_axis]) * (self.group if self.out_axis == 1 else 1)


def weight_layout(type_name: str, layer_param) -> WeightLayout | None:
    """The layout of a weighted layer's blob 0 (see :class:`WeightLayout`); None for other types."""
    if type_name not in _CAFFE_WEIGHTED or layer_param is None:
        return None
    if type_name == "InnerProduct":
        return WeightLayout(1 if layer_param.inner_product_param.transpose else 0)
    if type_name == "Deconvolution":
        return WeightLayout(1, max(int(layer_param.convolution_param.group), 1))
    return WeightLayout(0)


def out_channels(type_name: str, layer_param, weight_shape) -> int:
    """Output channels of a weighted layer whose blob 0 has ``weight_shape``.

    An old InnerProduct weight stored 4-D as (1, 1, O, K) counts its last two axes.
    """
    layout = weight_layout(type_name, layer_param)
    if layout is None:
        raise ValueError(f"layer type {type_name} has no weight layout")
    shape = tuple(weight_shape)
    if type_name == "InnerProduct" and len(shape) > 2:
        shape = shape[-2:]
    return layout.out_channels(shape)


def in_channels(type_name: str, layer_param, weight_shape) -> int | None:
    """Input channels of a Convolution from its weight (O, C/g, *kernel): ``C = shape[1] * group``."""
    if type_name not in ("Convolution", DEPTHWISE) or layer_param is None or len(weight_shape) < 2:
        return None
    return int(weight_shape[1]) * max(int(layer_param.convolution_param.group), 1)



def off_channel_axis(type_name: str, layer_param, bottom_rank: int | None = None) -> str | None:
    """Why a (de)convolution's output channels are not on axis 1, or None if they are.

    ``convolution_param.axis`` (default 1) names the channel axis; the quantization layers (the DeQuant's
    per-channel factors, IFMR's ``(N, C, ...)``) and the BatchNorm / Scale fusion work along axis 1, so a
    convolution on any other axis (e.g. 2 on a 5-D blob of several 3-D volumes) is neither quantized nor fused.
    A negative axis counts from the end of the bottom's ``bottom_rank`` axes; with the rank unknown only
    axis 1 passes."""
    if type_name not in ("Convolution", "Deconvolution", DEPTHWISE) or layer_param is None:
        return None
    axis = int(layer_param.convolution_param.axis)
    if (axis + bottom_rank if axis < 0 and bottom_rank else axis) == 1:
        return None
    return (f"its convolution_param.axis is {axis}, so its output channels are not axis 1, which quantization "
            "and fusion work along")

# ------------------------------------------------------------------ recurrent layers
@dataclass(frozen=True)
class RecurrentLayout:
    """Where a recurrent layer's (LSTM, RNN, GRU) inputs and learned blobs are.

    Bottoms ``x, cont[, x_static][, h0[, c0]]``; blobs ``W_x, b[, W_x_static]`` then the recurrent
    ones: LSTM ``W_hc``; RNN ``W_hh, W_ho, b_o``; GRU ``R_z, R_r, R_h[, Rb_h]`` (``Rb_h`` with
    ``linear_before_reset``). ``input_weights`` are the blobs multiplying data
    inputs (``W_x`` and ``W_x_static``), in the order of ``data_inputs`` (bottoms 0 and 2);
    ``recurrent_weights`` those multiplying the hidden state (RNN: ``W_hh`` then ``W_ho``);
    ``recurrent_biases`` the biases added to a hidden-state product, by the index of its weight
    (RNN: ``b_o`` with ``W_ho``; GRU: ``Rb_h`` with ``R_h``).
    """

    static: bool
    data_inputs: tuple[int, ...]
    input_weights: tuple[int, ...]
    recurrent_weights: tuple[int, ...]
    recurrent_biases: dict[int, int]


_RECURRENT_FORMS = {form: base for table in (QUANTIZED_RECURRENT, CALIBRATION_RECURRENT)
                    for base, form in table.items()}


def recurrent_base(type_name: str) -> str:
    """The recurrent type a calibration or quantized form stands for (``LSTMQuant`` -> ``LSTM``); else itself."""
    return _RECURRENT_FORMS.get(type_name, type_name)


def recurrent_layout(type_name: str, layer_param, num_bottoms: int) -> RecurrentLayout:
    """The layout of an LSTM / RNN / GRU layer (or its quantized forms) with ``num_bottoms`` bottoms."""
    base = recurrent_base(type_name)
    if base not in ("LSTM", "RNN", "GRU"):
        raise ValueError(f"layer type {type_name} is not a recurrent layer with a known blob layout")
    states = 2 if base == "LSTM" else 1
    exposed = states if layer_param is not None and layer_param.recurrent_param.expose_hidden else 0
    static = num_bottoms - 2 - exposed == 1
    first = 3 if static else 2
    if base == "LSTM":
        return RecurrentLayout(static, (0, 2) if static else (0,), (0, 2) if static else (0,), (first,), {})
    if base == "GRU":
        reset_after = layer_param is not None and layer_param.recurrent_param.linear_before_reset != 0
        return RecurrentLayout(static, (0, 2) if static else (0,), (0, 2) if static else (0,),
                               (first, first + 1, first + 2), {first + 2: first + 3} if reset_after else {})
    return RecurrentLayout(static, (0, 2) if static else (0,), (0, 2) if static else (0,), (first, first + 1),
                           {first + 1: first + 2})


# Layers whose top has the shape of their (first) bottom
_SAME_SHAPE = ("ReLU", "PReLU", "ReLU6", "Sigmoid", "TanH", "Dropout", "Power", "AbsVal", "BNLL", "Exp", "Log",
               "ELU", "Clip", "Swish", "Threshold", "Scale", "Bias", "Eltwise", "Split", "Softmax", "BatchNorm",
               "MVN", "LRN")


def leading_axes_bottoms(layer_param) -> list[str]:
    """The bottoms of a layer whose axis 1 (a time-major blob's batch) its top keeps in place, with axis 0 before
    it: an Embed's, an InnerProduct's on axis >= 2, an element-wise layer's, a Concat's or Slice's along any axis
    but 1 (along 0: fewer or more time steps), a Flatten's from axis >= 2, a Reshape's copying the first two
    axes (``dim: 0 dim: 0``), a Permute's keeping them; none for any other layer. A negative axis counts from
    the end, which the layer parameters alone do not place: -1 is taken for the features of a (T, N, ...) blob of
    three axes or more (a sequence's; a cont (T, N) is not concatenated), other negative axes as not keeping."""
    kind, bottoms = layer_param.type, list(layer_param.bottom)
    if kind == "Embed" or (kind == "InnerProduct" and layer_param.inner_product_param.axis >= 2):
        return bottoms[:1]
    if kind in ("Scale", "Bias"):  # (a second bottom is the factor, of other axes)
        return bottoms[:1]
    if kind in _SAME_SHAPE:
        return bottoms
    if kind in ("Concat", "Slice"):
        p = layer_param.concat_param if kind == "Concat" else layer_param.slice_param
        legacy = "concat_dim" if kind == "Concat" else "slice_dim"
        axis = getattr(p, legacy) if p.HasField(legacy) else p.axis
        return bottoms if axis == 0 or axis >= 2 or axis == -1 else []
    if kind == "Flatten":
        return bottoms[:1] if layer_param.flatten_param.axis >= 2 or layer_param.flatten_param.axis == -1 else []
    if kind == "Reshape":
        p = layer_param.reshape_param
        return bottoms[:1] if p.axis == 0 and list(p.shape.dim[:2]) == [0, 0] else []
    if kind == "Permute":
        return bottoms[:1] if list(layer_param.permute_param.order[:2]) in ([], [0], [0, 1]) else []
    return []


def time_major_blobs(layer_params, downstream: bool = False) -> list[str]:
    """The blobs a recurrent layer reads with the batch on axis 1 (its bottoms but the static input: ``x (T, N,
    ...)``, ``cont (T, N)``, ``h0 (1, N, H)``) and, back through the layers keeping their bottoms' first two axes
    (:func:`leading_axes_bottoms`: Caffe's language models feed words ``(T, N)`` through an Embed), those they
    come from; with ``downstream``, also the recurrent layers' tops and what such layers make of them. In the
    order found; ``layer_params``: a net's LayerParameters in order."""
    layers = list(layer_params)
    time_major: list[str] = []
    recurrent = []
    for layer in layers:
        if not layer_type(layer.type).recurrent:
            continue
        try:
            static = recurrent_layout(layer.type, layer, len(layer.bottom)).static
        except ValueError:  # a recurrent type whose blob layout is not known here
            continue
        recurrent.append(layer)
        time_major += [b for i, b in enumerate(layer.bottom) if not (static and i == 2) and b not in time_major]
    for blob in time_major:  # (grows while it is walked)
        for layer in layers:
            if blob in layer.top and blob not in layer.bottom:
                time_major += [b for b in leading_axes_bottoms(layer) if b not in time_major]
    if downstream:
        after = [t for layer in recurrent for t in layer.top]
        for layer in layers:
            if any(b in after for b in leading_axes_bottoms(layer)):
                after += [t for t in layer.top if t not in after]
        time_major += [b for b in after if b not in time_major]
    return time_major
