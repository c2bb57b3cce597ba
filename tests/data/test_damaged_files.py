"""Damaged or hostile data files are a DataError naming the file, whatever the parser underneath raises."""

import struct
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from amct_caffe.data import ArrayData, DataError, ImageFolder, LmdbData, Preprocess, RecordData


def _damage(path, start: int, stop: int, seed: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[start:stop] = np.random.default_rng(seed).bytes(stop - start)
    path.write_bytes(bytes(data))


def test_array_files(tmp_path):
    x = np.zeros((8, 1, 4, 4), np.float32)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "text.npy").write_text("1 2 3")
    np.save(tmp_path / "cut.npy", x)
    (tmp_path / "cut.npy").write_bytes((tmp_path / "cut.npy").read_bytes()[:200])
    np.savez_compressed(tmp_path / "header.npz", data=x)
    damaged = bytearray((tmp_path / "header.npz").read_bytes())
    damaged[30:120] = bytes(90)  # np.load's header parsing: tokenize.TokenError, was not caught
    (tmp_path / "header.npz").write_bytes(bytes(damaged))
    np.savez(tmp_path / "cut.npz", data=x)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "cut.npz").read_bytes()[:300])  # zipfile.BadZipFile
    (tmp_path / "folder.npy").mkdir()
    for name, message in [("objects.npy", "holds Python objects"), ("text.npy", "is not a .npy file"),
                          ("cut.npy", r"cannot read the arrays \(ValueError"),
                          ("header.npz", "cannot read the arrays"),
                          ("cut.npz", r"cannot read the arrays \(zipfile.BadZipFile"),
                          ("folder.npy", "is a directory")]:
        with pytest.raises(DataError, match=f"{name}.*{message}|{message}.*{name}"):
            ArrayData(tmp_path / name, {"data": (1, 1, 4, 4)})


def test_recorded_batch_damaged_after_recording(tmp_path):
    """Headers intact, compressed data damaged: zlib.error came out of batch()."""
    (tmp_path / "rec").mkdir()
    x = np.random.default_rng(0).normal(size=(4, 3, 64, 64)).astype(np.float32)
    np.savez_compressed(tmp_path / "rec/batch_000000.npz", data=x)
    _damage(tmp_path / "rec/batch_000000.npz", 5000, 6000)
    source = RecordData(tmp_path / "rec")
    with pytest.raises(DataError, match=r"batch_000000.npz: cannot read the recorded batch \(zlib.error"):
        source.batch(0)


def test_image_decoder_errors_other_than_oserror(tmp_path):
    """A PNG claiming 60000 x 60000 pixels: Pillow's DecompressionBombError is no OSError."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    (tmp_path / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b""))
    with pytest.raises(DataError, match=r"bomb.png: cannot read the image \(PIL.Image.DecompressionBombError"):
        ImageFolder(tmp_path, ["data"]).batch(0)


def test_damaged_lmdb(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    with lmdb.open(str(tmp_path / "db"), map_size=1 << 24) as env, env.begin(write=True) as txn:
        for i in range(300):
            txn.put(b"%08d" % i, bytes(500))
    mdb = tmp_path / "db/data.mdb"
    for offset in range(8192, mdb.stat().st_size, 4096):  # the pages after the two meta pages
        _damage(mdb, offset + 16, offset + 400, seed=offset)
    with pytest.raises(DataError, match="cannot list the records of the LMDB .*db .*damaged or not a Caffe LMDB"):
        LmdbData(tmp_path / "db", ["data"])


_TRUNCATED_LMDB = """
import sys
from amct_caffe.data import DataError, LmdbData
try:
    LmdbData(sys.argv[1], ["data"]).batch(0)
except DataError as e:
    print(e)
"""


@pytest.mark.parametrize("keep", [4096 + 200, 8192, 8192 * 3])
def test_truncated_lmdb_is_refused_before_liblmdb_reads_past_the_end(tmp_path, keep):
    """A data.mdb cut short (a copy interrupted, a full disk): liblmdb maps it, and the first page past
    the end killed the process with SIGBUS. Run in a child process, so that a regression fails one test."""
    lmdb = pytest.importorskip("lmdb")
    with lmdb.open(str(tmp_path / "db"), map_size=1 << 24) as env, env.begin(write=True) as txn:
        for i in range(40):
            txn.put(b"%08d" % i, bytes(3000))
    mdb = tmp_path / "db/data.mdb"
    whole = mdb.stat().st_size
    mdb.write_bytes(mdb.read_bytes()[:keep])
    run = subprocess.run([sys.executable, "-c", _TRUNCATED_LMDB, str(tmp_path / "db")],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"data.mdb is truncated: it holds {keep} bytes, but its pages run to {whole}" in run.stdout


_DATA_LAYER = """
import sys
from amct_caffe.data import DataError
from amct_caffe.runtime import TRAIN, Net
try:
    Net(sys.argv[1], TRAIN)
