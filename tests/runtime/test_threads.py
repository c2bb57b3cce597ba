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


def test_a_calibration_forward_leaves_a_core_to_its_worker(monkeypatch):
    """Inside leaving_a_core the adaptive count is at most cpus - 1 (the IFMR worker takes the core left), also when
    a look at the load inside the block would give every core; after it, the count it had. A pinned count stays."""
    from amct_caffe.runtime import threads

    clock = {"now": 100.0, "busy": 0.0, "own": 0.0}
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(threads, "_busy_seconds", lambda: clock["busy"])
    monkeypatch.setattr(threads.os, "times", lambda: (clock["own"], 0.0))
    monkeypatch.setattr(threads, "_hold", False)
    monkeypatch.setattr(threads, "_limiter", None)
    lib = _FakeLib(2)
    state = threads._Adaptive([lib], cpus=2)
    monkeypatch.setattr(threads, "_auto", state)
    state.update()  # the first sample
    assert threads.workers() == 2 and lib.num_threads == 2
    with threads.leaving_a_core():
        assert threads.workers() == 1 and lib.num_threads == 1
        clock["now"] += 1.0  # an idle machine: the look would give both cores
        clock["own"] += 1.0
        clock["busy"] += 1.0
        state.update()
        assert lib.num_threads == 1
    assert threads.workers() == 2 and lib.num_threads == 2
    with threads.leaving_a_core(enabled=False):
        assert lib.num_threads == 2
    with threads.leaving_a_core():  # nested: the cap holds until the outer block ends
        with threads.leaving_a_core():
            pass
        assert lib.num_threads == 1 and state.cap == 1
    assert lib.num_threads == 2
    monkeypatch.setattr(threads, "_limiter", object())  # set_num_threads(n) pinned a count: left alone
    with threads.leaving_a_core():
        assert lib.num_threads == 2
    monkeypatch.setattr(threads, "_limiter", None)
    with threads.leaving_a_core():  # a pin made inside the block stays after it
        lib.num_threads = 2
        monkeypatch.setattr(threads, "_limiter", object())
    assert lib.num_threads == 2 and state.cap is None


def test_a_streaming_calibration_net_leaves_a_core_while_it_collects(monkeypatch, tmp_path):
    """The calibration Net of the guide's flow asks for the core only while its IFMR layers still hand work to
    their worker: not once they are done, nor in a net observing with the exact search."""
    import numpy as np

    import amct_caffe as amct
    from amct_caffe.runtime import TEST, Net, memory, threads
    from tests.test_cli import LENET, LENET_WEIGHTS

    asked = []
    real = threads.leaving_a_core
    monkeypatch.setattr(memory.threads, "leaving_a_core", lambda enabled=True: (asked.append(enabled),
                                                                                real(enabled))[1])
    amct.create_quant_config(str(tmp_path / "c.json"), str(LENET), str(LENET_WEIGHTS), batch_num=2)
    graph = amct.init(str(tmp_path / "c.json"), str(LENET), str(LENET_WEIGHTS), str(tmp_path / "r.txt"))
    amct.weights_quantize_model(graph, str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel"))
    amct.activation_quantize_model(graph, str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel"))
    x = np.random.default_rng(0).uniform(0, 1, (64, 1, 28, 28)).astype(np.float32)
    for ifmr, expected in (("stream", [True, True, False]), ("exact", [False, False, False])):
        asked.clear()
        net = Net(str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel"), TEST, ifmr=ifmr)
        for _ in range(3):
            net.forward(data=x)
        assert asked == expected, ifmr

