"""The executor's data layers (Data, ImageData, MemoryData, HDF5Data) against independent numpy
computations: record order, wrap-around, the transformer's mean / scale / crop / mirror math, label
dtype and shape, seeded randomness, and the errors bad input gives."""

from __future__ import annotations

import builtins

import numpy as np
import pytest

from amct_caffe.data import DataError
from amct_caffe.errors import AmctError, GraphError
from amct_caffe.runtime.net import TEST, TRAIN, Net
from tests.runtime.data_builders import (data_net, datum, mnist, png_bytes, write_h5, write_images, write_lmdb,
                                         write_mean)

lmdb = pytest.importorskip("lmdb")
Image = pytest.importorskip("PIL.Image")

DB = 'type: "Data" data_param {{ source: "{src}" batch_size: {bs} backend: LMDB {extra} }}'


def _net(tmp_path, layer: str, phase=TEST, tops=("data", "label"), name="net.prototxt", extra_layers=""):
    path = tmp_path / name
    path.write_text(data_net(layer, tops) + extra_layers)
    return Net(str(path), phase)


@pytest.fixture
def mnist_db(tmp_path):
    """10 MNIST digits, written out of key order (LMDB reads them back sorted)."""
    images, labels = mnist(10)
    keys = [f"{i:08d}" for i in range(10)]
    write_lmdb(tmp_path / "db", {k: datum(images[i], labels[i]) for i, k in reversed(list(enumerate(keys)))})
    return tmp_path / "db", images, labels


# ------------------------------------------------------------------------------------------ Data
def test_data_key_order_wraparound_mean_scale_centre_crop(tmp_path, mnist_db):
    db, images, labels = mnist_db
    net = _net(tmp_path, DB.format(src=db, bs=4, extra="") + " transform_param { scale: 0.25 mean_value: 33 "
               "crop_size: 20 }")
    assert net.blobs["data"].shape == (4, 1, 20, 20) and net.blobs["label"].shape == (4,)
    assert net.inputs == []
    order = np.arange(12) % 10  # three batches of 4 from 10 records: the third wraps around
    for b in range(3):
        out = net.forward()
        rows = order[4 * b:4 * b + 4]
        window = images[rows][:, :, 4:24, 4:24].astype(np.float64)  # TEST: (28 - 20) // 2 = 4
        want = ((window - 33) * 0.25).astype(np.float32)
        np.testing.assert_array_equal(out["data"], want)
        assert out["label"].dtype == np.float32
        np.testing.assert_array_equal(out["label"], labels[rows].astype(np.float32))


def test_data_mean_file_is_taken_at_the_crop_window(tmp_path, mnist_db):
    db, images, _ = mnist_db
    mean = np.random.default_rng(0).uniform(0, 255, (1, 28, 28)).astype(np.float32)
    write_mean(tmp_path / "mean.binaryproto", mean)
    net = _net(tmp_path, DB.format(src=db, bs=3, extra="") + f' transform_param {{ mean_file: '
               f'"{tmp_path / "mean.binaryproto"}" crop_size: 25 scale: 0.5 }}', tops=("data",))
    out = net.forward()["data"]
    assert list(net.outputs) == ["data"]
    h = w = (28 - 25) // 2
    want = (images[:3, :, h:h + 25, w:w + 25].astype(np.float32) - mean[:, h:h + 25, w:w + 25]) * np.float32(0.5)
    np.testing.assert_array_equal(out, want)


def test_data_float_datums_and_per_channel_means(tmp_path):
    rng = np.random.default_rng(1)
    arrays = rng.normal(size=(5, 3, 4, 6)).astype(np.float32)
    write_lmdb(tmp_path / "db", {f"{i}": datum(a, i, floats=True) for i, a in enumerate(arrays)})
    net = _net(tmp_path, DB.format(src=tmp_path / "db", bs=5, extra="") +
               " transform_param { mean_value: 1 mean_value: 2 mean_value: 3 }")
    out = net.forward()
    np.testing.assert_array_equal(out["data"], arrays - np.array([1, 2, 3], np.float32).reshape(3, 1, 1))
    np.testing.assert_array_equal(out["label"], np.arange(5, dtype=np.float32))


