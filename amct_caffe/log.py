"""Logging as the user guide specifies.

``AMCT_LOG_LEVEL`` sets what reaches the screen (stderr) and ``AMCT_LOG_FILE_LEVEL`` what goes
to ``amct_log/amct_caffe.log`` under the working directory. Values DEBUG, INFO, WARNING,
ERROR, case-insensitive; INFO by default. (The ``amct-caffe`` command line shows only WARNING and
above on the screen unless ``AMCT_LOG_LEVEL`` is set or ``-v`` is given.) Library modules only call
``logging.getLogger``; :func:`setup` is run by the public API entry points and the CLI, once.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

LOGGER_NAME = "amct_caffe"
LOG_DIR = "amct_log"
LOG_FILE = "amct_caffe.log"
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR}
_FORMAT = "%(asctime)s - %(levelname)s - [AMCT]:[%(name)s]: %(message)s"


def level_from_env(var: str, default: int = logging.INFO) -> int:
    """The level named by environment variable ``var``; ``default`` when it is unset, empty or invalid."""
    raw = os.environ.get(var, "")
    value = raw.strip().upper()
    if not value:
        return default
    if value not in _LEVELS:
        logging.getLogger(LOGGER_NAME).warning("%s=%r is not one of %s; using %s", var, raw, ", ".join(_LEVELS),
                                               logging.getLevelName(default))
        return default
    return _LEVELS[value]


class _LazyFileHandler(logging.FileHandler):
    """Creates amct_log/ and the file only when the first record arrives.

    When the file cannot be created (read-only directory, ``amct_log`` is a file...), says so once
    on stderr and drops the file records instead of failing the caller's logging call.
    """

    _failed = False

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()

    def emit(self, record):
        if self._failed:
            return
        try:
            super().emit(record)
        except OSError as e:  # raised by _open, which FileHandler.emit calls outside its own error handling
            self._give_up(e)

    def handleError(self, record):  # noqa: N802 - logging's name
        """A write or flush that failed inside StreamHandler.emit (a full disk, a file size limit): logging
        would print a traceback per record; say it once and stop writing the file."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            self._give_up(error)
        else:
            super().handleError(record)

    def _give_up(self, error: OSError) -> None:
        self._failed = True
        sys.stderr.write(f"amct_caffe: cannot write the log file {self.baseFilename} "
                         f"({error.strerror or error}); file logging is off\n")


class _ScreenHandler(logging.StreamHandler):
    """stderr; while a progress bar (tqdm) is on the screen a record is written above it, not into its line."""

    def emit(self, record):
        bars = sys.modules.get("tqdm")
        open_bars = getattr(getattr(bars, "tqdm", None), "_instances", None)
        if not open_bars:
            super().emit(record)
            return
        try:
            bars.tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - as StreamHandler.emit: logging never raises
            self.handleError(record)


def setup(force: bool = False, screen_level: int | None = None) -> logging.Logger:
    """Attach the screen and file handlers to the ``amct_caffe`` logger (idempotent).

    ``screen_level`` overrides ``AMCT_LOG_LEVEL`` (the command line passes its own choice).
    """
    logger = logging.getLogger(LOGGER_NAME)
    if getattr(logger, "_amct_configured", False) and not force:
        return logger
    for h in [h for h in logger.handlers if getattr(h, "_amct", False)]:
        logger.removeHandler(h)
        h.close()
    if screen_level is None:
        screen_level = level_from_env("AMCT_LOG_LEVEL")
    file_level = level_from_env("AMCT_LOG_FILE_LEVEL")
    screen = _ScreenHandler()
    screen.setLevel(screen_level)
    screen.setFormatter(logging.Formatter(_FORMAT))
    # backslashreplace: a path that is not valid UTF-8 (undecodable bytes in a file name) is still logged
    file = _LazyFileHandler(os.path.join(os.getcwd(), LOG_DIR, LOG_FILE), delay=True, encoding="utf-8",
                            errors="backslashreplace")
    file.setLevel(file_level)
    file.setFormatter(logging.Formatter(_FORMAT))
    for h in (screen, file):
        h._amct = True
        logger.addHandler(h)
    logger.setLevel(min(screen_level, file_level))
    logger._amct_configured = True
    return logger
