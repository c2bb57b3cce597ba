"""Caffe LMDB of Datum: a tiny database written here, read back raw, float and encoded."""

import io

import numpy as np
import pytest

from amct_caffe.data import DataError, ImageFolder, LmdbData, Preprocess, detect_kind, open_source
from amct_caffe.io.schema import caffe_pb
from tests.data.common import IMAGENET, needs_imagenet

lmdb = pytest.importorskip("lmdb")
Image = pytest.importorskip("PIL.Image")


def _write_lmdb(path, datums: dict) -> None:
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for key, datum in datums.items():
            txn.put(key.encode(), datum.SerializeToString())
    env.close()


def _raw_datum(bgr_chw: np.ndarray, label: int):
    """What convert_imageset stores: uint8 (C, H, W), BGR."""
    d = caffe_pb().Datum()
    d.channels, d.height, d.width = bgr_chw.shape
    d.data = np.ascontiguousarray(bgr_chw).tobytes()
    d.label = label
    return d


def test_raw_datums_in_key_order_with_crop_mean_scale(tmp_path):
    rng = np.random.default_rng(0)
    keys = ("00000002", "00000000", "00000001")  # written out of order: read back in key order
    images = {k: rng.integers(0, 256, (3, 8, 10), dtype=np.uint8) for k in keys}
    _write_lmdb(tmp_path / "db", {k: _raw_datum(v, int(k)) for k, v in images.items()})
    assert detect_kind(tmp_path / "db") == "lmdb"
    spec = Preprocess(crop=(6, 6), mean=(104, 117, 123), scale=0.5)
    src = LmdbData(tmp_path / "db", {"data": (1, 3, 6, 6)}, spec, batch_size=3)
    batch = src.batch(0)["data"]
    assert batch.shape == (3, 3, 6, 6) and batch.dtype == np.float32
    assert [src.label(i) for i in range(3)] == [0, 1, 2]
    for i, key in enumerate(("00000000", "00000001", "00000002")):
        crop = images[key][:, 1:7, 2:8].astype(np.float64)
        want = (crop - np.array([104, 117, 123]).reshape(3, 1, 1)) * 0.5
        np.testing.assert_allclose(batch[i], want, rtol=1e-6)
    rgb = LmdbData(tmp_path / "db", ["data"], Preprocess(channel_order="RGB")).batch(0)["data"][0]
    np.testing.assert_array_equal(rgb, images["00000000"][::-1])
    assert len(src.select(step=2).with_batch_size(1)) == 2


def test_float_and_encoded_datums(tmp_path):
    d = caffe_pb().Datum()
    d.channels, d.height, d.width = 1, 2, 3
    d.float_data.extend([0.5, 1, 2, 3, 4, 5])
    png = np.arange(12, dtype=np.uint8).reshape(2, 2, 3) * 20
    buf = io.BytesIO()
    Image.fromarray(png).save(buf, format="PNG")
    e = caffe_pb().Datum()
    e.encoded, e.data = True, buf.getvalue()
    _write_lmdb(tmp_path / "f", {"a": d})
    _write_lmdb(tmp_path / "e", {"a": e})
    got = LmdbData(tmp_path / "f", {"data": (1, 1, 2, 3)}, Preprocess(scale=2)).batch(0)["data"]
    np.testing.assert_array_equal(got[0, 0], [[1, 2, 4], [6, 8, 10]])
    enc = LmdbData(tmp_path / "e", {"data": (1, 3, 2, 2)}).batch(0)["data"][0]
    np.testing.assert_array_equal(enc, png[:, :, ::-1].transpose(2, 0, 1))  # decoded RGB -> BGR
    with pytest.raises(DataError, match="float_data cannot be resized"):
        LmdbData(tmp_path / "f", ["data"], Preprocess(size=4)).batch(0)


@needs_imagenet
def test_imagenet_datum_equals_image_folder(tmp_path):
    """A Datum holding an image's BGR bytes gives what the image folder gives for the file."""
    path = sorted(IMAGENET.iterdir())[0]
    rgb = np.asarray(Image.open(path).convert("RGB"))
    _write_lmdb(tmp_path / "db", {"00000000": _raw_datum(rgb[:, :, ::-1].transpose(2, 0, 1), 0)})
    spec = Preprocess(short_side=256, crop=224, mean=(104, 117, 123))
    inputs = {"data": (10, 3, 224, 224)}
    from_db = open_source(tmp_path / "db", inputs, preprocess=spec).batch(0)["data"]
    from_file = ImageFolder(IMAGENET, inputs, spec).batch(0)["data"]
    np.testing.assert_array_equal(from_db, from_file)
    resized = Preprocess(size=(100, 120), crop=96)
    np.testing.assert_array_equal(LmdbData(tmp_path / "db", ["data"], resized).batch(0)["data"],
                                  ImageFolder(IMAGENET, ["data"], resized).batch(0)["data"])


def test_lmdb_errors(tmp_path):
    _write_lmdb(tmp_path / "db", {"k": _raw_datum(np.zeros((3, 4, 4), np.uint8), 0)})
    with pytest.raises(DataError, match="a Datum feeds one input"):
        LmdbData(tmp_path / "db", ["a", "b"])
    with pytest.raises(DataError, match="3-channel Datum for input 'data' of 1 channels"):
        LmdbData(tmp_path / "db", {"data": (1, 1, 4, 4)}).batch(0)
    with pytest.raises(DataError, match="takes"):
        LmdbData(tmp_path / "db", {"data": (1, 3, 2, 2)}).batch(0)
    with pytest.raises(DataError, match="not an LMDB"):
        LmdbData(tmp_path, ["data"])
    _write_lmdb(tmp_path / "bad", {"k": caffe_pb().NetParameter(name="x" * 40)})
    with pytest.raises(DataError, match="not a Caffe Datum|holds no data"):
        LmdbData(tmp_path / "bad", ["data"]).batch(0)
