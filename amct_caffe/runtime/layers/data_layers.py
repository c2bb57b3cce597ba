"""Caffe's database and image-list data layers: ``Data`` (LMDB of Datum) and ``ImageData``.

Both produce ``data`` float32 (N, C, h, w), N = ``batch_size``, each item through the layer's
:class:`~.data_transform.DataTransformer`, and ``label`` float32 (N,) (Caffe's label blobs are
Dtype). Samples are served in a fixed order and the order wraps around at the end, as Caffe's
prefetching readers do; each ``forward`` takes the next ``batch_size`` samples. As in Caffe, a
batch's shape is that of its first sample (a later batch may differ); a sample of another size in
the same batch is an error. The layers have no backward (Caffe's are empty) and no parameters.

Raw and float Datums are checked bit for bit against real Caffe (tests/training); encoded Datums
and ImageData need Caffe built with OpenCV, which the reference build is not, so those are checked
against numpy / Pillow only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from amct_caffe.data import DataError, Preprocess
from amct_caffe.data.images import decode_image
from amct_caffe.data.lmdb_data import check_walkable, datum_array, is_lmdb, lmdb_errors, open_lmdb, parse_datum
from amct_caffe.io.files import read_text
from amct_caffe.io.schema import caffe_pb
from amct_caffe.ops import register
from amct_caffe.runtime.layer import Layer
from amct_caffe.runtime.layers.data_transform import (DataTransformer, check_batch_size, layer_rng, source_path,
                                                      transform_param)

_LOG = logging.getLogger(__name__)


def _stack(items: list[np.ndarray], names: list[str], where: str) -> np.ndarray:
    """The batch of transformed items; they must all have the first one's shape."""
    for item, name in zip(items[1:], names[1:], strict=True):
        if item.shape != items[0].shape:
            raise DataError(f"{where}: {name} gives a {list(item.shape)} item but the batch's first sample "
                            f"({names[0]}) a {list(items[0].shape)} one; all samples of a batch must have one "
                            "size (resize them, or crop with crop_size)")
    return np.stack(items)


