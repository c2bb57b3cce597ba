"""Record: what an inference loop feeds is saved atomically and served back, in order."""

import numpy as np
import pytest

from amct_caffe.data import DataError, Preprocess, Record, detect_kind, open_source
from amct_caffe.data import record as record_mod


def _batches(n, size=4, seed=0):
    rng = np.random.default_rng(seed)
    return [{"data": rng.normal(size=(size, 3, 5, 5)).astype(np.float32),
             "im_info": rng.normal(size=(size, 3)).astype(np.float32)} for _ in range(n)]


def test_round_trip_in_order_and_rebatched(tmp_path):
    fed = _batches(3)
    rec = Record(tmp_path / "calib")
    for b in fed:
        assert rec.add(data=b["data"], im_info=b["im_info"])
    assert len(rec) == 3
    assert [p.name for p in rec.saved] == ["batch_000000.npz", "batch_000001.npz", "batch_000002.npz"]
    assert not list((tmp_path / "calib").glob(".*"))  # no temporary left behind

    back = Record.load(tmp_path / "calib")
    assert back.inputs == ("data", "im_info") and back.batch_size == 4 and len(back) == 3
    for got, want in zip(back, fed, strict=True):
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    rebatched = Record.load(tmp_path / "calib", batch_size=6)
    assert len(rebatched) == 2
    all_data = np.concatenate([b["data"] for b in fed])
    np.testing.assert_array_equal(rebatched.batch(1)["data"], all_data[6:12])
    only_data = Record.load(tmp_path / "calib", inputs=["data"]).select(step=5)
    np.testing.assert_array_equal(only_data.with_batch_size(3).batch(0)["data"], all_data[[0, 5, 10]])
    assert detect_kind(tmp_path / "calib") == "record"
    src = open_source(tmp_path / "calib", {"data": (1, 3, 5, 5), "im_info": (1, 3)}, batch_size=12)
    np.testing.assert_array_equal(src.batch(0)["data"], all_data)


def test_mapping_form_int_data_grayscale_promotion_and_odd_names(tmp_path):
    rec = Record(tmp_path)
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    rec.add({"file": images})  # np.savez(file=...) would clash with its own argument
    back = Record.load(tmp_path, inputs={"file": (64, 1, 28, 28)})
    got = back.batch(0)["file"]
    assert got.shape == (2, 1, 28, 28) and got.dtype == np.float32
    np.testing.assert_array_equal(got[:, 0], images)


def test_max_batches_append_and_layout_checks(tmp_path):
    fed = _batches(3)
    rec = Record(tmp_path, max_batches=2)
    assert [rec.add(b) for b in fed] == [True, True, False]
    with pytest.raises(DataError, match="already holds 2 recorded batch"):
        Record(tmp_path)
    more = Record(tmp_path, append=True)
    more.add(fed[2])
    assert more.saved[0].name == "batch_000002.npz"
    with pytest.raises(DataError, match="differs from the recorded"):
        more.add(data=np.zeros((4, 3, 6, 6), np.float32), im_info=np.zeros((4, 3), np.float32))
    with pytest.raises(DataError, match="different numbers of samples"):
        more.add(data=np.zeros((4, 3, 5, 5)), im_info=np.zeros((2, 3)))
    with pytest.raises(DataError, match="no array given"):
        more.add()
    with pytest.raises(DataError, match="given twice"):
        more.add({"data": fed[0]["data"]}, data=fed[0]["data"])
    assert len(Record.load(tmp_path)) == 3


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(record_mod.np.lib.format, "write_array", boom)
    with pytest.raises(OSError, match="disk full"):
        Record(tmp_path).add(data=np.zeros((1, 2)))
    assert list(tmp_path.iterdir()) == []


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="holds no recorded batch"):
        Record.load(tmp_path)
    Record(tmp_path).add(data=np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(DataError, match="no recorded array for input"):
        Record.load(tmp_path, inputs=["image"])
    with pytest.raises(DataError, match="do not fit input 'data'"):
        Record.load(tmp_path, inputs={"data": (1, 3, 8, 8)})
    with pytest.raises(DataError, match="no preprocessing applies"):
        open_source(tmp_path, {"data": None}, preprocess=Preprocess(scale=2))
    (tmp_path / "batch_000001.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="batch_000001.npz: not a readable .npz"):
        Record.load(tmp_path)
