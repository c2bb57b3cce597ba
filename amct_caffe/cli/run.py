"""``amct-caffe run``: run a model in the embedded executor, print its top classes, save its outputs.

The data is read as ``calibrate`` reads it (:func:`~amct_caffe.cli.options.open_data`: image folder,
.npy / .npz, LMDB, Record directory, with the same preprocessing flags), every sample of it: a last
batch smaller than --batch-size runs too. Labels come from a .npz's ``labels`` array or the LMDB's
``Datum.label``; with them the top-1 accuracy is printed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from amct_caffe.cli.options import (DATA_HELP, add_data_options, check_file, check_files, check_output_file,
                                    non_negative, open_data, parse_select, positive)
from amct_caffe.errors import AmctError

_LOG = logging.getLogger(__name__)
DEFAULT_TOP_K = 3


def check_labels(labels, count: int, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)) \
            or labels.size != count:
        raise AmctError(f"{where}: 'labels' must hold one number per sample ({count}), not dtype "
                        f"{labels.dtype} shape {labels.shape}; rename or drop it to run without accuracy")
    return labels.reshape(-1)


def every_batch(source):
    """All the samples of ``source`` in its batches, the last one possibly smaller."""
    full = len(source)
    for b in range(full):
        yield source.batch(b)
    left = source.num_samples - full * source.batch_size
    if left:
        yield source.select(full * source.batch_size, None).with_batch_size(left).batch(0)


def _labels(source, where: str) -> np.ndarray | None:
    """The labels of every sample of ``source`` (before any selection), or None."""
    from amct_caffe.data import ArrayData, LmdbData

    if isinstance(source, ArrayData) and source.labels is not None:
        return check_labels(source.labels, source.num_samples, where)
    if isinstance(source, LmdbData):
        return np.array([source.label(i) for i in range(source.num_samples)])
    return None


def detection_rows(table: np.ndarray, first: int) -> np.ndarray:
    """A DetectionOutput top ``(1, 1, K, 7)`` of a batch whose first sample is number ``first`` as
    rows ``[sample, label, score, xmin, ymin, xmax, ymax]``; Caffe's ``-1`` row (nothing detected)
    is dropped."""
    rows = np.asarray(table, np.float32).reshape(-1, 7)
    rows = rows[rows[:, 0] >= 0].copy()
    rows[:, 0] += first
    return rows


def _save(path, outputs: dict[str, list[np.ndarray]]) -> None:
    """One array per blob, the batches' parts concatenated (a detection list's rows, as ``(1, 1, K, 7)``;
    a blob without a row per sample, stacked batch by batch)."""
    from amct_caffe.io.files import atomic_output

    def joined(parts):
        if isinstance(parts, _Rows):
            return np.concatenate(parts, axis=2)
        # a blob without a row per sample (a scalar...) is kept batch by batch
        return np.concatenate(parts) if all(p.ndim for p in parts) else np.stack(parts)

    with atomic_output(path) as f:
        np.savez(f, **{name: joined(parts) for name, parts in outputs.items()})


class _Rows(list):
    """The parts of a detection list: ``(1, 1, k, 7)`` each, sample numbers counted over the whole run."""


def _detection_blobs(net) -> set[str]:
    """The blobs a DetectionOutput layer writes: a list of boxes per batch, not a row per sample."""
    return {t for name, layer in zip(net._layer_names, net.layers, strict=True)  # noqa: SLF001 - pycaffe's name
            if layer.type == "DetectionOutput" for t in net.top_names[name]}


def _print_detections(rows: np.ndarray, blob: str, show: int) -> None:
    """How many boxes each of the first ``show`` samples got, and the best of them."""
    for i in range(show):
        mine = rows[rows[:, 0] == i]
        top = mine[np.argmax(mine[:, 2])] if len(mine) else None
        best = f", best: label {int(top[1])} score {top[2]:.4f}" if top is not None else ""
        print(f"sample {i}: {len(mine)} detection(s) in '{blob}'{best}")


def _print_top(scores: np.ndarray, top_k: int, labels: np.ndarray | None, show: int) -> None:
    """The top classes of the first ``show`` samples, and the top-1 accuracy when there are labels."""
    top = np.argsort(-scores, axis=1)[:, :top_k]
    for i in range(show):
        pairs = ", ".join(f"{c}:{scores[i, c]:.4f}" for c in top[i])
        label = f"  label {labels[i]}" if labels is not None else ""
        print(f"sample {i}: top-{top_k} [{pairs}]{label}")
    if labels is not None:
        classes = scores.shape[1]
        valid = np.isfinite(labels) & (labels >= 0) & (labels < classes) & (labels == np.floor(labels))
        if not valid.all():
            bad = labels[~valid]
            _LOG.warning(
                "%d of %d labels are not class numbers of the output (0 to %d): %s%s; they count as misses",
                bad.size, labels.size, classes - 1, ", ".join(str(v) for v in bad[:5]), "..." if bad.size > 5 else "")
        acc = float(np.mean(top[:, 0] == labels))
        print(f"top-1 accuracy on {len(scores)} samples: {acc * 100:.2f}%")


def _forwards(net, feeds, out_name: str, tables: set[str], outputs: dict, args,
              time_major: frozenset = frozenset()) -> tuple[list, str | None]:
    """Run ``net`` on every batch of ``feeds``: the rows of ``out_name`` to rank (or a detection list's rows)
    and, when it has no row per sample, why (None otherwise); the blobs to save are appended to ``outputs``.
    ``time_major``: the inputs and outputs with the batch on axis 1 (a recurrent layer's): their samples are
    counted there, and the outputs saved samples first; a sequence output is not ranked."""
    scores, unranked, done = [], None, 0
    for feed in feeds:
        got = net.forward(blobs=sorted({out_name, *outputs}), **feed)
        name, first = next(iter(feed.items()))
        count = first.shape[1] if name in time_major else len(first)
        ranked = np.array(got[out_name])
        if out_name in tables:
            scores.append(detection_rows(ranked, done))
        elif out_name in time_major:
            unranked = (f"blob '{out_name}' is a sequence, shape {list(ranked.shape)} (time steps first) for a batch "
                        f"of {count}")
        elif unranked is None and ranked.ndim and ranked.shape[0] == count:
            scores.append(ranked.reshape(count, -1))
            if len(scores) == 1 and args.top_k is None:  # the default: 3, or every class of a smaller output
                args.top_k = min(DEFAULT_TOP_K, scores[0].shape[1])
            if len(scores) == 1 and args.top_k > scores[0].shape[1]:
                raise AmctError(f"--top-k {args.top_k}: blob '{out_name}' has {scores[0].shape[1]} value(s) per "
                                "sample; give a smaller --top-k")
        elif unranked is None:  # no row per sample (a scalar, a batch axis moved): nothing to rank
            unranked = f"blob '{out_name}' has shape {list(ranked.shape)} for a batch of {count}"
        for name in outputs:
            value = detection_rows(got[name], done)[None, None] if name in tables else np.array(got[name])
            outputs[name].append(np.swapaxes(value, 0, 1) if name in time_major else value)  # samples first
        done += count
    return scores, unranked


def cmd_run(args) -> int:
    from tqdm import tqdm

    from amct_caffe.data import time_major_inputs, time_major_outputs
    from amct_caffe.runtime import TEST, Net, memory

    check_files(model=args.model, weights=args.weights)
    if Path(args.input).suffix.lower() in (".npy", ".npz"):
        check_file("input file", args.input)
    elif not Path(args.input).exists():
        raise AmctError(f"--input {args.input} does not exist")
    if args.save:
        check_output_file("--save", args.save, ".npz")
    net = Net(args.model, args.weights, TEST)
    if not net.inputs:
        raise AmctError(f"{args.model} declares no input (Input layer or input: field)")
    out_name = args.output or (net.outputs[0] if net.outputs else None)
    if out_name is None:
        raise AmctError(f"{args.model} has no output blob (every blob is read by a layer): name one with --output")
    if out_name not in net.blobs:
        raise AmctError(f"--output {out_name}: {args.model} has no blob of that name "
                        f"(its outputs: {', '.join(net.outputs) or 'none'})")
    saved = [out_name] if args.output else list(net.outputs)
    model_shapes = {k: tuple(net.blobs[k].shape) for k in net.inputs}
    time_major = time_major_inputs(args.model)
    source, _, _ = open_data(args, args.input, model_shapes, args.batch_size or 0, select=False,
                             time_major=time_major)
    time_major = frozenset(time_major + time_major_outputs(args.model, {out_name, *saved}))
    total = source.num_samples
    if total == 0:
        raise AmctError(f"{args.input} holds no sample")
    labels = _labels(source, args.input)
    sel = parse_select(args.select)
    source = source.select(sel.start, sel.stop, sel.step).select(None, args.limit)
    n = source.num_samples
    if n == 0:
        raise AmctError(f"--select {args.select} leaves none of the {total} sample(s) of {args.input}")
    if labels is not None:
        labels = labels[sel][:n]
    tables = _detection_blobs(net)
    outputs = {name: _Rows() if name in tables else [] for name in saved}
    batches = -(-n // source.batch_size)
    # a short run is better off without numpy's huge-page hint (runtime/memory.py)
    with memory.hint_off(batches <= memory.FEW_FORWARDS):
        scores, unranked = _forwards(net, tqdm(every_batch(source), total=batches, desc="forward", unit="batch",
                                               disable=not args.progress), out_name, tables, outputs, args,
                                     time_major)
    if out_name in tables:
        _print_detections(np.concatenate(scores), out_name, min(n, args.show))
    elif unranked is not None:
        print(f"{unranked}, not one row per sample: nothing to rank (--output picks another blob)")
    else:
        per_sample = tuple(net.blobs[out_name].shape[1:])
        if labels is not None and not all(d == 1 for d in per_sample[1:]):  # a feature map, not class scores
            print(f"blob '{out_name}' holds {list(per_sample)} values per sample, not one score per class: no "
                  "top-1 accuracy against the labels")
            labels = None
        _print_top(np.concatenate(scores), args.top_k, labels, min(n, args.show))
    if args.save:
        _save(args.save, outputs)
        print(f"saved {', '.join(saved)} for {n} samples: {args.save}")
    return 0


def add_parser(sub, common) -> None:
    run = sub.add_parser("run", parents=[common],
                         help="run a model in the embedded executor and print its top outputs",
                         description="Run a model in the embedded executor on every sample of --input and print "
                                     "the top classes of the first samples (and the top-1 accuracy when the data "
                                     "has labels: a .npz's 'labels' array, an LMDB's Datum labels). --save keeps "
                                     "the outputs of all samples.")
    run.add_argument("--model", required=True, help="network definition (.prototxt)")
    run.add_argument("--weights", required=True, help="trained weights (.caffemodel)")
    run.add_argument("--input", "--data", dest="input", required=True,
                     help=DATA_HELP + "; a .npz may hold 'labels'")
    run.add_argument("--batch-size", type=positive, help="samples per forward (default: the model's)")
    run.add_argument("--limit", type=positive, help="use only the first N samples (after --select)")
    add_data_options(run, "the run")
    run.add_argument("--output", help="blob to rank (default: the net's first output)")
    run.add_argument("--top-k", type=positive, default=None,
                     help=f"classes printed per sample (default {DEFAULT_TOP_K}, or all of a smaller output)")
    run.add_argument("--show", type=non_negative, default=5,
                     help="print the top classes of this many samples (default 5)")
    run.add_argument("--save", metavar="OUT.npz",
                     help="save the outputs of every sample to this .npz, one array per blob named after it "
                          "(every net output, or the --output blob), samples along the first axis; a "
                          "DetectionOutput's boxes as one (1, 1, K, 7) list, column 0 the sample number")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    run.set_defaults(func=cmd_run)
