"""Calibration batches from a Caffe LMDB of ``Datum`` records (what ``convert_imageset`` writes).

Needs the ``lmdb`` package (``pip install lmdb``). Records are taken in key order (LMDB sorts keys
bytewise; ``convert_imageset`` numbers them), so the order is fixed. A Datum holds one of:

* ``data``: uint8 bytes, (channels, height, width), colour channels in BGR order (Caffe reads
  images with OpenCV);
* ``float_data``: float values, same layout (no resize possible);
* ``encoded`` image bytes (``convert_imageset --encoded``), decoded with Pillow.

Each then goes through the input's :class:`~amct_caffe.data.preprocess.Preprocess`, Caffe's
``transform_param`` in effect (crop_size -> ``crop``, mean_value -> ``mean``, scale -> ``scale``;
the stored BGR order is kept unless ``channel_order="RGB"``). The label is not fed: the net's
single input takes the image; ``label(i)`` reads it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import struct
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError

from amct_caffe.data.images import decode_image, per_input
from amct_caffe.data.preprocess import Preprocess
from amct_caffe.data.source import DataError, DataSource, failure, sample_shape
from amct_caffe.io.schema import caffe_pb
from amct_caffe.io.paths import register_data_names

_LOG = logging.getLogger(__name__)


def _lmdb():
    try:
        import lmdb
    except ImportError:
        raise DataError("reading a Caffe LMDB needs the lmdb package: pip install lmdb "
                        "(or pip install 'amct_caffe[lmdb]')") from None
    return lmdb


register_data_names(re.compile(r"^(data|lock)\.mdb$"))


def is_lmdb(path) -> bool:
    """True for an LMDB environment folder (holding data.mdb) or a data.mdb file."""
    path = Path(path)
    return (path.is_dir() and (path / "data.mdb").is_file()) or (path.is_file() and path.suffix == ".mdb")


# liblmdb's meta pages (pages 0 and 1 of data.mdb, 64-bit layout): after the 16-byte page header,
# mm_magic and mm_version (uint32 each), then at byte 40 of the page the page size (the free DB's md_pad),
# at byte 136 mm_last_pg and at 144 mm_txnid (uint64 each).
_META_MAGIC, _META_VERSION = 0xBEEFC0DE, 1


def _meta(head: bytes, offset: int) -> tuple[int, int, int] | None:
    """(page size, last page number, txnid) of the meta page at ``offset``, or None if it is not one."""
    if len(head) < offset + 152:
        return None
    magic, version = struct.unpack_from("<II", head, offset + 16)
    psize = struct.unpack_from("<I", head, offset + 40)[0]
    last_page, txnid = struct.unpack_from("<QQ", head, offset + 136)
    if magic != _META_MAGIC or version != _META_VERSION or not 512 <= psize <= 65536 or psize & (psize - 1):
        return None
    return psize, last_page, txnid


def check_complete(path: Path) -> None:
    """Refuse a data.mdb shorter than its newest meta page says it is (a copy cut short, a full disk):
    liblmdb maps the file, and reading a page past its end kills the process with SIGBUS. Files this
    check cannot read (another layout, no meta page) are left to liblmdb's own checks."""
    mdb = path / "data.mdb" if path.is_dir() else path
    try:
        size = mdb.stat().st_size
        with open(mdb, "rb") as f:
            head = f.read(4096 + 152)
            first = _meta(head, 0)
            if first is None:
                return
            f.seek(first[0])
            second = _meta(f.read(152), 0)
    except OSError:
        return  # lmdb.open says what is wrong with the file
    newest = max((m for m in (first, second) if m is not None), key=lambda m: m[2])
    need = (newest[1] + 1) * newest[0]
    if size < need:
        raise DataError(f"{mdb} is truncated: it holds {size} bytes, but its pages run to {need}; "
                        "copy the LMDB again (whole data.mdb)")


# Walks every key of an LMDB (argv 1; argv 2: "1" for a folder) as the readers do, in a process of its own.
_WALK = ("import sys, lmdb\n"
         "env = lmdb.open(sys.argv[1], readonly=True, lock=False, readahead=False, subdir=sys.argv[2] == '1')\n"
         "with env.begin() as txn:\n"
         "    for _ in txn.cursor().iternext(keys=True, values=False):\n"
         "        pass\n")
_walked: set[tuple] = set()  # (path, size, mtime) of the LMDBs already walked safely in this process


