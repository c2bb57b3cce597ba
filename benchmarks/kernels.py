"""Kernel versus NumPy reference timings for the issue-3 workloads.

    python benchmarks/kernels.py [--ifmr-size 10000000] [--repeat 3] [--skip-slow-reference]

Prints, per workload, the best-of-``repeat`` kernel time, one reference time, their ratio and
whether both chose the same result; for IFMR also the effective throughput (values per second
and candidate evaluations per second). Single-threaded (the kernels use one core).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

from amct_caffe import _kernels
from amct_caffe.quant import IfmrParams, arq_quantize_weight, ifmr_search, snq_quantize_weight


CPU_TIMES: list[float] = []


def best_of(fn, repeat: int) -> tuple[float, object]:
    """Best wall time of ``repeat`` runs; the matching process CPU time goes to CPU_TIMES[-1].

    On a shared machine wall time includes waiting for a core; CPU time is what one core spent.
    """
    best, best_cpu, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    CPU_TIMES.append(best_cpu)
    return best, out


def row(name: str, t_kernel: float, t_ref: float | None, same: bool | None, extra: str = "") -> None:
    ref = f"{t_ref:9.3f} s" if t_ref is not None else "   (skipped)"
    ratio = f"{t_ref / t_kernel:8.1f}x" if t_ref is not None else "       -"
    agree = {True: "same", False: "DIFFERENT", None: "-"}[same]
    sys.stdout.write(f"{name:<34} {t_kernel:9.4f} s {ref} {ratio}  {agree:<9} {extra}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ifmr-size", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-slow-reference", action="store_true", help="do not time the NumPy references")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    sys.stdout.write(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
                     f"IFMR SIMD level {_kernels.ifmr_simd_level()} (0 portable, 1 AVX2, 2 AVX-512)\n")
    sys.stdout.write(f"{'workload':<34} {'kernel':>11} {'reference':>11} {'ratio':>9}  result  "
                     "(wall times, best of --repeat; reference once)\n")

    x = rng.standard_normal(args.ifmr_size, dtype=np.float32)
    for with_offset in (True, False):
        params = IfmrParams(with_offset=with_offset)
        t_k, r_k = best_of(lambda p=params: ifmr_search(x, p, backend="kernel"), args.repeat)
        cpu_k = CPU_TIMES[-1]
        t_r, r_r = (None, None) if args.skip_slow_reference else best_of(
            lambda p=params: ifmr_search(x, p, backend="reference"), 1)
        same = None if r_r is None else (r_k.best_index, r_k.scale, r_k.offset) == (
            r_r.best_index, r_r.scale, r_r.offset)
        k = r_k.ratios.size
        extra = (f"cpu {cpu_k:.4f} s; {x.size / cpu_k / 1e6:4.0f} Mvalues/s, "
                 f"{x.size * k / cpu_k / 1e9:4.2f} G candidate-evals/s per core ({k} candidates)")
        row(f"IFMR {x.size / 1e6:g}M f32, 8 bit, offset={with_offset}", t_k, t_r, same, extra)

    w = rng.standard_normal((512, 512, 3, 3), dtype=np.float32) * np.float32(0.05)
    t_k, a_k = best_of(lambda: arq_quantize_weight(w, backend="kernel"), args.repeat)
    t_r, a_r = (None, None) if args.skip_slow_reference else best_of(
        lambda: arq_quantize_weight(w, backend="reference"), 1)
    same = None if a_r is None else bool(np.array_equal(a_k.quantized, a_r.quantized)
                                         and np.array_equal(a_k.scale, a_r.scale))
    row("ARQ 512x512x3x3 per channel", t_k, t_r, same)

    w = rng.standard_normal((256, 256, 3, 3), dtype=np.float32) * np.float32(0.05)
    t_k, s_k = best_of(lambda: snq_quantize_weight(w, init_algo="uniform", backend="kernel"), args.repeat)
    t_r, s_r = (None, None) if args.skip_slow_reference else best_of(
        lambda: snq_quantize_weight(w, init_algo="uniform", backend="reference"), 1)
    same = None if s_r is None else bool(np.array_equal(s_k.codes, s_r.codes)
                                         and np.array_equal(s_k.centres, s_r.centres))
    row("SNQ 256x256x3x3 (uniform init)", t_k, t_r, same,
        f"mean {s_k.iterations.mean():.0f} Lloyd iterations/channel")


if __name__ == "__main__":
    main()
