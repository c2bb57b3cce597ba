"""A pycaffe-like Blob: ``.data`` and ``.diff`` numpy arrays plus shape helpers."""

from __future__ import annotations

import math

import numpy as np

from amct_caffe.errors import GraphError


INT_MAX = 2**31 - 1  # Caffe counts a blob's elements in an int
# np.errstate arguments for the Net's build, forward and backward and the IR's shape inference: Caffe's float
# arithmetic overflows to inf and makes NaN without a word, where numpy would print RuntimeWarnings (with a
# line of our code) on a user's screen. (A new errstate per use: one instance cannot be entered twice.)
AS_CAFFE = {"over": "ignore", "invalid": "ignore", "divide": "ignore"}
# The largest padded input, kernel extent or stride a window layer (Convolution, Pooling) runs with: the
# kernels add two of them in int arithmetic.
WINDOW_LIMIT = 2**30 - 1


def clamped_strides(strides) -> tuple[int, ...]:
    """Window strides with any above ``WINDOW_LIMIT + 1`` (2^30) lowered to it: the same output sizes and values.

    Caffe takes any int stride, and the kernels' int index arithmetic would overflow on a huge one. With the
    padded input ``P`` and the kernel extent ``E`` at most WINDOW_LIMIT (the layers refuse more), ``|P - E| <
    2^30``: a stride of 2^30 or more gives the windows any other such stride gives (the first at ``-pad``; in
    Pooling's ceil mode a second one past the input, clipped or empty alike), and 2^30 plus an extent still
    fits an int.
    """
    return tuple(min(int(s), WINDOW_LIMIT + 1) for s in strides)


def _shape_fault(shape: tuple[int, ...]) -> str | None:
    """What Caffe's Blob::Reshape refuses in ``shape``: a negative dimension (``CHECK_GE(shape[i], 0)``) or
    more than INT_MAX elements (``CHECK_LE(count_, INT_MAX)``); None when it takes it."""
    if any(d < 0 for d in shape):
        return "has a negative dimension"
    if math.prod(shape) > INT_MAX:
        return f"has more than {INT_MAX} elements, more than Caffe can hold in a blob"
    return None


def check_top_shape(where: str, top: str, shape) -> tuple[int, ...]:
    """``shape`` as ints, or a GraphError naming ``where`` and the top if Caffe would refuse it."""
    shape = tuple(int(d) for d in shape)
    fault = _shape_fault(shape)
    if fault:
        raise GraphError(f"{where}: top '{top}' of shape {list(shape)} {fault}")
    return shape


def check_param_shapes(where: str, shapes) -> None:
    """A GraphError naming ``where`` if Caffe would refuse one of a layer's learned blob ``shapes`` (a
    num_output of 2^31 - 1 asked numpy for terabytes before anything said why)."""
    for i, shape in enumerate(shapes):
        fault = _shape_fault(tuple(int(d) for d in shape))
        if fault:
            raise GraphError(f"{where}: its learned blob {i} of shape {[int(d) for d in shape]} {fault}; check the "
                             "layer's num_output and kernel sizes")


def check_not_empty_at_build(where: str, top: str, shape) -> None:
    """Refuse a top that would be empty (a zero dimension) when the net is first built.

    Caffe's Blob::Reshape accepts a zero dimension (``CHECK_GE(shape[i], 0)``) but allocates
    memory only when the count grows past the blob's capacity, which starts at 0. So a freshly
    built net never allocates an empty top, and the layer aborts when it writes it
    (``Check failed: data_`` in ``mutable_cpu_data``; a biased Convolution already in its Reshape,
    through its bias multiplier). A net first run on a larger input keeps its memory, and a later
    smaller input may then give empty blobs, which Caffe and the executor both run.
    """
    shape = tuple(int(d) for d in shape)
    if 0 in shape and min(shape) >= 0:
        raise GraphError(f"{where}: top '{top}' would be empty (shape {list(shape)}); Caffe aborts on such a "
                         "blob in a freshly built net (Check failed: data_): give a larger input or a smaller "
                         "kernel, pad or stride so that every output size is at least 1")


class Blob:
    """Holds one float32 array (``data``) and its gradient (``diff``), as ``caffe.Blob`` does.

    ``data[...] = x`` writes in place like pycaffe; layers may also replace ``data`` with a new
    array of the blob's shape.
    """

    __slots__ = ("_data", "_diff")

    def __init__(self, shape=(), data: np.ndarray | None = None):
        self._data = np.zeros(tuple(shape), np.float32) if data is None else data
        self._diff = None

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._data = value

    @property
    def diff(self) -> np.ndarray:
        if self._diff is None or self._diff.shape != self._data.shape:
            self._diff = np.zeros_like(self._data)
        return self._diff

    @diff.setter
    def diff(self, value: np.ndarray) -> None:
        self._diff = value

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._data.shape)

    @property
    def count(self) -> int:
        return int(self._data.size)

    def reshape(self, *shape) -> None:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in shape):
            raise GraphError(f"Blob.reshape: dimensions must be integers, got {list(shape)!r}")
        shape = tuple(int(d) for d in shape)
        fault = _shape_fault(shape)
        if fault:
            raise GraphError(f"Blob.reshape: the shape {list(shape)} {fault}")
        if shape != self.shape:
            self._data = np.zeros(shape, np.float32)
            self._diff = None

    def _legacy(self, i: int) -> int:
        # Caffe's Blob::LegacyShape: axes past the end count as 1 (a (N, C) blob has height 1).
        shape = self.shape
        if len(shape) > 4:
            raise ValueError("legacy num/channels/height/width accessors need a blob of <= 4 axes")
        return shape[i] if i < len(shape) else 1

    num = property(lambda self: self._legacy(0))
    channels = property(lambda self: self._legacy(1))
    height = property(lambda self: self._legacy(2))
    width = property(lambda self: self._legacy(3))

    def __repr__(self) -> str:
        return f"Blob(shape={self.shape})"
