"""Record the arrays a user's own inference loop feeds the net, and serve them back for calibration.

Drop it into the loop that already prepares the inputs::

    from amct_caffe.data import Record

    rec = Record("calib_dir", max_batches=8)
    for batch in my_loader():
        rec.add(data=batch)              # or rec.add({"data": batch, "im_info": info})
        net.forward(data=batch)

    for batch in Record.load("calib_dir"):   # later: {"data": float32 array} per recorded batch
        ...

Each ``add`` writes one ``batch_NNNNNN.npz`` (one array per input, named after it; written to a
temporary file and renamed, so an interrupted run leaves only whole files). ``Record.load`` serves
the samples in file order, in batches of the recorded size or of any other ``batch_size``.
"""

from __future__ import annotations

import logging
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from amct_caffe.data.source import DataError, DataSource, check_sample, failure, not_numeric, sample_shape
from amct_caffe.io.files import atomic_output
from amct_caffe.io.paths import register_data_names

_LOG = logging.getLogger(__name__)
_FILE = re.compile(r"^batch_(\d+)\.npz$")
register_data_names(_FILE)
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def record_files(directory) -> list[Path]:
    """The recorded batch files of ``directory``, in recording order."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _FILE.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def npz_shapes(path: Path) -> OrderedDict[str, tuple[int, ...]]:
    """{array name: shape} of a .npz, read from the array headers only."""
    shapes = OrderedDict()
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    reader = _HEADER_READERS.get(version)
                    if reader is None:  # a newer format: read the whole array
                        shape = np.lib.format.read_array(f, allow_pickle=False).shape
                    else:
                        shape = reader(f)[0]
                shapes[info.filename[:-4]] = tuple(shape)
    except Exception as e:  # a damaged file: BadZipFile, a header ast cannot parse, EOFError...
        raise DataError(f"{path}: not a readable .npz record ({failure(e)})") from None
    return shapes


def _write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez`` without its keyword clash (an input may be called ``file``), written atomically."""
    with atomic_output(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, arr, allow_pickle=False)


class Record:
    """Saves batches {input name: array (N, ...)} as ``batch_NNNNNN.npz`` files in ``directory``.

    Args:
        directory: created if missing.
        max_batches: stop saving after this many batches (``add`` then returns False), so the call
            can stay in a long loop.
        append: add to the batches already in ``directory`` (otherwise they are an error: mixing
            two recordings by accident would calibrate on both).
    """

    def __init__(self, directory, max_batches: int | None = None, append: bool = False):
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise DataError(f"record directory {self.directory} is a file")
        if max_batches is not None and max_batches < 1:
            raise DataError(f"max_batches must be positive, not {max_batches}")
        self.max_batches = max_batches
        existing = record_files(self.directory)
        if existing and not append:
            raise DataError(f"{self.directory} already holds {len(existing)} recorded batch(es): pass "
                            "append=True to add to them, or record into an empty directory")
        self._next = int(_FILE.match(existing[-1].name).group(1)) + 1 if existing else 0
        self._layout = None
        if existing:
            self._layout = {k: s[1:] for k, s in npz_shapes(existing[-1]).items()}
        self.saved: list[Path] = []

    def __len__(self) -> int:
        """Batches saved by this Record."""
        return len(self.saved)

    def add(self, batch: Mapping[str, np.ndarray] | None = None, /, **arrays) -> bool:
        """Save one batch, given as a mapping and/or keywords {input name: array (N, ...)}.

        Returns False (and saves nothing) once ``max_batches`` batches have been saved.
        """
        named = OrderedDict(batch or {})
        for k, v in arrays.items():
            if k in named:
                raise DataError(f"Record.add: input '{k}' given twice")
            named[k] = v
        if not named:
            raise DataError("Record.add: no array given (e.g. rec.add(data=batch))")
        if self.max_batches is not None and len(self.saved) >= self.max_batches:
            return False
        out = OrderedDict()
        for k, v in named.items():
            arr = np.asarray(v)
            if arr.ndim < 1 or arr.shape[0] < 1 or not_numeric(arr):
                raise DataError(f"Record.add: '{k}' must be a numeric array of samples (N, ...) of real values, "
                                f"got shape {arr.shape} dtype {arr.dtype}")
            out[k] = np.ascontiguousarray(arr)
        counts = {k: a.shape[0] for k, a in out.items()}
        if len(set(counts.values())) > 1:
            raise DataError(f"Record.add: the arrays hold different numbers of samples: {counts}")
        layout = {k: a.shape[1:] for k, a in out.items()}
        if self._layout is None:
            self._layout = layout
        elif layout != self._layout:
            raise DataError(f"Record.add: batch layout {layout} differs from the recorded {self._layout} "
                            "(same inputs and per-sample shapes needed)")
        path = self.directory / f"batch_{self._next:06d}.npz"
        _write_npz(path, out)
        _LOG.debug("recorded %s (%s)", path, counts)
        self._next += 1
        self.saved.append(path)
        return True

    @staticmethod
    def load(directory, batch_size: int | None = None,
             inputs: Mapping[str, Sequence[int] | None] | Sequence[str] | None = None) -> RecordData:
        """The recorded batches as a data source (see :class:`RecordData`)."""
        return RecordData(directory, inputs=inputs, batch_size=batch_size)


