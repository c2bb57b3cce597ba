"""``amct-caffe run``: run a model in the embedded executor and print its top outputs."""

from __future__ import annotations

import numpy as np

from amct_caffe.cli.options import check_files, finite, non_negative, positive
from amct_caffe.errors import AmctError


def check_labels(labels, count: int, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.number) or labels.size != count:
        raise AmctError(f"{where}: 'labels' must hold one number per sample ({count}), not dtype "
                        f"{labels.dtype} shape {labels.shape}; rename or drop it to run without accuracy")
    return labels.reshape(-1)


def cmd_run(args) -> int:
    from pathlib import Path

    from amct_caffe.data.arrays import load_arrays
    from amct_caffe.runtime import TEST, Net

    check_files(model=args.model, weights=args.weights, input=args.input)
    if Path(args.input).suffix not in (".npy", ".npz"):
        raise AmctError(f"--input {args.input}: expected a .npy or .npz file")
    net = Net(args.model, args.weights, TEST)
    if not net.inputs:
        raise AmctError(f"{args.model} declares no input (Input layer or input: field)")
    out_name = args.output or (net.outputs[0] if net.outputs else None)
    if out_name not in net.blobs:
        raise AmctError(f"--output {out_name}: {args.model} has no blob of that name "
                        f"(its outputs: {', '.join(net.outputs) or 'none'})")
    arrays, labels = load_arrays(args.input, {k: tuple(net.blobs[k].shape) for k in net.inputs})
    total = len(next(iter(arrays.values())))
    if total == 0:
        raise AmctError(f"{args.input} holds no sample")
    if labels is not None:
        labels = check_labels(labels, total, args.input)
    n = min(total, args.limit) if args.limit else total
    model_batch = net.blobs[net.inputs[0]].shape
    bs = args.batch_size or (model_batch[0] if len(model_batch) and model_batch[0] > 0 else 1)
    results = []
    from tqdm import tqdm

    for start in tqdm(range(0, n, bs), desc="forward", unit="batch", disable=not args.progress):
        stop = min(start + bs, n)
        feed = {k: (v[start:stop].astype(np.float32) - np.float32(args.mean)) * np.float32(args.scale)
                for k, v in arrays.items()}
        results.append(np.array(net.forward(blobs=[out_name], **feed)[out_name]).reshape(stop - start, -1))
        if start == 0 and args.top_k > results[0].shape[1]:
            raise AmctError(f"--top-k {args.top_k}: blob '{out_name}' has {results[0].shape[1]} value(s) per "
                            "sample; give a smaller --top-k")
    scores = np.concatenate(results)
    top = np.argsort(-scores, axis=1)[:, : args.top_k]
    for i in range(min(n, args.show)):
        pairs = ", ".join(f"{c}:{scores[i, c]:.4f}" for c in top[i])
        label = f"  label {labels[i]}" if labels is not None else ""
        print(f"sample {i}: top-{args.top_k} [{pairs}]{label}")
    if labels is not None:
        acc = float(np.mean(top[:, 0] == labels[:n]))
        print(f"top-1 accuracy on {n} samples: {acc * 100:.2f}%")
    return 0


def add_parser(sub, common) -> None:
    run = sub.add_parser("run", parents=[common],
                         help="run a model in the embedded executor and print its top outputs",
                         description="Run a model in the embedded executor on every sample of --input and print "
                                     "the top classes of the first samples (and the top-1 accuracy when the data "
                                     "has labels).")
    run.add_argument("--model", required=True, help="network definition (.prototxt)")
    run.add_argument("--weights", required=True, help="trained weights (.caffemodel)")
    run.add_argument("--input", required=True, help=".npy, or .npz with arrays named after the net inputs "
                     "(or one array) and optional 'labels'")
    run.add_argument("--scale", type=finite, default=1.0,
                     help="multiply inputs by this after subtracting --mean")
    run.add_argument("--mean", type=finite, default=0.0, help="subtract this from inputs")
    run.add_argument("--batch-size", type=positive, help="samples per forward (default: the model's)")
    run.add_argument("--limit", type=positive, help="use only the first N samples")
    run.add_argument("--output", help="blob to rank (default: the net's first output)")
    run.add_argument("--top-k", type=positive, default=3, help="classes printed per sample (default 3)")
    run.add_argument("--show", type=non_negative, default=5,
                     help="print the top classes of this many samples (default 5)")
    run.add_argument("--no-progress", dest="progress", action="store_false")
    run.set_defaults(func=cmd_run)
