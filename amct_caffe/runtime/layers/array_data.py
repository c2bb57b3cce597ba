"""Caffe's data layers on arrays: ``MemoryData`` (fed from Python) and ``HDF5Data`` (.h5 files).

Neither transforms its data (Caffe: MemoryData ignores transform_param on arrays, HDF5Data refuses
it). Both serve rows in order, ``batch_size`` per ``forward``, wrapping around at the end. No
backward, no parameters.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from amct_caffe.data import DataError
from amct_caffe.data.source import failure
from amct_caffe.io.files import read_text
from amct_caffe.ops import register
from amct_caffe.runtime.layer import Layer
from amct_caffe.runtime.layers.data_transform import check_batch_size, layer_rng, source_path

_LOG = logging.getLogger(__name__)


@register("MemoryData")
class MemoryData(Layer):
    """Caffe's MemoryDataLayer: batches of arrays given with ``net.set_input_arrays(data, labels)``.

    ``memory_data_param`` gives N (batch_size), C, H, W. ``set_input_arrays`` takes ``data`` float32
    (M, C, H, W) and ``labels`` float32 (M,) or (M, 1, 1, 1), M a multiple of N, both C-contiguous
    (pycaffe's checks); the arrays are used in place, not copied, as in Caffe. Forward k yields
    ``data[p:p + N]`` and ``labels[p:p + N]`` shaped (N, 1, 1, 1) — Caffe reshapes the label top to 4
    axes in Forward, although it is (N,) after setup — with ``p = k * N mod M``.
    """

    num_bottoms = 0
    num_tops = 2
    shape_from_forward = True

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        param = lp.memory_data_param
        self.where = f"layer '{self.name}' (MemoryData)"
        self.shape = (int(param.batch_size), int(param.channels), int(param.height), int(param.width))
        if min(self.shape) < 1:
            raise DataError(f"{self.where}: memory_data_param batch_size, channels, height and width must all be "
                            f"set and positive, got {list(self.shape)}")
        if lp.HasField("transform_param"):
            _LOG.warning("%s: MemoryData does not transform array data (transform_param is ignored)", self.where)
        self._data: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._pos = 0

    def set_input_arrays(self, data, labels) -> None:
        """Feed ``data`` (M, C, H, W) and ``labels`` (M,) / (M, 1, 1, 1); see the class doc."""
        labels = np.asarray(labels)
        if labels.ndim == 1:  # pycaffe's own reshape, before its checks
            labels = np.ascontiguousarray(labels[:, np.newaxis, np.newaxis, np.newaxis])
        data = np.asarray(data)
        self._check(data, "data array", self.shape[1:])
        self._check(labels, "labels array", (1, 1, 1))
        if data.shape[0] != labels.shape[0]:
            raise DataError(f"{self.where}: data and labels must have the same first dimension "
                            f"({data.shape[0]} and {labels.shape[0]})")
        if data.shape[0] == 0 or data.shape[0] % self.shape[0]:
            raise DataError(f"{self.where}: first dimensions of input arrays must be a positive multiple of "
                            f"batch size {self.shape[0]}, got {data.shape[0]}")
        self._data, self._labels, self._pos = data, labels, 0

    def _check(self, arr: np.ndarray, name: str, chw: tuple[int, ...]) -> None:
        if not arr.flags.c_contiguous:
            raise DataError(f"{self.where}: {name} must be C contiguous (np.ascontiguousarray)")
        if arr.ndim != 4:
            raise DataError(f"{self.where}: {name} must be 4-d, got shape {list(arr.shape)}")
        if arr.dtype != np.float32:
            raise DataError(f"{self.where}: {name} must be float32, got {arr.dtype}")
        if arr.shape[1:] != chw:
            raise DataError(f"{self.where}: {name} is {list(arr.shape)}; its channels, height and width must be "
                            f"{list(chw)}")

    def reshape(self, bottom_shapes):
        return [self.shape, (self.shape[0],)]

    def forward(self, bottoms):
        if self._data is None:
            raise DataError(f"{self.where}: no data: call net.set_input_arrays(data, labels) before forward")
        n, p = self.shape[0], self._pos
        self._pos = (p + n) % self._data.shape[0]
        return [self._data[p:p + n], self._labels[p:p + n]]


def _h5py():
    try:
        import h5py
    except ImportError:
        raise DataError("the HDF5Data layer needs the h5py package: pip install h5py "
                        "(or pip install 'amct_caffe[hdf5]')") from None
    return h5py


@register("HDF5Data")
class HDF5Data(Layer):
    """Caffe's HDF5DataLayer: tops are datasets, by name, of the .h5 files listed in ``source``.

    ``source`` lists file paths separated by white space (relative: to the current directory, as
    Caffe). A file's datasets for the tops have the same first dimension R (rows); top t is float32
    (N, *dataset_t.shape[1:]) (integer and float datasets are converted to float32, as HDF5's
    ``H5LTread_dataset_float``). Forward copies N rows, moving to the next file after the last row
    of one, and back to the first file after the last: row i of a batch is
    ``dataset[perm[r]]``. Without ``shuffle`` the files and rows come in order (perm = identity);
    with it the file order is permuted at setup and at each wrap-around, and a file's rows each time
    it is loaded or its rows wrap (Caffe's ``std::random_shuffle``; ours is seeded,
    :func:`~.data_transform.layer_rng`, so the permutations differ from Caffe's).
    """

    num_bottoms = 0
    num_tops = (1, None)

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        param = lp.hdf5_data_param
        self.where = f"layer '{self.name}' (HDF5Data)"
        if lp.HasField("transform_param"):
            raise DataError(f"{self.where}: HDF5Data does not transform data (Caffe refuses transform_param); "
                            "store the transformed data in the file")
        self.batch_size = check_batch_size(param.batch_size, self.where, "hdf5_data_param.batch_size")
        self.source = source_path(param.source, self.where, "hdf5_data_param.source")
        self.files = [Path(t) for t in read_text(self.source, "HDF5 file list", DataError).split()]
        if not self.files:
            raise DataError(f"{self.where}: {self.source} lists no HDF5 file")
        self.shuffle = bool(param.shuffle)
        self._rng = layer_rng(self.name, 0)
        self._file_perm = self._permutation(len(self.files))
        self._file = 0
        self._shapes: list[tuple[int, ...]] | None = None
        self._load(self.files[self._file_perm[0]])

    def _permutation(self, n: int) -> np.ndarray:
        return self._rng.permutation(n) if self.shuffle else np.arange(n)

    def _load(self, path: Path) -> None:
        """Read the tops' datasets of ``path`` (whole, as Caffe) and reset the row order."""
        h5py = _h5py()
        where = f"{self.where}: HDF5 file {path} (listed in {self.source})"
        if not path.is_file():
            raise DataError(f"{where} does not exist")
        arrays = []
        try:
            with h5py.File(path, "r") as f:
                for name in self.lp.top:
                    ds = f.get(name)
                    if not isinstance(ds, h5py.Dataset):
                        raise DataError(f"{where} has no dataset '{name}' (the top names are the dataset names; "
                                        f"it holds {sorted(f.keys())})")
                    if ds.dtype.kind not in "fiu" or ds.ndim < 1:
                        raise DataError(f"{where}: dataset '{name}' is {ds.dtype} of shape {list(ds.shape)}; "
                                        "expected integer or float values with at least 1 axis")
                    arrays.append(np.asarray(ds[()], dtype=np.float32))
        except DataError:
            raise
        except Exception as e:  # h5py raises OSError / KeyError / ValueError... on damaged files
            raise DataError(f"{where}: cannot read it as HDF5 ({failure(e)})") from None
        rows = arrays[0].shape[0]
        for name, a in zip(self.lp.top, arrays, strict=True):
            if a.shape[0] != rows or rows == 0:
                raise DataError(f"{where}: dataset '{name}' has {a.shape[0]} rows, '{self.lp.top[0]}' {rows}; the "
                                "datasets of the tops need the same, non-zero, number of rows")
        shapes = [a.shape[1:] for a in arrays]
        if self._shapes is not None and shapes != self._shapes:
            raise DataError(f"{where}: row shapes {[list(s) for s in shapes]} differ from those of the first file "
                            f"{[list(s) for s in self._shapes]}; the tops' shapes are fixed at setup")
        self._shapes = shapes
        self._arrays = arrays
        self._rows = self._permutation(rows)
        self._row = 0

    def reshape(self, bottom_shapes):
        return [(self.batch_size, *s) for s in self._shapes]

    def forward(self, bottoms):
        picked = []
        for _ in range(self.batch_size):
            if self._row == len(self._rows):
                if len(self.files) > 1:
                    self._file += 1
                    if self._file == len(self.files):
                        self._file = 0
                        if self.shuffle:
                            self._file_perm = self._permutation(len(self.files))
                    self._load(self.files[self._file_perm[self._file]])
                self._row = 0
                if self.shuffle:  # Caffe reshuffles the rows again, also just after loading a file
                    self._rows = self._permutation(len(self._rows))
            picked.append((self._arrays, int(self._rows[self._row])))
            self._row += 1
        return [np.stack([arrays[t][r] for arrays, r in picked]) for t in range(len(self.lp.top))]
