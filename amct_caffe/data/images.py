"""Calibration batches from a folder of images (JPEG, PNG, BMP), decoded with Pillow.

Images are taken in the order of their file names (``sorted`` on the name, case-sensitive), so the
``k``-th sample is always the same file; ``select(step=10)`` keeps every tenth. Each image goes
through the :class:`~amct_caffe.data.preprocess.Preprocess` of the input it feeds.

With several net inputs, either the folder holds one sub-folder per input, named after it (the
``i``-th files of the sub-folders make sample ``i``), or every input gets the same image through
its own preprocessing.
"""

from __future__ import annotations

import io
import logging
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from amct_caffe.data.preprocess import Preprocess, pil_image
from amct_caffe.data.source import DataError, DataSource, failure, sample_shape
from amct_caffe.io.paths import register_data_names

_LOG = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_TOLD: set[tuple[str, tuple[str, ...]]] = set()  # (folder, entries left out) already warned about
register_data_names(re.compile(r"(?i)^.*(" + "|".join(re.escape(s) for s in IMAGE_SUFFIXES) + ")$"))


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name. Entries with an image's name that are not files (a
    broken symbolic link, a folder) are left out with a warning naming them."""
    named = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    files = [p for p in named if p.is_file()]
    skipped = sorted(p.name for p in named if not p.is_file())
    if skipped and (str(folder), tuple(skipped)) not in _TOLD:  # (a command lists a folder several times)
        _TOLD.add((str(folder), tuple(skipped)))
        _LOG.warning("%s: %d entr%s with an image's name %s not a readable file (a broken link or a folder), "
                     "left out: %s%s", folder, len(skipped), "y" if len(skipped) == 1 else "ies",
                     "is" if len(skipped) == 1 else "are", ", ".join(skipped[:5]), "..." if len(skipped) > 5 else "")
    return sorted(files, key=lambda p: p.name)


def per_input(value, names: Sequence[str], default, what: str) -> dict:
    """``value`` given once for all inputs, or as a mapping {input name: value}."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise DataError(f"{what} given for {', '.join(unknown)}, which the net does not take as input "
                            f"(inputs: {', '.join(names)})")
        return {n: value.get(n, default) for n in names}
    return {n: (default if value is None else value) for n in names}


