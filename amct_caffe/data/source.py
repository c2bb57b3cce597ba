"""What every calibration data source shares: a fixed sample order served in fixed-size batches.

A source holds ``inputs`` (net input blob names) and the ordered list of the samples it serves.
Iterating it yields ``{input name: float32 array (batch_size, ...)}`` dicts, every one exactly
``batch_size`` samples; a final incomplete batch is left out (logged), so the batch a layer sees
never changes shape. The order is fixed (file names, array rows or LMDB keys), so two runs feed
the same batches.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from amct_caffe.errors import AmctError

_LOG = logging.getLogger(__name__)


class DataError(AmctError):
    """Calibration data is missing, unreadable, or does not fit the network's inputs."""


def failure(e: BaseException) -> str:
    """``e`` for a message: its type (module-qualified unless built in, e.g. ``zlib.error``) and text."""
    kind = type(e).__qualname__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__qualname__}"
    return f"{kind}: {e}" if str(e) else kind


def sample_shape(shape: Sequence[int] | None) -> tuple[int, ...] | None:
    """The per-sample part of an input shape (the batch axis dropped); None when unknown."""
    return None if shape is None else tuple(int(d) for d in shape[1:])


def _check_finite(batch: np.ndarray, name: str, indices: list[int], where: str) -> None:
    """Refuse a batch holding NaN or infinity (stored so, or past float32's range after the
    preprocessing): the net would carry it to every blob, and calibration would fail far from its cause."""
    if batch.size == 0 or np.isfinite(batch).all():
        return
    bad = ~np.isfinite(batch.reshape(len(indices), -1)).all(axis=1)
    first = int(np.flatnonzero(bad)[0])
    raise DataError(f"{where}: sample {indices[first]} for input '{name}' holds NaN or infinite values (as stored, "
                    "or beyond float32 after the mean / std / scale): give finite data")


