"""Caffe's ``DataTransformer`` (``transform_param``) and what the data layers share.

For one sample ``x`` of shape (C, H, W) — uint8 pixels in BGR order as Caffe holds them, or a
Datum's float values — the transformer makes the float32 (C, h, w) blob item::

    y[c, i, j] = (x[c, i + h_off, j' + w_off] - mean[c, i + h_off, j' + w_off]) * scale

with ``j' = w - 1 - j`` when the sample is mirrored, else ``j' = j``. ``mean`` is the mean_file blob
(C, H, W) at the same position, or ``mean_value[c]`` (one value: all channels), or 0. The
subtraction and product are float32 operations, in Caffe's order, so the result is bit-exact.

* ``crop_size`` k: (h, w) = (k, k); TEST phase: the centre, ``h_off = (H - k) // 2``,
  ``w_off = (W - k) // 2``; TRAIN phase: ``h_off`` uniform in ``[0, H - k]``, ``w_off`` in ``[0, W - k]``.
  Without crop_size (h, w) = (H, W) and the offsets are 0.
* ``mirror``: each sample is flipped left-right with probability 1/2. As in Caffe this holds in
  *both* phases (Caffe's Transform draws ``mirror && Rand(2)`` whatever the phase).

Random draws: Caffe uses its own Boost mt19937 (``Rand(n) = rng() % n``), per sample in the order
mirror, then h_off, then w_off. We draw the same quantities in the same order from a numpy
``Generator`` seeded from the layer's name (:func:`layer_rng`): the same distributions (uniform),
reproducible from run to run, not Caffe's sequence. Without crop in TRAIN and without mirror
nothing is random, and the batches equal Caffe's bit for bit.

Not supported (an error names the field): this Caffe fork's ``crop_h`` / ``crop_w``,
``old_resize_param``, ``noise_param`` and ``emit_constraint`` (SSD's annotated data).
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import numpy as np

from amct_caffe.data import DataError
from amct_caffe.errors import AmctError
from amct_caffe.io import blob_to_array
from amct_caffe.io.files import read_bytes
from amct_caffe.io.schema import caffe_pb
from amct_caffe.io.upgrade import TRAIN

_LOG = logging.getLogger(__name__)
_UNSUPPORTED = ("crop_h", "crop_w", "old_resize_param", "noise_param", "emit_constraint")
# The fields data_param / image_data_param carried before transform_param existed; Caffe's
# UpgradeNetDataTransformation moves them into transform_param.
_LEGACY_FIELDS = ("scale", "mean_file", "crop_size", "mirror")


def layer_rng(name: str, stream: int) -> np.random.Generator:
    """The numpy generator of one random stream of layer ``name`` (as Dropout: seeded from the name).

    Two nets built from one prototxt draw the same sequences; ``stream`` keeps a layer's shuffling and
    its transformer's draws independent, as Caffe's separate prefetch and transformer RNGs.
    """
    return np.random.default_rng([zlib.crc32(name.encode()), stream])


def transform_param(lp, legacy_param):
    """``lp.transform_param`` with the legacy fields of ``legacy_param`` (data_param or image_data_param)
    moved in, as Caffe's upgrade does for old prototxts."""
    tp = caffe_pb().TransformationParameter()
    tp.CopyFrom(lp.transform_param)
    if legacy_param is not None:
        for field in _LEGACY_FIELDS:
            if legacy_param.HasField(field):
                setattr(tp, field, getattr(legacy_param, field))
    return tp


def source_path(text: str, where: str, field: str) -> Path:
    """A ``source`` path of a data layer, which must exist (relative paths: to the current directory,
    as Caffe opens them)."""
    if not text:
        raise DataError(f"{where}: {field} is not set; give the file to read")
    path = Path(text)
    if not path.exists():
        raise DataError(f"{where}: {field} {path} does not exist (relative paths are taken from the current "
                        f"directory {Path.cwd()})")
    return path


def check_batch_size(batch_size: int, where: str, field: str) -> int:
    if batch_size < 1:
        raise DataError(f"{where}: {field} must be a positive number of samples, not {batch_size}")
    return int(batch_size)


