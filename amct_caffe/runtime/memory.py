"""numpy's huge-page hint, left out of the blobs of nets that run a few forwards.

numpy asks Linux for transparent huge pages (``madvise(MADV_HUGEPAGE)``) on every array of 4 MiB or
more. A net's first forward allocates its blobs and writes them for the first time (open_nsfw batch
8: 268 MiB); later forwards write into the same arrays. Measured on the 2-core virtual machine of
docs/performance.md (THP ``enabled`` and ``defrag`` both ``madvise``), open_nsfw batch 8:

* first forward 1.31-1.82 s with the hint (1.1 s of it system time faulting in huge pages), 0.42-0.48 s
  without it;
* later forwards 0.218-0.239 s with the hint, 0.228-0.247 s without (huge pages spare TLB misses:
  about 4 % of a warm forward).

So the hint pays for a net that runs many forwards and costs a net that runs a few. It is off
(:func:`hint_off`) for

* a net holding calibration layers (IFMR, SearchN: ``Layer.bounded_run``), which exists for its
  ``batch_num`` forwards, one by default: the Net runs its forwards inside :func:`hint_off`;
* ``amct-caffe run`` over at most :data:`FEW_FORWARDS` batches;
* the nets of the calls that build nets for a few forwards each (:func:`few_forwards`): the accuracy
  report (``compare_model``: open_nsfw, 2 batches of 8, three runs each interleaved, 9.1-10.6 s with
  the hint, 8.4-10.0 s without; in an earlier hour of the same machine 9.9-10.9 s against 5.8-6.2 s)
  and the fallback search.

Every other net (a user's, training, a long ``amct-caffe run``) keeps numpy's setting. ``AMCT_NUMPY_HUGEPAGE=1``
keeps the hint everywhere. The hint decides where the kernel places an array, never its values.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import numpy as np

from amct_caffe.runtime import threads


# On open_nsfw batch 8 the hint costs up to about 1 s once (the first forward) and saves about 4 % of each
# later one (0.01 s): below about 100 forwards a net is better off without it.
FEW_FORWARDS = 100


def _hint_switch():
    """numpy's private switch (``_set_madvise_hugepage``, numpy 1.20+; it returns the setting it
    replaces), or None where it is missing."""
    for core in ("_core", "core"):  # numpy 2 renamed numpy.core
        multiarray = getattr(getattr(np, core, None), "multiarray", None)
        switch = getattr(multiarray, "_set_madvise_hugepage", None)
        if switch is not None:
            return switch
    return None


_SWITCH = _hint_switch()
_LOCK = threading.Lock()
_open_blocks = 0  # hint_off blocks open in any thread
_before = True    # numpy's setting when the first of them opened


@contextlib.contextmanager
def hint_off(enabled: bool = True):
    """numpy's huge-page hint off inside the block (unless ``enabled`` is False or ``AMCT_NUMPY_HUGEPAGE=1``),
    as before after it.

    The setting is process-wide: blocks of several threads (or nested ones) count as one, switched off
    when the first opens and restored when the last closes, in whatever order they close.
    """
    global _open_blocks, _before
    if not enabled or _SWITCH is None or os.environ.get("AMCT_NUMPY_HUGEPAGE", "").strip() == "1":
        yield
        return
    with _LOCK:
        if _open_blocks == 0:
            _before = _SWITCH(False)
        _open_blocks += 1
    try:
        yield
    finally:
        with _LOCK:
            _open_blocks -= 1
            if _open_blocks == 0:
                _SWITCH(_before)


def few_forwards(fn):
    """Decorator: ``fn`` builds nets that it runs a few times each; their blobs are allocated with the
    hint off (module doc)."""
    @functools.wraps(fn)
    def with_hint_off(*args, **kwargs):
        with hint_off():
            return fn(*args, **kwargs)
    return with_hint_off


@contextlib.contextmanager
def calibration_forward(layers):
    """A calibration net's forward: numpy's huge-page hint off (:func:`hint_off`) and, while any of its
    ``layers`` hands work to the IFMR worker, a core left to that worker (threads.leaving_a_core)."""
    with hint_off(), threads.leaving_a_core(any(getattr(layer, "hands_off_work", False) for layer in layers)):
        yield