def test_train_crop_and_mirror_are_seeded_random_windows(tmp_path, mnist_db):
    db, images, _ = mnist_db
    layer = DB.format(src=db, bs=10, extra="") + " transform_param { crop_size: 24 mirror: true }"
    a = _net(tmp_path, layer, TRAIN, name="a.prototxt")
    b = _net(tmp_path, layer, TRAIN, name="b.prototxt")
    offsets, flips = set(), set()
    for _ in range(3):
        batch = a.forward()["data"]
        np.testing.assert_array_equal(batch, b.forward()["data"])  # same layer name: same draws
        for img, item in zip(images, batch, strict=True):
            found = [(h, w, m) for h in range(5) for w in range(5) for m in (False, True)
                     if np.array_equal((img[:, h:h + 24, w:w + 24][:, :, ::-1] if m else img[:, h:h + 24, w:w + 24]),
                                       item)]
            assert found, "an item is not a (mirrored) 24x24 window of its record"
            offsets.add(found[0][:2])
            flips.add(found[0][2])
    assert len(offsets) > 5 and flips == {False, True}


def test_mirror_applies_in_test_phase_too_but_the_crop_stays_centred(tmp_path, mnist_db):
    db, images, _ = mnist_db
    net = _net(tmp_path, DB.format(src=db, bs=10, extra="") + " transform_param { crop_size: 20 mirror: true }")
    centre = images[:, :, 4:24, 4:24].astype(np.float32)
    flips = set()
    for _ in range(2):
        for img, item in zip(centre, net.forward()["data"], strict=True):
            flip = np.array_equal(item, img[:, :, ::-1])
            assert flip or np.array_equal(item, img)
            flips.add(flip)
    assert flips == {False, True}


def test_encoded_png_datums_native_and_forced(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (3, 5, 7, 1), dtype=np.uint8)
    write_lmdb(tmp_path / "rgb", {f"{i}": datum(x.transpose(2, 0, 1), i, encoded=png_bytes(x))
                                  for i, x in enumerate(rgb)})
    write_lmdb(tmp_path / "gray", {f"{i}": datum(x.transpose(2, 0, 1), i, encoded=png_bytes(x))
                                   for i, x in enumerate(gray)})
    bgr = rgb.transpose(0, 3, 1, 2)[:, ::-1].astype(np.float32)
    native = _net(tmp_path, DB.format(src=tmp_path / "rgb", bs=3, extra=""), name="a.prototxt")
    np.testing.assert_array_equal(native.forward()["data"], bgr)  # OpenCV's channel order
    as_gray = _net(tmp_path, DB.format(src=tmp_path / "rgb", bs=3, extra="") + " transform_param { force_gray: true }",
                   name="b.prototxt")
    want = np.stack([np.asarray(Image.fromarray(x).convert("L")) for x in rgb])[:, None].astype(np.float32)
    np.testing.assert_array_equal(as_gray.forward()["data"], want)
    gray_native = _net(tmp_path, DB.format(src=tmp_path / "gray", bs=3, extra=""), name="c.prototxt")
    np.testing.assert_array_equal(gray_native.forward()["data"], gray.transpose(0, 3, 1, 2).astype(np.float32))
    as_colour = _net(tmp_path, DB.format(src=tmp_path / "gray", bs=3, extra="") +
                     " transform_param { force_color: true }", name="d.prototxt")
    np.testing.assert_array_equal(as_colour.forward()["data"],
                                  np.repeat(gray.transpose(0, 3, 1, 2), 3, axis=1).astype(np.float32))


def test_rand_skip_starts_at_a_seeded_record(tmp_path, mnist_db):
    db, _, labels = mnist_db
    net = _net(tmp_path, DB.format(src=db, bs=10, extra="rand_skip: 7"))
    got = net.forward()["label"]
    starts = [k for k in range(7) if np.array_equal(got, np.roll(labels, -k).astype(np.float32))]
    assert len(starts) >= 1
    again = _net(tmp_path, DB.format(src=db, bs=10, extra="rand_skip: 7"), name="again.prototxt")
    np.testing.assert_array_equal(again.forward()["label"], got)


def test_legacy_data_param_transform_fields_and_backward_through_a_data_net(tmp_path, mnist_db):
    db, images, _ = mnist_db
    # Old prototxts give scale / crop_size in data_param; Caffe's upgrade moves them to transform_param.
    ip = ('layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" loss_weight: 1 '
          'inner_product_param { num_output: 2 } }\n')
    net = _net(tmp_path, DB.format(src=db, bs=2, extra="scale: 2 crop_size: 26"), tops=("data",), extra_layers=ip)
    net.forward()
    np.testing.assert_array_equal(net.blobs["data"].data, images[:2, :, 1:27, 1:27].astype(np.float32) * 2)
    net.clear_param_diffs()
    net.backward()  # the Data layer needs no gradient: the Net skips it
    assert np.any(net.params["ip"][0].diff)


