"""Choose between the C++ kernels (``amct_caffe._kernels``) and the NumPy references.

Every public function in ``amct_caffe.quant`` takes ``backend=None | "kernel" | "reference"``.
``None`` means the current default: the kernel when the extension imports, else the reference.
Tests switch the default for a block with ``with use_backend("reference"): ...``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

from amct_caffe.errors import ConfigError

from ._common import QuantizationError

_log = logging.getLogger(__name__)

try:
    from amct_caffe import _kernels as _kernels_module
except ImportError as exc:  # not built: the references still work
    _kernels_module = None
    _log.debug("amct_caffe._kernels unavailable (%s); using the NumPy references", exc)

BACKENDS = ("kernel", "reference")
_state = threading.local()


def kernels_available() -> bool:
    """True when the compiled extension imported."""
    return _kernels_module is not None


def resolve(backend: str | None) -> str:
    """Map ``backend`` (or the thread's default) to ``"kernel"`` or ``"reference"``."""
    if backend is None:
        backend = getattr(_state, "default", None)
    if backend is None:
        return "kernel" if _kernels_module is not None else "reference"
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "kernel" and _kernels_module is None:
        raise ConfigError("backend='kernel' requested but amct_caffe._kernels is not built")
    return backend


@contextlib.contextmanager
def use_backend(backend: str | None) -> Iterator[None]:
    """Make ``backend`` the default of this thread inside the ``with`` block."""
    if backend is not None:
        resolve(backend)  # validate early
    previous = getattr(_state, "default", None)
    _state.default = backend
    try:
        yield
    finally:
        _state.default = previous


def call_kernel(name: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``_kernels.<name>``; the kernel's ValueError (bad data) becomes QuantizationError.

    The C++ core throws ``std::invalid_argument`` with the same messages as the references,
    and pybind11 turns it into ValueError.
    """
    func = getattr(_kernels_module, name)
    try:
        return func(*args, **kwargs)
    except ValueError as exc:
        raise QuantizationError(str(exc)) from None
