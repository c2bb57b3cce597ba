"""Layer types as the quantization config sees them (the guide's 支持量化的算子列表).

The table itself (which types are quantized, with weights or data only, on by default or not,
per-tensor only, SNQ, fusable) is :mod:`amct_caffe.ops`; this module adds what depends on a
layer's parameters and the graph around it: the depthwise convolution's name and the limits of
Scale and Bias.

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

from amct_caffe import ops
from amct_caffe.ops import DEPTHWISE, quantizable_types

__all__ = ["DEPTHWISE", "cannot_quantize_reason", "config_type", "default_channel_wise", "has_weights",
           "is_depthwise", "is_quantizable_type", "matching_type_names", "on_by_default", "quantizable_types"]


def is_quantizable_type(type_name: str) -> bool:
    return ops.layer_type(type_name).quantizable


def has_weights(type_name: str) -> bool:
    return ops.layer_type(type_name).quant is ops.WEIGHTS_AND_DATA


def on_by_default(type_name: str) -> bool:
    row = ops.layer_type(type_name)
    return row.quantizable and row.quant_by_default


def default_channel_wise(type_name: str) -> bool:
    """The generated config's channel_wise: true, except for the per-tensor-only types."""
    return not ops.layer_type(type_name).per_tensor_only


def _input_channels(node, graph) -> int | None:
    if node.params:
        channels = ops.in_channels(node.type, node.layer_param, node.params[0].shape)
        if channels is not None:
            return channels
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

    Scale and Bias have such limits (see the module doc), any layer reading a quantized input of
    fewer than 2 axes, or a weighted one writing such an output (an InnerProduct on ``axis: 0``), a
    convolution whose channels are not axis 1 (:func:`ops.off_channel_axis`), and a recurrent type
    without a quantized form; this is asked for every layer whose type is in the
    table.
    """
    row = ops.layer_type(node.type)
    if row.recurrent and row.quantizable and node.type not in ops.QUANTIZED_RECURRENT:
        return f"{node.type} has no quantized form yet; it stays float"
    bottom = graph.blobs.get(node.bottoms[0]) if graph is not None and node.bottoms else None
    off_axis = ops.off_channel_axis(node.type, node.layer_param,
                                    None if bottom is None or bottom.shape is None else len(bottom.shape))
    if off_axis is not None:
        return off_axis
    if graph is not None:
        inputs = row.quant_inputs if row.quant_inputs is not None else range(len(node.bottoms))
        # the IFMR layer observing an input, and the DeQuant after a weighted layer, work along
        # (N, C, ...) in Caffe too: a blob of one axis has no channel axis
        checked = [("input", node.bottoms[i]) for i in inputs if i < len(node.bottoms)]
        if row.weighted and node.tops:
            checked.append(("output", node.tops[0]))
        for what, name in checked:
            blob = graph.blobs.get(name)
            if blob is not None and blob.shape is not None and len(blob.shape) < 2:
                return (f"its {what} {name} has shape {list(blob.shape)}; quantization needs at least 2 axes "
                        "(N, C, ...)")
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