def decode_image(source: Path | bytes, channels: int | None, where) -> np.ndarray:
    """An image file (a path) or its encoded bytes as an 8-bit (H, W, C) array, in RGB(A) order.

    ``channels`` 3 -> RGB, 1 -> grayscale (Pillow's ``L``: ``(299 R + 587 G + 114 B) / 1000``),
    None -> as stored, like OpenCV's ``IMREAD_UNCHANGED`` for 8-bit images: 1 channel for a
    grayscale image, 4 (RGBA) for one with an alpha channel or transparency, else 3. A 16-bit gray image
    read as 1 or 3 channels keeps its high byte, as OpenCV's imread does; other images of more than 8 bits
    per channel are refused (Caffe's transformer takes 8-bit only).
    ``where`` names the file or record in messages.
    """
    image_mod = pil_image()
    try:
        with image_mod.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            if img.mode.startswith(("I", "F")) and (channels is None or not img.mode.startswith("I;16")):
                raise DataError(f"{where}: a {img.mode} image (more than 8 bits per channel) cannot be read as "
                                "8-bit pixels; " + ("set force_color or force_gray, or " if channels is None
                                                    else "") + "store 8-bit images")
            if channels is not None:  # OpenCV's IMREAD_COLOR / IMREAD_GRAYSCALE (Caffe's readers) turn the image
                from PIL import ImageOps  # noqa: PLC0415 - as its EXIF says; Pillow is there: pil_image() said so

                img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I;16"):  # 16-bit gray: to 8 bits as OpenCV's imread (Caffe's reader) does
                high = (np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8)
                img = image_mod.fromarray(high, "L")
            if channels is None:
                alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
                mode = "L" if img.mode in ("1", "L") else ("RGBA" if alpha else "RGB")
            else:
                mode = "L" if channels == 1 else "RGB"
            arr = np.asarray(img.convert(mode))
    except DataError:
        raise
    # Decoders raise more than OSError on a malformed or hostile file (DecompressionBombError,
    # SyntaxError, struct.error...): whatever it is, this file is not a usable image.
    except Exception as e:
        what = "decode the encoded image" if isinstance(source, bytes) else "read the image"
        raise DataError(f"{where}: cannot {what} ({failure(e)})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def load_image(path: Path, channels: int) -> np.ndarray:
    """An image file as an 8-bit (H, W, C) array: RGB for ``channels`` 3, grayscale for 1."""
    if channels not in (1, 3):
        raise DataError(f"{path}: an image cannot feed an input of {channels} channels (1 or 3 expected)")
    return decode_image(Path(path), channels, path)


class ImageFolder(DataSource):
    """Batches of preprocessed images from a folder.

    Args:
        root: the folder (or one sub-folder per input, named after it).
        inputs: {input name: input shape (N, C, H, W)}; N is ignored, C (1 or 3) picks grayscale or
            colour, and H, W are checked against the preprocessed size. A shape may be None
            (3 channels, no check); a plain list of names means all shapes are None.
        preprocess: one :class:`Preprocess` for all inputs, or {input name: Preprocess}.
        batch_size: samples per batch.
    """

    def __init__(self, root, inputs: Mapping[str, Sequence[int] | None] | Sequence[str],
                 preprocess: Preprocess | Mapping[str, Preprocess] | None = None, batch_size: int = 1):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist")
        shapes = inputs if isinstance(inputs, Mapping) else {n: None for n in inputs}
        if not shapes:
            raise DataError("ImageFolder: the net has no inputs")
        self._shapes = {n: sample_shape(s) for n, s in shapes.items()}
        for n, s in self._shapes.items():
            if s is not None and len(s) != 3:
                raise DataError(f"input '{n}' of shape (N, {', '.join(map(str, s))}) cannot take images: "
                                "image inputs are (N, C, H, W)")
        self._preprocess = per_input(preprocess, list(shapes), Preprocess(), "preprocess")
        subdirs = [self.root / n for n in shapes]
        present = [d.name for d in subdirs if d.is_dir()]
        if len(shapes) > 1 and present and len(present) < len(subdirs):  # (a misnamed one: not the shared images)
            missing = [d.name for d in subdirs if not d.is_dir()]
            raise DataError(f"image folder {self.root}: it holds sub-folders for input(s) {present} but none for "
                            f"{missing}: give one sub-folder per input, named after it (or no sub-folder named "
                            "after an input, for the same images in every input)")
        if len(shapes) > 1 and all(d.is_dir() for d in subdirs):
            self._files = OrderedDict((n, list_images(d)) for n, d in zip(shapes, subdirs, strict=True))
            self.folders = {n: d for n, d in zip(shapes, subdirs, strict=True)}  # the folders images come from
        else:
            files = list_images(self.root)
            self._files = OrderedDict((n, files) for n in shapes)
            self.folders = {n: self.root for n in shapes}
        counts = {n: len(f) for n, f in self._files.items()}
        if len(set(counts.values())) > 1:
            raise DataError(f"image folder {self.root}: the per-input sub-folders hold different numbers of "
                            f"images: {counts}")
        count = next(iter(counts.values()))
        if count == 0:
            folders = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            hint = (f"; its sub-folders ({', '.join(folders[:5])}{' ...' if len(folders) > 5 else ''}) are read only "
                    "as the per-input folders of a net of several inputs named after them") if folders else ""
            raise DataError(f"image folder {self.root} holds no image ({', '.join(IMAGE_SUFFIXES)}){hint}")
        super().__init__(list(shapes), count, batch_size)

    def describe(self) -> str:
        return f"image folder {self.root}"

    def files(self, name: str | None = None) -> list[Path]:
        """The image files this source serves, in order (for input ``name``, default the first)."""
        all_files = self._files[name or self.inputs[0]]
        return [all_files[i] for i in self._index]

    def sample(self, name: str, i: int) -> np.ndarray:
        """Underlying sample ``i`` for input ``name``: float32 (C, H, W)."""
        path = self._files[name][i]
        shape = self._shapes[name]
        channels = 3 if shape is None else shape[0]
        out = self._preprocess[name].apply(load_image(path, channels), str(path))
        if shape is not None and out.shape != shape:
            raise DataError(f"{path}: preprocessed to {out.shape[1]}x{out.shape[2]} but input '{name}' takes "
                            f"{'x'.join(map(str, shape[1:]))} (shape {shape}): set the resize / crop "
                            "(Preprocess size, short_side, crop; --resize, --crop)")
        return out

    def _load(self, indices: list[int]) -> dict[str, np.ndarray]:
        return {n: np.stack([self.sample(n, i) for i in indices]) for n in self.inputs}
