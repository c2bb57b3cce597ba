"""pycaffe's ``caffe.Classifier`` (``python/caffe/classifier.py``): a TEST-phase Net that classifies images.

``Classifier(model_file, pretrained_file, image_dims=None, mean=None, input_scale=None, raw_scale=None,
channel_swap=None)`` sets up a :class:`~amct_caffe.runtime.io.Transformer` for the net's first input (the
transpose (2, 0, 1), then the options given). ``predict(inputs, oversample=True)`` takes (H, W, K) images:

1. each is resized to ``image_dims`` (the input's height and width unless given) with ``io.resize_image``;
2. with ``oversample``, ten crops of the input's size per image (``io.oversample``: the corners, the
   centre and their mirrors), else the centre crop (its start truncated to an int, as pycaffe does);
3. each crop goes through the transformer, all run with :meth:`~.batches.WholeSetCalls.forward_all`;
4. the net's first output, with ``oversample`` averaged over each image's ten crops: (N, classes).
"""

from __future__ import annotations

import numpy as np

from amct_caffe.runtime import io
from amct_caffe.runtime.net import TEST, Net

__all__ = ["Classifier"]


class Classifier(Net):
    def __init__(self, model_file, pretrained_file, image_dims=None, mean=None, input_scale=None, raw_scale=None,
                 channel_swap=None):
        super().__init__(model_file, pretrained_file, TEST)
        name = self.inputs[0]
        shape = self.blobs[name].data.shape
        self.transformer = io.Transformer({name: shape})
        self.transformer.set_transpose(name, (2, 0, 1))
        if mean is not None:
            self.transformer.set_mean(name, mean)
        if input_scale is not None:
            self.transformer.set_input_scale(name, input_scale)
        if raw_scale is not None:
            self.transformer.set_raw_scale(name, raw_scale)
        if channel_swap is not None:
            self.transformer.set_channel_swap(name, channel_swap)
        self.crop_dims = np.array(shape[2:])
        self.image_dims = self.crop_dims if image_dims is None or not len(image_dims) else image_dims

    def predict(self, inputs, oversample: bool = True) -> np.ndarray:
        """Class scores of ``inputs`` (a sequence of (H, W, K) images): (N, classes) (module doc)."""
        height, width = int(self.image_dims[0]), int(self.image_dims[1])
        resized = np.zeros((len(inputs), height, width, inputs[0].shape[2]), np.float32)
        for i, image in enumerate(inputs):
            resized[i] = io.resize_image(image, (height, width))
        if oversample:
            crops = io.oversample(resized, self.crop_dims)
        else:
            ch, cw = (int(d) for d in self.crop_dims)
            top, left = int(height / 2.0 - ch / 2.0), int(width / 2.0 - cw / 2.0)
            crops = resized[:, top:top + ch, left:left + cw, :]
        name = self.inputs[0]
        batch = np.stack([self.transformer.preprocess(name, crop) for crop in crops])
        scores = self.forward_all(**{name: batch})[self.outputs[0]]
        if oversample:
            scores = scores.reshape(len(scores) // 10, 10, -1).mean(axis=1)
        return scores
