import pytest

from amct_caffe import AmctError
from amct_caffe.runtime import num_threads, set_num_threads


def test_set_num_threads_limits_and_restores():
    set_num_threads(None)  # (where numpy's BLAS is held at one thread, the hold is made first)
    before = num_threads()
    try:
        set_num_threads(1)
        assert num_threads() == 1
    finally:
        set_num_threads(None)
    assert num_threads() == before
    with pytest.raises(AmctError, match="positive integer"):
        set_num_threads(0)


class _FakeLib:
    def __init__(self, n):
        self.num_threads = n

    def set_num_threads(self, n):
        self.num_threads = n


def test_adaptive_threads_follow_the_other_processes_load(monkeypatch):
    from amct_caffe.runtime import threads

    clock = {"now": 100.0, "busy": 0.0, "own": 0.0}
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(threads, "_busy_seconds", lambda: clock["busy"])
    monkeypatch.setattr(threads.os, "times", lambda: (clock["own"], 0.0))
    monkeypatch.setattr(threads, "_hold", False)  # numpy's BLAS not held at one thread
    lib = _FakeLib(2)
    state = threads._Adaptive([lib], cpus=2)

    def look(seconds, others, own):
        clock["now"] += seconds
        clock["busy"] += (others + own) * seconds
        clock["own"] += own * seconds
        state.update()
        return lib.num_threads

    look(0, 0, 0)                       # the first look only takes a sample
    assert look(1.0, 0.1, 2.0) == 2     # our own two busy cores do not count
    assert look(1.0, 1.0, 1.0) == 1     # another process on one core: one thread
    assert look(0.1, 0.0, 1.0) == 1     # too soon to look again
    assert look(1.0, 2.0, 0.5) == 1     # never fewer than one
    assert look(1.0, 0.2, 2.0) == 2     # the core is free again
    lib.num_threads = 1
    state.restore()
    assert lib.num_threads == 2


def test_blas_is_held_at_one_thread_where_its_sums_depend_on_the_count(monkeypatch):
    """Where numpy's BLAS is not OpenBLAS with its AVX-512 kernels (caffe_gemm.exact), its sums may change with
    the thread count, so it runs on one thread whatever is pinned or adapted, in any order of calls; the
    executor's own loops still get the count (threads.workers), and adapting starts from the count before."""
    from amct_caffe.runtime import threads

    monkeypatch.setattr(threads, "_blas_sums_thread_free", lambda: False)
    monkeypatch.setattr(threads, "_hold", None)
    monkeypatch.setattr(threads, "_auto", None)
    before = num_threads()
    try:
        set_num_threads(2)  # before the first forward's adapt()
        assert (num_threads(), threads.workers()) == (1, 2)
        threads.adapt()
        set_num_threads(None)
        assert num_threads() == 1
        threads.adapt()
        assert num_threads() == 1
        if threads._auto:
            assert threads._auto.default == before
        lib = _FakeLib(2)
        state = threads._Adaptive([lib], cpus=2)
        state._set(2)
        assert (lib.num_threads, state.current) == (1, 2)
    finally:
        set_num_threads(None)
        if threads._hold:
            threads._hold.restore_original_limits()
    assert num_threads() == before
