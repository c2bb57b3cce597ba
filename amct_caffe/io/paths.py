"""Inputs are never overwritten: the files a call reads, checked where every output is written.

A public function declares the files it reads with :func:`reading` (a context manager, nested
calls add to it); :func:`check_output` — called by :func:`amct_caffe.io.files.atomic_output` and
:class:`amct_caffe.io.outputs.StagedOutputs`, the only places outputs are written — refuses an
output path that is one of them: the same path once resolved (``./m.prototxt``, a symbolic link) or
the same file (a hard link). The error names both and what to do.

Paths are also checked for what the operating system cannot take (a NUL byte), so that such a
path gives a clear error instead of a ``ValueError`` from deep inside ``os``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import os
import re
from collections.abc import Iterator
from pathlib import Path

from amct_caffe.errors import AmctError

_INPUTS: contextvars.ContextVar[tuple[tuple[str, Path], ...]] = contextvars.ContextVar("amct_inputs", default=())


def checked_path(path, what: str = "path") -> Path:
    """``path`` as a Path, or an AmctError if the operating system cannot take it."""
    try:
        text = os.fspath(path)
    except TypeError:
        raise AmctError(f"{what} must be a file path, got {type(path).__name__} {path!r}") from None
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if "\0" in text:
        raise AmctError(f"{what} {text!r} contains a NUL byte, which no file name can hold")
    if not text:
        raise AmctError(f"{what} is empty: give a file path")
    return Path(text)


def require(**inputs) -> None:
    """An AmctError naming the first of ``inputs`` (argument name -> value) that is None: the guide's
    calls take these files as required strings, and a model quantized without its caffemodel would be
    saved without weights."""
    for name, value in inputs.items():
        if value is None:
            raise AmctError(f"{name} is None: give the path of the file (this argument is required)")


@contextlib.contextmanager
def reading(**inputs) -> Iterator[None]:
    """Declare the files the current call reads, by argument name (``None`` values are skipped)."""
    named = tuple((name, checked_path(value, name)) for name, value in inputs.items() if value is not None)
    token = _INPUTS.set(_INPUTS.get() + named)
    try:
        yield
    finally:
        _INPUTS.reset(token)


def also_reading(**inputs) -> None:
    """Add to the files the current call reads (as :func:`reading` does) until the enclosing ``reading`` block
    ends: for what a reader learns it reads only once it has looked, such as an image folder's per-input
    sub-folders. Call it inside a ``reading`` block (outside one, the addition would stay for good)."""
    named = tuple((name, checked_path(value, name)) for name, value in inputs.items() if value is not None)
    _INPUTS.set(_INPUTS.get() + named)


def reads(*arg_names: str):
    """Decorator: the function's arguments ``arg_names`` are files it reads (see :func:`reading`)."""

    def deco(func):
        signature = inspect.signature(func)

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            bound = signature.bind_partial(*args, **kwargs)
            with reading(**{n: bound.arguments.get(n) for n in arg_names}):
                return func(*args, **kwargs)
        return wrapper

    return deco


def _same(a: Path, b: Path) -> bool:
    try:
        if os.path.realpath(a) == os.path.realpath(b):
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


# The names of the entries a data folder's readers take (amct_caffe/data registers them: images, recorded
# batches, LMDB files): an output of such a name inside an input folder would be read as data by the next run.
_DATA_NAMES: list[re.Pattern] = []


def register_data_names(pattern: re.Pattern) -> None:
    """A data reader's file names (matched against an entry's name), for :func:`check_output`."""
    _DATA_NAMES.append(pattern)


def _read_as_data(path: Path, folder: Path) -> bool:
    """Whether ``path`` is an entry of input folder ``folder`` that its data reader would take (a subfolder's
    entries, or other names such as a model or a report page, are not read)."""
    try:
        return any(p.match(path.name) for p in _DATA_NAMES) and folder.is_dir() \
            and os.path.realpath(path.parent) == os.path.realpath(folder)
    except (OSError, ValueError):
        return False


def check_output_folder(folder) -> Path:
    """Refuse a folder for a call's outputs of any kind (a report's plots...) when it is a folder the call reads
    (module doc); returns it as a Path."""
    out = checked_path(folder, "output folder")
    for name, source in _INPUTS.get():
        if source.is_dir() and _same(out, source):
            raise AmctError(f"output folder {out} is the input folder {name} ({source}), whose next reader would "
                            "take the outputs for data: inputs are never changed; write them elsewhere")
    return out


def check_output(path) -> Path:
    """Refuse an output that is a file the current call reads, or an entry of a folder it reads that the folder's
    data reader would take (an image, a recorded batch) (module doc); returns it as a Path."""
    out = checked_path(path, "output path")
    for name, source in _INPUTS.get():
        if _same(out, source):
            raise AmctError(f"output {out} is the same file as the input {name} ({source}): inputs are never "
                            "overwritten; choose another output path")
        if _read_as_data(out, source):
            raise AmctError(f"output {out} is inside the input folder {name} ({source}), whose next reader would "
                            "take it for data: inputs are never changed; write it elsewhere")
    return out


def check_distinct(paths) -> None:
    """Refuse two outputs of one call that are the same file."""
    seen: list[Path] = []
    for p in paths:
        p = checked_path(p, "output path")
        for q in seen:
            if _same(p, q):
                raise AmctError(f"two outputs of this call are the same file ({q} and {p}); give distinct paths")
        seen.append(p)
