"""LeNet on MNIST for the training tests: LMDBs of Datum written from ../shared/data/mnist_5k.npz,
Caffe's ``lenet_train_test.prototxt`` pointed at them, and a solver after Caffe's lenet_solver."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from amct_caffe.data import write_lmdb
from tests.golden import SHARED

MNIST = SHARED / "data" / "mnist_5k.npz"
TRAIN_TEST = SHARED / "models" / "lenet_mnist" / "lenet_train_test.prototxt"
N_TRAIN = 4000


def mnist_lenet(workdir: Path, *, train_batch: int = 64, test_batch: int = 100, solver: str = "") -> Path:
    """Write the LMDBs, the train/test prototxt and ``solver.prototxt`` into ``workdir``; return the solver.

    ``solver`` holds extra or overriding SolverParameter lines (text format).
    """
    with np.load(MNIST) as z:
        images, labels = z["images"], z["labels"]
    # the file is sorted by digit; one-class batches make SGD diverge (in Caffe too): a fixed shuffle
    order = np.random.default_rng(0).permutation(len(labels))
    images, labels = images[order], labels[order]
    train = write_lmdb(workdir / "mnist_train_lmdb", images[:N_TRAIN], labels[:N_TRAIN])
    test = write_lmdb(workdir / "mnist_test_lmdb", images[N_TRAIN:], labels[N_TRAIN:])
    text = TRAIN_TEST.read_text()
    text = text.replace("examples/mnist/mnist_train_lmdb", str(train))
    text = text.replace("examples/mnist/mnist_test_lmdb", str(test))
    text = text.replace("batch_size: 64", f"batch_size: {train_batch}")
    text = text.replace("batch_size: 100", f"batch_size: {test_batch}")
    net = workdir / "lenet_train_test.prototxt"
    net.write_text(text)
    fields = {"net": f'"{net}"', "test_iter": "10", "test_interval": "1000000", "base_lr": "0.01",
              "momentum": "0.9", "weight_decay": "0.0005", "lr_policy": '"inv"', "gamma": "0.0001",
              "power": "0.75", "display": "0", "max_iter": "10000", "snapshot_prefix": f'"{workdir / "lenet"}"',
              "solver_mode": "CPU", "random_seed": "1", "test_initialization": "false"}
    for line in solver.splitlines():
        if line.strip():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    path = workdir / "solver.prototxt"
    path.write_text("".join(f"{k}: {v}\n" for k, v in fields.items()))
    return path
