"""Float32 GEMMs summed in the order Caffe's OpenBLAS sums them (Convolution, InnerProduct).

Caffe computes each Convolution output (per image and group) and each InnerProduct as one
``cblas_sgemm``; every output element is a dot product over ``K``. OpenBLAS's level-3 driver
(``driver/level3``) sums ``K`` in blocks of at most ``GEMM_Q`` (a remainder between ``Q`` and
``2Q`` in two halves), each block in one register-accumulated kernel pass, the blocks added into
``C`` in order. ``GEMM_Q`` belongs to the core type OpenBLAS selects at load time, and that is
where numpy's bundled OpenBLAS and the system one Caffe links part on AVX-512 CPUs with BF16
(Cooper Lake, Sapphire Rapids, AMD Zen 4): the distribution's (Debian 12's 0.3.21, which
build_caffe.sh links) runs its ``Cooperlake`` target, ``SGEMM_Q = 320``, numpy's wheel
(scipy-openblas 0.3.31, which has no Cooperlake target) runs ``SkylakeX``, ``SGEMM_Q = 448``.
Their kernels are otherwise the same: split alike, the sums agree bit for bit (measured on a
Zen 4: identical calls and every Convolution / InnerProduct of the shared models), split
differently (``K > 320``: ResNet-50's 3x3 convolutions, ``K = 1152 / 2304``) most elements
differ in the last bit or two.

So the GEMMs here split ``K`` themselves, in Caffe's blocks, where the two libraries would split
it differently: each block (``<= 320 < 448``) is one numpy GEMM that numpy's BLAS does not split
again, added into the result in order, as the driver does (``C += A_blk @ B_blk``, ``alpha = 1``).
That costs 2-6% on the layers split (K = 512 ... 640 are halved alike by both and left alone).

On AVX2 cores (OpenBLAS's ``Haswell`` target: Intel Haswell..., AMD Zen 1-3) both libraries run
the same kernels and identical calls agree, but there the driver's rounding of an element
depends on its position in the matrix, so the executor's reshaped GEMMs (images side by side,
row grids) differ from Caffe's per-image ones in a few % of the elements of some layers: bit
equality is not attempted there (:func:`exact` is False; only an explicit K block applies).

What else decides the bits (same in both libraries, so only the call shapes must match):

* calls with ``M*N*K <= 100**3`` (x86-64 "small matrix" kernels; for ``A @ B.T`` also
  ``M*N <= 1200`` and ``K >= 32``) are summed in one pass without blocks, by kernels whose
  edge tiles round differently from the driver's (and, from ``K = 32``, differently from
  column to column): a call that Caffe makes small must be made with the same shape here, and
  a block that Caffe sums in the driver must not become small. The driver's sums depend on
  neither the position of an element nor ``M`` and ``N``, so images may sit side by side;
* with more than one BLAS thread (and ``M*N*K > 65536*4``) the driver halves a remainder
  between ``Q`` and ``2Q`` as ``(r + 1) // 2`` instead of rounding the half up to 16: Caffe is
  taken to run multi-threaded (its OpenBLAS's default on any machine of two or more CPUs;
  ``configure(threads=1)`` reproduces a single-threaded Caffe);
* numpy sends a product with one row or one column to ``sgemv``, not ``sgemm``: for one row of
  ``K < 32`` and at most 16384 columns (sgemv's block) it rounds like Caffe's small-kernel sgemm,
  otherwise not; a zero row / column appended makes it an sgemm.

InnerProduct calls :func:`matmul` with its one call's shape. A convolution gets its GEMMs from
:func:`conv_gemms`: a :class:`ConvGemms` that makes them and tells which of the executor's layouts
(images side by side, row grids, single-row depthwise products) keep Caffe's sums.

Determinism. numpy's OpenBLAS follows the same driver rule, so left to itself it would sum a K
between ``Q`` and ``2Q`` differently with one thread and with several, and the quantization
factors computed from the activations would depend on the machine's thread settings. Every K
longer than numpy's own block is therefore split here (:func:`k_blocks`), in the multi-threaded
driver's blocks, into GEMMs numpy's BLAS does not split again; where numpy's BLAS is not one whose
block is known, K is split in blocks of 256, which no OpenBLAS target splits. The same inputs thus
give the same bits with any number of BLAS threads (tests/test_determinism.py).

What is detected (once, on first use) is one :class:`GemmConfig`: the K block to reproduce,
Caffe's thread count (fixed, not read from the environment) and numpy's own K block.
``AMCT_CAFFE_SGEMM_Q`` overrides the detected K block (``0``: Caffe's blocks are not reproduced);
:func:`configure` replaces any of the three at run time.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
from dataclasses import dataclass

import numpy as np

from amct_caffe.runtime.layers.cblas import numpy_cblas_sgemm, single_row_sgemm

_LOG = logging.getLogger(__name__)

SMALL_GEMM_MNK = 100 ** 3           # OpenBLAS x86-64 small-matrix kernels take M*N*K up to this
SMALL_GEMM_TN_MAX_MN = 1200         # ... and, for op(A) transposed (column-major), M*N up to this
SMALL_GEMM_TN_MIN_K = 32            # ... and K from this
SMALL_GEMM_FREE_K = 32              # below this K a small kernel's sum does not depend on the column
GEMV_LIKE_GEMM_MAX_N = 16384        # numpy's sgemv of one row, K < 32, rounds like sgemm up to this N
PADDED_SINGLE_MAX_MN = 1 << 14      # where numpy's BLAS is unknown, a single row / column is padded up to this
                                    # M*N (the one-call path's products, conv_plan.SMALL_COLS, fit)
THREADED_GEMM_MIN_MNK = 65536 * 4   # SMP_THRESHOLD_MIN * GEMM_MULTITHREAD_THRESHOLD
GEMM_UNROLL_M = 16                  # SGEMM_DEFAULT_UNROLL_M of the AVX-512 targets
COOPERLAKE_SGEMM_Q = 320            # SGEMM_DEFAULT_Q of OpenBLAS's Cooperlake target
UNKNOWN_BLAS_K_BLOCK = 256          # K block when numpy's BLAS is not known: no OpenBLAS target splits below it
CAFFE_THREADS = 2                   # Caffe's OpenBLAS is taken to be multi-threaded (any machine of 2+ CPUs)
NUMPY_SKYLAKEX_SGEMM_Q = 448        # ... of numpy's bundled SkylakeX target (no extra split below it)

def _cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512_bf16" in line.split()
    except OSError:
        pass
    return False


def _system_openblas_core() -> str | None:
    """The core the system's OpenBLAS (the library a Caffe build links) selects on this CPU, or None
    when there is no such library (or it cannot say).

    It is not always Cooperlake on a CPU with AVX512-BF16: OpenBLAS 0.3.21 recognises Cooper Lake by
    its CPU model, so a virtual CPU that reports the BF16 flag under a generic model runs SkylakeX,
    exactly like numpy's OpenBLAS. Loading the library asks it directly (when pycaffe is imported it is
    already loaded, and this is the very library Caffe calls).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("openblas")
    if name is None:
        return None
    try:
        corename = ctypes.CDLL(name).openblas_get_corename
    except (OSError, AttributeError):
        return None
    corename.restype = ctypes.c_char_p
    core = corename()
    return core.decode("ascii", "replace").strip().lower() if core else None


