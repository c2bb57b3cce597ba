"""Turning an 8-bit image into a net input: resize, centre crop, channel order, mean / std / scale.

The order and formulas follow Caffe's ``DataTransformer`` (TEST phase), with a per-channel
``std`` as the peers' tools add for models trained with torchvision-style normalisation::

    x[c, h, w] = (pixel[c, h, w] - mean[c]) / std[c] * scale

``pixel`` is the 0..255 value, in the output channel order. Examples:

* Caffe ImageNet models: ``channel_order="BGR", mean=(104, 117, 123)`` (or ``(103.94, 116.78,
  123.68)``), sometimes ``scale=0.017``.
* torchvision-style ``ToTensor`` + ``Normalize(m, s)``: ``channel_order="RGB", mean=255*m,
  std=255*s``; or ``scale=1/255`` only, when the model just divides by 255.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np

from amct_caffe.data.source import DataError

_LOG = logging.getLogger(__name__)
CHANNEL_ORDERS = ("BGR", "RGB")


def pil_image():
    """Pillow's ``Image`` module, or a :class:`DataError` saying how to install it."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading images needs Pillow: pip install pillow "
                        "(or pip install 'amct_caffe[images]')") from None
    return Image


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_))


def as_floats(value, field: str) -> tuple[float, ...]:
    """One number or a sequence of numbers as a tuple of finite floats (None: empty)."""
    if value is None:
        return ()
    if _is_number(value):
        values = (value,)
    elif isinstance(value, np.ndarray) and value.ndim <= 1:
        values = tuple(value.reshape(-1))
    elif isinstance(value, (list, tuple)):
        values = tuple(value)
    else:  # a string, a mapping, ...: iterating "104" would give 1, 0, 4
        values = (value,)
    if not all(_is_number(v) for v in values):
        raise DataError(f"{field}: expected numbers, got {value!r}")
    out = tuple(float(v) for v in values)
    if not all(math.isfinite(v) for v in out):
        raise DataError(f"{field}: values must be finite, got {value!r}")
    return out


def _positive_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


def _size(value, field: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if _positive_int(value):
        value = (value, value)
    if isinstance(value, np.ndarray):
        value = tuple(value.reshape(-1))
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_positive_int(v) for v in value):
        raise DataError(f"Preprocess.{field}: expected (height, width) positive integers, got {value!r}")
    return int(value[0]), int(value[1])


def _per_channel(values: Sequence[float], x: np.ndarray, axis: int, what: str) -> np.ndarray:
    """``values`` shaped to broadcast along ``axis`` of ``x`` (a scalar when one value is given)."""
    arr = np.asarray(values, dtype=np.float32)
    if len(values) == 1:
        return arr.reshape(())
    if x.ndim <= axis or x.shape[axis] != len(values):
        have = x.shape[axis] if x.ndim > axis else "no"
        raise DataError(f"{len(values)} {what} values given, but the data has {have} channels")
    shape = [1] * x.ndim
    shape[axis] = len(values)
    return arr.reshape(shape)