@register("Data")
class Data(Layer):
    """Caffe's DataLayer on an LMDB (``backend: LMDB``) of ``Datum`` records.

    Records are read in LMDB key order (bytewise), from the first, wrapping around after the last.
    A Datum holds ``data`` (uint8 (C, H, W), BGR as convert_imageset writes it), ``float_data``, or an
    ``encoded`` PNG / JPEG image (decoded by Pillow; ``force_color`` / ``force_gray`` pick 3 or 1
    channels, else the image's own). Caffe decodes with OpenCV: PNG pixels are the same, JPEG pixels
    may differ by a few levels between the two libjpeg builds' IDCT / upsampling.

    ``rand_skip`` r > 0: the reading starts at record ``k`` drawn uniformly in [0, r) (wrapping past the
    end), as the Caffe of the ``rand_skip`` documentation and ImageData do (``caffe_rng_rand() % r``).
    The reference Caffe here (its DataReader) ignores rand_skip for Data and starts at record 0.

    Tops: data (N, C, h, w) and, with a second top, label (N,).
    """

    num_bottoms = 0
    num_tops = (1, 2)
    shape_from_forward = True

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        param = lp.data_param
        self.where = f"layer '{self.name}' (Data)"
        if param.backend != caffe_pb().DataParameter.LMDB:
            raise DataError(f"{self.where}: backend LEVELDB (Caffe's default when backend is not set) is not "
                            "supported by the embedded executor; convert the database to LMDB "
                            "(convert_imageset --backend lmdb) and set data_param.backend: LMDB")
        self.batch_size = check_batch_size(param.batch_size, self.where, "data_param.batch_size")
        self.source = source_path(param.source, self.where, "data_param.source")
        if not is_lmdb(self.source):
            raise DataError(f"{self.where}: data_param.source {self.source} is not an LMDB (no data.mdb)")
        self.transform = DataTransformer(transform_param(lp, param), phase, self.where, layer_rng(self.name, 1))
        if self.transform.color is not None:
            _LOG.info("%s: force_color / force_gray apply to encoded Datums only", self.where)
        check_walkable(self.source)
        with lmdb_errors(self.source, "read"), open_lmdb(self.source) as env, env.begin() as txn:
            count = env.stat()["entries"]
            cursor = txn.cursor()
            if not count or not cursor.first():
                raise DataError(f"{self.where}: the LMDB {self.source} holds no record")
            skip = int(layer_rng(self.name, 0).integers(param.rand_skip)) if param.rand_skip else 0
            for _ in range(skip % count):
                cursor.next()
            self._next_key = bytes(cursor.key())
        if skip:
            _LOG.info("%s: skipping the first %d record(s) (rand_skip %d)", self.where, skip, param.rand_skip)

    def _read(self, n: int, advance: bool = True) -> list[tuple[str, object]]:
        """The next ``n`` records as (name, Datum), wrapping around at the end of the LMDB."""
        records = []
        with lmdb_errors(self.source, "read"), open_lmdb(self.source) as env, env.begin() as txn:
            cursor = txn.cursor()
            # set_range: the first key >= the saved one (also if the database was rewritten meanwhile)
            if not cursor.set_range(self._next_key) and not cursor.first():
                raise DataError(f"{self.where}: the LMDB {self.source} holds no record")
            for _ in range(n):
                name = f"LMDB {self.source} record '{bytes(cursor.key()).decode(errors='replace')}'"
                records.append((name, parse_datum(bytes(cursor.value()), f"{self.where}: {name}")))
                if not cursor.next():
                    cursor.first()  # Caffe's reader restarts from the first record
            if advance:
                self._next_key = bytes(cursor.key())
        return records

    def _array(self, name: str, datum) -> np.ndarray:
        x = datum_array(datum, f"{self.where}: {name}", self.transform.color if datum.encoded else None)
        if x.shape[0] < 1:
            raise DataError(f"{self.where}: {name}: the Datum has no channels")
        return x

    def reshape(self, bottom_shapes):
        # Caffe's DataLayerSetUp peeks at the next record (without consuming it) for the shape.
        (name, datum), = self._read(1, advance=False)
        shape = self.transform.shape(*self._array(name, datum).shape, name)
        return [(self.batch_size, *shape), (self.batch_size,)][:len(self.lp.top)]

    def forward(self, bottoms):
        records = self._read(self.batch_size)
        names = [name for name, _ in records]
        arrays = [self._array(name, datum) for name, datum in records]
        first = arrays[0].shape
        for x, name in zip(arrays, names, strict=True):
            if x.shape != first:  # Caffe CHECK-fails on a Datum whose size differs from the batch's
                raise DataError(f"{self.where}: {name} is a Datum of size {list(x.shape)} (C, H, W) but the "
                                f"batch's first record ({names[0]}) is {list(first)}: a Datum of the wrong size")
        data = _stack([self.transform(x, name) for x, name in zip(arrays, names, strict=True)], names, self.where)
        tops = [data]
        if len(self.lp.top) > 1:
            tops.append(np.array([d.label for _, d in records], dtype=np.float32))
        return tops


