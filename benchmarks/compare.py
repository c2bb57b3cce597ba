"""The accuracy report (compare_model) on a shared model, timed against the FP32 forwards of its batches.

    python benchmarks/compare.py [--model open_nsfw] [--batches 2]

The model is calibrated on its first batch (not timed); then ``compare_model`` compares the FP32 model
with the fake-quant model on ``batches`` batches (open_nsfw: batches of 8 standard-normal images of
fixed seed) and writes the report (JSON, HTML, PNG plots) into a temporary directory. Prints the wall
time of the whole call, of the report writing within it, and of the FP32 forwards of the same batches
run by a plain Net in the same process just before (a warm-up forward untimed).

Figures (2-core machine, OPENBLAS_NUM_THREADS=1, open_nsfw, 2 batches of 8; FP32 forwards of the two
batches 0.45-0.5 s):

* before (main of 2026-12-06, 1967818: per-blob statistics in NumPy float64 copies, histograms drawn
  as bars, a forward run again for the plots, numpy's huge-page hint on the report's nets), three runs
  interleaved with the code below: 14.85-15.47 s end to end, the report 4.09-4.26 s of it;
* now (one C++ pass per blob pair for the statistics, csrc/src/blob_stats.cpp; the fake-quant layers
  vectorized and writing into their tops; histograms drawn as one step outline; the plots from the
  last batch compared; the report's nets without the huge-page hint, runtime/memory.py): 7.31-9.25 s,
  the report 2.81-3.23 s of it. Most of what is left: the two SSA nets' first forwards on fresh memory
  (767 MiB of blobs in the FP32 one, 1041 MiB in the fake-quant one, of which the 122 blobs compared
  are 415 MiB), and matplotlib laying out the nine plots.
* now (the report's nets keep only the compared blobs, the inputs and the outputs readable: the float
  model's in-place layers write over the values nobody compares, and their chains fold with the bytes
  of the separate layers; the same report), three runs interleaved with the code before [load 0.3-0.6,
  FP32 forwards 0.39-0.47 s]: 5.04-5.31 s -> 4.70-5.00 s, peak RSS 1846-1849 -> 1479-1482 MiB (the FP32
  net's blobs 767 -> 420 MiB).
* now (those nets also let go of each value no one reads after the forward once its last reader has
  run, runtime/release.py: the fake-quant net holds 422 MiB after a forward instead of 777), three runs
  interleaved with the code before on a 2-core AMD EPYC machine: 6.69-8.00 s against 6.01-7.53 s (the
  report's files alone swing by 1.4 s), peak RSS 1479-1485 -> 1296-1305 MiB.
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


def run(model: str, batches: int) -> dict:
    import amct_caffe.api.accuracy as accuracy
    from amct_caffe.api.workflow import calibrate
    from amct_caffe.runtime import TEST, Net

    proto, weights, blob, shape = (str(v) if isinstance(v, Path) else v for v in MODELS[model])
    feeds = [{blob: np.random.default_rng(i).standard_normal(shape).astype(np.float32)} for i in range(batches)]
    net = Net(proto, weights, TEST)
    net.forward(**feeds[0])  # warm-up
    start = time.perf_counter()
    for feed in feeds:
        net.forward(**feed)
    fp32 = time.perf_counter() - start
    del net
    times = {}
    write_report = accuracy.write_report

    def timed_report(*args, **kwargs):
        t = time.perf_counter()
        try:
            return write_report(*args, **kwargs)
        finally:
            times["report"] = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as tmp:
        q = calibrate(proto, weights, feeds[:1], str(Path(tmp) / "q" / model), 1, progress=False)
        accuracy.write_report = timed_report
        try:
            start = time.perf_counter()
            accuracy.compare_model(proto, weights, q["fake_quant_model"], q["fake_quant_weights"], feeds,
                                   str(Path(tmp) / "report"), batch_num=batches, progress=False)
            total = time.perf_counter() - start
        finally:
            accuracy.write_report = write_report
    return {"fp32": fp32, "total": total, "report": times.get("report", float("nan")),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="open_nsfw", choices=sorted(MODELS))
    ap.add_argument("--batches", type=int, default=2)
    args = ap.parse_args(argv)
    load = os.getloadavg()[0]
    r = run(args.model, args.batches)
    print(f"{args.model}, {args.batches} batches [load {load:.1f} -> {os.getloadavg()[0]:.1f}]")  # noqa: T201
    print(f"  FP32 forwards {r['fp32']:.2f} s; compare_model {r['total']:.2f} s = {r['total'] / r['fp32']:.1f}x "  # noqa: T201
          f"(the report's files {r['report']:.2f} s of it); peak RSS {r['peak_mib']:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