def check_walkable(path: Path) -> None:
    """Refuse an LMDB whose pages liblmdb cannot walk: on a damaged page (a zeroed block) its cursor fails an
    assertion and aborts the whole process (SIGABRT), which no exception handler sees. The keys are walked
    once in a child process first; a child killed by a signal means the file is damaged."""
    mdb = path / "data.mdb" if path.is_dir() else path
    try:
        stat = mdb.stat()
    except OSError:
        return  # lmdb.open says what is wrong
    key = (str(mdb.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _walked:
        return
    check_complete(path)
    result = subprocess.run([sys.executable, "-c", _WALK, str(path), "1" if path.is_dir() else "0"],
                            capture_output=True, text=True, check=False)
    if result.returncode < 0:
        name = signal.Signals(-result.returncode).name if -result.returncode in signal.valid_signals() else ""
        detail = (result.stderr.strip().splitlines() or [""])[-1]
        raise DataError(f"the LMDB {path} is damaged: walking its records crashed liblmdb ({name or 'signal'}"
                        f"{f': {detail}' if detail else ''}); copy or rebuild the LMDB")
    _walked.add(key)  # an lmdb.Error in the child is left to the reader, which names it


def open_lmdb(path: Path):
    """The environment at ``path``, opened read-only for one use (close it, e.g. ``with``).

    py-lmdb refuses a second open of the same environment in a process, so no reader keeps a handle
    between batches: two sources (or two nets' Data layers) may then read the same database.
    """
    lmdb = _lmdb()
    check_complete(path)
    try:
        return lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=path.is_dir(),
                         max_readers=16)
    except lmdb.Error as e:
        raise DataError(f"{path}: cannot open the LMDB: {e}") from None


@contextlib.contextmanager
def lmdb_errors(path: Path, what: str):
    """Turns the lmdb package's errors (e.g. MDB_PAGE_NOTFOUND in a damaged file) into DataError."""
    lmdb = _lmdb()
    try:
        yield
    except lmdb.Error as e:
        raise DataError(f"cannot {what} the LMDB {path} ({failure(e)}): "
                        "the file is damaged or not a Caffe LMDB") from None


def parse_datum(raw: bytes, where: str):
    """A serialized ``Datum`` (``where`` names the database and key in messages)."""
    datum = caffe_pb().Datum()
    try:
        datum.ParseFromString(raw)
    except DecodeError as e:
        raise DataError(f"{where}: the record is not a Caffe Datum: {e}") from None
    return datum


def datum_array(datum, where: str, color: bool | None = None) -> np.ndarray:
    """The pixels of a Datum as (C, H, W), colour channels in BGR order as Caffe (OpenCV) holds them.

    ``data`` -> uint8; ``float_data`` -> float32; an ``encoded`` image is decoded with Pillow to
    uint8: ``color`` True -> 3 channels (Caffe's ``force_color``), False -> 1 (``force_gray``), None
    -> as stored (:func:`~amct_caffe.data.images.decode_image`). The stored size must be
    ``channels * height * width`` values.
    """
    if datum.encoded:
        hwc = decode_image(bytes(datum.data), None if color is None else (3 if color else 1), where)
        chw = np.transpose(hwc, (2, 0, 1))
        # RGB(A) -> BGR(A), OpenCV's order
        return np.ascontiguousarray(chw[[2, 1, 0, 3][:chw.shape[0]]] if chw.shape[0] >= 3 else chw)
    c, h, w = datum.channels, datum.height, datum.width
    if len(datum.data):
        if len(datum.data) != c * h * w:
            raise DataError(f"{where}: {len(datum.data)} data bytes for shape ({c}, {h}, {w})")
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(c, h, w)
    if len(datum.float_data):
        if len(datum.float_data) != c * h * w:
            raise DataError(f"{where}: {len(datum.float_data)} float_data values for shape ({c}, {h}, {w})")
        return np.asarray(datum.float_data, dtype=np.float32).reshape(c, h, w)
    raise DataError(f"{where}: the Datum holds no data")


class LmdbData(DataSource):
    """Batches of Datum images from a Caffe LMDB.

    Args:
        path: the LMDB folder (or its data.mdb).
        inputs: {input name: shape (N, C, H, W)} with exactly one input (a shape of None skips
            the checks), or a one-name list.
        preprocess: a :class:`Preprocess` (or {input name: Preprocess}).
        batch_size: samples per batch.
    """

    def __init__(self, path, inputs: Mapping[str, Sequence[int] | None] | Sequence[str],
                 preprocess: Preprocess | Mapping[str, Preprocess] | None = None, batch_size: int = 1):
        self.path = Path(path)
        shapes = inputs if isinstance(inputs, Mapping) else {n: None for n in inputs}
        if len(shapes) != 1:
            raise DataError(f"LMDB {self.path}: a Datum feeds one input, but the net takes {len(shapes)} "
                            f"({', '.join(shapes)}); use .npz files or an image folder per input")
        if not is_lmdb(self.path):
            raise DataError(f"{self.path} is not an LMDB (no data.mdb)")
        (self._name, shape), = shapes.items()
        self._shape = sample_shape(shape)
        self._preprocess = per_input(preprocess, [self._name], Preprocess(), "preprocess")[self._name]
        check_walkable(self.path)
        with self._reading("list the records of"), self._open() as env, env.begin(buffers=False) as txn:
            self._keys = [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]
        if not self._keys:
            raise DataError(f"LMDB {self.path} holds no record")
        super().__init__([self._name], len(self._keys), batch_size)

    def describe(self) -> str:
        return f"LMDB {self.path}"

    def _open(self):
        return open_lmdb(self.path)

    def _reading(self, what: str):
        return lmdb_errors(self.path, what)

    def _where(self, i: int) -> str:
        return f"{self.path} record {self._keys[i].decode(errors='replace')}"

    def _datums(self, indices: list[int]) -> list:
        with self._reading("read"), self._open() as env, env.begin(buffers=False) as txn:
            raws = [txn.get(self._keys[i]) for i in indices]
        return [parse_datum(raw, self._where(i)) for i, raw in zip(indices, raws, strict=True)]

    def label(self, i: int) -> int:
        """The label of sample ``i`` of this source (after any ``select``)."""
        return int(self._datums([self._index[i]])[0].label)

    def sample(self, i: int, datum=None) -> np.ndarray:
        """Underlying record ``i`` (its Datum, if already read), preprocessed: float32 (C, H, W)."""
        datum = datum if datum is not None else self._datums([i])[0]
        where = self._where(i)
        want_c = self._shape[0] if self._shape is not None else None
        pre = self._preprocess
        color = None
        if datum.encoded:
            channels = want_c or (datum.channels if datum.channels in (1, 3) else 3)
            if channels not in (1, 3):
                raise DataError(f"{where}: an encoded image cannot feed input '{self._name}' of {channels} "
                                "channels (1 or 3 expected)")
            color = channels == 3
        chw = datum_array(datum, where, color)
        c = chw.shape[0]
        if want_c is not None and c != want_c:
            raise DataError(f"{where}: {c}-channel Datum for input '{self._name}' of {want_c} channels")
        if pre.resizes:  # via Pillow, on the 8-bit image in RGB order
            if chw.dtype != np.uint8:
                raise DataError(f"{where}: float_data cannot be resized; give crop only")
            hwc = np.transpose(chw[::-1] if c == 3 else chw, (1, 2, 0))
            out = pre.apply(np.ascontiguousarray(hwc), where)
        else:
            out = pre.finish(chw, "BGR", where)
        if self._shape is not None and out.shape != self._shape:
            raise DataError(f"{where}: preprocessed to shape {out.shape} but input '{self._name}' takes "
                            f"{self._shape}: set the resize / crop")
        return out

    def _load(self, indices: list[int]) -> dict[str, np.ndarray]:
        datums = self._datums(indices)
        return {self._name: np.stack([self.sample(i, d) for i, d in zip(indices, datums, strict=True)])}


def write_lmdb(path, images, labels) -> Path:
    """Write ``images`` (N, H, W) or (N, C, H, W) uint8 with integer ``labels`` (N,) as a Caffe LMDB.

    One raw ``Datum`` per image (channels, height, width, data bytes, label) under the key
    ``%08d`` of its index, as Caffe's ``convert_mnist_data`` and ``convert_imageset`` number them,
    so a Data layer reads them in order. The database is built in a temporary folder beside
    ``path`` and renamed into place: an existing ``path`` is refused, never overwritten, and a
    failure leaves nothing behind.
    """
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    lmdb = _lmdb()
    path = Path(path)
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.dtype != np.uint8:
        raise DataError(f"{path}: write_lmdb takes uint8 images of shape (N, H, W) or (N, C, H, W), "
                        f"got {images.dtype} {list(images.shape)}")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: write_lmdb needs one integer label per image, got {labels.dtype} "
                        f"{list(labels.shape)} for {len(images)} images")
    if path.exists():
        raise DataError(f"{path} exists: write_lmdb never overwrites; remove it or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        datum = caffe_pb().Datum()
        env = lmdb.open(str(staging), map_size=max(1 << 20, 2 * images.nbytes + 4096 * len(images)))
        try:
            with env.begin(write=True) as txn:
                for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
                    datum.Clear()
                    datum.channels, datum.height, datum.width = (int(d) for d in img.shape)
                    datum.data = np.ascontiguousarray(img).tobytes()
                    datum.label = int(lab)
                    txn.put(f"{i:08d}".encode(), datum.SerializeToString())
        finally:
            env.close()
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path
