"""numpy's own OpenBLAS ``cblas_sgemm`` called directly, for the products numpy would not make as Caffe's call.

numpy makes a product of one row an ``sgemv``, whose sums are not those of the small-matrix kernel
Caffe's ``cblas_sgemm`` of ``M = 1`` runs; padded to two rows (:mod:`.caffe_gemm`) it may leave the
small kernels (``M*N > 1200`` transposed) for the level-3 driver, which rounds otherwise and packs
its operands: 5-7x Caffe's time on a 512 -> 1000 InnerProduct at batch 1. Calling sgemm itself makes
Caffe's call. Only scipy-openblas (numpy's wheels) is called, whose symbol names and integer width
are known; elsewhere :func:`numpy_cblas_sgemm` is None and the callers pad as before.
"""

from __future__ import annotations

import os

import numpy as np

_CBLAS_SGEMM_SYMBOLS = (("scipy_cblas_sgemm64_", True), ("scipy_cblas_sgemm", False))  # scipy-openblas64 / 32
_cblas_sgemm_fn = None  # numpy's cblas_sgemm through ctypes; False: not found


def numpy_cblas_sgemm():
    """numpy's own OpenBLAS ``cblas_sgemm`` through ctypes (module doc), or None."""
    global _cblas_sgemm_fn
    if _cblas_sgemm_fn is None:
        _cblas_sgemm_fn = _load_cblas_sgemm() or False
    return _cblas_sgemm_fn or None


def _load_cblas_sgemm():
    import ctypes

    try:
        from threadpoolctl import threadpool_info

        libs = [i for i in threadpool_info() if i.get("internal_api") == "openblas"]
    except Exception:  # noqa: BLE001 - no way to tell which library numpy's is
        return None
    if len(libs) > 1:
        libs = [i for i in libs if "numpy" in os.path.basename(os.path.dirname(str(i.get("filepath", ""))))]
    if len(libs) != 1:
        return None
    try:
        lib = ctypes.CDLL(str(libs[0]["filepath"]))
    except OSError:
        return None
    for name, wide in _CBLAS_SGEMM_SYMBOLS:
        fn = getattr(lib, name, None)
        if fn is None:
            continue
        integer = ctypes.c_int64 if wide else ctypes.c_int32
        fn.restype = None
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, integer, integer, integer, ctypes.c_float,
                       ctypes.c_void_p, integer, ctypes.c_void_p, integer, ctypes.c_float, ctypes.c_void_p, integer]
        fn._lib_path = str(libs[0]["filepath"])  # for the other symbols of the same library
        return fn
    return None


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


_sgemv_fn = None  # numpy's cblas_sgemv through ctypes; False: not found


def numpy_cblas_sgemv():
    """numpy's own OpenBLAS ``cblas_sgemv`` through ctypes (as :func:`numpy_cblas_sgemm`), or None."""
    global _sgemv_fn
    if _sgemv_fn is None:
        sgemm = numpy_cblas_sgemm()  # the same library, found once
        _sgemv_fn = _load_sgemv(sgemm) if sgemm is not None else False
    return _sgemv_fn or None


def _load_sgemv(sgemm):
    import ctypes

    lib = ctypes.CDLL(sgemm._lib_path)  # noqa: SLF001
    for name, wide in (("scipy_cblas_sgemv64_", True), ("scipy_cblas_sgemv", False)):
        fn = getattr(lib, name, None)
        if fn is None:
            continue
        integer = ctypes.c_int64 if wide else ctypes.c_int32
        fn.restype = None
        fn.argtypes = [ctypes.c_int, ctypes.c_int, integer, integer, ctypes.c_float, ctypes.c_void_p, integer,
                       ctypes.c_void_p, integer, ctypes.c_float, ctypes.c_void_p, integer]
        return fn
    return None


def row_sums_as_gemv(rows: np.ndarray) -> np.ndarray | None:
    """Each row's sum as Caffe's Softmax takes it over an axis with nothing after it:
    ``cblas_sgemv(RowMajor, Trans, channels, 1, 1, row, 1, ones, 1, 0, y, 1)`` per row (the kernel's own
    order, not the values in turn); ``rows`` (outer, channels) float32. None where the call cannot be made."""
    fn = numpy_cblas_sgemv()
    if fn is None or rows.ndim != 2 or rows.dtype != np.float32:
        return None
    rows = np.ascontiguousarray(rows)
    outer, channels = rows.shape
    ones = np.ones(channels, np.float32)
    sums = np.zeros(outer, np.float32)
    base, step, out = rows.ctypes.data, channels * 4, sums.ctypes.data
    for i in range(outer):
        fn(_ROW_MAJOR, _TRANS, channels, 1, 1.0, base + i * step, 1, ones.ctypes.data, 1, 0.0, out + 4 * i, 1)
    return sums
