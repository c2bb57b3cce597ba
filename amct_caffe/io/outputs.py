"""Writing a set of output files all-or-nothing.

Each file is first written to a temporary name in its target directory; only when every one was
written are they renamed into place. A failure leaves no new or half-written output behind
(files from an earlier run stay as they were).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
from pathlib import Path

from amct_caffe.errors import FileAccessError
from amct_caffe.io.files import COMMITTED, message_text, temp_file_beside, write_error
from amct_caffe.io.paths import check_distinct, check_output
from amct_caffe.io.scratch import signals_deferred

_IOV_MAX = 1024  # buffers per writev (Linux's IOV_MAX)


def commits() -> int:
    """How many files have been committed so far (a mark for :func:`committed_since`)."""
    return len(COMMITTED)


def committed_since(mark: int) -> list[str]:
    """The absolute paths of the files committed since ``mark``."""
    return COMMITTED[mark:]


def _remove_all(paths: list[str]) -> None:
    """Remove ``paths`` (missing ones are fine); an interrupt arriving midway is raised once every one is
    gone, so no backup of the previous outputs is left beside the new ones."""
    interrupt: BaseException | None = None
    for path in paths:
        while True:
            try:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                break
            except BaseException as e:  # noqa: BLE001 - a signal's exception: finish first, raise below
                interrupt = interrupt or e
    if interrupt is not None:
        raise interrupt


def _write_all(fd: int, chunks: list) -> None:
    """Write ``chunks`` in turn: a few writev calls, so that a worker thread gives up and takes back
    the interpreter lock a few times per file, not once per blob."""
    views = [v for v in (memoryview(c).cast("B") for c in chunks) if v.nbytes]
    while views:
        done = os.writev(fd, views[:_IOV_MAX])
        while views and done >= len(views[0]):
            done -= len(views[0])
            views.pop(0)
        if done:  # a partial write ends inside a buffer
            views[0] = views[0][done:]


class StagedOutputs:
    """The files of one call, written by :meth:`commit` (all of them, or none).

    ``ahead``: each file is written to its temporary name on a worker thread as soon as it is added,
    while the caller prepares the next ones; :meth:`commit` waits for it, then renames. Use it as a
    context manager, so that a failure before the commit removes what was written ahead.
    """

    def __init__(self, ahead: bool = False):
        self._files: list[tuple[Path, list]] = []  # (target, the buffers its bytes are, in order)
        self._staged: list[tuple[str, Path]] = []  # (temporary file, target), written or being written
        self._made: list[Path] = []  # directories created for the files, removed again if nothing is committed
        self._target = Path()  # the file being written or moved, for messages
        self._queue: queue.SimpleQueue | None = queue.SimpleQueue() if ahead else None
        self._worker: threading.Thread | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    def add_bytes(self, path, data: bytes) -> str:
        return self.add_chunks(path, [data])

    def add_chunks(self, path, chunks: list) -> str:
        """Stage a file whose bytes are the concatenation of ``chunks`` (bytes or memoryviews, which
        must not change before :meth:`commit`)."""
        target = check_output(path)
        self._files.append((target, chunks))
        if self._queue is not None:
            self._check_targets()  # before anything is written for them
            if self._worker is None:
                with signals_deferred():  # a worker noted here has started (discard joins it)
                    self._worker = threading.Thread(target=self._write_ahead, name="amct-outputs", daemon=True)
                    self._worker.start()
            self._queue.put((target, chunks))
        return str(path)

    def add_text(self, path, text: str) -> str:
        return self.add_bytes(path, text.encode("utf-8"))

    def add_json(self, path, obj) -> str:
        return self.add_text(path, json.dumps(obj, indent=2) + "\n")

    def add_message_text(self, path, message) -> str:
        return self.add_text(path, message_text(message))

    def _check_targets(self) -> None:
        check_distinct(path for path, _ in self._files)
        for path, _ in self._files:
            try:
                is_dir = path.is_dir()
            except OSError as e:  # a name the file system refuses (too long, ...): before anything is written
                raise FileAccessError(f"cannot write {path}: {e.strerror or e}; choose another output path") from None
            if is_dir:
                raise FileAccessError(f"cannot write {path}: a directory of that name exists; choose another output "
                                      "path")

    def _write_temp(self, path: Path, chunks: list) -> None:
        self._target = path
        if not path.parent.is_dir():
            missing = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made += missing  # deepest first
        fd = None
        try:
            with signals_deferred():  # the temporary file exists only once noted (discard removes it)
                fd, tmp = temp_file_beside(path)
                self._staged.append((tmp, path))
            _write_all(fd, chunks)
        finally:
            if fd is not None:
                os.close(fd)

    def _write_ahead(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:  # after a failure the rest is not written; commit reports it
                try:
                    self._write_temp(*item)
                except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                    self._error = e

    def _join(self) -> None:
        if self._worker is not None:
            self._queue.put(None)
            if self._worker.ident is not None:  # started (a worker whose start failed has nothing to join)
                self._worker.join()
            self._worker = None

    def discard(self) -> None:
        """Remove what was written and not committed (nothing after a commit): the temporary files,
        and the directories made for them."""
        self._join()
        for tmp, _ in self._staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._staged.clear()
        for directory in self._made:
            with contextlib.suppress(OSError):  # not empty: something else was written there meanwhile
                directory.rmdir()
        self._made.clear()

    def commit(self) -> None:
        """Write every file, or none: on any failure the targets are as they were before."""
        if self._queue is None:
            self._check_targets()
        moved: list[tuple[Path, str | None]] = []  # (target, backup of its previous file or None)
        done = False
        try:
            if self._queue is None:
                for path, chunks in self._files:
                    self._write_temp(path, chunks)
            else:
                self._join()
                if self._error is not None:
                    raise self._error
            # the renames, the note of what is committed and the removal of the files they replaced run whole: an
            # interrupt is delivered after them (complete outputs, no backup left beside them)
            with signals_deferred():
                for tmp, path in self._staged:
                    self._target = path
                    backup = f"{tmp}.previous" if path.exists() else None
                    moved.append((path, backup))
                    if backup is not None:
                        os.replace(path, backup)
                    os.replace(tmp, path)
                COMMITTED.extend(os.path.abspath(path) for _, path in self._staged)
                done = True
                self._made.clear()  # they hold the outputs now
                self.discard()  # nothing left to remove: every temporary file was moved
                self._files.clear()
                _remove_all([backup for _, backup in moved if backup is not None])
        except BaseException as e:  # an interrupt too: put back what was there, write nothing
            if done:  # an interrupt held back until the outputs were in place
                raise
            for path, backup in reversed(moved):
                with contextlib.suppress(OSError):
                    if backup is not None:
                        os.replace(backup, path)
                    else:
                        os.unlink(path)
            self.discard()
            if isinstance(e, OSError):
                raise FileAccessError(f"{write_error(self._target, e)}; no output file was changed") from e
            raise
