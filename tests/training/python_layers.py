"""Python layers as a pycaffe user writes them, for tests/training/test_python_layer.py.

Official Caffe runs this module with its pycaffe; the executor imports it with ``caffe`` standing for
``amct_caffe.runtime``. Nothing here may be imported directly by a test (``import caffe`` would fail).
"""

import caffe
import numpy as np


def _options(param_str: str) -> dict[str, float]:
    """'a=1 b=2' -> {'a': 1.0, 'b': 2.0}."""
    return {key: float(value) for key, value in (item.split("=") for item in param_str.split())}


class RampData(caffe.Layer):
    """A data layer (no bottoms): top (n, c, h, w) of param_str 'n=.. c=.. h=.. w=..', holding
    0.01 * index - 0.3 plus 0.1 per call of reshape so far (Caffe calls it once at the build and once
    per forward: a layer that fetches its next batch in reshape relies on that count)."""

    def setup(self, bottom, top):
        o = _options(self.param_str)
        self.shape = tuple(int(o[k]) for k in ("n", "c", "h", "w"))
        self.reshapes = 0

    def reshape(self, bottom, top):
        self.reshapes += 1
        top[0].reshape(*self.shape)

    def forward(self, bottom, top):
        ramp = np.arange(np.prod(self.shape), dtype=np.float32).reshape(self.shape)
        top[0].data[...] = ramp * np.float32(0.01) - np.float32(0.3) + np.float32(0.1 * self.reshapes)

    def backward(self, top, propagate_down, bottom):
        pass


class ChannelAffine(caffe.Layer):
    """y = x * w[c] + b[c] along axis 1, w and b learned blobs (w = 1 + 0.1 c, b = param_str's 'b' or 0 before
    a caffemodel or a solver changes them). The bias is added by the first reshape, and the layer keeps the
    blob objects it made, as layers written for pycaffe do: they must be the Net's."""

    def setup(self, bottom, top):
        channels = bottom[0].data.shape[1]
        self.blobs.add_blob(channels)
        self.weight = self.blobs[0]
        self.weight.data[...] = 1 + 0.1 * np.arange(channels)

    def reshape(self, bottom, top):
        if len(self.blobs) == 1:
            self.blobs.add_blob(bottom[0].data.shape[1])
            self.blobs[1].data[...] = _options(self.param_str).get("b", 0.0)
        top[0].reshape(*bottom[0].data.shape)

    def _per_channel(self, v, ndim):
        return v.reshape((1, -1) + (1,) * (ndim - 2))

    def forward(self, bottom, top):
        x = bottom[0].data
        top[0].data[...] = x * self._per_channel(self.weight.data, x.ndim) \
            + self._per_channel(self.blobs[1].data, x.ndim)

    def backward(self, top, propagate_down, bottom):
        x, dy = bottom[0].data, top[0].diff
        axes = (0,) + tuple(range(2, x.ndim))
        self.weight.diff[...] += np.sum(dy * x, axis=axes)
        self.blobs[1].diff[...] += np.sum(dy, axis=axes)
        if propagate_down[0]:
            bottom[0].diff[...] = dy * self._per_channel(self.weight.data, x.ndim)


class SquareInPlace(caffe.Layer):
    """y = x^2, meant to run in place (top == bottom): the forward keeps x for the backward."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        self.x = np.array(bottom[0].data)
        top[0].data[...] = self.x * self.x

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = 2 * self.x * top[0].diff


class PositiveRows(caffe.Layer):
    """The items (axis 0) of bottom 0 whose values sum to more than the items' mean sum, and their count:
    tops whose shape depends on the data (reshape gives the largest; the forward reshapes to what it keeps)."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)
        top[1].reshape(1)

    def forward(self, bottom, top):
        x = bottom[0].data
        sums = x.reshape(x.shape[0], -1).sum(axis=1)
        self.kept = np.flatnonzero(sums > sums.mean())
        top[0].reshape(len(self.kept), *x.shape[1:])
        top[0].data[...] = x[self.kept]
        top[1].data[...] = len(self.kept)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = 0
            bottom[0].diff[self.kept] = top[0].diff


class HalfSquaredNorm(caffe.Layer):
    """sum(x^2) / 2 / num as top (1,): a loss when the prototxt gives the layer a loss_weight."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(1)

    def forward(self, bottom, top):
        x = bottom[0].data
        top[0].data[0] = np.sum(x.astype(np.float64) ** 2) / 2 / x.shape[0]

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            x = bottom[0].data
            bottom[0].diff[...] = top[0].diff[0] * x / x.shape[0]


class Failing(caffe.Layer):
    """Raises in the method that param_str names (setup, reshape, forward or backward)."""

    def setup(self, bottom, top):
        self._maybe_fail("setup")

    def reshape(self, bottom, top):
        self._maybe_fail("reshape")
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        self._maybe_fail("forward")
        top[0].data[...] = bottom[0].data

    def backward(self, top, propagate_down, bottom):
        self._maybe_fail("backward")

    def _maybe_fail(self, method):
        if self.param_str == method:
            raise ZeroDivisionError(f"{method} fails on purpose")


class Counting(caffe.Layer):
    """An identity that lists the calls it gets (read through net.layers[i].calls) and has a method a script
    calls on it (as py-faster-rcnn's set_roidb); it imports caffe inside its forward."""

    def setup(self, bottom, top):
        self.calls = ["setup"]
        self.offset = 0.0

    def reshape(self, bottom, top):
        self.calls.append("reshape")
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        import caffe as inner  # noqa: PLC0415 - a layer may import caffe when it runs

        self.calls.append("forward" if inner.TEST == 1 else "?")
        top[0].data[...] = bottom[0].data + np.float32(self.offset)

    def backward(self, top, propagate_down, bottom):
        self.calls.append("backward")
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff

    def set_offset(self, offset):
        self.offset = offset


class KeptScale(caffe.Layer):
    """y = x * w along axis 1, w one learned blob (param_str's 'w' per element at setup) that the layer keeps as
    self.w: shared by name with another layer's (param { name }), it must read the owner's values."""

    def setup(self, bottom, top):
        self.blobs.add_blob(bottom[0].data.shape[1])
        self.blobs[0].data[...] = _options(self.param_str).get("w", 1.0)
        self.w = self.blobs[0]
        self._calls = 0

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        self._calls += 1
        top[0].data[...] = bottom[0].data * self.w.data

    def backward(self, top, propagate_down, bottom):
        self.w.diff[...] += np.sum(top[0].diff * bottom[0].data, axis=0)
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff * self.w.data


class RebindsTop(caffe.Layer):
    """Rebinds its top's data instead of writing into it (pycaffe refuses that)."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data = bottom[0].data * 2


class NotALayer:
    """A class that does not derive from caffe.Layer."""