def _detect_k_block(numpy_core: str | None) -> int | None:
    env = os.environ.get("AMCT_CAFFE_SGEMM_Q")
    if env is not None and env.strip():
        try:
            q = int(env)
        except ValueError:  # as for the other variables: said once, then as if unset
            _LOG.warning("AMCT_CAFFE_SGEMM_Q=%r is not an integer (a K block, or 0); ignored", env)
        else:
            return q if q > 0 else None
    if numpy_core == "skylakex" and _cpu_has_avx512_bf16():
        # Caffe's OpenBLAS blocks K as its Cooperlake target does, unless it runs SkylakeX too (then
        # both libraries split alike). Without a system OpenBLAS to ask, Cooperlake is the likely case.
        system = _system_openblas_core()
        return COOPERLAKE_SGEMM_Q if system in (None, "cooperlake") else None
    return None


def _numpy_openblas_core() -> str | None:
    """The core type numpy's OpenBLAS runs (lower case), if numpy's BLAS is an OpenBLAS we can tell apart.

    pycaffe may have loaded another OpenBLAS into this process: numpy's is the one inside numpy's
    wheel (``numpy.libs``, scipy-openblas), or the only one.
    """
    try:
        from threadpoolctl import threadpool_info

        libs = [i for i in threadpool_info() if i.get("internal_api") == "openblas"]
    except Exception:  # noqa: BLE001 - no way to tell: leave the blocking to numpy's BLAS
        return None
    if len(libs) > 1:
        libs = [i for i in libs if "numpy" in os.path.basename(os.path.dirname(str(i.get("filepath", ""))))]
    if len(libs) != 1:
        return None
    return str(libs[0].get("architecture", "")).lower() or None