# ------------------------------------------------------------------------------------- ImageData
def _image_layer(source, bs, extra="", transform=""):
    text = f'type: "ImageData" image_data_param {{ source: "{source}" batch_size: {bs} {extra} }}'
    return text + (f" transform_param {{ {transform} }}" if transform else "")


def test_image_data_order_wraparound_root_folder_crop_mean(tmp_path):
    rng = np.random.default_rng(3)
    rgb = [rng.integers(0, 256, (9, 11, 3), dtype=np.uint8) for _ in range(5)]
    write_images(tmp_path / "imgs", rgb, [7, 6, 5, 4, 3], tmp_path / "list.txt")
    net = _net(tmp_path, _image_layer(tmp_path / "list.txt", 2, f'root_folder: "{tmp_path}/imgs/"',
                                      "crop_size: 7 mean_value: 10 mean_value: 20 mean_value: 30 scale: 0.5"))
    mean = np.array([10, 20, 30], np.float32).reshape(3, 1, 1)
    for b in range(3):  # 6 images from a list of 5: the third batch wraps around
        rows = [(2 * b) % 5, (2 * b + 1) % 5]
        out = net.forward()
        want = [(x.transpose(2, 0, 1)[::-1, 1:8, 2:9].astype(np.float32) - mean) * np.float32(0.5)
                for x in (rgb[r] for r in rows)]
        np.testing.assert_array_equal(out["data"], np.stack(want))
        np.testing.assert_array_equal(out["label"], np.array([7 - r for r in rows], np.float32))


def test_image_data_gray_resize_and_seeded_shuffle(tmp_path):
    images, labels = mnist(6)
    write_images(tmp_path / "g", [x.transpose(1, 2, 0) for x in images], range(6), tmp_path / "list.txt",
                 prefix=f"{tmp_path}/g/")
    layer = _image_layer(tmp_path / "list.txt", 3, "is_color: false shuffle: true new_height: 14 new_width: 20")
    net = _net(tmp_path, layer, TRAIN)
    twin = _net(tmp_path, layer, TRAIN, name="twin.prototxt")
    resized = [np.asarray(Image.fromarray(x[0]).resize((20, 14), Image.Resampling.BILINEAR)) for x in images]
    for _epoch in range(2):
        seen = []
        for _ in range(2):
            out = net.forward()
            np.testing.assert_array_equal(out["data"], twin.forward()["data"])
            assert out["data"].shape == (3, 1, 14, 20)
            for item, label in zip(out["data"], out["label"], strict=True):
                np.testing.assert_array_equal(item[0], resized[int(label)].astype(np.float32))
                seen.append(int(label))
        assert sorted(seen) == list(range(6))  # each epoch: every image once, in a shuffled order


# ----------------------------------------------------------------------------------- MemoryData
MEM = 'type: "MemoryData" memory_data_param {{ batch_size: {} channels: 2 height: 3 width: 4 }}'


def test_memory_data_batches_wrap_and_label_shape(tmp_path):
    net = _net(tmp_path, MEM.format(2))
    with pytest.raises(DataError, match="call net.set_input_arrays"):
        net.forward()
    data = np.random.default_rng(4).normal(size=(6, 2, 3, 4)).astype(np.float32)
    labels = np.arange(6, dtype=np.float32)
    net.set_input_arrays(data, labels)
    for b in range(4):
        out = net.forward()
        rows = slice(2 * (b % 3), 2 * (b % 3) + 2)
        np.testing.assert_array_equal(out["data"], data[rows])
        assert out["label"].shape == (2, 1, 1, 1)  # Caffe's Forward reshapes the label top to 4 axes
        np.testing.assert_array_equal(out["label"].ravel(), labels[rows])


