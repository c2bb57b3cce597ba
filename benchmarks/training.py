"""Seconds per training iteration of the embedded runtime, and of real Caffe when ``AMCT_REAL_CAFFE`` is set.

    python benchmarks/training.py [--iters 10] [--rounds 2] [--warmup 2] [--threads N]
                                  [--models lenet,open_nsfw]

An iteration is ``solver.step(1)``: forward, backward and the SGD update (momentum 0.9, weight
decay 5e-4) in the TRAIN phase. Models (from ../shared/models):

* ``lenet``: Caffe's ``lenet_train_test.prototxt`` with its Data layers replaced by Input
  layers (batch 64 x 1 x 28 x 28 and labels), SoftmaxWithLoss;
* ``open_nsfw``: the ResNet-50-1by2 deploy net at batch 8 x 3 x 224 x 224, its Softmax turned
  into SoftmaxWithLoss, BatchNorm on batch statistics (``use_global_stats: true`` removed), as
  one fine-tunes it; starting from its released weights.

The same fixed random batch is fed before every step. Reported: median (and minimum) seconds
per iteration, and with Caffe the ratio ours / caffe of the medians, measured in alternating
rounds in one run (pycaffe runs in a subprocess: its protobuf classes must not meet ours).
``--threads N`` pins the BLAS threads of both, as in ``benchmarks/executor.py``.

Figures (``--threads 1``, 2 cores shared with other jobs, load average 3.0-5.2): medians of one
run alternating the three solvers in rounds with this script's workers, before = the executor at
2f4bc8a, after = with the C++ backward kernels, Caffe's per-image weight gradients and the
one-pass SGD update; LeNet 200 iterations in 20 rounds, open_nsfw 24 in 12.

=========  ========  ========  ========  ============  =============
model      before    after     Caffe     after/Caffe   before/Caffe
=========  ========  ========  ========  ============  =============
lenet      60.4 ms   40.8 ms   45.5 ms   0.90          1.33
open_nsfw  2.53 s    1.85 s    2.40 s    0.77          1.06
=========  ========  ========  ========  ============  =============

The fastest iterations (least disturbed by the other jobs): LeNet 25.4 / 17.7 / 21.6 ms, open_nsfw
1.66 / 1.24 / 1.59 s (before / after / Caffe). An earlier run of the same kind (load 4.6-4.7, before
the unrolled argmax pooling) gave after/Caffe 0.97 and before/Caffe 1.36 for LeNet, 0.81 and
1.16 for open_nsfw. On a quieter machine (load 0.2-1.7) the executor at 2f4bc8a measured 1.37 (LeNet,
35.8 vs 26.0 ms) and 1.00 (open_nsfw, 2.00 vs 1.99 s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "models"
SOLVER = ('net: "{net}"\nbase_lr: 0.001\nmomentum: 0.9\nweight_decay: 0.0005\nlr_policy: "fixed"\n'
          'max_iter: 1000000\ndisplay: 0\nsnapshot_after_train: false\nsolver_mode: CPU\n')


def _input(name: str, dims) -> str:
    return (f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ '
            + " ".join(f"dim: {d}" for d in dims) + " } } }\n")


def lenet_net(tmp: Path) -> tuple[str, str | None, dict]:
    text = (SHARED / "lenet_mnist" / "lenet_train_test.prototxt").read_text()
    body = text[text.index('layer {\n  name: "conv1"'):]
    body = re.sub(r'layer \{\n  name: "accuracy".*?\n\}\n', "", body, flags=re.S)
    net = 'name: "LeNet"\n' + _input("data", (64, 1, 28, 28)) + _input("label", (64,)) + body
    rng = np.random.default_rng(0)
    feed = {"data": rng.random((64, 1, 28, 28), np.float32), "label": rng.integers(0, 10, 64).astype(np.float32)}
    return net, None, feed


def open_nsfw_net(tmp: Path) -> tuple[str, str | None, dict]:
    text = (SHARED / "open_nsfw" / "deploy.prototxt").read_text()
    text = text.replace("dim: 1 dim: 3 dim: 224 dim: 224", "dim: 8 dim: 3 dim: 224 dim: 224")
    text = re.sub(r"\s*use_global_stats: true", "", text)
    text = text.replace('type: "Softmax"\n  bottom: "fc_nsfw"', 'type: "SoftmaxWithLoss"\n  bottom: "fc_nsfw"\n'
                        '  bottom: "label"')
    text = text.replace('layer {\n  name: "conv_1"', _input("label", (8,)) + 'layer {\n  name: "conv_1"', 1)
    rng = np.random.default_rng(0)
    feed = {"data": rng.standard_normal((8, 3, 224, 224)).astype(np.float32),
            "label": rng.integers(0, 2, 8).astype(np.float32)}
    return text, str(SHARED / "open_nsfw" / "resnet_50_1by2_nsfw.caffemodel"), feed


MODELS = {"lenet": lenet_net, "open_nsfw": open_nsfw_net}

# argv: solver weights|- feed.npz. Each stdin line "k" asks for k timed steps (one JSON list of
# seconds back); EOF ends it.
_WORKER = r"""
import json, sys, time
import numpy as np
{import_caffe}
solver_path, weights, feed_path = sys.argv[1:4]
caffe.set_mode_cpu()
solver = caffe.SGDSolver(solver_path)
if weights != "-":
    solver.net.copy_from(weights)
