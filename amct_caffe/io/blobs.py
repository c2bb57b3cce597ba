"""BlobProto <-> numpy.

A BlobProto carries its values in one of ``data`` (float32), ``double_data`` (float64) or,
in OpenCV's variant of the schema, ``raw_data`` (little-endian bytes typed by
``raw_data_type``, e.g. FLOAT16 for weights OpenCV halved). The shape is ``shape.dim``,
or in legacy files the 4-D ``num, channels, height, width``.
"""

from __future__ import annotations

import numpy as np

from amct_caffe.errors import WeightsError

# OpenCV's BlobProto.Type enum -> numpy dtype (little-endian as OpenCV writes it).
_RAW_DTYPES = {"DOUBLE": "<f8", "FLOAT": "<f4", "FLOAT16": "<f2", "INT": "<i4", "UINT": "<u4"}


def blob_shape(blob) -> tuple[int, ...]:
    """Shape of a BlobProto: ``shape.dim`` if present, else legacy (num, channels, height, width)."""
    if blob.HasField("shape"):
        return tuple(int(d) for d in blob.shape.dim)
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        return (blob.num, blob.channels, blob.height, blob.width)
    # A blob with neither: a flat vector (what Caffe does for a count-only blob).
    return (_value_count(blob),)


def _value_count(blob) -> int:
    if len(blob.data):
        return len(blob.data)
    if len(blob.double_data):
        return len(blob.double_data)
    return 0


def blob_to_array(blob, where: str) -> np.ndarray:
    """Values of a BlobProto as a float32 array of its shape.

    ``where`` names the file and layer for error messages.
    """
    shape = blob_shape(blob)
    count = int(np.prod(shape, dtype=np.int64))
    if len(blob.data):
        values = np.asarray(blob.data, dtype=np.float32)
    elif len(blob.double_data):
        values = np.asarray(blob.double_data, dtype=np.float64).astype(np.float32)
    elif blob.DESCRIPTOR.fields_by_name.get("raw_data") is not None and len(blob.raw_data):
        values = _raw_values(blob, where)
    elif count == 0:
        values = np.zeros(0, np.float32)
    else:
        raise WeightsError(f"{where}: blob of shape {list(shape)} holds no values "
                           "(data, double_data and raw_data are all empty)")
    if values.size != count:
        raise WeightsError(f"{where}: blob shape {list(shape)} needs {count} values but the file holds "
                           f"{values.size} (truncated or corrupt caffemodel?)")
    return values.reshape(shape)


def _raw_values(blob, where: str) -> np.ndarray:
    type_field = blob.DESCRIPTOR.fields_by_name["raw_data_type"]
    type_name = type_field.enum_type.values_by_number[blob.raw_data_type].name
    dtype = _RAW_DTYPES.get(type_name)
    if dtype is None:
        raise WeightsError(f"{where}: raw_data of type {type_name} is not supported "
                           f"(supported: {', '.join(_RAW_DTYPES)})")
    raw = blob.raw_data
    if len(raw) % np.dtype(dtype).itemsize:
        raise WeightsError(f"{where}: raw_data of {len(raw)} bytes is not a whole number of {type_name} values")
    return np.frombuffer(raw, dtype=dtype).astype(np.float32)


def array_to_blob(arr: np.ndarray, blob) -> None:
    """Write ``arr`` into an empty BlobProto as float32 ``data`` with a ``shape``."""
    arr = np.asarray(arr)
    blob.shape.dim.extend(int(d) for d in arr.shape)
    if arr.dtype == np.float64:
        blob.double_data.extend(arr.ravel().tolist())
    else:
        blob.data.extend(np.ascontiguousarray(arr, dtype=np.float32).ravel().tolist())