@dataclass(frozen=True)
class GemmConfig:
    """What decides how the GEMMs here split K (see the module doc)."""

    k_block: int | None         # Caffe's OpenBLAS K block to reproduce; None: leave K to numpy's BLAS
    threads: int                # Caffe's BLAS threads (>= 1): more than one halves a remainder differently
    numpy_k_block: int | None   # numpy's own K block where its OpenBLAS is known to round like Caffe's

    @classmethod
    def detect(cls) -> GemmConfig:
        """From this process: numpy's OpenBLAS core, the CPU, ``AMCT_CAFFE_SGEMM_Q`` and the thread
        variables."""
        core = _numpy_openblas_core()
        return cls(_detect_k_block(core), CAFFE_THREADS, NUMPY_SKYLAKEX_SGEMM_Q if core == "skylakex" else None)


class _Keep(enum.Enum):
    """Default of :func:`configure`'s arguments: leave that value as it is."""

    KEEP = enum.auto()


_KEEP = _Keep.KEEP
_config: GemmConfig | None = None  # detected on first use; configure() without arguments drops it


def gemm_config() -> GemmConfig:
    """The configuration in force, detected on first use."""
    global _config
    if _config is None:
        _config = GemmConfig.detect()
    return _config


def config() -> tuple[int | None, int, int | None]:
    """(K block to reproduce or None, Caffe's BLAS thread count, numpy's own K block if known),
    detected on first use: :func:`gemm_config` as a tuple."""
    c = gemm_config()
    return c.k_block, c.threads, c.numpy_k_block


def configure(k_block: int | None | _Keep = _KEEP, threads: int | None | _Keep = _KEEP,
              numpy_k_block: int | None | _Keep = _KEEP) -> None:
    """Set the K block to reproduce (None: numpy's own blocking), Caffe's BLAS thread count and/or
    numpy's K block (None: unknown).

    Arguments not given keep their current value; ``configure()`` re-detects all three.
    """
    global _config
    if k_block is _KEEP and threads is _KEEP and numpy_k_block is _KEEP:
        _config = None
        return
    current = gemm_config()
    changes: dict[str, int | None] = {}
    if numpy_k_block is not _KEEP:
        changes["numpy_k_block"] = None if numpy_k_block is None else int(numpy_k_block)
    if k_block is not _KEEP:
        if k_block is not None and (int(k_block) < 1 or int(k_block) > NUMPY_SKYLAKEX_SGEMM_Q):
            raise ValueError(f"k_block must be in 1..{NUMPY_SKYLAKEX_SGEMM_Q} or None, got {k_block}")
        changes["k_block"] = None if k_block is None else int(k_block)
    if threads is not _KEEP:
        changes["threads"] = max(1, int(threads or 1))
    _config = dataclasses.replace(current, **changes)


