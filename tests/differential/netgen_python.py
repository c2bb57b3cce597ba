"""Python layers for the random nets of tests/differential/netgen.py (mk_python): run by official Caffe's pycaffe
and by the executor (with ``caffe`` standing for amct_caffe.runtime), inside random topologies, in place or not,
forward and backward. NumPy code only, the same in both runtimes.

Not to be imported by a test directly: ``import caffe`` needs one of the two runtimes."""

import caffe
import numpy as np


class PyReLU(caffe.Layer):
    """max(x, 0); in place too (the mask is kept for the backward)."""

    def setup(self, bottom, top):  # every pycaffe layer defines setup and reshape
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        self.mask = bottom[0].data > 0
        top[0].data[...] = np.where(self.mask, bottom[0].data, np.float32(0))

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = np.where(self.mask, top[0].diff, np.float32(0))


class PySum(caffe.Layer):
    """The sum of its bottoms (one or more, of one shape), added in order."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    # pycaffe's blob lists are indexed, never iterated (its vectors of Blob* have no by-value converter)
    def forward(self, bottom, top):
        total = np.array(bottom[0].data)
        for i in range(1, len(bottom)):
            total += bottom[i].data
        top[0].data[...] = total

    def backward(self, top, propagate_down, bottom):
        for i in range(len(bottom)):
            if propagate_down[i]:
                bottom[i].diff[...] = top[0].diff


class PyTwoTops(caffe.Layer):
    """Two tops from one bottom: 2x and x - 1."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)
        top[1].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data * np.float32(2)
        top[1].data[...] = bottom[0].data - np.float32(1)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff * np.float32(2) + top[1].diff


class PyScale(caffe.Layer):
    """x * w[c] along axis 1, w a learned blob; in place too (x is kept for the gradient of w)."""

    def setup(self, bottom, top):
        self.blobs.add_blob(bottom[0].data.shape[1])
        self.blobs[0].data[...] = 1.0

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def _w(self, ndim):
        return self.blobs[0].data.reshape((1, -1) + (1,) * (ndim - 2))

    def forward(self, bottom, top):
        self.x = np.array(bottom[0].data)
        top[0].data[...] = self.x * self._w(self.x.ndim)

    def backward(self, top, propagate_down, bottom):
        dy = np.array(top[0].diff)
        axes = (0,) + tuple(range(2, dy.ndim))
        self.blobs[0].diff[...] += np.sum(dy * self.x, axis=axes)
        if propagate_down[0]:
            bottom[0].diff[...] = dy * self._w(dy.ndim)
