"""How many threads the executor's BLAS (numpy's matmul, hence convolution) may use.

numpy's OpenBLAS starts one thread per core, and its threads meet at a barrier inside every
GEMM. On a machine where other processes keep cores busy, a thread that the scheduler has parked
holds up the others at each barrier: measured on 2 cores with another process busy on one to two
of them, an open_nsfw forward took 2.6-6.0 s with 2 threads and 0.6-1.6 s with 1 (a 4x penalty,
8x in the worst case seen), while on an idle machine 2 threads are 1.5x faster than 1.

So by default the thread count follows the load (:func:`adapt`, which ``Net.forward`` calls):
at most every :data:`INTERVAL` seconds the CPU time the *other* processes used since the last
look is read from ``/proc/stat`` (the machine's busy time minus this process's own, from
``os.times``), and BLAS gets the cores left over, rounded down with a margin of
:data:`MARGIN` of a core:

    threads = clip(floor(cpus - others_busy + MARGIN), 1, library default)

``set_num_threads(n)`` pins ``n`` threads (no adapting); ``set_num_threads(None)`` returns to
the library default and to adapting. ``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` in the
environment pin the count too. The GEMMs sum in fixed K blocks (``caffe_gemm``), so outputs are
the same bytes with any thread count: changing it between calls is safe.

That holds where numpy's BLAS is OpenBLAS with its AVX-512 kernels (``caffe_gemm.exact``), whose
sums depend on nothing but K's blocking. Elsewhere they may depend on how the threads split the
matrices (OpenBLAS's Haswell kernels, used on CPUs without AVX-512: a (20 x 25) @ (25 x 36864)
product differs in most of its rows between 1 and 2 threads, and between a call and the same call
on halves of its columns). There numpy's BLAS is held at one thread, whatever the count above says
(decided once, at the first :func:`adapt` or :func:`set_num_threads`, before any other limit); that
count still goes to the executor's own C++ loops (:func:`workers`), whose sums never depend on it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time

from amct_caffe.errors import AmctError

_LOG = logging.getLogger(__name__)

INTERVAL = 0.5  # seconds between two looks at the machine's load
MARGIN = 0.25   # another process using at most this much of a core leaves that core to us
_PIN_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")

_limiter = None      # threadpoolctl limiter of set_num_threads(n)
_pinned = None       # that n
_auto = None         # the _Adaptive state, built on first use (False: adapting is off here)
_capping = 0         # leaving_a_core blocks open, under _CAP_LOCK
_CAP_LOCK = threading.Lock()
_hold = None         # _Hold of numpy's BLAS at one thread where its sums depend on the count (module doc),
                     # made before any other limiter (False: not needed here; None: not decided yet)


def set_num_threads(n: int | None) -> None:
    """Pin the executor to ``n`` threads (``None``: back to the library default, adapted to the load): its
    C++ loops, and numpy's BLAS unless that is held at one thread (module doc)."""
    global _limiter, _pinned
    from threadpoolctl import threadpool_limits

    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise AmctError(f"set_num_threads: n must be a positive integer or None, got {n!r}")
    _decide_hold()
    if _limiter is not None:
        _limiter.restore_original_limits()
        _limiter = None
    if isinstance(_auto, _Adaptive):
        _auto.restore()
    _pinned = n
    if n is not None:
        _limiter = threadpool_limits(limits=_blas_count(n), user_api="blas")


def num_threads() -> int:
    """The thread count in force of numpy's BLAS (the largest over its libraries; 1 if none is known)."""
    from threadpoolctl import ThreadpoolController

    return max((lib.num_threads for lib in numpy_blas_controllers(ThreadpoolController())), default=1)