def exact() -> bool:
    """Whether numpy's BLAS can round like Caffe's here (its AVX-512 kernels); where it cannot, the
    measures that only keep call shapes (padding single rows / columns, same-shaped small GEMMs) are
    not worth their time."""
    return gemm_config().numpy_k_block is not None


def is_small(m: int, n: int, k: int, trans_b: bool = False) -> bool:
    """Whether OpenBLAS runs row-major ``cblas_sgemm(NoTrans, trans_b, m, n, k)`` in a small-matrix kernel."""
    if m * n * k > SMALL_GEMM_MNK:
        return False
    # row-major C = A op(B) is column-major C^T = op(B)^T A^T: op(B) transposed there means TN
    return not trans_b or (m * n <= SMALL_GEMM_TN_MAX_MN and k >= SMALL_GEMM_TN_MIN_K)


def k_blocks(m: int, n: int, k: int, trans_b: bool = False) -> tuple[int, ...] | None:
    """End offsets of the K blocks ``cblas_sgemm(NoTrans, trans_b, m, n, k)`` is summed in, or None
    when numpy's BLAS, given the same call, sums it that way by itself whatever its thread count.

    The blocks are those of Caffe's OpenBLAS (``k_block``) where it blocks differently from numpy's,
    else numpy's own (``numpy_k_block``), split here so that numpy's BLAS, which halves a remainder
    one way with one thread and another with several, never splits K itself: the sums then do not
    depend on the thread count (module doc, "Determinism").
    """
    cfg = gemm_config()
    q = cfg.k_block or cfg.numpy_k_block
    if q is None or k <= q or is_small(m, n, k, trans_b):
        return None
    ends = _driver_blocks(k, q, cfg.threads > 1 and m * n * k > THREADED_GEMM_MIN_MNK)
    numpy_q = cfg.numpy_k_block
    if numpy_q and ends == _driver_blocks(k, numpy_q, True) == _driver_blocks(k, numpy_q, False):
        return None  # numpy's BLAS splits the same way by itself (e.g. K = 512, 576, 640 for Q = 320 / 448)
    return ends


def _driver_blocks(k: int, q: int, threaded: bool) -> tuple[int, ...]:
    """OpenBLAS level-3 driver (level3.c / level3_thread.c): end offsets of its K blocks."""
    ends, done = [], 0
    while done < k:
        step = k - done
        if step >= 2 * q:
            step = q
        elif step > q:
            step = (step + 1) // 2 if threaded else (step // 2 + GEMM_UNROLL_M - 1) // GEMM_UNROLL_M * GEMM_UNROLL_M
        done += step
        ends.append(done)
    return tuple(ends)


