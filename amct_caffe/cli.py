"""The ``amct-caffe`` command line.

``amct-caffe run --model M.prototxt --weights W.caffemodel --input data.npz`` runs the model in the
embedded executor and prints the top classes per sample (and the accuracy when the .npz has
``labels``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from amct_caffe import log
from amct_caffe.errors import AmctError

_LOG = logging.getLogger(__name__)


def _load_inputs(path: str, net) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Arrays for the net's inputs from a .npy (first input) or .npz (by input name, else first array)."""
    p = Path(path)
    if not p.is_file():
        raise AmctError(f"input file {p} does not exist")
    labels = None
    if p.suffix == ".npy":
        arrays = {net.inputs[0]: np.load(p)}
    elif p.suffix == ".npz":
        z = np.load(p)
        labels = z["labels"] if "labels" in z.files else None
        named = {k: z[k] for k in z.files if k in net.inputs}
        if not named:
            first = next(k for k in z.files if k != "labels")
            named = {net.inputs[0]: z[first]}
        arrays = named
    else:
        raise AmctError(f"input file {p}: expected .npy or .npz")
    return arrays, labels


def _fit_to_input(arr: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    """Add the channel axis grayscale image stacks (N, H, W) lack for an (N, 1, H, W) input."""
    if arr.ndim == len(shape) - 1 and len(shape) == 4 and shape[1] == 1:
        arr = arr[:, None]
    if arr.shape[1:] != tuple(shape[1:]):
        raise AmctError(f"input '{name}': samples of shape {arr.shape[1:]} do not fit the model's "
                        f"{tuple(shape[1:])}")
    return arr


def cmd_run(args) -> int:
    from amct_caffe.runtime import TEST, Net

    net = Net(args.model, args.weights, TEST)
    arrays, labels = _load_inputs(args.input, net)
    arrays = {k: _fit_to_input(v, net.blobs[k].shape, k) for k, v in arrays.items()}
    n = len(next(iter(arrays.values())))
    if args.limit:
        n = min(n, args.limit)
    bs = args.batch_size or net.blobs[net.inputs[0]].shape[0]
    out_name = args.output or net.outputs[0]
    results = []
    from tqdm import tqdm

    for start in tqdm(range(0, n, bs), desc="forward", unit="batch", disable=not args.progress):
        feed = {k: (v[start:start + bs].astype(np.float32) - args.mean) * args.scale for k, v in arrays.items()}
        results.append(np.array(net.forward(**feed)[out_name]).reshape(len(next(iter(feed.values()))), -1))
    scores = np.concatenate(results)
    top = np.argsort(-scores, axis=1)[:, : args.top_k]
    for i in range(min(n, args.show)):
        pairs = ", ".join(f"{c}:{scores[i, c]:.4f}" for c in top[i])
        print(f"sample {i}: top-{args.top_k} [{pairs}]" + (f"  label {labels[i]}" if labels is not None else ""))
    if labels is not None:
        acc = float(np.mean(top[:, 0] == labels[:n]))
        print(f"top-1 accuracy on {n} samples: {acc * 100:.2f}%")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amct-caffe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a model in the embedded executor and print its top outputs")
    run.add_argument("--model", required=True, help="network definition (.prototxt)")
    run.add_argument("--weights", required=True, help="trained weights (.caffemodel)")
    run.add_argument("--input", required=True, help=".npy, or .npz with arrays named after the net inputs "
                     "(or one array) and optional 'labels'")
    run.add_argument("--scale", type=float, default=1.0, help="multiply inputs by this after subtracting --mean")
    run.add_argument("--mean", type=float, default=0.0, help="subtract this from inputs")
    run.add_argument("--batch-size", type=int, default=0, help="samples per forward (default: the model's)")
    run.add_argument("--limit", type=int, default=0, help="use only the first N samples")
    run.add_argument("--output", help="blob to rank (default: the net's first output)")
    run.add_argument("--top-k", type=int, default=3)
    run.add_argument("--show", type=int, default=5, help="print the top classes of this many samples")
    run.add_argument("--no-progress", dest="progress", action="store_false")
    run.set_defaults(func=cmd_run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    log.setup()
    try:
        return args.func(args)
    except AmctError as e:
        print(f"amct-caffe: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
