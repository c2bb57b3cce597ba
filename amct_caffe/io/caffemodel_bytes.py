"""A caffemodel's serialized bytes as a list of buffers, its weights' values not copied.

``b"".join(caffemodel_chunks(net, weights)) == net_to_caffemodel(net, weights).SerializeToString()``.
Building the message copies each weight into it (and its packed form first), and serializing it
copies the whole model again: five copies of a 23 MB open_nsfw for every file the PTQ flow writes,
each in freshly allocated memory. Here a float32 or int8 blob's values are a view of its array;
only the small messages around them are serialized by protobuf.

The protobuf encoder writes a message's known fields in field-number order, so a message whose
repeated message field F is left empty serializes as ``<fields below F> <fields above F>``; its
bytes with F are those two parts around F's elements (each ``tag, length, bytes``). The parts are
found by walking the top-level fields of the serialized message; a message whose fields are not
in ascending order (unknown fields in between, a group), a schema whose fields are not the ones
this relies on, or any blob of another dtype goes through protobuf instead, so the bytes are
always those of :func:`amct_caffe.io.net_to_caffemodel`.
"""

from __future__ import annotations

import numpy as np

from amct_caffe.io import net_to_caffemodel
from amct_caffe.io.blobs import array_to_blob
from amct_caffe.io.schema import caffe_pb

_LENGTH_DELIMITED = 2
_LAYER, _BLOBS = 100, 7  # NetParameter.layer, LayerParameter.blobs
_DATA, _INT8_DATA = 5, 10  # BlobProto: repeated float data [packed], optional bytes int8_data


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(field: int) -> bytes:
    return varint(field << 3 | _LENGTH_DELIMITED)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _split_at(data: bytes, field: int) -> int | None:
    """Offset in serialized ``data`` of its first top-level field numbered above ``field``, or None
    when the fields are not in ascending order, ``field`` itself is present, or a group is met."""
    pos, last = 0, 0
    while pos < len(data):
        key, after = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if number < last or number == field:
            return None
        if number > field:
            return pos
        last = number
        if wire == 0:
            _, after = _read_varint(data, after)
        elif wire == 1:
            after += 8
        elif wire == _LENGTH_DELIMITED:
            size, after = _read_varint(data, after)
            after += size
        elif wire == 5:
            after += 4
        else:
            return None
        pos = after
    return pos


def _schema_fits(pb) -> bool:
    """Whether the schema (possibly a user's caffe.proto) has the fields this encoder writes."""
    fields = pb.BlobProto.DESCRIPTOR.fields_by_number
    data, int8 = fields.get(_DATA), fields.get(_INT8_DATA)
    layer = pb.NetParameter.DESCRIPTOR.fields_by_number.get(_LAYER)
    blobs = pb.LayerParameter.DESCRIPTOR.fields_by_number.get(_BLOBS)
    return (data is not None and data.name == "data" and data.type == data.TYPE_FLOAT and data.is_packed
            and int8 is not None and int8.name == "int8_data" and int8.type == int8.TYPE_BYTES
            and layer is not None and layer.name == "layer" and blobs is not None and blobs.name == "blobs")


def _blob_chunks(pb, arr: np.ndarray) -> list:
    """The bytes of the BlobProto :func:`array_to_blob` writes for ``arr`` (its values as a view)."""
    arr = np.asarray(arr)
    shape = pb.BlobProto()
    shape.shape.dim.extend(int(d) for d in arr.shape)
    if arr.size and arr.dtype in (np.dtype("<f4"), np.dtype(np.int8)):
        values = memoryview(np.ascontiguousarray(arr).reshape(-1)).cast("B")
        if arr.dtype == np.int8:  # int8_data (10) comes after shape (7)
            return [shape.SerializeToString(), _key(_INT8_DATA), varint(values.nbytes), values]
        return [_key(_DATA), varint(values.nbytes), values, shape.SerializeToString()]
    blob = pb.BlobProto()
    array_to_blob(arr, blob)
    return [blob.SerializeToString()]


def _with_elements(head_and_tail: bytes, cut: int, field: int, elements: list[list]) -> list:
    """``head_and_tail`` with the length-delimited ``elements`` (each a list of buffers) of ``field``
    inserted at ``cut``."""
    out = [head_and_tail[:cut]]
    key = _key(field)
    for parts in elements:
        out += [key, varint(sum(len(p) for p in parts))]  # memoryviews of bytes ("B"): len is nbytes
        out += parts
    out.append(head_and_tail[cut:])
    return out


def caffemodel_chunks(net, weights, leave_out=()) -> list:
    """Buffers whose concatenation is the serialized caffemodel of ``net``'s layers (but those named in
    ``leave_out``) with the blobs of ``weights`` (layer name -> arrays), as
    :func:`amct_caffe.io.net_to_caffemodel` builds it.

    The buffers view the arrays' memory: they must not change until the bytes are written.
    """
    pb = caffe_pb()
    if len(net.layers) or not _schema_fits(pb):  # V1 layers are not written by the IR
        return [net_to_caffemodel(net, weights, leave_out).SerializeToString()]
    top = type(net)()
    top.CopyFrom(net)
    top.ClearField("layer")
    top_bytes = top.SerializeToString()
    net_cut = _split_at(top_bytes, _LAYER)
    if net_cut is None:
        return [net_to_caffemodel(net, weights, leave_out).SerializeToString()]
    layers = []
    for lp in net.layer:
        if lp.name in leave_out:
            continue
        data = lp.SerializeToString()
        cut = _split_at(data, _BLOBS)  # None for a layer carrying blobs too: net_to_caffemodel replaces them
        if cut is None:
            return [net_to_caffemodel(net, weights, leave_out).SerializeToString()]
        blobs = [_blob_chunks(pb, arr) for arr in weights.get(lp.name, ())]
        layers.append(_with_elements(data, cut, _BLOBS, blobs))
    return _with_elements(top_bytes, net_cut, _LAYER, layers)
