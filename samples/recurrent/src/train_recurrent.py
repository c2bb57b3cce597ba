"""Train the recurrent samples (LSTM / RNN over MNIST rows, a CRNN over strips of four digits).

    python samples/recurrent/src/train_recurrent.py [--model lstm_mnist|rnn_mnist|crnn_mnist|all]
                                                    [--caffe | --caffe_dir DIR] [--iterations N] [--out DIR]

The shipped ``samples/recurrent/*.caffemodel`` were made in official Caffe by
``--caffe --out samples/recurrent`` (pycaffe on PYTHONPATH; or ``--caffe_dir`` a Caffe tree with
pycaffe built); without either the same script trains in amct_caffe's embedded runtime. The digits
come from ``../shared/data/mnist_5k.npz`` (``mnist_sequences.py``: the split and the inputs). Each
model's ``<name>_train.prototxt`` has Input layers that the script fills from NumPy before every
``solver.step(1)``; an Adam solver with fixed seeds (Caffe's ``random_seed``, NumPy's batches). At the
end the weights are saved as ``<out>/<name>.caffemodel`` and ``<name>_deploy.prototxt`` is run over the
held-out digits, printing the accuracy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

import mnist_sequences as ms

SAMPLE = Path(__file__).resolve().parents[1]
BATCH = 50
# name -> (iterations, base_lr)
MODELS = {"lstm_mnist": (2000, 0.002), "rnn_mnist": (4000, 0.001), "crnn_mnist": (1500, 0.002)}


def write_solver(tmp: Path, model: str, iterations: int, base_lr: float) -> Path:
    solver = tmp / f"{model}_solver.prototxt"
    solver.write_text(f'net: "{SAMPLE / f"{model}_train.prototxt"}"\ntype: "Adam"\nbase_lr: {base_lr}\n'
                      f'momentum: 0.9\nmomentum2: 0.999\nlr_policy: "step"\ngamma: 0.3\n'
                      f'stepsize: {iterations * 2 // 5}\nclip_gradients: 5\ndisplay: 0\nmax_iter: {iterations}\n'
                      f'snapshot_prefix: "{tmp / model}"\nsolver_mode: CPU\nrandom_seed: 1\n')
    return solver


def batches(model: str, images: np.ndarray, labels: np.ndarray, train: np.ndarray, seed: int = 0):
    """Endless training batches: {input blob: array}. Row models take the training digits in shuffled
    epochs; the CRNN takes strips of four training digits drawn at random."""
    rng = np.random.default_rng(seed)
    while True:
        if model == "crnn_mnist":
            data, digits = ms.strips(images, labels, rng.choice(train, (BATCH, ms.DIGITS)))
            yield {"data": data, "cont": ms.cont(ms.DIGITS * ms.STEPS_PER_DIGIT, BATCH),
                   "label": ms.step_labels(digits)}
            continue
        order = rng.permutation(train)
        for i in range(0, len(order) - BATCH + 1, BATCH):
            idx = order[i:i + BATCH]
            yield {"x": ms.rows(images[idx]), "cont": ms.cont(28, BATCH), "label": labels[idx].astype(np.float32)}


def train(caffe, model: str, iterations: int, base_lr: float, tmp: Path, out: Path) -> Path:
    images, labels = ms.load()
    solver = caffe.get_solver(str(write_solver(tmp, model, iterations, base_lr)))
    feed = batches(model, images, labels, ms.split(len(labels))[0])
    start, losses = time.time(), []
    for it in range(iterations):
        for name, value in next(feed).items():
            solver.net.blobs[name].data[...] = value
        solver.step(1)
        losses.append(float(solver.net.blobs["loss"].data))
        if (it + 1) % 100 == 0:
            print(f"{model} iteration {it + 1}: loss {np.mean(losses[-100:]):.4f}, "
                  f"batch accuracy {float(solver.net.blobs['accuracy'].data):.2%}, {time.time() - start:.0f} s",
                  flush=True)
    weights = out / f"{model}.caffemodel"
    solver.net.save(str(weights))
    return weights


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=[*MODELS, "all"], default="all")
    ap.add_argument("--caffe", action="store_true", help="train in real Caffe (import caffe) instead")
    ap.add_argument("--caffe_dir", default=None, help="Caffe source tree with pycaffe built (implies --caffe)")
    ap.add_argument("--iterations", type=int, default=None, help="override each model's iteration count")
    ap.add_argument("--out", default="results", help="where the .caffemodel files go")
    args = ap.parse_args(argv)
    tmp, out = Path("tmp"), Path(args.out)
    tmp.mkdir(exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if args.caffe_dir:
        sys.path.insert(0, os.path.join(args.caffe_dir, "python"))
    if args.caffe or args.caffe_dir:
        import caffe
    else:
        import amct_caffe.runtime as caffe
    caffe.set_mode_cpu()
    for model in MODELS if args.model == "all" else [args.model]:
        iterations, base_lr = MODELS[model]
        start = time.time()
        weights = train(caffe, model, args.iterations or iterations, base_lr, tmp, out)
        seconds = time.time() - start
        acc = ms.heldout_accuracy(caffe, model, str(SAMPLE / f"{model}_deploy.prototxt"), str(weights))
        line = (f"{model}: trained in {seconds:.0f} s; held-out digits {acc['correct']}/{acc['digits']} "
                f"({acc['correct'] / acc['digits']:.2%})")
        if "strips" in acc:
            line += f", strips {acc['strips_correct']}/{acc['strips']} ({acc['strips_correct'] / acc['strips']:.2%})"
        print(f"{line}; weights {weights}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
