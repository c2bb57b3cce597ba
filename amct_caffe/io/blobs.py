"""BlobProto <-> numpy.

A BlobProto carries its values in one of ``data`` (float32), ``double_data`` (float64), the
deploy model's integer fields ``int8_data`` (bytes) / ``int32_data`` / ``uint64_data`` (ATC's
layout), or, read through :mod:`amct_caffe.io.opencv_blobs`, OpenCV's ``raw_data`` typed by
``raw_data_type`` (e.g. FLOAT16). The shape is ``shape.dim``, or in legacy files the 4-D
``num, channels, height, width`` (which win when both are present, as in Caffe).
"""

from __future__ import annotations

import numpy as np

from amct_caffe.errors import ModelFormatError, WeightsError
from amct_caffe.io.opencv_blobs import raw_blob_values
from amct_caffe.io.schema import caffe_pb

_LEGACY_DIMS = ("num", "channels", "height", "width")
_MAX_COUNT = 2**31 - 1  # Caffe's blob count is an int (Blob::Reshape checks count <= INT_MAX)


def blob_shape(blob) -> tuple[int, ...]:
    """Shape of a BlobProto, by Caffe's ``Blob::FromProto``.

    Any of the legacy ``num, channels, height, width`` set -> those four (unset ones are 0);
    else ``shape.dim``, which may be empty: a blob with neither is a scalar, shape ``()``.
    """
    if any(blob.HasField(f) for f in _LEGACY_DIMS):
        return tuple(int(getattr(blob, f)) for f in _LEGACY_DIMS)
    return tuple(int(d) for d in blob.shape.dim)


def _has(blob, field: str) -> bool:
    return field in blob.DESCRIPTOR.fields_by_name and len(getattr(blob, field)) > 0


def _checked_count(shape: tuple[int, ...], where: str) -> int:
    """The number of values of ``shape``, checked as Caffe's Blob::Reshape does (dims >= 0, count <= INT_MAX).

    The product of the non-zero dims is bounded too: numpy cannot even shape an empty array beyond that.
    """
    if any(d < 0 for d in shape):
        raise WeightsError(f"{where}: blob shape {list(shape)} has a negative dimension (corrupt caffemodel?)")
    extent = 1
    for d in shape:
        extent *= max(d, 1)
    if extent > _MAX_COUNT:
        raise WeightsError(f"{where}: blob shape {list(shape)} is too large: more than Caffe's limit of {_MAX_COUNT} "
                           "values for one blob (corrupt caffemodel?)")
    return 0 if 0 in shape else extent


def blob_to_array(blob, where: str) -> np.ndarray:
    """Values of a BlobProto as an array of its shape (:func:`blob_shape`).

    As in Caffe, ``double_data`` is used when it holds values, else ``data``; then the deploy
    model's integer fields and OpenCV's raw blobs. Float blobs come back as float32; the deploy
    model's integer blobs keep their integer dtype (int8, int32, uint64).

    ``where`` names the file, layer and blob for error messages.
    """
    shape = blob_shape(blob)
    count = _checked_count(shape, where)
    if len(blob.double_data):
        with np.errstate(over="ignore"):  # beyond float32: inf, refused with NaN by io.load_weights
            values = np.asarray(blob.double_data, dtype=np.float64).astype(np.float32)
    elif len(blob.data):
        values = np.asarray(blob.data, dtype=np.float32)
    elif _has(blob, "raw_data") and blob.HasField("raw_data_type"):
        values = raw_blob_values(blob, where)
    elif _has(blob, "int8_data"):
        values = np.frombuffer(blob.int8_data, dtype=np.int8)
    elif _has(blob, "int32_data"):
        values = np.asarray(blob.int32_data, dtype=np.int32)
    elif _has(blob, "uint64_data"):
        values = np.asarray(blob.uint64_data, dtype=np.uint64)
    elif count == 0:
        values = np.zeros(0, np.float32)
    else:
        raise WeightsError(f"{where}: blob of shape {list(shape)} holds no values "
                           "(data, double_data and raw_data are all empty)")
    if values.size != count:
        raise WeightsError(f"{where}: blob shape {list(shape)} needs {count} values but the file holds "
                           f"{values.size} (truncated or corrupt caffemodel?)")
    return values.reshape(shape)


def array_to_blob(arr: np.ndarray, blob) -> None:
    """Write ``arr`` into an empty BlobProto with a ``shape``, in the field of its dtype.

    float64 -> double_data; int8 -> int8_data; int32 -> int32_data; uint64 -> uint64_data;
    anything else -> float32 ``data``.
    """
    arr = np.asarray(arr)
    field, number = _INTEGER_FIELDS.get(arr.dtype.str.lstrip("<|"), (None, None))
    found = blob.DESCRIPTOR.fields_by_name.get(field) if field is not None else None
    if field is not None and (found is None or found.number != number):
        raise ModelFormatError(f"{caffe_pb().origin}: BlobProto has no field {field} = {number}, where a deploy "
                               f"model keeps its {arr.dtype} blobs (ATC's caffe.proto: int8_data = 10, int32_data = "
                               "11, uint64_data = 12): free those numbers in your caffe.proto, or save the fake-quant "
                               "model only")
    blob.shape.dim.extend(int(d) for d in arr.shape)
    flat = np.ascontiguousarray(arr).ravel()
    if arr.dtype == np.float64:
        _merge_packed(blob, _DOUBLE_DATA, flat.astype("<f8"))
    elif arr.dtype == np.int8:
        blob.int8_data = flat.tobytes()
    elif arr.dtype == np.int32:
        blob.int32_data.extend(flat.tolist())
    elif arr.dtype == np.uint64:
        blob.uint64_data.extend(flat.tolist())
    else:
        _merge_packed(blob, _DATA, flat.astype("<f4"))


_DATA, _DOUBLE_DATA = 5, 8  # BlobProto field numbers of `repeated float data`, `repeated double double_data`
_INTEGER_FIELDS = {"i1": ("int8_data", 10), "i4": ("int32_data", 11), "u8": ("uint64_data", 12)}  # by dtype


def _merge_packed(blob, field: int, values: np.ndarray) -> None:
    """Append little-endian fixed-width ``values`` to the repeated field ``field`` of ``blob``.

    Parsing the field's packed wire form (tag, byte length, the raw bytes) is a copy, where
    ``extend(values.tolist())`` builds a Python float per value (10x slower on a caffemodel).
    Protobuf parsers accept the packed form for any repeated scalar field, and the message then
    holds (and serializes) exactly the values ``extend`` would have given it.
    """
    if not values.size:
        return
    raw = values.tobytes()
    head = bytearray([field << 3 | 2])  # wire type 2: length-delimited
    n = len(raw)
    while n >= 0x80:
        head.append(n & 0x7F | 0x80)
        n >>= 7
    head.append(n)
    blob.MergeFromString(bytes(head) + raw)