def workers() -> int:
    """Threads the executor's own C++ loops may use: the BLAS count in force (pinned or adapted)."""
    if _pinned is not None:
        return _pinned
    if isinstance(_auto, _Adaptive):
        return _auto.current
    for v in _PIN_VARIABLES:
        value = os.environ.get(v, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def adapt() -> None:
    """Give numpy's BLAS the cores other processes leave free (see the module doc); cheap to call
    often: it looks at the load at most every :data:`INTERVAL` seconds."""
    global _auto
    _decide_hold()
    if _auto is None:
        _auto = _Adaptive.create() or False
    if _auto and _limiter is None:
        _auto.update()


@contextlib.contextmanager
def leaving_a_core(enabled: bool = True):
    """Within the block the adaptive count leaves a core to a worker thread of the caller's: at most cpus - 1
    BLAS and C++ loop threads (the IFMR fills of a calibration forward, layers/calibration_overlap.py, which
    otherwise run on the forward's own thread: open_nsfw's four calibration forwards took 1.30 s on 2 threads
    with the fills between the layers, 0.97 s on one with them beside it). Blocks may nest or run in several
    threads at once: the first to open sets the cap, the last to close lifts it and puts back the count of
    before. A count pinned by set_num_threads or the environment stays as it is, also one pinned meanwhile."""
    global _capping
    auto = _auto if enabled and isinstance(_auto, _Adaptive) and _limiter is None else None
    if auto is None or auto.cpus < 2:
        yield
        return
    with _CAP_LOCK:
        _capping += 1
        if _capping == 1:
            auto.before_cap, auto.cap = auto.current, auto.cpus - 1
            if auto.current > auto.cap:
                auto._set(auto.cap)  # noqa: SLF001 - this module's own class
    try:
        yield
    finally:
        with _CAP_LOCK:
            _capping -= 1
            if _capping == 0:
                auto.cap = None
                if _limiter is None and auto.current != auto.before_cap:  # (a pin made meanwhile stays)
                    auto._set(auto.before_cap)  # noqa: SLF001


def _blas_sums_thread_free() -> bool:
    """Whether numpy's BLAS sums the executor's GEMMs alike with any thread count: OpenBLAS with its AVX-512
    kernels (module doc). Asked of the library itself, not of ``caffe_gemm``'s configuration in force
    (which tests change)."""
    from amct_caffe.runtime.layers import caffe_gemm

    return caffe_gemm.GemmConfig.detect().numpy_k_block is not None


def _decide_hold() -> None:
    """Once per process, before any other limiter: hold numpy's BLAS (not another one pycaffe may have
    loaded) at one thread if its sums depend on the count, keeping the count it had (the adaptive default)."""
    global _hold
    if _hold is not None:
        return
    from threadpoolctl import ThreadpoolController

    try:
        libs = numpy_blas_controllers(ThreadpoolController())
    except (OSError, AttributeError, ValueError):
        libs = []
    if not libs or _blas_sums_thread_free():
        _hold = False
        return
    _LOG.debug("numpy's BLAS held at one thread: its sums depend on the thread count on this machine")
    _hold = _Hold(libs)


class _Hold:
    """numpy's BLAS libraries set to one thread; ``restore_original_limits`` gives them their counts back."""

    def __init__(self, libs):
        self.saved = [(lib, lib.num_threads) for lib in libs]
        for lib in libs:
            lib.set_num_threads(1)

    def restore_original_limits(self) -> None:
        for lib, n in self.saved:
            lib.set_num_threads(n)


def _library_count(libs) -> int:
    """The BLAS thread count ``libs`` had before any limit of ours: the count the hold keeps, or theirs."""
    if _hold:
        return max(n for _, n in _hold.saved)
    return max(lib.num_threads for lib in libs)


def _blas_count(n: int) -> int:
    """The BLAS threads to set for a count of ``n``: ``n``, or 1 while numpy's BLAS is held."""
    return 1 if _hold else n


def numpy_blas_controllers(controller) -> list:
    """The threadpoolctl controllers of numpy's own BLAS among ``controller``'s.

    pycaffe may load another OpenBLAS into the process; numpy's is the one in numpy's wheel
    (``numpy.libs``, scipy-openblas), or the only BLAS.
    """
    libs = [lib for lib in controller.lib_controllers if lib.user_api == "blas"]
    if len(libs) > 1:
        libs = [lib for lib in libs if "numpy" in os.path.basename(os.path.dirname(str(lib.filepath)))
                or "scipy_openblas" in str(lib.filepath)]
    return libs


class _Adaptive:
    """The load seen at the last look and the thread count set then."""

    def __init__(self, libs, cpus: int):
        self.libs = libs
        self.default = _library_count(libs)
        self.cpus = cpus
        self.current = self.default
        self.cap = None  # at most this many while a block of leaving_a_core runs
        self.before_cap = self.current  # the count when the first of those blocks opened
        self.last = None  # (monotonic time, machine busy seconds, own CPU seconds)

    @classmethod
    def create(cls) -> _Adaptive | None:
        """None where adapting does not apply: pinned by the environment, one CPU, no /proc/stat."""
        if any(os.environ.get(v, "").strip() for v in _PIN_VARIABLES):
            return None
        try:
            cpus = len(os.sched_getaffinity(0))
            _busy_seconds()
            from threadpoolctl import ThreadpoolController

            libs = numpy_blas_controllers(ThreadpoolController())
        except (OSError, AttributeError, ValueError, ImportError):
            return None
        if cpus < 2 or not libs or _library_count(libs) < 2:
            return None
        return cls(libs, cpus)

    def update(self) -> None:
        now = time.monotonic()
        if self.last is not None and now - self.last[0] < INTERVAL:
            return
        try:
            sample = (now, _busy_seconds(), sum(os.times()[:2]))
        except (OSError, ValueError):
            return
        prev, self.last = self.last, sample
        if prev is None:
            return
        wall = sample[0] - prev[0]
        others = max(0.0, (sample[1] - prev[1]) - (sample[2] - prev[2])) / wall
        want = min(self.default, self.cap or self.default, max(1, math.floor(self.cpus - others + MARGIN)))
        if want != self.current:
            _LOG.debug("BLAS threads %d -> %d (other processes busy on %.2f of %d CPUs)", self.current, want,
                       others, self.cpus)
            self._set(want)

    def restore(self) -> None:
        """Back to the library default (the next look decides again)."""
        self._set(self.default)

    def _set(self, n: int) -> None:
        for lib in self.libs:
            lib.set_num_threads(_blas_count(n))
        self.current = n


def _busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (``/proc/stat``: all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    if fields[0] != "cpu":
        raise ValueError("/proc/stat does not start with the cpu line")
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


# pycaffe's device switches: the executor runs on the CPU, its threads set above
def set_mode_cpu() -> None:
    """The executor always runs on the CPU."""


def set_mode_gpu() -> None:
    _LOG.warning("the embedded executor has no GPU mode; running on the CPU")


def set_device(device_id: int) -> None:  # noqa: ARG001 - pycaffe signature
    _LOG.warning("the embedded executor has no GPU mode; set_device(%d) ignored", device_id)
