"""Temporary folders that an interrupt cannot leave behind.

A Ctrl-C or SIGTERM raises its exception wherever the main thread is: also inside the removal of a
temporary folder, which then stops half way and leaves the folder (with the run's intermediate
models) in the system's temporary directory. :func:`temporary_directory` registers each folder
before it exists and forgets it only once it is gone; :func:`remove_leftovers` removes what is still
registered. The command line calls it after an interrupt (when further signals are ignored), and it
runs at interpreter exit for scripts.

A few statements must not be cut at all: a temporary output file's creation and the note of its name,
the renames that put outputs in place and the removal of the files they replaced.
:func:`signals_deferred` holds SIGINT and SIGTERM back across them and delivers them after.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator

_LIVE: set[str] = set()  # folders made and not yet removed
_LOCK = threading.Lock()


@contextlib.contextmanager
def temporary_directory(prefix: str) -> Iterator[str]:
    """A new folder (mode 0700) in the temporary directory, removed with its contents at the end."""
    while True:  # registered before it is made: an interrupt between the two leaves nothing unknown
        path = os.path.join(tempfile.gettempdir(), prefix + secrets.token_hex(6))
        with _LOCK:
            _LIVE.add(path)
        try:
            os.mkdir(path, 0o700)
            break
        except FileExistsError:
            _forget(path)
        except BaseException:
            _forget(path)
            raise
    try:
        yield path
    finally:
        remove(path)


def _forget(path: str) -> None:
    with _LOCK:
        _LIVE.discard(path)


def remove(path: str) -> None:
    """Remove the folder ``path`` and forget it (kept registered if it could not be removed)."""
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        _forget(path)


def remove_leftovers() -> None:
    """Remove every folder of :func:`temporary_directory` still there (an interrupt cut its removal)."""
    with _LOCK:
        left = sorted(_LIVE)
    for path in left:
        remove(path)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Run the block whole: a SIGINT / SIGTERM arriving meanwhile is handed to the handler it would have met
    (raising KeyboardInterrupt, the command line's, or the default action) when the block ends. Off the main
    thread, which gets no signals, nothing changes. Keep the block short: the user waits for it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, _frame: held.append(signum))
        yield
    finally:
        raised: BaseException | None = None
        for sig, handler in previous.items():
            while True:  # signal.signal runs the handlers of signals pending meanwhile: whatever they raise, restore
                try:
                    signal.signal(sig, handler)
                    break
                except BaseException as e:  # noqa: BLE001 - raised below, after every handler is back
                    raised = raised or e
        # every signal held is delivered, a default action (which ends the process) first; the first raise wins
        for sig in sorted(dict.fromkeys(held), key=lambda s: previous[s] != signal.SIG_DFL):
            handler = previous[sig]
            try:
                if callable(handler):
                    handler(sig, None)
                elif handler == signal.SIG_DFL:
                    signal.raise_signal(sig)
            except BaseException as e:  # noqa: BLE001
                raised = raised or e
        if raised is not None:
            raise raised

atexit.register(remove_leftovers)
