"""Bring legacy NetParameters to the current ``layer`` format, once, at load time.

Mirrors what Caffe's ``src/caffe/util/upgrade_proto.cpp`` does on load:

* V0 (``layers { layer { type: "conv" kernelsize: ... } }``) -> V1 -> current;
* V1 (``layers { type: CONVOLUTION blobs_lr: 1 }``) -> current ``layer { type: "Convolution" }``;
* the net-level ``input`` / ``input_shape`` / ``input_dim`` fields -> one ``Input`` layer named
  "input" placed first.

and the phase filtering of ``Net::FilterNet`` (``include`` / ``exclude`` rules against the net
state; TEST phase, level 0, no stages by default).
"""

from __future__ import annotations

import logging

from amct_caffe.errors import ModelFormatError

_LOG = logging.getLogger(__name__)

TRAIN, TEST = 0, 1

# V1LayerParameter.LayerType name -> current type string (as Caffe's UpgradeV1LayerType).
V1_TYPE_NAMES = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN", "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence", "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH",
    "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}

# V0 layer type string -> V1 enum name.
V0_TYPES = {
    "accuracy": "ACCURACY", "bnll": "BNLL", "concat": "CONCAT", "conv": "CONVOLUTION", "data": "DATA",
    "dropout": "DROPOUT", "euclidean_loss": "EUCLIDEAN_LOSS", "flatten": "FLATTEN",
    "hdf5_data": "HDF5_DATA", "hdf5_output": "HDF5_OUTPUT", "im2col": "IM2COL", "images": "IMAGE_DATA",
    "infogain_loss": "INFOGAIN_LOSS", "innerproduct": "INNER_PRODUCT", "lrn": "LRN",
    "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS", "pool": "POOLING", "relu": "RELU",
    "sigmoid": "SIGMOID", "softmax": "SOFTMAX", "softmax_loss": "SOFTMAX_LOSS", "split": "SPLIT",
    "tanh": "TANH", "window_data": "WINDOW_DATA",
}


def needs_upgrade(net) -> bool:
    return bool(len(net.layers)) or bool(len(net.input)) or bool(len(net.input_dim)) \
        or bool(len(net.input_shape))


def upgrade_net(net, source: str = "model") -> bool:
    """Upgrade ``net`` in place to the current format. Returns True if anything changed."""
    changed = False
    if len(net.layers):
        if len(net.layer):
            raise ModelFormatError(f"{source}: mixes the current 'layer' and the legacy 'layers' fields; "
                                   "use one of them")
        if any(v1.HasField("layer") for v1 in net.layers):
            _v0_to_v1(net, source)
        _v1_to_current(net, source)
        changed = True
    if len(net.input_shape) or len(net.input_dim):
        _inputs_to_layer(net, source)
        changed = True
    elif len(net.input):
        # Legacy caffemodels list inputs without shapes: dropping the field is enough.
        del net.input[:]
        changed = True
    if changed:
        _LOG.info("%s: upgraded legacy network definition to the current format", source)
    return changed


def clear_batchnorm_param_specs(net, source: str = "model") -> list[str]:
    """Caffe's ``UpgradeNetBatchNorm``, which it applies to every net it reads from a file (not to one given
    inline in a solver): a BatchNorm layer declaring exactly three ``param`` specs, as the old definition
    required (usually ``lr_mult: 0``), has them cleared. This Caffe's BatchNorm then adds no specs of its own,
    so its mean / variance / factor blobs train with the solver's defaults: their diff stays 0, but weight decay
    (and AdaGrad / RMSProp's updates of it) moves them. Returns the names of the layers changed."""
    changed = [layer.name for layer in net.layer if layer.type == "BatchNorm" and len(layer.param) == 3]
    for layer in net.layer:
        if layer.type == "BatchNorm" and len(layer.param) == 3:
            del layer.param[:]
    if changed:
        _LOG.info("%s: the three param specs of BatchNorm layer(s) %s cleared, as Caffe does on reading a net "
                  "file (UpgradeNetBatchNorm): their statistics blobs take lr_mult and decay_mult 1",
                  source, ", ".join(f"'{n}'" for n in changed[:5]) + (" ..." if len(changed) > 5 else ""))
    return changed


def _v1_type_enum(net):
    return net.DESCRIPTOR.fields_by_name["layers"].message_type.fields_by_name["type"].enum_type


