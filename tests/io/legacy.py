"""Test helpers that write legacy (V1 ``layers``) files from current ones, as old Caffe did."""

from __future__ import annotations

from amct_caffe.io.schema import caffe_pb
from amct_caffe.io.upgrade import V1_TYPE_NAMES

_V1_ENUM_BY_TYPE = {v: k for k, v in V1_TYPE_NAMES.items() if v}


def to_v1(net):
    """A NetParameter using the V1 ``layers`` field (enum types, blobs_lr...) for ``net``."""
    out = caffe_pb().NetParameter()
    out.name = net.name
    type_enum = out.layers.add().DESCRIPTOR.fields_by_name["type"].enum_type
    del out.layers[:]
    v1_fields = out.layers.add().DESCRIPTOR.fields_by_name
    del out.layers[:]
    input_layer = None
    for layer in net.layer:
        if layer.type == "Input":  # V1 nets declare inputs with input/input_dim
            input_layer = layer
            continue
        v1 = out.layers.add()
        v1.name = layer.name
        v1.type = type_enum.values_by_name[_V1_ENUM_BY_TYPE[layer.type]].number
        v1.bottom.extend(layer.bottom)
        v1.top.extend(layer.top)
        v1.blobs.extend(layer.blobs)
        for spec in layer.param:
            v1.blobs_lr.append(spec.lr_mult)
            v1.weight_decay.append(spec.decay_mult)
        for field, value in layer.ListFields():
            if field.name.endswith("_param") and field.name in v1_fields:
                getattr(v1, field.name).CopyFrom(value)
    if input_layer is not None:
        for top, shape in zip(input_layer.top, input_layer.input_param.shape, strict=False):
            out.input.append(top)
            out.input_dim.extend(shape.dim)
    return out
