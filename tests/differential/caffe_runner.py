"""Run many small nets in official Caffe, each in a forked child, and save what Caffe computes.

Run inside a Python that imports pycaffe (``tests/real_caffe.py``'s ``run_with_pycaffe``)::

    python -m tests.differential.caffe_runner WORKDIR

``WORKDIR/manifest.json`` lists the nets: ``[{"name", "prototxt", "inputs"}]`` (paths relative to
WORKDIR; ``inputs`` an .npz by input blob name). Caffe is imported once; each net runs in a child
made by ``fork``, so a net Caffe refuses (a glog CHECK aborts the process) costs only that child.
The child builds the net in the TEST phase, fills every learned blob (:func:`fill_params`), saves
the weights as ``NAME.caffemodel`` and, with Caffe's own blob shapes, ``NAME.params.npz``
(``LAYER/i`` keys) *before* the forward (BatchNorm with batch statistics updates
its blobs during the forward), runs the forward and saves every blob but Caffe's automatic
``_split_`` copies to ``NAME.blobs.npz``.

``WORKDIR/results.json`` maps each name to ``{"status": "ok" | "refused", "log": tail of glog,
"layer": name of the layer Caffe refused (see ``_culprit``)}``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import zlib

import numpy as np


# Layers whose bottoms (NAME/i) and tops (NAME/topi) the child keeps in NAME.pre.npz.
NORMALIZING = ("MVN", "BatchNorm", "BatchNormKyle", "Normalize", "LRN")
ORDER_SENSITIVE = ("DetectionOutput", "ArgMax", "Pooling")


def fill_params(net, rng: np.random.Generator) -> None:
    """Random learned blobs: BatchNorm statistics of positive variance and non-zero factor."""
    for name, layer in zip(net._layer_names, net.layers):  # noqa: B905 - pycaffe's own lists
        blobs = layer.blobs
        ltype = layer.type
        for i, blob in enumerate(blobs):
            shape = blob.data.shape
            if ltype in ("BatchNorm", "BatchNormKyle"):
                if i == 0:
                    v = rng.standard_normal(shape)
                elif i == 1:
                    v = rng.uniform(0.2, 2.0, shape)
                elif i == 2:
                    v = rng.uniform(0.5, 2.0, shape)
                elif i == 3:
                    v = 1 + 0.3 * rng.standard_normal(shape)
                else:
                    v = 0.5 * rng.standard_normal(shape)
            elif ltype == "Normalize":
                v = rng.uniform(0.5, 2.0, shape)
            else:
                v = 0.5 * rng.standard_normal(shape)
            blob.data[...] = v.astype(np.float32)
        del name


def _child(caffe, workdir: str, entry: dict, seed: int, prototxt: str | None = None, build_only: bool = False) -> None:
    """Build, fill, forward; save weights and blobs unless ``prototxt`` (a trial) is given; only
    build with ``build_only``."""
    name = entry["name"]
    net = caffe.Net(prototxt or os.path.join(workdir, entry["prototxt"]), caffe.TEST)
    if build_only:
        return
    fill_params(net, np.random.default_rng(seed))
    if prototxt is None:
        net.save(os.path.join(workdir, name + ".caffemodel"))
        params = {f"{k}/{i}": np.array(b.data, dtype=np.float32) for k, bl in net.params.items()
                  for i, b in enumerate(bl)}
        np.savez(os.path.join(workdir, name + ".params.npz"), **params)
    with np.load(os.path.join(workdir, entry["inputs"])) as inputs:
        for k in inputs.files:
            if k in net.blobs:
                net.blobs[k].reshape(*inputs[k].shape)
                net.blobs[k].data[...] = inputs[k]
    # layer by layer, keeping the bottoms of the normalizing layers (the test recognises a
    # constant input there: see test_differential.ill_conditioned)
    pre = {}
    for lname, layer in zip(net._layer_names, net.layers):  # noqa: B905 - pycaffe's own lists
        keep = layer.type in NORMALIZING + ORDER_SENSITIVE
        if keep:
            for i, b in enumerate(net.bottom_names[lname]):
                pre[f"{lname}/{i}"] = np.array(net.blobs[b].data, dtype=np.float32)
        net.forward(start=lname, end=lname)
        if keep:
            for i, t in enumerate(net.top_names[lname]):
                pre[f"{lname}/top{i}"] = np.array(net.blobs[t].data, dtype=np.float32)
    if prototxt is None:
        np.savez(os.path.join(workdir, name + ".pre.npz"), **pre)
        out = {k: np.array(v.data, dtype=np.float32) for k, v in net.blobs.items() if "_split_" not in k}
        np.savez(os.path.join(workdir, name + ".blobs.npz"), **out)


def run_forked(work, log: str) -> bool:
    """Run ``work()`` in a forked child whose stderr (glog, Python errors) goes to ``log``; True when
    it ends well. A glog CHECK aborts only the child."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 2)
            work()
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported through the exit status
            os.write(2, f"\nPython error: {type(e).__name__}: {e}\n".encode())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _in_child(caffe, workdir, entry, seed, log, prototxt=None, build_only=False) -> bool:
    """Run :func:`_child` in a forked process; True when it ends well."""
    return run_forked(lambda: _child(caffe, workdir, entry, seed, prototxt, build_only), log)