class RecordData(DataSource):
    """The samples of a :class:`Record` directory, in file order.

    Args:
        directory: where the ``batch_NNNNNN.npz`` files are.
        inputs: which recorded arrays to serve, as names or {name: input shape} (checked, and
            grayscale (N, H, W) promoted to (N, 1, H, W)); default all, as recorded.
        batch_size: default the first file's batch size.
    """

    def __init__(self, directory, inputs: Mapping[str, Sequence[int] | None] | Sequence[str] | None = None,
                 batch_size: int | None = None):
        self.directory = Path(directory)
        self._files = record_files(self.directory)
        if not self._files:
            raise DataError(f"{self.directory} holds no recorded batch (batch_NNNNNN.npz)")
        layouts = [npz_shapes(p) for p in self._files]
        first = layouts[0]
        for p, lay in zip(self._files[1:], layouts[1:], strict=True):
            if {k: s[1:] for k, s in lay.items()} != {k: s[1:] for k, s in first.items()}:
                raise DataError(f"{p}: its arrays {dict(lay)} do not match "
                                f"{self._files[0].name}'s {dict(first)}")
        if inputs is None:
            inputs = list(first)
        shapes = inputs if isinstance(inputs, Mapping) else {n: None for n in inputs}
        missing = [n for n in shapes if n not in first]
        if missing:
            raise DataError(f"{self.directory}: no recorded array for input(s) {', '.join(missing)}; "
                            f"recorded: {', '.join(first)}")
        self._shapes = {n: sample_shape(s) for n, s in shapes.items()}
        for n, s in self._shapes.items():  # fail now, not in the middle of a calibration
            check_sample(np.empty((0,) + first[n][1:], np.float32), n, s, str(self._files[0]))
        sizes = [next(iter(lay.values()))[0] for lay in layouts]
        self._starts = np.cumsum([0] + sizes)
        self._cache: tuple[int, dict[str, np.ndarray]] | None = None
        super().__init__(list(shapes), int(self._starts[-1]), batch_size or sizes[0])

    def describe(self) -> str:
        return f"record {self.directory}"

    def _file_arrays(self, f: int) -> dict[str, np.ndarray]:
        if self._cache is None or self._cache[0] != f:
            try:
                with open(self._files[f], "rb") as fh, np.load(fh, allow_pickle=False) as z:
                    arrays = {n: z[n] for n in self.inputs}
            except Exception as e:  # a damaged file: BadZipFile, zlib.error, EOFError, MemoryError...
                raise DataError(f"{self._files[f]}: cannot read the recorded batch "
                                f"({failure(e)})") from None
            for n, arr in arrays.items():  # (a file written by hand may hold text or complex values)
                fault = not_numeric(arr)
                if fault:
                    raise DataError(f"{self._files[f]}: the recorded array '{n}' {fault}")
            self._cache = (f, arrays)
        return self._cache[1]

    def _load(self, indices: list[int]) -> dict[str, np.ndarray]:
        files = np.searchsorted(self._starts, indices, side="right") - 1
        parts = {n: [] for n in self.inputs}
        for f, i in zip(files.tolist(), indices, strict=True):
            arrays = self._file_arrays(f)
            row = i - int(self._starts[f])
            for n in self.inputs:
                parts[n].append(arrays[n][row:row + 1])
        return {n: check_sample(np.concatenate(p), n, self._shapes[n], str(self.directory))
                for n, p in parts.items()}
