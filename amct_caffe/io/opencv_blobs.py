"""Caffemodels with OpenCV's FP16 blobs.

OpenCV's caffe.proto stores halved weights as ``optional Type raw_data_type = 10`` and
``optional bytes raw_data = 12`` in BlobProto. Our schema keeps ATC's ``int8_data = 10`` /
``uint64_data = 12`` at those numbers (the deploy model needs them), so such a file either
fails to parse or parses into nonsense ``uint64_data``. This module derives, from our own
descriptor, a variant schema whose BlobProto has OpenCV's fields, and reads the file with it.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from amct_caffe.errors import WeightsError
from amct_caffe.io.schema import caffe_pb

_VARIANT_PACKAGE = "amct_caffe_opencv_blobs"
_FIELD = descriptor_pb2.FieldDescriptorProto
# OpenCV's top-level enum Type and the dtype of each value (OpenCV writes little-endian).
_OPENCV_TYPES = [("DOUBLE", 0, "<f8"), ("FLOAT", 1, "<f4"), ("FLOAT16", 2, "<f2"), ("INT", 3, "<i4"),
                 ("UINT", 4, "<u4")]


@lru_cache(maxsize=4)
def _variant_net_class(base_package: str, base_file: str):
    schema = caffe_pb()
    fdp = descriptor_pb2.FileDescriptorProto()
    schema.pool.FindFileByName(base_file).CopyToProto(fdp)
    old_prefix = f".{base_package}." if base_package else "."
    fdp.name = f"{_VARIANT_PACKAGE}_{base_file}"
    fdp.package = _VARIANT_PACKAGE
    enum_name = "OpenCVBlobType"
    enum = fdp.enum_type.add(name=enum_name)
    for name, number, _ in _OPENCV_TYPES:
        enum.value.add(name=f"OPENCV_{name}", number=number)

    def retarget(msg):
        for f in msg.field:
            if f.type_name.startswith(old_prefix):
                f.type_name = f".{_VARIANT_PACKAGE}." + f.type_name[len(old_prefix):]
        for nested in msg.nested_type:
            retarget(nested)

    for msg in fdp.message_type:
        retarget(msg)
        if msg.name == "BlobProto":
            keep = [f for f in msg.field if f.number not in (10, 11, 12)]
            del msg.field[:]
            msg.field.extend(keep)
            msg.field.add(name="raw_data_type", number=10, label=_FIELD.LABEL_OPTIONAL, type=_FIELD.TYPE_ENUM,
                          type_name=f".{_VARIANT_PACKAGE}.{enum_name}")
            msg.field.add(name="raw_data", number=12, label=_FIELD.LABEL_OPTIONAL, type=_FIELD.TYPE_BYTES)
    pool = descriptor_pool.DescriptorPool()
    for dep in fdp.dependency:
        dep_proto = descriptor_pb2.FileDescriptorProto()
        schema.pool.FindFileByName(dep).CopyToProto(dep_proto)
        pool.Add(dep_proto)
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_VARIANT_PACKAGE}.NetParameter"))


def parse_opencv_caffemodel(data: bytes):
    """Parse ``data`` with the OpenCV-flavoured BlobProto; returns the NetParameter (or raises DecodeError)."""
    schema = caffe_pb()
    base_file = schema.pool.FindMessageTypeByName(f"{schema.package}.NetParameter" if schema.package
                                                  else "NetParameter").file.name
    msg = _variant_net_class(schema.package, base_file)()
    msg.ParseFromString(data)
    return msg


def has_raw_blobs(net) -> bool:
    return any(b.HasField("raw_data_type") and len(b.raw_data)
               for layers in (net.layer, net.layers) for layer in layers for b in layer.blobs)


def raw_blob_values(blob, where: str = "blob") -> np.ndarray:
    """Values of an OpenCV raw blob as float32; ``where`` names the file, layer and blob for errors."""
    name, dtype = next((name, np.dtype(d)) for name, n, d in _OPENCV_TYPES if n == blob.raw_data_type)
    if len(blob.raw_data) % dtype.itemsize:
        raise WeightsError(f"{where}: raw_data of type {name} holds {len(blob.raw_data)} bytes, not a multiple of "
                           f"{dtype.itemsize} (truncated or corrupt caffemodel?)")
    with np.errstate(over="ignore"):  # DOUBLE beyond float32: inf, refused by io.load_weights
        return np.frombuffer(blob.raw_data, dtype=dtype).astype(np.float32)
