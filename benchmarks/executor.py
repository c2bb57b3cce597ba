"""FP32 forward time of the embedded executor, and of real Caffe when ``AMCT_REAL_CAFFE`` is set.

    python benchmarks/executor.py [--runs 12] [--rounds 3] [--warmup 2] [--threads N]
                                  [--models open_nsfw,ultraface_slim320]

Models (from ../shared/models): open_nsfw at batch 8 x 3 x 224 x 224 and UltraFace slim-320 at
1 x 3 x 240 x 320 by default; ``--models all`` adds the other shared models with weights (UltraFace
RFB-320, the HyperLPR MiniNet-SSD, LeNet, MTCNN's four nets; SqueezeNet v1.1 at batch 2 and MobileNet-v2 with the
seeded random weights of ../shared/golden) at their prototxt's input shape, and
MTCNN's nets as the detector runs them (P-Net on a 240 x 320 pyramid level, R-, O- and L-Net on
batches of candidate faces). Each is fed a standard-normal input of fixed seed. Reported time is the median
(and the minimum) wall time of ``forward()`` over ``runs`` runs after ``warmup`` untimed runs.

``AMCT_REAL_CAFFE`` names a Caffe build root made by ``../shared/tools/build_caffe.sh`` (its
``env.sh`` sets PYTHONPATH). pycaffe then runs the same prototxt, weights and input in a
subprocess (its ``caffe_pb2`` must not meet ours in one process) and the script prints Caffe's
times, the ratio ours / caffe of the medians, and the largest difference between the outputs.
The runs are split into ``rounds`` that alternate between the two, so that a load change on a
shared machine hits both alike.

``--threads N`` pins the BLAS thread count of both (OPENBLAS_NUM_THREADS / OMP_NUM_THREADS,
set before numpy loads, by re-executing the script). Without it each side uses its BLAS
default: all cores for Caffe, the cores other processes leave free for the executor
(``amct_caffe/runtime/threads.py``). On an oversubscribed machine that matters a lot: numpy's
bundled OpenBLAS threads degrade far more than Debian's under contention, so compare at
``--threads 1`` there.

The last line says which of the executor's vector kernels the CPU runs (AVX-512, AVX2 or portable):
the ratios differ much between them (docs/performance.md). ``AMCT_SIMD=avx2`` (``portable``) caps them,
and ``OPENBLAS_CORETYPE=Haswell`` makes both numpy's and Caffe's OpenBLAS run their AVX2 kernels: together
they show on an AVX-512 CPU what a CPU without AVX-512 runs (on Zen 4, which splits 512-bit operations in
two, at about the same speed per instruction as AVX2 code; not how an Intel AVX2 CPU would time it).

``--fold off,exact,fast`` times the executor in several fold modes (``amct_caffe/runtime/fold.py``;
``off`` is the executor before in-place chains were folded), interleaved with Caffe.

The ratio "cpu" divides the medians of the CPU time (``time.process_time``) of each forward: on a
loaded machine a process waits for a core for much of a forward's wall time (measured at load 4-5
on 2 cores: half of it), and that wait is the other processes' doing; with one BLAS thread on each
side the CPU time is the work each does.

Figures (ours / caffe, medians of interleaved runs; the load average during the run in brackets):

* in-place BatchNorm/Scale/ReLU chains folded into the convolutions, ``--threads 1`` [load 12]:
  open_nsfw b8 off 0.97, exact 0.79, fast (the float default) 0.72;
* depthwise convolutions in C++, ``--threads 1`` [load 10]: UltraFace slim-320 b1 1.16 -> 0.70 (the
  per-layer kernel is 4-6x faster than the NumPy products);
* everything, against the code before (main, run just before in the same conditions):
  ``--threads 1`` [load 11]: open_nsfw 1.01 -> 0.70, UltraFace 1.10 -> 0.71; default threads
  [load 8-11]: open_nsfw 4.86 -> 0.67, UltraFace 8.04 -> 0.38 (before, numpy's BLAS kept both cores
  under load; Caffe's does too, which flatters the last figure).
* more of the forward in C++ (im2col, MAX pooling, the fold epilogues, residual sum + ReLU), Winograd
  F(4x4 / 2x2, 3x3) in FAST chains, short-K convolutions without columns, against main run just
  before, ``--threads 1``, CPU-time ratios (wall-time ratios swung by +-0.1 to +-0.4 between runs
  at this load) [load 4.1-4.4, two runs each]: open_nsfw FAST 0.74 / 0.70 -> 0.54 / 0.56 (EXACT
  0.73 / 0.74, unfolded 0.90 / 0.93); UltraFace 0.70 / 0.62 -> 0.60 / 0.58 (100 runs: 0.62 / 0.66
  -> 0.56 / 0.58; this model has no BatchNorm: every fold mode is the same); on a quieter machine
  [load 2.1], wall (CPU): open_nsfw 0.68 (0.67) -> 0.53 (0.53), UltraFace 0.67 (0.67) -> 0.59 (0.60).
  Per lever, in-net CPU
  time with / without, alternating forwards [load 4-5.5]: Winograd 0.89, C++ MAX pooling 0.96, C++
  epilogue 0.96, residual sum in the chain's pass 0.98, C++ im2col 0.99, wide 1x1 GEMMs 0.98-1.0
  (open_nsfw); direct short-K convolutions 0.89 (UltraFace), 0.99 (open_nsfw).
  ``--models all`` [load 4]: UltraFace RFB-320 0.64, MiniNet-SSD 0.63, LeNet 0.69, MTCNN as the
  detector runs it 0.56-0.66; MTCNN's nets on one 12x12 / 24x24 input stay slower than Caffe (P-Net
  12x12 11.6x, R-Net 1.4x, L-Net 1.5x, CPU; main 14.9x, 1.8x, 1.6x): Caffe runs such a layer in
  about a microsecond, the executor's Python costs 10-20 us per layer.
* prepared forward steps (runtime/forward.py: per-layer parameters parsed, convolution plans and GEMM
  decisions made once per input shape), PReLU in one vectorized C++ pass, direct convolutions for
  spatial kernels up to K = 256, the folded epilogue in the direct kernel, Softmax over a short last
  axis from slices; ``--models all``, two rounds each interleaved with main [load 3.1-3.3], wall (CPU
  within 0.02): open_nsfw 0.53-0.54 -> 0.49-0.50, UltraFace slim-320 0.58-0.61 -> 0.48-0.50, RFB-320
  0.67 -> 0.50-0.53, MiniNet-SSD 0.64-0.65 -> 0.53-0.59, LeNet 0.65-0.66 -> 0.67, MTCNN as the detector
  runs it 0.51-0.62 -> 0.16-0.38; on one small input P-Net 12.4 -> 4.4-4.8x, R-Net 1.36-1.42 ->
  0.56-0.58, O-Net 0.74 -> 0.36-0.43, L-Net 1.41-1.54 -> 0.77-0.78. Per lever (CPU time of
  alternating forwards): the steps and plans UltraFace 8.3-8.5 -> 6.6-7.2 ms, P-Net 12x12 0.23 -> 0.10
  ms; direct conv_1 open_nsfw 254 -> 230 ms, P-Net 240x320 11.2 -> 7.7 ms; the PReLU kernel L-Net
  2.2 -> 1.2 ms (both), Softmax UltraFace 0.39 -> 0.11 ms of the scores layer. Not kept: the
  convolution kernels also writing an out-of-place ReLU's top as they store (UltraFace 9.2 -> 11.5 ms:
  that ReLU reads its input from cache anyway, and the second store stream slowed the direct kernel).
* small convolutions whole in one C++ call (numpy's own sgemm, called as ``np.matmul`` calls it), a run
  of them and the MAX pooling between in one call, an in-place PReLU folded into its convolution's chain;
  ``--models all``, 40 runs in 4 rounds, main then the branch twice [load 1.0-1.1], wall (CPU within
  0.01): P-Net 12x12 5.46 -> 1.54 / 1.57 (29 us, Caffe 19 us); the others unchanged within the noise
  (open_nsfw 0.49 -> 0.50 / 0.50, UltraFace slim-320 0.44 -> 0.43 / 0.42, RFB-320 0.46 -> 0.47 / 0.46,
  MiniNet-SSD 0.58 -> 0.55 / 0.55, LeNet 0.70 -> 0.66 / 0.65, R-Net 0.62 -> 0.63 / 0.56, O-Net 0.44 ->
  0.43 / 0.40, L-Net 0.78 -> 0.80 / 0.74, the detector's shapes 0.15-0.39 -> 0.14-0.35). Per lever, P-Net
  12x12, one BLAS thread: prepared GEMM calls with their own columns, the PReLU fold and a shorter
  Net.forward, main vs branch alternating, 72 -> 43 us [load 4.1-4.3]; then one C++ call per small
  convolution and per run, 103 (main, in that run) -> 29 us [load 4.5]; the run's one call against its
  ops' separate calls, alternating, 34.4 -> 29.4 us [load 0.6-1.0]. Not kept: a prepared Softmax (the
  same ufuncs called directly, exp and the division in place): 29.42 against 29.35 us.
* the P-Net run bound to its Blobs (tops rewritten in place when no one holds them, each array checked in
  a few loads), Softmax in one C++ pass with glibc's expf and inside that run; ``--models all``, 40 runs
  in 4 rounds, main, the branch, the branch, main [load 2.0-2.7], wall (CPU within 0.01 but where
  noted): P-Net 12x12 1.54 / 1.47 -> 0.65 / 0.71 (main 26.8-27.3 us, branch 13.0-15.1 us, Caffe 17.4-23.2
  us); the others within the noise of this load: open_nsfw 0.49 / 0.49 -> 0.49 / 0.50, UltraFace
  slim-320 0.37 / 0.40 -> 0.42 / 0.43 and RFB-320 0.37 / 0.41 -> 0.44 / 0.44 (interleaved CPU time of
  the forward, 8 pairs: the same within 0.1 ms in 7, its Softmax 45 -> 43 us), MiniNet-SSD 0.51 / 0.54 ->
  0.55 / 0.55, LeNet 0.64 / 0.63 -> 0.72 (cpu 0.66) / 0.65, R-Net 0.52 / 0.56 -> 0.47 / 0.48, O-Net 0.40 /
  0.40 -> 0.42 / 0.39, L-Net 0.71 / 0.73 -> 0.78 (cpu 0.73) / 0.68, the detector's shapes 0.14-0.36 ->
  0.14-0.46 (R-Net b32 0.32 / 0.46 in the two branch runs). The outputs of UltraFace, MiniNet-SSD and
  MTCNN P-, R-, O-Net are now Caffe's bit for bit (max|diff| 0). Per lever, P-Net 12x12 alone, one BLAS
  thread, 3 x 10 rounds of 2000 forwards interleaved [load 2.0-2.2]: main 27.5-29.1 us; the bound run
  with the Softmax kernel as its own step 14.7-15.3 us; the Softmax inside the run 12.5-15.0 us. Left:
  ~10.5 us in the one call (about 2 us of it numpy's sgemm), ~1.3 us of Net.forward.
* 3x3 depthwise convolutions at column stride 1 and 2, sixteen outputs per AVX-512 register (taps in
  the same order; at stride 2 gathered by permutes; the same bytes): kernel alone, one thread, stride 1
  16x120x160 0.28 -> 0.17 ms, 128x15x20 0.09 -> 0.03; stride 2 32x120x160 0.33 -> 0.19 ms; UltraFace
  slim-320 forward interleaved with the build before [load 2-2.5] 6.2-7.3 -> 4.6-5.6 ms. ``--models
  all``, 24 runs in 4 rounds, after every merge of the session [load 0.6-0.9]: open_nsfw 0.50 (cpu
  0.51), UltraFace slim-320 0.37, RFB-320 0.39, MiniNet-SSD 0.55, LeNet 0.66, P-Net 12x12 0.73, R-Net
  0.49, O-Net 0.43, L-Net 0.71, the detector's shapes 0.16-0.36. Measured and not kept: MAX pooling's
  stride-2 columns gathered by AVX-512 permutes (open_nsfw's pool1 alone 2.65 -> 2.90 ms: the AVX2
  loop is as fast; in the net the layer takes 5 ms from memory traffic, not arithmetic), direct
  convolution blocks of 48 pixels (the templated loop spilled its accumulators: 2-3x slower), and
  process-wide malloc / transparent-huge-page settings (open_nsfw within the noise on a quiet machine).
* Every convolution path (direct, depthwise, Winograd, column GEMM, 1x1, 1x1 over the images side by
  side), the residual and Eltwise + ReLU kernels and the threaded MAX pooling write their top into its
  array of the last forward when only the blob holds it (fresh memory: a page fault per 4 KB, and on
  open_nsfw's 25 MiB conv_1 top sometimes a wait for huge-page compaction): open_nsfw batch 8 rewrites
  all of its 268 MiB of blobs in place on a prepared forward (minor faults per forward 188 -> 0-2 on
  most forwards; its conv_1 step 19.8 -> 18 ms on average); the same bytes on every blob. Interleaved
  with the code before, two rounds each, 16 runs in 4 rounds [load 1.9-2.4, another process on one
  core]: open_nsfw 0.49 / 0.49 -> 0.48 / 0.47-0.49 (204-216 -> 192-211 ms), UltraFace slim-320 0.39 /
  0.36 -> 0.36 / 0.37: the gain is within the noise of that load but the slow outliers go. ``--models
  all``, 16 runs in 4 rounds [load 2.1]: open_nsfw 0.48, UltraFace slim-320 0.35, RFB-320 0.39,
  MiniNet-SSD 0.49, LeNet 0.62, P-Net 12x12 0.70, R-Net 0.46, O-Net 0.42, L-Net 0.67, the detector's
  shapes 0.14-0.35.
* On an AVX-512 AMD CPU (Zen 4), where this run started at open_nsfw 0.56 (225 ms, Caffe 399 ms) and
  UltraFace slim-320 0.49 [load 1.4]: the Winograd transforms sixteen tiles per AVX-512 vector (gathered
  across rows and images on narrow maps, then F(4x4) on every map), a pointwise kernel for FAST chains'
  1x1 convolutions with the folded map in its stores, the direct kernel's 8 x 48 register blocks, and
  conv3x3 in cache-sized chunks of images; ``--models all``, two runs [load 0.6-1.1]: open_nsfw 0.49 /
  0.51 (179 / 186 ms against 363 / 365), UltraFace slim-320 0.50 / 0.50, RFB-320 0.54 / 0.57, MiniNet-SSD
  0.57 / 0.60, LeNet 0.69 / 0.70, MTCNN 0.17-0.88 (R-Net 1.08 in one run: median 0.21 ms, minimum 0.15).
  Then out-of-place ReLUs in one C++ pass (NumPy's maximum keeps NaNs by a 3x slower loop) and the
  pointwise kernel's L2 requests [load 1.2]: open_nsfw 0.50 (180 ms, minimum 165), UltraFace slim-320
  0.44, RFB-320 0.51, MiniNet-SSD 0.60, LeNet 0.73, MTCNN 0.18-0.95; the default two models [load 1.0]:
  open_nsfw 0.47 (168 ms against 358), UltraFace slim-320 0.43. Each lever's figure, and those measured and
  not kept, in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "models"
MODELS = {
    "open_nsfw": (SHARED / "open_nsfw/deploy.prototxt", SHARED / "open_nsfw/resnet_50_1by2_nsfw.caffemodel",
                  "data", (8, 3, 224, 224)),
    "ultraface_slim320": (SHARED / "ultraface_slim320/slim-320.prototxt",
                          SHARED / "ultraface_slim320/slim-320.caffemodel", "input", (1, 3, 240, 320)),
    # the other shared models (``--models all``), at their prototxt's input shape
    "ultraface_rfb320": (SHARED / "ultraface_rfb320/RFB-320.prototxt", SHARED / "ultraface_rfb320/RFB-320.caffemodel",
                         "input", (1, 3, 240, 320)),
    "mininet_ssd": (SHARED / "hyperlpr_mininet_ssd/mininet_ssd_v1.prototxt",
                    SHARED / "hyperlpr_mininet_ssd/mininet_ssd_v1.caffemodel", "data", (1, 3, 512, 512)),
    "lenet": (SHARED / "lenet_mnist/lenet.prototxt", SHARED / "lenet_mnist/lenet_iter_10000.caffemodel", "data",
              (64, 1, 28, 28)),
    **{f"mtcnn_det{i}": (SHARED / f"mtcnn/det{i}.prototxt", SHARED / f"mtcnn/det{i}.caffemodel", "data", shape)
       for i, shape in ((1, (1, 3, 12, 12)), (2, (1, 3, 24, 24)), (3, (1, 3, 48, 48)), (4, (1, 15, 24, 24)))},
    # the shared prototxts that ../shared/golden gives seeded random weights
    "squeezenet_v1.1": (SHARED / "prototxt_only/SqueezeNet_v1.1_deploy.prototxt",
                        SHARED.parent / "golden/squeezenet_v1.1_random.caffemodel", "data", (2, 3, 227, 227)),
    "mobilenet_v2": (SHARED / "prototxt_only/mobilenet_v2_deploy.prototxt",
                     SHARED.parent / "golden/mobilenet_v2_random.caffemodel", "data", (1, 3, 224, 224)),
    # ... and as MTCNN runs them: P-Net on a pyramid level, the others on a batch of candidate faces
    **{f"mtcnn_det{i}_{tag}": (SHARED / f"mtcnn/det{i}.prototxt", SHARED / f"mtcnn/det{i}.caffemodel", "data", shape)
       for i, tag, shape in ((1, "240x320", (1, 3, 240, 320)), (2, "b32", (32, 3, 24, 24)),
                             (3, "b16", (16, 3, 48, 48)), (4, "b16", (16, 15, 24, 24)))},
}
TARGETS = ("open_nsfw", "ultraface_slim320")  # the default --models
SEED = 0
_LOG = logging.getLogger("benchmark")

# The pycaffe worker: argv = prototxt weights input_blob input.npy outputs.npz. Each stdin line
# "k" asks for k timed forwards (answered by one JSON list of seconds); EOF ends it.
_CAFFE_WORKER = r"""
import json, sys, time
import numpy as np
import caffe
proto, weights, blob, xfile, out = sys.argv[1:6]
caffe.set_mode_cpu()
x = np.load(xfile)
net = caffe.Net(proto, weights, caffe.TEST)
net.blobs[blob].reshape(*x.shape)
net.reshape()
for line in sys.stdin:
    times = []
    for _ in range(int(line)):
        net.blobs[blob].data[...] = x
        t, c = time.perf_counter(), time.process_time()
        net.forward()
        times.append((time.perf_counter() - t, time.process_time() - c))
    print(json.dumps(times), flush=True)
