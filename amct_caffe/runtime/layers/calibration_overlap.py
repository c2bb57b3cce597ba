"""The IFMR layers' histogram fills and searches on a spare core while the forward goes on.

With one BLAS thread (the default on a busy machine, see :mod:`amct_caffe.runtime.threads`) a
calibration forward keeps one core busy, and each IFMR layer's histogram fill (a few ns per
observed value, tens of millions of values per batch) stops it. When a core is left over, an
IFMR layer of a Net hands its fill (and, on its last batch, its search) to one worker thread
and the forward goes on: the fill of layer L runs while the convolutions after it do (the
kernel releases the GIL).

What keeps the results the bytes of the synchronous run:

* one worker runs the tasks in the order they were handed over, and a Net drains its tasks at
  the end of every forward (``Net.after_forward``): each observer sees its batches in the same
  order, and the next batch of a layer is never handed over before the last one is in;
* the drain settles the layers in forward order on the calling thread: the record's fields are
  set in the same order as the synchronous run sets them, and each record file is written once;
* a fill reads the layer's bottom array itself, never a copy. The executor's layers write their
  tops into new arrays (or, with prepared steps, into an array nobody else holds: the pending
  task holds a reference, which rules that out), so the array stays as it was until the drain.
  A Net input is the exception: the next ``forward(data=...)`` writes it in place, and a user may
  too; a layer reading one fills it at once (inputs are small next to the activations). No
  activation lives longer than without the overlap: the forward's blobs hold them anyway until
  the next forward, and the tasks end before this one returns.

Errors of a task (an inf or NaN in the data, a changed sample shape, a failed search) are raised
by the drain, named as the synchronous layer names them, after every layer before it has been
settled and its record written.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future, wait

from amct_caffe.runtime import threads

__all__ = ["Overlap", "spare_cores"]


class _Worker:
    """One daemon thread running the tasks in the order submitted.

    A daemon, unlike a ThreadPoolExecutor's worker: its tasks only fill in-memory histograms (the
    records are written by the drain, on the calling thread), so nothing is lost if the interpreter
    exits without it, and exit never waits on it. (The pool's worker made Ctrl-C hang for ever when the
    signal landed between its thread's start and its registration for the exit hook: the exit then
    joined a thread nobody told to stop.)
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="amct-ifmr", daemon=True).start()

    def _run(self) -> None:
        while True:
            fn, future = self._tasks.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - the drain raises it on the calling thread
                future.set_exception(e)
            else:
                future.set_result(result)
            del fn, future  # the task's arrays are not held until the next one

    def submit(self, fn) -> Future:
        future: Future = Future()
        self._tasks.put((fn, future))
        return future


_pool: _Worker | None = None
_pool_lock = threading.Lock()


def _worker() -> _Worker:
    global _pool
    with _pool_lock:
        # A forked child inherits the worker object but not its thread: tasks given to it would never run.
        if _pool is None or _pool.pid != os.getpid():
            _pool = _Worker()
        return _pool


def spare_cores() -> int:
    """Cores the forward's BLAS threads leave (0: none, run synchronously)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, cores - threads.workers())


class Overlap:
    """The tasks the IFMR layers of one Net handed to the worker in the current forward."""

    def __init__(self) -> None:
        self._pending: list[tuple[object, Future, bool]] = []  # (layer, task, its last batch)

    @classmethod
    def of(cls, net) -> Overlap:
        """The Net's queue, made and hooked to the end of its forwards on first use."""
        for hook in net.after_forward:
            if isinstance(hook, cls):
                return hook
        queue = cls()
        net.after_forward.append(queue)
        return queue

    def submit(self, layer, task, finishing: bool) -> None:
        """Run ``task()`` on the worker; ``layer._settle(future, finishing)`` at the drain."""
        self._pending.append((layer, _worker().submit(task), finishing))

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def __call__(self) -> None:
        self.drain()

    def drain(self) -> None:
        """Wait for every task, settle the layers in the order they handed them over, write each
        record they finished once; the first error is raised after that."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        wait([task for _, task, _ in pending])  # nothing of this forward still runs after the drain
        sinks: dict[int, object] = {}
        error: BaseException | None = None
        for layer, task, finishing in pending:
            try:
                layer._settle(task, finishing)  # noqa: SLF001 - the IFMR layer's half of this protocol
            except Exception as e:  # noqa: BLE001 - raised below, once the others are settled
                error = error or e
            if finishing:
                sinks.setdefault(id(layer._sink), layer._sink)  # noqa: SLF001
        for sink in sinks.values():
            sink.write()
        if error is not None:
            raise error
