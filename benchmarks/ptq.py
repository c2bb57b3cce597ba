"""The guide's PTQ flow end to end against the FP32 forwards of the same batches, in one run.

    python benchmarks/ptq.py [--model open_nsfw] [--batches 4]

create_quant_config -> init -> weights_quantize_model -> activation_quantize_model -> the calibration
model run by the executor on ``batches`` batches -> save_model, through the public API and files in a
temporary directory, as a user's script does. The FP32 forwards of the same batches (open_nsfw: 4
batches of 8 standard-normal images of fixed seed) are timed in the same process just before, twice:
in a fresh net (its load and first forward included) and again on warm memory; the
script prints them, the ratios, the time of each step and the process's peak resident memory,
against the weights' size plus the FP32 model's blobs of one batch (the issue's targets: 1.5x
and 2x).

Figures (2-core machine shared with other jobs; the load average in brackets):

* before (main, the same steps from a script run just before) [load 7.5]: 19.23 s end to end,
  3.26x its FP32 forwards of 5.90 s (calibration forwards 17.3 s), peak 1441 MiB;
* then (adaptive BLAS threads, folded chains, IFMR observer without the zeros, its search split
  over the free cores, the record read back without parsing) [load 7.6]: 8.29 s end to end, 5.78x
  its FP32 forwards of 1.43 s (calibration forwards 6.8 s), peak 1299 MiB. The FP32 forwards
  got faster than the calibration: the IFMR search (61 candidates over every nonzero value) and
  the copies of the observed values are most of what is left.
* now (streaming IFMR: a 2^14-bin histogram per layer filled by a vectorized kernel, the exact
  search only for layers of <= 65536 values; the calibration model written with its in-place
  layers, so it holds the float model's blobs and its chains fold; caffemodel blobs written from
  their bytes; the record's weight lines printed once; save_model's weight codes by the ARQ
  kernel), three rounds interleaved with main [load 4.2-4.9]: main 10.6 / 16.6 / 17.3 s end to
  end = 5.1x / 6.0x / 5.7x its FP32 forwards (calibration forwards 8.7 s in the first round),
  peak 1298 MiB; this branch 5.0 / 7.1 / 7.6 s = 2.6x / 2.3x / 2.5x (FP32 forwards 1.9 / 3.1 /
  3.1 s), peak 566-568 MiB = 1.95x the weights (23 MiB) plus the FP32 blobs of one batch
  (269 MiB). First round's steps: create_quant_config 0.16 s, init 0.11, weights_quantize_model
  0.29, activation_quantize_model 0.14, calibration Net 0.16, calibration forwards 3.72,
  save_model 0.44. What is left above the FP32 forwards is mostly the histogram fill (about 4 ns
  per observed value on this machine, 70 M values per batch) and the other steps' 1.3 s.
* then (the fill summed in chunks of 2^16 values taken by the free cores, an AVX-512 block that
  drops the zeros, the search eight candidates per register; the same output bytes), rounds
  interleaved with main [load 1.9-2.8]: adaptive threads, main 3.08 / 4.53 / 3.05 s end to end
  = 3.20x / 3.52x / 2.78x its FP32 forwards (calibration forwards 2.33 / 3.69 / 2.31 s), this
  branch 3.11 / 2.48 / 3.65 s = 3.76x / 2.22x / 4.40x (1.77-2.90 s); with OPENBLAS_NUM_THREADS=1,
  steadier, main 3.01 / 3.12 s = 2.97x / 3.50x (2.27 / 2.39 s), this branch 2.59 / 2.72 s =
  2.77x / 2.95x (1.83 / 1.98 s); peak 564-569 MiB in both. The fill takes 2.1 ns of CPU per
  value (was 3.9). What is left: the calibration model's convolutions run exact (no Winograd,
  so that records are Caffe's), about 0.3 s of CPU more than the FP32 forwards; the fill's
  0.6 s of CPU; the other steps' 0.9 s (prototxt parsing and printing, the record's text).
* then (the IFMR fills and last-batch searches on a worker thread while the forward goes on, when
  the BLAS threads leave a core; the same output bytes), OPENBLAS_NUM_THREADS=1, rounds interleaved
  with main: [load 2.2-2.4] main 2.76 / 2.76 / 3.02 s = 2.50x / 2.54x / 2.99x (calibration forwards
  2.00 / 2.01 / 2.27 s), this branch 2.09 / 2.04 / 2.45 s = 1.92x / 2.07x / 1.97x (1.28 / 1.29 /
  1.49 s); [load 4.0-4.2, no core left over] main 1.71x / 2.98x / 3.71x (1.95 / 2.12 / 2.79 s), this
  branch 3.70x / 2.37x / 2.64x (2.67 / 2.32 / 2.15 s): at that load the other processes hold the
  second core and the figures swing more than the overlap moves them (calibration forwards
  alternated in one process, overlap on / off, five rounds: 2.06-3.05 / 2.34-3.39 s, CPU 1.9-2.05 s
  both). Peak 562-569 MiB in both. The calibration model runs no Winograd in either fold mode (its
  BatchNorms are fused into the weights, and Winograd is only taken where a folded BatchNorm / Scale
  already gives up Caffe's bytes): ``fold="fast"`` gives it the same blobs, records and time.
* then (the steps around the forwards: caffemodels written from views of their weights instead of
  built and serialized, save_model's two models sharing each layer's ARQ codes, a prototxt parsed or
  printed before read back from its message, models printed layer by layer from kept layer texts, the
  record's scale_w lines printed together, files written on a worker thread while the call prepares
  the next; the same output bytes), OPENBLAS_NUM_THREADS=1, three rounds interleaved with main [load
  3.5-4.1, no core left over]: the steps outside the calibration forwards, main 1.16 / 1.21 / 0.99 s,
  this branch 0.77 / 0.75 / 0.49 s (create_quant_config 0.14 / 0.14 / 0.09, init 0.09 / 0.08 / 0.05,
  weights_quantize_model 0.18 / 0.18 / 0.12, activation_quantize_model 0.03, calibration Net 0.14 /
  0.15 / 0.09, save_model 0.19 / 0.17 / 0.11; main's 0.27, 0.11-0.15 and 0.24-0.37 for the three
  writing steps); end to end main 2.84x / 3.04x / 2.32x, this branch 2.45x / 2.49x / 2.52x (the
  calibration forwards, 2.0-3.5 s at this load, swing more than the steps move); two more rounds
  [load 2.5-3.1]: steps outside the forwards main 0.80 / 1.19 s, this branch 0.52 / 0.68 s
  (calibration forwards main 1.89 / 3.97 s, this branch 2.53 / 3.03 s). Peak 560 -> 519 MiB:
  no serialized model is held any more. What is left outside the forwards: reading the 23 MB
  caffemodel three times (create_quant_config, init, the calibration Net: 25-45 ms each), the config's
  generation and validation, the weight quantization, and the calibration Net's construction.
* then (the IFMR layers keep min(4096, 4k + 64) extremes, k the count their percentile reads, instead
  of 4096; the IFMR layers' record-sink lookups at Net build linear; the same output bytes),
  OPENBLAS_NUM_THREADS=1, CPU of the four calibration forwards with the fills on the main thread,
  three rounds interleaved with main [load 1.9-2.8]: main 2.50 / 2.09 / 2.04 s, now 1.89 / 1.98 /
  1.74 s (open_nsfw's 73 fills over the 4 batches 578-618 -> 450-455 ms); calibration Net 44-54 ->
  37-44 ms. End to end at load 1.3-1.4: main 1.84x / 2.00x, now 1.72x / 1.68x / 1.72x; at load
  1.5-2.0 the spare core is often taken and both swing between 1.9x and 3.1x. Peak 514-517 MiB.
  Not kept: Winograd in the calibration forwards (0.15-0.3 s of CPU less, but open_nsfw's scale_d
  move by up to 1.3e-6 relative, beyond the real-Caffe parity test's 1e-6) and a process-wide cache
  of the last float model loaded (init 0.05 -> 0.02 s, for a model held in memory for good). What
  is left for 1.5x: the IFMR fill (about 1.4 ns per observed value, 70 M per batch, hidden only
  when a core is free), the first calibration forward on fresh memory (0.1-0.3 s over a warm one)
  and the steps' 0.4-0.5 s (config generation and validation, fusion and ARQ, three model writes).
* then (every convolution path writing its top into its array of the last forward when only the blob
  holds it, in the FP32 and the calibration forwards alike; the same output bytes), OPENBLAS_NUM_THREADS=1,
  three runs [load 0.8-2.5]: FP32 forwards 0.86-0.90 s (0.92 s before, same load), PTQ end to end
  1.64-2.14 s = 1.91x / 2.00x / 2.39x (calibration forwards 1.18-1.68 s), steps 0.45 s; peak 514 -> 477
  MiB (1.64x the budget). The ratio grew because the FP32 forwards got faster: per batch of 8 the FP32
  forward takes 0.20-0.21 s, the calibration forward 0.24 s warm with its IFMR layers done, 0.37-0.45 s
  with the fill on the main thread, and the first one 0.1-0.25 s more. For 1.5x the four calibration
  forwards and the steps would have to fit in 1.5 x 0.82 = 1.23 s; the exact forwards alone take 0.98 s
  (no Winograd there: records equal to patched Caffe's).
* then (a calibration model allocates its blobs without numpy's huge-page hint, runtime/memory.py; folded
  chains write into the arrays the reshape made on the first forward too; this script imports the API
  module before the clock starts, as the FP32 side's modules are, and no longer echoes the library's
  INFO records through a root handler), OPENBLAS_NUM_THREADS=1, four runs each [load 0.5-0.9, a slower
  day: FP32 forwards 0.95-1.01 s]: 1.87-1.93x, against 2.22-2.37x with the hint kept
  (AMCT_NUMPY_HUGEPAGE=1); peak 477 MiB either way. An hour later, three rounds interleaved [load 0.9]:
  1.91x / 2.29x / 2.02x against 2.27x / 2.15x / 2.08x with the hint kept. With the hint, open_nsfw's
  first forward spent 1.1 s of system time faulting huge pages in on this virtual machine. In a faster
  hour [load 1.0], after the review fixes: FP32 forwards 0.79-0.85 s, PTQ 1.44-1.52 s = 1.80-1.85x
  (calibration forwards 1.08-1.14 s; steps create_quant_config 0.05, init 0.05, weights_quantize_model
  0.10-0.11, activation_quantize_model 0.03, calibration Net 0.05, save_model 0.10).
* then (calibration nets with streaming IFMR layers run Winograd, where its transformed weights are no
  larger than the layer's output, and the pointwise kernel on every convolution: runtime/fold.py's
  CALIBRATION; records within 8.4e-7 relative of the exact nets' on the shared models), alternated with the
  previous commit [load 0.5-0.9]: calibration forwards 1.24-1.42 -> 1.05-1.10 s, end to end 1.63-1.85 ->
  1.43-1.49 s; three more runs [load 1.3]: 1.92-2.19x the warm FP32 forwards. The script now also times the
  batches in a fresh net (its load and first forward included, what a script that only runs the float model
  pays): 0.99-1.40 s, PTQ 1.16-1.51x that. Peak 481 MiB. After the review fixes (fast kernels only where
  Caffe's arithmetic would run a column GEMM), alternated with the session's first commit [load 0.6-0.9]:
  2.10-2.27x -> 1.84-1.92x warm (PTQ 1.57-1.63 -> 1.35-1.37 s), 1.21-1.35x fresh.
* then (on a Zen 4 machine: calibration nets keep a layer's Winograd weights up to 4x the values of its input
  and output, so open_nsfw's 14x14 layers leave their 6-11 ms column GEMMs for 2.2-2.8 ms of Winograd; +17 MiB
  of peak) [load 1.0-1.3]: warm calibration forward 231 -> 213 ms (minimum, the two rules alternated in one
  process); end to end 1.85-2.14x the warm FP32 forwards (PTQ 1.45-1.66 s, FP32 0.77-0.78 s, calibration
  forwards 0.94-1.05 s), 1.00-1.51x fresh; peak 498 MiB = 1.71x.
* then (a calibration net's forward leaves a core to its IFMR worker while its layers still hand it work: at
  most cpus - 1 BLAS and C++ threads under the adaptive default, runtime/threads.leaving_a_core; with both
  cores the fills ran between the layers on the forward's thread), default threads, two rounds alternated with
  the commit before [load 0.5-1.0]: 2.25x / 2.21x -> 1.84x / 1.72x the warm FP32 forwards (PTQ 1.68 / 1.59 ->
  1.36 / 1.40 s, calibration forwards 1.21 / 1.19 -> 0.90 / 0.92 s); with OPENBLAS_NUM_THREADS=1 nothing
  changes (1.81x that day).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("AMCT_LOG_LEVEL", "ERROR")  # before amct_caffe configures its logging
from benchmarks.executor import MODELS  # noqa: E402


def _timed(times: dict, name: str, fn):
    start = time.perf_counter()
    result = fn()
    times[name] = time.perf_counter() - start
    return result


def run(model: str, batches: int) -> dict:
    import amct_caffe as amct
    import amct_caffe.api.calibration  # noqa: F401 - imported before the clock starts, as the FP32 side's modules are
    from amct_caffe.runtime import TEST, Net

    proto, weights, blob, shape = (str(v) if isinstance(v, Path) else v for v in MODELS[model])
    xs = [np.random.default_rng(i).standard_normal(shape).astype(np.float32) for i in range(batches)]
    start = time.perf_counter()  # a script that only runs the float model: load it, run the batches
    net = Net(proto, weights, TEST)
    for x in xs:
        net.forward(**{blob: x})
    fp32_fresh = time.perf_counter() - start
    start = time.perf_counter()  # the same batches again, on warm memory
    for x in xs:
        net.forward(**{blob: x})
    fp32 = time.perf_counter() - start
    activations_mib = sum(b.data.nbytes for b in net.blobs.values()) / 2**20  # every blob of one forward
    del net
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        start = time.perf_counter()
        _timed(times, "create_quant_config",
               lambda: amct.create_quant_config(str(t / "config.json"), proto, weights, batch_num=batches))
        graph = _timed(times, "init", lambda: amct.init(str(t / "config.json"), proto, weights, str(t / "record.txt")))
        mm, mw = str(t / "modified.prototxt"), str(t / "modified.caffemodel")
        _timed(times, "weights_quantize_model", lambda: amct.weights_quantize_model(graph, mm, mw))
        _timed(times, "activation_quantize_model", lambda: amct.activation_quantize_model(graph, mm, mw))
        calib = _timed(times, "calibration Net", lambda: Net(mm, mw, TEST))

        def forwards():
            for x in xs:
                calib.forward(**{blob: x})

        _timed(times, "calibration forwards", forwards)
        _timed(times, "save_model", lambda: amct.save_model(graph, "Both", str(t / "out" / model)))
        total = time.perf_counter() - start
    weights_mib = os.path.getsize(weights) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"fp32": fp32, "fp32_fresh": fp32_fresh, "total": total, "steps": times, "peak_mib": peak,
            "weights_mib": weights_mib, "batch_mib": xs[0].nbytes / 2**20, "activations_mib": activations_mib}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="open_nsfw", choices=sorted(MODELS))
    ap.add_argument("--batches", type=int, default=4)
    args = ap.parse_args(argv)
    load = os.getloadavg()[0]
    r = run(args.model, args.batches)
    print(f"{args.model}, {args.batches} batches [load {load:.1f} -> {os.getloadavg()[0]:.1f}]")  # noqa: T201
    print(f"  FP32 forwards {r['fp32']:.2f} s warm, {r['fp32_fresh']:.2f} s in a fresh net (its load and first "  # noqa: T201
          f"forward on fresh memory included); PTQ end to end {r['total']:.2f} s = {r['total'] / r['fp32']:.2f}x "
          f"warm, {r['total'] / r['fp32_fresh']:.2f}x fresh")
    for name, sec in r["steps"].items():
        print(f"    {name:<26} {sec:7.2f} s")  # noqa: T201
    budget = r["weights_mib"] + r["activations_mib"]
    print(f"  peak RSS {r['peak_mib']:.0f} MiB = {r['peak_mib'] / budget:.2f}x (weights {r['weights_mib']:.0f} MiB "  # noqa: T201
          f"+ the FP32 blobs of one batch {r['activations_mib']:.0f} MiB; input batch {r['batch_mib']:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