np.savez(out, **{k: net.blobs[k].data for k in net.outputs})
"""


class _Ours:
    def __init__(self, name: str, x: np.ndarray, fold: str = "auto"):
        sys.path.insert(0, str(REPO))
        from amct_caffe.runtime import TEST, Net

        proto, weights, self.blob, _ = MODELS[name]
        self.x = x
        self.net = Net(str(proto), str(weights), TEST, fold=fold)
        self.net.blobs[self.blob].reshape(*x.shape)
        self.net.reshape()

    def run(self, k: int) -> list[tuple[float, float]]:
        times = []
        for _ in range(k):
            self.net.blobs[self.blob].data[...] = self.x
            t, c = time.perf_counter(), time.process_time()
            self.net.forward()
            times.append((time.perf_counter() - t, time.process_time() - c))
        return times

    def outputs(self) -> dict:
        return {k: self.net.blobs[k].data.copy() for k in self.net.outputs}


class _Caffe:
    """pycaffe in a subprocess (sourcing ROOT/env.sh), driven over stdin/stdout."""

    def __init__(self, root: Path, name: str, x: np.ndarray, tmp: Path):
        proto, weights, blob, _ = MODELS[name]
        python = root / "venv" / "bin" / "python"
        python = python if python.exists() else Path(sys.executable)
        np.save(tmp / "x.npy", x)
        self.out = tmp / "out.npz"
        cmd = ["bash", "-c", 'source "$0/env.sh" && exec "$@"', str(root), str(python), "-c", _CAFFE_WORKER,
               str(proto), str(weights), blob, str(tmp / "x.npy"), str(self.out)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def run(self, k: int) -> list[tuple[float, float]]:
        self.proc.stdin.write(f"{k}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"pycaffe worker died:\n{self.proc.stderr.read()[-3000:]}")
        return [tuple(t) for t in json.loads(line)]

    def outputs(self) -> dict:
        self.proc.stdin.close()
        if self.proc.wait() != 0:
            raise RuntimeError(f"pycaffe worker failed:\n{self.proc.stderr.read()[-3000:]}")
        with np.load(self.out) as z:
            return {k: z[k] for k in z.files}


def _progress(n: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # fall back to one log line per round
        return None
    return tqdm(total=n, desc=desc, leave=False, unit="run")


def bench(name: str, runs: int, rounds: int, warmup: int, caffe_root: str | None, folds=("auto",)) -> dict:
    shape = MODELS[name][3]
    x = np.random.default_rng(SEED).standard_normal(shape).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        runners = {("ours" if f == "auto" else f"ours_{f}"): _Ours(name, x, f) for f in folds}
        if caffe_root:
            runners["caffe"] = _Caffe(Path(caffe_root), name, x, Path(tmp))
        times = {k: [] for k in runners}
        for r in runners.values():
            r.run(warmup)
        bar = _progress(runs * len(runners), name)
        per_round = [runs // rounds + (i < runs % rounds) for i in range(rounds)]
        for i, k in enumerate(per_round):
            for who, r in runners.items():
                times[who] += r.run(k)
                if bar is not None:
                    bar.update(k)
            if bar is None:
                _LOG.info("%s: round %d/%d done", name, i + 1, rounds)
        if bar is not None:
            bar.close()
        outs = {who: r.outputs() for who, r in runners.items()}
    row = {"model": name, "input": "x".join(map(str, shape))}
    for who, t in times.items():
        row[f"{who}_ms"] = 1e3 * statistics.median(w for w, _ in t)
        row[f"{who}_min_ms"] = 1e3 * min(w for w, _ in t)
        row[f"{who}_cpu_ms"] = 1e3 * statistics.median(c for _, c in t)
    if caffe_root:
        for who in times:
            if who != "caffe":
                row[f"ratio{who[4:]}"] = row[f"{who}_ms"] / row["caffe_ms"]
                row[f"cpu_ratio{who[4:]}"] = row[f"{who}_cpu_ms"] / row["caffe_cpu_ms"]
                row[f"max_abs_diff{who[4:]}"] = max(float(np.max(np.abs(outs[who][k] - outs["caffe"][k])))
                                                    for k in outs["caffe"])
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=12, help="timed runs per model and executor")
    ap.add_argument("--rounds", type=int, default=3, help="alternations between ours and Caffe")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--models", default=",".join(TARGETS), help="comma-separated, or 'all' (every shared model)")
    ap.add_argument("--threads", type=int, default=None, help="BLAS threads for both executors")
    ap.add_argument("--fold", default="auto", help="the executor's fold modes to time, comma-separated "
                    "(auto, fast, exact, off: see amct_caffe/runtime/fold.py); 'off' is the executor before folding")
    args = ap.parse_args(argv)
    if args.threads is not None and os.environ.get("OPENBLAS_NUM_THREADS") != str(args.threads):
        # BLAS reads its thread count when numpy loads: start over with the variables set
        env = {**os.environ, **{v: str(args.threads) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                             "MKL_NUM_THREADS")}}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    caffe_root = os.environ.get("AMCT_REAL_CAFFE")
    folds = tuple(args.fold.split(","))
    names = list(MODELS) if args.models == "all" else args.models.split(",")
    rows = [bench(name, args.runs, max(1, min(args.rounds, args.runs)), args.warmup, caffe_root, folds)
            for name in names]
    print(f"load average {os.getloadavg()[0]:.1f} at the end")  # noqa: T201
    def ms(v: float) -> str:  # (a net that runs in microseconds keeps three digits)
        return f"{v:.1f}" if v >= 1 else f"{v:.4f}"

    for r in rows:
        ours = [k[:-3] for k in r if k.startswith("ours") and k.endswith("_ms")
                and not k.endswith(("min_ms", "cpu_ms"))]
        for who in ours:
            line = (f"{r['model']:<20} {r['input']:<14} {who:<11} {ms(r[who + '_ms']):>9} ms"
                    f" (min {ms(r[who + '_min_ms'])})")
            if caffe_root:
                tag = who[4:]
                line += (f"  caffe {ms(r['caffe_ms'])} ms (min {ms(r['caffe_min_ms'])})"
                         f"  ours/caffe {r['ratio' + tag]:.2f} (cpu {r['cpu_ratio' + tag]:.2f})"
                         f"  max|diff| {r['max_abs_diff' + tag]:.2e}")
            print(line)  # noqa: T201
    print(f"BLAS threads: {os.environ.get('OPENBLAS_NUM_THREADS', 'default (all cores)')}; "  # noqa: T201
          f"vector kernels: {_vector_width()}")
    if not caffe_root:
        print("(set AMCT_REAL_CAFFE=<caffe build root> to compare with real Caffe)")  # noqa: T201
    return 0


def _vector_width() -> str:
    """Which of the executor's vector kernels this CPU runs: the figures differ much between the two."""
    try:
        from amct_caffe import _kernels
    except ImportError:
        return "none (the extension is not built)"
    return {2: "AVX-512", 1: "AVX2 (no AVX-512 kernels)"}.get(_kernels.simd_level(), "portable")


if __name__ == "__main__":
    sys.exit(main())
