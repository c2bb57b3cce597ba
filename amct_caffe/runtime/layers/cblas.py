"""numpy's own OpenBLAS called directly (``cblas_sgemm``, ``cblas_sgemv``), for the calls numpy would not make
as Caffe makes them.

numpy makes a product of one row an ``sgemv``, whose sums are not those of the small-matrix kernel
Caffe's ``cblas_sgemm`` of ``M = 1`` runs; padded to two rows (:mod:`.caffe_gemm`) it may leave the
small kernels (``M*N > 1200`` transposed) for the level-3 driver, which rounds otherwise and packs
its operands: 5-7x Caffe's time on a 512 -> 1000 InnerProduct at batch 1. Calling sgemm itself makes
Caffe's call; Softmax's row sums likewise take Caffe's sgemv (:func:`row_sums_as_gemv`). Only
scipy-openblas (numpy's wheels) is called, whose symbol names and integer width are known; elsewhere
these give None and the callers keep NumPy's products and sums.
"""

from __future__ import annotations

import os

import numpy as np

_library = None   # numpy's OpenBLAS (ctypes.CDLL); False: not found
_functions: dict = {}  # CBLAS routine -> its ctypes function, or None
_ilp64: dict = {}  # CBLAS routine -> whether the function found takes 64-bit integers

try:  # csrc/python/elementwise_bindings.cpp: the per-row sgemv loop in C++
    from amct_caffe._kernels import row_sums_sgemv as ROW_SUMS_KERNEL
except ImportError:
    ROW_SUMS_KERNEL = None


def _numpy_openblas():
    """numpy's own OpenBLAS as a ctypes library, or None (pycaffe may load another OpenBLAS beside it)."""
    global _library
    if _library is None:
        _library = False
        try:
            import ctypes

            from threadpoolctl import threadpool_info

            libs = [i for i in threadpool_info() if i.get("internal_api") == "openblas"]
            if len(libs) > 1:
                libs = [i for i in libs if "numpy" in os.path.basename(os.path.dirname(str(i.get("filepath", ""))))]
            if len(libs) == 1:
                _library = ctypes.CDLL(str(libs[0]["filepath"]))
        except Exception:  # noqa: BLE001 - no way to tell which library numpy's is, or to load it
            _library = False
    return _library or None


def _cblas(routine: str, signature: str):
    """scipy-openblas's ``cblas_<routine>`` (the ILP64 build's, else the 32-bit one's) with its argument types,
    ``signature`` one letter per argument: e enum, i integer, f float, p pointer; or None."""
    if routine not in _functions:
        import ctypes

        lib, fn = _numpy_openblas(), None
        for suffix, integer in (("64_", ctypes.c_int64), ("", ctypes.c_int32)):
            fn = getattr(lib, f"scipy_cblas_{routine}{suffix}", None) if lib is not None else None
            if fn is not None:
                types = {"e": ctypes.c_int, "i": integer, "f": ctypes.c_float, "p": ctypes.c_void_p}
                fn.restype = None
                fn.argtypes = [types[c] for c in signature]
                _ilp64[routine] = integer is ctypes.c_int64
                break
        _functions[routine] = fn
    return _functions[routine]


def numpy_cblas_sgemm():
    """numpy's own OpenBLAS ``cblas_sgemm`` through ctypes (module doc), or None."""
    return _cblas("sgemm", "eeeiiifpipifpi")


_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS_ORDER / CBLAS_TRANSPOSE values


def single_row_sgemm(a: np.ndarray, b: np.ndarray, trans_b: bool, out: np.ndarray | None):
    """``a @ b`` for a (1, K) and b (K, N) as one ``cblas_sgemm(RowMajor, NoTrans, trans_b, 1, N, K)``, or None
    where that call cannot be made (numpy's BLAS unknown, or operands not laid out as the call needs)."""
    fn = numpy_cblas_sgemm()
    if fn is None or a.ndim != 2 or b.ndim != 2 or a.dtype != np.float32 or b.dtype != np.float32:
        return None
    k, n = b.shape
    stored = b.T if trans_b else b  # (N, K) C-contiguous transposed, (K, N) C-contiguous plain
    if not (a.flags.c_contiguous and stored.flags.c_contiguous):
        return None
    y = out if out is not None and out.shape == (1, n) and out.dtype == np.float32 and out.flags.c_contiguous \
        and not np.shares_memory(out, a) and not np.shares_memory(out, b) else np.empty((1, n), np.float32)
    fn(_ROW_MAJOR, _NO_TRANS, _TRANS if trans_b else _NO_TRANS, 1, n, k, 1.0, a.ctypes.data, k, stored.ctypes.data,
       k if trans_b else n, 0.0, y.ctypes.data, n)
    if out is not None and y is not out:
        np.copyto(out, y)
        return out
    return y


