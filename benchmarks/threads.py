"""FP32 forward time under CPU contention: BLAS threads fixed at the library default, pinned to 1,
and adapted to the load (the executor's default, ``runtime/threads.py``).

    python benchmarks/threads.py [--model ultraface_slim320] [--runs 6] [--hogs 0,1,2]

For each number of busy-looping processes started beside it (``--hogs``), the script runs the
model's forward ``runs`` times in each mode, interleaved, and prints the median times and the
ratio of each mode to the fastest one. Other work on the machine adds to the hogs: the load
average is printed with each row.

Measured on the 2-core development machine (Xeon, AVX-512), ultraface_slim320 batch 1, medians
in ms and the ratio to the fastest mode (load average at the start of the row in brackets; other
engineers' jobs ran too):

    hogs 0 [load 6.8]: default 361.6 (7.20)  pinned-1  50.4 (1.00)  adaptive  50.2 (1.00)
    hogs 1 [load 7.2]: default 565.5 (6.61)  pinned-1  88.6 (1.04)  adaptive  85.5 (1.00)
    hogs 2 [load 7.6]: default 647.8 (4.62)  pinned-1 140.3 (1.00)  adaptive 162.3 (1.16)

Before this change the executor ran "default" (all cores whatever the load); open_nsfw batch 8
took 6045 ms that way against 1578 ms pinned to one thread beside two busy processes.

On the AVX-512 AMD machine (Zen 4, 2026-12-07), two runs [load 0.9-1.3]: adaptive / pinned-1 1.05-1.07
(hogs 0), 1.02-1.04 (hogs 1), 1.23-1.45 (hogs 2); default 11-15x beside one or two hogs. With two hogs
both modes run one thread and the gap follows the position in the interleaving, not the mode: in a run
with an extra mode between them, pinned-1 read 13.4 ms and adaptive 9.6 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.executor import MODELS, SEED  # noqa: E402

_HOG = "while True: pass"


def _forward_times(net, blob, x, runs: int) -> dict[str, list[float]]:
    """Times of ``runs`` forwards per mode, the modes interleaved run by run.

    The adaptive mode starts each run from the library default; every mode sleeps one look's
    interval before its run, so that the adaptive mode's look sees the other processes only (as
    in a long calibration, where the forwards follow one another).
    """
    from amct_caffe.runtime import threads

    net.forward(**{blob: x})  # builds the adaptive state
    state = threads._auto  # noqa: SLF001
    if not state:
        raise SystemExit("adapting does not apply here (one CPU, OPENBLAS_NUM_THREADS set, or no /proc/stat)")
    times = {"default": [], "pinned-1": [], "adaptive": []}
    for _ in range(runs):
        for mode, t in times.items():
            if mode == "default":  # the behaviour before: the library default, no adapting
                threads._auto = False  # noqa: SLF001
                state.restore()
            elif mode == "pinned-1":
                threads._auto = state  # noqa: SLF001
                threads.set_num_threads(1)
            else:
                threads.set_num_threads(None)
            time.sleep(threads.INTERVAL)  # every mode alike (a sleeping process wakes with priority)
            start = time.perf_counter()
            net.forward(**{blob: x})
            t.append(time.perf_counter() - start)
    threads.set_num_threads(None)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ultraface_slim320", choices=sorted(MODELS))
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--hogs", default="0,1,2", help="numbers of busy processes to run beside, comma-separated")
    args = ap.parse_args(argv)
    from amct_caffe.runtime import TEST, Net

    proto, weights, blob, shape = MODELS[args.model]
    x = np.random.default_rng(SEED).standard_normal(shape).astype(np.float32)
    net = Net(str(proto), str(weights), TEST)
    net.forward(**{blob: x})
    print(f"{args.model} {'x'.join(map(str, shape))}: median ms (ratio to the fastest mode)")  # noqa: T201
    for hogs in (int(h) for h in args.hogs.split(",")):
        procs = [subprocess.Popen([sys.executable, "-c", _HOG]) for _ in range(hogs)]
        try:
            time.sleep(1.0)
            load = os.getloadavg()[0]
            times = _forward_times(net, blob, x, args.runs)
        finally:
            for p in procs:
                p.kill()
                p.wait()
        med = {m: 1e3 * statistics.median(t) for m, t in times.items()}
        best = min(med.values())
        cells = "  ".join(f"{m} {v:7.1f} ({v / best:.2f})" for m, v in med.items())
        print(f"  hogs {hogs} [load {load:.1f}]: {cells}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