class DataSource:
    """Base of the sources: samples in a fixed order, batched.

    Subclasses call ``super().__init__(inputs, count, batch_size)`` with the number of
    underlying samples and implement :meth:`_load`, which returns the arrays of the underlying
    samples ``indices`` (a list of ints in ``range(count)``) for every input.
    """

    def __init__(self, inputs: Sequence[str], count: int, batch_size: int = 1):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise DataError(f"batch_size must be a positive integer, not {batch_size!r}")
        self.inputs: tuple[str, ...] = tuple(inputs)
        self.batch_size = int(batch_size)
        self._index: list[int] = list(range(count))
        self._selected_from: int | None = None  # after select(): the samples of the source it selects from
        # inputs served time-major (T, N, ...): the recurrent layers' sequences, stored sample-first
        self.time_major: frozenset[str] = frozenset()

    # ------------------------------------------------------------------ subclasses
    def _load(self, indices: list[int]) -> Mapping[str, np.ndarray]:
        raise NotImplementedError

    def describe(self) -> str:
        """A short description for messages, e.g. ``image folder /data/calib``."""
        return type(self).__name__

    # ------------------------------------------------------------------ public
    @property
    def num_samples(self) -> int:
        return len(self._index)

    def __len__(self) -> int:
        """Number of full batches."""
        return len(self._index) // self.batch_size

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        left = len(self._index) % self.batch_size
        for b in range(len(self)):
            yield self.batch(b)
        if left:
            _LOG.info("%s: the last %d sample(s) do not fill a batch of %d and are not used",
                      self.describe(), left, self.batch_size)

    def batch(self, b: int) -> dict[str, np.ndarray]:
        """Batch number ``b`` (0-based) as {input name: float32 array (batch_size, ...)}."""
        if not 0 <= b < len(self):
            raise IndexError(f"batch {b} out of range: {self.describe()} has {len(self)} full batches")
        indices = self._index[b * self.batch_size:(b + 1) * self.batch_size]
        arrays = self._load(indices)
        out = OrderedDict()
        for name in self.inputs:
            arr = np.ascontiguousarray(arrays[name], dtype=np.float32)
            if arr.shape[0] != len(indices):  # a bug in a source, not a user error
                raise AssertionError(f"{self.describe()}: input '{name}' got {arr.shape[0]} samples, "
                                     f"expected {len(indices)}")
            _check_finite(arr, name, indices, self.describe())
            # a recurrent layer's x / cont / h0 take the batch on axis 1: (T, N, ...) from (N, T, ...)
            out[name] = np.ascontiguousarray(np.moveaxis(arr, 0, 1)) if name in self.time_major else arr
        return out

    def batches(self, batch_num: int | None = None,
                settings: str = "--batch-size / --batch-num") -> Iterator[dict[str, np.ndarray]]:
        """The first ``batch_num`` batches (all full batches when None).

        Raises :class:`DataError` up front when there are fewer than ``batch_num`` full batches, naming the
        ``settings`` that set the batch size and number.
        """
        if batch_num is None:
            return iter(self)
        if batch_num < 1:
            raise DataError(f"batch_num must be positive, not {batch_num}")
        if batch_num > len(self):
            raise DataError(f"{self.holds()}: {batch_num} batches of "
                            f"{self.batch_size} need {batch_num * self.batch_size}; give more data, or a smaller "
                            f"batch size or number of batches ({settings})")
        return (self.batch(b) for b in range(batch_num))

    def select(self, start: int | None = None, stop: int | None = None, step: int | None = None):
        """A copy serving only the samples ``[start:stop:step]`` of this one (Python slice rules).

        ``select(step=10)`` keeps samples 0, 10, 20...; ``select(1, None, 2)`` the odd ones.
        """
        if step == 0:
            raise DataError("select: step cannot be 0")
        new = copy.copy(self)
        new._index = self._index[slice(start, stop, step)]
        new._selected_from = self._selected_from or self.num_samples
        return new

    def holds(self) -> str:
        """'<description> holds N sample(s)' for messages, with how many of them a selection serves."""
        if self._selected_from is None:
            return f"{self.describe()} holds {self.num_samples} sample(s)"
        return f"{self.describe()} holds {self._selected_from} sample(s), {self.num_samples} of them selected"

    def with_time_major(self, names) -> "DataSource":
        """A copy serving the inputs ``names`` time-major: each batch's first two axes swapped."""
        new = copy.copy(self)
        new.time_major = frozenset(names)
        return new

    def with_batch_size(self, batch_size: int):
        """A copy serving the same samples in batches of ``batch_size``."""
        new = copy.copy(self)
        DataSource.__init__(new, self.inputs, 0, batch_size)
        new._index = list(self._index)
        new._selected_from = self._selected_from
        new.time_major = self.time_major  # (__init__ resets it: a last, smaller batch went batch-first)
        return new


def not_numeric(arr: np.ndarray) -> str | None:
    """Why ``arr`` cannot feed a net (None where it can): its values must be real numbers (or booleans)."""
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        return f"is not a numeric array (dtype {arr.dtype})"
    if np.iscomplexobj(arr):
        return (f"holds complex values ({arr.dtype}); a net takes real inputs: save the real part (or magnitude) "
                "you mean")
    return None


def check_sample(arr: np.ndarray, name: str, expected: tuple[int, ...] | None, where: str) -> np.ndarray:
    """Fit samples ``arr`` (n, ...) to an input whose per-sample shape is ``expected``.

    Grayscale stacks (n, H, W) get the channel axis an input of (1, H, W) wants; any other
    mismatch raises :class:`DataError`.
    """
    if expected is None:
        return arr
    given = tuple(arr.shape[1:])
    if arr.ndim == len(expected) and len(expected) == 3 and expected[0] == 1:
        arr = arr[:, None]
    if tuple(arr.shape[1:]) != expected:
        raise DataError(f"{where}: samples of shape {given} do not fit input '{name}' "
                        f"of shape (N, {', '.join(map(str, expected))})")
    return arr