@pytest.mark.parametrize("data, labels, message", [
    (np.zeros((4, 2, 3, 4)), np.zeros(4, np.float32), "data array must be float32"),
    (np.zeros((4, 3, 3, 4), np.float32), np.zeros(4, np.float32), "channels, height and width must be"),
    (np.zeros((4, 2, 3), np.float32), np.zeros(4, np.float32), "must be 4-d"),
    (np.zeros((4, 2, 3, 8), np.float32)[..., ::2], np.zeros(4, np.float32), "C contiguous"),
    (np.zeros((3, 2, 3, 4), np.float32), np.zeros(3, np.float32), "multiple of batch size 2"),
    (np.zeros((4, 2, 3, 4), np.float32), np.zeros(2, np.float32), "same first dimension"),
    (np.zeros((4, 2, 3, 4), np.float32), np.zeros((4, 2), np.float32), "labels array must be 4-d"),
])
def test_set_input_arrays_checks_as_pycaffe(tmp_path, data, labels, message):
    net = _net(tmp_path, MEM.format(2))
    with pytest.raises(DataError, match=f"layer 'd' \\(MemoryData\\): .*{message}"):
        net.set_input_arrays(data, labels)


def test_set_input_arrays_needs_a_memory_data_first_layer(tmp_path, mnist_db):
    net = _net(tmp_path, DB.format(src=mnist_db[0], bs=2, extra=""))
    with pytest.raises(GraphError, match="first layer is a MemoryData"):
        net.set_input_arrays(np.zeros((2, 1, 28, 28), np.float32), np.zeros(2, np.float32))


# ------------------------------------------------------------------------------------- HDF5Data
H5 = 'type: "HDF5Data" hdf5_data_param {{ source: "{}" batch_size: {} {} }}'


def test_hdf5_rows_across_files_and_wraparound(tmp_path):
    pytest.importorskip("h5py")
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(5, 2, 3)), rng.normal(size=(3, 2, 3)).astype(np.float32)
    write_h5(tmp_path / "a.h5", data=a, label=np.arange(5))
    write_h5(tmp_path / "b.h5", data=b, label=np.arange(10, 13))
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'a.h5'}\n  {tmp_path / 'b.h5'}\n")
    net = _net(tmp_path, H5.format(tmp_path / "list.txt", 3, ""))
    assert net.blobs["data"].shape == (3, 2, 3) and net.blobs["label"].shape == (3,)
    rows = np.concatenate([a.astype(np.float32), b])
    ids = np.r_[np.arange(5), np.arange(10, 13)].astype(np.float32)
    for k in range(4):  # 12 rows from 8: the last batch wraps to the first file
        out = net.forward()
        sel = np.arange(3 * k, 3 * k + 3) % 8
        np.testing.assert_array_equal(out["data"], rows[sel])
        np.testing.assert_array_equal(out["label"], ids[sel])
        assert out["label"].dtype == np.float32


def test_hdf5_shuffle_serves_every_row_each_epoch(tmp_path):
    pytest.importorskip("h5py")
    write_h5(tmp_path / "a.h5", label=np.arange(6))
    write_h5(tmp_path / "b.h5", label=np.arange(6, 10))
    (tmp_path / "list.txt").write_text("a.h5 b.h5")
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)  # relative paths in the list: from the current directory, as Caffe
    try:
        net = _net(tmp_path, H5.format("list.txt", 2, "shuffle: true"), tops=("label",))
        epochs = [np.concatenate([net.forward()["label"].copy() for _ in range(5)]) for _ in range(3)]
    finally:
        os.chdir(cwd)
    for e in epochs:
        assert sorted(e.tolist()) == list(range(10))
        # rows come file by file: the first file's rows (6 or 4) first
        assert set(e[:6].tolist()) == set(range(6)) or set(e[:4].tolist()) == set(range(6, 10))
    assert any(not np.array_equal(e, np.arange(10)) for e in epochs)


def test_hdf5_errors(tmp_path, monkeypatch):
    pytest.importorskip("h5py")
    write_h5(tmp_path / "a.h5", data=np.zeros((4, 2)), label=np.zeros(3))
    (tmp_path / "list.txt").write_text(str(tmp_path / "a.h5"))
    with pytest.raises(DataError, match=r"a.h5 .*has no dataset 'other'"):
        _net(tmp_path, H5.format(tmp_path / "list.txt", 2, ""), tops=("data", "other"))
    with pytest.raises(DataError, match="dataset 'label' has 3 rows"):
        _net(tmp_path, H5.format(tmp_path / "list.txt", 2, ""))
    with pytest.raises(DataError, match="does not transform"):
        _net(tmp_path, H5.format(tmp_path / "list.txt", 2, "") + " transform_param { scale: 2 }", tops=("data",))
    (tmp_path / "missing.txt").write_text(str(tmp_path / "nope.h5"))
    with pytest.raises(DataError, match=r"layer 'd' \(HDF5Data\): HDF5 file .*nope.h5 .*does not exist"):
        _net(tmp_path, H5.format(tmp_path / "missing.txt", 2, ""), tops=("data",))
    real_import = builtins.__import__

    def no_h5py(name, *args, **kwargs):
        if name == "h5py":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_h5py)
    with pytest.raises(DataError, match="pip install h5py"):
        _net(tmp_path, H5.format(tmp_path / "list.txt", 2, ""), tops=("data",))


