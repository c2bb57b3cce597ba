"""Paths to the shared real data the data-source tests read."""

import pytest

from tests.golden import SHARED

DATA = SHARED / "data"
IMAGENET = DATA / "imagenet_samples"
MNIST = DATA / "mnist_5k.npz"
IMAGENET_MEAN = DATA / "ilsvrc_2012_mean.npy"

needs_imagenet = pytest.mark.skipif(not IMAGENET.is_dir(),
                                    reason="../shared/data/imagenet_samples not present")
needs_mnist = pytest.mark.skipif(not MNIST.is_file(), reason="../shared/data/mnist_5k.npz not present")
