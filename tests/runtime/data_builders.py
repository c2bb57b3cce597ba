"""Small data sets for the data-layer tests: LMDBs of Datum, image lists, HDF5 files, prototxts."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from amct_caffe.io.schema import caffe_pb
from tests.golden import SHARED

MNIST = SHARED / "data" / "mnist_5k.npz"


def mnist(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` MNIST digits spread over the file (it is sorted by label), uint8 (n, 1, 28, 28), and their labels."""
    rows = np.arange(n) * (5000 // n)
    with np.load(MNIST) as f:
        return f["images"][rows].reshape(n, 1, 28, 28), f["labels"][rows].astype(int)


def datum(array: np.ndarray, label: int, floats: bool = False, encoded: bytes | None = None):
    """A Datum of (C, H, W) ``array``: uint8 ``data``, ``float_data``, or ``encoded`` image bytes."""
    d = caffe_pb().Datum()
    d.channels, d.height, d.width = array.shape
    if encoded is not None:
        d.data, d.encoded = encoded, True
    elif floats:
        d.float_data.extend(np.asarray(array, np.float32).ravel().tolist())
    else:
        d.data = np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    d.label = int(label)
    return d


def write_lmdb(path: Path, records: dict[str, object]) -> Path:
    """An LMDB of {key: Datum} (written in the dict's order; LMDB keeps them sorted by key)."""
    import lmdb

    env = lmdb.open(str(path), map_size=1 << 28)
    with env.begin(write=True) as txn:
        for key, d in records.items():
            txn.put(key.encode(), d.SerializeToString())
    env.close()
    return path


def png_bytes(hwc: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc).save(buf, format="PNG")
    return buf.getvalue()


def write_mean(path: Path, mean: np.ndarray) -> Path:
    """A binaryproto mean blob (1, C, H, W) in Caffe's legacy 4-D layout."""
    blob = caffe_pb().BlobProto()
    blob.num, (blob.channels, blob.height, blob.width) = 1, mean.shape
    blob.data.extend(np.asarray(mean, np.float32).ravel().tolist())
    path.write_bytes(blob.SerializeToString())
    return path


def write_images(folder: Path, images: list[np.ndarray], labels, list_file: Path, prefix: str = "") -> Path:
    """PNG files of (H, W, C) RGB or (H, W, 1) uint8 ``images`` and the ImageData list naming them."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        name = f"img_{i:03d}.png"
        (folder / name).write_bytes(png_bytes(img))
        lines.append(f"{prefix}{name} {int(label)}")
    list_file.write_text("\n".join(lines) + "\n")
    return list_file


def write_h5(path: Path, **datasets) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        for name, arr in datasets.items():
            f.create_dataset(name, data=arr)
    return path


def data_net(layer: str, top: tuple[str, ...] = ("data", "label")) -> str:
    """A prototxt of the one data layer ``d`` whose type and params are ``layer`` (text inside ``layer { }``)."""
    tops = "\n".join(f'  top: "{t}"' for t in top)
    return f'name: "d"\nlayer {{\n  name: "d"\n{tops}\n{layer}\n}}\n'