def read_image_list(source: Path, where: str) -> list[tuple[str, int]]:
    """Caffe's ImageData list: one ``path label`` a line, split at the *last* space.

    Blank lines are skipped (Caffe would try to read an image named ""); a label must be an integer.
    """
    lines = []
    for n, line in enumerate(read_text(source, "image list", DataError).splitlines(), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        path, _, label = line.rpartition(" ")
        try:
            lines.append((path, int(label)))
        except ValueError:
            raise DataError(f"{where}: line {n} of {source} is {line!r}; expected 'path label' with an integer "
                            "label after the last space") from None
        if not path:
            raise DataError(f"{where}: line {n} of {source} gives no image path before the label")
    if not lines:
        raise DataError(f"{where}: the image list {source} is empty")
    return lines


@register("ImageData")
class ImageData(Layer):
    """Caffe's ImageDataLayer: images listed in a text file (``path label`` per line).

    The path read is ``root_folder + path`` (string concatenation, as Caffe: end root_folder with a
    ``/``). ``is_color`` (default true) gives 3 channels in BGR order, false 1 (grayscale: Pillow's
    ``(299 R + 587 G + 114 B) / 1000`` on a colour image; OpenCV's weights are the same up to rounding,
    so a colour image read as gray may differ by a level). ``new_height`` / ``new_width`` (both or
    neither) resize every image with Pillow's bilinear filter on the 8-bit pixels; Caffe uses OpenCV's
    ``cv::resize`` (INTER_LINEAR), which does not widen the filter when shrinking and rounds in fixed
    point: resized pixels differ from Caffe's (by up to tens of levels when shrinking a lot). Without a
    resize, PNG / BMP pixels equal Caffe's; JPEG decoders may differ slightly.

    ``shuffle``: the list is shuffled at setup and again each time it wraps around (seeded,
    :func:`~.data_transform.layer_rng`; Caffe's own RNG gives another order). ``rand_skip`` r: the first
    ``k`` lines, ``k`` uniform in [0, r), are skipped once (fewer than k + 1 lines: an error, as Caffe).
    """

    num_bottoms = 0
    num_tops = 2
    shape_from_forward = True

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        param = lp.image_data_param
        self.where = f"layer '{self.name}' (ImageData)"
        if (param.new_height > 0) != (param.new_width > 0):
            raise DataError(f"{self.where}: give both new_height and new_width, or neither (got "
                            f"{param.new_height} x {param.new_width})")
        self.resize = Preprocess(size=(param.new_height, param.new_width)) if param.new_height > 0 else None
        self.batch_size = check_batch_size(param.batch_size, self.where, "image_data_param.batch_size")
        self.source = source_path(param.source, self.where, "image_data_param.source")
        self.root = param.root_folder
        self.channels = 3 if param.is_color else 1
        self.shuffle = bool(param.shuffle)
        self.lines = read_image_list(self.source, self.where)
        self.transform = DataTransformer(transform_param(lp, param), phase, self.where, layer_rng(self.name, 1))
        self._rng = layer_rng(self.name, 0)
        if self.shuffle:
            self._shuffle()
        self._pos = 0
        if param.rand_skip:
            skip = int(self._rng.integers(param.rand_skip))
            if skip >= len(self.lines):
                raise DataError(f"{self.where}: rand_skip drew {skip} but {self.source} lists {len(self.lines)} "
                                "image(s): not enough to skip")
            self._pos = skip

    def _shuffle(self) -> None:
        self.lines = [self.lines[i] for i in self._rng.permutation(len(self.lines))]

    def _load(self, index: int) -> tuple[str, np.ndarray]:
        """(description, uint8 (C, H, W) in BGR order) of list entry ``index``."""
        path = Path(self.root + self.lines[index][0])
        what = f"image {path}"
        if not path.is_file():
            raise DataError(f"{self.where}: {what} (listed in {self.source}) does not exist")
        hwc = decode_image(path, self.channels, f"{self.where}: {what}")
        if self.resize is not None:
            hwc = self.resize.resize(hwc, f"{self.where}: {what}")
        chw = np.transpose(hwc, (2, 0, 1))
        return what, np.ascontiguousarray(chw[::-1] if self.channels == 3 else chw)

    def reshape(self, bottom_shapes):
        what, x = self._load(self._pos)  # Caffe reads the next image for the shape
        return [(self.batch_size, *self.transform.shape(*x.shape, what)), (self.batch_size,)]

    def forward(self, bottoms):
        items, names, labels = [], [], []
        for _ in range(self.batch_size):
            what, x = self._load(self._pos)
            items.append(self.transform(x, what))
            names.append(what)
            labels.append(self.lines[self._pos][1])
            self._pos += 1
            if self._pos == len(self.lines):  # Caffe restarts from the first line, reshuffled
                self._pos = 0
                if self.shuffle:
                    self._shuffle()
        return [_stack(items, names, self.where), np.asarray(labels, dtype=np.float32)]