def matmul(a: np.ndarray, b: np.ndarray, caffe_mnk: tuple[int, int, int], *, trans_b: bool = False,
           out: np.ndarray | None = None, part: np.ndarray | None = None) -> np.ndarray:
    """``np.matmul(a, b, out=out)`` rounded like Caffe's ``cblas_sgemm(NoTrans, trans_b, *caffe_mnk)``.

    ``a`` is (..., M, K) and ``b`` (..., K, N), broadcast like ``np.matmul``; each matrix product
    in the stack holds one or more of Caffe's calls (images side by side in ``N``: the driver's
    sums do not depend on ``M`` or ``N``). ``trans_b`` says how numpy hands ``b`` to BLAS (True
    for a transposed C-array), as Caffe's call does. The contraction is summed in Caffe's K
    blocks (:func:`k_blocks`), one numpy GEMM per block; a product numpy would send to ``sgemv``
    (one row or column) or, where Caffe's call is not small, to a small-matrix kernel, gets zero
    rows / a zero column appended. Where Caffe's call is small the caller makes the same call
    (same M, N, K); only a single row or column is padded to two then. ``part`` is an optional
    scratch array of the result's shape.
    """
    m, k = a.shape[-2:]
    n = b.shape[-1]
    blocks = k_blocks(*caffe_mnk, trans_b=trans_b)
    if not blocks and not exact():
        # numpy's BLAS is not one whose blocking is known (and no K block was set): K is split in
        # blocks no OpenBLAS target splits again; a small product of a single row or column is padded to
        # two, so that it is an sgemm as in the one-call path (ConvPlan.native, single_call), not numpy's
        # sgemv (a large one stays an sgemv: padded, it took 2-3x longer).
        blocks = _driver_blocks(k, UNKNOWN_BLAS_K_BLOCK, True) if k > UNKNOWN_BLAS_K_BLOCK else None
        rows, cols = _unknown_blas_shape(m, n, k)
    else:
        rows, cols = _call_shape(m, n, k, caffe_mnk, trans_b, blocks)
    if not blocks and (rows, cols) == (m, n):
        return np.matmul(a, b, out=out)
    if not blocks and m == 1 and caffe_mnk[0] == 1 and min(n, k) >= 2:  # Caffe's own call (cblas.py)
        y = single_row_sgemm(a, b, trans_b, out)
        if y is not None:
            return y
    if rows != m:
        ap = np.zeros(a.shape[:-2] + (rows, k), np.float32)
        ap[..., :m, :] = a
        a = ap
    if cols != n:  # (a transposed b stays transposed: the same Trans call)
        bp = np.zeros(b.shape[:-2] + (cols, b.shape[-2]), np.float32).swapaxes(-1, -2) if trans_b \
            else np.zeros(b.shape[:-1] + (cols,), np.float32)
        bp[..., :n] = b
        b = bp
    padded = (rows, cols) != (m, n)
    y = np.matmul(a, b) if not blocks else _blocked_matmul(a, b, blocks, None if padded else out,
                                                             None if padded else part)
    if padded:
        y = y[..., :m, :n]
    if out is None:
        return y
    if y is not out:
        np.copyto(out, y)
    return out


