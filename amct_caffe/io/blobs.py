"""BlobProto <-> numpy.

A BlobProto carries its values in one of ``data`` (float32), ``double_data`` (float64), the
deploy model's integer fields ``int8_data`` (bytes) / ``int32_data`` / ``uint64_data`` (ATC's
layout), or, read through :mod:`amct_caffe.io.opencv_blobs`, OpenCV's ``raw_data`` typed by
``raw_data_type`` (e.g. FLOAT16). The shape is ``shape.dim``, or in legacy files the 4-D
``num, channels, height, width``.
"""

from __future__ import annotations

import numpy as np

from amct_caffe.errors import WeightsError
from amct_caffe.io.opencv_blobs import raw_blob_values


def blob_shape(blob) -> tuple[int, ...]:
    """Shape of a BlobProto: ``shape.dim`` if present, else legacy (num, channels, height, width)."""
    if blob.HasField("shape"):
        return tuple(int(d) for d in blob.shape.dim)
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        return (blob.num, blob.channels, blob.height, blob.width)
    # A blob with neither: a flat vector (what Caffe does for a count-only blob).
    return (_value_count(blob),)


def _value_count(blob) -> int:
    for field in ("data", "double_data", "int32_data", "uint64_data", "int8_data"):
        if _has(blob, field):
            return len(getattr(blob, field))
    return 0


def _has(blob, field: str) -> bool:
    return field in blob.DESCRIPTOR.fields_by_name and len(getattr(blob, field)) > 0


def blob_to_array(blob, where: str) -> np.ndarray:
    """Values of a BlobProto as an array of its shape.

    Float blobs come back as float32; the deploy model's integer blobs keep their integer
    dtype (int8, int32, uint64).

    ``where`` names the file and layer for error messages.
    """
    shape = blob_shape(blob)
    count = int(np.prod(shape, dtype=np.int64))
    if len(blob.data):
        values = np.asarray(blob.data, dtype=np.float32)
    elif len(blob.double_data):
        values = np.asarray(blob.double_data, dtype=np.float64).astype(np.float32)
    elif _has(blob, "raw_data") and blob.HasField("raw_data_type"):
        values = raw_blob_values(blob)
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
    blob.shape.dim.extend(int(d) for d in arr.shape)
    flat = np.ascontiguousarray(arr).ravel()
    if arr.dtype == np.float64:
        blob.double_data.extend(flat.tolist())
    elif arr.dtype == np.int8:
        blob.int8_data = flat.tobytes()
    elif arr.dtype == np.int32:
        blob.int32_data.extend(flat.tolist())
    elif arr.dtype == np.uint64:
        blob.uint64_data.extend(flat.tolist())
    else:
        blob.data.extend(flat.astype(np.float32).tolist())
