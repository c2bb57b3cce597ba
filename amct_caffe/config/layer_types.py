"""Which layer types the quantization config covers (the guide's 支持量化的算子列表).

Every row of the guide's table is declared in the one type registry
(:mod:`amct_caffe.runtime.registry`) when this module is imported:

* weights and data (``WEIGHTS_AND_DATA``): Convolution, DepthwiseConv, InnerProduct,
  Deconvolution, LSTM, RNN, GRU;
* data only (``DATA_ONLY``): the rest. The rows marked 默认不量化 ("not quantized unless the
  user switches it on in the config") are declared with ``by_default=False``: the generated
  config lists them with ``quant_enable: false``.

Naming of depthwise convolution. Caffe has no depthwise type: a depthwise layer is a
``Convolution`` with ``group == input channels == num_output``. The guide lists it as its own
operator, "DepthwiseConv", so the config calls such a layer's type "DepthwiseConv"
(:func:`config_type`). In a simple .cfg it is matched by ``skip_layer_types`` /
``override_layer_types`` entries of either "DepthwiseConv" or "Convolution" (it *is* a
Convolution in the user's prototxt); where both override it, "DepthwiseConv" wins, being the
more specific. A layer whose prototxt type is literally "DepthwiseConv" (as the BN+Scale+Bias
acceleration inserts) is a DepthwiseConv too.

Per-type rules from the guide used by validation:

* InnerProduct, and the InnerProducts inside LSTM / RNN / GRU, support only
  ``channel_wise: false`` (说明 under 训练后量化与量化感知训练; ARQuantize table);
* non-uniform (snq_quantize) weights exist only for InnerProduct, Convolution, DepthwiseConv and
  Deconvolution;
* BN fusion starts from Convolution, DepthwiseConv, Deconvolution or InnerProduct, so only those
  can be named in ``skip_fusion_layers``;
* Scale and Bias are quantized through the BN+Scale+Bias acceleration (folded into an inserted
  DepthwiseConv), which works only along the channel axis (axis 1 or -3, num_axes 1) and only
  when the scale / bias is a learned parameter, not a second bottom; other Scale / Bias layers
  cannot be quantized (:func:`cannot_quantize_reason`).
"""

from __future__ import annotations

from amct_caffe.runtime.registry import DATA_ONLY, WEIGHTS_AND_DATA, declare_quantizable, type_info

DEPTHWISE = "DepthwiseConv"

#: Types with weights, in the guide's order.
WEIGHTED_TYPES = ("Convolution", DEPTHWISE, "InnerProduct", "Deconvolution", "LSTM", "RNN", "GRU")

#: Data-only rows of the table: (type, quantized by default).
_OFF = False  # the rows marked 默认不量化
DATA_ONLY_TYPES = (
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

#: Types whose weights are quantized per tensor only (channel_wise must be false).
PER_TENSOR_ONLY_TYPES = frozenset({"InnerProduct", "LSTM", "RNN", "GRU"})
#: Types snq_quantize (INT4 non-uniform) supports.
SNQ_TYPES = frozenset({"Convolution", DEPTHWISE, "InnerProduct", "Deconvolution"})
#: Types BN fusion starts from (what skip_fusion_layers may name).
FUSABLE_TYPES = frozenset({"Convolution", DEPTHWISE, "Deconvolution", "InnerProduct"})


#: Data-only types whose later bottoms are not activations: ROI boxes (with the batch index),
#: a reference blob giving only a shape (Crop, Interp), an unpooling mask (Upsample). Only the
#: listed inputs are quantized.
QUANTIZED_INPUTS = {"ROIPooling": (0,), "PSROIPooling": (0,), "ROIAlign": (0,), "Crop": (0,),
                    "Interp": (0,), "Upsample": (0,), "Unpooling": (0,)}


def _declare_all() -> None:
    for name in WEIGHTED_TYPES:
        declare_quantizable(name, WEIGHTS_AND_DATA, by_default=True, inputs=(0,))
    for name, by_default in DATA_ONLY_TYPES:
        declare_quantizable(name, DATA_ONLY, by_default=by_default, inputs=QUANTIZED_INPUTS.get(name))


_declare_all()


def quantizable_types() -> list[str]:
    """Every type name of the guide's table (DepthwiseConv included), in table order."""
    return [*WEIGHTED_TYPES, *(name for name, _ in DATA_ONLY_TYPES)]


def is_quantizable_type(type_name: str) -> bool:
    info = type_info(type_name)
    return info is not None and info.quant is not None


def has_weights(type_name: str) -> bool:
    info = type_info(type_name)
    return info is not None and info.quant == WEIGHTS_AND_DATA


def on_by_default(type_name: str) -> bool:
    info = type_info(type_name)
    return info is not None and info.quant is not None and info.quant_by_default


def default_channel_wise(type_name: str) -> bool:
    """The generated config's channel_wise: true, except for the per-tensor-only types."""
    return type_name not in PER_TENSOR_ONLY_TYPES


def _input_channels(node, graph) -> int | None:
    if node.params and node.params[0].ndim >= 2:
        # weight (num_output, C / group, *kernel): C = shape[1] * group
        return int(node.params[0].shape[1]) * max(int(node.layer_param.convolution_param.group), 1)
    if graph is not None and node.bottoms:
        blob = graph.blobs.get(node.bottoms[0])
        if blob is not None and blob.shape is not None and len(blob.shape) >= 2:
            return int(blob.shape[1])
    return None


def is_depthwise(node, graph=None) -> bool:
    """True for a Convolution with group == input channels == num_output (and group > 1).

    Input channels come from the weight blob, else from the bottom blob's inferred shape; with
    neither, ``group == num_output > 1`` alone decides (the only ambiguity left is a grouped
    convolution with one output per group over several inputs each, which needs weights or shapes
    to tell apart).
    """
    if node.type == DEPTHWISE:
        return True
    if node.type != "Convolution" or node.layer_param is None:
        return False
    conv = node.layer_param.convolution_param
    group, num_output = int(conv.group), int(conv.num_output)
    if group <= 1 or group != num_output:
        return False
    channels = _input_channels(node, graph)
    return channels is None or channels == group


def config_type(node, graph=None) -> str:
    """The operator name the quantization config uses for ``node`` ("DepthwiseConv" or its type)."""
    return DEPTHWISE if is_depthwise(node, graph) else node.type


def matching_type_names(node, graph=None) -> tuple[str, ...]:
    """Type names a .cfg entry may use for ``node``, least specific first."""
    kind = config_type(node, graph)
    if kind == DEPTHWISE and node.type == "Convolution":
        return ("Convolution", DEPTHWISE)
    return (kind,)


def cannot_quantize_reason(node, graph=None) -> str | None:
    """Why a layer of a quantizable type still cannot be quantized, or None if it can.

    Only Scale and Bias have such limits (see the module doc); this is asked for every layer
    whose type is in the table.
    """
    if node.type not in ("Scale", "Bias") or node.layer_param is None:
        return None
    param = node.layer_param.scale_param if node.type == "Scale" else node.layer_param.bias_param
    if len(node.bottoms) > 1:
        return (f"its {node.type.lower()} comes from a second bottom blob, so it cannot be folded into a "
                "DepthwiseConv (BN+Scale+Bias acceleration)")
    if int(param.axis) not in (1, -3) or int(param.num_axes) != 1:
        return (f"axis {param.axis}, num_axes {param.num_axes}: the BN+Scale+Bias acceleration supports "
                "only the channel axis (axis 1 or -3, num_axes 1)")
    return None