def _call_shape(m: int, n: int, k: int, caffe_mnk, trans_b: bool, blocks) -> tuple[int, int]:
    """(rows, columns) :func:`matmul` gives a product of (m x k) @ (k x n): padded so that numpy sends
    it to neither ``sgemv`` nor, where Caffe's call is not small, a small-matrix kernel."""
    caffe_small = is_small(*caffe_mnk, trans_b=trans_b)
    kmin = k
    if blocks:
        kmin = min(e - s for s, e in zip((0,) + blocks[:-1], blocks, strict=True))
    rows, cols = max(m, 2), max(n, 2)
    if not caffe_small and is_small(rows, cols, kmin, trans_b):
        rows = max(rows, SMALL_GEMM_MNK // (cols * kmin) + 1,
                   SMALL_GEMM_TN_MAX_MN // cols + 1 if trans_b else 0)
    return rows, cols


def _unknown_blas_shape(m: int, n: int, k: int) -> tuple[int, int]:
    """(rows, columns) :func:`matmul` gives a product where numpy's BLAS is not known: a single row or
    column padded to two where the product is small and K one block."""
    if min(m, n) < 2 and k <= UNKNOWN_BLAS_K_BLOCK and m * n <= PADDED_SINGLE_MAX_MN:
        return max(m, 2), max(n, 2)
    return m, n


def plain(m: int, k: int, n: int, caffe_mnk: tuple[int, int, int], trans_b: bool = False) -> bool:
    """Whether :func:`matmul` of (..., m, k) @ (..., k, n) operands is ``np.matmul`` itself (no K blocks,
    no padding) under the configuration in force: a caller that makes the same product many times
    may then skip these decisions."""
    blocks = k_blocks(*caffe_mnk, trans_b=trans_b)
    if not blocks and not exact():
        return k <= UNKNOWN_BLAS_K_BLOCK and _unknown_blas_shape(m, n, k) == (m, n)
    return not blocks and _call_shape(m, n, k, caffe_mnk, trans_b, blocks) == (m, n)


def single_call(m: int, k: int, n: int, caffe_mnk: tuple[int, int, int]) -> tuple[int, int] | None:
    """(rows, columns) of the one ``np.matmul`` per pair of (m x k) @ (k x n) operands that :func:`prepared`
    makes (the operands padded with zero rows / columns to that), or None where it makes several (K
    blocks) or one that numpy need not send to ``sgemm`` (a dimension of 1 left unpadded: ``sgemv`` or
    numpy's own loop)."""
    blocks = k_blocks(*caffe_mnk)
    if not blocks and not exact():
        if k > UNKNOWN_BLAS_K_BLOCK:
            return None
        rows, cols = _unknown_blas_shape(m, n, k)
    elif blocks:
        return None
    else:
        rows, cols = _call_shape(m, n, k, caffe_mnk, False, blocks)
    return (rows, cols) if min(rows, cols, k) >= 2 else None


def prepared(m: int, k: int, n: int, caffe_mnk: tuple[int, int, int], trans_b: bool = False):
    """:func:`matmul` for (..., m, k) @ (..., k, n) operands, its decisions made once for these sizes and
    the configuration in force: a callable ``(a, b, out=None, part=None)`` making the same numpy calls.

    The caller makes a new one when the configuration may have changed (:func:`configure`).
    """
    blocks = k_blocks(*caffe_mnk, trans_b=trans_b)
    if blocks or not exact():
        if plain(m, k, n, caffe_mnk, trans_b):
            return lambda a, b, out=None, part=None: np.matmul(a, b, out=out)
        return lambda a, b, out=None, part=None: matmul(a, b, caffe_mnk, trans_b=trans_b, out=out, part=part)
    rows, cols = _call_shape(m, n, k, caffe_mnk, trans_b, blocks)
    if (rows, cols) == (m, n):
        return lambda a, b, out=None, part=None: np.matmul(a, b, out=out)
    single_row = m == 1 and caffe_mnk[0] == 1 and min(n, k) >= 2 and numpy_cblas_sgemm() is not None

    def padded(a, b, out=None, part=None):  # matmul's zero rows / column, without blocks (or Caffe's own call)
        if single_row:
            y = single_row_sgemm(a, b, trans_b, out)
            if y is not None:
                return y
        if rows != m:
            ap = np.zeros(a.shape[:-2] + (rows, k), np.float32)
            ap[..., :m, :] = a
            a = ap
        if cols != n:
            bp = np.zeros(b.shape[:-2] + (cols, k), np.float32).swapaxes(-1, -2) if trans_b \
                else np.zeros(b.shape[:-1] + (cols,), np.float32)
            bp[..., :n] = b
            b = bp
        y = np.matmul(a, b)[..., :m, :n]
        if out is None:
            return y
        np.copyto(out, y)
        return out
    return padded


def stable_matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None,
                  part: np.ndarray | None = None) -> np.ndarray:
    """``np.matmul(a, b, out=out)`` with the same bytes for any BLAS thread count (module doc,
    "Determinism"), for the GEMMs that need not round like one of Caffe's calls (the gradients).

    A contraction ``K`` longer than numpy's K block (or :data:`UNKNOWN_BLAS_K_BLOCK`) is summed here
    in blocks of at most that length, in order (``C = A_1 @ B_1; C += A_i @ B_i``), which numpy's
    BLAS does not split again; a shorter one is one GEMM. ``part``: optional scratch of the result's shape.
    """
    q = gemm_config().numpy_k_block or UNKNOWN_BLAS_K_BLOCK
    if a.shape[-1] <= q:
        return np.matmul(a, b, out=out)
    return _blocked_matmul(a, b, _driver_blocks(a.shape[-1], q, True), out, part)


def _blocked_matmul(a: np.ndarray, b: np.ndarray, blocks: tuple[int, ...], out: np.ndarray | None = None,
                    part: np.ndarray | None = None) -> np.ndarray:
    """``a @ b`` summed over K in ``blocks`` (end offsets), one numpy GEMM per block, in order."""
    starts = (0,) + blocks[:-1]
    y = np.matmul(a[..., :blocks[0]], b[..., :blocks[0], :], out=out)
    if part is None or part.shape != y.shape:
        part = np.empty_like(y)
    for s, e in zip(starts[1:], blocks[1:], strict=True):
        np.matmul(a[..., s:e], b[..., s:e, :], out=part)
        y += part
    return y