def _culprit(caffe, workdir, entry, seed) -> str | None:
    """The layer Caffe refuses: the last layer of the shortest failing prefix of the net.

    Caffe logs nothing before InitGoogleLogging (pycaffe never calls it), so the refused layer is
    found by bisection over the prototxt's layers, one per line. Caffe sets every layer up before
    the first forward, so when building the whole net fails the prefixes are only built: a layer
    refused at setup is found even behind a layer that would fail at its forward.
    """
    with open(os.path.join(workdir, entry["prototxt"])) as f:
        lines = f.read().splitlines()
    layer_lines = [i for i, line in enumerate(lines) if line.startswith("layer {")]
    if not layer_lines or any(lines[i].count("layer {") != 1 for i in layer_lines):
        return None
    trial = os.path.join(workdir, entry["name"] + ".trial.prototxt")
    log = os.path.join(workdir, entry["name"] + ".trial.log")
    build_only = not _in_child(caffe, workdir, entry, seed, log, build_only=True)
    lo, hi = 0, len(layer_lines)  # a prefix of lo layers runs, one of hi layers fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        with open(trial, "w") as f:
            f.write("\n".join(lines[:layer_lines[mid - 1] + 1]) + "\n")
        if _in_child(caffe, workdir, entry, seed, log, trial, build_only):
            lo = mid
        else:
            hi = mid
    for p in (trial, log):
        if os.path.exists(p):
            os.unlink(p)
    m = re.search(r'name: "([^"]+)"', lines[layer_lines[hi - 1]])
    return m.group(1) if m else None


def _tail(path: str, limit: int = 1500) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    return text.replace("WARNING: Logging before InitGoogleLogging() is written to STDERR\n", "")[-limit:]


def run_manifest(workdir: str, run_entry) -> None:
    """Import pycaffe once, run ``run_entry(caffe, entry, log) -> result dict`` for each entry of
    ``WORKDIR/manifest.json`` and write ``WORKDIR/results.json`` ({name: result})."""
    import caffe  # noqa: PLC0415 - imported once, before the forks
    caffe.set_mode_cpu()
    with open(os.path.join(workdir, "manifest.json")) as f:
        manifest = json.load(f)
    results = {entry["name"]: run_entry(caffe, entry, os.path.join(workdir, entry["name"] + ".log"))
               for entry in manifest}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f)


def main(workdir: str) -> None:
    def run_entry(caffe, entry, log):
        seed = zlib.crc32(entry["name"].encode())  # the net's name, not its place in the batch
        ok = _in_child(caffe, workdir, entry, seed, log)
        result = {"status": "ok" if ok else "refused", "log": "" if ok else _tail(log),
                  "layer": None if ok else _culprit(caffe, workdir, entry, seed)}
        if ok:
            os.unlink(log)
        return result

    run_manifest(workdir, run_entry)


if __name__ == "__main__":
    main(sys.argv[1])