# OpenBLAS 0.3.x threads an sgemv of at least this many values (interface/gemv.c: 2304 * GEMM_MULTITHREAD_THRESHOLD)
THREADED_GEMV = 2304 * 4
_PARTIALS = 1024  # gemv_thread.c's buffer of per-thread partial outputs (Y_DUMMY_NUM)


def _output_ranges(outputs: int, threads: int) -> list[tuple[int, int]]:
    """The contiguous ranges gemv_thread.c gives ``threads`` threads: each ceil(rest / threads left) wide, at
    least 4."""
    ranges, start, rest, used = [], 0, outputs, 0
    while rest > 0:
        width = -(-rest // (threads - used)) if threads > used else rest
        width = min(max(width, 4), rest)
        ranges.append((start, start + width))
        start, rest, used = start + width, rest - width, used + 1
    return ranges


def caffe_cpu_gemv(trans: bool, m: int, n: int, alpha: float, a: np.ndarray, x: np.ndarray, y: np.ndarray,
                   threads: int) -> None:
    """Caffe's ``caffe_cpu_gemv(trans, m, n, alpha, a, x, 0, y)``: y = alpha * op(A) x for A (m, n) row-major,
    float32 C arrays, as Caffe's OpenBLAS sums it on ``threads`` threads (``caffe_gemm.GemmConfig.threads``).

    A call of at least :data:`THREADED_GEMV` values is threaded: each thread takes a contiguous range of the
    outputs (at least 4 wide), and the kernel's column grouping restarts at each range; where that leaves a
    thread idle (few outputs: a sum over the batch of four channels, one row's sum), its column-major NoTrans
    kernel (our row-major Trans) splits the summed axis instead, each thread's partial sums into a zeroed buffer,
    added into y in turn. numpy's OpenBLAS gives the same bytes on any thread count of its own, so the splits are
    made here, call by call."""
    fn, ptr = _cblas("sgemv", "eeiifpipifpi"), (lambda arr: arr.ctypes.data)
    alpha = float(np.float32(alpha))
    if threads <= 1 or m * n < THREADED_GEMV:
        fn(_ROW_MAJOR, _TRANS if trans else _NO_TRANS, m, n, alpha, ptr(a), n, ptr(x), 1, 0.0, ptr(y), 1)
        return
    ranges = _output_ranges(n if trans else m, threads)
    if trans and len(ranges) < threads and m * n > THREADED_GEMV and n * threads <= _PARTIALS:
        y[...] = 0
        for lo, hi in _output_ranges(m, threads):  # y += A[lo:hi, :]^T x[lo:hi]
            part = np.zeros(n, np.float32)
            fn(_ROW_MAJOR, _TRANS, hi - lo, n, alpha, ptr(a) + 4 * lo * n, n, ptr(x) + 4 * lo, 1, 0.0, ptr(part), 1)
            y += part
        return
    for lo, hi in ranges:  # one kernel call per thread's range
        if trans:  # y[lo:hi] = A[:, lo:hi]^T x
            fn(_ROW_MAJOR, _TRANS, m, hi - lo, alpha, ptr(a) + 4 * lo, n, ptr(x), 1, 0.0, ptr(y) + 4 * lo, 1)
        else:      # y[lo:hi] = A[lo:hi, :] x
            fn(_ROW_MAJOR, _NO_TRANS, hi - lo, n, alpha, ptr(a) + 4 * lo * n, n, ptr(x), 1, 0.0, ptr(y) + 4 * lo, 1)


def row_sums_as_gemv(rows: np.ndarray, threads: int) -> np.ndarray | None:
    """Each row's sum as Caffe's Softmax takes it over an axis with nothing after it:
    ``caffe_cpu_gemv(Trans, channels, 1, 1, row, ones, 0, y)`` per row (the kernel's own order, not the values
    in turn; over :data:`THREADED_GEMV` classes or more on ``threads`` > 1, partial sums); ``rows`` (outer,
    channels) float32. None where the call cannot be made."""
    fn = _cblas("sgemv", "eeiifpipifpi")
    if fn is None or rows.ndim != 2 or rows.dtype != np.float32:
        return None
    rows = np.ascontiguousarray(rows)
    outer, channels = rows.shape
    sums = np.zeros(outer, np.float32)
    ones = np.ones(channels, np.float32)
    if channels < THREADED_GEMV and ROW_SUMS_KERNEL is not None:  # the calls from C++ (SSD's 8,732 rows: 30 -> 1 ms)
        import ctypes

        return ROW_SUMS_KERNEL(rows, ctypes.cast(fn, ctypes.c_void_p).value, _ilp64["sgemv"])
    for i in range(outer):
        caffe_cpu_gemv(True, channels, 1, 1.0, rows[i], ones, sums[i:i + 1], threads)
    return sums