def normalize(x: np.ndarray, mean: Sequence[float] = (), std: Sequence[float] = (), scale: float = 1.0,
              axis: int = 1) -> np.ndarray:
    """``(x - mean[c]) / std[c] * scale`` in float32, channels along ``axis``.

    ``mean`` / ``std`` hold one value (all channels) or one per channel; empty means 0 / 1. Values
    beyond float32's range become infinite, quietly: the batch's finite check names the sample.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.asarray(x, dtype=np.float32)
        if len(mean):
            x = x - _per_channel(mean, x, axis, "mean")
        if len(std):
            x = x / _per_channel(std, x, axis, "std")
        if scale != 1.0:
            x = x * np.float32(scale)
    return x


@dataclass(frozen=True)
class Preprocess:
    """How one net input is made from an image. Steps, in this order:

    1. Decode to 8-bit RGB, or grayscale ``L`` for a 1-channel input.
    2. Resize, if ``size=(h, w)`` (exact) or ``short_side=s`` (the shorter side becomes ``s``, the
       other ``floor(other * s / shorter + 0.5)``, aspect kept). Pillow ``Image.resize(..., BILINEAR)``
       on the 8-bit image: deterministic for a given Pillow version. When shrinking, Pillow widens
       the filter by the ratio (antialiasing), so it differs from OpenCV's ``INTER_LINEAR``.
    3. Centre crop ``crop=(h, w)``: offsets ``((H - h) // 2, (W - w) // 2)``, as Caffe's TEST phase.
    4. float32, channels first, in ``channel_order`` ("BGR": Caffe / OpenCV models; "RGB").
    5. ``(x - mean[c]) / std[c] * scale``; ``mean`` and ``std`` are in the output channel order.
    """

    size: tuple[int, int] | None = None
    short_side: int | None = None
    crop: tuple[int, int] | None = None
    channel_order: str = "BGR"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    scale: float = 1.0

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "size", _size(self.size, "size"))
        set_(self, "crop", _size(self.crop, "crop"))
        if self.short_side is not None:
            if not _positive_int(self.short_side):
                raise DataError("Preprocess.short_side: expected a positive integer, "
                                f"got {self.short_side!r}")
            if self.size is not None:
                raise DataError("Preprocess: give size or short_side, not both")
        order = str(self.channel_order).upper()
        if order not in CHANNEL_ORDERS:
            raise DataError(f"Preprocess.channel_order: expected BGR or RGB, got {self.channel_order!r}")
        set_(self, "channel_order", order)
        set_(self, "mean", as_floats(self.mean, "Preprocess.mean"))
        set_(self, "std", as_floats(self.std, "Preprocess.std"))
        if any(s == 0 for s in self.std):
            raise DataError("Preprocess.std: values must be non-zero")
        scale = as_floats(self.scale, "Preprocess.scale")
        if len(scale) != 1:
            raise DataError(f"Preprocess.scale: expected one number, got {self.scale!r}")
        set_(self, "scale", scale[0])

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "preprocess") -> Preprocess:
        """Build from a JSON-style dict with the field names above."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DataError(f"{where}: unknown field(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(known))}")
        try:
            return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})
        except DataError as e:
            raise DataError(f"{where}: {e}") from None

    @property
    def resizes(self) -> bool:
        return self.size is not None or self.short_side is not None

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) after step 2 for an image of ``height`` x ``width``."""
        if self.size is not None:
            return self.size
        if self.short_side is not None:
            s = self.short_side
            if height <= width:
                return s, max(1, math.floor(width * s / height + 0.5))
            return max(1, math.floor(height * s / width + 0.5)), s
        return height, width

    def resize(self, hwc: np.ndarray, where: str = "image") -> np.ndarray:
        """Step 2 on an 8-bit (H, W, C) array; unchanged when no resize is set."""
        h, w = hwc.shape[:2]
        target = self.resized_size(h, w)
        if target == (h, w):
            return hwc
        image_mod = pil_image()
        # Pillow's own bound on decoded images, applied to what we ask it to make: a mistyped size
        # would otherwise allocate gigabytes (or overflow a C int) before any check of the result.
        limit = image_mod.MAX_IMAGE_PIXELS or 2 ** 31 - 1
        if target[0] * target[1] > limit:
            raise DataError(f"{where}: resizing to {target[0]}x{target[1]} exceeds Pillow's image size limit of "
                            f"{limit} pixels: check the resize (size / short_side, --resize)")
        size = (target[1], target[0])
        if hwc.shape[2] in (1, 3):
            img = image_mod.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)
            out = np.asarray(img.resize(size, image_mod.Resampling.BILINEAR))
            return out.reshape(target[0], target[1], hwc.shape[2])
        # other channel counts (a Datum of 2 or 4): one gray image per channel, since Pillow would take 2 or 4 as
        # LA / RGBA and weight the colours by the last channel as alpha
        planes = [np.asarray(image_mod.fromarray(np.ascontiguousarray(hwc[:, :, k])).resize(
            size, image_mod.Resampling.BILINEAR)) for k in range(hwc.shape[2])]
        return np.stack(planes, axis=2)

    def finish(self, chw: np.ndarray, source_order: str, where: str) -> np.ndarray:
        """Steps 3-5 on a (C, H, W) array whose colour channels are in ``source_order``."""
        c, h, w = chw.shape
        if self.crop is not None:
            ch, cw = self.crop
            if ch > h or cw > w:
                raise DataError(f"{where}: a {h}x{w} image cannot be centre-cropped to {ch}x{cw}; "
                                "resize it first (size / short_side, --resize)")
            top, left = (h - ch) // 2, (w - cw) // 2
            chw = chw[:, top:top + ch, left:left + cw]
        if c == 3 and source_order != self.channel_order:
            chw = chw[::-1]
        return normalize(chw, self.mean, self.std, self.scale, axis=0)

    def apply(self, hwc: np.ndarray, where: str = "image") -> np.ndarray:
        """All steps on an 8-bit (H, W, C) RGB (C = 3) or grayscale (C = 1) array -> float32 (C, h, w)."""
        if hwc.ndim == 2:
            hwc = hwc[:, :, None]
        resized = self.resize(hwc, where)
        return self.finish(np.transpose(resized, (2, 0, 1)), "RGB", where)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the result for an image of ``height`` x ``width``."""
        if self.crop is not None:
            return self.crop
        return self.resized_size(height, width)