def read_mean_file(path: Path, where: str) -> np.ndarray:
    """A binaryproto mean (BlobProto, shape (1, C, H, W) or (C, H, W)) as float32 (C, H, W)."""
    data = read_bytes(path, "mean_file", DataError)
    blob = caffe_pb().BlobProto()
    try:
        blob.ParseFromString(data)
        mean = blob_to_array(blob, f"{where}: mean_file {path}")
    except AmctError as e:
        raise DataError(str(e)) from None
    except Exception as e:  # protobuf's DecodeError, or any failure to parse a damaged file
        raise DataError(f"{where}: mean_file {path} is not a binaryproto BlobProto ({e})") from None
    if mean.ndim == 4 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.ndim != 3:
        raise DataError(f"{where}: mean_file {path} holds a blob of shape {list(mean.shape)}; expected "
                        "(1, C, H, W) or (C, H, W)")
    return np.ascontiguousarray(mean, dtype=np.float32)


class DataTransformer:
    """Caffe's DataTransformer for one layer (module doc): ``shape(c, h, w)``, then ``__call__``."""

    def __init__(self, tp, phase: int, where: str, rng: np.random.Generator):
        self.where = where
        for field in _UNSUPPORTED:
            if tp.HasField(field):
                raise DataError(f"{where}: transform_param.{field} is not supported by the embedded executor; "
                                "use crop_size, mean_file / mean_value, scale and mirror")
        if tp.HasField("mean_file") and len(tp.mean_value):
            raise DataError(f"{where}: transform_param gives both mean_file and mean_value; Caffe takes one")
        if tp.force_color and tp.force_gray:
            raise DataError(f"{where}: transform_param sets both force_color and force_gray")
        self.scale = np.float32(tp.scale)
        self.crop = int(tp.crop_size)
        self.mirror = bool(tp.mirror)
        self.random_crop = phase == TRAIN and self.crop > 0
        self.mean = read_mean_file(Path(tp.mean_file), where) if tp.HasField("mean_file") else None
        self.mean_values = np.asarray(tp.mean_value, dtype=np.float32)
        # force_color / force_gray: how an encoded Datum is decoded (None: as stored)
        self.color = True if tp.force_color else (False if tp.force_gray else None)
        self._rng = rng

    def shape(self, c: int, h: int, w: int, what: str) -> tuple[int, int, int]:
        """(C, h, w) of the transformed ``what`` (a record or image) of shape (c, h, w); checks it."""
        if self.crop and (h < self.crop or w < self.crop):
            raise DataError(f"{self.where}: {what} is {h}x{w}, smaller than crop_size {self.crop}")
        if self.mean is not None and self.mean.shape != (c, h, w):
            raise DataError(f"{self.where}: mean_file is {list(self.mean.shape)} (C, H, W) but {what} is "
                            f"{[c, h, w]}; the mean must have the size of the uncropped data")
        if len(self.mean_values) not in (0, 1, c):
            raise DataError(f"{self.where}: {len(self.mean_values)} mean_value(s) for {what} of {c} channels; "
                            f"give 1 or {c}")
        return (c, self.crop, self.crop) if self.crop else (c, h, w)

    def __call__(self, x: np.ndarray, what: str) -> np.ndarray:
        """One sample (C, H, W), uint8 or float32 -> the float32 item (module doc)."""
        c, h, w = x.shape
        _, oh, ow = self.shape(c, h, w, what)
        mirror = self.mirror and bool(self._rng.integers(2))  # Caffe draws it first
        if self.random_crop:
            h_off = int(self._rng.integers(h - oh + 1))
            w_off = int(self._rng.integers(w - ow + 1))
        else:  # TEST's centre crop; (0, 0) without crop
            h_off, w_off = (h - oh) // 2, (w - ow) // 2
        window = (slice(None), slice(h_off, h_off + oh), slice(w_off, w_off + ow))
        y = x[window].astype(np.float32)
        if self.mean is not None:
            y = y - self.mean[window]
        elif len(self.mean_values):
            y = y - (self.mean_values if len(self.mean_values) == 1 else self.mean_values.reshape(c, 1, 1))
        if self.scale != 1:  # x * 1 is x: skipping it changes nothing
            y = y * self.scale
        return np.ascontiguousarray(y[:, :, ::-1] if mirror else y, dtype=np.float32)