with np.load(feed_path) as z:
    feed = {{k: z[k] for k in z.files}}
for line in sys.stdin:
    times = []
    for _ in range(int(line)):
        for k, v in feed.items():
            solver.net.blobs[k].data[...] = v.reshape(solver.net.blobs[k].data.shape)
        t = time.perf_counter()
        solver.step(1)
        times.append(time.perf_counter() - t)
    print(json.dumps(times), flush=True)
"""


class _Worker:
    """One solver in a subprocess, driven over stdin/stdout (ours or pycaffe)."""

    def __init__(self, who: str, solver: Path, weights: str | None, feed: Path, caffe_root: str | None):
        if who == "caffe":
            root = Path(caffe_root)
            python = root / "venv" / "bin" / "python"
            python = python if python.exists() else Path(sys.executable)
            code = _WORKER.format(import_caffe="import caffe")
            cmd = ["bash", "-c", 'source "$0/env.sh" && exec "$@"', str(root), str(python), "-c", code]
            env = dict(os.environ, GLOG_minloglevel="2")
        else:
            code = _WORKER.format(import_caffe="import amct_caffe.runtime as caffe")
            cmd = [sys.executable, "-c", code]
            env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd += [str(solver), weights or "-", str(feed)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)

    def run(self, k: int) -> list[float]:
        self.proc.stdin.write(f"{k}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"training worker died:\n{self.proc.stderr.read()[-3000:]}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def bench(name: str, iters: int, rounds: int, warmup: int, caffe_root: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        net, weights, feed = MODELS[name](tmp)
        (tmp / "net.prototxt").write_text(net)
        (tmp / "solver.prototxt").write_text(SOLVER.format(net=tmp / "net.prototxt"))
        np.savez(tmp / "feed.npz", **feed)
        who = ["ours"] + (["caffe"] if caffe_root else [])
        workers = {w: _Worker(w, tmp / "solver.prototxt", weights, tmp / "feed.npz", caffe_root) for w in who}
        times = {w: [] for w in who}
        try:
            for w in workers.values():
                w.run(warmup)
            per_round = [iters // rounds + (i < iters % rounds) for i in range(rounds)]
            for k in per_round:
                for w, worker in workers.items():
                    times[w] += worker.run(k)
        finally:
            for w in workers.values():
                w.close()
    row = {"model": name}
    for w, t in times.items():
        row[f"{w}_s"] = statistics.median(t)
        row[f"{w}_min_s"] = min(t)
    if caffe_root:
        row["ratio"] = row["ours_s"] / row["caffe_s"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=10, help="timed iterations per model and runtime")
    ap.add_argument("--rounds", type=int, default=2, help="alternations between ours and Caffe")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=None, help="BLAS threads for both runtimes")
    args = ap.parse_args(argv)
    if args.threads is not None and os.environ.get("OPENBLAS_NUM_THREADS") != str(args.threads):
        env = {**os.environ, **{v: str(args.threads) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                             "MKL_NUM_THREADS")}}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    caffe_root = os.environ.get("AMCT_REAL_CAFFE")
    rows = [bench(m, args.iters, max(1, min(args.rounds, args.iters)), args.warmup, caffe_root)
            for m in args.models.split(",")]
    head = f"{'model':<12} {'ours s/iter':>12} {'(min)':>8}"
    if caffe_root:
        head += f" {'caffe s/iter':>13} {'(min)':>8} {'ours/caffe':>10}"
    print(head)  # noqa: T201
    for r in rows:
        line = f"{r['model']:<12} {r['ours_s']:>12.4f} {r['ours_min_s']:>8.4f}"
        if caffe_root:
            line += f" {r['caffe_s']:>13.4f} {r['caffe_min_s']:>8.4f} {r['ratio']:>10.2f}"
        print(line)  # noqa: T201
    print(f"BLAS threads: {os.environ.get('OPENBLAS_NUM_THREADS', 'default (all cores)')}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