except DataError as e:
    print(e)
"""


@pytest.mark.parametrize("page", [3, 10])
@pytest.mark.parametrize("reader", ["source", "layer"])
def test_a_zeroed_page_is_refused_before_liblmdb_aborts(tmp_path, page, reader):
    """A page of zeros in a data.mdb of full length (a disk error): liblmdb's cursor fails an assertion on it
    and aborts the process (SIGABRT, status 134). The calibration source and the Data layer now refuse it.
    Run in a child process, so that a regression fails one test."""
    lmdb = pytest.importorskip("lmdb")
    with lmdb.open(str(tmp_path / "db"), map_size=1 << 24) as env, env.begin(write=True) as txn:
        for i in range(40):
            txn.put(b"%08d" % i, bytes(784))
    mdb = tmp_path / "db/data.mdb"
    data = bytearray(mdb.read_bytes())
    data[page * 4096:(page + 1) * 4096] = bytes(4096)
    mdb.write_bytes(bytes(data))
    (tmp_path / "net.prototxt").write_text(
        f'layer {{ name: "d" type: "Data" top: "x" data_param {{ source: "{tmp_path / "db"}" batch_size: 2 '
        'backend: LMDB } }')
    code, arg = (_TRUNCATED_LMDB, tmp_path / "db") if reader == "source" else (_DATA_LAYER, tmp_path / "net.prototxt")
    run = subprocess.run([sys.executable, "-c", code, str(arg)], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    assert re.search(r"the LMDB .*db is damaged: walking its records crashed liblmdb \(SIGABRT", run.stdout), run.stdout


def test_non_finite_or_complex_samples_are_refused_naming_the_sample(tmp_path):
    x = np.ones((6, 1, 4, 4), np.float32)
    x[4, 0, 1, 2] = np.nan
    with pytest.raises(DataError, match=r"sample 4 for input 'data' holds NaN or infinite values"):
        ArrayData({"data": x}, {"data": (1, 1, 4, 4)}, batch_size=3).batch(1)
    assert ArrayData({"data": x}, {"data": (1, 1, 4, 4)}, batch_size=3).batch(0)["data"].shape == (3, 1, 4, 4)
    huge = np.full((2, 1, 4, 4), 1e30)  # finite as stored, beyond float32 after the scale
    with pytest.raises(DataError, match=r"sample 0 for input 'data' holds NaN or infinite values"):
        ArrayData({"data": huge}, {"data": (1, 1, 4, 4)}, scale=1e10).batch(0)
    from amct_caffe.data import checked_feeds
    with pytest.raises(DataError, match=r"calibrate: batch 0: input 'data' holds complex values \(complex128\)"):
        list(checked_feeds([{"data": x.astype(complex)}], "calibrate"))
    np.save(tmp_path / "c.npy", x.astype(np.complex64))
    with pytest.raises(DataError, match=r"c.npy: the array for input 'data' holds complex values \(complex64\)"):
        ArrayData(tmp_path / "c.npy", {"data": (1, 1, 4, 4)})


def test_preprocess_values_that_only_look_like_numbers():
    with pytest.raises(DataError, match=r"Preprocess.std: expected numbers, got '12'"):
        Preprocess(std="12")  # was std (1.0, 2.0)
    with pytest.raises(DataError, match="Preprocess.mean: expected numbers"):
        Preprocess(mean=(104, True, 123))
    with pytest.raises(DataError, match="Preprocess.size"):
        Preprocess(size=5.5)  # was TypeError
    with pytest.raises(DataError, match="Preprocess.crop"):
        Preprocess(crop=True)  # was a 1x1 crop
    with pytest.raises(DataError, match="--preprocess x.json: 'data': Preprocess.scale"):
        Preprocess.from_dict({"scale": [1, 2]}, "--preprocess x.json: 'data'")
    assert Preprocess(mean=np.array([1, 2, 3]), size=np.array([4, 5])) == Preprocess(mean=(1, 2, 3), size=(4, 5))


def test_resize_larger_than_pillow_allows_is_refused():
    image = np.zeros((10, 20, 3), np.uint8)
    for spec in (Preprocess(size=(3_000_000_000, 2)), Preprocess(short_side=10 ** 20), Preprocess(size=(10 ** 5,) * 2)):
        with pytest.raises(DataError, match="img.png: resizing to .* exceeds Pillow's image size limit"):
            spec.apply(image, "img.png")
