"""Train LeNet on the bundled MNIST digits with a plain pycaffe script, in the embedded runtime.

    python samples/mnist/src/train_lenet.py [--iterations 300] [--caffe]

The bundled 500 digits are written as two Caffe LMDBs (400 to train, 100 to test) under ``tmp/``;
then Caffe's own ``lenet_train_test.prototxt`` is trained by a solver after Caffe's
``lenet_solver.prototxt`` (SGD, momentum 0.9, weight decay 5e-4, ``inv`` policy). The training part
is an ordinary pycaffe script: only the import differs, and ``--caffe`` runs it in real Caffe
(``import caffe``) instead. Prints the test accuracy before and after; snapshots land in ``results/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1]


def make_lmdbs(tmp: Path) -> tuple[Path, Path]:
    """The bundled digits, shuffled once (the file is sorted by class), as train/test LMDBs."""
    from amct_caffe.data import write_lmdb

    with np.load(HERE / "mnist_500.npz") as z:
        images, labels = z["images"], z["labels"]
    order = np.random.default_rng(0).permutation(len(labels))
    images, labels = images[order], labels[order]
    train, test = tmp / "mnist_train_lmdb", tmp / "mnist_test_lmdb"
    for path, sl in ((train, slice(0, 400)), (test, slice(400, 500))):
        if not path.exists():
            write_lmdb(path, images[sl], labels[sl])
    return train, test


def write_solver(tmp: Path, results: Path, train: Path, test: Path, iterations: int) -> Path:
    net = (HERE / "lenet_train_test.prototxt").read_text()
    net = net.replace("examples/mnist/mnist_train_lmdb", str(train)).replace("examples/mnist/mnist_test_lmdb",
                                                                               str(test))
    net_path = tmp / "lenet_train_test.prototxt"
    net_path.write_text(net.replace("batch_size: 100", "batch_size: 50"))
    solver = tmp / "lenet_solver.prototxt"
    solver.write_text(f'net: "{net_path}"\ntest_iter: 2\ntest_interval: 100\nbase_lr: 0.01\nmomentum: 0.9\n'
                      f'weight_decay: 0.0005\nlr_policy: "inv"\ngamma: 0.0001\npower: 0.75\ndisplay: 100\n'
                      f'max_iter: {iterations}\nsnapshot: {iterations}\nsnapshot_prefix: "{results / "lenet"}"\n'
                      'solver_mode: CPU\nrandom_seed: 1\n')
    return solver


def test_accuracy(caffe, solver) -> float:
    net = solver.test_nets[0]
    net.share_with(solver.net)  # the test net reads the training weights
    return float(np.mean([net.forward()["accuracy"] for _ in range(2)]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--caffe", action="store_true", help="train in real Caffe (import caffe) instead")
    args = ap.parse_args(argv)
    tmp, results = Path("tmp"), Path("results")
    tmp.mkdir(exist_ok=True)
    results.mkdir(exist_ok=True)
    train, test = make_lmdbs(tmp)
    solver_file = write_solver(tmp, results, train, test, args.iterations)

    # ---- a pycaffe training script: only this import changes between real Caffe and ours
    if args.caffe:
        import caffe
    else:
        import amct_caffe.runtime as caffe
    caffe.set_mode_cpu()
    solver = caffe.get_solver(str(solver_file))
    before = test_accuracy(caffe, solver)
    solver.solve()
    after = test_accuracy(caffe, solver)
    # ----
    print(f"LeNet test accuracy before training {before:.2%}, after {args.iterations} iterations "
          f"{after:.2%}; snapshot {results / f'lenet_iter_{args.iterations}.caffemodel'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
