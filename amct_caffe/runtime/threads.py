"""How many threads the executor's BLAS (numpy's matmul, hence convolution) may use.

By default numpy's BLAS uses every core. On a machine shared with other work that can make a
forward many times slower (threads wait for each other); one thread per process is then faster.
``set_num_threads(1)`` changes it at run time; ``OPENBLAS_NUM_THREADS=1`` does the same before
Python starts.
"""

from __future__ import annotations

from amct_caffe.errors import AmctError

_limiter = None


def set_num_threads(n: int | None) -> None:
    """Limit BLAS to ``n`` threads (``None``: back to the library default)."""
    global _limiter
    from threadpoolctl import threadpool_limits

    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise AmctError(f"set_num_threads: n must be a positive integer or None, got {n!r}")
    if _limiter is not None:
        _limiter.restore_original_limits()
        _limiter = None
    if n is not None:
        _limiter = threadpool_limits(limits=n, user_api="blas")


def num_threads() -> int:
    """The BLAS thread count in force (the largest over the BLAS libraries loaded)."""
    from threadpoolctl import threadpool_info

    counts = [info["num_threads"] for info in threadpool_info() if info.get("user_api") == "blas"]
    return max(counts) if counts else 1
