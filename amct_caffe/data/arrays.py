"""Calibration batches from NumPy arrays: a .npy file, a .npz file, or arrays in memory.

Which array feeds which input:

* a .npy holds one array, for a net with one input;
* a .npz's arrays named after the inputs feed them; otherwise, for a one-input net, its only
  array other than ``labels`` does (MNIST-style ``images`` + ``labels`` files work as they are).

Rows are samples, taken in order. A uint8 grayscale stack (N, H, W) gets the channel axis an
(N, 1, H, W) input needs. Values become float32, then ``(x - mean[c]) / std[c] * scale`` (channels
on axis 1), e.g. ``scale=1/256`` for Caffe's LeNet on raw MNIST bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from amct_caffe.data.preprocess import as_floats, normalize
from amct_caffe.data.source import DataError, DataSource, check_sample, failure, not_numeric, sample_shape

LABELS = "labels"
_MAGIC = {".npy": b"\x93NUMPY", ".npz": b"PK"}


def read_array_file(path) -> dict[str, np.ndarray]:
    """{array name: array} of a .npy ("" names its one array) or .npz file; never unpickles.

    Anything wrong with the file is a :class:`DataError` naming it.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"data file {path} is a directory, not a .npy / .npz file")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if path.suffix not in (".npy", ".npz"):
        raise DataError(f"data file {path}: expected .npy or .npz")
    try:
        # our own file object: np.load leaves the file it opened unclosed when the zip is damaged
        with open(path, "rb") as f:
            if not f.read(6).startswith(_MAGIC[path.suffix]):
                raise DataError(f"{path} is not a {path.suffix} file (it does not start like one): save the "
                                f"arrays with numpy.{'save' if path.suffix == '.npy' else 'savez'}")
            f.seek(0)
            if path.suffix == ".npy":
                return {"": np.load(f, allow_pickle=False)}
            with np.load(f, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
    except DataError:
        raise
    # np.load parses the header with ast, unzips and inflates: a damaged file raises ValueError,
    # OSError, EOFError, zipfile.BadZipFile, zlib.error, tokenize.TokenError, MemoryError (a forged
    # shape)... all the same thing to the caller: this file is not usable data.
    except Exception as e:
        if isinstance(e, ValueError) and "allow_pickle" in str(e):
            raise DataError(f"{path} holds Python objects, which are not loaded (unpickling runs code): "
                            "save numeric arrays") from None
        raise DataError(f"{path}: cannot read the arrays ({failure(e)})") from None


def load_arrays(data, inputs: Mapping[str, Sequence[int] | None]
                ) -> tuple[OrderedDict[str, np.ndarray], np.ndarray | None]:
    """({input name: samples array}, labels or None) from a .npy / .npz path or {name: array}.

    The arrays are matched to ``inputs`` {name: input shape (N, ...) or None} (see the module doc),
    must be numeric, fit the input shapes (grayscale stacks get their channel axis) and hold the
    same number of samples. ``labels`` is returned as it is, unchecked (calibration ignores it).
    """
    if isinstance(data, Mapping):
        arrays, where = dict(data), "arrays"
    else:
        arrays, where = read_array_file(data), str(data)
    matched = match_arrays(arrays, list(inputs), where)
    out = OrderedDict()
    for name, shape in inputs.items():
        arr = np.asarray(matched[name])
        fault = not_numeric(arr) or ("has no sample axis" if arr.ndim < 1 else None)
        if fault:
            raise DataError(f"{where}: the array for input '{name}' {fault} (shape {arr.shape})")
        out[name] = check_sample(arr, name, sample_shape(shape), where)
    counts = {n: len(a) for n, a in out.items()}
    if len(set(counts.values())) > 1:
        raise DataError(f"{where}: the inputs' arrays hold different numbers of samples: {counts}")
    return out, arrays.get(LABELS)


def match_arrays(arrays: Mapping[str, np.ndarray], names: Sequence[str], where: str) -> dict[str, np.ndarray]:
    """{input name: array} from arrays named after the inputs, or the only candidate for one input."""
    if all(n in arrays for n in names):
        return {n: arrays[n] for n in names}
    candidates = [k for k in arrays if k != LABELS]
    if len(names) == 1 and len(candidates) == 1:
        return {names[0]: arrays[candidates[0]]}
    missing = [n for n in names if n not in arrays]
    if list(arrays) == [""]:  # a .npy: one unnamed array
        raise DataError(f"{where}: a .npy holds one array, and the net takes {len(names)} inputs "
                        f"({', '.join(repr(n) for n in names)}): give a .npz with one array named after each input")
    raise DataError(f"{where}: no array named {', '.join(repr(m) for m in missing)}; it holds "
                    f"{', '.join(repr(k) for k in arrays) or 'nothing'}, and the net takes "
                    f"{', '.join(repr(n) for n in names)}: name the arrays after the inputs")


class ArrayData(DataSource):
    """Batches of rows of arrays.

    Args:
        data: path of a .npy / .npz file, or a mapping {name: array} already in memory.
        inputs: {input name: input shape (N, ...)} (N ignored; None skips the shape check), or a list
            of names.
        mean, std, scale: ``(x - mean[c]) / std[c] * scale``, one value or one per channel.
        batch_size: samples per batch.

    ``labels`` holds the file's ``labels`` array, if any (for evaluation).
    """

    def __init__(self, data, inputs: Mapping[str, Sequence[int] | None] | Sequence[str], mean=(), std=(),
                 scale: float = 1.0, batch_size: int = 1):
        shapes = inputs if isinstance(inputs, Mapping) else {n: None for n in inputs}
        if not shapes:
            raise DataError("ArrayData: the net has no inputs")
        self.path = None if isinstance(data, Mapping) else Path(data)
        where = "arrays" if self.path is None else str(self.path)
        self._arrays, self.labels = load_arrays(data, shapes)
        self._mean, self._std = as_floats(mean, "mean"), as_floats(std, "std")
        if any(s == 0 for s in self._std):
            raise DataError("std values must be non-zero")
        self._scale = float(scale)
        self._where = where
        super().__init__(list(shapes), len(next(iter(self._arrays.values()))), batch_size)

    def describe(self) -> str:
        return f"array file {self.path}" if self.path is not None else "arrays"

    def _load(self, indices: list[int]) -> dict[str, np.ndarray]:
        first, last = indices[0], indices[-1]
        contiguous = last - first + 1 == len(indices) and indices == list(range(first, last + 1))
        out = {}
        for name, arr in self._arrays.items():
            rows = arr[first:last + 1] if contiguous else arr[indices]
            out[name] = normalize(rows, self._mean, self._std, self._scale, axis=1)
        return out