# ------------------------------------------------------------------------------------ bad input
def test_bad_sources_name_the_file_and_layer(tmp_path, mnist_db):
    db, images, labels = mnist_db
    with pytest.raises(DataError, match=r"layer 'd' \(Data\): data_param.source .*nowhere does not exist"):
        _net(tmp_path, DB.format(src=tmp_path / "nowhere", bs=2, extra=""))
    with pytest.raises(DataError, match="backend LEVELDB"):
        _net(tmp_path, f'type: "Data" data_param {{ source: "{db}" batch_size: 2 }}')
    lmdb.open(str(tmp_path / "empty")).close()
    with pytest.raises(DataError, match=r"layer 'd' \(Data\): the LMDB .*empty holds no record"):
        _net(tmp_path, DB.format(src=tmp_path / "empty", bs=2, extra=""))
    bad = datum(images[0], 0)
    bad.data = bad.data[:-1]
    write_lmdb(tmp_path / "short", {"a": bad})
    with pytest.raises(DataError, match=r"layer 'd' \(Data\): LMDB .*short record 'a': 783 data bytes"):
        _net(tmp_path, DB.format(src=tmp_path / "short", bs=1, extra=""))
    write_lmdb(tmp_path / "mixed", {"a": datum(images[0], 0), "b": datum(images[1][:, :20], 1)})
    net = _net(tmp_path, DB.format(src=tmp_path / "mixed", bs=2, extra=""))
    with pytest.raises(DataError, match=r"mixed record 'b' is a Datum of size \[1, 20, 28\].*wrong size"):
        net.forward()
    with pytest.raises(DataError, match="smaller than crop_size 30"):
        _net(tmp_path, DB.format(src=db, bs=1, extra="") + " transform_param { crop_size: 30 }")
    write_mean(tmp_path / "m.binaryproto", np.zeros((1, 5, 5)))
    with pytest.raises(DataError, match="mean_file is \\[1, 5, 5\\]"):
        _net(tmp_path, DB.format(src=db, bs=1, extra="") +
             f' transform_param {{ mean_file: "{tmp_path}/m.binaryproto" }}')
    with pytest.raises(DataError, match="crop_h is not supported"):
        _net(tmp_path, DB.format(src=db, bs=1, extra="") + " transform_param { crop_h: 3 }")


def test_bad_image_lists_name_the_file_and_layer(tmp_path):
    write_images(tmp_path / "i", [np.zeros((4, 4, 3), np.uint8)] * 2, [0, 1], tmp_path / "list.txt",
                 prefix=f"{tmp_path}/i/")
    (tmp_path / "list.txt").write_text((tmp_path / "list.txt").read_text() + f"{tmp_path}/i/gone.png 2\n")
    net = _net(tmp_path, _image_layer(tmp_path / "list.txt", 3))
    with pytest.raises(DataError, match=r"layer 'd' \(ImageData\): image .*gone.png \(listed in .*list.txt\) does not "
                                        "exist"):
        net.forward()
    (tmp_path / "nolabel.txt").write_text("a.png\n")
    with pytest.raises(DataError, match="line 1 of .*nolabel.txt is 'a.png'"):
        _net(tmp_path, _image_layer(tmp_path / "nolabel.txt", 1))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="image list .*empty.txt is empty"):
        _net(tmp_path, _image_layer(tmp_path / "empty.txt", 1))
    with pytest.raises(AmctError, match=r"layer 'd' \(ImageData\): image_data_param.source .*absent.txt does not"):
        _net(tmp_path, _image_layer(tmp_path / "absent.txt", 1))
    (tmp_path / "i" / "img_001.png").write_bytes(b"not a png")
    net = _net(tmp_path, _image_layer(tmp_path / "list.txt", 2))
    with pytest.raises(DataError, match=r"img_001.png: cannot read the image"):
        net.forward()