def _v1_to_current(net, source: str) -> None:
    type_enum = _v1_type_enum(net)
    layer_fields = net.layer.add().DESCRIPTOR.fields_by_name
    del net.layer[:]
    for v1 in net.layers:
        layer = net.layer.add()
        enum_name = type_enum.values_by_number[v1.type].name
        type_name = V1_TYPE_NAMES.get(enum_name)
        if type_name is None:
            raise ModelFormatError(f"{source}: layer '{v1.name}' has V1 type {enum_name} with no "
                                   "known current equivalent")
        layer.name = v1.name
        layer.type = type_name
        layer.bottom.extend(v1.bottom)
        layer.top.extend(v1.top)
        for rule in ("include", "exclude"):
            getattr(layer, rule).extend(getattr(v1, rule))
        layer.blobs.extend(v1.blobs)
        layer.loss_weight.extend(v1.loss_weight)
        n_param = max(len(v1.param), len(v1.blobs_lr), len(v1.weight_decay), len(v1.blob_share_mode))
        for i in range(n_param):
            spec = layer.param.add()
            if i < len(v1.param):
                spec.name = v1.param[i]
            if i < len(v1.blob_share_mode):
                spec.share_mode = v1.blob_share_mode[i]
            if i < len(v1.blobs_lr):
                spec.lr_mult = v1.blobs_lr[i]
            if i < len(v1.weight_decay):
                spec.decay_mult = v1.weight_decay[i]
        for field, value in v1.ListFields():
            if field.name.endswith("_param") and field.name in layer_fields \
                    and field.name != "param":
                getattr(layer, field.name).CopyFrom(value)
    del net.layers[:]


def _v0_to_v1(net, source: str) -> None:
    """V0 nets: one V0LayerParameter inside each V1 entry; 'padding' layers fold into the next conv or pool.

    As Caffe's UpgradeV0PaddingLayers: a padding layer has one bottom and one top, and what reads its
    top is a conv or pool layer with that single bottom.
    """
    type_enum = _v1_type_enum(net)
    pad_of_blob: dict[str, tuple[int, str]] = {}
    kept = []
    for v1 in net.layers:
        if not v1.HasField("layer"):
            kept.append(v1)
            continue
        v0 = v1.layer
        if v0.type == "padding":
            if len(v1.bottom) != 1 or len(v1.top) != 1:
                raise ModelFormatError(f"{source}: V0 padding layer '{v0.name}' has {len(v1.bottom)} bottom(s) and "
                                       f"{len(v1.top)} top(s); a padding layer takes one blob and makes one")
            # Caffe's V0 padding layer: its output feeds a conv or pool that takes the pad.
            pad_of_blob[v1.top[0]] = (v0.pad, v1.bottom[0])
            continue
        enum_name = V0_TYPES.get(v0.type)
        if enum_name is None:
            raise ModelFormatError(f"{source}: V0 layer '{v0.name}' has unknown type '{v0.type}'")
        new = type(v1)()
        new.name = v0.name
        new.type = type_enum.values_by_name[enum_name].number
        new.top.extend(v1.top)
        pad = 0
        for b in v1.bottom:
            if b in pad_of_blob:
                if v0.type not in ("conv", "pool") or len(v1.bottom) != 1:
                    raise ModelFormatError(f"{source}: V0 layer '{v0.name}' ({v0.type}, {len(v1.bottom)} bottom(s)) "
                                           f"reads the output of a padding layer; only a conv or pool layer with "
                                           "that single bottom may")
                pad, b = pad_of_blob[b]
            new.bottom.append(b)
        for t in v1.top:  # a blob rewritten after the padding layer is no longer its output
            pad_of_blob.pop(t, None)
        new.blobs.extend(v0.blobs)
        new.blobs_lr.extend(v0.blobs_lr)
        new.weight_decay.extend(v0.weight_decay)
        _v0_params(v0, new, pad, source)
        kept.append(new)
    del net.layers[:]
    net.layers.extend(kept)