@dataclass(frozen=True)
class ConvGemms:
    """The GEMMs of one convolution, made to sum like Caffe's (:func:`conv_gemms`).

    Caffe makes one ``cblas_sgemm(NoTrans, NoTrans, O/g, P, C/g*prod(k))`` per image and group
    (``caffe_mnk``). Where it runs in OpenBLAS's level-3 driver its sums depend neither on ``M``
    and ``N`` nor on an element's position, so the executor may put the images of a batch side by
    side (:attr:`wide`) or run the GEMMs on a grid of whole padded rows (:attr:`row_grid`); where
    it runs in a small-matrix kernel (:func:`is_small`, and numpy's BLAS rounds like Caffe's) the
    GEMMs keep Caffe's shape instead, except a depthwise row grid for ``K < 32``, below which the
    small kernel's sums do not depend on the column.
    """

    caffe_mnk: tuple[int, int, int]
    exact: bool         # numpy's BLAS can round like Caffe's (:func:`exact`)
    same_shape: bool    # ... and Caffe's call is small: the GEMMs must have its shape
    depthwise: bool     # group == C == O: one (1 x K) @ (K x P) product per channel

    @property
    def wide(self) -> bool:
        """Whether the images of a batch may share one GEMM, ``(O/g x K) @ (K x N*P)``."""
        return not self.same_shape

    @property
    def row_grid(self) -> bool:
        """Whether the GEMMs may run on whole padded rows, the extra columns cropped after."""
        return not self.same_shape or (self.depthwise and self.caffe_mnk[2] < SMALL_GEMM_FREE_K)

    def matmul(self, a: np.ndarray, b: np.ndarray, *, out: np.ndarray | None = None,
               part: np.ndarray | None = None) -> np.ndarray:
        """:func:`matmul` for stacks of this convolution's GEMMs (one or more of Caffe's calls each)."""
        return matmul(a, b, self.caffe_mnk, out=out, part=part)

    def channel_weights(self, weight: np.ndarray, pixels: int) -> np.ndarray:
        """Depthwise weights ``(C, K)`` as the ``(C, rows, K)`` stack :meth:`channelwise` takes.

        numpy sends a single weight row to ``sgemv``, which rounds like Caffe's sgemm only for
        ``K < 32`` and at most 16384 ``pixels``; beyond, where numpy's BLAS can round like Caffe's,
        a second, zero row makes the products sgemms.
        """
        k = weight.shape[-1]
        two = self.exact and (k >= SMALL_GEMM_FREE_K or pixels > GEMV_LIKE_GEMM_MAX_N)
        w = np.zeros((weight.shape[0], 2 if two else 1, k), np.float32)
        w[:, 0] = weight
        return w

    def channelwise(self, w: np.ndarray, cols: np.ndarray, out: np.ndarray) -> None:
        """``out[n, c] = w[c, 0] @ cols[n, c]``: ``w`` (C, rows, K) from :meth:`channel_weights`,
        ``cols`` (N, C, K, P), ``out`` (N, C, P)."""
        if w.shape[1] == 1:
            np.matmul(w, cols, out=out[:, :, None, :])
        else:
            out[...] = self.matmul(w, cols)[:, :, 0]


def conv_gemms(m: int, n: int, k: int, *, depthwise: bool = False) -> ConvGemms:
    """How to make the GEMMs of a convolution whose Caffe call per image and group is
    ``cblas_sgemm(NoTrans, NoTrans, m, n, k)`` (``O/g``, output pixels, ``C/g * prod(kernel)``)."""
    exact_ = exact()
    return ConvGemms((m, n, k), exact_, exact_ and is_small(m, n, k), depthwise)
