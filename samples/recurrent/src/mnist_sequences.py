"""MNIST digits as sequences, for the recurrent samples: the split, the inputs, the decoding.

Everything comes from ``../shared/data/mnist_5k.npz`` (5,000 digits, 500 per class, sorted by class;
``images`` uint8 (5000, 28, 28), ``labels``). The split is by index: digit ``i`` is held out when
``i % 5 == 4`` (1,000 digits, 100 per class); the 4,000 others train. Pixels are scaled by 1/256.

- Row by row (``lstm_mnist``, ``rnn_mnist``): ``x`` (28, N, 28), ``x[t, n]`` = row ``t`` of digit ``n``;
  ``cont`` (28, N), 0 at ``t = 0`` and 1 after.
- Strips (``crnn_mnist``): ``data`` (N, 1, 28, 112), four digits side by side; ``cont`` (8, N). The net
  gives 8 steps, two per digit (step ``t`` lies over digit ``t // 2``). The held-out strips are the 1,000
  held-out digits, each once: strip ``s`` position ``j`` is held-out digit ``(4 s + j) * 337 % 1000``.
  A digit is read as the class with the largest summed probability over its two steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SCALE = 0.00390625  # pixels / 256
DIGITS = 4  # digits per strip
STEPS_PER_DIGIT = 2
MNIST = Path(__file__).resolve().parents[4] / "shared" / "data" / "mnist_5k.npz"


def load(path: Path | str = MNIST) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (5000, 28, 28) and int labels (5000,)."""
    with np.load(path) as z:
        return z["images"], z["labels"].astype(np.int64)


def split(n: int = 5000) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training digits and of the held-out digits (``i % 5 == 4``)."""
    idx = np.arange(n)
    return idx[idx % 5 != 4], idx[idx % 5 == 4]


def rows(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) uint8 -> x (28, N, 28) float32: one image row per time step."""
    return np.ascontiguousarray(images.transpose(1, 0, 2), dtype=np.float32) * np.float32(SCALE)


def cont(steps: int, n: int) -> np.ndarray:
    """(steps, n): every stream starts a new sequence at t = 0."""
    c = np.ones((steps, n), np.float32)
    c[0] = 0
    return c


def strips(images: np.ndarray, labels: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Digits ``order`` (S, 4) side by side: data (S, 1, 28, 112) float32 and their labels (S, 4)."""
    s = len(order)
    data = images[order].transpose(0, 2, 1, 3).reshape(s, 1, 28, 28 * DIGITS)
    return data.astype(np.float32) * np.float32(SCALE), labels[order]


def heldout_order(heldout: np.ndarray) -> np.ndarray:
    """(250, 4) digit indices of the held-out strips: each held-out digit once, classes mixed."""
    k = np.arange(len(heldout)).reshape(-1, DIGITS)
    return heldout[k * 337 % len(heldout)]


def step_labels(labels: np.ndarray) -> np.ndarray:
    """(S, 4) digit labels -> (8, S) per-step labels, step t labelled with the digit under it."""
    return np.repeat(labels, STEPS_PER_DIGIT, axis=1).T.astype(np.float32)


def read_digits(prob: np.ndarray) -> np.ndarray:
    """(8, S, 10) per-step probabilities -> (S, 4) digits: argmax of each digit's two steps summed."""
    t, s, c = prob.shape
    return prob.reshape(DIGITS, STEPS_PER_DIGIT, s, c).sum(axis=1).argmax(axis=-1).T


def heldout_accuracy(caffe, model: str, deploy: str, weights: str, mnist: Path | str = MNIST) -> dict[str, int]:
    """Run the deploy net over the held-out digits in ``caffe`` (pycaffe or ``amct_caffe.runtime``).

    Returns counts: ``digits`` / ``correct`` for every model, and for ``crnn_mnist`` also
    ``strips`` / ``strips_correct`` (all four digits right).
    """
    images, labels = load(mnist)
    heldout = split(len(labels))[1]
    net = caffe.Net(deploy, weights, caffe.TEST)
    if model == "crnn_mnist":
        data, truth = strips(images, labels, heldout_order(heldout))
        batch = net.blobs["data"].data.shape[0]
        read = []
        for i in range(0, len(data), batch):
            net.blobs["data"].data[...] = data[i:i + batch]
            net.blobs["cont"].data[...] = cont(STEPS_PER_DIGIT * DIGITS, batch)
            read.append(read_digits(net.forward()["prob"]))
        hits = np.concatenate(read) == truth
        return {"digits": hits.size, "correct": int(hits.sum()), "strips": len(hits),
                "strips_correct": int(hits.all(axis=1).sum())}
    batch = net.blobs["x"].data.shape[1]
    correct = 0
    for i in range(0, len(heldout), batch):
        rows_ = heldout[i:i + batch]
        net.blobs["x"].data[...] = rows(images[rows_])
        net.blobs["cont"].data[...] = cont(28, batch)
        correct += int(np.sum(net.forward()["prob"].argmax(axis=1) == labels[rows_]))
    return {"digits": len(heldout), "correct": correct}
