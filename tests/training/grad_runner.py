"""Forward + backward of small nets in official Caffe, saved for the executor to match.

Run inside a Python that imports pycaffe (``tests/real_caffe.py``'s ``run_with_pycaffe``)::

    python -m tests.training.grad_runner WORKDIR

``WORKDIR/manifest.json``: ``[{"name", "prototxt", "inputs", "phase", "seed", "forwards", "weights"}]``
(paths relative to WORKDIR but ``weights``, optional; ``inputs`` an .npz by input blob name;
``phase`` "TRAIN" or "TEST"). Each net runs in a forked child (a glog CHECK aborts only the
child), which:

1. builds the net and fills its learned blobs (``caffe_runner.fill_params``, unless ``weights``
   gives a caffemodel), saves them as
   ``NAME.caffemodel`` (before the forward: BatchNorm in TRAIN updates its statistics);
2. sets the inputs, runs ``forward()`` (``forwards`` times, default 1, each with its inputs:
   ``gradcheck.inputs_for_forward``); every output whose diff is zero (not a loss) gets a
   random diff, and ``backward(**diffs)`` runs with the loss outputs keeping their seeds;
3. saves ``NAME.grad.npz``: ``data/B`` and ``diff/B`` per blob (Caffe's ``_split_`` copies
   left out), ``pdata/L/i`` and ``pdiff/L/i`` per learned blob, ``topdiff/B`` for the diffs it
   set, and ``loss`` (what the last forward's ``Net::ForwardFromTo`` returned).

``WORKDIR/results.json`` maps each name to ``{"status": "ok" | "refused", "log": glog tail}``.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from tests.differential.caffe_runner import _tail, fill_params, run_forked, run_manifest
from tests.training.gradcheck import inputs_for_forward


def _child(caffe, workdir: str, entry: dict) -> None:
    name = entry["name"]
    phase = caffe.TRAIN if entry.get("phase", "TRAIN") == "TRAIN" else caffe.TEST
    rng = np.random.default_rng(entry.get("seed", 0))
    if entry.get("weights"):  # a real model: its own weights
        net = caffe.Net(os.path.join(workdir, entry["prototxt"]), entry["weights"], phase)
    else:
        net = caffe.Net(os.path.join(workdir, entry["prototxt"]), phase)
        fill_params(net, rng)
    net.save(os.path.join(workdir, name + ".caffemodel"))
    inputs = {}
    if entry.get("inputs"):
        with np.load(os.path.join(workdir, entry["inputs"])) as z:
            inputs = {k: z[k] for k in z.files}
    for i in range(int(entry.get("forwards", 1))):
        for k, v in inputs_for_forward(inputs, i).items():
            net.blobs[k].reshape(*v.shape)
            net.blobs[k].data[...] = v
        # pycaffe's forward() returns outputs only; Net::ForwardFromTo returns the loss (split layers' included)
        loss = float(net._forward(0, len(net.layers) - 1))
    out = {}
    for o in net.outputs:
        blob = net.blobs[o]
        seed = np.array(blob.diff, dtype=np.float32)
        if not np.any(seed):
            diff = rng.standard_normal(blob.data.shape).astype(np.float32)
            out[f"topdiff/{o}"] = diff
            blob.diff[...] = diff
    # the diffs are set on the blobs, not passed as backward(**diffs): pycaffe checks each diff's first
    # axis, which a loss's scalar (0-axis) top does not have
    net.backward()
    for k, b in net.blobs.items():
        if "_split_" in k:
            continue
        out[f"data/{k}"] = np.array(b.data, dtype=np.float32)
        out[f"diff/{k}"] = np.array(b.diff, dtype=np.float32)
    for k, blobs in net.params.items():
        for i, b in enumerate(blobs):
            out[f"pdata/{k}/{i}"] = np.array(b.data, dtype=np.float32)
            out[f"pdiff/{k}/{i}"] = np.array(b.diff, dtype=np.float32)
    out["loss"] = np.array(loss, dtype=np.float64)
    np.savez(os.path.join(workdir, name + ".grad.npz"), **out)


def main(workdir: str) -> None:
    def run_entry(caffe, entry, log):
        ok = run_forked(lambda: _child(caffe, workdir, entry), log)
        return {"status": "ok" if ok else "refused", "log": "" if ok else _tail(log)}

    run_manifest(workdir, run_entry)


if __name__ == "__main__":
    main(sys.argv[1])