def _v0_params(v0, v1, pad: int, source: str) -> None:
    t = v0.type
    if t == "conv":
        p = v1.convolution_param
        p.num_output = v0.num_output
        p.bias_term = v0.biasterm
        if v0.kernelsize:
            p.kernel_size.append(v0.kernelsize)
        if v0.stride != 1:
            p.stride.append(v0.stride)
        if pad or v0.pad:
            p.pad.append(pad or v0.pad)
        p.group = v0.group
        if v0.HasField("weight_filler"):
            p.weight_filler.CopyFrom(v0.weight_filler)
        if v0.HasField("bias_filler"):
            p.bias_filler.CopyFrom(v0.bias_filler)
    elif t == "pool":
        p = v1.pooling_param
        p.pool = v0.pool
        p.kernel_size = v0.kernelsize
        p.stride = v0.stride
        p.pad = pad or v0.pad
    elif t == "innerproduct":
        p = v1.inner_product_param
        p.num_output = v0.num_output
        p.bias_term = v0.biasterm
        if v0.HasField("weight_filler"):
            p.weight_filler.CopyFrom(v0.weight_filler)
        if v0.HasField("bias_filler"):
            p.bias_filler.CopyFrom(v0.bias_filler)
    elif t == "lrn":
        p = v1.lrn_param
        p.local_size = v0.local_size
        p.alpha = v0.alpha
        p.beta = v0.beta
        p.k = v0.k
    elif t == "dropout":
        v1.dropout_param.dropout_ratio = v0.dropout_ratio
    elif t == "concat":
        v1.concat_param.concat_dim = v0.concat_dim
    elif t in ("data", "images", "hdf5_data", "window_data"):
        _LOG.warning("%s: V0 data layer '%s' kept without its data source settings", source, v0.name)


def _inputs_to_layer(net, source: str) -> None:
    layer = type(net.layer.add())()
    del net.layer[-1]
    layer.name = "input"
    layer.type = "Input"
    use_shape = len(net.input_shape) > 0
    if use_shape and len(net.input_shape) != len(net.input):
        raise ModelFormatError(f"{source}: {len(net.input)} inputs but {len(net.input_shape)} input_shape entries")
    if not use_shape and len(net.input_dim) != 4 * len(net.input):
        raise ModelFormatError(f"{source}: {len(net.input)} inputs need {4 * len(net.input)} input_dim values, "
                               f"found {len(net.input_dim)}")
    for i, name in enumerate(net.input):
        layer.top.append(name)
        shape = layer.input_param.shape.add()
        if use_shape:
            shape.CopyFrom(net.input_shape[i])
        else:
            shape.dim.extend(net.input_dim[4 * i: 4 * i + 4])
    rest = list(net.layer)
    del net.layer[:]
    net.layer.append(layer)
    net.layer.extend(rest)
    del net.input[:]
    del net.input_shape[:]
    del net.input_dim[:]


def _rule_met(rule, phase: int, level: int, stages: set[str]) -> bool:
    if rule.HasField("phase") and rule.phase != phase:
        return False
    if rule.HasField("min_level") and level < rule.min_level:
        return False
    if rule.HasField("max_level") and level > rule.max_level:
        return False
    if any(s not in stages for s in rule.stage):
        return False
    return not any(s in stages for s in rule.not_stage)


def layer_included(layer, phase: int = TEST, level: int = 0, stages: set[str] | frozenset = frozenset()) -> bool:
    """Caffe's ``Net::FilterNet`` decision for one layer (include rules OR-ed, exclude likewise)."""
    if len(layer.include) and len(layer.exclude):
        raise ModelFormatError(f"layer '{layer.name}' specifies both include and exclude rules; use one")
    if len(layer.include):
        return any(_rule_met(r, phase, level, set(stages)) for r in layer.include)
    return not any(_rule_met(r, phase, level, set(stages)) for r in layer.exclude)


def filter_phase(net, phase: int = TEST, level: int | None = None, stages=()) -> None:
    """Drop, in place, the layers the net state excludes (TEST phase by default).

    The requested phase overrides the file's ``state.phase`` and ``stages`` add to its stages. ``level``: the
    level of pycaffe's ``Net(file, phase, level=0, stages)``, whose constructor overrides the file's
    (net.cpp); None keeps the file's ``state.level``, as a solver's net state merged into it does."""
    if net.HasField("state"):
        if level is None and net.state.HasField("level"):
            level = net.state.level
        stages = tuple(stages) + tuple(net.state.stage)
    level = 0 if level is None else level
    kept = [layer for layer in net.layer if layer_included(layer, phase, level, frozenset(stages))]
    if len(kept) != len(net.layer):
        del net.layer[:]
        net.layer.extend(kept)
